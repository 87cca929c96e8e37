"""MiniGPT-5 generative vokens on tiny parts and a tiny diffusers Stable Diffusion folder: voken
rows train alone (original rows bit-identical under weight decay), exact trainable sets per
stage, every loss term contributes, the CFG drop rate, interleaved generation, checkpoints,
merge and chat, on LLaVA and MiniGPT-4 backbones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import MINIGPT4_QUERIES, StopAt, parse, tiny_recipe, train_and_compare
from transformers import AutoModelForCausalLM, set_seed

from lvlm_tune.generation.vokens import voken_ids
from lvlm_tune.training.pipeline import build_dataset, build_model, run
from lvlm_tune.training.recipe import parse_recipe

VOKENS = 4
MAPPER = {"mapper_hidden_size": 32, "mapper_layers": 1, "mapper_heads": 4}


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return tiny_sd


def voken_recipe(parts, data, out, sd, **overrides):
    defaults = {
        "num_vokens": VOKENS, "diffusion_model": sd, "stage": "vokens", "caption_task": "generate",
        "weight_decay": 0.5, **MAPPER,
    }  # fmt: skip
    return tiny_recipe(parts, data, out, **{**defaults, **overrides})


@pytest.fixture(scope="module")
def stages(tiny_parts, tiny_captions, sd, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("minigpt5")
    first, trainable1 = train_and_compare(
        tmp, voken_recipe(tiny_parts, tiny_captions, tmp / "s1", sd, max_steps=3), "s1"
    )
    stage2 = voken_recipe(
        tiny_parts, tiny_captions, tmp / "s2", sd, stage="vokens_lora", max_steps=2,
        lora_r=8, lora_alpha=16, lora_target_modules=["q_proj", "v_proj"],
        pretrained_vokens=str(tmp / "s1"),
    )  # fmt: skip
    second, trainable2 = train_and_compare(tmp, stage2, "s2")
    return {"tmp": tmp, "s1": tmp / "s1", "s2": tmp / "s2", "trainers": (first, second),
            "trainable": (trainable1, trainable2), "recipe1": tmp / "s1.yaml"}  # fmt: skip


def test_stage1_trains_only_voken_rows_and_the_mapper(stages):
    trainable = stages["trainable"][0]
    rows = {n for n in trainable if "trainable_tokens_delta" in n}
    assert len(rows) == 2 and any("embed_tokens" in n for n in rows)
    assert any("lm_head" in n for n in rows)
    assert trainable - rows == {n for n in trainable if n.startswith("mapper.")}
    assert any(n.startswith("mapper.") for n in trainable)
    history = stages["trainers"][0].state.log_history
    logged = [h for h in history if "ldm_loss" in h]
    assert logged and all(
        torch.isfinite(torch.tensor(h[k])) for h in logged for k in ("text_loss", "ldm_loss")
    )


def test_stage2_adds_lora_on_q_and_v_only(stages):
    trainable = stages["trainable"][1]
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(".q_proj." in n or ".v_proj." in n for n in lora)
    assert all("language_model" in n for n in lora)
    rest = trainable - lora
    assert {n for n in rest if "trainable_tokens_delta" in n} and all(
        "trainable_tokens_delta" in n or n.startswith("mapper.") for n in rest
    )


def test_original_rows_bit_identical_after_weight_decay(stages, tiny_parts, tmp_path):
    from lvlm_tune.inference.export import merge

    merged = merge(stages["s1"], tmp_path / "merged")
    from lvlm_tune.inference.load import load_run

    model = load_run(merged).model
    original = AutoModelForCausalLM.from_pretrained(tiny_parts["llm"])
    size = original.get_input_embeddings().num_embeddings
    for mine, theirs in (
        (model.get_input_embeddings().weight, original.get_input_embeddings().weight),
        (model.get_output_embeddings().weight, original.get_output_embeddings().weight),
    ):
        assert torch.equal(mine[:size], theirs)
    tokenizer = load_run(merged).processor.tokenizer
    ids = voken_ids(tokenizer, VOKENS)
    mean = original.get_input_embeddings().weight.mean(0)
    assert not torch.allclose(model.get_input_embeddings().weight[ids[0]], mean)  # trained


def test_checkpoints_hold_adapter_rows_and_mapper(stages):
    for stage in ("s1", "s2"):
        files = set(os.listdir(stages[stage]))
        assert {
            "adapter_model.safetensors",
            "voken_mapper.safetensors",
            "voken_mapper.json",
        } <= files
        assert "model.safetensors" not in files  # the frozen base is not copied
        card = json.loads((stages[stage] / "lvlm_tune.json").read_text())
        assert card["model_args"]["num_vokens"] == VOKENS
        # the voken save path keeps the tiny LLaMA tokenizer's `legacy` too
        assert json.loads((stages[stage] / "tokenizer_config.json").read_text())["legacy"] is True


@pytest.fixture(scope="module")
def voken_model(stages):
    args = parse_recipe(stages["recipe1"])
    set_seed(0)
    model, processor, family = build_model(*args)
    from lvlm_tune.training.extensions import data_hooks

    hooks = data_hooks(args[0].extensions, model)  # the vokens and the targets' image size
    dataset = build_dataset(args[1], processor, family.num_image_tokens(model), seed=0, hooks=hooks)
    from lvlm_tune.data.collator import MultimodalCollator

    batch = MultimodalCollator(0)([dataset[i] for i in range(4)])
    return model, processor, batch


def mapper_and_row_grads(model, batch, seed=0):
    model.zero_grad(set_to_none=True)
    model.train()
    model.cfg_drop = 0.0
    torch.manual_seed(seed)  # same timesteps and noise in every call
    out = model(**batch)
    for name in ("text_loss", "ldm_loss", "caption_loss"):
        assert torch.isfinite(out[name]) and out[name] > 0, name
    out.loss.backward()
    mapper = torch.cat([p.grad.flatten() for p in model.mapper.parameters()])
    rows = torch.cat(
        [p.grad.flatten() for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    )
    return mapper, rows


def test_each_loss_term_contributes(voken_model):
    from dataclasses import replace

    model, _, batch = voken_model
    assert "gen_pixel_values" in batch and all(batch["gen_captions"])
    weights = model.weights
    mapper, rows = mapper_and_row_grads(model, batch)
    for term in ("ldm", "caption", "text"):
        model.weights = replace(weights, **{term: 0.0})
        mapper0, rows0 = mapper_and_row_grads(model, batch)
        changed = mapper0 if term != "text" else rows0
        reference = mapper if term != "text" else rows
        # the text CE reaches the voken rows, not the mapper (it does not pass through it)
        assert not torch.allclose(changed, reference), term
    model.weights = weights


def test_cfg_drop_rate_and_null_condition(voken_model):
    model, _, _ = voken_model
    model.train()
    model.cfg_drop = 0.1
    torch.manual_seed(0)
    rate = model.drop_mask(20000).float().mean().item()
    assert abs(rate - 0.1) < 0.01
    model.eval()
    assert model.drop_mask(10) is None
    states = torch.randn(3, VOKENS, model.mapper.config.llm_hidden_size)
    dropped = model.condition(states, torch.tensor([True, False, True]))
    null = model.mapper.null_condition(1)[0]
    assert torch.allclose(dropped[0], null) and torch.allclose(dropped[2], null)
    assert not torch.allclose(dropped[1], null)


def test_forced_generation_returns_text_and_an_image_with_the_zero_negative(stages, tmp_path):
    from lvlm_tune.inference.chat import ChatSession
    from lvlm_tune.inference.load import load_run

    session = ChatSession(
        load_run(stages["s2"]), force_image=True, image_dir=str(tmp_path / "img"), steps=2
    )
    generator = session.generator
    seen = {}
    pipeline = generator.pipeline

    def spy(**kwargs):
        seen.update(kwargs)
        return pipeline(**kwargs)

    generator.pipeline = spy
    answer = session.ask("a plain red picture", max_new_tokens=4)
    assert "[image: " in answer
    saved = sorted((tmp_path / "img").iterdir())
    assert len(saved) == 1
    from PIL import Image

    size = generator.diffusion.image_size
    assert Image.open(saved[0]).size == (size, size)
    with torch.no_grad():
        null = generator.mapper.null_condition(1)
    assert torch.equal(seen["negative_prompt_embeds"], null)
    assert seen["guidance_scale"] == 7.5
    assert session.turns[-1].content.endswith("<gen_image>")


@pytest.mark.slow
def test_merged_minigpt5_folder_chats_like_the_adapter(stages, tmp_path):
    from lvlm_tune.inference.chat import ChatSession
    from lvlm_tune.inference.export import merge
    from lvlm_tune.inference.load import load_run

    merged = merge(stages["s2"], tmp_path / "merged")
    assert (merged / "voken_mapper.safetensors").exists()
    answers = []
    for folder in (stages["s2"], merged):
        session = ChatSession(
            load_run(folder), force_image=True, image_dir=str(tmp_path / folder.name), steps=2
        )
        torch.manual_seed(0)
        answers.append(session.ask("a plain red picture", max_new_tokens=4).split(" [image:")[0])
    assert answers[0] == answers[1]


@pytest.mark.slow
def test_minigpt4_backbone_trains_vokens(tiny_parts, tiny_blip2, tiny_captions, sd, tmp_path):
    recipe = voken_recipe(
        tiny_parts, tiny_captions, tmp_path / "m4", sd, family="minigpt4",
        vision_tower=tiny_blip2, num_query_tokens=MINIGPT4_QUERIES, template="minigpt4",
        max_steps=1,
    )  # fmt: skip
    trainer, trainable = train_and_compare(tmp_path, recipe, "m4")
    assert trainable and all(
        "trainable_tokens_delta" in n or n.startswith("mapper.") for n in trainable
    )
    assert (Path(trainer.args.output_dir) / "voken_mapper.safetensors").exists()


def test_new_rows_start_at_the_mean_of_the_original_rows(voken_model, tiny_parts):
    model, processor, _ = voken_model
    original = AutoModelForCausalLM.from_pretrained(tiny_parts["llm"])
    ids = voken_ids(processor.tokenizer, VOKENS)
    base = model.lvlm.get_base_model()
    for layer, source in (
        (base.get_input_embeddings(), original.get_input_embeddings().weight),
        (base.get_output_embeddings(), original.get_output_embeddings().weight),
    ):
        adapter = getattr(layer, "token_adapter", layer)  # wrapper or the layer itself
        rows = adapter.trainable_tokens_delta["default"]
        assert rows.shape == (VOKENS, source.shape[1])
        assert torch.allclose(rows, source.mean(0).expand_as(rows), atol=1e-6)
        assert adapter.token_indices["default"] == ids


@pytest.mark.slow
def test_resume_restores_rows_mapper_and_the_loss_sequence(tiny_parts, tiny_captions, sd, tmp_path):
    common = {
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "per_device_train_batch_size": 2,
    }
    full = run(
        *parse(
            voken_recipe(tiny_parts, tiny_captions, tmp_path / "full", sd, **common),
            tmp_path,
            "a.yaml",
        )
    )
    reference = [h["loss"] for h in full.state.log_history if "loss" in h]
    out = tmp_path / "cut"
    run(
        *parse(voken_recipe(tiny_parts, tiny_captions, out, sd, **common), tmp_path, "b.yaml"),
        callbacks=[StopAt(2)],
    )
    assert {"adapter_model.safetensors", "voken_mapper.safetensors"} <= set(
        os.listdir(out / "checkpoint-2")
    )
    resumed = run(
        *parse(
            voken_recipe(tiny_parts, tiny_captions, out, sd, resume_from_checkpoint=True, **common),
            tmp_path,
            "c.yaml",
        )
    )
    losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert len(reference) == 4 and losses[-2:] == pytest.approx(reference[-2:], rel=1e-5)
