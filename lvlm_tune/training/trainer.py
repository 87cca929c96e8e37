"""``LvlmTrainer``: a thin ``transformers.Trainer`` for multimodal instruction tuning.

What it adds, and nothing else:

* frozen vision modules stay in eval mode (no dropout) while the rest trains;
* optimizer groups (:mod:`lvlm_tune.training.optimizer`): ``projector_lr``,
  ``vision_tower_lr``, no weight decay on biases and norms, ``DeepSpeedCPUAdam`` under
  ZeRO-Offload; a DeepSpeed config with its own optimizer or scheduler is refused;
* the modality-and-length grouped sampler (``group_by_modality_length``), or the packer
  (``packing``: :mod:`lvlm_tune.training.packing`);
* the LM head and loss only where labels train (``logits_at_labels``:
  :mod:`lvlm_tune.training.label_logits`);
* text-only batches still run the vision path on a blank image (times zero; anyres: with its
  ``image_sizes``): :mod:`lvlm_tune.training.vision_path`, so every rank runs the same
  modules in the same order in every step (ZeRO-2/3 collectives match);
* every save (intermediate checkpoints too) also writes the run card, the processor, and for
  stage 1 a projector-only file; under ZeRO-3 all ranks gather and rank 0 writes;
* checkpoints are staged and published with one rename; ``resume_from_checkpoint: true`` (or
  ``auto``) picks the newest complete one (:mod:`lvlm_tune.training.checkpoints`), of the same
  run only, after every pickle in it was checked (:mod:`lvlm_tune.training.pickle_scan`);
* ``on_bad_sample: skip``: a batch of only bad samples runs its step with a loss of exactly
  zero; the bad samples of all ranks are counted, checked against ``max_bad_fraction`` and
  carried by checkpoints (:mod:`lvlm_tune.training.bad_samples`).

Extensions subclass it (``trainer_class``, :mod:`lvlm_tune.training.extensions`) and override
:meth:`LvlmTrainer.save_weights` and ``_load_from_checkpoint`` for non-``PreTrainedModel``s.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from lvlm_tune.data.collator import ALL_BAD
from lvlm_tune.data.packed_collator import PACKED_SAMPLES
from lvlm_tune.data.sampler import ModalityLengthGroupedSampler
from lvlm_tune.models.parts import save_projector, unwrap_model
from lvlm_tune.models.registry import ModelFamily
from lvlm_tune.models.tokenizer_saving import restore_tokenizer_options
from lvlm_tune.training import bad_samples
from lvlm_tune.training.checkpoints import (
    newest_common_checkpoint,
    publish_checkpoint,
    staging_root,
)
from lvlm_tune.training.distributed import check_deepspeed_config, zero3_init_paused
from lvlm_tune.training.label_logits import loss_at_labels, trained_positions
from lvlm_tune.training.optimizer import optimizer_cls_and_kwargs, parameter_groups
from lvlm_tune.training.packing import PackingPlan
from lvlm_tune.training.pickle_scan import check_checkpoint
from lvlm_tune.training.run_card import RunCard
from lvlm_tune.training.run_folder import RunFolderError, check_same_run
from lvlm_tune.training.vision_path import blank_features, vision_path_after_embeddings

logger = logging.getLogger(__name__)


class LvlmTrainer(Trainer):
    """``Trainer`` with projector learning rate, grouped sampling and self-describing saves.

    Args:
        family: the model family entry (where the projector and vision path are).
        run_card: what to record with every save (``None``: nothing; it never saves).
        stage: the run's stage (``pretrain``: saves also write the projector alone).
        blank_pixel_values: a blank image batch (1, C, H, W) for text-only batches.
        blank_image_sizes: its ``image_sizes`` for anyres families (NeXT, OneVision).
        packing: the run's packing (its sampler; the collator must be the plan's).
        logits_at_labels: compute the loss from logits at trained positions only.
        **kwargs: passed to ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        family: ModelFamily,
        run_card: RunCard | None,
        stage: str | None = None,
        blank_pixel_values: torch.Tensor | None = None,
        blank_image_sizes: torch.Tensor | None = None,
        packing: PackingPlan | None = None,
        logits_at_labels: bool = False,
        **kwargs: Any,
    ) -> None:
        if logits_at_labels:
            kwargs["compute_loss_func"] = loss_at_labels
        super().__init__(*args, **kwargs)
        self.packing = packing
        self.logits_at_labels = logits_at_labels
        check_deepspeed_config(self.args)
        self.family = family
        self.run_card = run_card
        self.stage = stage
        self.blank_pixel_values = blank_pixel_values
        self.blank_image_sizes = blank_image_sizes
        self._staging = False
        self._all_bad = False
        skips = getattr(self.train_dataset, "on_bad_sample", None) == "skip"
        self.bad_samples = (
            bad_samples.BadSampleTracker(self.train_dataset, self.args.device) if skips else None
        )

    # ---- optimizer ---------------------------------------------------------------------

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = parameter_groups(opt_model, self.args, self.family)
            optimizer_cls, optimizer_kwargs = optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ---- data --------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.packing is not None:
            return self.packing.sampler(dataset.modality_lengths(), self.args.seed)
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
        samples = inputs.pop(PACKED_SAMPLES, None)  # packed rows hold several samples
        self._all_bad = bool(inputs.pop(ALL_BAD, False))
        if self._all_bad:
            inputs.pop("labels", None)  # nothing to train; the step runs with a zero loss
        loss, outputs = self._loss_and_outputs(model, inputs, **kwargs)
        if not self._all_bad and model.training and self.bad_samples is not None:
            rows = samples if samples is not None else self.samples_in(inputs)
            self.bad_samples.count_trained(int(self.state.epoch or 0), int(rows))
        return (loss, outputs) if return_outputs else loss

    def samples_in(self, inputs: dict[str, Any]) -> int:  # a preference pair takes 2 rows
        return int(inputs["input_ids"].shape[0])

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
            if self.logits_at_labels and "labels" in inputs:
                inputs = {**inputs, "logits_to_keep": trained_positions(inputs["labels"])}
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
        base = self.accelerator.unwrap_model(model)
        with vision_path_after_embeddings(base, lambda x: self._blank_features(model, x)) as fired:
            loss, outputs = self._model_loss(model, inputs, **kwargs)
        if not fired:
            # The family's forward never embedded tokens: touch the vision path afterwards.
            loss = loss + 0.0 * self._blank_features(model, loss).sum()
        return loss, outputs

    def _blank_features(self, model: Any, like: torch.Tensor) -> torch.Tensor:
        base, sizes = self.accelerator.unwrap_model(model), self.blank_image_sizes
        return blank_features(self.family, base, self.blank_pixel_values, like, sizes)

    # ---- saving ------------------------------------------------------------------------

    def save_weights(self, output_dir: str, state_dict: Any = None) -> None:
        """Write the model (and the processor) into ``output_dir``: ``Trainer._save``."""
        super()._save(output_dir, state_dict=state_dict)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        output_dir = output_dir or self.args.output_dir
        self.save_weights(output_dir, state_dict)
        if self.args.should_save:
            if self.processing_class is not None:  # save_pretrained drops `legacy`
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
        if self.stage == "pretrain":
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
            found = newest_common_checkpoint(self.args.output_dir)
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
