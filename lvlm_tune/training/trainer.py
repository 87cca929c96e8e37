"""``LvlmTrainer``: a thin ``transformers.Trainer`` for multimodal instruction tuning.

What it adds, and nothing else:

* optimizer groups: the projector gets ``projector_lr``; biases and norm weights (every
  parameter with fewer than 2 dimensions) get no weight decay;
* the modality-and-length grouped sampler (``group_by_modality_length``): each forward pass
  across all ranks holds only image or only text-only samples of similar length;
* text-only batches still run the vision path on a blank image (times zero), so every rank
  runs the same modules in every step and multi-rank runs cannot hang;
* every save (intermediate checkpoints too) also writes the run card (family, stage, template,
  recipe, parts), the processor, and for stage 1 a projector-only file.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from lvlm_tune.data.sampler import ModalityLengthGroupedSampler
from lvlm_tune.models.parts import canonical_name, is_under, save_projector, unwrap_model
from lvlm_tune.models.registry import ModelFamily
from lvlm_tune.training.run_card import write_run_card

logger = logging.getLogger(__name__)


class LvlmTrainer(Trainer):
    """``Trainer`` with projector learning rate, grouped sampling and self-describing saves.

    Args:
        family: the model family entry (where the projector and vision path are).
        run_card: what to record with every save (see ``write_run_card``).
        blank_pixel_values: a blank image batch (1, C, H, W) for text-only batches.
        **kwargs: passed to ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        family: ModelFamily,
        run_card: dict[str, Any],
        blank_pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.family = family
        self.run_card = run_card
        self.blank_pixel_values = blank_pixel_values

    # ---- optimizer ---------------------------------------------------------------------

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        projector_lr = self.args.projector_lr
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            is_projector = projector_lr is not None and is_under(
                canonical_name(name), self.family.projector_modules
            )
            groups.setdefault((param.ndim >= 2, is_projector), []).append(param)
        param_groups = []
        # The main (non-projector) groups first: Trainer logs the first group's learning rate.
        for (decay, is_projector), params in sorted(groups.items(), key=lambda kv: kv[0][::-1]):
            group: dict[str, Any] = {
                "params": params,
                "weight_decay": self.args.weight_decay if decay else 0.0,
            }
            if is_projector:
                group["lr"] = projector_lr
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # ---- data --------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        group = self.args.per_device_train_batch_size * self.args.world_size
        return ModalityLengthGroupedSampler(
            dataset.modality_lengths(), group_size=group, seed=self.args.seed
        )

    # ---- loss --------------------------------------------------------------------------

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if "pixel_values" in inputs or self.blank_pixel_values is None:
            return result
        loss = result[0] if return_outputs else result
        blank = self.blank_pixel_values.to(device=loss.device)
        dtype = next(unwrap_model(model).parameters()).dtype
        features = self.family.image_features(
            unwrap_model(self.accelerator.unwrap_model(model)), blank.to(dtype)
        )
        loss = loss + 0.0 * features.sum()
        return (loss, result[1]) if return_outputs else loss

    # ---- saving ------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir or self.args.output_dir
        # Trainer pickles its arguments; keep a JSON copy instead (nothing to unpickle later).
        pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
        if os.path.exists(pickled):
            os.remove(pickled)
            with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as f:
                f.write(self.args.to_json_string())
        write_run_card(output_dir, self.run_card)
        if self.run_card.get("stage") == "pretrain":
            save_projector(self.model, output_dir, self.family)
