"""Steps the demos share: a stage trained from its recipe, held-out questions scored with
``lvlm-tune eval`` (real and blank images), one question asked through ``lvlm-tune chat``.

Each step runs what the user's command runs (:mod:`lvlm_tune.training.pipeline`,
:mod:`lvlm_tune.inference`), so a demo's figures are what a user gets from the same folders.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from lvlm_tune.inference.chat import ChatSession
from lvlm_tune.inference.evaluate import evaluate as evaluate_run
from lvlm_tune.inference.load import load_run
from lvlm_tune.training.pipeline import run
from lvlm_tune.training.recipe import parse_recipe

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(threads: int | None = None) -> None:
    """Warnings-level logging and ``threads`` torch threads (default: every core)."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.WARNING)
    torch.set_num_threads(max(1, threads or os.cpu_count() or 1))


def train_recipe(recipe: Path, values: dict[str, Any]) -> Any:
    """``lvlm-tune train RECIPE --key=value ...`` for ``values``; the trainer."""
    overrides = [f"--{key}={value}" for key, value in values.items()]
    return run(*parse_recipe(recipe, overrides))


def final_loss(trainer: Any) -> float:
    """The last logged training loss (NaN when none was logged)."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return float(losses[-1]) if losses else float("nan")


def score(model_dir: Path, path: Path, kinds: Collection[str] | None = None) -> dict[str, Any]:
    """``lvlm-tune eval`` on a held-out LLaVA JSON whose rows carry a ``kind``: exact match over
    the questions of ``kinds`` (default: all), per kind, the answer loss and the report."""
    report = evaluate_run(model_dir, path, batch_size=64, progress=False)
    kind_of = {row["id"]: row["kind"] for row in json.loads(path.read_text())}
    hits: dict[str, list[bool]] = defaultdict(list)
    for sample in report["samples"]:
        hits[kind_of[sample["id"]]].append(bool(sample["exact_match"]))
    scored = [h for kind, v in hits.items() if kinds is None or kind in kinds for h in v]
    return {
        "accuracy": sum(scored) / max(len(scored), 1),
        "by_kind": {kind: sum(v) / len(v) for kind, v in hits.items()},
        "answer_loss": report["metrics"].get("loss"),
        "report": report,
    }


def score_held_out(
    merged: Path, out: Path, test: Path, blank: Path, kinds: Collection[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`score` on the held-out questions with real and with blank images; the reports are
    written to ``out/eval_test.json`` and ``out/eval_blank.json`` (and left out of the result)."""
    results = []
    for path, name in ((test, "eval_test.json"), (blank, "eval_blank.json")):
        result = score(merged, Path(path), kinds)
        (out / name).write_text(json.dumps(result.pop("report"), indent=1))
        results.append(result)
    return results[0], results[1]


def ask_once(model_dir: Path, question: str, images: str | list[str], max_new_tokens: int) -> str:
    """What ``lvlm-tune chat --model DIR --image ... --prompt QUESTION`` prints (streamed)."""
    print(f"user: {question}\nassistant: ", end="", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    session = ChatSession(load_run(model_dir, device=device))
    return session.ask(question, images, max_new_tokens=max_new_tokens, stream=sys.stdout)
