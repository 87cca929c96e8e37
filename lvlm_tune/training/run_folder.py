"""One run per output folder: what may start in a folder, resume from a checkpoint, be merged.

A run is identified by the ``run_options`` of its run card (:mod:`lvlm_tune.training.run_card`).

* Starting a run in a folder whose final save or checkpoints come from another run is refused
  (naming the options that differ) unless ``overwrite_output_dir``, which first removes the
  other run's checkpoints and saved files (other files in the folder stay).
* Resuming takes a checkpoint of the same run only.
* A run folder stands for its final save only when that save is from the same run as the
  newest complete checkpoint and not older than it; otherwise ``merge``/``chat``/``eval`` are
  told to name the checkpoint (a run that was resumed and has not finished yet, or leftovers).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from lvlm_tune.errors import UserError
from lvlm_tune.training.checkpoints import (
    STAGING_DIR,
    TRAINER_STATE,
    checkpoint_step,
    newest_complete_checkpoint,
)
from lvlm_tune.training.run_card import RUN_CARD, RunCard

logger = logging.getLogger(__name__)

# What a save writes at the top of a run folder (model, adapter, processor, state, card):
# removed with the previous run by overwrite_output_dir, so none of it is mistaken for the
# new run's (a stale adapter_config.json would make a full model look like an adapter).
SAVED_FILES = (
    RUN_CARD, TRAINER_STATE, "training_args.json", "training_args.bin", "loss_curve.png",
    "eval.json", "config.json", "generation_config.json", "adapter_config.json",
    "processor_config.json", "preprocessor_config.json", "tokenizer.json",
    "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
SAVED_SUFFIXES = (".safetensors", ".safetensors.index.json")
MAX_KEYS_SHOWN = 8
_MISSING = object()


class RunFolderError(UserError):
    """A run folder or checkpoint that belongs to another run (a user error, one line)."""


def read_card(folder: str | os.PathLike) -> RunCard | None:
    """A folder's run card, or ``None`` when it has none or it cannot be read."""
    try:
        return RunCard.read(folder)
    except (OSError, ValueError):  # no card, not JSON, or not a card (RunCardError)
        return None


def difference(mine: dict[str, Any] | None, theirs: RunCard | None) -> str | None:
    """Why the run with ``run_options`` ``mine`` is not the run of card ``theirs`` (``None``
    when it is)."""
    if theirs is None:
        return "no run card"
    other = theirs.run_options
    if not isinstance(other, dict):
        return "its run card has no run_options (written by an older lvlm-tune)"
    if not isinstance(mine, dict):
        return "no run_options to compare with"
    keys = sorted(
        k for k in mine.keys() | other.keys() if mine.get(k, _MISSING) != other.get(k, _MISSING)
    )
    if not keys:
        return None
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    more = f" and {len(keys) - MAX_KEYS_SHOWN} more" if len(keys) > MAX_KEYS_SHOWN else ""
    return f"options differ: {shown}{more}"


def saved_runs(run_dir: str | os.PathLike) -> list[tuple[str, RunCard | None]]:
    """``(what, card)`` for the final save and every ``checkpoint-N`` folder in ``run_dir``."""
    run_dir = Path(run_dir)
    found: list[tuple[str, RunCard | None]] = []
    if (run_dir / RUN_CARD).is_file():
        found.append(("its final save", read_card(run_dir)))
    if run_dir.is_dir():
        checkpoints = [
            p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None
        ]
        for path in sorted(checkpoints, key=checkpoint_step):
            found.append((path.name, read_card(path)))
    return found


