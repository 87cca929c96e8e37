"""The training dataset: lazy records -> encoded samples with pixels, under a bad-sample policy.

``__getitem__`` reads one record from an Arrow-backed source, encodes it (render, tokenize,
mask, expand, truncate) and loads only the images that survived truncation, so the work runs in
DataLoader workers. ``on_bad_sample="error"`` raises the first problem with file, sample id and
field; ``"skip"`` counts it in the shared :class:`SkipLedger` and serves the next good sample in
its place (keeping batch shapes), warning the first few times. ``set_epoch`` changes the
per-sample random choices (image position, instruction) reproducibly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.errors import BadSampleError, SkipLedger
from lvlm_tune.data.generation import generation_targets
from lvlm_tune.data.images import ImageLoader

logger = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("error", "skip")
_MAX_CONSECUTIVE_SKIPS = 1000
_WARN_FIRST = 10


class SupervisedDataset(torch.utils.data.Dataset):
    """Map-style dataset of encoded conversations.

    Args:
        source: a record source (``lvlm_tune.data.sources.open_source``): ``len``, ``get(i)``,
            ``num_words()``, ``num_images()``.
        encoder: the conversation encoder for the model's tokenizer and template.
        images: the image loader (processor + folder + aspect ratio).
        on_bad_sample: ``"error"`` or ``"skip"``.
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
    ) -> None:
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(
                f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}"
            )
        if len(source) == 0:
            raise ValueError(f"{source.path}: the data file holds no samples")
        self.source = source
        self.encoder = encoder
        self.images = images
        self.on_bad_sample = on_bad_sample
        self.target_images = target_images
        self.ledger = SkipLedger()
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
        refs, captions = generation_targets(record)
        decoded = [
            self.images.open(ref, record, k, field=f"gen_images[{k}]")
            for k, ref in enumerate(refs[:count])
        ]
        return {"gen_pixel_values": self.target_images(decoded), "gen_captions": captions[:count]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(_MAX_CONSECUTIVE_SKIPS):
            j = (index + attempt) % len(self)
            try:
                return self.encode(j)
            except BadSampleError as err:
                if self.on_bad_sample == "error":
                    raise
                self.ledger.add(err.reason)
                if self.ledger.total <= _WARN_FIRST:
                    logger.warning("skipping bad sample (%s): %s", err.reason, err)
        raise RuntimeError(
            f"{self.source.path}: {_MAX_CONSECUTIVE_SKIPS} consecutive bad samples from index "
            f"{index}; {self.ledger.summary()}"
        )

    def modality_lengths(self) -> np.ndarray:
        """Estimated token length per sample, negative for text-only samples (for the sampler)."""
        words = self.source.num_words().astype(np.int64)
        images = self.source.num_images().astype(np.int64)
        length = words * 4 // 3 + images * self.encoder.num_image_tokens + 1
        return np.where(images > 0, length, -length)
