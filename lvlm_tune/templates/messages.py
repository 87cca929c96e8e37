"""Messages and the image tag: what a template renders, shared by every layer above.

A conversation is a list of :class:`Turn` (``role`` ``"user"`` or ``"assistant"``, and its text);
:data:`IMAGE_TAG` marks where an image goes in a user turn's text. The data layer builds its
records from these (:mod:`lvlm_tune.data.record`); templates render them.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_TAG = "<image>"


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is ``"user"`` or ``"assistant"``."""

    role: str
    content: str
