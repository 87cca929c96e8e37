"""The optimizer of a run: parameter groups and, under ZeRO-Offload, DeepSpeed's CPU Adam.

Groups: the projector gets ``projector_lr`` and the vision tower ``vision_tower_lr`` (when
set; the tower trains only with ``unfreeze_vision_tower``); biases and norm weights (every
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


def parameter_groups(model: nn.Module, args: Any, family: Any) -> list[dict]:
    """Optimizer groups of ``model``'s trainable parameters (see the module docstring);
    ``family``: the model-family entry (where the projector and vision tower are)."""
    rates = {"projector": args.projector_lr, "vision": getattr(args, "vision_tower_lr", None)}
    parts = {"projector": family.projector_modules, "vision": family.vision_modules}
    groups: dict[tuple[bool, str], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = canonical_name(name)
        part = next(
            (
                p
                for p in ("projector", "vision")
                if rates[p] is not None and is_under(name, parts[p])
            ),
            "",
        )
        groups.setdefault((param.ndim >= 2, part), []).append(param)
    out = []
    # The main groups first: Trainer logs the first group's learning rate.
    for (decay, part), params in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        group: dict[str, Any] = {
            "params": params,
            "weight_decay": args.weight_decay if decay else 0.0,
        }
        if part:
            group["lr"] = rates[part]
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
