"""One run per output folder: another recipe is refused (or replaces the run with
--overwrite_output_dir), a resume takes only the same run's checkpoint, and merge/chat/eval
take a run folder's final save only when it is that run's newest."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import StopAt, parse, tiny_recipe

from lvlm_tune.commands.merge import main as merge_main
from lvlm_tune.commands.train import main as train_main
from lvlm_tune.inference.load import load_run
from lvlm_tune.training.pipeline import run
from lvlm_tune.training.recipe import LORA_KEYS
from lvlm_tune.training.run_card import RunCard, run_options
from lvlm_tune.training.run_folder import RunFolderError, check_final_save


@pytest.mark.slow
def test_another_recipe_is_refused_a_resume_takes_only_its_run_and_overwrite_replaces(
    tmp_path, tiny_parts, tiny_data, capsys
):
    out = tmp_path / "out"
    lora = tiny_recipe(
        tiny_parts, tiny_data, out, stage="finetune_lora", save_strategy="steps", save_steps=1
    )
    run(*parse(lora, tmp_path, "lora.yaml"), callbacks=[StopAt(1)])  # checkpoint-1, cut short
    # LoRA keys cannot be set for stage: pretrain, so the LoRA run's small r/alpha/dropout differ
    other = {k: v for k, v in lora.items() if k not in LORA_KEYS}
    other.update(stage="pretrain", learning_rate=1e-3)
    refused = (
        r"holds another run \(checkpoint-1: options differ: learning_rate, lora_alpha, "
        r"lora_dropout, lora_r, stage\)"
    )
    with pytest.raises(RunFolderError, match=refused + ".*--overwrite_output_dir"):
        run(*parse(other, tmp_path, "other.yaml"))
    with pytest.raises(RunFolderError, match=refused):
        run(*parse({**other, "resume_from_checkpoint": True}, tmp_path, "other.yaml"))
    assert train_main([str(tmp_path / "other.yaml")]) == 2  # one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lvlm-tune train: error: output_dir {out} holds another run")

    # A checkpoint of another run is refused wherever it lies, naming what differs.
    elsewhere = {**lora, "learning_rate": 5e-3, "output_dir": str(tmp_path / "fresh")}
    elsewhere["resume_from_checkpoint"] = str(out / "checkpoint-1")
    with pytest.raises(
        RunFolderError,
        match=r"checkpoint-1 is not a checkpoint of this run \(options differ: learning_rate\)",
    ):
        run(*parse(elsewhere, tmp_path, "elsewhere.yaml"))

    # The same run resumes though the recipe file, logging, saving and resume flags differ.
    again = {**lora, "resume_from_checkpoint": True, "logging_steps": 2, "save_total_limit": 1}
    resumed = run(*parse(again, tmp_path, "again.yaml"))
    assert resumed.state.global_step == 2 and not (out / "checkpoint-1").exists()
    assert load_run(out).is_adapter

    replaced = run(*parse({**other, "overwrite_output_dir": True}, tmp_path, "other.yaml"))
    assert replaced.state.global_step == 2
    assert not (out / "adapter_config.json").exists()  # the LoRA run's leftovers are gone
    options = run_options(*parse(other, tmp_path, "other.yaml"))
    saves = [out, *sorted(out.glob("checkpoint-*"))]
    assert [p.name for p in saves[1:]] == ["checkpoint-1", "checkpoint-2"]  # the new run's
    for folder in saves:
        card = json.loads((folder / "lvlm_tune.json").read_text())
        assert card["run_options"] == options and card["stage"] == "pretrain", folder
    assert not load_run(out).is_adapter


def _save(folder, options, step):
    folder.mkdir(parents=True, exist_ok=True)
    RunCard(family="llava", stage="finetune_lora", run_options=options).write(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "adapter_model.safetensors").write_bytes(b"x")


def test_a_run_folder_stands_for_its_final_save_only_when_that_is_its_runs_newest(tmp_path, capsys):
    first, second = {"learning_rate": 0.01, "seed": 7}, {"learning_rate": 0.001, "seed": 7}
    folder = tmp_path / "run"
    _save(folder / "checkpoint-2", first, 2)
    _save(folder, first, 2)
    check_final_save(folder)  # finished: the final save is the newest
    _save(folder / "checkpoint-4", first, 4)  # resumed to a later step, not finished yet
    with pytest.raises(RunFolderError, match="older than its newest checkpoint checkpoint-4"):
        check_final_save(folder)
    shutil.rmtree(folder / "checkpoint-4")
    _save(folder / "checkpoint-4", second, 4)  # a later run's checkpoint
    with pytest.raises(
        RunFolderError,
        match=r"final save is from another run than its newest checkpoint checkpoint-4 "
        r"\(options differ: learning_rate\); pass .*checkpoint-4",
    ):
        check_final_save(folder)
    check_final_save(folder / "checkpoint-2")  # a checkpoint named outright is taken
    (folder / "lvlm_tune.json").unlink()
    assert merge_main(["--checkpoint", str(folder), "--output", str(tmp_path / "m")]) == 2
    assert "no final save (has the run finished?); pass" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
