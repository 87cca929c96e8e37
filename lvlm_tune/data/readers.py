"""Normalise raw samples (LLaVA, OpenAI messages, caption pairs) into canonical records.

Every data format is a dict per sample; :func:`normalize` turns one into a
:class:`~lvlm_tune.data.record.Conversation` and validates it: roles alternate user/assistant
(starting with user, ending with assistant, an optional leading system message), every message
has text, ``<image>`` tags appear only in user turns and, when present, match the images one to
one. Each problem raises :class:`~lvlm_tune.data.errors.BadSampleError` naming the file, the
sample id and the exact field (``conversations[3].from``). The same functions serve JSON files
and Hugging Face dataset rows, and the preference readers
(:mod:`lvlm_tune.data.preference_readers`) build on them; :mod:`lvlm_tune.data.formats`
dispatches between the two and gives the cheap per-sample counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from PIL import Image

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.record import IMAGE_TAG, Conversation, ImageRef, Turn
from lvlm_tune.data.video_text import with_videos

FORMATS: tuple[str, ...] = ("llava", "openai", "caption")
# The key whose presence in a sample identifies each format, in detection order.
FORMAT_KEYS: dict[str, str] = {"conversations": "llava", "messages": "openai", "caption": "caption"}
LLAVA_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
OPENAI_ROLES: dict[str, str] = {r: r for r in ("system", "user", "assistant")}
CAPTION_POOL = "brief"


def detect_format(keys: Iterable[str], where: str) -> str:
    """Name the format of a sample (or dataset) from its keys (or column names).

    Raises:
        ValueError: naming ``where`` and the keys when no format key is present.
    """
    keys = set(keys)
    for key, fmt in FORMAT_KEYS.items():
        if key in keys:
            return fmt
    raise ValueError(
        f"{where}: cannot detect the data format from keys {sorted(keys)}; expected one of "
        f"{sorted(FORMAT_KEYS)} (or pass fmt= one of {FORMATS})"
    )


def normalize(raw: Any, fmt: str, *, source: str, index: int) -> Conversation:
    """Turn one raw sample of format ``fmt`` into a validated :class:`Conversation`.

    Args:
        raw: the sample as parsed from JSON or read from a dataset row.
        fmt: ``"llava"``, ``"openai"`` or ``"caption"``.
        source: the data file, for error messages.
        index: the row index, used as the id when the sample has none.

    Raises:
        BadSampleError: the sample is malformed; the message names file, id and field.
    """
    if fmt not in _NORMALIZERS:
        raise ValueError(f"unknown record format {fmt!r}; choices: {FORMATS}")
    ctx = Ctx.of(raw, source, index)
    conv = _NORMALIZERS[fmt](raw, ctx)
    conv.source, conv.index = source, index
    return conv


class Ctx:
    """Where a sample came from; builds its errors."""

    def __init__(self, source: str, sample_id: str) -> None:
        self.source, self.sample_id = source, sample_id

    @classmethod
    def of(cls, raw: Any, source: str, index: int) -> Ctx:
        """The context of raw sample ``index`` (its ``id``, else the index); raises
        ``BadSampleError`` when the sample is not an object."""
        if not isinstance(raw, dict):
            problem = f"expected an object, got {type(raw).__name__}"
            raise BadSampleError(source, str(index), "<record>", problem, "bad_field")
        return cls(source, str(raw["id"]) if raw.get("id") is not None else str(index))

    def error(self, field: str, problem: str, reason: str) -> BadSampleError:
        return BadSampleError(self.source, self.sample_id, field, problem, reason)


def image_refs(value: Any, field: str, ctx: Ctx) -> list[ImageRef]:
    """Image references from a str / bytes / PIL image / ``{"bytes", "path"}`` dict or a list."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    refs = []
    for j, item in enumerate(items):
        name = f"{field}[{j}]" if isinstance(value, (list, tuple)) else field
        if isinstance(item, dict):  # a datasets Image feature read without decoding
            item = item.get("bytes") or item.get("path")
        if isinstance(item, (bytes, Image.Image)) or (isinstance(item, str) and item.strip()):
            refs.append(item)
        else:
            problem = f"expected an image path, bytes or PIL image, got {item!r:.60}"
            raise ctx.error(name, problem, "bad_field")
    return refs


def build_conversation(
    messages: list[tuple[str, Any, str, str]],
    images: list[ImageRef],
    image_field: str,
    list_field: str,
    ctx: Ctx,
) -> Conversation:
    """Validate (role, text, role field, text field) messages and build the record."""
    system = None
    if messages and messages[0][0] == "system":
        _, text, _, text_field = messages.pop(0)
        if not isinstance(text, str):
            raise ctx.error(text_field, "system message must be a string", "empty_message")
        if IMAGE_TAG in text:
            problem = f"{IMAGE_TAG} tag in the system message; images may only appear in user turns"
            raise ctx.error(text_field, problem, "image_tag_mismatch")
        system = text
    if not messages:
        raise ctx.error(list_field, "no user/assistant turns", "bad_roles")
    turns, n_tags = [], 0
    for k, (role, text, role_field, text_field) in enumerate(messages):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            problem = f"expected role {expected!r} here, got {role!r} (roles must alternate user/assistant, starting with user)"
            raise ctx.error(role_field, problem, "bad_roles")
        if not isinstance(text, str) or not text.strip():
            raise ctx.error(
                text_field, f"empty or non-string message: {text!r:.60}", "empty_message"
            )
        tags = text.count(IMAGE_TAG)
        if tags and role != "user":
            problem = f"{IMAGE_TAG} tag in a {role} turn; images may only appear in user turns"
            raise ctx.error(text_field, problem, "image_tag_mismatch")
        n_tags += tags
        turns.append(Turn(role, text))
    if turns[-1].role != "assistant":
        problem = "conversation ends with a user turn; the last turn must be the assistant's"
        raise ctx.error(messages[-1][2], problem, "bad_roles")
    if n_tags and n_tags != len(images):
        problem = f"{n_tags} {IMAGE_TAG} tag(s) in the text but {len(images)} image(s)"
        raise ctx.error(image_field, problem, "image_tag_mismatch")
    return Conversation(id=ctx.sample_id, turns=turns, images=images, system=system)


