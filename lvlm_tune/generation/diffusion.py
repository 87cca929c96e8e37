"""The frozen Stable Diffusion side of MiniGPT-5: its parts, image targets, LDM loss and pipeline.

Owns: loading a diffusers ``StableDiffusionPipeline`` folder (or hub id) into frozen, eval-mode
parts (VAE, UNet, the DDPM noise scheduler used for training, CLIP text encoder and tokenizer);
turning PIL images into the VAE's [-1, 1] input; the latent-diffusion loss of a condition
``(B, 77, D)`` produced by the voken mapping module, with optional min-SNR-gamma weighting, whose
gradient reaches the condition through the frozen UNet; the caption embeddings that the caption
loss regresses onto; and an inference pipeline sharing the same modules, driven by
``prompt_embeds``. Nothing here trains: every diffusion parameter stays frozen.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_snr
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

SUBFOLDERS = ("vae", "unet", "scheduler", "text_encoder", "tokenizer")

INFERENCE_SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm_solver": DPMSolverMultistepScheduler,
}
"""Inference schedulers :func:`make_pipeline` can build from the training scheduler's config."""

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class DiffusionParts:
    """A frozen Stable Diffusion stack, as loaded by :func:`load_diffusion_parts`.

    Attributes:
        vae: the image autoencoder; encodes training images to latents.
        unet: the denoiser, conditioned on ``encoder_hidden_states`` of :attr:`cond_shape`.
        noise_scheduler: the DDPM scheduler of training (noise schedule, prediction type).
        text_encoder: the CLIP text encoder whose last hidden state conditions the UNet.
        tokenizer: its CLIP tokenizer (``model_max_length`` tokens, 77 for SD).
    """

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent cell covers per side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def cond_shape(self) -> tuple[int, int]:
        """``(tokens, dim)`` of one UNet condition, e.g. ``(77, 1024)`` for SD 2.1-base."""
        return self.tokenizer.model_max_length, self.unet.config.cross_attention_dim

    @property
    def image_size(self) -> int:
        """Side in pixels of the square images the UNet was trained on (512 for SD 2.1-base)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def to(self, device: torch.device | str) -> DiffusionParts:
        """Move the VAE, UNet and text encoder to ``device``; returns ``self``."""
        for module in (self.vae, self.unet, self.text_encoder):
            module.to(device)
        return self


def load_diffusion_parts(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> DiffusionParts:
    """Load the parts of a Stable Diffusion pipeline, every one frozen and in eval mode.

    Args:
        path: a local diffusers ``StableDiffusionPipeline`` folder (subfolders ``vae/``,
            ``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``) or, when no such path
            exists locally, a hub id such as ``stabilityai/stable-diffusion-2-1-base``.
        dtype: dtype of the VAE, UNet and text encoder weights.

    Returns:
        The parts; the training scheduler is a ``DDPMScheduler`` built from the folder's
        scheduler config (whatever class that config was saved for).

    Raises:
        FileNotFoundError: ``path`` exists but lacks one of the subfolders (named).
    """
    folder = Path(path)
    if folder.exists():
        missing = [name for name in SUBFOLDERS if not (folder / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{folder} is not a Stable Diffusion pipeline folder: missing subfolder(s) "
                f"{', '.join(missing)} (expected {', '.join(SUBFOLDERS)})"
            )
    source = str(path)
    parts = DiffusionParts(
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype),
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype),
        noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
    )
    for module in (parts.vae, parts.unet, parts.text_encoder):
        module.requires_grad_(False).eval()
    return parts


def image_tensor(parts: DiffusionParts, images: Sequence[Image.Image]) -> torch.Tensor:
    """Turn PIL images into the VAE's training input.

    Each image is converted to RGB, resized (bicubic) so its short side is ``parts.image_size``,
    centre-cropped to a square of that side and scaled to [-1, 1].

    Returns:
        A float32 tensor ``(B, 3, S, S)`` with ``S = parts.image_size``.
    """
    if not images:
        raise ValueError("image_tensor needs at least one image")
    size = parts.image_size
    arrays = []
    for image in images:
        image = image.convert("RGB")
        scale = size / min(image.size)
        width = max(size, round(image.width * scale))
        height = max(size, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        arrays.append(np.asarray(image, dtype=np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return pixels / 127.5 - 1.0


def ldm_loss(
    parts: DiffusionParts,
    images: torch.Tensor,
    condition: torch.Tensor,
    *,
    min_snr_gamma: float | None = 5.0,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The latent-diffusion loss of generating ``images`` from ``condition``.

    The frozen VAE encodes the images (no grad); each sample gets a random timestep and Gaussian
    noise; the frozen UNet, conditioned on ``condition``, predicts the noise (``epsilon``) or the
    velocity (``v_prediction``), as the training scheduler's ``prediction_type`` says. The UNet
    runs with autograd on, so the loss is differentiable in ``condition`` while no diffusion
    parameter receives a gradient.

    Args:
        parts: the frozen diffusion parts.
        images: ``(B, 3, S, S)`` in [-1, 1], as made by :func:`image_tensor`.
        condition: ``(B, tokens, D)`` UNet condition, ``D = parts.cond_shape[1]``; cast to the
            UNet's dtype, its device is where the loss is computed.
        min_snr_gamma: gamma of min-SNR weighting (Hang et al. 2023): per-sample weight
            ``min(snr, gamma) / snr`` for epsilon, ``min(snr, gamma) / (snr + 1)`` for v.
            ``None`` weighs every timestep equally.
        generator: makes latents, timesteps and noise reproducible.
        reduction: ``"mean"`` (a scalar) or ``"none"`` (one loss per sample, ``(B,)``).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; choose one of: mean, none")
    scheduler = parts.noise_scheduler
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unsupported prediction_type {prediction_type!r} in the noise scheduler config; "
            f"choose one of: {', '.join(PREDICTION_TYPES)}"
        )
    batch, dim = images.shape[0], parts.cond_shape[1]
    if condition.ndim != 3 or condition.shape[0] != batch or condition.shape[-1] != dim:
        raise ValueError(
            f"condition must be (B={batch}, tokens, D={dim}); got {tuple(condition.shape)}"
        )
    device, vae, unet = condition.device, parts.vae, parts.unet
    with torch.no_grad():
        latents = vae.encode(images.to(device, vae.dtype)).latent_dist.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((latents - shift) * vae.config.scaling_factor).to(unet.dtype)
    noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    timesteps = torch.randint(
        0,
        scheduler.config.num_train_timesteps,
        (batch,),
        generator=generator,
        device=generator.device if generator is not None else device,
    ).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = denoising_target(scheduler, latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=condition.to(unet.dtype)).sample
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        loss = loss * min_snr_weight(scheduler, timesteps, min_snr_gamma)
    return loss.mean() if reduction == "mean" else loss


def denoising_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict: the noise (``epsilon``) or the velocity (``v``)."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def min_snr_weight(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample min-SNR weights (Hang et al. 2023): ``min(snr, gamma) / snr`` for epsilon
    (written to stay finite at snr = 0), ``min(snr, gamma) / (snr + 1)`` for v."""
    snr = compute_snr(scheduler, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)
    return snr.clamp(max=gamma) / (snr + 1)


