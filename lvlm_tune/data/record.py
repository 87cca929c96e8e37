"""The canonical conversation record every reader produces and the encoder consumes.

Readers (LLaVA JSON, caption pairs, OpenAI messages, Hugging Face datasets) all turn a raw sample
into one :class:`Conversation`: an id, the images in order, an optional system prompt and
strictly alternating user/assistant turns. ``<image>`` tags stay inside user turn text where the
data put them; the encoder decides where images finally go (``image_position``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lvlm_tune.templates.messages import IMAGE_TAG, Turn

__all__ = ["IMAGE_TAG", "Conversation", "ImageRef", "Turn"]

# An image as a reader found it: a path (relative to the image folder), raw bytes, or a PIL image.
ImageRef = Any


@dataclass
class Conversation:
    """One training sample in canonical form.

    Attributes:
        id: sample id from the data, or the row index as a string when the data has none.
        turns: alternating user/assistant turns, starting with user, ending with assistant.
        images: image references in the order their ``<image>`` tags appear.
        videos: video references (a folder of frames or a video file, relative to the video
            folder) in the order their ``<video>`` tags appear (:mod:`lvlm_tune.data.video`).
        system: system prompt from the data; ``None`` means "use the template's default".
        instruction_pool: name of a built-in instruction pool; when set, the first user turn's
            text is drawn from that pool (caption data).
        source: file the sample came from (for error messages).
        index: row index inside ``source``.
        extra: reader-specific fields later stages may use (e.g. captions, generation targets).
    """

    id: str
    turns: list[Turn]
    images: list[ImageRef] = field(default_factory=list)
    system: str | None = None
    instruction_pool: str | None = None
    source: str = "<memory>"
    index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    videos: list[str] = field(default_factory=list)

    @property
    def has_images(self) -> bool:
        return bool(self.images)