def _role(value: Any, roles: dict[str, str], field: str, ctx: Ctx) -> str:
    if isinstance(value, str) and value in roles:
        return roles[value]
    raise ctx.error(field, f"unknown role {value!r}; expected one of {sorted(roles)}", "bad_roles")


def message_list(raw: dict, key: str, ctx: Ctx) -> list[dict]:
    value = raw.get(key)
    if not isinstance(value, list):
        raise ctx.error(
            key, f"expected a list of messages, got {type(value).__name__}", "bad_field"
        )
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise ctx.error(f"{key}[{k}]", "expected an object", "bad_field")
    return value


def llava_messages(raw: dict, ctx: Ctx) -> tuple[list[tuple[str, Any, str, str]], list, str]:
    """The (role, text, role field, text field) messages of ``conversations``, the images and
    the name of the images' field."""
    image_field = "image" if raw.get("image") is not None or "images" not in raw else "images"
    images = image_refs(raw.get(image_field), image_field, ctx)
    messages = [
        (
            _role(m.get("from"), LLAVA_ROLES, f"conversations[{k}].from", ctx),
            m.get("value"),
            f"conversations[{k}].from",
            f"conversations[{k}].value",
        )
        for k, m in enumerate(message_list(raw, "conversations", ctx))
    ]
    return messages, images, image_field


def _llava(raw: dict, ctx: Ctx) -> Conversation:
    messages, images, image_field = llava_messages(raw, ctx)
    return build_conversation(messages, images, image_field, "conversations", ctx)


def openai_content(content: Any, field: str, pending: Iterator, ctx: Ctx) -> tuple[Any, list]:
    """Text (``<image>`` tags at image parts) and images of one message's ``content``."""
    if not isinstance(content, list):
        return content, []
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(part.get("text"))
            if not isinstance(texts[-1], str):
                raise ctx.error(f"{field}[{j}].text", "text part without a string", "empty_message")
            continue
        if kind not in ("image", "image_url"):
            raise ctx.error(f"{field}[{j}]", f"unknown content part {part!r:.60}", "bad_field")
        ref = part.get("image") or part.get("path") or part.get("url")
        if kind == "image_url":
            url = part.get("image_url")
            ref = url.get("url") if isinstance(url, dict) else url
        if ref is None:  # placeholder part: the image comes from the top-level "images" list
            ref = next(pending, None)
            if ref is None:
                raise ctx.error(
                    "images", "more image parts than top-level images", "image_tag_mismatch"
                )
        images.extend(image_refs(ref, f"{field}[{j}]", ctx))
        texts.append(IMAGE_TAG)
    return "\n".join(t for t in texts if t), images


def openai_messages(
    value: list[dict], key: str, pending: Iterator, ctx: Ctx
) -> tuple[list[tuple[str, Any, str, str]], list[ImageRef]]:
    """The (role, text, role field, text field) messages of the message list ``key`` and the
    images of their parts (placeholder parts take the next of ``pending``)."""
    messages, images = [], []
    for k, m in enumerate(value):
        field = f"{key}[{k}]"
        role = _role(m.get("role"), OPENAI_ROLES, f"{field}.role", ctx)
        text, found = openai_content(m.get("content"), f"{field}.content", pending, ctx)
        images.extend(found)
        messages.append((role, text, f"{field}.role", f"{field}.content"))
    return messages, images


def message_images(found: list, top: list, pending: Iterator, ctx: Ctx) -> list[ImageRef]:
    """The sample's images: those of its image parts, else the top-level ones (plain-string
    contents with ``<image>`` tags); every top-level image must belong to a part."""
    if not found:
        return top
    if next(pending, None) is not None:
        raise ctx.error("images", "more top-level images than image parts", "image_tag_mismatch")
    return found


def _openai(raw: dict, ctx: Ctx) -> Conversation:
    top = image_refs(raw.get("images"), "images", ctx)
    pending = iter(top)
    value = message_list(raw, "messages", ctx)
    messages, found = openai_messages(value, "messages", pending, ctx)
    images = message_images(found, top, pending, ctx)
    return build_conversation(messages, images, "images", "messages", ctx)


def _caption(raw: dict, ctx: Ctx) -> Conversation:
    caption = raw.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ctx.error("caption", f"empty or non-string caption: {caption!r:.60}", "empty_message")
    if IMAGE_TAG in caption:
        raise ctx.error("caption", f"{IMAGE_TAG} tag inside a caption", "image_tag_mismatch")
    images = image_refs(raw.get("image", raw.get("images")), "image", ctx)
    if not images:
        raise ctx.error("image", "caption samples need an image", "bad_field")
    return Conversation(
        id=ctx.sample_id,
        turns=[Turn("user", ""), Turn("assistant", caption)],
        images=images,
        instruction_pool=CAPTION_POOL,
        extra={"caption": caption},
    )


_NORMALIZERS: dict[str, Callable[[dict, Ctx], Conversation]] = {
    "llava": with_videos(_llava),  # a sample's video / videos (lvlm_tune.data.video_text)
    "openai": _openai,
    "caption": _caption,
}
