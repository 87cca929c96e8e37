"""``lvlm-tune train --help`` lists every recipe key with its type, default and help."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from lvlm_tune.cli import main as cli
from lvlm_tune.commands.train import main as train_main
from lvlm_tune.training.model_config import not_supported_keys
from lvlm_tune.training.recipe import ModelArguments, valid_keys
from lvlm_tune.training.recipe_help import recipe_help

GROUPS = [
    "Model (ModelArguments; model and LoRA keys from trl.ModelConfig):",
    "Data (DataArguments):",
    "Training (LvlmTrainingArguments):",
    "Trainer options (transformers.TrainingArguments):",
]


def _entries(text: str) -> dict[str, tuple[str, str]]:
    """key -> (the ``(type, default: X)`` line's inside, the help under it)."""
    entries, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        match = re.fullmatch(r"  (\w+) \((.+)\)", line)
        if match:
            below = []
            for follow in lines[i + 1 :]:
                if not follow.startswith("      "):
                    break
                below.append(follow.strip())
            entries[match.group(1)] = (match.group(2), " ".join(below))
    return entries


def test_help_lists_every_recipe_key_with_type_default_and_help(capsys):
    assert cli(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: lvlm-tune train RECIPE.yaml [--key value ...]")
    entries = _entries(text)
    assert sorted(entries) == sorted(valid_keys())  # every key once, nothing else
    assert entries["lora_r"] == (
        "int, default: 128",
        "LoRA rank (finetune_lora, dpo_lora, vokens_lora)",
    )
    assert entries["lora_target_modules"][0] == "list[str], default: unset"
    assert entries["template"][0] == "str, default: vicuna_v1"
    assert entries["output_dir"][0] == "str, default: runs/default"
    assert entries["loss_curve"][0] == "bool, default: true"
    assert entries["save_strategy"][0] == "str, default: steps"  # an Enum's value
    assert "learning rate" in entries["learning_rate"][1].lower()
    assert all(helptext for _, helptext in entries.values())
    # grouped by class: lvlm-tune's keys first, the hundred Trainer options last
    starts = [text.index(title) for title in GROUPS]
    assert starts == sorted(starts)
    assert starts[0] < text.index("  lora_r (") < starts[1] < text.index("  template (")
    assert starts[2] < text.index("  projector_lr (") < starts[3] < text.index("  learning_rate (")
    refused = text[text.index("Not taken") :]
    assert all(key in refused for key in not_supported_keys(ModelArguments))


def test_help_anywhere_on_the_line_and_the_bare_usage(capsys):
    assert train_main(["recipe.yaml", "--lora_r", "4", "-h"]) == 0  # no recipe is read
    assert capsys.readouterr().out.strip() == recipe_help().strip()
    assert train_main([]) == 0
    assert "--help lists every recipe key" in capsys.readouterr().out


def test_help_wraps_to_the_width():
    helps = [line for line in recipe_help(width=70).splitlines() if line.startswith("      ")]
    assert len(helps) > 200
    # a word longer than the width (a URL) may stand alone on its line
    assert all(len(line) <= 70 or " " not in line.strip() for line in helps)
    assert max(map(len, helps)) > 60  # the text fills the width, not a narrower one


@pytest.mark.slow
def test_python_m_lvlm_tune_train_help():
    done = subprocess.run(
        [sys.executable, "-m", "lvlm_tune.train", "--help"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "100"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(_entries(done.stdout)) == sorted(valid_keys())