@torch.no_grad()
def caption_embeddings(parts: DiffusionParts, captions: Sequence[str]) -> torch.Tensor:
    """The frozen text encoder's condition for each caption, exactly as the SD pipeline makes it.

    Captions are padded / truncated to ``tokenizer.model_max_length`` tokens.

    Returns:
        ``(B, tokens, D)`` last hidden states (no grad), on the text encoder's device and dtype.
    """
    tokenizer, encoder = parts.tokenizer, parts.text_encoder
    batch = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = batch.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
    if mask is not None:
        mask = mask.to(encoder.device)
    return encoder(batch.input_ids.to(encoder.device), attention_mask=mask).last_hidden_state


def make_pipeline(parts: DiffusionParts, scheduler_name: str = "ddim") -> StableDiffusionPipeline:
    """An inference ``StableDiffusionPipeline`` sharing the modules of ``parts``.

    No safety checker or feature extractor. Call it with ``prompt_embeds`` and
    ``negative_prompt_embeds`` of shape ``(B, *parts.cond_shape)``, e.g.
    ``pipe(prompt_embeds=c, negative_prompt_embeds=u, guidance_scale=7.5,
    num_inference_steps=50, height=parts.image_size, width=parts.image_size)``.

    Args:
        parts: the loaded diffusion parts (not copied: moving the pipeline moves them).
        scheduler_name: a key of :data:`INFERENCE_SCHEDULERS`; the scheduler is built from the
            training scheduler's config, so it shares its noise schedule and prediction type.
    """
    if scheduler_name not in INFERENCE_SCHEDULERS:
        raise KeyError(
            f"unknown scheduler {scheduler_name!r}; choose one of: "
            f"{', '.join(INFERENCE_SCHEDULERS)}"
        )
    scheduler = INFERENCE_SCHEDULERS[scheduler_name].from_config(parts.noise_scheduler.config)
    return StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
