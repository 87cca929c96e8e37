"""Single-process checks of the distributed machinery: shipped DeepSpeed / accelerate configs,
the refusal of DeepSpeed optimizer and scheduler blocks, ZeRO-3 init pausing, crash-safe
checkpoint publishing and lookup, and the refusal of checkpoints whose pickles would run code.
The multi-process runs are in test_distributed.py."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe
from transformers.integrations.deepspeed import (
    is_deepspeed_zero3_enabled,
    unset_hf_deepspeed_config,
)

from lvlm_tune.training.checkpoints import (
    is_complete_checkpoint,
    newest_complete_checkpoint,
    publish_checkpoint,
)
from lvlm_tune.training.distributed import offloads_optimizer, zero3_init_paused
from lvlm_tune.training.pickle_scan import UnsafeCheckpointError, check_checkpoint
from lvlm_tune.training.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[2]
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


@pytest.fixture
def parse(tmp_path, tiny_parts, tiny_data):
    def parse(**overrides):
        recipe = tiny_recipe(tiny_parts, tiny_data, tmp_path / "out", **overrides)
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        return parse_recipe(tmp_path / "r.yaml")

    yield parse
    unset_hf_deepspeed_config()  # parsing a ZeRO-3 recipe switches transformers to ZeRO-3 init


@pytest.mark.parametrize("path", DS_CONFIGS, ids=[p.name for p in DS_CONFIGS])
def test_deepspeed_configs_load_and_leave_batch_optimizer_and_schedule_to_the_recipe(path, parse):
    config = json.loads(path.read_text())
    assert not {"train_batch_size", "optimizer", "scheduler"} & set(config)
    assert (
        config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
    )
    args = parse(deepspeed=str(path), gradient_accumulation_steps=2)[2]
    filled = args.hf_deepspeed_config.config
    assert (
        filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 2
    )
    assert offloads_optimizer(args) == ("offload" in path.name)
    if config["zero_optimization"]["stage"] == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert is_deepspeed_zero3_enabled()
        with zero3_init_paused():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()


def test_accelerate_configs_and_hostfile_point_at_real_files():
    for path in sorted((ROOT / "ds_configs").glob("accelerate_*.yaml")):
        config = yaml.safe_load(path.read_text())
        assert config["distributed_type"] == "DEEPSPEED", path
        assert (ROOT / config["deepspeed_config"]["deepspeed_config_file"]).is_file(), path
        if config["num_machines"] > 1:
            assert (
                config["main_process_ip"]
                and config["deepspeed_config"]["deepspeed_multinode_launcher"]
            )
    hosts = [
        line.split()
        for line in (ROOT / "ds_configs/hostfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert hosts and all(len(h) == 2 and h[1].startswith("slots=") for h in hosts)


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_a_deepspeed_config_with_its_own_optimizer_or_scheduler_is_refused(block, parse, tmp_path):
    config = json.loads((ROOT / "ds_configs/zero2.json").read_text())
    config[block] = {"type": "AdamW" if block == "optimizer" else "WarmupLR", "params": {}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"defines '{block}'.*projector_lr"):
        parse(deepspeed=str(path))


def test_a_recipe_config_that_contradicts_accelerate_launch_is_refused(parse, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "ds_configs/zero3.json"))
    with pytest.raises(ValueError, match="accelerate launch was given"):
        parse(deepspeed=str(ROOT / "ds_configs/zero2.json"))
    parse(deepspeed=str(ROOT / "ds_configs/zero3.json"))  # the same file is fine


def _checkpoint(run: Path, step: int, deepspeed: bool = True) -> Path:
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if deepspeed:
        (path / f"global_step{step}").mkdir()
        (path / "latest").write_text(f"global_step{step}")
    else:
        (path / "adapter_model.safetensors").write_bytes(b"x")
    return path


def test_newest_complete_checkpoint_passes_over_damaged_ones(tmp_path):
    assert newest_complete_checkpoint(tmp_path / "missing") is None
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4, deepspeed=False)
    (_checkpoint(tmp_path, 10) / "trainer_state.json").write_text('{"global_st')  # truncated
    (_checkpoint(tmp_path, 12) / "global_step12").rmdir()  # shards missing
    (tmp_path / "checkpoint-14").mkdir()  # nothing written yet
    (tmp_path / ".staging" / "checkpoint-16").mkdir(parents=True)
    assert newest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert not is_complete_checkpoint(tmp_path / "checkpoint-12")


def test_publish_renames_a_staged_checkpoint_into_place_replacing_an_old_one(tmp_path):
    old = _checkpoint(tmp_path, 6)
    (old / "stale.txt").write_text("old")
    staged = _checkpoint(tmp_path / ".staging", 6, deepspeed=False)
    publish_checkpoint(staged, old)
    assert not (tmp_path / ".staging").exists()
    assert sorted(p.name for p in old.iterdir()) == [
        "adapter_model.safetensors",
        "trainer_state.json",
    ]


@pytest.mark.slow
def test_a_run_publishes_whole_checkpoints_rotates_them_and_resumes_a_full_model(
    tmp_path, tiny_parts, tiny_data
):
    from transformers import TrainerCallback

    from lvlm_tune.training.pipeline import run

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    def train(name, resume, callbacks=None):
        recipe = tiny_recipe(
            tiny_parts,
            tiny_data,
            tmp_path / name,
            stage="pretrain",
            max_steps=3,
            save_strategy="steps",
            save_steps=1,
            save_total_limit=2,
            per_device_train_batch_size=2,
            resume_from_checkpoint=resume,
        )
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        trainer = run(*parse_recipe(tmp_path / f"{name}.yaml"), callbacks=callbacks)
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    reference = train("full", None)
    out = tmp_path / "full"
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    assert all(is_complete_checkpoint(out / f"checkpoint-{s}") for s in (2, 3))
    assert (out / "checkpoint-3" / "lvlm_tune.json").exists()
    assert (out / "checkpoint-3" / "projector.safetensors").exists()
    train("cut", "auto", [StopAt2()])  # "auto" with nothing to resume: a fresh start
    resumed = train("cut", "auto")  # resumes from checkpoint-2: the trained projector is restored
    assert resumed == pytest.approx(reference, rel=1e-5)


class CreatesFile:
    """Unpickling this calls ``open(marker, "w")`` or ``os.system("touch marker")``."""

    def __init__(self, marker, how):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "open":
            return (open, (self.marker, "w"))
        return (os.system, (f"touch {self.marker}",))


GLOBALS = {"open": f"{open.__module__}.open", "system": f"{os.system.__module__}.system"}
WRITERS = {
    "zip": ("optimizer.pt", lambda obj, f: torch.save(obj, f)),
    "legacy": (
        "rng_state.pth",
        lambda obj, f: torch.save(obj, f, _use_new_zipfile_serialization=False),
    ),
    "pickle4": ("state.pkl", lambda obj, f: pickle.dump(obj, f, protocol=4)),  # STACK_GLOBAL
    "deepspeed_shard": ("global_step2/zero_pp_rank_0_mp_rank_00_optim_states", pickle.dump),
    "latest_tag": ("elsewhere/mp_rank_00_model_states", lambda obj, f: torch.save(obj, f)),
}


@pytest.mark.parametrize("how", list(GLOBALS))
@pytest.mark.parametrize("fmt", list(WRITERS))
def test_a_checkpoint_whose_pickle_would_run_code_is_refused_unread(tmp_path, fmt, how):
    marker = tmp_path / "marker"
    folder = _checkpoint(tmp_path / "run", 2)  # a DeepSpeed-style checkpoint-2
    name, write = WRITERS[fmt]
    if fmt == "latest_tag":
        (folder / "latest").write_text("elsewhere")
    path = folder / name
    path.parent.mkdir(exist_ok=True)
    payload = {"state": {"step": torch.tensor(3)}, "hook": CreatesFile(marker, how)}
    with open(path, "wb") as f:
        write(payload, f)
    refused = rf"{re.escape(str(path))}: refusing .* {re.escape(GLOBALS[how])}"
    with pytest.raises(UnsafeCheckpointError, match=refused):
        check_checkpoint(folder)
    assert not marker.exists()
    # The payload is real: loading it unchecked (as DeepSpeed would) creates the file.
    with open(path, "rb") as f, contextlib.suppress(Exception):
        torch.load(f, weights_only=False)  # a raw pickle runs, then fails the magic number
    assert marker.exists()


def test_torchscript_tar_unreadable_files_and_an_escaping_latest_are_refused(tmp_path):
    folder = _checkpoint(tmp_path / "run", 2)
    check_checkpoint(folder)  # nothing to unpickle yet
    (folder / "latest").write_text("../../elsewhere")
    with pytest.raises(UnsafeCheckpointError, match=r"latest: names '\.\./\.\./elsewhere'"):
        check_checkpoint(folder)
    (folder / "latest").write_text("global_step2")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), folder / "model.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"model\.pt: a TorchScript archive"):
        check_checkpoint(folder)
    (folder / "model.pt").write_bytes(b"\x00not a pickle")
    with pytest.raises(UnsafeCheckpointError, match=r"model\.pt: cannot be checked"):
        check_checkpoint(folder)


def test_resuming_a_real_checkpoint_with_a_crafted_pickle_is_refused(
    tmp_path, tiny_parts, tiny_data
):
    from conftest import StopAt, parse

    from lvlm_tune.training.pipeline import run

    out, marker = tmp_path / "out", tmp_path / "marker"
    recipe = tiny_recipe(
        tiny_parts, tiny_data, out, stage="finetune_lora", save_strategy="steps", save_steps=1
    )
    run(*parse(recipe, tmp_path, "a.yaml"), callbacks=[StopAt(1)])
    checkpoint = out / "checkpoint-1"
    check_checkpoint(checkpoint)  # what Trainer really writes passes
    state = torch.load(checkpoint / "rng_state.pth", weights_only=False)
    state["python"] = CreatesFile(marker, "system")
    torch.save(state, checkpoint / "rng_state.pth")
    resume = {**recipe, "resume_from_checkpoint": True}
    with pytest.raises(
        UnsafeCheckpointError,
        match=rf"checkpoint-1/rng_state\.pth: refusing .* {re.escape(GLOBALS['system'])}",
    ):
        run(*parse(resume, tmp_path, "b.yaml"))
    assert not marker.exists()
