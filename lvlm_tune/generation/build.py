"""Assemble a MiniGPT-5 model for training or inference from the recipe's options.

Stage 1 (``vokens``) starts from a plain LVLM: the vokens were added to its vocabulary when it
was built or loaded, a new mapping module is sized from the LLM and the diffusion model's
condition shape. Stage 2 (``vokens_lora``) starts from a stage-1 run (``pretrained_vokens``):
its trained voken rows are folded into the LVLM before the stage's own PEFT wrapping, and its
mapping module is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from PIL import Image

from lvlm_tune.generation.mapper import MapperConfig, VokenMapper, has_mapper, load_mapper
from lvlm_tune.generation.model import LossWeights, VokenModel
from lvlm_tune.generation.vokens import voken_ids
from lvlm_tune.training.distributed import zero3_init_paused


@dataclass(frozen=True)
class TargetImages:
    """Picklable transform of decoded target images into the VAE's input (DataLoader workers
    get only the size, never the diffusion models)."""

    image_size: int

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        from lvlm_tune.generation.diffusion import image_tensor

        return image_tensor(self, images)  # reads only ``image_size``


def fold_pretrained_vokens(model: Any, run_dir: str | os.PathLike) -> Any:
    """Fold a vokens-stage run's trained rows (its PEFT adapter) into ``model``'s matrices."""
    if not has_mapper(run_dir):
        raise FileNotFoundError(f"pretrained_vokens: {run_dir} is not a MiniGPT-5 vokens run")
    return PeftModel.from_pretrained(model, os.fspath(run_dir)).merge_and_unload()


def new_mapper(lvlm: Any, parts: Any, model_args: Any) -> VokenMapper:
    """A fresh mapping module from the LLM width to the diffusion condition shape."""
    num_queries, cond_dim = parts.cond_shape
    config = MapperConfig(
        llm_hidden_size=lvlm.config.get_text_config().hidden_size,
        num_vokens=model_args.num_vokens,
        num_queries=num_queries,
        cond_dim=cond_dim,
        hidden_size=model_args.mapper_hidden_size,
        encoder_layers=model_args.mapper_layers,
        decoder_layers=model_args.mapper_layers,
        heads=model_args.mapper_heads,
    )
    return VokenMapper(config)


def build_voken_model(
    lvlm: Any, tokenizer: Any, model_args: Any, train_args: Any, dtype: torch.dtype
) -> VokenModel:
    """Wrap the (stage-wrapped) LVLM with the mapping module and the frozen diffusion parts."""
    try:
        from lvlm_tune.generation.diffusion import load_diffusion_parts
    except ImportError as error:
        raise ImportError(
            f"num_vokens > 0 (MiniGPT-5) needs diffusers: pip install 'lvlm-tune[gen]' ({error})"
        ) from error
    with zero3_init_paused():  # frozen and outside DeepSpeed's module tree: never partitioned
        parts = load_diffusion_parts(model_args.diffusion_model, dtype=dtype)
    if model_args.pretrained_vokens:
        mapper = load_mapper(model_args.pretrained_vokens)
    else:
        mapper = new_mapper(lvlm, parts, model_args)
    if mapper.config.num_vokens != model_args.num_vokens:
        raise ValueError(
            f"pretrained_vokens has {mapper.config.num_vokens} vokens, num_vokens is "
            f"{model_args.num_vokens}"
        )
    if (mapper.config.num_queries, mapper.config.cond_dim) != parts.cond_shape:
        raise ValueError(
            f"the mapper makes {mapper.config.num_queries}x{mapper.config.cond_dim} conditions; "
            f"{model_args.diffusion_model} expects {parts.cond_shape[0]}x{parts.cond_shape[1]}"
        )
    weights = LossWeights(
        text=train_args.text_loss_weight,
        ldm=train_args.ldm_loss_weight,
        caption=train_args.caption_loss_weight,
    )
    return VokenModel(
        lvlm,
        mapper.to(dtype),
        parts,
        first_voken_id=voken_ids(tokenizer, model_args.num_vokens)[0],
        weights=weights,
        cfg_drop=train_args.cfg_drop,
        min_snr_gamma=train_args.min_snr_gamma or None,
    )
