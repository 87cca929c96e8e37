"""The optimizer of a run: parameter groups and, under ZeRO-Offload, DeepSpeed's CPU Adam.

Groups: the projector gets ``projector_lr`` (when set); biases and norm weights (every
parameter with fewer than 2 dimensions) get no weight decay; only trainable parameters are
handed over. With ZeRO-Offload the optimizer states live on the CPU, where only
``DeepSpeedCPUAdam`` runs, so an ``adamw`` optimizer becomes it (other optimizers are refused).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Trainer

from lvlm_tune.models.parts import canonical_name, is_under
from lvlm_tune.training.distributed import offloads_optimizer


def parameter_groups(model: nn.Module, args: Any, projector_modules: tuple[str, ...]) -> list[dict]:
    """Optimizer groups of ``model``'s trainable parameters (see the module docstring)."""
    projector_lr = args.projector_lr
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_projector = projector_lr is not None and is_under(
            canonical_name(name), projector_modules
        )
        groups.setdefault((param.ndim >= 2, is_projector), []).append(param)
    out = []
    # The main (non-projector) groups first: Trainer logs the first group's learning rate.
    for (decay, is_projector), params in sorted(groups.items(), key=lambda kv: kv[0][::-1]):
        group: dict[str, Any] = {
            "params": params,
            "weight_decay": args.weight_decay if decay else 0.0,
        }
        if is_projector:
            group["lr"] = projector_lr
        out.append(group)
    return out


def optimizer_cls_and_kwargs(args: Any, model: nn.Module) -> tuple[Any, dict[str, Any]]:
    """The Trainer's choice, or ``DeepSpeedCPUAdam`` when ZeRO-Offload holds the states."""
    if not offloads_optimizer(args):
        return Trainer.get_optimizer_cls_and_kwargs(args, model)
    if not str(getattr(args.optim, "value", args.optim)).startswith("adamw"):
        raise ValueError(
            f"optim: {args.optim} cannot run on ZeRO-Offload's CPU optimizer states; "
            "use an adamw optimizer (it becomes DeepSpeedCPUAdam) or a config without offload"
        )
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    kwargs = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "adamw_mode": True,
    }
    return DeepSpeedCPUAdam, kwargs
