"""``precompute_ref_log_probs``: every pair's reference log-probabilities, once, before step 1.

TRL's ``DPOTrainer`` adds them as columns of its ``datasets.Dataset``; our datasets are torch
datasets that encode on the fly, so each item carries its index instead
(:class:`IndexedPairs`, batched by :class:`IndexedCollator` as ``pair_index``) and the trainer
looks the values up by it. :func:`precompute_reference` computes them with TRL's
``compute_ref_log_probs`` (the adapter-disabled policy, or the frozen copy) after the model is
on its devices: each rank takes every ``world``-th pair (padded to the same number of batches,
so ZeRO-3 ranks run the same forwards) and the ranks exchange their results. Pairs are encoded
as in the first epoch; bad pairs (``on_bad_sample: skip``) get none and are never trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lvlm_tune.data.errors import SkippedSample

PAIR_INDEX = "pair_index"  # batch key: the dataset index of each pair


class IndexedPairs(torch.utils.data.Dataset):
    """A preference dataset whose items also carry their index (``pair_index``); every other
    attribute is the wrapped dataset's (ledger, ``on_bad_sample``, ``modality_lengths``...)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        return item if isinstance(item, SkippedSample) else {**item, PAIR_INDEX: index}

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class IndexedCollator:
    """Batches :class:`IndexedPairs` items with ``collator``, adding their ``pair_index``."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        index = [item[PAIR_INDEX] for item in items if not isinstance(item, SkippedSample)]
        plain = [
            item
            if isinstance(item, SkippedSample)
            else {k: v for k, v in item.items() if k != PAIR_INDEX}
            for item in items
        ]
        batch = self.collator(plain)
        if index:
            batch[PAIR_INDEX] = torch.tensor(index, dtype=torch.long)
        return batch


def _shard(size: int, rank: int, world: int, batch: int) -> list[list[int]]:
    """This rank's batches of indices: every ``world``-th, padded (repeating its last) to the
    number of batches of the largest shard."""
    mine = list(range(rank, size, world))
    most = -(-size // world)
    count = -(-most // batch)
    if not mine:
        mine = [0]
    mine += [mine[-1]] * (count * batch - len(mine))
    return [mine[i : i + batch] for i in range(0, count * batch, batch)]


def precompute_reference(trainer: Any) -> dict[int, tuple[float, float]]:
    """index -> (chosen, rejected) reference log-probability of every good pair (collective).

    Args:
        trainer: the ``PreferenceTrainer`` (its ``train_dataset`` an :class:`IndexedPairs`,
            its ``data_collator`` an :class:`IndexedCollator`).
    """
    dataset = trainer.train_dataset
    dataset = getattr(dataset, "dataset", dataset)
    collator = getattr(trainer.data_collator, "collator", trainer.data_collator)
    args = trainer.args
    model = trainer.model
    was_training = model.training
    model.eval()  # as a reference: no dropout
    found: dict[int, tuple[float, float]] = {}
    try:
        for chunk in _shard(len(dataset), args.process_index, args.world_size,
                            args.per_device_eval_batch_size):  # fmt: skip
            items = [dataset[i] for i in chunk]
            good = [i for i, item in zip(chunk, items, strict=True)
                    if not isinstance(item, SkippedSample)]  # fmt: skip
            trainer._all_bad = not good
            batch = trainer._prepare_inputs(collator(items))
            chosen, rejected = trainer.reference_log_probs(batch)
            for i, c, r in zip(good, chosen.tolist(), rejected.tolist(), strict=False):
                found[i] = (c, r)
    finally:
        trainer._all_bad = False
        model.train(was_training)
    if args.world_size > 1:
        everyone: list[Any] = [None] * args.world_size
        torch.distributed.all_gather_object(everyone, found)
        found = {i: v for part in everyone for i, v in part.items()}
    return found
