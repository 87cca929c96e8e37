"""Pads encoded samples into a batch that ``LlavaForConditionalGeneration.forward`` accepts.

Samples arrive already rendered, labelled, expanded and truncated (see
:mod:`lvlm_tune.data.encoder`, run inside the dataset so DataLoader workers share the work).
The collator right-pads ``input_ids`` (pad id), ``labels`` (-100) and builds ``attention_mask``;
``pixel_values`` of all images in the batch are concatenated in order, matching the order of
the image-token runs, which is how HF LLaVA assigns image features (anyres tiles padded, see
:func:`concat_pixels`; the samples' ``image_sizes`` and ``batch_num_images`` are extras). Any further key of the items (an extension's model
inputs, :mod:`lvlm_tune.data.hooks`) is batched the same way: tensors concatenated along their
first dimension, lists joined, in batch order (items without the key add nothing).

Bad samples skipped by the dataset (:class:`~lvlm_tune.data.errors.SkippedSample`) are dropped,
so a batch may hold fewer rows than the batch size. When every sample of a batch was bad the
collator returns a one-row batch with nothing to train (one pad token, label -100) and
``ALL_BAD: True``: the trainer still runs the step (every rank runs the same number of steps,
the same modules, as DeepSpeed needs) with a loss of exactly zero, so nothing is learnt from
it and no other sample is substituted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lvlm_tune.data.errors import SkippedSample
from lvlm_tune.data.labels import IGNORE_INDEX

ALL_BAD = "all_samples_bad"  # batch key: every sample was bad (see the module docstring)
SAMPLE_KEYS = ("id", "input_ids", "labels", "pixel_values")  # every other item key is an extra


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: pad, else unk, else eos, else 0 (padding is masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


class MultimodalCollator:
    """Right-pads a list of dataset items into model inputs.

    Args:
        pad_id: token id written into padding positions (see :func:`pad_token_id`).
        pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 on GPUs).
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        good = [item for item in items if not isinstance(item, SkippedSample)]
        return self.collate(good) if good else self.all_bad_batch()

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Pad the good items (bad ones dropped already) into a batch."""
        length = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.as_tensor(item["input_ids"])
            labels[row, :n] = torch.as_tensor(item["labels"])
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixels = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = concat_pixels(pixels)
        batch.update(batch_extras(items))
        return batch

    def all_bad_batch(self) -> dict[str, Any]:
        """The batch standing for a batch whose samples were all bad: nothing to train."""
        length = self.pad_to_multiple_of or 1
        return {
            "input_ids": torch.full((1, length), self.pad_id, dtype=torch.long),
            "attention_mask": torch.ones((1, length), dtype=torch.long),
            "labels": torch.full((1, length), IGNORE_INDEX, dtype=torch.long),
            ALL_BAD: True,
        }


def concat_pixels(pixels: Sequence[torch.Tensor]) -> torch.Tensor:
    """The samples' ``pixel_values`` in one tensor, in order. Anyres samples (5-D: images x
    tiles x C x H x W) may hold different tile counts; they are zero-padded to the most, as
    the processors pad within a call (the model keeps each image's real tiles, counted from
    its ``image_sizes``)."""
    if pixels[0].dim() == 5:
        tiles = max(p.shape[1] for p in pixels)
        pixels = [
            torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in pixels
        ]
    return torch.cat(pixels, dim=0)


def batch_extras(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The items' further keys batched: tensors concatenated (dim 0), lists joined, in order."""
    keys = dict.fromkeys(key for item in items for key in item if key not in SAMPLE_KEYS)
    out: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in items if key in item]
        if all(isinstance(v, torch.Tensor) for v in values):
            out[key] = torch.cat(values, dim=0)
        elif all(isinstance(v, list) for v in values):
            out[key] = [x for v in values for x in v]
        else:
            raise TypeError(f"batch key {key!r}: expected tensors or lists, got {values[0]!r:.60}")
    return out
