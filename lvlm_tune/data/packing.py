"""Packs of samples for padding-free training: first-fit-decreasing over a shuffled buffer.

A pack is a list of sample indices whose token lengths add up to at most ``capacity``
(``packing_max_length``); the packed collator (:mod:`lvlm_tune.data.packed_collator`) turns
each pack into one row. For every epoch the samples are shuffled from ``(seed, epoch)``, cut
into buffers of ``buffer_size`` samples, and each buffer is packed first-fit-decreasing
(longest first, each into the first pack with room), which fills packs to within a few tokens
on LLaVA-like mixes; the packs are then shuffled, so a run still sees its data in random order.

The number of packs must not change between epochs: ``Trainer`` counts steps per epoch from
the first epoch and resumes mid-epoch by skipping that many batches of the same, reproducible
order. Every epoch therefore yields exactly as many packs as epoch 0: an epoch that packs into
fewer splits its fullest-by-count packs; one that would need more takes epoch 0's packs in its
own shuffled order. Both are pure functions of ``(seed, epoch)``, so a resumed run sees the
batches it would have seen.

Lengths are the sampler's (:meth:`SupervisedDataset.modality_lengths`: image tokens exact,
text fitted from word counts); a pack whose samples encode a little longer than estimated
gives a longer row, never a cut sample. A sample longer than ``capacity`` is a pack alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

DEFAULT_BUFFER_SIZE = 2048


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Positions of ``lengths`` in packs of total length <= ``capacity`` (one per pack when a
    length alone exceeds it), longest first, each into the first pack with room."""
    if capacity < 1:
        raise ValueError("capacity must be >= 1")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    room = np.zeros(len(lengths), dtype=np.int64)  # free tokens of each open pack
    packs: list[list[int]] = []
    for position in order.tolist():
        size = int(lengths[position])
        fits = np.flatnonzero(room[: len(packs)] >= size)
        if len(fits):
            target = int(fits[0])
            packs[target].append(position)
            room[target] -= size
        else:
            packs.append([position])
            room[len(packs) - 1] = capacity - size
    return packs


def _split_to(packs: list[list[int]], count: int) -> list[list[int]]:
    """``packs`` split until there are ``count``: the last sample of the pack holding the most
    samples (its shortest) becomes a pack of its own."""
    packs = [list(p) for p in packs]
    while len(packs) < count:
        fullest = max(range(len(packs)), key=lambda i: len(packs[i]))
        if len(packs[fullest]) < 2:
            raise ValueError(f"cannot make {count} packs of {sum(map(len, packs))} samples")
        packs.append([packs[fullest].pop()])
    return packs


def epoch_packs(
    lengths: np.ndarray, capacity: int, seed: int, epoch: int, buffer_size: int
) -> list[list[int]]:
    """The packs of one epoch, before the count is fixed (see the module docstring)."""
    rng = np.random.default_rng([seed, epoch])
    lengths = np.abs(np.asarray(lengths, dtype=np.int64))
    shuffled = rng.permutation(len(lengths))
    packs: list[list[int]] = []
    for lo in range(0, len(shuffled), buffer_size):
        part = shuffled[lo : lo + buffer_size]
        packs += [part[p].tolist() for p in first_fit_decreasing(lengths[part], capacity)]
    return [packs[i] for i in rng.permutation(len(packs))]


def pack_order(
    lengths: np.ndarray,
    capacity: int,
    seed: int,
    epoch: int,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    count: int | None = None,
) -> list[list[int]]:
    """Every sample in exactly one pack, as many packs as epoch 0 has (``count``, when known),
    in shuffled order."""
    if buffer_size < 1:
        raise ValueError("buffer_size must be >= 1")
    if count is None:
        count = len(epoch_packs(lengths, capacity, seed, 0, buffer_size))
    packs = epoch_packs(lengths, capacity, seed, epoch, buffer_size)
    if len(packs) > count:  # rare: keep epoch 0's packs, in this epoch's order
        packs = epoch_packs(lengths, capacity, seed, 0, buffer_size)
        rng = np.random.default_rng([seed, epoch, 1])
        return [packs[i] for i in rng.permutation(count)]
    return _split_to(packs, count)


class PackSampler(torch.utils.data.Sampler[list[int]]):
    """Yields packs (lists of sample indices) of :func:`pack_order`; the DataLoader fetches
    ``dataset[pack]`` (a list of items) and the packed collator makes each a row. Call
    ``set_epoch`` to repack (``Trainer`` does)."""

    def __init__(
        self,
        lengths: np.ndarray,
        capacity: int,
        seed: int = 0,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
    ) -> None:
        self.lengths = np.abs(np.asarray(lengths, dtype=np.int64))
        self.capacity = int(capacity)
        self.seed = int(seed)
        self.buffer_size = int(buffer_size)
        self.epoch = 0
        self._count: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self._count is None:
            self._count = len(
                epoch_packs(self.lengths, self.capacity, self.seed, 0, self.buffer_size)
            )
        return self._count

    def __iter__(self) -> Iterator[list[int]]:
        packs = pack_order(
            self.lengths, self.capacity, self.seed, self.epoch, self.buffer_size, len(self)
        )
        return iter(packs)
