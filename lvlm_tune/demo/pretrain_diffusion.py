"""A tiny text-to-image Stable Diffusion for the MiniGPT-5 demo, pre-trained on CPU in minutes.

MiniGPT-5 keeps the whole diffusion model frozen: only the voken rows and the mapping module
learn to steer it. A random VAE decodes to noise and a random UNet cannot be steered, so the demo
first makes a diffusion model that already draws its own images from text, offline.
:func:`pretrain_diffusion` starts from the random tiny stack of
:func:`lvlm_tune.testing.tiny_diffusion.write_tiny_stable_diffusion` (its DDPM scheduler, CLIP
tokenizer and text encoder, which stay random and frozen, as SD's text encoder stays frozen),
replaces the VAE by a three-level one (32 px images -> 8 x 8 latents, cheap on CPU) and trains it
to reconstruct the caption pairs' images, sets the VAE's ``scaling_factor`` so that latents have
unit variance, then trains a fresh ``UNet2DConditionModel`` to denoise those latents conditioned
on the text encoder's embedding of each image's caption (``"a red square"``); with probability
``caption_dropout`` the caption is the empty prompt, so classifier-free guidance works. The
result is a diffusers ``StableDiffusionPipeline`` folder that
:func:`lvlm_tune.generation.diffusion.load_diffusion_parts` reads. :func:`closest_colour`
scores a generated image by the mean colour of its saturated pixels.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image

from lvlm_tune.demo.probes import fit
from lvlm_tune.generation.diffusion import (
    DiffusionParts,
    caption_embeddings,
    denoising_target,
    image_tensor,
    load_diffusion_parts,
    make_pipeline,
    min_snr_weight,
)
from lvlm_tune.testing.tiny_diffusion import write_tiny_stable_diffusion


@dataclass
class DiffusionPretrainConfig:
    """Sizes and schedules of the demo's VAE and UNet pre-training."""

    image_size: int = 32  # pixels; the three-level VAE makes image_size // 4 latents per side
    vae_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    cross_attention_dim: int = 32  # = the text encoder's width = the mapper's output width
    vae_steps: int = 250
    vae_batch_size: int = 32
    vae_learning_rate: float = 3e-3
    kl_weight: float = 1e-6
    unet_steps: int = 1500
    unet_batch_size: int = 64
    unet_learning_rate: float = 2e-3
    caption_dropout: float = 0.1  # empty prompt instead of the caption (CFG's unconditional)
    min_snr_gamma: float = 5.0
    seed: int = 0


def _load_pairs(pairs: str | os.PathLike, image_folder: str | os.PathLike) -> tuple[list, list]:
    rows = json.loads(Path(pairs).read_text())
    images = [Image.open(Path(image_folder) / row["image"]).convert("RGB") for row in rows]
    return images, [row["caption"] for row in rows]


def _new_vae(config: DiffusionPretrainConfig) -> AutoencoderKL:
    levels = len(config.vae_channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        latent_channels=config.latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=config.image_size,
        mid_block_add_attention=False,
    )


def _new_unet(config: DiffusionPretrainConfig, latent_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=8,
        use_linear_projection=True,
        addition_embed_type="text",  # the pooled condition also joins the time embedding
        addition_embed_type_num_heads=4,
    )


def _train_vae(
    vae: AutoencoderKL, pixels: torch.Tensor, config: DiffusionPretrainConfig
) -> dict[str, float]:
    """Reconstruction MSE (+ a tiny KL) on random batches; the latent std for scaling."""

    def batch_loss() -> torch.Tensor:
        batch = pixels[torch.randint(0, len(pixels), (config.vae_batch_size,))]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        return F.mse_loss(recon, batch) + config.kl_weight * posterior.kl().mean()

    vae.train().requires_grad_(True)
    final_loss = fit(vae.parameters(), config.vae_steps, config.vae_learning_rate, batch_loss)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posterior = vae.encode(pixels[:512]).latent_dist
        recon_mse = F.mse_loss(vae.decode(posterior.mode()).sample, pixels[:512]).item()
        std = posterior.sample().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"vae_final_loss": final_loss, "vae_recon_mse": round(recon_mse, 5)}


