"""The MiniGPT-5 demo: its tiny text-to-image diffusion pre-training, the colour score, the stage-1
recipe, and a ``--quick`` run of the whole orchestration (plumbing, not accuracy)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from lvlm_tune.demo import minigpt5, shapes
from lvlm_tune.demo.pretrain_diffusion import (
    DiffusionPretrainConfig,
    closest_colour,
    pretrain_diffusion,
)
from lvlm_tune.generation.diffusion import (
    caption_embeddings,
    image_tensor,
    load_diffusion_parts,
    make_pipeline,
)
from lvlm_tune.training.recipe import parse_recipe

SCORED = {name: shapes.COLORS[name] for name in minigpt5.SCORED}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return minigpt5.make_generation_pairs(tmp_path_factory.mktemp("pairs"), n_images=24, seed=3)


def test_generation_pairs_are_one_shape_close_ups(pairs):
    rows = json.loads(pairs["captions_train"].read_text())
    assert len(rows) == 24
    for row in rows[:6]:
        colour, shape = row["caption"].removeprefix("a ").split()
        assert colour in shapes.COLORS and shape in shapes.SHAPES
        image = Image.open(pairs["root"] / row["image"])
        assert image.size == (32, 32)
        assert closest_colour(image, shapes.COLORS) == colour  # the shape fills the frame
    corpus = pairs["text_corpus"].read_text()
    assert "a red " in corpus or "a green " in corpus
    assert minigpt5.get_template(minigpt5.TEMPLATE).default_system in corpus


def test_closest_colour_reads_the_shape_not_the_background():
    for name, rgb in SCORED.items():
        image = Image.new("RGB", (32, 32), (222, 220, 225))
        ImageDraw.Draw(image).rectangle((20, 20, 27, 27), fill=rgb)  # 64 of 1024 pixels
        assert closest_colour(image, SCORED) == name
        assert closest_colour(Image.new("RGB", (8, 8), rgb), SCORED) == name


@pytest.mark.slow
def test_diffusion_pretraining_writes_a_trained_pipeline_folder(pairs, tmp_path):
    config = DiffusionPretrainConfig(vae_steps=3, unet_steps=3, vae_batch_size=4, unet_batch_size=4)
    state = torch.random.get_rng_state()
    report = pretrain_diffusion(pairs["captions_train"], pairs["root"], tmp_path / "sd", config)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    assert {"vae_seconds", "unet_seconds", "scaling_factor"} <= set(report)
    assert all(
        torch.isfinite(torch.tensor(report[k])) for k in ("vae_recon_mse", "unet_final_loss")
    )
    parts = load_diffusion_parts(tmp_path / "sd")  # the path users and training take
    assert parts.image_size == 32 and parts.vae_scale_factor == 4
    assert parts.cond_shape == (77, config.cross_attention_dim)
    assert parts.vae.config.scaling_factor == pytest.approx(report["scaling_factor"], rel=1e-3)
    assert not any(p.requires_grad for p in parts.unet.parameters())
    # latents as ldm_loss draws them have about unit variance: the noise schedule fits them
    rows = json.loads(pairs["captions_train"].read_text())
    pixels = image_tensor(parts, [Image.open(pairs["root"] / r["image"]) for r in rows])
    with torch.no_grad():
        latents = parts.vae.encode(pixels).latent_dist.sample() * parts.vae.config.scaling_factor
    assert 0.5 < latents.std().item() < 2.0
    # the condition reaches the UNet both by cross-attention and by the pooled time embedding
    assert parts.unet.config.addition_embed_type == "text"
    pipe = make_pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        prompt_embeds=caption_embeddings(parts, ["a red square"]),
        negative_prompt_embeds=caption_embeddings(parts, [""]),
        num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    assert image.size == (32, 32)


@pytest.mark.slow
def test_vae_pretraining_learns_to_reconstruct(pairs, tmp_path):
    losses = {}
    for steps in (1, 40):
        config = DiffusionPretrainConfig(vae_steps=steps, unet_steps=1, vae_batch_size=8,
                                         unet_batch_size=2)  # fmt: skip
        report = pretrain_diffusion(
            pairs["captions_train"], pairs["root"], tmp_path / f"sd{steps}", config
        )
        losses[steps] = report["vae_recon_mse"]
    assert losses[40] < 0.5 * losses[1]


def test_stage1_recipe_is_minigpt5_stage1():
    model_args, data_args, train_args = parse_recipe(minigpt5.RECIPES / "minigpt5_stage1.yaml")
    vokens = model_args.extensions["minigpt5"]  # MiniGPT-5's recipe keys
    assert model_args.stage == "vokens" and 0 < vokens.num_vokens <= 8
    assert vokens.caption_task == "generate" and data_args.template == minigpt5.TEMPLATE
    assert train_args.use_cpu and vokens.caption_loss_weight > 0


def hit_rate(out) -> float:
    """The share of generated images whose closest colour is the one asked for, recounted."""
    samples = json.loads((out / "generated.json").read_text())
    asked = [s["prompt"].removeprefix("a ").split()[0] for s in samples]
    return sum(s["closest"] == colour for s, colour in zip(samples, asked, strict=True)) / len(
        samples
    )


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    out, threads = tmp_path / "demo", torch.get_num_threads()
    try:
        assert minigpt5.main(["--out", str(out), "--quick", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(hit_rate(out))
    assert summary["chance"] == pytest.approx(1 / 3)
    assert set(summary["accuracy_by_colour"]) == set(minigpt5.SCORED)
    assert {"data", "base_llm", "base_diffusion", "stage1", "generate", "total"} <= set(
        summary["times_s"]
    )
    assert {"ldm_loss", "caption_loss"} <= set(summary["stage1_losses"])
    assert (out / "stage1" / "voken_mapper.safetensors").is_file()
    samples = json.loads((out / "generated.json").read_text())
    assert [s["prompt"] for s in samples] == [f"a {c} square" for c in minigpt5.SCORED]
    for sample in samples:  # drawn through the chat path and saved where it says
        assert Image.open(sample["image"]).size == (32, 32)
        assert sample["closest"] in minigpt5.SCORED


@pytest.mark.slow
def test_full_demo_steers_the_image_generator_far_above_chance(tmp_path):
    """``make demo-minigpt5`` (README: 24/24 images with the requested colour closest, red,
    green and blue 8/8 each; chance 1/3, which a model that ignores the prompt gets)."""
    out, threads = tmp_path / "demo", torch.get_num_threads()
    try:
        assert minigpt5.main(["--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(hit_rate(out))
    assert len(json.loads((out / "generated.json").read_text())) == 24
    assert summary["accuracy"] >= 0.75, summary  # 18 of 24
    for colour, rate in summary["accuracy_by_colour"].items():
        assert rate >= 0.5, (colour, summary["accuracy_by_colour"])
