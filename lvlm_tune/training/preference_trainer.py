"""``PreferenceTrainer``: DPO (and TRL's other preference losses) on lvlm-tune's exact masks.

What is TRL's, reused as it is: ``DPOTrainer._compute_loss`` (the per-sequence sums of the
policy's and the reference's log-probabilities, every loss variant, the ``sft`` term that
``rpo_alpha`` weights, the adapter-disabled reference of a LoRA run, and the metrics:
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/*``, ``logits/*``, entropy, token accuracy) and ``DPOTrainer.compute_ref_log_probs``
(for ``precompute_ref_log_probs``). They are called on this trainer, which carries the
attributes they read; neither calls ``super()``, so no ``DPOTrainer`` is built (its
``__init__`` would tokenize the data itself, with its own masks).

What is ours: the batch (``labels`` from our encoder give TRL's ``completion_mask``:
``labels != -100``, exactly the final answer + STOP of each side), the forward that returns
TRL's fused-head outputs for every family (:mod:`lvlm_tune.training.preference_logps`), the
frozen full-weight reference under DeepSpeed (:mod:`lvlm_tune.training.preference_reference`),
the vision path on a blank image in every forward of a text-only batch (policy and reference:
ZeRO-3 ranks run the same modules), ``ALL_BAD`` batches (zero loss, their metrics dropped),
bad-sample counting per pair, and the log of TRL's metrics (``DPOTrainer.log`` calls
``super()``, which needs a ``DPOTrainer``).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any

import torch
from transformers import TrainerCallback
from trl import DPOTrainer

from lvlm_tune.data.collator import ALL_BAD
from lvlm_tune.data.labels import IGNORE_INDEX
from lvlm_tune.models.parts import unwrap_model
from lvlm_tune.training.distributed import deepspeed_config_dict
from lvlm_tune.training.preference_logps import add_token_outputs_head
from lvlm_tune.training.preference_precompute import PAIR_INDEX, precompute_reference
from lvlm_tune.training.preference_reference import Reference, frozen_copy
from lvlm_tune.training.trainer import LvlmTrainer
from lvlm_tune.training.vision_path import blank_features, vision_path_after_embeddings


class _PrecomputeAtStart(TrainerCallback):
    """Computes the reference log-probabilities once the model is on its devices (under
    DeepSpeed: once the engine exists), before the first step."""

    def __init__(self, trainer: PreferenceTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.precompute_reference()


class PreferenceTrainer(LvlmTrainer):
    """``LvlmTrainer`` for the ``dpo`` and ``dpo_lora`` stages (see the module docstring).

    The recipe's DPO keys are read from ``args`` (:class:`~lvlm_tune.training.
    preference_arguments.PreferenceArguments`). Batches are preference batches: chosen rows,
    then rejected rows.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the items' keys are no forward arguments (chosen_input_ids...): Trainer must keep them
        kwargs["args"].remove_unused_columns = False
        super().__init__(*args, **kwargs)
        a = self.args
        base = unwrap_model(self.model)
        lora = self.model is not base  # PEFT: the reference is the adapter-disabled model
        self.ref_model = None
        if not lora:
            self.ref_model = Reference(
                frozen_copy(base),  # before the policy's forward is patched
                deepspeed_config_dict(a) if self.is_deepspeed_enabled else None,
                a.device,
                self._vision_path,
            )
        add_token_outputs_head(base)
        # the attributes DPOTrainer._compute_loss and compute_ref_log_probs read
        self.beta, self.label_smoothing = a.beta, a.label_smoothing
        self.loss_types = [a.loss_type] + (["sft"] if a.rpo_alpha else [])
        self.loss_weights = [1.0] + ([a.rpo_alpha] if a.rpo_alpha else [])
        self.f_divergence_type, self.f_alpha_divergence_coef = "reverse_kl", 0.5
        self.ld_alpha, self.use_weighting, self.aux_loss_enabled = None, False, False
        self.precompute_ref_logps = bool(a.precompute_ref_log_probs)
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._total_train_tokens, self._tp_size = 0, 1
        self.reference_logps: dict[int, tuple[float, float]] | None = None
        if self.precompute_ref_logps:
            self.add_callback(_PrecomputeAtStart(self))
        if a.gradient_checkpointing_kwargs is None:
            # TRL's code switches checkpointing off around the reference forward and back on
            # with these kwargs: keep the non-reentrant checkpointing the run was built with
            a.gradient_checkpointing_kwargs = {"use_reentrant": False}

    # ---- the vision path of text-only batches --------------------------------------------

    def _vision_path(self, inputs: dict[str, Any], base: Any) -> tuple[dict[str, Any], Any]:
        """The batch to run on ``base`` (unwrapped), and the context to run it in: a text-only
        batch gets a blank image (families whose forward needs pixels) or the blank image's
        features after every token embedding (the others); else nothing changes."""
        if "pixel_values" in inputs or self.blank_pixel_values is None:
            return inputs, contextlib.nullcontext()
        if self.family.forward_needs_pixels:
            like = next(base.parameters())
            blank = self.blank_pixel_values.to(device=like.device, dtype=like.dtype)
            return {**inputs, "pixel_values": blank}, contextlib.nullcontext()
        pixels, sizes = self.blank_pixel_values, self.blank_image_sizes
        features = lambda like: blank_features(self.family, base, pixels, like, sizes)  # noqa: E731
        return inputs, vision_path_after_embeddings(base, features, every_forward=True)

    def _loss_and_outputs(self, model: Any, inputs: dict[str, Any], **kwargs: Any) -> Any:
        inputs, context = self._vision_path(
            inputs, unwrap_model(self.accelerator.unwrap_model(model))
        )
        with context:
            return self._model_loss(model, inputs, **kwargs)

    # ---- the loss ------------------------------------------------------------------------

    def preference_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Our batch as TRL's code reads it: ``completion_mask`` = the trained labels (which
        equal ``input_ids`` there), the precomputed reference log-probs when there are any."""
        inputs = dict(inputs)
        inputs.pop(ALL_BAD, None)
        ids = inputs["input_ids"]
        labels = inputs.pop("labels", None)
        if labels is None:  # ALL_BAD: nothing trained
            labels = torch.full_like(ids, IGNORE_INDEX)
        trained = labels != IGNORE_INDEX
        if not torch.equal(labels[trained], ids[trained]):
            raise ValueError("preference batch: labels differ from input_ids at trained positions")
        inputs["completion_mask"] = trained.long()
        index = inputs.pop(PAIR_INDEX, None)
        if self.precompute_ref_logps:
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = self._reference_rows(
                index, ids.shape[0] // 2, ids.device
            )
        return inputs

    def _reference_rows(
        self, index: torch.Tensor | None, pairs: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if index is None or self._all_bad:
            zeros = torch.zeros(pairs, device=device)
            return zeros, zeros.clone()
        if self.reference_logps is None:
            raise RuntimeError(
                "precompute_ref_log_probs: the reference log-probs were not computed"
            )
        rows = torch.tensor([self.reference_logps[int(i)] for i in index], device=device)
        return rows[:, 0], rows[:, 1]

    def _model_loss(self, model: Any, inputs: dict[str, Any], **kwargs: Any) -> Any:
        """TRL's ``DPOTrainer._compute_loss`` on our batch; ``(loss, None)``.

        An ``ALL_BAD`` batch runs it too (the same forwards and metric gathers as the other
        ranks), without the ``sft`` term (a mean over no tokens), times zero; this rank's
        metric entries of that step are dropped.
        """
        inputs = self.preference_inputs(inputs)
        if not self._all_bad:
            return DPOTrainer._compute_loss(self, model, inputs, return_outputs=False), None
        mode = "train" if self.model.training else "eval"
        kept = {key: len(values) for key, values in self._metrics[mode].items()}
        tokens, terms = self._total_train_tokens, (self.loss_types, self.loss_weights)
        self.loss_types, self.loss_weights = terms[0][:1], terms[1][:1]
        try:
            loss = DPOTrainer._compute_loss(self, model, inputs, return_outputs=False)
        finally:
            self.loss_types, self.loss_weights = terms
        for key, values in self._metrics[mode].items():
            del values[kept.get(key, 0) :]
        self._total_train_tokens = tokens
        return 0.0 * loss, None

    def samples_in(self, inputs: dict[str, Any]) -> int:
        """Pairs in a batch (2 rows each), for the bad-sample counts."""
        return int(inputs["input_ids"].shape[0]) // 2

    def prediction_step(
        self,
        model: Any,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: Any = None,
    ) -> tuple[torch.Tensor, None, None]:
        """Evaluation: the preference loss only (there are no logits to compare)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---- reference log-probs, metrics ----------------------------------------------------

    def precompute_reference(self) -> None:
        """Compute every pair's reference log-probabilities (``precompute_ref_log_probs``) and
        free a full-weight run's reference copy. Collective; once per run."""
        if self.reference_logps is not None:
            return
        self.reference_logps = precompute_reference(self)
        self.ref_model = None

    def reference_log_probs(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """TRL's ``compute_ref_log_probs`` on a batch of ours (chosen, rejected), with the
        vision path of text-only batches."""
        model = self.ref_model if self.ref_model is not None else self.model_wrapped
        base = unwrap_model(self.accelerator.unwrap_model(self.model))
        inputs, context = self._vision_path(self.preference_inputs(inputs), base)
        with context:
            return DPOTrainer.compute_ref_log_probs(self, model, inputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the averages of TRL's metrics since the last log (as ``DPOTrainer.log``)."""
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(v) / len(v) for key, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()
