"""Modality-and-length grouped sampling.

Each group of ``group_size`` consecutive indices (one forward pass across all ranks:
per-device batch x world size) holds only samples with images or only text-only samples, and
samples of similar length, so little compute is spent on padding and every rank in a step runs
the same modality. Lengths are sorted inside windows of ``window`` groups after a random
shuffle, and the order of groups is shuffled, so the run still sees data in random order.
A modality whose count is not a multiple of ``group_size`` has its last group filled up with
repeats of random samples of the same modality (as ``DistributedSampler`` pads), so no sample
is dropped and no group mixes modalities. The order is a pure function of (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def grouped_order(
    modality_lengths: np.ndarray, group_size: int, seed: int, epoch: int, window: int = 32
) -> np.ndarray:
    """A permutation of all indices, grouped by modality (sign of length) and length."""
    if group_size < 1:
        raise ValueError("group_size must be >= 1")
    rng = np.random.default_rng([seed, epoch])
    lengths = np.asarray(modality_lengths)
    groups: list[np.ndarray] = []
    for mask in (lengths > 0, lengths <= 0):
        idx = rng.permutation(np.flatnonzero(mask))
        if not len(idx):
            continue
        missing = -len(idx) % group_size
        idx = np.concatenate([idx, rng.choice(idx, size=missing, replace=True)])
        chunk = group_size * window
        for lo in range(0, len(idx), chunk):
            part = idx[lo : lo + chunk]
            part = part[np.argsort(-np.abs(lengths[part]), kind="stable")]
            groups.extend(np.split(part, len(part) // group_size))
    order = [groups[i] for i in rng.permutation(len(groups))]
    return np.concatenate(order) if order else np.zeros(0, dtype=np.int64)


def grouped_length(modality_lengths: np.ndarray, group_size: int) -> int:
    """Number of indices :func:`grouped_order` yields (padded per modality)."""
    lengths = np.asarray(modality_lengths)
    counts = [int((lengths > 0).sum()), int((lengths <= 0).sum())]
    return sum(-(-n // group_size) * group_size for n in counts)


class ModalityLengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Sampler over :func:`grouped_order`; call ``set_epoch`` to reshuffle each epoch."""

    def __init__(
        self, modality_lengths: np.ndarray, group_size: int, seed: int = 0, window: int = 32
    ) -> None:
        self.lengths = np.asarray(modality_lengths)
        self.group_size = group_size
        self.seed = seed
        self.window = window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return grouped_length(self.lengths, self.group_size)

    def __iter__(self) -> Iterator[int]:
        order = grouped_order(self.lengths, self.group_size, self.seed, self.epoch, self.window)
        return iter(order.tolist())
