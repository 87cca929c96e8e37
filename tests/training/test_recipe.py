"""Reading recipes (``parse_recipe`` on ``trl.TrlParser``) and the TRL model keys.

Parsing only: no model is built, so the recipes name parts that need not exist. What a user
sees of these errors on the command line (one line, status 2) is tests/commands/test_user_errors.py.
"""

from __future__ import annotations

import re
from dataclasses import fields
from enum import Enum
from pathlib import Path

import pytest
import trl
import yaml
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from lvlm_tune.errors import UserError
from lvlm_tune.training.model_config import not_supported_keys
from lvlm_tune.training.recipe import ModelArguments, parse_recipe, valid_keys
from lvlm_tune.training.recipe_file import load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("**/*.yaml"))
# trl.ModelConfig's fields that are recipe keys; every other one is refused by name
TAKEN_FROM_TRL = {
    "model_name_or_path", "dtype", "attn_implementation", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "use_dora", "use_rslora",
}  # fmt: skip


@pytest.fixture
def recipe(tmp_path):
    """Write a small recipe (plus ``extra`` keys) to a new file and return its path."""
    count = iter(range(1000))

    def write(**extra):
        path = tmp_path / f"r{next(count)}.yaml"
        values = {"vision_tower": "vision", "llm_name_or_path": "llm", "stage": "pretrain",
                  "output_dir": str(tmp_path / "out"), "report_to": "none", "use_cpu": True}  # fmt: skip
        path.write_text(yaml.safe_dump({**values, **extra}))
        return str(path)

    return write


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_parses_to_the_values_it_sets(path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their DeepSpeed configs relative to the repository
    args = parse_recipe(path, ["--use_cpu=true"])
    unset_hf_deepspeed_config()  # parsing a ZeRO-3 recipe switches transformers to ZeRO-3 init
    assert args[2].recipe_path == str(path)
    groups = [*args, *args[0].extensions.values()]  # the core's classes, then the extensions'
    for key, value in load_recipe(path).items():
        (got,) = [getattr(group, key) for group in groups if key in {f.name for f in fields(group)}]
        got = got.value if isinstance(got, Enum) else got
        if key == "report_to" and value == "none":
            value = []  # TrainingArguments' own spelling of "none"
        elif isinstance(got, float) and isinstance(value, str | int):
            value = float(value)  # YAML reads 2e-5 as a string
        assert got == value and type(got) is type(value), (key, got, value)
    assert args[0].dtype == ("bfloat16" if args[2].bf16 else "float32")


def test_every_trl_model_config_field_is_a_recipe_key_or_refused():
    trl_fields = {f.name for f in fields(trl.ModelConfig)}
    refused = not_supported_keys(ModelArguments)
    assert trl_fields - set(refused) == TAKEN_FROM_TRL  # a new TRL field fails here, not silently
    keys = set(valid_keys())
    assert keys >= TAKEN_FROM_TRL and not keys & set(refused)
    assert {"load_in_4bit", "load_in_8bit", "use_peft", "model_revision"} <= set(refused)


@pytest.mark.parametrize("key", sorted(not_supported_keys(ModelArguments)))
def test_trl_keys_lvlm_tune_cannot_honour_are_refused_by_name(recipe, key):
    path = recipe(**{key: "x"})
    with pytest.raises(
        UserError, match=rf"^{re.escape(path)}: {key} is not supported by lvlm-tune: "
    ):
        parse_recipe(path)
    with pytest.raises(UserError, match=rf"^command line: {key} is not supported by lvlm-tune: "):
        parse_recipe(recipe(), [f"--{key}", "true"])


def test_model_arguments_are_trl_model_config_with_our_defaults(recipe):
    model_args = parse_recipe(recipe())[0]
    assert isinstance(model_args, trl.ModelConfig)
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (128, 256, 0.05)
    assert model_args.attn_implementation == "sdpa" and not model_args.use_dora
    assert model_args.use_peft is False and trl.get_peft_config(model_args) is None
    lora = parse_recipe(recipe(stage="finetune_lora", lora_r=4, lora_target_modules="q_proj"))[0]
    # one module stays a list (ModelConfig.__post_init__ would make it the regex "q_proj")
    assert lora.use_peft is True and lora.lora_target_modules == ["q_proj"]
    config = trl.get_peft_config(lora)  # TRL's own helpers read the same fields
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 256, {"q_proj"})


