"""Tiny end-to-end training runs on CPU: exact trainable sets, trained params change and frozen
params stay bit-identical, the stage-1 -> stage-2 chain, saves, resume, recipes."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from conftest import MINIGPT4_QUERIES, StopAt, parse, tiny_recipe, train_and_compare
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from lvlm_tune.errors import UserError
from lvlm_tune.models.parts import canonical_name, is_under
from lvlm_tune.training.pipeline import build_model, run
from lvlm_tune.training.recipe import parse_recipe

PROJECTOR = ("model.multi_modal_projector",)
LANGUAGE = ("model.language_model", "lm_head")
VISION = ("model.vision_tower",)


def test_pretrain_trains_only_the_projector_and_writes_a_self_describing_folder(
    tmp_path, tiny_parts, tiny_data
):
    out = tmp_path / "stage1"
    trainer, trainable = train_and_compare(
        tmp_path, tiny_recipe(tiny_parts, tiny_data, out, stage="pretrain")
    )
    assert trainable and all(is_under(n, PROJECTOR) for n in trainable)
    assert "model.multi_modal_projector.linear_1.weight" in trainable
    files = set(os.listdir(out))
    assert {
        "projector.safetensors",
        "lvlm_tune.json",
        "config.json",
        "model.safetensors",
        "loss_curve.png",
    } <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    # the tiny LLaMA tokenizer is legacy, as LLaVA's are: every saved folder must say so
    assert json.loads((out / "tokenizer_config.json").read_text())["legacy"] is True
    card = json.loads((out / "lvlm_tune.json").read_text())
    assert (
        card["family"] == "llava"
        and card["stage"] == "pretrain"
        and card["template"] == "vicuna_v1"
    )
    assert card["recipe"].endswith("recipe.yaml") and card["num_image_tokens"] == 16
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_finetune_trains_projector_and_llm_not_the_vision_tower(tmp_path, tiny_parts, tiny_data):
    _, trainable = train_and_compare(
        tmp_path, tiny_recipe(tiny_parts, tiny_data, tmp_path / "ft", stage="finetune")
    )
    assert all(is_under(n, PROJECTOR + LANGUAGE) for n in trainable)
    assert any(is_under(n, LANGUAGE) for n in trainable) and any(
        is_under(n, PROJECTOR) for n in trainable
    )


@pytest.mark.slow
def test_stage1_to_lora_stage2_chain(tmp_path, tiny_parts, tiny_data):
    stage1 = tmp_path / "stage1"
    run(*parse(tiny_recipe(tiny_parts, tiny_data, stage1, stage="pretrain"), tmp_path, "s1.yaml"))
    from safetensors.torch import load_file

    saved = load_file(stage1 / "projector.safetensors")
    recipe = tiny_recipe(
        tiny_parts,
        tiny_data,
        tmp_path / "stage2",
        stage="finetune_lora",
        pretrained_projector=str(stage1),
        projector_lr=1e-3,
    )
    model = build_model(*parse(recipe, tmp_path))[0]
    projector = {
        canonical_name(n): p for n, p in model.named_parameters() if "modules_to_save" in n
    }
    for key, value in saved.items():
        assert torch.equal(projector[f"model.multi_modal_projector.{key}"], value)
    trainer, trainable = train_and_compare(tmp_path, recipe)
    for name in trainable:
        assert "lora_" in name or "modules_to_save" in name, name
        assert not is_under(canonical_name(name), VISION)
    groups = trainer.optimizer.param_groups
    assert {g["initial_lr"] for g in groups} == {1e-2, 1e-3}
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim < 2 for p in g["params"]))
    files = set(os.listdir(tmp_path / "stage2"))
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "lvlm_tune.json",
        "processor_config.json",
    } <= files


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path, tiny_parts, tiny_data):
    common = {
        "stage": "finetune_lora",
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 3,
        "group_by_modality_length": True,
        "per_device_train_batch_size": 2,
        "lr_scheduler_type": "cosine",
    }
    full = run(
        *parse(tiny_recipe(tiny_parts, tiny_data, tmp_path / "full", **common), tmp_path, "a.yaml")
    )
    reference = [h["loss"] for h in full.state.log_history if "loss" in h]
    out = tmp_path / "cut"
    run(
        *parse(tiny_recipe(tiny_parts, tiny_data, out, **common), tmp_path, "b.yaml"),
        callbacks=[StopAt(3)],
    )
    assert (out / "checkpoint-3" / "lvlm_tune.json").exists()
    resumed = run(
        *parse(
            tiny_recipe(tiny_parts, tiny_data, out, resume_from_checkpoint=True, **common),
            tmp_path,
            "c.yaml",
        )
    )
    losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert len(reference) == 6 and losses[-3:] == pytest.approx(reference[-3:], rel=1e-5)


def test_every_recipe_parses_and_builds_with_tiny_stand_ins(
    tmp_path, tiny_parts, tiny_data, tiny_blip2, tiny_sd
):
    from glob import glob

    recipes = sorted(
        glob(
            os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "**", "*.yaml"),
            recursive=True,
        )
    )
    assert recipes
    for path in recipes:
        # real hub ids: parsed and validated, not downloaded (use_cpu: bf16 needs it on CPU)
        model_args, data_args, train_args = parse_recipe(path, ["--use_cpu=true"])
        assert train_args.output_dir and data_args.template
        unset_hf_deepspeed_config()  # parsing a ZeRO-3 recipe switches transformers to ZeRO-3 init
        minigpt4 = model_args.family == "minigpt4"
        stand_in = {
            "vision_tower": tiny_blip2 if minigpt4 else tiny_parts["vision"],
            **({"num_query_tokens": MINIGPT4_QUERIES} if minigpt4 else {}),
            **(
                {
                    "diffusion_model": tiny_sd,
                    "pretrained_vokens": "",
                    "mapper_hidden_size": 32,
                    "mapper_layers": 1,
                    "mapper_heads": 4,
                }
                if model_args.extensions["minigpt5"].num_vokens
                else {}
            ),
            "llm_name_or_path": tiny_parts["llm"],
            "model_name_or_path": "",
            "data_path": tiny_data["data_path"],
            "image_folder": tiny_data["image_folder"],
            "output_dir": str(tmp_path / "x"),
            "deepspeed": "",
            "bf16": False,
            "use_cpu": True,
            "pretrained_projector": "",
        }
        overrides = [f"--{k}={v}" for k, v in stand_in.items()]
        args = parse_recipe(path, overrides)
        model = build_model(*args)[0]
        trainable = [canonical_name(n) for n, p in model.named_parameters() if p.requires_grad]
        assert trainable, path
        if model_args.extensions["minigpt5"].num_vokens:
            assert all(
                "trainable_tokens" in n or "lora_" in n or n.startswith("mapper.")
                for n in trainable
            )
        elif minigpt4:
            assert set(trainable) == {"language_projection.weight", "language_projection.bias"}


def test_unknown_recipe_key_names_the_closest(tmp_path, tiny_parts, tiny_data):
    with pytest.raises(UserError, match="unknown key 'learning_rat'; did you mean 'learning_rate'"):
        parse(tiny_recipe(tiny_parts, tiny_data, tmp_path, learning_rat=1), tmp_path)
    with pytest.raises(ValueError, match="stage: unknown 'stage3'"):
        parse(tiny_recipe(tiny_parts, tiny_data, tmp_path, stage="stage3"), tmp_path)


@pytest.mark.parametrize(
    "launcher",
    [
        ["{bin}/lvlm-tune", "train"],
        ["{bin}/python", "-m", "lvlm_tune.train"],
        [
            "{bin}/accelerate",
            "launch",
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "lvlm_tune.train",
        ],
    ],
    ids=["lvlm-tune", "python-m", "accelerate"],
)
@pytest.mark.slow
def test_launchers(tmp_path, tiny_parts, tiny_data, launcher):
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            tiny_recipe(tiny_parts, tiny_data, tmp_path / "out", stage="pretrain", max_steps=1)
        )
    )
    bin_dir = os.path.dirname(sys.executable)
    cmd = [part.format(bin=bin_dir) for part in launcher] + [str(recipe), "--learning_rate", "1e-4"]
    env = {**os.environ, "LVLM_TUNE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    args = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert args["learning_rate"] == 1e-4
    assert (tmp_path / "out" / "projector.safetensors").exists()


def test_text_only_batch_still_runs_the_vision_path(tmp_path, tiny_parts, tiny_data):
    from lvlm_tune.data.collator import MultimodalCollator
    from lvlm_tune.training.pipeline import build_dataset
    from lvlm_tune.training.trainer import LvlmTrainer

    args = parse(tiny_recipe(tiny_parts, tiny_data, tmp_path / "t", stage="finetune"), tmp_path)
    model, processor, family = build_model(*args)
    dataset = build_dataset(args[1], processor, family.num_image_tokens(model), seed=0)
    text_only = [dataset[i] for i in range(len(dataset)) if dataset[i]["pixel_values"] is None][:2]
    batch = MultimodalCollator(0)(text_only)
    assert "pixel_values" not in batch
    trainer = LvlmTrainer(
        model=model,
        args=args[2],
        family=family,
        run_card=None,
        blank_pixel_values=dataset.images.blank(),
    )
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    for name, param in model.named_parameters():
        if is_under(name, PROJECTOR + VISION) and param.requires_grad:
            assert param.grad is not None and not param.grad.any(), name  # touched, zero effect


def test_saved_processor_chat_template_renders_the_training_prompt(tmp_path, tiny_parts, tiny_data):
    from transformers import AutoProcessor

    from lvlm_tune.data.record import Turn
    from lvlm_tune.templates import get_template, render

    out = tmp_path / "s1"
    run(
        *parse(
            tiny_recipe(
                tiny_parts, tiny_data, out, stage="pretrain", max_steps=1, template="llava_v0"
            ),
            tmp_path,
        )
    )
    processor = AutoProcessor.from_pretrained(out)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    turns = [Turn("user", "<image>\nWhat color?")]
    assert prompt == render(get_template("llava_v0"), turns, add_generation_prompt=True).text
