"""The preference-tuning (DPO) recipe keys: TRL's names and meanings, with their checks.

:class:`PreferenceArguments` is a base of the recipe's ``LvlmTrainingArguments`` (as TRL's
``DPOConfig`` extends ``TrainingArguments``), so its fields are flat recipe keys. They act in
the stages ``dpo`` and ``dpo_lora`` only; the recipe parser refuses them for other stages
(:func:`check_preference_keys`). The loss itself is TRL's (``DPOTrainer._compute_loss``, see
:mod:`lvlm_tune.training.preference_trainer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from lvlm_tune.errors import UserError

DPO_STAGES = ("dpo", "dpo_lora")
# TRL's loss types that need no options beyond these keys (``discopop`` needs its tau, and
# ``sft`` alone is no preference loss: it is the ``rpo_alpha`` term).
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "sigmoid_norm",
)  # fmt: skip


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class PreferenceArguments:
    """DPO's keys (stages ``dpo``, ``dpo_lora``), as TRL's ``DPOConfig`` names them."""

    beta: float = _help(
        "dpo: how far the policy may move from the reference model (higher: less); for ipo "
        "the regularisation tau. RLAIF-V, RLHF-V and TRL use 0.1",
        default=0.1,
    )
    loss_type: str = _help(
        f"dpo: TRL's preference loss: {' | '.join(LOSS_TYPES)} (sigmoid: the DPO paper's; "
        "ipo: squared, length-normalised; hinge: SLiC; robust: rDPO with label_smoothing)",
        default="sigmoid",
    )
    label_smoothing: float = _help(
        "dpo: robust: the probability a pair's preference is flipped, in [0, 0.5); exo_pair: "
        "its epsilon (> 0); aot/aot_unpaired: conservative smoothing",
        default=0.0,
    )
    rpo_alpha: float | None = _help(
        "dpo: weight of an added SFT term (TRL's 'sft' loss: the mean NLL of the chosen "
        "answers' tokens; RPO); unset: none",
        default=None,
    )
    precompute_ref_log_probs: bool = _help(
        "dpo: compute the reference model's log-probabilities of every pair once, before the "
        "first step (with the first epoch's encoding), instead of in every step; a full-weight "
        "run then frees its reference copy",
        default=False,
    )

    def _check_preference_values(self) -> None:
        """Refuse values TRL's losses cannot take, naming the key."""
        if self.loss_type not in LOSS_TYPES:
            raise UserError(
                f"loss_type: unknown {self.loss_type!r}; choose one of: {', '.join(LOSS_TYPES)}"
            )
        if not self.beta > 0:
            raise UserError(f"beta: must be > 0, got {self.beta}")
        if self.loss_type == "robust" and not 0 <= self.label_smoothing < 0.5:
            raise UserError(
                f"label_smoothing: robust needs a flip probability in [0, 0.5), got "
                f"{self.label_smoothing}"
            )
        if self.loss_type == "exo_pair" and not 0 < self.label_smoothing < 1:
            raise UserError(
                f"label_smoothing: exo_pair needs an epsilon in (0, 1) (e.g. 1e-3), got "
                f"{self.label_smoothing}"
            )
        if not 0 <= self.label_smoothing <= 0.5:
            raise UserError(f"label_smoothing: must be in [0, 0.5], got {self.label_smoothing}")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise UserError(f"rpo_alpha: must be >= 0, got {self.rpo_alpha}")


def preference_keys() -> tuple[str, ...]:
    """The recipe keys :class:`PreferenceArguments` adds."""
    return tuple(f.name for f in fields(PreferenceArguments))


def preference_options(train_args: Any) -> dict[str, Any]:
    """key -> value of the DPO keys of parsed training arguments (what a run card records)."""
    return {key: getattr(train_args, key) for key in preference_keys()}


def check_preference_keys(given: dict[str, str], stage: str) -> None:
    """Refuse DPO keys a recipe set for a stage that is not a DPO stage (they would do nothing).

    Args:
        given: the keys the recipe and command line set, each mapped to where it was set.
        stage: the run's stage.
    """
    if stage in DPO_STAGES:
        return
    unused = [key for key in preference_keys() if key in given]
    if unused:
        raise UserError(
            f"{given[unused[0]]}: {', '.join(unused)} only act in the preference stages "
            f"({', '.join(DPO_STAGES)}), but stage is {stage!r}; remove "
            f"{'it' if len(unused) == 1 else 'them'} or set stage: dpo"
        )
