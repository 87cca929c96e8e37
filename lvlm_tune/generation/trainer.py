"""The MiniGPT-5 trainer: ``LvlmTrainer`` for a :class:`~lvlm_tune.generation.model.VokenModel`.

A ``VokenModel`` is not a ``PreTrainedModel``: it saves what trains (the LVLM's adapter and
the mapping module, :meth:`VokenModel.save_pretrained`) and resumes in place
(:meth:`VokenModel.load_checkpoint`). The three loss parts it reports (text, LDM, caption) are
logged as averages over each logging interval, next to the weighted loss.
"""

from __future__ import annotations

from typing import Any

from lvlm_tune.training.trainer import LvlmTrainer

LOSS_PARTS = ("text_loss", "ldm_loss", "caption_loss")  # logged as averages when reported


class VokenTrainer(LvlmTrainer):
    """``LvlmTrainer`` that saves, resumes and logs a ``VokenModel``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loss_parts: dict[str, tuple[float, int]] = {}

    def save_weights(self, output_dir: str, state_dict: Any = None) -> None:
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        (self.model if model is None else model).load_checkpoint(resume_from_checkpoint)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if not self._all_bad:  # a batch of only bad samples reports nothing
            for name in LOSS_PARTS:
                value = outputs.get(name) if hasattr(outputs, "get") else None
                if value is not None:
                    total, count = self._loss_parts.get(name, (0.0, 0))
                    self._loss_parts[name] = (total + float(value), count + 1)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._loss_parts:
            logs.update({k: round(t / max(c, 1), 6) for k, (t, c) in self._loss_parts.items()})
            self._loss_parts = {}
        super().log(logs, *args, **kwargs)
