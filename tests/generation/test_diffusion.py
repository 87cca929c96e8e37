"""The frozen Stable Diffusion side of MiniGPT-5 on a tiny SD stack written offline."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from diffusers import DDPMScheduler

from lvlm_tune.generation.diffusion import (
    SUBFOLDERS,
    caption_embeddings,
    image_tensor,
    ldm_loss,
    load_diffusion_parts,
    make_pipeline,
)

DIM, SIZE = 32, 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is as fast, and far faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from lvlm_tune.testing.tiny_diffusion import write_tiny_stable_diffusion

    return write_tiny_stable_diffusion(tmp_path_factory.mktemp("sd"), cross_attention_dim=DIM)


@pytest.fixture(scope="module")
def parts(sd_dir):
    return load_diffusion_parts(sd_dir)


@pytest.fixture
def images(parts):
    colours = [(220, 30, 30), (30, 30, 220)]
    return image_tensor(parts, [Image.new("RGB", (48, 40), rgb) for rgb in colours])


def diffusion_params(parts):
    for module in (parts.vae, parts.unet, parts.text_encoder):
        yield from module.parameters()


def test_load_freezes_every_part(parts):
    assert parts.cond_shape == (77, DIM)
    assert parts.image_size == SIZE
    assert isinstance(parts.noise_scheduler, DDPMScheduler)
    assert parts.tokenizer.model_max_length == 77
    for module in (parts.vae, parts.unet, parts.text_encoder):
        assert not module.training
    assert not any(p.requires_grad for p in diffusion_params(parts))


def test_load_names_the_missing_subfolder(sd_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(FileNotFoundError, match=r"broken.*missing subfolder\(s\) unet \("):
        load_diffusion_parts(broken)
    assert "unet" in SUBFOLDERS


def test_training_scheduler_is_ddpm_whatever_the_folder_saved(sd_dir, tmp_path):
    from diffusers import PNDMScheduler  # what stable-diffusion-2-1-base ships

    folder = tmp_path / "pndm"
    shutil.copytree(sd_dir, folder)
    saved = PNDMScheduler.from_pretrained(sd_dir, subfolder="scheduler", skip_prk_steps=True)
    saved.save_pretrained(folder / "scheduler")
    scheduler = load_diffusion_parts(folder).noise_scheduler
    assert isinstance(scheduler, DDPMScheduler)
    assert torch.equal(scheduler.alphas_cumprod, saved.alphas_cumprod)


def test_image_tensor_shape_and_range(parts):
    # A left half black, right half white 64x32 image: the centre crop straddles the edge.
    image = Image.new("L", (64, 32), 0)
    image.paste(255, (32, 0, 64, 32))
    pixels = image_tensor(parts, [image, Image.new("RGBA", (20, 30), (255, 0, 0, 255))])
    assert pixels.shape == (2, 3, SIZE, SIZE) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels[0, :, :, 0].max() < -0.9 and pixels[0, :, :, -1].min() > 0.9
    assert torch.allclose(pixels[1, 0], torch.ones(SIZE, SIZE), atol=0.02)  # red stays red
    assert torch.allclose(pixels[1, 1:], -torch.ones(2, SIZE, SIZE), atol=0.02)


def condition_for(parts, batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *parts.cond_shape, generator=generator).requires_grad_(True)


def test_ldm_loss_gradient_reaches_condition_only(parts, images):
    condition = condition_for(parts, len(images))
    loss = ldm_loss(parts, images, condition, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert condition.grad is not None and condition.grad.abs().sum() > 0
    assert all(p.grad is None for p in diffusion_params(parts))


def test_ldm_loss_is_deterministic_with_a_generator(parts, images):
    condition = condition_for(parts, len(images))

    def loss(seed):
        generator = torch.Generator().manual_seed(seed)
        return ldm_loss(parts, images, condition, generator=generator, reduction="none")

    first = loss(1)
    assert first.shape == (len(images),)
    assert torch.equal(first, loss(1))
    assert not torch.equal(first, loss(2))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ldm_loss_prediction_types_and_min_snr(parts, images, prediction_type):
    # 10 training steps keep every SNR above gamma = 5: each sample's weight is below 1.
    scheduler = DDPMScheduler.from_config(
        parts.noise_scheduler.config, prediction_type=prediction_type, num_train_timesteps=10
    )
    typed = dataclasses.replace(parts, noise_scheduler=scheduler)
    condition = condition_for(parts, len(images))

    def loss(gamma):
        generator = torch.Generator().manual_seed(3)
        return ldm_loss(
            typed, images, condition, min_snr_gamma=gamma, generator=generator, reduction="none"
        )

    plain, weighted = loss(None), loss(5.0)
    assert torch.isfinite(plain).all() and torch.isfinite(weighted).all()
    assert (weighted < plain).all()
    weighted.sum().backward()
    assert condition.grad.abs().sum() > 0


def test_ldm_loss_rejects_bad_arguments(parts, images):
    with pytest.raises(ValueError, match="reduction"):
        ldm_loss(parts, images, condition_for(parts, 2), reduction="sum")
    with pytest.raises(ValueError, match="condition must be"):
        ldm_loss(parts, images, torch.zeros(2, 77, DIM + 1))


def test_caption_embeddings(parts):
    embeddings = caption_embeddings(parts, ["a red circle", "a blue square on the left " * 30])
    assert embeddings.shape == (2, *parts.cond_shape)
    assert not embeddings.requires_grad
    assert not torch.allclose(embeddings[0], embeddings[1])


def test_make_pipeline_generates_from_embeddings(parts):
    pipeline = make_pipeline(parts)
    pipeline.set_progress_bar_config(disable=True)
    condition = torch.randn(1, *parts.cond_shape, generator=torch.Generator().manual_seed(0))
    output = pipeline(
        prompt_embeds=condition,
        negative_prompt_embeds=torch.zeros_like(condition),
        guidance_scale=7.5,
        num_inference_steps=3,
        height=parts.image_size,
        width=parts.image_size,
        output_type="pil",
        generator=torch.Generator().manual_seed(0),
    )
    (image,) = output.images
    assert isinstance(image, Image.Image) and image.size == (SIZE, SIZE)
    assert pipeline.unet is parts.unet
    with pytest.raises(KeyError, match="ddim"):
        make_pipeline(parts, "nope")
