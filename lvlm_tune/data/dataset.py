"""The training dataset: lazy records -> encoded samples with pixels, under a bad-sample policy.

``__getitem__`` reads one record from an Arrow-backed source, encodes it (render, tokenize,
mask, expand, truncate) and loads only the images that survived truncation, so the work runs in
DataLoader workers. ``on_bad_sample="error"`` raises the first problem with file, sample id and
field. ``"skip"`` records the sample's index and reason in the shared :class:`SkipLedger`
(warning the first few times) and returns a :class:`SkippedSample` marker, which the collator
drops: nothing is served in its place, so an epoch holds exactly the good samples, the number
of batches per epoch does not change (resume skips batches by count) and a sample bad in every
epoch is counted once. ``set_epoch`` changes the per-sample random choices (image position,
instruction) reproducibly. An extension's :class:`~lvlm_tune.data.hooks.DataHooks` (a record
transform, extra model inputs per sample) run here, once per sample, when a run passes them.
:class:`PolicyDataset` holds what the supervised and the preference dataset
(:mod:`lvlm_tune.data.preference_dataset`) share: the policy, the ledger, the media inputs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from lvlm_tune.data.encoder import ConversationEncoder, EncodedSample
from lvlm_tune.data.errors import BadSampleError, SkipLedger, SkippedSample, check_bad_fraction
from lvlm_tune.data.hooks import DataHooks
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.lengths import modality_lengths
from lvlm_tune.data.preference_readers import PREFERENCE_FORMATS
from lvlm_tune.data.record import Conversation
from lvlm_tune.data.video import VideoLoader
from lvlm_tune.errors import UserError

logger = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("error", "skip")
DEFAULT_MAX_BAD_FRACTION = 0.01
_WARN_FIRST = 10


def read_record(source: Any, index: int, hooks: DataHooks | None = None) -> Conversation:
    """Sample ``index`` of ``source`` as a run trains it: read, validated, then the hooks'
    record transform (given the raw sample too) when there is one."""
    record = source.get(index)
    if hooks is None or hooks.record_transform is None:
        return record
    return hooks.record_transform(source.raw(int(index)), record)


class PolicyDataset(torch.utils.data.Dataset):
    """A map-style dataset of encoded records under a bad-sample policy: the checks, the
    ledger, ``set_epoch``, the skip semantics and the images' and videos' model inputs that
    :class:`SupervisedDataset` and the preference dataset
    (:class:`~lvlm_tune.data.preference_dataset.PreferenceDataset`) share. A subclass encodes
    (:meth:`encode`); arguments as :class:`SupervisedDataset`'s. A source of the other kind
    (preference pairs for a supervised dataset, conversations for a preference one) is refused
    with a :class:`~lvlm_tune.errors.UserError`."""

    preference = False  # the records are preference pairs (PreferenceRecord)

    def __init__(
        self,
        source: Any,
        encoder: Any,
        images: ImageLoader,
        on_bad_sample: str = "error",
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        hooks: DataHooks | None = None,
        videos: VideoLoader | None = None,
    ) -> None:
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(
                f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}"
            )
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if len(source) == 0:
            raise ValueError(f"{source.path}: the data file holds no samples")
        fmt = getattr(source, "fmt", None)
        if fmt is not None and (fmt in PREFERENCE_FORMATS) != self.preference:
            kinds = ("supervised conversations", "preference pairs (chosen / rejected)")
            raise UserError(
                f"{source.path}: holds {kinds[not self.preference]} (format {fmt}), but this "
                f"stage trains on {kinds[self.preference]}; preference stages: dpo, dpo_lora"
            )
        self.source = source
        self.encoder = encoder
        self.images = images
        self.on_bad_sample = on_bad_sample
        self.hooks = hooks or DataHooks()
        self.videos = videos
        self.max_bad_fraction = float(max_bad_fraction)
        self.ledger = SkipLedger(len(source))
        self.epoch = 0
        self._lengths: np.ndarray | None = None
        self._sizes: dict[int, tuple] = {}  # sample -> image sizes, read with the lengths

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def encode(self, index: int) -> dict[str, Any]:
        """Encode sample ``index`` or raise ``BadSampleError``."""
        raise NotImplementedError

    def image_sizes(self, record: Any, index: int, encoder: ConversationEncoder) -> Any:
        """The record's image sizes when ``encoder``'s image counts depend on them (read from
        the headers, unless the lengths already read them), else ``None``."""
        if encoder.num_image_tokens is not None:
            return None
        return self._sizes.get(int(index)) or self.images.sizes(record)

    def media_inputs(self, record: Any, sample: EncodedSample) -> dict[str, Any]:
        """``pixel_values`` (``None`` without images) and the image processor's extras
        (anyres: ``image_sizes``, ``batch_num_images``) of the images ``sample`` keeps, and
        the videos' inputs when it keeps videos."""
        image_inputs = self.images.model_inputs(record, sample.num_images)
        inputs = {"pixel_values": image_inputs.pop("pixel_values", None), **image_inputs}
        if sample.num_videos:
            if self.videos is None:
                raise ValueError(
                    f"a video sample needs a VideoLoader ({type(self).__name__} videos=)"
                )
            inputs.update(self.videos.model_inputs(record, sample.num_videos))
        return inputs

    def __getitem__(self, index: int | list[int]) -> Any:
        if isinstance(index, (list, tuple)):  # a pack (lvlm_tune.data.packing.PackSampler)
            return [self[i] for i in index]
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


