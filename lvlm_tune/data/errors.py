"""Bad-sample errors, the skip ledger and the bad-fraction limit.

Every problem with one sample raises :class:`BadSampleError`, which names the file, the sample
id and the field; it is a user error, so the commands print it as one line. Under
``on_bad_sample: skip`` the dataset records the sample's index and reason in a
:class:`SkipLedger` instead (a shared-memory table, so DataLoader worker processes report into
it, and a sample is counted once however often it is read). The counts per reason are printed
at the end of a run and written to its run card; more bad samples than ``max_bad_fraction`` of
the data stop the run with :class:`TooManyBadSamplesError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lvlm_tune.errors import UserError

# Fixed reasons so the ledger can be a small shared tensor.
REASONS: tuple[str, ...] = (
    "missing_image",
    "corrupt_image",
    "bad_roles",
    "empty_message",
    "bad_field",
    "image_tag_mismatch",
    "no_trained_tokens",
    "tokenization",
    "special_text",
    "template",
    "image_outside_folder",
    "image_too_large",
    "missing_video",
    "bad_video",
    "identical_answers",  # a preference pair whose chosen and rejected are the same
    "empty_answer",  # a preference pair with an empty chosen or rejected answer
)


class BadSampleError(UserError):
    """A sample that cannot be trained on, with enough context to find and fix it.

    A :class:`~lvlm_tune.errors.UserError` (so a ``ValueError``): commands print it as one line.
    """

    def __init__(
        self, source: str, sample_id: str | None, field: str, problem: str, reason: str
    ) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; choices: {REASONS}")
        self.source = source
        self.sample_id = sample_id
        self.field = field
        self.problem = problem
        self.reason = reason
        where = f"sample {sample_id!r}" if sample_id is not None else "sample <no id>"
        super().__init__(f"{source}: {where}: field {field}: {problem}")

    @classmethod
    def of(cls, record: Any, field: str, problem: str, reason: str) -> BadSampleError:
        """The error for a record (anything with ``source`` and ``id``)."""
        return cls(record.source, record.id, field, problem, reason)


class SkipLedger:
    """Which samples were found bad, and why: one reason code per sample index.

    The codes live in a shared-memory tensor of ``size`` entries (0: not bad, else the index
    of the reason in :data:`REASONS` plus one), so DataLoader worker processes report into the
    same table as the main process, and a sample found bad again (in a later epoch, or by
    another worker) is counted once, under the reason it was first found with.

    Args:
        size: number of samples (the dataset's length).
    """

    def __init__(self, size: int) -> None:
        if len(REASONS) >= 255:
            raise ValueError("too many reasons for a uint8 ledger")
        self.codes = torch.zeros(max(int(size), 0), dtype=torch.uint8).share_memory_()

    @property
    def size(self) -> int:
        return int(self.codes.numel())

    def add(self, index: int, reason: str) -> bool:
        """Record sample ``index`` as bad; ``True`` when it was not recorded before."""
        code = REASONS.index(reason) + 1
        if self.codes[index]:
            return False
        self.codes[index] = code
        return True

    def reason(self, index: int) -> str | None:
        """The reason sample ``index`` was found bad for, or ``None``."""
        code = int(self.codes[index])
        return REASONS[code - 1] if code else None

    def indices(self) -> list[int]:
        """Indices of the bad samples, ascending."""
        return torch.nonzero(self.codes, as_tuple=True)[0].tolist()

    def as_dict(self) -> dict[str, int]:
        """Bad-sample count per reason (reasons with none left out)."""
        counts = torch.bincount(self.codes.long(), minlength=len(REASONS) + 1)[1:].tolist()
        return {r: c for r, c in zip(REASONS, counts, strict=True) if c}

    @property
    def total(self) -> int:
        return int(torch.count_nonzero(self.codes))

    def fraction(self) -> float:
        """Bad samples as a fraction of all samples."""
        return self.total / self.size if self.size else 0.0

    def summary(self) -> str:
        counts = self.as_dict()
        if not counts:
            return "skipped samples: none"
        parts = ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items()))
        return f"skipped samples: {self.total} of {self.size} ({parts})"

    def state_dict(self) -> dict[str, Any]:
        """A JSON-ready record: the size and ``{index: reason}`` of every bad sample."""
        return {"size": self.size, "bad": {str(i): self.reason(i) for i in self.indices()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Merge a :meth:`state_dict` in (in place, so workers keep sharing the table)."""
        if int(state.get("size", -1)) != self.size:
            raise ValueError(
                f"the saved bad-sample record covers {state.get('size')} samples but the data "
                f"has {self.size}; was the data file changed since the checkpoint?"
            )
        for index, reason in state.get("bad", {}).items():
            self.add(int(index), reason)

    def merge_across_ranks(self, device: Any = None) -> None:
        """Make every rank's table the union of all ranks' (a collective: all ranks call it).

        Each rank (and its workers) only sees the samples its sampler gives it; the merged
        table counts every bad sample once. A no-op outside ``torch.distributed``.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        merged = self.codes.to(device if device is not None else "cpu")
        dist.all_reduce(merged, op=dist.ReduceOp.MAX)
        self.codes.copy_(merged.cpu())


class TooManyBadSamplesError(SystemExit):
    """More samples are bad than ``max_bad_fraction`` allows (a user error: one message,
    no traceback, exit status 1)."""


def check_bad_fraction(
    ledger: SkipLedger, max_bad_fraction: float, source: str, examples: list[str] | None = None
) -> None:
    """Raise :class:`TooManyBadSamplesError` when the ledger holds more than
    ``max_bad_fraction`` of the samples (``examples`` name a few of them)."""
    total = ledger.total
    if total <= max_bad_fraction * ledger.size:
        return
    parts = ", ".join(f"{reason}={n}" for reason, n in sorted(ledger.as_dict().items()))
    seen = f"; e.g. {'; '.join(examples)}" if examples else ""
    raise TooManyBadSamplesError(
        f"{source}: {total} of {ledger.size} samples are bad ({total / ledger.size:.1%}: "
        f"{parts}), more than max_bad_fraction={max_bad_fraction:g} allows{seen}. Fix the data "
        "(lvlm-tune inspect RECIPE --on-bad-sample skip lists them) or raise max_bad_fraction "
        "(1 allows any number)."
    )


@dataclass(frozen=True)
class SkippedSample:
    """What the dataset returns for a bad sample under ``skip``: the collator drops it.

    Not a dict, so ``Trainer``'s column filter passes it through untouched.
    """

    index: int
    reason: str
