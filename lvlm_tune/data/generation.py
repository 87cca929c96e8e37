"""Image-generation samples (MiniGPT-5): answers that contain images.

An assistant turn asks for a generated image by writing ``<gen_image>``; the sample lists the
target images in ``gen_images`` (paths, in tag order) and, optionally, one caption per image in
``gen_captions`` (``null`` where there is none; a caption feeds the caption loss). The reader
keeps them in ``Conversation.extra``. Caption pairs become text-to-image samples with
:func:`caption_to_generation` (MiniGPT-5 stage 1: the caption is the prompt, the answer is the
image). Story data (VIST-style ordered text + image steps) becomes the paper's three tasks with
:func:`story_samples`. Every malformed sample raises ``BadSampleError`` naming the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.record import IMAGE_TAG, Conversation, Turn
from lvlm_tune.generation.vokens import GEN_IMAGE_TAG

GEN_IMAGES = "gen_images"
GEN_CAPTIONS = "gen_captions"


def _error(record: Conversation, field: str, problem: str, reason: str) -> BadSampleError:
    return BadSampleError(record.source, record.id, field, problem, reason)


def attach_generation_targets(raw: dict, record: Conversation) -> Conversation:
    """Read ``gen_images`` / ``gen_captions`` of a raw sample into ``record.extra``; check that
    ``<gen_image>`` tags appear only in assistant turns, once per listed image."""
    tags = [t.content.count(GEN_IMAGE_TAG) for t in record.turns]
    images, captions = raw.get(GEN_IMAGES), raw.get(GEN_CAPTIONS)
    if not any(tags) and images is None:
        return record
    if any(n for t, n in zip(record.turns, tags, strict=True) if t.role != "assistant"):
        raise _error(
            record, "conversations", f"{GEN_IMAGE_TAG} in a user turn; only answers generate "
            "images", "image_tag_mismatch",
        )  # fmt: skip
    images = images if isinstance(images, list) else [] if images is None else [images]
    if not all(isinstance(i, str) and i.strip() for i in images):
        raise _error(record, GEN_IMAGES, "expected a list of image paths", "bad_field")
    if sum(tags) != len(images):
        raise _error(
            record, GEN_IMAGES, f"{sum(tags)} {GEN_IMAGE_TAG} tag(s) in the answers but "
            f"{len(images)} image(s)", "image_tag_mismatch",
        )  # fmt: skip
    if captions is None:
        captions = [None] * len(images)
    if not isinstance(captions, list) or len(captions) != len(images):
        raise _error(
            record, GEN_CAPTIONS, "expected one caption (or null) per gen_image", "bad_field"
        )
    if not all(c is None or isinstance(c, str) for c in captions):
        raise _error(record, GEN_CAPTIONS, "captions must be strings or null", "bad_field")
    record.extra[GEN_IMAGES] = images
    record.extra[GEN_CAPTIONS] = captions
    return record


def generation_targets(record: Conversation) -> tuple[list[Any], list[str | None]]:
    """The record's target images and their captions (empty when it generates none)."""
    return list(record.extra.get(GEN_IMAGES, [])), list(record.extra.get(GEN_CAPTIONS, []))


def caption_to_generation(record: Conversation) -> Conversation:
    """A caption pair as a text-to-image sample: the caption asks, the answer is its image."""
    caption = record.extra.get("caption")
    if caption is None:
        return record
    if len(record.images) != 1:
        raise _error(record, "image", "a caption pair generates exactly one image", "bad_field")
    return Conversation(
        id=record.id,
        turns=[Turn("user", caption), Turn("assistant", GEN_IMAGE_TAG)],
        source=record.source,
        index=record.index,
        extra={GEN_IMAGES: list(record.images), GEN_CAPTIONS: [caption]},
    )


STORY_TASKS = ("text", "image", "text_image")


def story_samples(story: Any, story_id: str, source: str = "<memory>") -> list[dict]:
    """The three MiniGPT-5 tasks for every step after the first of one story, as LLaVA rows.

    ``story`` is the ordered steps ``{"text": ..., "image": ...}``. For step k the context is
    steps 0..k-1 (each step's image as an input image, then its text); the answer is step k's
    text (``text``), its image (``image``, captioned by its text) or both (``text_image``).
    """
    if not isinstance(story, list) or len(story) < 2:
        raise BadSampleError(
            source, story_id, "story", "expected a list of >= 2 steps", "bad_field"
        )
    for k, step in enumerate(story):
        for key, kind in (("text", "a string"), ("image", "an image path")):
            if not isinstance(step, dict) or not isinstance(step.get(key), str):
                raise BadSampleError(
                    source, story_id, f"story[{k}].{key}", f"expected {kind}", "bad_field"
                )
    rows = []
    for k in range(1, len(story)):
        context = "\n".join(f"{IMAGE_TAG}\n{s['text']}" for s in story[:k])
        target = story[k]
        answers = {
            "text": (target["text"], []),
            "image": (GEN_IMAGE_TAG, [target["image"]]),
            "text_image": (f"{target['text']}\n{GEN_IMAGE_TAG}", [target["image"]]),
        }
        for task, (answer, gen) in answers.items():
            rows.append({
                "id": f"{story_id}-{k}-{task}",
                "images": [s["image"] for s in story[:k]],
                "conversations": [
                    {"from": "human", "value": context}, {"from": "gpt", "value": answer},
                ],
                GEN_IMAGES: gen,
                GEN_CAPTIONS: [target["text"]] * len(gen),
            })  # fmt: skip
    return rows


def expand_stories(path: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write the story tasks of a JSON list of ``{"id", "story": [...]}`` as a LLaVA JSON file
    that training reads (image paths unchanged); returns the number of samples written."""
    stories = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(stories, list):
        raise ValueError(f"{path}: expected a JSON list of stories")
    rows = []
    for index, item in enumerate(stories):
        story_id = str(item.get("id", index)) if isinstance(item, dict) else str(index)
        steps = item.get("story") if isinstance(item, dict) else None
        rows += story_samples(steps, story_id, os.fspath(path))
    Path(out).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return len(rows)
