"""``pipeline.run`` for the DPO stages on a preference JSON: a LoRA run end to end (frozen
bit-identical, trainable changed, rewards logged, run card), and resume reproducing it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import StopAt, parse, tiny_recipe, train_and_compare
from preference_pairs import write_pairs

from lvlm_tune.training.pipeline import run
from lvlm_tune.training.run_card import RunCard


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.mark.slow
def test_dpo_lora_run_end_to_end(tmp_path, tiny_parts, pairs):
    recipe = tiny_recipe(tiny_parts, pairs, tmp_path / "out", stage="dpo_lora", max_steps=3,
                         per_device_train_batch_size=2, learning_rate=1e-3, beta=0.2)  # fmt: skip
    trainer, trainable = train_and_compare(tmp_path, recipe)
    assert any("lora_" in n for n in trainable)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all("rewards/accuracies" in h for h in logs)
    card = RunCard.read(tmp_path / "out")
    assert card.stage == "dpo_lora" and card.preference["beta"] == 0.2
    assert (tmp_path / "out/adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_dpo_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_parts, pairs):
    common = {"stage": "dpo", "max_steps": 4, "per_device_train_batch_size": 2,
              "learning_rate": 1e-3, "save_strategy": "steps", "save_steps": 2}  # fmt: skip
    whole = run(
        *parse(tiny_recipe(tiny_parts, pairs, tmp_path / "a", **common), tmp_path, "a.yaml")
    )
    recipe = tiny_recipe(tiny_parts, pairs, tmp_path / "b", **common)
    run(*parse(recipe, tmp_path, "b.yaml"), callbacks=[StopAt(2)])
    resumed = run(*parse({**recipe, "resume_from_checkpoint": True}, tmp_path, "b.yaml"))

    def losses(trainer):
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}

    assert losses(resumed)[4] == pytest.approx(losses(whole)[4], abs=1e-6)
    assert losses(resumed)[3] == pytest.approx(losses(whole)[3], abs=1e-6)
    a, b = dict(whole.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    state = json.loads((tmp_path / "b/trainer_state.json").read_text())
    assert state["global_step"] == 4
