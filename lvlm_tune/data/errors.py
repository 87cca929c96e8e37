"""Bad-sample errors and the skip ledger.

Every problem with one sample raises :class:`BadSampleError`, which names the file, the sample
id and the field; it is a user error, so the commands print it as one line. Under
``on_bad_sample: skip`` the dataset records the reason in a :class:`SkipLedger` instead; its
counts live in shared memory so DataLoader worker processes report into the same table, and
they are printed at the end of a run. Nothing is dropped without being counted.
"""

from __future__ import annotations

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


class SkipLedger:
    """Counts skipped samples by reason, shared across DataLoader worker processes."""

    def __init__(self) -> None:
        self.counts = torch.zeros(len(REASONS), dtype=torch.int64).share_memory_()

    def add(self, reason: str) -> None:
        self.counts[REASONS.index(reason)] += 1

    def as_dict(self) -> dict[str, int]:
        return {r: int(c) for r, c in zip(REASONS, self.counts.tolist(), strict=True) if c}

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def summary(self) -> str:
        counts = self.as_dict()
        if not counts:
            return "skipped samples: none"
        parts = ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items()))
        return f"skipped samples: {self.total} ({parts})"
