"""Preference pairs as training items and batches: :class:`PreferenceDataset`, :class:`PreferenceCollator`.

The dataset reads one :class:`~lvlm_tune.data.preference.PreferenceRecord` per item, encodes
both sides (:class:`~lvlm_tune.data.preference_encoder.PreferenceEncoder`) and loads the
prompt's images once; the bad-sample policy, the skip ledger, ``set_epoch`` and the media
inputs are :class:`~lvlm_tune.data.dataset.PolicyDataset`'s, exactly as for supervised data
(a bad pair is skipped whole and counted once). An item is ``{"id", "chosen_input_ids",
"chosen_labels", "rejected_input_ids", "rejected_labels", "pixel_values", **image extras}``.

The collator turns B pairs into one batch of 2B rows for
:class:`~lvlm_tune.data.collator.MultimodalCollator` to pad: rows ``0..B-1`` the chosen sides,
``B..2B-1`` the rejected sides (TRL's order), labels -100 outside the trained answers; every
per-image input (``pixel_values``, ``image_sizes``, ``batch_num_images``, video inputs) for the
chosen rows, then the same again for the rejected rows, so image features line up with the
image-token runs of every row. A batch whose pairs were all bad is the supervised collator's
empty batch doubled to two rows (``ALL_BAD``: nothing trains).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lvlm_tune.data.collator import MultimodalCollator
from lvlm_tune.data.dataset import DEFAULT_MAX_BAD_FRACTION, PolicyDataset
from lvlm_tune.data.encoder import EncodedSample
from lvlm_tune.data.lengths import modality_lengths
from lvlm_tune.data.preference import SIDES, PreferenceRecord
from lvlm_tune.data.preference_encoder import EncodedPair, PreferenceEncoder

PAIR_KEYS = tuple(f"{side}_{key}" for side in SIDES for key in ("input_ids", "labels"))


class PreferenceDataset(PolicyDataset):
    """Map-style dataset of encoded preference pairs.

    Args:
        source: a record source of a preference format (``open_source`` on a
            ``llava_preference`` / ``trl_preference`` file); ``get(i)`` gives
            :class:`PreferenceRecord`.
        pair_encoder: the :class:`PreferenceEncoder` over the run's conversation encoder.
        images: the image loader (processor + folder + aspect ratio).
        on_bad_sample: ``"error"`` or ``"skip"``.
        max_bad_fraction: under ``skip``, the largest fraction of pairs that may be bad.
        videos: the video loader (OneVision), as for :class:`SupervisedDataset`.
    """

    preference = True

    def __init__(
        self,
        source: Any,
        pair_encoder: PreferenceEncoder,
        images: Any,
        on_bad_sample: str = "error",
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        videos: Any = None,
    ) -> None:
        super().__init__(
            source, pair_encoder, images, on_bad_sample, max_bad_fraction, videos=videos
        )

    def encode_pair(self, index: int) -> tuple[PreferenceRecord, EncodedPair]:
        """The record and both encoded sides (image sizes from headers when counts depend on
        them)."""
        record = self.source.get(index)
        sizes = self.image_sizes(record, index, self.encoder.encoder)
        return record, self.encoder.encode(record, index, self.epoch, image_sizes=sizes)

    def encode(self, index: int) -> dict[str, Any]:
        """Encode pair ``index`` or raise ``BadSampleError``; the images are loaded once."""
        record, pair = self.encode_pair(index)
        item: dict[str, Any] = {"id": pair.id}
        for side in SIDES:
            sample: EncodedSample = getattr(pair, side)
            item[f"{side}_input_ids"], item[f"{side}_labels"] = sample.input_ids, sample.labels
        item.update(self.media_inputs(record.prompt, pair.chosen))  # both sides keep the same
        return item

    def modality_lengths(self) -> np.ndarray:
        """Token length per pair (its longer side), negative for text-only pairs (for the
        sampler), as :meth:`SupervisedDataset.modality_lengths` computes it."""
        if self._lengths is None:
            self._lengths = modality_lengths(
                self.source, self.encoder.encoder, self.images, self.source.get,
                lambda i: self.encode_pair(i)[1].longer, self._sizes,
            )  # fmt: skip
        return self._lengths


class PreferenceCollator(MultimodalCollator):
    """Pads B preference pairs into 2B rows: the chosen sides, then the rejected sides.

    Args:
        pad_id: token id written into padding positions (``collator.pad_token_id``).
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The good pairs' chosen sides, then their rejected sides, as supervised rows."""
        return super().collate([_side(item, side) for side in SIDES for item in items])

    def all_bad_batch(self) -> dict[str, Any]:
        """The supervised all-bad batch doubled: a chosen and a rejected row, nothing trains."""
        batch = super().all_bad_batch()
        return {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}  # fmt: skip


def _side(item: dict[str, Any], side: str) -> dict[str, Any]:
    """One side of a pair item as a supervised item (the pair's images shared by both)."""
    shared = {key: value for key, value in item.items() if key not in PAIR_KEYS}
    return {**shared, "input_ids": item[f"{side}_input_ids"], "labels": item[f"{side}_labels"]}
