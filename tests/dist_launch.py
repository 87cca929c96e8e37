"""Launching multi-process training jobs from tests, and the worker those jobs can run.

Every launch is a real subprocess in its own process group, with its own MASTER_PORT (a free
port) and LVLM_TUNE_CACHE, under a hard timeout that kills the whole group and fails naming
the command and the end of its log. Run as a script (``torchrun ... tests/dist_launch.py
[--audit DIR | --hang-at STEP MARKER] RECIPE [--key value ...]``) this file is a
``lvlm-tune train`` that also records which files each rank writes, or stalls (for up to
LAUNCH_TIMEOUT seconds) just before publishing a checkpoint, so that a test can SIGKILL the job
in the middle of a save.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LVLM_TUNE_CACHE": str(tmp / "cache"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",  # a rank that aborts prints every thread's stack
        "PYTHONPATH": str(ROOT),
    }


def start(cmd: list[str], tmp: Path, log: str = "log.txt") -> subprocess.Popen:
    """Start ``cmd`` in its own process group, output to ``tmp/log``."""
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / log, "w") as out:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=_env(tmp),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts ranks in new sessions)."""
    try:
        launcher = psutil.Process(proc.pid)
        family = [launcher, *launcher.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"


def finish(procs: list[subprocess.Popen], tmp: Path, log: str = "log.txt") -> None:
    """Wait for ``procs``; on a timeout or failure kill them all and fail with the log tail."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            kill(proc)
        pytest.fail(f"timed out after {LAUNCH_TIMEOUT}s: {procs[0].args}\n{tail(tmp / log)}")
    for proc in procs:
        assert proc.returncode == 0, f"{proc.args} failed:\n{tail(tmp / log)}"


def tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(line for line in text.splitlines() if "Warning" not in line)[-chars:]


def torchrun(target: list[str], nproc: int = 2, **rdzv: str) -> list[str]:
    port = rdzv.pop("port", None) or str(free_port())
    extra = [f"--{k}={v}" for k, v in rdzv.items()]
    return [
        str(BIN / "torchrun"),
        f"--nproc_per_node={nproc}",
        f"--master_port={port}",
        *extra,
        *target,
    ]


def module(*args: str) -> list[str]:
    return ["-m", "lvlm_tune.train", *args]


def worker(*args: str) -> list[str]:
    return [str(Path(__file__)), *args]


def accelerate_config(zero: int, tmp: Path) -> Path:
    """The shipped accelerate config, switched to 2 CPU processes."""
    config = yaml.safe_load((ROOT / f"ds_configs/accelerate_zero{zero}.yaml").read_text())
    config.update(use_cpu=True, num_processes=2, main_process_port=free_port())
    config["deepspeed_config"]["deepspeed_config_file"] = str(ROOT / f"ds_configs/zero{zero}.json")
    path = tmp / "accelerate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_recipe(tmp: Path, parts, data, **overrides) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    recipe = tiny_recipe(
        parts, data, tmp / "out", **{"per_device_train_batch_size": 2, **overrides}
    )
    if recipe.get("deepspeed"):
        recipe["deepspeed"] = str(ROOT / recipe["deepspeed"])
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp / "recipe.yaml")


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def train_and_rebuild(recipe: str, tmp: Path, steps: int = 2) -> tuple[Path, torch.nn.Module]:
    """Train ``recipe`` on two ranks (``tmp/out``), check it logged ``steps`` finite losses, and
    rebuild its model as it was before training (same seed, no DeepSpeed) to compare with."""
    from transformers import set_seed

    from lvlm_tune.training.pipeline import build_model
    from lvlm_tune.training.recipe import parse_recipe

    finish([start(torchrun(module(recipe)), tmp)], tmp)
    out = tmp / "out"
    assert len(losses(out)) == steps and all(map(torch.isfinite, torch.tensor(losses(out))))
    args = parse_recipe(recipe, ["--deepspeed", ""])
    set_seed(args[2].seed)
    return out, build_model(*args)[0]


def _audit_writes(folder: Path) -> None:
    """Record every file this rank opens for writing (Python, torch.save, safetensors)."""
    import atexit

    import safetensors.torch

    written: set[str] = set()

    def hook(event: str, args: tuple) -> None:
        if (
            event == "open"
            and isinstance(args[0], str)
            and args[1]
            and set(str(args[1])) & set("wax+")
        ):
            written.add(args[0])

    def wrap(fn, where: int):
        def recorded(*a, **kw):
            written.add(str(a[where]))
            return fn(*a, **kw)

        return recorded

    sys.addaudithook(hook)
    safetensors.torch.serialize_file = wrap(safetensors.torch.serialize_file, 1)
    torch.save = wrap(torch.save, 1)
    rank = os.environ["RANK"]
    atexit.register(
        lambda: (
            folder.mkdir(parents=True, exist_ok=True),
            (folder / f"rank{rank}.json").write_text(json.dumps(sorted(written))),
        )
    )


def _hang_before_publishing(step: int, marker: Path) -> None:
    """Stop forever right before ``checkpoint-<step>`` is renamed into place."""
    from lvlm_tune.training import trainer

    publish = trainer.publish_checkpoint

    def hanging(staged: str, final: str) -> None:
        if final.endswith(f"checkpoint-{step}"):
            marker.touch()
            time.sleep(LAUNCH_TIMEOUT)  # the test kills the job long before
        publish(staged, final)

    trainer.publish_checkpoint = hanging


if __name__ == "__main__":  # the worker: [--audit DIR] [--hang-at STEP MARKER] RECIPE [--key value]
    argv = sys.argv[1:]
    if argv[0] == "--audit":
        _audit_writes(Path(argv[1]))
        argv = argv[2:]
    elif argv[0] == "--hang-at":
        _hang_before_publishing(int(argv[1]), Path(argv[2]))
        argv = argv[3:]
    from lvlm_tune.commands.train import main

    sys.exit(main(argv))