def _train_unet(
    parts: DiffusionParts,
    pixels: torch.Tensor,
    captions: list[str],
    config: DiffusionPretrainConfig,
) -> dict[str, float]:
    """Epsilon (or v) prediction on the cached latents, conditioned on the captions' embeddings
    (the empty prompt with probability ``caption_dropout``), min-SNR weighted."""
    vae, unet, scheduler = parts.vae, parts.unet, parts.noise_scheduler
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        mean, std = posterior.mean, posterior.std
    texts = sorted(set(captions))
    table = caption_embeddings(parts, [*texts, ""])  # the last row: unconditional
    index = torch.tensor([texts.index(c) for c in captions])
    empty = len(texts)

    def batch_loss() -> torch.Tensor:
        rows = torch.randint(0, len(pixels), (config.unet_batch_size,))
        latents = (
            mean[rows] + std[rows] * torch.randn_like(mean[rows])
        ) * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),))
        dropped = torch.rand(len(rows)) < config.caption_dropout
        condition = table[torch.where(dropped, empty, index[rows])]
        noisy = scheduler.add_noise(latents, noise, steps)
        target = denoising_target(scheduler, latents, noise, steps)
        prediction = unet(noisy, steps, encoder_hidden_states=condition).sample
        loss = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        return (loss * min_snr_weight(scheduler, steps, config.min_snr_gamma)).mean()

    unet.train().requires_grad_(True)
    final_loss = fit(unet.parameters(), config.unet_steps, config.unet_learning_rate, batch_loss)
    unet.eval().requires_grad_(False)
    return {"unet_final_loss": final_loss}


def pretrain_diffusion(
    pairs: str | os.PathLike,
    image_folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: DiffusionPretrainConfig | None = None,
) -> dict[str, float]:
    """Build, pre-train and save the demo's text-to-image Stable Diffusion folder.

    Args:
        pairs: caption pairs, a JSON list of ``{"id", "image", "caption"}`` (the images to
            draw and the prompts that ask for them).
        image_folder: folder the image paths are relative to.
        out_dir: the ``StableDiffusionPipeline`` folder to write (``vae/``, ``unet/``,
            ``scheduler/``, ``text_encoder/``, ``tokenizer/``).
        config: sizes and schedules (defaults: :class:`DiffusionPretrainConfig`).

    Returns:
        ``seconds`` (VAE and UNet), the final losses, the VAE's reconstruction MSE (images in
        [-1, 1]) and its latent ``scaling_factor``. The global RNG is left untouched.
    """
    config = config or DiffusionPretrainConfig()
    out = Path(out_dir)
    write_tiny_stable_diffusion(out, config.cross_attention_dim, config.image_size, config.seed)
    parts = load_diffusion_parts(out)
    images, captions = _load_pairs(pairs, image_folder)
    pixels = image_tensor(parts, images)
    report: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        start = time.perf_counter()
        parts.vae = _new_vae(config)
        report.update(_train_vae(parts.vae, pixels, config))
        report["vae_seconds"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        latent_size = config.image_size // parts.vae_scale_factor
        parts.unet = _new_unet(config, latent_size)
        report.update(_train_unet(parts, pixels, captions, config))
        report["unet_seconds"] = round(time.perf_counter() - start, 2)
    parts.vae.save_pretrained(out / "vae")
    parts.unet.save_pretrained(out / "unet")
    (out / "demo_pretrain.json").write_text(json.dumps(asdict(config), indent=1))
    report["scaling_factor"] = round(parts.vae.config.scaling_factor, 4)
    return report


def closest_colour(image: Image.Image, colours: dict[str, tuple[int, int, int]]) -> str:
    """The name of the colour in ``colours`` nearest (RGB distance) to the image's mean colour.

    The mean is taken over saturated pixels (channel spread > 48: the shapes, not the grey
    background) when there are at least 8 of them, else over the whole image.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    saturated = pixels[pixels.max(axis=1) - pixels.min(axis=1) > 48]
    mean = (saturated if len(saturated) >= 8 else pixels).mean(axis=0)
    names = list(colours)
    distances = [np.linalg.norm(mean - np.asarray(colours[n], dtype=np.float32)) for n in names]
    return names[int(np.argmin(distances))]


@torch.no_grad()
def text_to_image_accuracy(
    parts: DiffusionParts,
    prompts: dict[str, str],
    colours: dict[str, tuple[int, int, int]],
    seeds: Sequence[int],
    steps: int = 20,
    guidance_scale: float = 7.5,
) -> float:
    """How often the diffusion model alone (caption embedding, empty-prompt negative) draws
    ``prompts[name]`` with colour ``name`` closest: the ceiling for what vokens can reach."""
    pipeline = make_pipeline(parts)
    pipeline.set_progress_bar_config(disable=True)
    negative = caption_embeddings(parts, [""])
    hits = []
    for name, prompt in prompts.items():
        condition = caption_embeddings(parts, [prompt])
        for seed in seeds:
            image = pipeline(
                prompt_embeds=condition,
                negative_prompt_embeds=negative,
                guidance_scale=guidance_scale,
                num_inference_steps=steps,
                height=parts.image_size,
                width=parts.image_size,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
            hits.append(closest_colour(image, colours) == name)
    return sum(hits) / len(hits)
