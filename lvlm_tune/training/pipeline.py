"""One training stage from parsed recipe arguments: build the model, freeze, data, train, save.

Reads top to bottom: build the model -> freeze for the stage -> data -> train -> save. The
preference stages (``dpo``, ``dpo_lora``) train on chosen/rejected pairs with
:class:`~lvlm_tune.training.preference_trainer.PreferenceTrainer`. The
``lvlm-tune train`` command (:mod:`lvlm_tune.commands.train`) parses the recipe and calls
:func:`run`. Enabled extensions (MiniGPT-5) take part through the registry's hooks
(:mod:`lvlm_tune.training.extensions`): special tokens, an earlier stage folded in, their own
stages, wrapping the model, data hooks and the trainer class.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import set_seed

from lvlm_tune.data.collator import MultimodalCollator, pad_token_id
from lvlm_tune.data.dataset import SupervisedDataset
from lvlm_tune.data.hooks import DataHooks
from lvlm_tune.data.image_tokens import ImageTokenCounter
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.sources import open_source
from lvlm_tune.data.video import VideoLoader, frame_settings
from lvlm_tune.errors import UserError
from lvlm_tune.models.llava import enable_gradient_checkpointing
from lvlm_tune.models.llava_original import original_image_aspect_ratio
from lvlm_tune.models.parts import load_projector
from lvlm_tune.models.registry import ModelFamily, get_model_family
from lvlm_tune.templates.jinja import set_chat_template
from lvlm_tune.templates.registry import TOKENIZER_TEMPLATE, get_template
from lvlm_tune.training.distributed import register_token_weights, zero3_init_paused
from lvlm_tune.training.encoding import EncodingOptions
from lvlm_tune.training.extensions import (
    active_extensions,
    data_hooks,
    stage_owner,
    trainer_class,
)
from lvlm_tune.training.freezing import LoraOptions, apply_stage, parameter_summary
from lvlm_tune.training.label_logits import use_label_logits
from lvlm_tune.training.loss_curve import write_loss_curve
from lvlm_tune.training.packing import PackingPlan, packing_plan
from lvlm_tune.training.preference_arguments import DPO_STAGES
from lvlm_tune.training.preference_precompute import IndexedCollator, IndexedPairs
from lvlm_tune.training.preference_trainer import PreferenceTrainer
from lvlm_tune.training.recipe import (
    DataArguments,
    LvlmTrainingArguments,
    ModelArguments,
    check_paths,
)
from lvlm_tune.training.run_card import RunCard, run_options
from lvlm_tune.training.run_folder import claim_output_dir
from lvlm_tune.training.trainer import LvlmTrainer
from lvlm_tune.training.vision_path import blank_image_sizes

logger = logging.getLogger("lvlm_tune.train")


def model_dtype(args: LvlmTrainingArguments) -> torch.dtype:
    """bf16 runs hold bf16 weights; fp16 runs keep fp32 master weights (AMP); else fp32."""
    return torch.bfloat16 if args.bf16 else torch.float32


def build_model(
    model_args: ModelArguments, data_args: DataArguments, train_args: LvlmTrainingArguments
) -> tuple[Any, Any, ModelFamily]:
    """Build or load the model and processor, load a stage-1 projector, freeze for the stage
    (an extension's stage through its hook), let enabled extensions wrap the model.

    An unset ``image_aspect_ratio`` becomes the loaded checkpoint's (``pad`` for an original
    LLaVA-1.5 folder), else ``none``.
    """
    family = get_model_family(model_args.family)
    if data_args.image_aspect_ratio is None:
        base = original_image_aspect_ratio(model_args.model_name_or_path)
        data_args.image_aspect_ratio = base or "none"
    encoding = EncodingOptions.from_recipe(
        data_args, seed=train_args.seed, extensions=model_args.extensions
    )
    extra = encoding.special_tokens()  # as inspect, eval and chat prepare the tokenizer
    common = {
        "dtype": model_dtype(train_args),
        "attn_implementation": model_args.attn_implementation,
        "extra_special_tokens": extra,
    }
    # Whole on every rank even under ZeRO-3 (DeepSpeed partitions it when training starts):
    # composing fills a meta skeleton and PEFT copies the projector, and neither works on
    # zero.Init-partitioned parameters.
    with zero3_init_paused():
        if model_args.model_name_or_path:
            options = {k: getattr(model_args, k) for k in family.load_options}
            options = {k: v for k, v in options.items() if v}
            model, processor = family.load(model_args.model_name_or_path, **options, **common)
        else:
            options = {key: getattr(model_args, key) for key in family.build_options}
            model, processor = family.build(
                model_args.vision_tower, model_args.llm_name_or_path, **options, **common
            )
    if data_args.template != TOKENIZER_TEMPLATE:  # inference renders exactly the training prompt
        template = get_template(data_args.template)
        set_chat_template(processor, template, family.prompt_image_tokens(model))
    if model_args.pretrained_projector:
        source = load_projector(model, model_args.pretrained_projector, family)
        logger.info("projector loaded from %s", source)
    extensions = active_extensions(model_args.extensions)
    for extension, args in extensions:
        model = extension.prepare_model(model, args)
    lora = LoraOptions(
        r=model_args.lora_r,
        alpha=model_args.lora_alpha,
        dropout=model_args.lora_dropout,
        target_modules=tuple(model_args.lora_target_modules)
        if model_args.lora_target_modules
        else None,
        use_dora=model_args.use_dora,
        use_rslora=model_args.use_rslora,
    )
    owner = stage_owner(model_args)  # an extension's stage, or None: the core's
    with zero3_init_paused():  # the model is still whole; PEFT must not gather (CUDA-only)
        if owner is None:
            model = apply_stage(
                model, model_args.stage, family, lora=lora,
                unfreeze_vision_tower=model_args.unfreeze_vision_tower,
            )  # fmt: skip
        else:
            extension, args = owner
            vision = family.vision_modules if model_args.unfreeze_vision_tower else ()
            model = extension.apply_stage(
                model, model_args.stage, family, lora=lora, vision=vision,
                tokenizer=processor.tokenizer, args=args,
            )  # fmt: skip
    register_token_weights(model)  # ZeRO-3 gathers the rows PEFT trainable tokens read
    if train_args.activation_checkpointing:
        enable_gradient_checkpointing(model)  # with input grads, so frozen embeddings work
        train_args.activation_checkpointing = train_args.gradient_checkpointing = False
    for extension, args in extensions:
        model = extension.wrap_model(model, processor, args, model_dtype(train_args))
    logger.info(parameter_summary(model))
    return model, processor, family


def build_dataset(
    data_args: DataArguments,
    processor: Any,
    num_image_tokens: int | ImageTokenCounter,
    seed: int,
    *,
    hooks: DataHooks | None = None,
    videos: tuple[int, VideoLoader] | None = None,
    preference: bool = False,
) -> Any:
    """Source -> encoder (:class:`~lvlm_tune.training.encoding.EncodingOptions` of the recipe,
    the model's image tokens) -> dataset with images: a ``SupervisedDataset``, or with
    ``preference`` (the DPO stages) a ``PreferenceDataset`` of chosen/rejected pairs.

    ``hooks``: the extensions' data hooks (:func:`lvlm_tune.training.extensions.data_hooks`),
    e.g. MiniGPT-5's image-generating answers and their target images; default: none.
    ``videos``: the tokens per video and the video loader of a model that takes videos
    (:func:`video_inputs`); default: video samples are refused.
    """
    hooks = hooks or DataHooks()
    if not data_args.data_path:
        raise UserError("data_path: a training recipe needs data; set data_path")
    options = EncodingOptions.from_recipe(data_args, seed=seed)
    video_tokens, video_loader = videos or (None, None)
    encoder = options.encoder(processor.tokenizer, num_image_tokens, hooks, video_tokens)
    images = ImageLoader(
        processor.image_processor,
        data_args.image_folder,
        data_args.image_aspect_ratio or "none",
        max_image_pixels=data_args.max_image_pixels,
        allow_outside_folder=data_args.allow_outside_image_folder,
    )
    source = open_source(data_args.data_path, fmt=data_args.data_format)
    if preference:
        from lvlm_tune.data.preference_dataset import PreferenceDataset
        from lvlm_tune.data.preference_encoder import PreferenceEncoder

        return PreferenceDataset(
            source, PreferenceEncoder(encoder), images, on_bad_sample=data_args.on_bad_sample,
            max_bad_fraction=data_args.max_bad_fraction, videos=video_loader,
        )  # fmt: skip
    return SupervisedDataset(
        source, encoder, images, on_bad_sample=data_args.on_bad_sample,
        max_bad_fraction=data_args.max_bad_fraction, hooks=hooks, videos=video_loader,
    )  # fmt: skip


def video_inputs(
    family: ModelFamily, processor: Any, model_args: ModelArguments, data_args: DataArguments
) -> tuple[int, VideoLoader] | None:
    """The tokens per video and the video loader of a family that takes videos (OneVision),
    with the frame processing of the checkpoint's saved video processor (else the image
    processor's settings, as a composed OneVision saves them); ``None`` for other families."""
    if family.video_tokens is None:
        return None
    settings = frame_settings(processor.image_processor, model_args.model_name_or_path)
    loader = VideoLoader(
        settings, data_args.video_folder or data_args.image_folder, data_args.video_num_frames,
        max_image_pixels=data_args.max_image_pixels,
        allow_outside_folder=data_args.allow_outside_image_folder,
    )  # fmt: skip
    return family.video_tokens(processor, data_args.video_num_frames), loader


def _data_and_trainer(
    model_args: ModelArguments,
    train_args: LvlmTrainingArguments,
    dataset: Any,
    pad_id: int,
    preference: bool,
    packing: PackingPlan | None,
) -> tuple[Any, Any, type]:
    """The dataset, collator and trainer class of the stage: pairs for the DPO stages (with
    their indices under ``precompute_ref_log_probs``), else samples (packed or padded) and the
    extensions' trainer."""
    if not preference:
        collator = packing.collator(pad_id) if packing else MultimodalCollator(pad_id)
        return dataset, collator, trainer_class(model_args.extensions, LvlmTrainer)
    if packing is not None:
        raise UserError(f"packing: not with stage {model_args.stage}; set packing: false")
    from lvlm_tune.data.preference_dataset import PreferenceCollator

    collator = PreferenceCollator(pad_id)
    if train_args.precompute_ref_log_probs:
        dataset, collator = IndexedPairs(dataset), IndexedCollator(collator)
    return dataset, collator, PreferenceTrainer


def resume_arg(value: Any) -> bool | str | None:
    if value in (None, "", False, "false", "False"):
        return None
    return True if value in (True, "true", "True") else str(value)


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: LvlmTrainingArguments,
    callbacks: list[Any] | None = None,
) -> LvlmTrainer:
    """Train one stage; returns the trainer (state, log history, output folder).

    Refuses (``RunFolderError``) an ``output_dir`` that holds another run unless
    ``overwrite_output_dir``, and a checkpoint of another run or one whose pickles import
    anything but tensors and training state (``UnsafeCheckpointError``) to resume from.

    Raises:
        UserError: before any model loads, for missing data or a missing local path.
    """
    if not data_args.data_path:
        raise UserError("data_path: a training recipe needs data; set data_path")
    check_paths(model_args, data_args)
    options = run_options(model_args, data_args, train_args)  # before build_model adjusts them
    claim_output_dir(train_args.output_dir, options, train_args.overwrite_output_dir)
    set_seed(train_args.seed)
    model, processor, family = build_model(model_args, data_args, train_args)
    image_tokens = family.image_tokens(model, processor)
    hooks = data_hooks(model_args.extensions, model)
    videos = video_inputs(family, processor, model_args, data_args)
    preference = model_args.stage in DPO_STAGES
    dataset = build_dataset(
        data_args, processor, image_tokens, train_args.seed, hooks=hooks, videos=videos,
        preference=preference,
    )  # fmt: skip
    extensions = [extension.name for extension, _ in active_extensions(model_args.extensions)]
    packing = packing_plan(data_args, train_args, family, model, extensions)  # None: padded
    dataset, collator, trainer_cls = _data_and_trainer(
        model_args, train_args, dataset, pad_token_id(processor.tokenizer), preference, packing
    )
    card = RunCard.from_args(
        model_args, data_args, train_args, options=options,
        num_image_tokens=image_tokens if isinstance(image_tokens, int) else None,
    )  # fmt: skip
    blank = dataset.images.blank()
    trainer = trainer_cls(
        model=model,
        args=train_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        family=family,
        run_card=card,
        stage=model_args.stage,
        blank_pixel_values=blank,
        blank_image_sizes=blank_image_sizes(blank, processor),
        packing=packing,
        logits_at_labels=use_label_logits(train_args.logits_at_labels, train_args, not extensions),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume_arg(train_args.resume_from_checkpoint))
    tracker = trainer.bad_samples
    if tracker is not None:  # on_bad_sample: skip
        tracker.merge()  # every rank's bad samples, each once
        dataset.check_bad_fraction()
        card.bad_samples = tracker.report()  # the final folder's run card says what was skipped
    trainer.save_model()  # with the run card (the trainer's, ``card``) and, in stage 1, the projector
    trainer.save_state()
    if trainer.is_world_process_zero() and train_args.loss_curve:
        write_loss_curve(trainer.state.log_history, train_args.output_dir)
    logger.info("%s", tracker.summary() if tracker is not None else dataset.ledger.summary())
    return trainer
