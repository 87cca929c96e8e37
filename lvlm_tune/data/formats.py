"""Every record format in one place: detection, normalisation and the cheap per-sample counts.

Supervised formats (``llava``, ``openai``, ``caption``) are read by
:mod:`lvlm_tune.data.readers` into a :class:`~lvlm_tune.data.record.Conversation`; preference
formats (``llava_preference``, ``trl_preference``, detected by a ``chosen`` / ``rejected`` key)
by :mod:`lvlm_tune.data.preference_readers` into a
:class:`~lvlm_tune.data.preference.PreferenceRecord`. The record sources call this module only.
:func:`count_words` / :func:`count_images` give the length estimates the record cache stores
(a preference pair counts its prompt and the longer of its answers) and never raise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from lvlm_tune.data import readers
from lvlm_tune.data.preference import PreferenceRecord
from lvlm_tune.data.preference_readers import (
    IMAGE_PARTS,
    PREFERENCE_FORMATS,
    detect_preference,
    normalize_preference,
)
from lvlm_tune.data.record import Conversation

FORMATS: tuple[str, ...] = (*readers.FORMATS, *PREFERENCE_FORMATS)
# The columns that hold a sample's text, in any format (the others are images and metadata).
TEXT_KEYS = ("conversations", "messages", "caption", "prompt", "question", "chosen", "rejected")
# Where each format keeps its prompt messages, and the key of a message's text.
_MESSAGES = {
    "llava": (("conversations",), "value"),
    "llava_preference": (("conversations",), "value"),
    "openai": (("messages",), "content"),
    "trl_preference": (("prompt", "question"), "content"),
}

__all__ = ["FORMATS", "PREFERENCE_FORMATS", "TEXT_KEYS", "detect_format", "normalize"]


def detect_format(keys: Iterable[str], where: str) -> str:
    """Name the format of a sample (or dataset) from its keys (or column names).

    Raises:
        ValueError: naming ``where`` and the keys when no format key is present.
    """
    keys = set(keys)
    found = detect_preference(keys)
    if found is not None:
        return found
    try:
        return readers.detect_format(keys, where)
    except ValueError as err:
        raise ValueError(f"{err}; preference pairs have 'chosen' and 'rejected'") from None


def normalize(raw: Any, fmt: str, *, source: str, index: int) -> Conversation | PreferenceRecord:
    """One raw sample of format ``fmt`` as its validated record (``BadSampleError`` naming
    file, id and field when it is malformed)."""
    if fmt in PREFERENCE_FORMATS:
        return normalize_preference(raw, fmt, source=source, index=index)
    return readers.normalize(raw, fmt, source=source, index=index)


def _texts(value: Any, text_key: str) -> Iterator[Any]:
    """The texts of a string, or of a list of messages (string or typed-part contents)."""
    if isinstance(value, str):
        yield value
        return
    for message in value if isinstance(value, list) else ():
        content = message.get(text_key) if isinstance(message, dict) else None
        if isinstance(content, list):
            yield from (p.get("text") for p in content if isinstance(p, dict))
        else:
            yield content


def _words(value: Any, text_key: str) -> int:
    return sum(len(t.split()) for t in _texts(value, text_key) if isinstance(t, str))


def _prompt_messages(raw: dict, fmt: str) -> tuple[Any, str]:
    keys, text_key = _MESSAGES[fmt]
    value = next((raw[k] for k in keys if raw.get(k) is not None), None)
    if value is None and fmt == "trl_preference":  # implicit prompt: inside chosen
        value = raw.get("chosen")
    return value, text_key


def count_words(raw: Any, fmt: str) -> int:
    """Whitespace word count of the message texts of a raw sample (0 for what is not text);
    for a preference pair, its prompt and the longer of its answers."""
    if not isinstance(raw, dict):
        return 0
    try:
        if fmt == "caption":
            return _words(raw.get("caption"), "")
        value, text_key = _prompt_messages(raw, fmt)
        words = _words(value, text_key)
        if fmt in PREFERENCE_FORMATS:
            answers = [_words(raw.get(side), "content") for side in ("chosen", "rejected")]
            words += max(answers) - (answers[0] if value is raw.get("chosen") else 0)
        return words
    except (AttributeError, TypeError):
        return 0


def count_images(raw: Any, fmt: str) -> int:
    """Number of images a raw sample refers to (a cheap count; validation happens later)."""
    if not isinstance(raw, dict):
        return 0
    parts = 0
    if fmt in ("openai", "trl_preference"):
        value, _ = _prompt_messages(raw, fmt)
        for m in value if isinstance(value, list) else ():
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                parts += sum(isinstance(p, dict) and p.get("type") in IMAGE_PARTS for p in content)
    if parts:
        return parts
    keys = ("images", "image") if fmt in ("openai", "trl_preference") else ("image", "images")
    value = next((raw[k] for k in keys if raw.get(k) is not None), None)
    if fmt == "openai":
        value = raw.get("images")
    if value is None:
        return 0
    return len(value) if isinstance(value, (list, tuple)) else 1
