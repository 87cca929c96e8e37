"""Run benchmarks with a model, or score saved answers, and keep the results.

A run reads each benchmark's questions (:mod:`.sources`), answers them with the model
(greedy, batched, the run's template and image settings, the benchmark's ``max_new_tokens``),
writes LLaVA's answers file (``<name>_answers.jsonl``) and, for a server split, the server's
submission file, and scores the answers. Scoring saved answers (``--predictions``) goes
through the same scorer, so the two give the same figures. The results of every benchmark
run into one folder accumulate in its ``benchmark_results.json`` (the newest run of each
benchmark wins); ``merge`` puts their headline figures in the model card.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lvlm_tune.inference.benchmarks.base import Question
from lvlm_tune.inference.benchmarks.files import (
    answer_rows,
    match_answers,
    read_predictions,
    write_jsonl,
)
from lvlm_tune.inference.benchmarks.sources import BenchmarkData, load_benchmark

RESULTS_FILE = "benchmark_results.json"
RESULTS_FOLDER = "benchmarks"


def score(data: BenchmarkData, answers: list[str | None]) -> dict[str, Any]:
    """The figures of ``answers`` (aligned with ``data.questions``) and the headline one."""
    metrics = data.benchmark.score(data.questions, answers)
    return {
        "benchmark": data.benchmark.name,
        "headline": data.benchmark.headline,
        "score": metrics.get(data.benchmark.headline),
        "metrics": metrics,
        "data": data.source,
    }


def _submit(data: BenchmarkData, answers: list[str | None], out: Path) -> str | None:
    if data.benchmark.submit is None:
        return None
    return os.fspath(data.benchmark.submit(data.questions, answers, data.folder, out))


def score_predictions(
    name: str,
    predictions: str | os.PathLike,
    data: str | os.PathLike,
    *,
    limit: int | None = None,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score a saved answers file (LLaVA's format) on benchmark ``name`` without a model."""
    bench = load_benchmark(name, data, limit=limit)
    answers = match_answers(bench.questions, read_predictions(Path(predictions)))
    result = score(bench, answers)
    result["answers"] = os.fspath(predictions)
    out = Path(output_dir) if output_dir is not None else Path(predictions).parent
    result["submission"] = _submit(bench, answers, out)
    return result


def _records(questions: list[Question]) -> list[Any]:
    from lvlm_tune.data.record import IMAGE_TAG, Conversation, Turn

    records = []
    for i, q in enumerate(questions):
        has_image = q.image is not None
        text = f"{IMAGE_TAG}\n{q.text}" if has_image else q.text
        records.append(Conversation(
            str(q.id), [Turn("user", text)], [q.image] if has_image else [],
            source=q.source, index=i,
        ))  # fmt: skip
    return records


def generate(loaded: Any, data: BenchmarkData, *, batch_size: int, max_new_tokens: int | None,
             image_folder_given: bool, progress: bool, template: str | None = None,
             ) -> list[str]:  # fmt: skip
    """The model's answers to ``data.questions`` (greedy; ``template`` overrides the card's)."""
    from tqdm.auto import tqdm

    from lvlm_tune.inference.answer import Answerer

    encoder = loaded.encoder(template)
    images = loaded.images(data.image_folder, allow_outside_folder=not image_folder_given)
    answerer = Answerer(
        loaded.model, loaded.processor, encoder, images,
        needs_pixels=loaded.family.forward_needs_pixels,
    )  # fmt: skip
    limit = max_new_tokens or data.benchmark.max_new_tokens
    records = _records(data.questions)
    answers: list[str] = []
    steps = range(0, len(records), batch_size)
    for start in tqdm(steps, desc=data.benchmark.name, disable=not progress):
        answers += answerer.answer(records[start : start + batch_size], max_new_tokens=limit)
    return answers


def run_benchmarks(
    model_dir: str | os.PathLike,
    benchmarks: list[tuple[str, str | os.PathLike]],
    *,
    image_folder: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    output_dir: str | os.PathLike | None = None,
    base: str | None = None,
    template: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer and score each ``(name, data)`` benchmark with the model in ``model_dir``.

    All benchmarks are read (and their files checked) before the model loads. Answers files,
    submission files and ``benchmark_results.json`` go to ``output_dir`` (default:
    ``<model_dir>/benchmarks``). Returns ``{"model", "benchmarks": {name: result}}``.
    """
    import torch

    from lvlm_tune.inference.load import load_run

    datas = [load_benchmark(n, d, image_folder, limit) for n, d in benchmarks]
    out = Path(output_dir) if output_dir is not None else Path(model_dir) / RESULTS_FOLDER
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_run(model_dir, base=base, device=device)
    model_id = Path(model_dir).resolve().name
    results = {}
    for data in datas:
        answers = generate(
            loaded, data, batch_size=batch_size, max_new_tokens=max_new_tokens,
            image_folder_given=image_folder is not None, progress=progress, template=template,
        )  # fmt: skip
        path = write_jsonl(out / f"{data.benchmark.name}_answers.jsonl",
                           answer_rows(data.questions, answers, model_id))  # fmt: skip
        result = score(data, list(answers))
        result.update(answers=os.fspath(path), submission=_submit(data, list(answers), out),
                      max_new_tokens=max_new_tokens or data.benchmark.max_new_tokens,
                      limit=limit)  # fmt: skip
        results[data.benchmark.name] = result
    report = {"model": os.fspath(model_dir), "benchmarks": results}
    save_results(out, report)
    return report


def save_results(folder: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Add ``report``'s benchmarks to ``folder/benchmark_results.json`` (newest wins)."""
    path = Path(folder) / RESULTS_FILE
    known = json.loads(path.read_text()) if path.is_file() else {"benchmarks": {}}
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for name, result in report["benchmarks"].items():
        known["benchmarks"][name] = {**result, "date": stamp}
    known["model"] = report.get("model", known.get("model"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=2, allow_nan=False), encoding="utf-8")
    return path


def benchmark_figures(folder: str | os.PathLike) -> dict[str, Any]:
    """Headline figures of ``folder/benchmarks/benchmark_results.json`` for a model card."""
    path = Path(folder) / RESULTS_FOLDER / RESULTS_FILE
    if not path.is_file():
        return {}
    results = json.loads(path.read_text()).get("benchmarks", {})
    return {
        f"{name}_{r['headline']}": round(r["score"], 2)
        for name, r in sorted(results.items())
        if isinstance(r.get("score"), int | float)
    }


def results_table(report: dict[str, Any]) -> str:
    """A plain-text table: benchmark, headline metric, score, questions, missing answers."""
    lines = [f"{'benchmark':<12}{'metric':<20}{'score':>10}{'questions':>11}{'missing':>9}"]
    for name, r in report["benchmarks"].items():
        value = "-" if r["score"] is None else f"{r['score']:.2f}"
        if r["score"] is None and r.get("submission"):
            value = "server"
        metrics = r["metrics"]
        lines.append(
            f"{name:<12}{r['headline']:<20}{value:>10}{metrics.get('num_questions', 0):>11}"
            f"{metrics.get('missing', 0):>9}"
        )
    return "\n".join(lines)
