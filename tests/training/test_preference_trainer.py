"""Real tiny preference runs with ``PreferenceTrainer`` on hand-built pairs: frozen parameters
stay bit-identical, trainable ones change, TRL's reward metrics are logged and plotted, and
``precompute_ref_log_probs`` gives the same first step as the live reference."""

from __future__ import annotations

import pytest
import torch
from conftest import minigpt4_recipe, parse, tiny_recipe
from preference_pairs import HandCollator, HandPairs, write_pairs

from lvlm_tune.data.collator import pad_token_id
from lvlm_tune.training.loss_curve import write_loss_curve
from lvlm_tune.training.pipeline import build_model
from lvlm_tune.training.preference_precompute import IndexedCollator, IndexedPairs
from lvlm_tune.training.preference_trainer import PreferenceTrainer

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def _run(tmp_path, recipe, precompute=False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    model_args, data_args, train_args = parse(recipe, tmp_path)
    torch.manual_seed(0)
    model, processor, family = build_model(model_args, data_args, train_args)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dataset = HandPairs(model, processor, family, data_args, tmp_path)
    collator = HandCollator(pad_token_id(processor.tokenizer))
    if precompute:
        dataset, collator = IndexedPairs(dataset), IndexedCollator(collator)
    trainer = PreferenceTrainer(
        model=model, args=train_args, train_dataset=dataset, data_collator=collator,
        processing_class=processor, family=family, run_card=None,
        blank_pixel_values=dataset.images.blank(),
    )  # fmt: skip
    trainer.train()
    return trainer, before


def _check_frozen_and_trained(trainer, before):
    after = dict(trainer.model.named_parameters())
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert trainable
    for name, param in after.items():
        same = torch.equal(before[name], param.detach())
        assert same != (name in trainable), f"{name}: trainable={name in trainable} same={same}"
    return trainable


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "stage"), [("llava", "dpo_lora"), ("llava", "dpo"), ("minigpt4", "dpo")]
)
def test_real_run_trains_only_the_stage_parts(
    tmp_path, tiny_parts, tiny_blip2, pairs, family, stage
):
    extra = {"stage": stage, "max_steps": 3, "per_device_train_batch_size": 2,
             "learning_rate": 1e-3, "loss_type": "ipo" if stage == "dpo" else "sigmoid"}  # fmt: skip
    if family == "llava":
        recipe = tiny_recipe(tiny_parts, pairs, tmp_path / "out", **extra)
    else:
        recipe = minigpt4_recipe(tiny_parts, tiny_blip2, pairs, tmp_path / "out", **extra)
    trainer, before = _run(tmp_path, recipe)
    trainable = _check_frozen_and_trained(trainer, before)
    if family == "minigpt4":
        assert {n.split(".")[0] for n in trainable} == {"language_projection"}
    if stage == "dpo":
        assert trainer.ref_model is not None  # a frozen copy, unchanged
        ref = dict(trainer.ref_model.base.named_parameters())
        assert all(torch.equal(ref[n], before[n]) for n in before)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(key in h for h in logs for key in REWARDS)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    plot = write_loss_curve(trainer.state.log_history, str(tmp_path))
    assert plot is None or plot.endswith("loss_curve.png")


@pytest.mark.slow
def test_precomputed_reference_gives_the_live_references_steps(tmp_path, tiny_parts, pairs):
    common = {"stage": "dpo", "max_steps": 2, "per_device_train_batch_size": 2,
              "learning_rate": 1e-3}  # fmt: skip
    live, _ = _run(tmp_path / "a", tiny_recipe(tiny_parts, pairs, tmp_path / "a/o", **common))
    pre, _ = _run(
        tmp_path / "b",
        tiny_recipe(tiny_parts, pairs, tmp_path / "b/o", precompute_ref_log_probs=True, **common),
        precompute=True,
    )
    assert pre.ref_model is None and len(pre.reference_logps) == len(pre.train_dataset)
    for a, b in zip(live.state.log_history, pre.state.log_history, strict=True):
        for key in ("loss", *REWARDS):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), key
