"""The training dataset: lazy records -> encoded samples with pixels, under a bad-sample policy.

``__getitem__`` reads one record from an Arrow-backed source, encodes it (render, tokenize,
mask, expand, truncate) and loads only the images that survived truncation, so the work runs in
DataLoader workers. ``on_bad_sample="error"`` raises the first problem with file, sample id and
field. ``"skip"`` records the sample's index and reason in the shared :class:`SkipLedger`
(warning the first few times) and returns a :class:`SkippedSample` marker, which the collator
drops: nothing is served in its place, so an epoch holds exactly the good samples, the number
of batches per epoch does not change (resume skips batches by count) and a sample bad in every
epoch is counted once. ``set_epoch`` changes the per-sample random choices (image position,
instruction) reproducibly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.errors import BadSampleError, SkipLedger, SkippedSample, check_bad_fraction
from lvlm_tune.data.images import ImageLoader

logger = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("error", "skip")
DEFAULT_MAX_BAD_FRACTION = 0.01
_WARN_FIRST = 10


class SupervisedDataset(torch.utils.data.Dataset):
    """Map-style dataset of encoded conversations.

    Args:
        source: a record source (``lvlm_tune.data.sources.open_source``): ``len``, ``get(i)``,
            ``num_words()``, ``num_images()``.
        encoder: the conversation encoder for the model's tokenizer and template.
        images: the image loader (processor + folder + aspect ratio).
        on_bad_sample: ``"error"`` or ``"skip"``.
        max_bad_fraction: under ``skip``, the largest fraction of samples that may be bad
            (:meth:`check_bad_fraction` raises beyond it; 1 allows any number).
        target_images: turns decoded target images of image-generating samples (MiniGPT-5)
            into a tensor (the diffusion VAE's input); items then carry ``gen_pixel_values``
            and ``gen_captions``.
    """

    def __init__(
        self,
        source: Any,
        encoder: ConversationEncoder,
        images: ImageLoader,
        on_bad_sample: str = "error",
        target_images: Callable[[list[Image.Image]], torch.Tensor] | None = None,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    ) -> None:
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(
                f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}"
            )
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if len(source) == 0:
            raise ValueError(f"{source.path}: the data file holds no samples")
        self.source = source
        self.encoder = encoder
        self.images = images
        self.on_bad_sample = on_bad_sample
        self.target_images = target_images
        self.max_bad_fraction = float(max_bad_fraction)
        self.ledger = SkipLedger(len(source))
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def encode(self, index: int) -> dict[str, Any]:
        """Encode sample ``index`` or raise ``BadSampleError``."""
        record = self.encoder.prepare_record(self.source.get(index))
        sample = self.encoder.encode(record, index, self.epoch)
        pixel_values = self.images.pixel_values(record, sample.num_images)
        item = {
            "id": sample.id,
            "input_ids": sample.input_ids,
            "labels": sample.labels,
            "pixel_values": pixel_values,
        }
        if sample.num_gen_images:
            item.update(self._generation_targets(record, sample.num_gen_images))
        return item

    def _generation_targets(self, record: Any, count: int) -> dict[str, Any]:
        """The first ``count`` target images (those whose vokens survived truncation)."""
        if self.target_images is None:
            raise ValueError("samples generate images but the dataset has no target_images")
        decoded, captions = self.images.load_targets(record, count)
        return {"gen_pixel_values": self.target_images(decoded), "gen_captions": captions}

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        try:
            return self.encode(index)
        except BadSampleError as err:
            if self.on_bad_sample == "error":
                raise
            if self.ledger.add(index, err.reason) and self.ledger.total <= _WARN_FIRST:
                logger.warning("skipping bad sample (%s): %s", err.reason, err)
            return SkippedSample(index, err.reason)

    def bad_examples(self, limit: int = 3) -> list[str]:
        """A few recorded bad samples, named by id (for messages)."""
        out = []
        for index in self.ledger.indices()[:limit]:
            try:
                name = repr(self.source.get(index).id)
            except BadSampleError as err:  # the record itself does not parse
                name = repr(err.sample_id) if err.sample_id is not None else "<no id>"
            out.append(f"sample {name} (index {index}): {self.ledger.reason(index)}")
        return out

    def check_bad_fraction(self) -> None:
        """Raise ``TooManyBadSamplesError`` when more than ``max_bad_fraction`` of the samples
        are recorded as bad."""
        if self.ledger.total > self.max_bad_fraction * len(self):
            check_bad_fraction(
                self.ledger, self.max_bad_fraction, str(self.source.path), self.bad_examples()
            )

    def modality_lengths(self) -> np.ndarray:
        """Estimated token length per sample, negative for text-only samples (for the sampler)."""
        words = self.source.num_words().astype(np.int64)
        images = self.source.num_images().astype(np.int64)
        length = words * 4 // 3 + images * self.encoder.num_image_tokens + 1
        return np.where(images > 0, length, -length)
