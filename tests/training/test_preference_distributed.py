"""2-process DeepSpeed DPO runs on CPU (gloo): ZeRO-3 with full weights (the reference a
partitioned frozen copy) and ZeRO-2 with LoRA (the adapter-disabled reference); every step one
rank trains an image pair and the other a text-only pair."""

from __future__ import annotations

import json

import pytest
from dist_launch import finish, module, start, torchrun, write_recipe
from preference_pairs import write_pairs

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def mixed_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed_pairs")
    data = write_pairs(root)
    pairs = json.loads((root / "pairs.json").read_text())
    (root / "two.json").write_text(json.dumps([pairs[0], pairs[3]]))  # image, text-only
    return {**data, "data_path": str(root / "two.json")}


@pytest.mark.parametrize(("zero", "stage"), [(3, "dpo"), (2, "dpo_lora")])
def test_two_process_dpo(zero, stage, tiny_parts, mixed_pairs, tmp_path):
    recipe = write_recipe(
        tmp_path, tiny_parts, mixed_pairs, stage=stage, max_steps=3,
        per_device_train_batch_size=1, learning_rate=1e-3, deepspeed=f"ds_configs/zero{zero}.json",
        save_strategy="steps", save_steps=3,
    )  # fmt: skip
    finish([start(torchrun(module(recipe)), tmp_path)], tmp_path)
    out = tmp_path / "out"
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert len(logs) == 3
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # reference == policy
    assert logs[-1]["rewards/margins"] != pytest.approx(0.0, abs=1e-6)  # the policy moved
    weights = "model.safetensors" if stage == "dpo" else "adapter_model.safetensors"
    assert (out / weights).is_file()
    card = json.loads((out / "lvlm_tune.json").read_text())
    assert card["stage"] == stage and card["preference"]["loss_type"] == "sigmoid"
