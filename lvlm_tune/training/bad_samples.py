"""Bad-sample bookkeeping of a run under ``on_bad_sample: skip``, across ranks and resumes.

Each rank's dataset records the bad samples it meets in its :class:`SkipLedger`; the trainer
counts the samples each epoch actually trained on. :class:`BadSampleTracker` turns both into
run-wide numbers: the bad-sample count all ranks agree on (for the ``max_bad_fraction`` check
after every step, so all ranks stop together), the merged ledger and per-epoch sample counts
(for the run's summary and run card), and the ``bad_samples.json`` file every checkpoint
carries, so a resumed run counts every bad sample once and reports whole epochs.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from lvlm_tune.data.errors import SkipLedger

logger = logging.getLogger(__name__)
BAD_SAMPLES_FILE = "bad_samples.json"


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class BadSampleTracker:
    """Run-wide bad-sample counts of a skipping dataset, for one rank of a (possibly
    distributed) run. The methods marked collective must be called by every rank.

    Args:
        dataset: a ``SupervisedDataset`` with ``on_bad_sample="skip"``.
        device: where collectives run (the rank's device: NCCL needs CUDA tensors).
    """

    def __init__(self, dataset: Any, device: Any) -> None:
        self.dataset = dataset
        self.ledger: SkipLedger = dataset.ledger
        self.device = device
        self.baseline = 0  # ledger entries all ranks share (after a merge or a restore)
        self.trained: dict[int, int] = {}  # epoch -> samples trained, all ranks, until a merge
        self.local: dict[int, int] = {}  # epoch -> samples this rank trained since then

    def count_trained(self, epoch: int, samples: int) -> None:
        """Record that this rank trained on ``samples`` samples of ``epoch``."""
        self.local[epoch] = self.local.get(epoch, 0) + samples

    def global_bad_count(self) -> int:
        """Bad samples all ranks have met (collective).

        Entries recorded since the last merge are summed over ranks: a sample that
        ``DistributedSampler`` repeats to pad the last batch may be counted twice until the
        next merge (:meth:`merge` is exact).
        """
        if not _distributed():
            return self.ledger.total
        new = torch.tensor([self.ledger.total - self.baseline], dtype=torch.int64)
        new = new.to(self.device)
        torch.distributed.all_reduce(new)
        return self.baseline + int(new.item())

    def check(self) -> None:
        """Stop the run (``TooManyBadSamplesError``) beyond ``max_bad_fraction`` (collective)."""
        if self.global_bad_count() > self.dataset.max_bad_fraction * len(self.dataset):
            self.merge()  # exact counts; every rank takes the same decision
            self.dataset.check_bad_fraction()

    def merge(self) -> None:
        """Union of all ranks' ledgers on every rank, sample counts summed (collective)."""
        self.ledger.merge_across_ranks(self.device)
        self.baseline = self.ledger.total
        counts = dict(self.local)
        if _distributed():
            everyone: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, counts)
            counts = {}
            for rank_counts in everyone:
                for epoch, n in rank_counts.items():
                    counts[epoch] = counts.get(epoch, 0) + n
        for epoch, n in counts.items():
            self.trained[epoch] = self.trained.get(epoch, 0) + n
        self.local = {}

    def report(self) -> dict[str, Any]:
        """The run card's ``bad_samples`` entry (after :meth:`merge`)."""
        return {
            "skipped": self.ledger.total,
            "of": self.ledger.size,
            "by_reason": self.ledger.as_dict(),
            "max_bad_fraction": self.dataset.max_bad_fraction,
            "samples_trained_per_epoch": {str(e + 1): n for e, n in sorted(self.trained.items())},
        }

    def summary(self) -> str:
        """One line for the end of the run (after :meth:`merge`)."""
        epochs = ", ".join(f"epoch {e + 1}: {n}" for e, n in sorted(self.trained.items()))
        return f"{self.ledger.summary()}; samples trained: {epochs or 'none'}"

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``bad_samples.json`` into a checkpoint ``folder`` (after :meth:`merge`)."""
        state = {
            **self.ledger.state_dict(),
            "samples_trained_per_epoch": {str(e): n for e, n in self.trained.items()},
        }
        with open(os.path.join(folder, BAD_SAMPLES_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f)

    def load(self, folder: str | os.PathLike) -> None:
        """Continue the record of the checkpoint ``folder`` (every rank reads it).

        A checkpoint without the file, or of other data, leaves the record as it is, with a
        warning.
        """
        path = os.path.join(folder, BAD_SAMPLES_FILE)
        if not os.path.isfile(path):
            logger.warning(
                "%s has no %s; bad samples are counted from here on", folder, BAD_SAMPLES_FILE
            )
            return
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        try:
            self.ledger.load_state_dict(state)
        except ValueError as err:
            logger.warning("%s: %s; bad samples are counted from here on", path, err)
            return
        self.baseline = self.ledger.total
        saved = state.get("samples_trained_per_epoch", {})
        self.trained = {int(e): int(n) for e, n in saved.items()}