class SupervisedDataset(PolicyDataset):
    """Map-style dataset of encoded conversations.

    Args:
        source: a record source (``lvlm_tune.data.sources.open_source``): ``len``, ``get(i)``,
            ``num_words()``, ``num_images()``.
        encoder: the conversation encoder for the model's tokenizer and template.
        images: the image loader (processor + folder + aspect ratio).
        on_bad_sample: ``"error"`` or ``"skip"``.
        max_bad_fraction: under ``skip``, the largest fraction of samples that may be bad
            (:meth:`check_bad_fraction` raises beyond it; 1 allows any number).
        hooks: an extension's record transform and extra model inputs per sample
            (:class:`~lvlm_tune.data.hooks.DataHooks`; default: none).
        videos: the video loader (OneVision; :mod:`lvlm_tune.data.video`); items then carry
            ``pixel_values_videos`` for the videos a sample keeps. Default: none.
    """

    def encode_sample(self, index: int) -> tuple[Conversation, EncodedSample]:
        """The record and its encoding (image sizes from headers when counts depend on them)."""
        record = read_record(self.source, index, self.hooks)
        sizes = self.image_sizes(record, index, self.encoder)
        return record, self.encoder.encode(record, index, self.epoch, image_sizes=sizes)

    def encode(self, index: int) -> dict[str, Any]:
        """Encode sample ``index`` or raise ``BadSampleError``."""
        record, sample = self.encode_sample(index)
        item = {
            "id": sample.id,
            "input_ids": sample.input_ids,
            "labels": sample.labels,
            **self.media_inputs(record, sample),  # pixel_values, anyres extras, videos
        }
        if self.hooks.sample_extras is not None:
            item.update(self.hooks.sample_extras(record, sample, self.images))
        return item

    def modality_lengths(self) -> np.ndarray:
        """Token length per sample, negative for text-only samples (for the sampler): true
        image tokens (from the image sizes where counts depend on them) plus text tokens
        fitted on a sample of the data (:mod:`lvlm_tune.data.lengths`); computed once."""
        if self._lengths is None:
            self._lengths = modality_lengths(
                self.source, self.encoder, self.images,
                lambda i: read_record(self.source, i, self.hooks),
                lambda i: self.encode_sample(i)[1], self._sizes,
            )  # fmt: skip
        return self._lengths
