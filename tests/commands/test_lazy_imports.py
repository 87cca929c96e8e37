"""``lvlm-tune inspect`` stays quick to start: its code path imports no training or model code.

Structural, not timed: run inspect on a tiny input in a fresh interpreter and list which heavy
modules ended up in ``sys.modules`` (``benchmarks/inspect_startup.py`` measures the time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = (
    "deepspeed",
    "peft",
    "trl",
    "diffusers",
    "datasets",
    "matplotlib",
    "accelerate",
    "transformers.trainer",
    "transformers.modeling_utils",
    "transformers.processing_utils",
    "lvlm_tune.training.recipe",
    "lvlm_tune.training.arguments",
    "lvlm_tune.models.llava",
    "lvlm_tune.training.trainer",
)

PROBE = """
import json, sys
from lvlm_tune.cli import main
code = main(sys.argv[1:])
heavy = json.loads({heavy!r})
print(json.dumps({{"code": code, "loaded": [m for m in heavy if m in sys.modules]}}))
"""


@pytest.mark.slow
def test_inspect_imports_no_model_or_training_code(tmp_path, sp_tokenizer_dir):
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "x.png")
    data = tmp_path / "data.json"
    rows = [
        {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "b", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]},
    ]  # fmt: skip
    data.write_text(json.dumps(rows))
    argv = ["inspect", "--data", str(data), "--tokenizer", str(sp_tokenizer_dir)]
    argv += ["--template", "vicuna_v1", "--image-folder", str(tmp_path), "--limit", "10", "--json"]
    env = {**os.environ, "LVLM_TUNE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=json.dumps(HEAVY)), *argv],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout  # two samples, then the probe's report
    report = json.loads(lines[-1])
    assert report["code"] == 0
    assert report["loaded"] == [], f"inspect imported {report['loaded']}"


def test_package_inits_import_nothing_heavy():
    probe = (
        "import sys, lvlm_tune, lvlm_tune.models, lvlm_tune.data, lvlm_tune.templates, "
        "lvlm_tune.generation, lvlm_tune.commands, lvlm_tune.training, lvlm_tune.cli\n"
        "print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