def claim_output_dir(
    output_dir: str | os.PathLike, options: dict[str, Any], overwrite: bool
) -> None:
    """Refuse to start the run of ``options`` (its ``run_options``) in a folder holding
    another run, unless ``overwrite``.

    With ``overwrite`` the other run's ``checkpoint-N`` folders, staging folder and saved files
    (:data:`SAVED_FILES`) are removed, by the first process of each node.

    Raises:
        RunFolderError: naming the other run's save and the options that differ.
    """
    others = [
        (what, why)
        for what, theirs in saved_runs(output_dir)
        if (why := difference(options, theirs))
    ]
    if not others:
        return
    if not overwrite:
        what, why = others[-1]
        raise RunFolderError(
            f"output_dir {output_dir} holds another run ({what}: {why}); choose another "
            "output_dir, run that run's recipe to continue it, or pass --overwrite_output_dir "
            "to replace it"
        )
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        removed = remove_run(output_dir)
        logger.warning(
            "overwrite_output_dir: removed the previous run from %s (%s)",
            output_dir,
            ", ".join(removed),
        )


def remove_run(run_dir: str | os.PathLike) -> list[str]:
    """Delete a run's checkpoints, staging folder and saved files; returns the names removed."""
    removed = []
    for path in sorted(Path(run_dir).iterdir()):
        is_checkpoint = path.is_dir() and (
            checkpoint_step(path) is not None or path.name == STAGING_DIR
        )
        is_saved = path.is_file() and (
            path.name in SAVED_FILES or path.name.endswith(SAVED_SUFFIXES)
        )
        if is_checkpoint:
            shutil.rmtree(path, ignore_errors=True)
        elif is_saved:
            path.unlink(missing_ok=True)
        else:
            continue
        removed.append(path.name)
    return removed


def check_same_run(checkpoint: str | os.PathLike, options: dict[str, Any] | None) -> None:
    """Refuse to resume the run of ``options`` (its ``run_options``) from a checkpoint of
    another run.

    Raises:
        RunFolderError: naming the checkpoint and the options that differ.
    """
    why = difference(options, read_card(checkpoint))
    if why:
        raise RunFolderError(
            f"resume_from_checkpoint: {checkpoint} is not a checkpoint of this run ({why}); "
            "resume with the recipe that wrote it, or start afresh with another output_dir or "
            "--overwrite_output_dir"
        )


def check_final_save(run_dir: str | os.PathLike) -> None:
    """Refuse a run folder whose top-level save is not its run's final one.

    A folder without ``checkpoint-N`` folders, or a ``checkpoint-N`` itself, passes. Otherwise
    the top-level save must exist, come from the same run as the newest complete checkpoint
    and be at least as new (``trainer_state.json`` step, else file times).

    Raises:
        RunFolderError: naming the newest checkpoint to pass instead.
    """
    run_dir = Path(run_dir)
    if checkpoint_step(run_dir) is not None:
        return
    newest = newest_complete_checkpoint(run_dir)
    if newest is None:
        return
    step = checkpoint_step(newest)
    hint = f"pass {newest} to use that checkpoint"
    top = read_card(run_dir)
    if top is None:
        raise RunFolderError(f"{run_dir}: no final save (has the run finished?); {hint}")
    theirs = read_card(newest)
    legacy = theirs is not None and top.run_options is None and theirs.run_options is None
    why = None if legacy else difference(top.run_options, theirs)
    if why:
        raise RunFolderError(
            f"{run_dir}: its final save is from another run than its newest checkpoint "
            f"{Path(newest).name} ({why}); {hint}"
        )
    final_step = _global_step(run_dir / TRAINER_STATE)
    if final_step is None:
        older = os.path.getmtime(run_dir / RUN_CARD) < os.path.getmtime(
            Path(newest) / TRAINER_STATE
        )
    else:
        older = final_step < step
    if older:
        at = "" if final_step is None else f" (step {final_step})"
        raise RunFolderError(
            f"{run_dir}: its final save{at} is older than its newest checkpoint "
            f"{Path(newest).name}: the run was resumed and has not finished; {hint}"
        )


def _global_step(path: Path) -> int | None:
    try:
        step = json.loads(path.read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None
