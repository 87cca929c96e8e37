"""The reference model of a full-weight preference run: a frozen copy, ready for DeepSpeed.

With LoRA (``dpo_lora``) there is no second model: TRL's ``_compute_loss`` disables the
adapters (``trl.trainer.utils.use_adapter``), which gives the base model with its original
projector (PEFT's ``modules_to_save`` are disabled with them). With full weights (``dpo``) the
reference is a frozen copy of the model as training starts (:func:`frozen_copy`, taken before
any checkpoint is loaded, so a resumed run has the same reference). Under DeepSpeed it is an
inference engine: ZeRO-3 partitions it like the policy, other stages keep it whole on each
device (stage 0), as TRL's ``prepare_deepspeed`` does; the config's ``"auto"`` bucket sizes,
which ``Trainer`` fills only for the policy when training starts, are filled from the LLM's
hidden size here. :class:`Reference` is what ``_compute_loss`` calls as ``self.ref_model``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lvlm_tune.training.preference_logps import add_token_outputs_head


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (unwrapped, whole) with no parameter training, in eval mode."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


def inference_config(config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """A DeepSpeed config for a frozen model from the training config: no optimizer,
    scheduler or optimizer offload; ZeRO-3 stays, other stages become 0; ``"auto"`` bucket
    sizes filled as ``Trainer`` fills them (from the hidden size)."""
    config = copy.deepcopy(config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0
    hidden = model.config.get_text_config().hidden_size
    filled = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in filled.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return config


class Reference:
    """A frozen reference model, called as ``DPOTrainer._compute_loss`` calls ``ref_model``
    (``reference(**inputs, labels=..., fused_lm_head=True)``).

    Args:
        model: the frozen copy (:func:`frozen_copy`).
        deepspeed_config: the run's DeepSpeed config (``None``: no DeepSpeed).
        device: where it runs without DeepSpeed.
        vision_path: given the batch and the unwrapped model, the batch to run and the
            context to run it in (text-only batches still run the vision path on a blank
            image, so that ZeRO-3 ranks run the same modules).
    """

    def __init__(
        self,
        model: nn.Module,
        deepspeed_config: dict[str, Any] | None,
        device: torch.device,
        vision_path: Callable[[dict[str, Any], nn.Module], tuple[dict[str, Any], Any]],
    ) -> None:
        add_token_outputs_head(model)
        self.base = model
        self.vision_path = vision_path
        if deepspeed_config is not None:
            import deepspeed

            self.module, *_ = deepspeed.initialize(
                model=model, config=inference_config(deepspeed_config, model)
            )
            self.module.eval()
        else:
            self.module = model.to(device)

    def __call__(self, **inputs: Any) -> Any:
        inputs, context = self.vision_path(inputs, self.base)
        with context:
            return self.module(**inputs)