def test_dtype_follows_bf16_and_must_agree_with_it(recipe):
    path = recipe()
    assert parse_recipe(path)[0].dtype == "float32"
    assert parse_recipe(path, ["--bf16", "true"])[0].dtype == "bfloat16"
    assert parse_recipe(path, ["--bf16", "--dtype", "bfloat16"])[0].dtype == "bfloat16"
    with pytest.raises(
        UserError, match=r"^command line: dtype bfloat16 with bf16: false; .*bf16: true"
    ):
        parse_recipe(path, ["--dtype", "bfloat16"])
    other = recipe(dtype="float32", bf16=True)
    with pytest.raises(UserError, match=rf"^{re.escape(other)}: dtype float32 with bf16: true"):
        parse_recipe(other)
    with pytest.raises(UserError, match=r"^dtype: 'float16' is not supported; choose one of"):
        parse_recipe(path, ["--dtype", "float16"])


def test_command_line_text_is_typed_by_argparse(recipe):
    path = recipe(stage="finetune_lora", learning_rate=1e-3, use_rslora=True)
    argv = ["--save_strategy", "no", "--use_dora", "--learning-rate", "3e-4", "--use_rslora",
            "false", "--projector_lr=none", "--max_steps=5", "--report_to", "none"]  # fmt: skip
    model_args, _, train_args = parse_recipe(path, argv)
    assert train_args.save_strategy == "no" and train_args.learning_rate == 3e-4
    assert model_args.use_dora is True and model_args.use_rslora is False
    assert train_args.projector_lr is None and train_args.max_steps == 5
    with pytest.raises(UserError, match=r"^learning_rate: must be >= 0, got -0.0003"):
        parse_recipe(path, ["--learning_rate", "-3e-4"])  # a negative number is a value
    for override, needle in (
        (["--lora_r", "x"], "command line: --lora_r: invalid int value: 'x'"),
        (["--max_steps", "1.5"], "command line: --max_steps: invalid int value: '1.5'"),
        (["--bf16", "maybe"], "command line: --bf16: Truthy value expected: got maybe"),
        (["--lr_scheduler_type", "nope"], "command line: --lr_scheduler_type: invalid choice"),
    ):
        with pytest.raises(UserError, match=f"^{re.escape(needle)}"):
            parse_recipe(path, override)


def test_file_values_are_coerced_to_their_fields_types(recipe):
    path = recipe(stage="finetune_lora", learning_rate="2e-5", lora_r="4", use_dora="true",
                  projector_lr="", weight_decay=0, lora_target_modules="q_proj, v_proj")  # fmt: skip
    model_args, _, train_args = parse_recipe(path)
    assert train_args.learning_rate == 2e-5 and isinstance(train_args.weight_decay, float)
    assert model_args.lora_r == 4 and model_args.use_dora is True
    assert train_args.projector_lr is None  # "" means unset
    assert model_args.lora_target_modules == ["q_proj", "v_proj"]
    # the command line wins over the file, for lists as for text
    model_args, _, train_args = parse_recipe(
        path, ["--lora_target_modules", "o_proj", "--lora_r=8"]
    )
    assert model_args.lora_target_modules == ["o_proj"] and model_args.lora_r == 8
    for value, needle in (
        ("four", "lora_r: expected int, got 'four'"),
        ("", "lora_r: expected int, got ''"),
    ):
        with pytest.raises(UserError, match=f"^{re.escape(needle)}"):
            parse_recipe(recipe(stage="finetune_lora", lora_r=value))


def test_lora_range_checks_name_the_key(recipe):
    for key, value in (("lora_r", 0), ("lora_alpha", 0), ("lora_dropout", 1.5)):
        with pytest.raises(UserError, match=rf"^{key}: must be"):
            parse_recipe(recipe(stage="finetune_lora", **{key: value}))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("q_proj,v_proj", ["q_proj", "v_proj"]),
        ("q_proj", ["q_proj"]),
        (" q_proj , v_proj ", ["q_proj", "v_proj"]),
        ("[q_proj, v_proj]", ["q_proj", "v_proj"]),
    ],
)
def test_list_options_on_the_command_line(recipe, given, expected):
    path = recipe(stage="finetune_lora")
    model_args = parse_recipe(path, ["--lora_target_modules", given])[0]
    assert model_args.lora_target_modules == expected
    model_args = parse_recipe(path, [f"--lora_target_modules={given}"])[0]
    assert model_args.lora_target_modules == expected
