"""Normalise raw preference samples into :class:`~lvlm_tune.data.preference.PreferenceRecord`.

Two formats (``docs/preference_data.md``), detected by their ``chosen`` / ``rejected`` keys:

* ``llava_preference``: LLaVA JSON (``id``, ``image`` / ``images``, ``video`` / ``videos``)
  whose ``conversations`` hold the prompt, ending with the human turn that ``chosen`` and
  ``rejected`` (strings) answer; earlier ``gpt`` turns are context.
* ``trl_preference``: TRL's preference rows: ``prompt`` a message list (``role`` /
  ``content``, content a string or typed parts, ``{"type": "image"}`` taking the next of the
  top-level ``images``) or a string, ``chosen`` / ``rejected`` one assistant message each (or
  strings). Without ``prompt``, ``chosen`` and ``rejected`` are whole conversations and their
  common leading messages are the prompt (TRL's implicit prompt). RLAIF-V's rows (``image``,
  ``question``, ``chosen``, ``rejected``) read the same, ``question`` standing for ``prompt``.

Both reuse the SFT readers (:mod:`lvlm_tune.data.readers`) for the prompt, so roles, message
texts, image tags and images are checked exactly as for supervised data; each problem raises
``BadSampleError`` naming the file, the sample id and the field (``chosen``,
``prompt[2].content``, ``rejected[0].role`` ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from lvlm_tune.data.preference import SIDES, PreferenceRecord
from lvlm_tune.data.readers import (
    Ctx,
    build_conversation,
    image_refs,
    llava_messages,
    message_images,
    message_list,
    openai_content,
    openai_messages,
)
from lvlm_tune.data.record import IMAGE_TAG, Conversation
from lvlm_tune.data.video import VIDEO_TAG
from lvlm_tune.data.video_text import with_videos

PREFERENCE_FORMATS: tuple[str, ...] = ("llava_preference", "trl_preference")
IMAGE_PARTS = ("image", "image_url")


def detect_preference(keys: Iterable[str]) -> str | None:
    """The preference format of a sample (or dataset) with these keys, ``None`` when it holds
    neither ``chosen`` nor ``rejected`` (a supervised sample)."""
    keys = set(keys)
    if not keys & set(SIDES):
        return None
    return "llava_preference" if "conversations" in keys else "trl_preference"


def normalize_preference(raw: Any, fmt: str, *, source: str, index: int) -> PreferenceRecord:
    """Turn one raw sample of preference format ``fmt`` into a validated record.

    Raises:
        BadSampleError: the sample is malformed; the message names file, id and field.
    """
    if fmt not in _NORMALIZERS:
        raise ValueError(f"unknown preference format {fmt!r}; choices: {PREFERENCE_FORMATS}")
    record = _NORMALIZERS[fmt](raw, Ctx.of(raw, source, index))
    record.prompt.source, record.prompt.index = source, index
    return record


def _answer(value: Any, field: str, ctx: Ctx) -> str:
    """A final answer: a non-empty string without image or video tags."""
    if value is None:
        raise ctx.error(field, "missing: a preference pair needs chosen and rejected", "bad_field")
    if not isinstance(value, str) or not value.strip():
        raise ctx.error(field, f"empty or non-string answer: {value!r:.60}", "empty_answer")
    for tag in (IMAGE_TAG, VIDEO_TAG):
        if tag in value:
            problem = f"{tag} tag in an answer; images and videos belong to the prompt"
            raise ctx.error(field, problem, "image_tag_mismatch")
    return value


def _pair(
    messages: list[tuple[str, Any, str, str]],
    chosen: str,
    rejected: str,
    images: list,
    image_field: str,
    list_field: str,
    ctx: Ctx,
) -> Conversation:
    """Validate the prompt ``messages`` with the chosen answer after them, as SFT validates a
    conversation; returns that conversation (the prompt is all but its last turn)."""
    if not messages or messages[-1][0] != "user":
        got = f"role {messages[-1][0]!r}" if messages else "no turns"
        problem = (
            f"the prompt must end with the user turn that chosen and rejected answer; got {got}"
        )
        raise ctx.error(messages[-1][2] if messages else list_field, problem, "bad_roles")
    answer = ("assistant", chosen, "chosen", "chosen")
    return build_conversation([*messages, answer], images, image_field, list_field, ctx)


def _record(conversation: Conversation, rejected: str) -> PreferenceRecord:
    prompt = dataclasses.replace(conversation, turns=conversation.turns[:-1])
    return PreferenceRecord(prompt, conversation.turns[-1].content, rejected)


def _llava_with_chosen(raw: dict, ctx: Ctx) -> Conversation:
    messages, images, image_field = llava_messages(raw, ctx)
    chosen = _answer(raw.get("chosen"), "chosen", ctx)
    rejected = _answer(raw.get("rejected"), "rejected", ctx)
    return _pair(messages, chosen, rejected, images, image_field, "conversations", ctx)


_LLAVA = with_videos(_llava_with_chosen)  # the sample's video / videos, as for SFT


def _llava(raw: dict, ctx: Ctx) -> PreferenceRecord:
    return _record(_LLAVA(raw, ctx), raw["rejected"])


def _message_answer(value: Any, field: str, first: int, ctx: Ctx) -> str:
    """The text of a TRL answer: a string, or a list of one assistant message (``first``: the
    index of that message in ``field``, for an implicit prompt's whole conversation)."""
    if value is None or isinstance(value, str):
        return _answer(value, field, ctx)
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ctx.error(field, f"expected a string or a list of messages, got {value!r:.60}", "bad_field")  # fmt: skip
    if len(value) != 1:
        problem = f"expected one assistant message after the prompt, got {len(value)}"
        raise ctx.error(field, problem, "bad_roles")
    name = f"{field}[{first}]"
    if value[0].get("role") != "assistant":
        problem = f"expected role 'assistant', got {value[0].get('role')!r}"
        raise ctx.error(f"{name}.role", problem, "bad_roles")
    content = value[0].get("content")
    for j, part in enumerate(content if isinstance(content, list) else ()):
        if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
            problem = "an image part in an answer; images belong to the prompt"
            raise ctx.error(f"{name}.content[{j}]", problem, "image_tag_mismatch")
    text, _ = openai_content(content, f"{name}.content", iter(()), ctx)
    return _answer(text, f"{name}.content", ctx)


def _common_prefix(chosen: list, rejected: list) -> int:
    """How many leading messages two whole conversations share (one answer left to each)."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return n


def _trl(raw: dict, ctx: Ctx) -> PreferenceRecord:
    image_field = "images" if raw.get("images") is not None or "image" not in raw else "image"
    top = image_refs(raw.get(image_field), image_field, ctx)
    pending = iter(top)
    prompt_key = "prompt" if raw.get("prompt") is not None or "question" not in raw else "question"
    prompt = raw.get(prompt_key)
    first = 0
    if isinstance(prompt, str):
        messages, found = [("user", prompt, prompt_key, prompt_key)], []
        chosen, rejected = raw.get("chosen"), raw.get("rejected")
    elif prompt is not None:
        value = message_list(raw, prompt_key, ctx)
        messages, found = openai_messages(value, prompt_key, pending, ctx)
        chosen, rejected = raw.get("chosen"), raw.get("rejected")
    else:  # implicit prompt: the leading messages chosen and rejected share
        whole = {side: message_list(raw, side, ctx) for side in SIDES}
        first = _common_prefix(whole["chosen"], whole["rejected"])
        messages, found = openai_messages(whole["chosen"][:first], "chosen", pending, ctx)
        chosen, rejected = whole["chosen"][first:], whole["rejected"][first:]
    chosen = _message_answer(chosen, "chosen", first, ctx)
    rejected = _message_answer(rejected, "rejected", first, ctx)
    images = message_images(found, top, pending, ctx)
    list_field = prompt_key if prompt is not None else "chosen"
    return _record(
        _pair(messages, chosen, rejected, images, image_field, list_field, ctx), rejected
    )


_NORMALIZERS = {"llava_preference": _llava, "trl_preference": _trl}
