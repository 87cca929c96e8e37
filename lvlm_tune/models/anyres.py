"""Image-token counts of the "anyres" LLaVA families (NeXT, OneVision), from their processors.

A NeXT/OneVision processor expands each ``<image>`` of a prompt to a number of tokens that
depends on the image's size (the grid it is tiled into, the rows of the newline embedding,
OneVision's ``anyres_max_N`` downscale) and, for OneVision, on whether the sample holds one
image or several (several images are encoded at base resolution, plus one newline token).
:func:`processor_image_counter` asks the processor itself for each count — the same
``_get_number_of_features`` call its ``__call__`` makes — so the encoder's expansion matches
``processor(images=..., text=...)`` token for token (the tests check this on many sizes).
transformers exposes the count only through these processor methods; we call them rather than
re-deriving the tiling arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from lvlm_tune.data.image_tokens import ImageSize


class ProcessorImageCounter:
    """Per-image token counts as ``processor`` expands its image token.

    Args:
        processor: a ``LlavaNextProcessor`` or ``LlavaOnevisionProcessor``.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        # The processed tile size (the processor reads it off its own pixel_values).
        pixels = processor.image_processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")
        self.tile = tuple(int(x) for x in pixels["pixel_values"].shape[-2:])
        self.drop_cls = processor.vision_feature_select_strategy == "default"
        self.multi_image_base = getattr(processor, "vision_aspect_ratio", None) is not None

    def one(self, size: ImageSize, num_images: int = 1) -> int:
        """Tokens of one image of ``size`` (height, width) in a sample of ``num_images``."""
        if self.multi_image_base and num_images != 1:
            count = int(self.processor.num_image_tokens) + 1  # base tile + one newline
        else:
            height, width = (int(s) for s in size)
            count = int(self.processor._get_number_of_features(height, width, *self.tile))
        return count - 1 if self.drop_cls else count

    def __call__(self, sizes: Sequence[ImageSize]) -> list[int]:
        return [self.one(size, len(sizes)) for size in sizes]


def processor_image_counter(processor: Any) -> ProcessorImageCounter:
    """The image-token counter of an anyres processor (see :class:`ProcessorImageCounter`)."""
    return ProcessorImageCounter(processor)


def video_tokens(processor: Any, num_frames: int) -> int:
    """Tokens one video of ``num_frames`` frames becomes under a ``LlavaOnevisionProcessor``
    (pooled patches per frame, plus one newline), from the processor's own count."""
    size = processor.image_processor.size
    height, width = (
        size.get("height") or size["shortest_edge"],
        size.get("width") or size["shortest_edge"],
    )
    counts = processor._get_num_multimodal_tokens(video_sizes=[(num_frames, height, width)])
    return int(counts["num_video_tokens"][0])
