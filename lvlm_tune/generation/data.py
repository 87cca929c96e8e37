"""Image-generation samples (MiniGPT-5): answers that contain images, as data hooks.

An assistant turn asks for a generated image by writing ``<gen_image>``; the sample lists the
target images in ``gen_images`` (paths, in tag order) and, optionally, one caption per image in
``gen_captions`` (``null`` where there is none; a caption feeds the caption loss). Caption pairs
become text-to-image samples under ``caption_task: generate`` (MiniGPT-5 stage 1: the caption
is the prompt, the answer is the image). Every malformed sample raises ``BadSampleError`` naming
the field.

The core's data layer knows none of this: :func:`generation_hooks` gives a run its
:class:`~lvlm_tune.data.hooks.DataHooks`: the record transform (read the targets into
``Conversation.extra``, turn caption pairs into generation samples), the ``<gen_image>`` answer
tag (the N vokens; refused when the model has none) and the sample extras (the target images
whose vokens survived truncation, as the diffusion VAE's input, and their captions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.hooks import AnswerTag, DataHooks
from lvlm_tune.data.record import Conversation, Turn
from lvlm_tune.generation.arguments import CAPTION_TASKS
from lvlm_tune.generation.vokens import GEN_IMAGE_TAG, voken_tokens

GEN_IMAGES = "gen_images"
GEN_CAPTIONS = "gen_captions"
GEN_PIXEL_VALUES = "gen_pixel_values"  # batch key: the targets as VokenModel.forward takes them
NO_VOKENS = (
    f"the sample generates images ({GEN_IMAGE_TAG}) but the model has no vokens (num_vokens: 0)"
)


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


def load_targets(
    images: Any, record: Conversation, count: int
) -> tuple[list[Image.Image], list[str | None]]:
    """The first ``count`` target images of ``record``, decoded by ``images`` (an
    :class:`~lvlm_tune.data.images.ImageLoader`) under its checks, and their captions."""
    refs, captions = generation_targets(record)
    decoded = [
        images.open(ref, record, k, field=f"{GEN_IMAGES}[{k}]")
        for k, ref in enumerate(refs[:count])
    ]
    return decoded, captions[:count]


@dataclass(frozen=True)
class TargetImages:
    """Picklable transform of decoded target images into the VAE's input (DataLoader workers
    get only the size, never the diffusion models)."""

    image_size: int

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        from lvlm_tune.generation.diffusion import image_tensor

        return image_tensor(self, images)  # reads only ``image_size``


@dataclass(frozen=True)
class GenerationRecords:
    """Record transform: read the generation targets; caption pairs become generation samples
    when ``captions_generate``."""

    captions_generate: bool = False

    def __call__(self, raw: Any, record: Conversation) -> Conversation:
        record = attach_generation_targets(raw, record)
        return caption_to_generation(record) if self.captions_generate else record


@dataclass(frozen=True)
class GenerationTargets:
    """Sample extras: ``gen_pixel_values`` (one target per voken run that survived truncation,
    through ``target_images``) and ``gen_captions``. Without ``target_images`` (no diffusion
    model, e.g. ``lvlm-tune inspect``) the targets are only opened and checked."""

    target_images: Callable[[list[Image.Image]], torch.Tensor] | None = None

    def __call__(self, record: Conversation, sample: Any, images: Any) -> dict[str, Any]:
        count = sample.tag_counts.get(GEN_IMAGE_TAG, 0)
        if not count:
            return {}
        decoded, captions = load_targets(images, record, count)
        if self.target_images is None:
            return {}
        return {GEN_PIXEL_VALUES: self.target_images(decoded), GEN_CAPTIONS: captions}


def generation_hooks(
    num_vokens: int,
    caption_task: str = "describe",
    target_images: Callable[[list[Image.Image]], torch.Tensor] | None = None,
) -> DataHooks:
    """The data hooks of a run with ``num_vokens`` vokens per image (0: MiniGPT-5 off, when a
    ``<gen_image>`` answer is refused as a bad sample and nothing else changes).

    Raises:
        ValueError: ``caption_task`` unknown, or ``generate`` without vokens.
    """
    if caption_task not in CAPTION_TASKS:
        raise ValueError(f"caption_task must be one of {', '.join(CAPTION_TASKS)}")
    if caption_task == "generate" and not num_vokens:
        raise ValueError("caption_task 'generate' needs num_vokens > 0 (a MiniGPT-5 model)")
    if not num_vokens:
        return DataHooks(answer_tags=(AnswerTag(GEN_IMAGE_TAG, (), GEN_IMAGES, NO_VOKENS),))
    return DataHooks(
        record_transform=GenerationRecords(caption_task == "generate"),
        answer_tags=(AnswerTag(GEN_IMAGE_TAG, voken_tokens(num_vokens), GEN_IMAGES),),
        sample_extras=GenerationTargets(target_images),
    )
