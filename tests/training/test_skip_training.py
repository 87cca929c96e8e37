"""``on_bad_sample: skip`` end to end (tiny CPU runs): each epoch trains exactly the N - k good
samples, each bad sample is counted once under its reason (log, run card, checkpoints, resume),
a batch of only bad samples trains nothing, and ``max_bad_fraction`` stops the run."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import StopAt, parse, tiny_recipe
from transformers import set_seed

from lvlm_tune import cli
from lvlm_tune.data.errors import TooManyBadSamplesError
from lvlm_tune.training.pipeline import build_model, run

BAD = {  # sample index -> (how it is broken, the reason it is counted under)
    1: ("missing", "missing_image"),
    5: ("empty", "corrupt_image"),
    6: ("outside", "image_outside_folder"),
    9: ("roles", "bad_roles"),
}
BY_REASON = {"missing_image": 1, "corrupt_image": 1, "image_outside_folder": 1, "bad_roles": 1}


@pytest.fixture(scope="module")
def bad_data(tiny_data, tmp_path_factory):
    """tiny_data's 16 samples with 4 broken: a missing image, a 0-byte image, an image
    outside the image folder and a conversation that starts with the assistant."""
    root = tmp_path_factory.mktemp("bad_data")
    folder = root / "images"
    shutil.copytree(tiny_data["image_folder"], folder)
    samples = json.loads(Path(tiny_data["data_path"]).read_text())
    (folder / "empty.png").write_bytes(b"")
    shutil.copy(folder / "0.png", root / "outside.png")
    for index, (kind, _) in BAD.items():
        sample = samples[index]
        if kind == "roles":
            sample["conversations"] = sample["conversations"][1:]
        else:
            sample["image"] = {
                "missing": "gone.png",
                "empty": "empty.png",
                "outside": str(root / "outside.png"),
            }[kind]
    (root / "train.json").write_text(json.dumps(samples))
    return {"data_path": str(root / "train.json"), "image_folder": str(folder)}


def skip_recipe(tiny_parts, data, out, **overrides):
    options = {"on_bad_sample": "skip", "max_bad_fraction": 0.25, "stage": "finetune_lora"}
    return tiny_recipe(tiny_parts, data, out, **{**options, **overrides})


def test_each_epoch_trains_exactly_the_good_samples_and_counts_each_bad_one_once(
    tmp_path, tiny_parts, bad_data, caplog
):
    out = tmp_path / "out"
    # Batches of one: every bad sample is a batch of only bad samples (a zero-loss step).
    recipe = skip_recipe(
        tiny_parts, bad_data, out, max_steps=-1, num_train_epochs=2,
        per_device_train_batch_size=1,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="lvlm_tune.train"):
        trainer = run(*parse(recipe, tmp_path))
    assert trainer.state.global_step == 32  # 16 batches per epoch, bad ones included
    tracker = trainer.bad_samples
    assert tracker.trained == {0: 12, 1: 12}  # N - k per epoch, no substitutes
    assert tracker.ledger.as_dict() == BY_REASON and tracker.ledger.indices() == sorted(BAD)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 32 and sum(loss == 0.0 for loss in losses) == 8  # 4 bad x 2 epochs
    card = json.loads((out / "lvlm_tune.json").read_text())
    assert card["bad_samples"] == {
        "skipped": 4, "of": 16, "by_reason": BY_REASON, "max_bad_fraction": 0.25,
        "samples_trained_per_epoch": {"1": 12, "2": 12},
    }  # fmt: skip
    assert card["data_args"]["max_bad_fraction"] == 0.25
    summary = (
        "skipped samples: 4 of 16 (bad_roles=1, corrupt_image=1, image_outside_folder=1, "
        "missing_image=1); samples trained: epoch 1: 12, epoch 2: 12"
    )
    assert summary in caplog.text


def test_a_batch_of_only_bad_samples_changes_no_weight(tmp_path, tiny_parts, tiny_data):
    """All 16 samples bad (max_bad_fraction 1): the steps run, with zero loss and no update."""
    data = json.loads(Path(tiny_data["data_path"]).read_text())
    for sample in data:
        sample["image"] = "gone.png"
        sample["conversations"][0]["value"] = "<image>\nWhat is it?"
    (tmp_path / "gone.json").write_text(json.dumps(data))
    bad = {"data_path": str(tmp_path / "gone.json"), "image_folder": tiny_data["image_folder"]}
    recipe = skip_recipe(tiny_parts, bad, tmp_path / "out", max_bad_fraction=1, stage="finetune")
    args = parse(recipe, tmp_path)
    set_seed(args[2].seed)
    before = {n: p.detach().clone() for n, p in build_model(*args)[0].named_parameters()}
    trainer = run(*parse(recipe, tmp_path))
    assert trainer.state.global_step == 2
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h] == [0.0, 0.0]
    after = dict(trainer.model.named_parameters())
    assert any(p.requires_grad for p in after.values())
    assert all(torch.equal(before[n], p.detach()) for n, p in after.items())
    assert trainer.bad_samples.trained == {}
    assert trainer.bad_samples.ledger.total >= 8  # read so far (the loader reads ahead)


def test_max_bad_fraction_stops_the_run_with_one_clear_message(tmp_path, tiny_parts, bad_data):
    recipe = skip_recipe(tiny_parts, bad_data, tmp_path / "out", max_bad_fraction=0.1, max_steps=8)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(TooManyBadSamplesError) as caught:
        cli.main(["train", str(path)])
    message = str(caught.value)
    assert message.startswith(f"{bad_data['data_path']}: ")
    assert "samples are bad" in message and "more than max_bad_fraction=0.1 allows" in message
    assert "raise max_bad_fraction (1 allows any number)" in message
    assert not (tmp_path / "out" / "lvlm_tune.json").exists()  # stopped before the final save
    with pytest.raises(ValueError, match=r"max_bad_fraction: 2\.0 is not a fraction"):
        parse({**recipe, "max_bad_fraction": 2}, tmp_path, "wrong.yaml")


@pytest.mark.slow
def test_resume_continues_the_bad_sample_record(tmp_path, tiny_parts, bad_data):
    common = {"max_steps": 8, "save_strategy": "steps", "save_steps": 3}
    full = run(*parse(skip_recipe(tiny_parts, bad_data, tmp_path / "full", **common), tmp_path))
    reference = [h["loss"] for h in full.state.log_history if "loss" in h]
    out = tmp_path / "cut"
    recipe = skip_recipe(tiny_parts, bad_data, out, **common)
    run(*parse(recipe, tmp_path, "b.yaml"), callbacks=[StopAt(3)])
    saved = json.loads((out / "checkpoint-3" / "bad_samples.json").read_text())
    assert saved["size"] == 16 and set(saved["bad"].values()) <= set(BY_REASON)
    resumed = run(*parse({**recipe, "resume_from_checkpoint": True}, tmp_path, "c.yaml"))
    losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert losses[-5:] == pytest.approx(reference[-5:], rel=1e-5)
    card = json.loads((out / "lvlm_tune.json").read_text())
    reference_card = json.loads((tmp_path / "full" / "lvlm_tune.json").read_text())
    assert card["bad_samples"] == reference_card["bad_samples"]
    assert card["bad_samples"]["by_reason"] == BY_REASON
    assert card["bad_samples"]["samples_trained_per_epoch"] == {"1": 12, "2": 12}
