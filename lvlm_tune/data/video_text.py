"""The ``<video>`` tag in the text: reading it, placing it, expanding it to the model's tokens.

* **Reading** (:func:`with_videos`, around the LLaVA reader): a sample's ``video`` /
  ``videos`` key becomes ``Conversation.videos``. ``<video>`` tags may only stand in user
  turns, one per video (or none). LLaVA video data (LLaVA-Video-178K, ShareGPT4Video) marks
  the video with ``<image>``: a sample with videos, no images and no ``<video>`` tag has its
  ``<image>`` tags read as ``<video>`` when there is one per video.
* **Placing** (:func:`place_videos`): like images, a video whose tag is in the first user turn
  (or that has no tag) goes ``before`` / ``after`` the first question under those positions;
  ``keep`` and tags in later turns stay where the data put them.
* **Expanding** (:func:`expand_videos`): each video token becomes the model's count of video
  tokens (for OneVision ``frames * ceil(sqrt(patches) / 2) ** 2 + 1``, from the processor:
  :func:`lvlm_tune.models.anyres.video_tokens`) before truncation, so truncation sees the
  true length and, cutting only after answers, drops a video with its turn, never part of it.
  A video token never trains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.labels import IGNORE_INDEX
from lvlm_tune.data.record import IMAGE_TAG, Conversation, Turn
from lvlm_tune.data.video import VIDEO_TAG

USER_ROLES = ("human", "user")


def video_refs(raw: dict, ctx: Any) -> tuple[str, list[str]]:
    """The data's video key (``video`` or ``videos``) and its paths."""
    key = "video" if raw.get("video") is not None or "videos" not in raw else "videos"
    value = raw.get(key)
    if value is None:
        return key, []
    items = value if isinstance(value, (list, tuple)) else [value]
    for j, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            name = f"{key}[{j}]" if isinstance(value, (list, tuple)) else key
            raise ctx.error(name, f"expected a video path, got {item!r:.60}", "bad_field")
    return key, list(items)


def _texts(raw: dict) -> list[Any]:
    messages = raw.get("conversations")
    return [m.get("value") if isinstance(m, dict) else None for m in messages or ()]


def _image_tags_as_video(raw: dict, num_videos: int, key: str, ctx: Any) -> dict:
    """LLaVA video data: its ``<image>`` tags (one per video) read as ``<video>`` tags."""
    texts = [t for t in _texts(raw) if isinstance(t, str)]
    if any(VIDEO_TAG in t for t in texts):
        return raw
    tags = sum(t.count(IMAGE_TAG) for t in texts)
    if not tags:
        return raw
    if tags != num_videos:
        problem = f"{tags} {IMAGE_TAG} tag(s) for no image and {num_videos} video(s)"
        raise ctx.error(key, problem, "image_tag_mismatch")
    messages = [
        {**m, "value": m["value"].replace(IMAGE_TAG, VIDEO_TAG)}
        if isinstance(m, dict) and isinstance(m.get("value"), str)
        else m
        for m in raw["conversations"]
    ]
    return {**raw, "conversations": messages}


def with_videos(read: Callable[[dict, Any], Conversation]) -> Callable[[dict, Any], Conversation]:
    """The LLaVA reader ``read`` extended with the sample's videos (see the module doc)."""

    def read_with_videos(raw: dict, ctx: Any) -> Conversation:
        key, videos = video_refs(raw, ctx)
        if not videos:
            return read(raw, ctx)
        if raw.get("image") is None and raw.get("images") is None:
            raw = _image_tags_as_video(raw, len(videos), key, ctx)
        record = read(raw, ctx)
        tags = 0
        for k, (message, text) in enumerate(zip(raw["conversations"], _texts(raw), strict=True)):
            count = text.count(VIDEO_TAG)
            if count and message.get("from") not in USER_ROLES:
                problem = f"{VIDEO_TAG} tag in a {message.get('from')} message; videos may only appear in user turns"
                raise ctx.error(f"conversations[{k}].value", problem, "image_tag_mismatch")
            tags += count
        if tags and tags != len(videos):
            problem = f"{tags} {VIDEO_TAG} tag(s) in the text but {len(videos)} video(s)"
            raise ctx.error(key, problem, "image_tag_mismatch")
        record.videos = videos
        return record

    return read_with_videos


def place_videos(
    record: Conversation, turns: list[Turn], position: str, template: Any
) -> list[Turn]:
    """Write the record's ``<video>`` tags into ``turns`` (images already placed) for
    ``position`` (``before`` / ``after`` / ``keep``; see the module doc)."""
    num_videos = len(record.videos)
    tags = sum(t.content.count(VIDEO_TAG) for t in turns)
    if not num_videos:
        return turns
    if getattr(template, "drop_question", False):
        problem = f"template {template.name!r} renders images only; it cannot hold a video"
        raise BadSampleError.of(record, "video", problem, "template")
    if position == "keep":
        if tags != num_videos:
            problem = f"image_position 'keep' needs one {VIDEO_TAG} tag per video; the text holds {tags} for {num_videos}"
            raise BadSampleError.of(record, "video", problem, "image_tag_mismatch")
        return turns
    first = turns[0].content
    later = tags - first.count(VIDEO_TAG)
    placed = num_videos - later  # tags of the first turn, or every video without tags
    if placed <= 0:
        return turns
    question = first.replace(VIDEO_TAG, "").strip()
    videos = template.image_join.join([VIDEO_TAG] * placed)
    if not question:
        content = videos
    elif position == "before":
        content = videos + template.image_join + question
    else:
        content = question + template.image_join + videos
    return [Turn(turns[0].role, content), *turns[1:]]


def expand_videos(
    record: Conversation,
    ids: list[int],
    labels: list[int],
    cuts: list[int],
    video_id: int | None,
    count: int | None,
) -> tuple[list[int], list[int], list[int]]:
    """``ids``/``labels`` with each video token repeated ``count`` times and the truncation
    points ``cuts`` moved with them; raises ``BadSampleError`` when the video tokens do not
    match the record's videos or one would train, or (``video_id`` ``None``: the model takes
    no videos) when the record has videos."""
    if video_id is None or count is None:
        if record.videos:
            problem = "this model takes no videos (video samples need a LLaVA-OneVision model)"
            raise BadSampleError.of(record, "video", problem, "bad_field")
        return ids, labels, cuts
    at = [k for k, t in enumerate(ids) if t == video_id]
    if len(at) != len(record.videos):
        problem = (
            f"the text holds {len(at)} video token(s) for {len(record.videos)} video(s) "
            f"(does a message contain {VIDEO_TAG} literally?)"
        )
        raise BadSampleError.of(record, "conversations", problem, "image_tag_mismatch")
    if any(labels[k] != IGNORE_INDEX for k in at):
        raise BadSampleError.of(
            record, "conversations", "a video token fell inside an answer", "tokenization"
        )
    if not at or count == 1:
        return ids, labels, cuts
    out_ids: list[int] = []
    out_labels: list[int] = []
    for token, label in zip(ids, labels, strict=True):
        repeat = count if token == video_id else 1
        out_ids.extend([token] * repeat)
        out_labels.extend([label] * repeat)
    moved = [c + (count - 1) * sum(a < c for a in at) for c in cuts]
    return out_ids, out_labels, moved
