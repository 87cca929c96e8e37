"""Assemble a MiniGPT-5 model for training from the recipe's options.

Stage 1 (``vokens``) starts from a plain LVLM: the vokens were added to its vocabulary when it
was built or loaded, a new mapping module is sized from the LLM and the diffusion model's
condition shape. Stage 2 (``vokens_lora``) starts from a stage-1 run (``pretrained_vokens``):
its trained voken rows are folded into the LVLM before the stage's own PEFT wrapping, and its
mapping module is loaded.

The stages train the generative vokens' rows of the input embedding and ``lm_head`` through
PEFT trainable tokens (the original rows are not parameters of the optimizer): ``vokens`` only
those rows (the mapping module lives outside the LVLM and trains too), ``vokens_lora`` also LoRA
on the LLM (MiniGPT-5 stage 2: r=8, alpha=16 on ``q_proj``/``v_proj``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model

from lvlm_tune.generation.arguments import MiniGPT5Arguments
from lvlm_tune.generation.mapper import MapperConfig, VokenMapper, has_mapper, load_mapper
from lvlm_tune.generation.model import LossWeights, VokenModel
from lvlm_tune.generation.vokens import trainable_token_targets, voken_ids
from lvlm_tune.models.registry import ModelFamily
from lvlm_tune.training.distributed import zero3_init_paused
from lvlm_tune.training.freezing import LoraOptions, lora_target_regex, set_trainable


def fold_pretrained_vokens(model: Any, run_dir: str | os.PathLike) -> Any:
    """Fold a vokens-stage run's trained rows (its PEFT adapter) into ``model``'s matrices."""
    if not has_mapper(run_dir):
        raise FileNotFoundError(f"pretrained_vokens: {run_dir} is not a MiniGPT-5 vokens run")
    return PeftModel.from_pretrained(model, os.fspath(run_dir)).merge_and_unload()


def apply_voken_stage(
    model: Any,
    stage: str,
    family: ModelFamily,
    lora: LoraOptions,
    vision: tuple[str, ...],
    ids: list[int],
) -> PeftModel:
    """Freeze ``model`` for a voken stage: only the rows of ``ids`` (and, in ``vokens_lora``,
    LoRA on the LLM and the ``vision`` modules) train."""
    set_trainable(model, ())
    tokens = trainable_token_targets(model, ids)
    if stage == "vokens":
        config: Any = TrainableTokensConfig(target_modules=list(tokens), token_indices=ids)
    else:
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_target_regex(model, family, lora.target_modules),
            modules_to_save=list(vision) or None,
            trainable_token_indices=tokens,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
        )
    return get_peft_model(model, config)


def new_mapper(lvlm: Any, parts: Any, args: MiniGPT5Arguments) -> VokenMapper:
    """A fresh mapping module from the LLM width to the diffusion condition shape."""
    num_queries, cond_dim = parts.cond_shape
    config = MapperConfig(
        llm_hidden_size=lvlm.config.get_text_config().hidden_size,
        num_vokens=args.num_vokens,
        num_queries=num_queries,
        cond_dim=cond_dim,
        hidden_size=args.mapper_hidden_size,
        encoder_layers=args.mapper_layers,
        decoder_layers=args.mapper_layers,
        heads=args.mapper_heads,
    )
    return VokenMapper(config)


def build_voken_model(
    lvlm: Any, tokenizer: Any, args: MiniGPT5Arguments, dtype: torch.dtype
) -> VokenModel:
    """Wrap the (stage-wrapped) LVLM with the mapping module and the frozen diffusion parts."""
    try:
        from lvlm_tune.generation.diffusion import load_diffusion_parts
    except ImportError as error:
        raise ImportError(
            f"num_vokens > 0 (MiniGPT-5) needs diffusers: pip install 'lvlm-tune[gen]' ({error})"
        ) from error
    with zero3_init_paused():  # frozen and outside DeepSpeed's module tree: never partitioned
        parts = load_diffusion_parts(args.diffusion_model, dtype=dtype)
    if args.pretrained_vokens:
        mapper = load_mapper(args.pretrained_vokens)
    else:
        mapper = new_mapper(lvlm, parts, args)
    if mapper.config.num_vokens != args.num_vokens:
        raise ValueError(
            f"pretrained_vokens has {mapper.config.num_vokens} vokens, num_vokens is "
            f"{args.num_vokens}"
        )
    if (mapper.config.num_queries, mapper.config.cond_dim) != parts.cond_shape:
        raise ValueError(
            f"the mapper makes {mapper.config.num_queries}x{mapper.config.cond_dim} conditions; "
            f"{args.diffusion_model} expects {parts.cond_shape[0]}x{parts.cond_shape[1]}"
        )
    weights = LossWeights(
        text=args.text_loss_weight, ldm=args.ldm_loss_weight, caption=args.caption_loss_weight
    )
    return VokenModel(
        lvlm,
        mapper.to(dtype),
        parts,
        first_voken_id=voken_ids(tokenizer, args.num_vokens)[0],
        weights=weights,
        cfg_drop=args.cfg_drop,
        min_snr_gamma=args.min_snr_gamma or None,
    )
