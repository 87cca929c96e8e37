"""``LvlmTrainer``: a thin ``transformers.Trainer`` for multimodal instruction tuning.

What it adds, and nothing else:

* frozen vision modules stay in eval mode (no dropout) while the rest trains;
* optimizer groups: the projector gets ``projector_lr``; biases and norm weights (every
  parameter with fewer than 2 dimensions) get no weight decay;
* the modality-and-length grouped sampler (``group_by_modality_length``): each forward pass
  across all ranks holds only image or only text-only samples of similar length;
* text-only batches still run the vision path on a blank image (times zero), right after the
  token embeddings as image batches do (or, for families whose forward always runs it, such
  as MiniGPT-4's BLIP-2, as the batch's image with no image token to fill), so every rank runs the same modules in the same order
  in every step (ZeRO-2/3 collectives match) and multi-rank runs cannot hang;
* every save (intermediate checkpoints too) also writes the run card (family, stage, template,
  recipe, parts), the processor, and for stage 1 a projector-only file; under ZeRO-3 all
  ranks gather and rank 0 writes;
* checkpoints are written to a staging folder and published with one rename, and
  ``resume_from_checkpoint: true`` (or ``auto``: resume when possible) picks the newest
  complete one (:mod:`lvlm_tune.training.checkpoints`);
* a resume takes only a checkpoint of the same run (its run card's options), and only after
  every pickle in it has been checked to import nothing but tensors and training state
  (:mod:`lvlm_tune.training.pickle_scan`): DeepSpeed unpickles its shards with
  ``weights_only=False``;
* DeepSpeed: a config with its own optimizer or scheduler is refused (it would drop the
  projector group); with ZeRO-Offload the groups go to ``DeepSpeedCPUAdam``;
* ``on_bad_sample: skip``: a batch whose samples were all bad still runs its step (same
  modules on every rank) with a loss of exactly zero; the samples each epoch trained on are
  counted; after every step the bad samples of all ranks are checked against
  ``max_bad_fraction``; checkpoints carry the bad-sample record (``bad_samples.json``) and a
  resumed run continues it (:mod:`lvlm_tune.training.bad_samples`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from lvlm_tune.data.collator import ALL_BAD
from lvlm_tune.data.sampler import ModalityLengthGroupedSampler
from lvlm_tune.generation.model import VokenModel
from lvlm_tune.generation.saving import load_voken_state, save_voken_model
from lvlm_tune.models.parts import canonical_name, is_under, save_projector, unwrap_model
from lvlm_tune.models.registry import ModelFamily
from lvlm_tune.models.tokenizer_saving import restore_tokenizer_options
from lvlm_tune.training import bad_samples
from lvlm_tune.training.checkpoints import (
    complete_checkpoint_steps,
    publish_checkpoint,
    staging_root,
)
from lvlm_tune.training.distributed import (
    check_deepspeed_config,
    offloads_optimizer,
    zero3_init_paused,
)
from lvlm_tune.training.pickle_scan import check_checkpoint
from lvlm_tune.training.run_card import RunCard
from lvlm_tune.training.run_folder import RunFolderError, check_same_run

logger = logging.getLogger(__name__)
LOSS_PARTS = ("text_loss", "ldm_loss", "caption_loss")  # logged as averages when reported


class LvlmTrainer(Trainer):
    """``Trainer`` with projector learning rate, grouped sampling and self-describing saves.

    Args:
        family: the model family entry (where the projector and vision path are).
        run_card: what to record with every save (``None``: nothing, for a trainer that
            never saves).
        blank_pixel_values: a blank image batch (1, C, H, W) for text-only batches.
        **kwargs: passed to ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        family: ModelFamily,
        run_card: RunCard | None,
        blank_pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_deepspeed_config(self.args)
        self.family = family
        self.run_card = run_card
        self.blank_pixel_values = blank_pixel_values
        self._staging = False
        self._loss_parts: dict[str, tuple[float, int]] = {}
        self._all_bad = False
        skips = getattr(self.train_dataset, "on_bad_sample", None) == "skip"
        self.bad_samples = (
            bad_samples.BadSampleTracker(self.train_dataset, self.args.device) if skips else None
        )

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
        optimizer_cls, optimizer_kwargs = self._optimizer_cls_and_kwargs(opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def _optimizer_cls_and_kwargs(self, model: Any) -> tuple[Any, dict[str, Any]]:
        """The Trainer's choice, or ``DeepSpeedCPUAdam`` when ZeRO-Offload holds the states."""
        if not offloads_optimizer(self.args):
            return self.get_optimizer_cls_and_kwargs(self.args, model)
        if not str(getattr(self.args.optim, "value", self.args.optim)).startswith("adamw"):
            raise ValueError(
                f"optim: {self.args.optim} cannot run on ZeRO-Offload's CPU optimizer states; "
                "use an adamw optimizer (it becomes DeepSpeedCPUAdam) or a config without offload"
            )
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        kwargs = {
            "lr": self.args.learning_rate,
            "betas": (self.args.adam_beta1, self.args.adam_beta2),
            "eps": self.args.adam_epsilon,
            "adamw_mode": True,
        }
        return DeepSpeedCPUAdam, kwargs

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
        self._frozen_parts_in_eval_mode(model)
        inputs = dict(inputs)
        self._all_bad = bool(inputs.pop(ALL_BAD, False))
        if self._all_bad:
            inputs.pop("labels", None)  # nothing to train; the step runs with a zero loss
        loss, outputs = self._loss_and_outputs(model, inputs, **kwargs)
        if not self._all_bad:
            self._record_loss_parts(outputs)
            if model.training and self.bad_samples is not None:
                rows = int(inputs["input_ids"].shape[0])
                self.bad_samples.count_trained(int(self.state.epoch or 0), rows)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.bad_samples is not None:
            self.bad_samples.check()  # every rank, every step: they stop together
        return loss

    def _model_loss(self, model: Any, inputs: dict[str, Any], **kwargs: Any) -> Any:
        """``Trainer.compute_loss`` (loss, outputs); zero for a batch of only bad samples.

        That batch runs forward and backward like any other (ranks stay in step, every
        trainable part gets a gradient, of zeros) but contributes nothing: the loss is
        ``0 * sum(logits)`` (or ``0 *`` the model's own label-free loss, MiniGPT-5's).
        """
        if not self._all_bad:
            return super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        outputs = model(**inputs)
        loss = outputs.get("loss") if hasattr(outputs, "get") else None
        if loss is None:
            loss = outputs["logits"].float().sum()
        return 0.0 * loss, outputs

    def _frozen_parts_in_eval_mode(self, model: Any) -> None:
        """Frozen vision modules run as in inference (no dropout), as the original code does.

        ``Trainer`` puts the whole model in training mode every step; a frozen BLIP-2 Q-Former
        (dropout 0.1) would otherwise give different image features on every pass.
        """
        base = unwrap_model(self.accelerator.unwrap_model(model))
        for name in self.family.vision_modules:
            try:
                module = base.get_submodule(name)
            except AttributeError:
                continue  # a bare parameter (query_tokens) or a part this model lacks
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()

    def _loss_and_outputs(self, model: Any, inputs: dict[str, Any], **kwargs: Any) -> Any:
        if "pixel_values" in inputs or self.blank_pixel_values is None:
            return self._model_loss(model, inputs, **kwargs)
        if self.family.forward_needs_pixels:
            # The forward runs the vision path anyway; with no image token in the text the
            # blank image's features are scattered nowhere (zero gradient, same modules run).
            like = inputs["input_ids"]
            dtype = next(model.parameters()).dtype
            blank = self.blank_pixel_values.to(device=like.device, dtype=dtype)
            inputs = {**inputs, "pixel_values": blank}
            return self._model_loss(model, inputs, **kwargs)
        with self._blank_vision_path(model) as fired:
            loss, outputs = self._model_loss(model, inputs, **kwargs)
        if not fired:
            # The family's forward never embedded tokens: touch the vision path afterwards.
            loss = loss + 0.0 * self._blank_features(model, loss).sum()
        return loss, outputs

    def _record_loss_parts(self, outputs: Any) -> None:
        """Sum the loss parts a model reports (MiniGPT-5: text, ldm, caption) for logging."""
        for name in LOSS_PARTS:
            value = outputs.get(name) if hasattr(outputs, "get") else None
            if value is not None:
                total, count = self._loss_parts.get(name, (0.0, 0))
                self._loss_parts[name] = (total + float(value), count + 1)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._loss_parts:
            logs.update({k: round(t / max(c, 1), 6) for k, (t, c) in self._loss_parts.items()})
            self._loss_parts = {}
        super().log(logs, *args, **kwargs)

    def _blank_features(self, model: Any, like: torch.Tensor) -> torch.Tensor:
        base = unwrap_model(self.accelerator.unwrap_model(model))
        dtype = next(base.parameters()).dtype
        blank = self.blank_pixel_values.to(device=like.device, dtype=dtype)
        return self.family.image_features(base, blank)

    @contextlib.contextmanager
    def _blank_vision_path(self, model: Any) -> Iterator[list[bool]]:
        """Run the vision path on the blank image right after the token embeddings.

        An image batch runs embeddings -> vision tower -> projector -> LLM; a text-only batch
        run this way calls the same modules in the same order, which ZeRO-3 (parameter
        gathers) and ZeRO-2/3 (gradient buckets) need on every rank. Yields a list that holds
        ``True`` once the vision path ran.
        """
        fired: list[bool] = []
        embeddings = unwrap_model(self.accelerator.unwrap_model(model)).get_input_embeddings()

        def add_vision_path(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
            if fired:
                return output
            fired.append(True)
            return output + 0.0 * self._blank_features(model, output).sum().to(output.dtype)

        handle = embeddings.register_forward_hook(add_vision_path)
        try:
            yield fired
        finally:
            handle.remove()

    # ---- saving ------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, VokenModel):
            if self.args.should_save:
                save_voken_model(model, output_dir, state_dict)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
        else:
            super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            if self.processing_class is not None:  # both branches: save_pretrained drops `legacy`
                restore_tokenizer_options(
                    output_dir, getattr(self.processing_class, "tokenizer", self.processing_class)
                )
            # Trainer pickles its arguments; keep a JSON copy instead (nothing to unpickle later).
            pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
            if os.path.exists(pickled):
                os.remove(pickled)
            with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as f:
                f.write(self.args.to_json_string())
            if self.run_card is not None:
                self.run_card.write(output_dir)
        if self.run_card is not None and self.run_card.stage == "pretrain":
            # every rank: gathers ZeRO-3 partitions; rank 0 writes
            save_projector(self.model, output_dir, self.family)

    # ---- checkpoints -------------------------------------------------------------------

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return staging_root(run_dir) if self._staging else run_dir

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write ``checkpoint-N`` into the staging folder, then publish it with one rename."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = os.path.join(staging_root(run_dir), name)
        if self.args.should_save:
            shutil.rmtree(staging_root(run_dir), ignore_errors=True)  # leftovers of a crash
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every rank's shards are on disk
        if self.bad_samples is not None:
            self.bad_samples.merge()
        if self.args.should_save:
            if self.bad_samples is not None:
                self.bad_samples.save(staged)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging_root(run_dir)):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            publish_checkpoint(staged, os.path.join(run_dir, name))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest complete checkpoint.

        ``"auto"`` does the same when there is one and starts afresh otherwise (for jobs that
        are requeued after preemption).
        """
        if resume_from_checkpoint is True or resume_from_checkpoint == "auto":
            found = self._newest_common_checkpoint()
            if found is None and resume_from_checkpoint is True:
                raise ValueError(
                    f"resume_from_checkpoint: no complete checkpoint in {self.args.output_dir}"
                )
            logger.info("resuming from %s", found or "scratch: no checkpoint yet")
            resume_from_checkpoint = found
        if resume_from_checkpoint:
            if not os.path.isdir(resume_from_checkpoint):
                raise RunFolderError(
                    f"resume_from_checkpoint: {resume_from_checkpoint} is not a folder"
                )
            options = self.run_card.run_options if self.run_card is not None else None
            check_same_run(resume_from_checkpoint, options)
            check_checkpoint(resume_from_checkpoint)  # before DeepSpeed or Trainer unpickle it
            if self.bad_samples is not None:
                self.bad_samples.load(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Full-model checkpoints load through ``from_pretrained`` (it maps the saved key names).

        ``Trainer`` loads ``model.safetensors`` with a plain non-strict ``load_state_dict``;
        transformers saves LLaVA under its legacy key names, so nothing would match and the
        run would resume from the initial weights without a word.
        """
        target = self.model if model is None else model
        if isinstance(target, VokenModel):
            load_voken_state(target, resume_from_checkpoint)
            return None
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        if not isinstance(target, PreTrainedModel) or not (
            os.path.isfile(weights) or os.path.isfile(weights + ".index.json")
        ):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        with zero3_init_paused():
            saved = type(target).from_pretrained(
                resume_from_checkpoint, dtype=next(target.parameters()).dtype
            )
        target.load_state_dict(saved.state_dict(), strict=True)

    def _newest_common_checkpoint(self) -> str | None:
        """The newest checkpoint complete on every rank (nodes may not share a filesystem)."""
        steps = set(complete_checkpoint_steps(self.args.output_dir))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, sorted(steps))
            steps = set.intersection(*(set(s) for s in everyone))
        if not steps:
            return None
        return os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{max(steps)}")
