"""Packs of encoded samples -> padding-free rows whose samples cannot see each other.

Each pack (a list of dataset items, :mod:`lvlm_tune.data.packing`) becomes one row: its
samples' ``input_ids`` and ``labels`` concatenated, whole (an image run is never split, a
sample never spans two rows). Three things keep every sample exactly as if it ran alone:

* ``position_ids`` restart at 0 at every sample, and the batch carries no ``attention_mask``
  and ``use_cache=False``: transformers then builds a block-diagonal causal mask from the
  restarting positions (``masking_utils.find_packed_sequence_indices``, sdpa and eager), and
  flash-attention runs its variable-length path on them (one row only: ``one_row``). With an
  ``attention_mask``, or with a cache (which LLaMA creates when ``use_cache`` is on), that
  detection is skipped and samples would attend across the boundary;
* the first label of every sample is ``-100``, so the last token of one sample is never
  trained to predict the first token of the next (alone, that label is shifted away anyway);
* images keep their order: ``pixel_values`` (and ``image_sizes``, ``batch_num_images`` and any
  extension's extras) are concatenated sample by sample, row by row, which is the order of the
  image-token runs in the batch, as the model assigns features.

Rows are right-padded to the longest (pad tokens, label -100, positions restarting from 0 so
padding is a sequence of its own). Skipped bad samples are dropped from their pack; a batch of
only bad samples is the collator's usual nothing-to-train batch (``ALL_BAD``). The batch also
says how many samples it holds (``PACKED_SAMPLES``), which the trainer pops before the forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lvlm_tune.data.collator import MultimodalCollator, batch_extras, concat_pixels
from lvlm_tune.data.errors import SkippedSample
from lvlm_tune.data.labels import IGNORE_INDEX

PACKED_SAMPLES = "packed_samples"  # batch key: samples in a packed batch (not a model input)


class PackedCollator:
    """Turns a list of packs into padding-free model inputs.

    Args:
        pad_id: token id of the padding after the shorter rows.
        pad_to_multiple_of: round the row length up to a multiple of this.
        one_row: put every pack of the batch into a single row (flash-attention detects packed
            sequences only in a batch of one row).
    """

    def __init__(
        self, pad_id: int, pad_to_multiple_of: int | None = None, one_row: bool = False
    ) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.one_row = one_row

    def __call__(self, packs: Sequence[Sequence[dict[str, Any] | SkippedSample]]) -> dict[str, Any]:
        if not packs:
            raise ValueError("cannot collate an empty batch")
        rows = [[item for item in pack if not isinstance(item, SkippedSample)] for pack in packs]
        rows = [row for row in rows if row]
        if not rows:
            return MultimodalCollator(self.pad_id, self.pad_to_multiple_of).all_bad_batch()
        if self.one_row:
            rows = [[item for row in rows for item in row]]
        length = max(sum(len(item["input_ids"]) for item in row) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for item in row:
                n = len(item["input_ids"])
                input_ids[r, at : at + n] = torch.as_tensor(item["input_ids"])
                labels[r, at + 1 : at + n] = torch.as_tensor(item["labels"][1:])
                position_ids[r, at : at + n] = torch.arange(n)
                at += n
            position_ids[r, at:] = torch.arange(length - at)  # padding: a sequence of its own
        items = [item for row in rows for item in row]  # the order of the image runs
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "use_cache": False,
            PACKED_SAMPLES: len(items),
        }
        pixels = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = concat_pixels(pixels)
        batch.update(batch_extras(items))
        return batch
