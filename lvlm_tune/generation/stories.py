"""Story data (MiniGPT-5, VIST-style ordered text + image steps) as the paper's three tasks.

For every step after the first of a story, :func:`story_samples` writes three LLaVA rows whose
answer is the step's text, its image (``<gen_image>`` with ``gen_images`` / ``gen_captions``),
or both; :func:`expand_stories` does it for a JSON file (``lvlm-tune stories``). A malformed
story raises ``BadSampleError`` naming the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.generation.data import GEN_CAPTIONS, GEN_IMAGES
from lvlm_tune.generation.vokens import GEN_IMAGE_TAG
from lvlm_tune.templates.messages import IMAGE_TAG

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
