"""A tiny Stable Diffusion stack built from configs, for MiniGPT-5 tests and the demo.

Stands in for ``stabilityai/stable-diffusion-2-1-base`` offline: written as a diffusers
``StableDiffusionPipeline`` folder, read back through the same ``from_pretrained`` calls real
checkpoints take. diffusers is imported inside the function (the ``gen`` extra).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from lvlm_tune.testing.tiny_models import _default_lines
from lvlm_tune.testing.tokenizers import train_clip_bpe


def write_tiny_stable_diffusion(
    out_dir: str | Path, cross_attention_dim: int = 32, image_size: int = 32, seed: int = 0
) -> Path:
    """Save a random tiny Stable Diffusion stack as a diffusers ``StableDiffusionPipeline`` folder.

    Stands in for ``stabilityai/stable-diffusion-2-1-base``: ``vae/`` (an ``AutoencoderKL``
    halving the resolution, 4 latent channels), ``unet/`` (a two-level
    ``UNet2DConditionModel``), ``scheduler/`` (SD's DDPM noise schedule, epsilon prediction),
    ``text_encoder/`` (a 2-layer ``CLIPTextModel``, 77 positions) and ``tokenizer/`` (a CLIP BPE
    tokenizer learned offline, 77 tokens). No safety checker. The UNet condition is
    ``(77, cross_attention_dim)``.

    Args:
        out_dir: folder to write.
        cross_attention_dim: UNet condition width = text encoder hidden size (a multiple of 4).
        image_size: image side in pixels (a multiple of 8, as the SD pipeline requires).
        seed: seed for all random weights and the tokenizer's training text.
    """
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    tokenizer = train_clip_bpe(_default_lines(500, seed))
    vae_channels = (8, 16)  # two levels: latents are image_size // 2
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cross_attention_dim,
        intermediate_size=2 * cross_attention_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            block_out_channels=vae_channels,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=image_size,
        )
        unet = UNet2DConditionModel(
            sample_size=image_size // 2 ** (len(vae_channels) - 1),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=16,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            use_linear_projection=True,
        )
        text_encoder = CLIPTextModel(text_config)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir)
    return Path(out_dir)
