"""The canonical preference pair: a prompt conversation and two final answers to compare.

The preference readers (:mod:`lvlm_tune.data.preference_readers`) turn LLaVA-style JSON with
``chosen`` / ``rejected`` strings and TRL's preference rows into one :class:`PreferenceRecord`;
the pair encoder (:mod:`lvlm_tune.data.preference_encoder`) encodes
:meth:`PreferenceRecord.with_answer` of each side with the SFT encoder, so both sides are
exactly the ids supervised training and inference would use for that conversation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lvlm_tune.data.record import Conversation, ImageRef, Turn

SIDES = ("chosen", "rejected")


@dataclass
class PreferenceRecord:
    """One preference pair.

    Attributes:
        prompt: id, images, videos, system, source and index of the pair, and its turns:
            alternating user/assistant, starting and ENDING with a user turn, the one whose
            answer ``chosen`` and ``rejected`` give. Earlier assistant turns are context
            (never trained).
        chosen: the preferred final answer.
        rejected: the dispreferred final answer.
    """

    prompt: Conversation
    chosen: str
    rejected: str

    def with_answer(self, which: str) -> Conversation:
        """The prompt followed by the ``"chosen"`` or ``"rejected"`` answer: the conversation
        one side of the pair trains on (its last answer)."""
        if which not in SIDES:
            raise ValueError(f"which must be one of {SIDES}, got {which!r}")
        answer = Turn("assistant", getattr(self, which))
        return dataclasses.replace(self.prompt, turns=[*self.prompt.turns, answer])

    # The pair's identity, as error messages and the image loader read it from a record.
    @property
    def id(self) -> str:
        return self.prompt.id

    @property
    def source(self) -> str:
        return self.prompt.source

    @property
    def index(self) -> int:
        return self.prompt.index

    @property
    def images(self) -> list[ImageRef]:
        return self.prompt.images

    @property
    def videos(self) -> list[str]:
        return self.prompt.videos
