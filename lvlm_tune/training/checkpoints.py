"""Crash-safe checkpoints: stage, then publish with one rename; find the newest complete one.

``Trainer`` writes ``checkpoint-N`` in place, so a job killed mid-save leaves a newest
``checkpoint-N`` that cannot be loaded, and ``resume_from_checkpoint: true`` picks exactly that
one. ``LvlmTrainer`` instead lets every rank write into ``<run>/.staging/checkpoint-N`` and,
once all ranks are done, the saving process renames it to ``<run>/checkpoint-N``: a rename
within one filesystem is atomic, so a ``checkpoint-N`` folder is always whole. Resuming picks
the newest checkpoint that :func:`is_complete_checkpoint` accepts (a defence against folders
written by other tools or damaged later) and says which incomplete ones it passed over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
)
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a ``checkpoint-N`` folder name (``None`` for other names)."""
    match = _CHECKPOINT.match(os.path.basename(os.fspath(path)))
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a loadable checkpoint.

    Complete means: a readable ``trainer_state.json`` (``Trainer`` writes it last), model
    weights (safetensors or adapter) or a DeepSpeed checkpoint, and, when a DeepSpeed
    ``latest`` file names a tag, that tag's folder.
    """
    path = os.fspath(path)
    try:
        with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        return bool(tag) and os.path.isdir(os.path.join(path, tag))
    return any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES)


def complete_checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete ``checkpoint-N`` folders in ``run_dir``, ascending."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        return []
    steps = []
    for name in os.listdir(run_dir):
        step = checkpoint_step(name)
        if step is None:
            continue
        if is_complete_checkpoint(os.path.join(run_dir, name)):
            steps.append(step)
        else:
            logger.warning("skipping incomplete checkpoint %s", os.path.join(run_dir, name))
    return sorted(steps)


def newest_complete_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` folder in ``run_dir``, or ``None``."""
    steps = complete_checkpoint_steps(run_dir)
    if not steps:
        return None
    return os.path.join(os.fspath(run_dir), f"{PREFIX_CHECKPOINT_DIR}-{steps[-1]}")


def staging_root(run_dir: str | os.PathLike) -> str:
    """The folder in which checkpoints are written before they are published."""
    return os.path.join(os.fspath(run_dir), STAGING_DIR)


def publish_checkpoint(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a fully written checkpoint from the staging folder to its final name.

    The staged folder is synced to disk first. An existing ``final`` (a run resumed from an
    older checkpoint saves the same step again) is moved aside and removed only after the new
    one is in place.
    """
    staged, final = os.fspath(staged), os.fspath(final)
    _fsync_tree(staged)
    old = None
    if os.path.exists(final):
        old = f"{staged}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(os.path.dirname(final) or ".")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):  # the staging folder, when nothing else is in it
        os.rmdir(os.path.dirname(staged))


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def newest_common_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint of ``output_dir`` complete on every rank (nodes may not share a
    filesystem); ``None`` when there is none."""
    steps = set(complete_checkpoint_steps(output_dir))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, sorted(steps))
        steps = set.intersection(*(set(s) for s in everyone))
    if not steps:
        return None
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{max(steps)}")
