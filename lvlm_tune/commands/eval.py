"""``lvlm-tune eval``: how good a trained model is on a data file.

Two kinds of numbers. Loss and perplexity on the answer tokens: the data go through the training
dataset and collator (same template, masking, image expansion and truncation), and the loss is
averaged over every trained token of the file. Answer accuracy: for samples whose final answer is
short, the model answers the conversation up to its last question (greedy, batched, the training
prompt and STOP) and the answer is compared to the reference: exact match and "contains" after
lower-casing and stripping punctuation. Works on merged folders and adapter checkpoints. Loss
and perplexity are ``null`` (never NaN) when the samples hold no answer tokens; ``--json`` and
``--limit`` are checked before the model loads. The work is
:func:`lvlm_tune.inference.evaluate.evaluate`.

With ``--benchmark NAME ...`` it runs paper benchmarks instead (POPE, MME, MMBench, ScienceQA,
SEED, TextVQA, GQA, VQAv2, VizWiz) on their folders (``--data``: LLaVA's
``playground/data/eval/<name>/`` layout or lmms-eval's parquet), with the official metrics,
prints a results table and saves it; with ``--predictions FILE`` it scores a saved answers file
without a model (:mod:`lvlm_tune.inference.benchmarks`, ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lvlm_tune.errors import UserError, command, require_writable_file

BENCHMARK_NAMES = "pope, mme, mmbench, scienceqa, seed, textvqa, gqa, vqav2, vizwiz"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvlm-tune eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="merged folder, run folder or checkpoint-N")
    p.add_argument(
        "--data", required=True, nargs="+",
        help="data file (any format training reads); with --benchmark: each benchmark's folder "
        "(or one folder holding LLaVA's benchmark folders)",
    )  # fmt: skip
    p.add_argument("--benchmark", nargs="+", help="benchmarks to run: " + BENCHMARK_NAMES)
    p.add_argument("--predictions", help="with --benchmark NAME: score this answers jsonl")
    p.add_argument("--output-dir", help="answers, submissions and benchmark_results.json here")
    p.add_argument("--template", help="override the template recorded in the run card")
    p.add_argument("--image-folder", help="image folder (default: the data file's folder)")
    p.add_argument("--json", dest="json_out", help="write the report (JSON) here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, help="default 16; benchmarks: their own")
    p.add_argument("--short-answer-words", type=int, default=8, help="longest answer to generate")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.add_argument("--base", help="base model when the recorded one moved (adapter checkpoints)")
    return p


@command("lvlm-tune eval", also=(ValueError,))
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json_out:
        require_writable_file(args.json_out, "--json")  # before the whole evaluation runs
    if args.benchmark or args.predictions:
        return run_benchmarks(args)
    if not args.model:
        raise UserError("--model: required (a merged folder, run folder or checkpoint-N)")
    if len(args.data) != 1:
        raise UserError("--data: one data file (several folders only with --benchmark)")
    from lvlm_tune.inference.evaluate import evaluate

    report = evaluate(
        args.model,
        args.data[0],
        template=args.template,
        image_folder=args.image_folder,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens or 16,
        short_answer_words=args.short_answer_words,
        limit=args.limit,
        base=args.base,
    )
    if args.json_out:
        text = json.dumps(report, indent=2, allow_nan=False)
        Path(args.json_out).write_text(text, encoding="utf-8")
    print(json.dumps(report["metrics"], indent=2, allow_nan=False))
    return 0


def _pairs(names: list[str], data: list[str]) -> list[tuple[str, str]]:
    if len(data) not in (1, len(names)):
        raise UserError(f"--data: give one folder, or one per benchmark ({len(names)})")
    return list(zip(names, data * len(names) if len(data) == 1 else data, strict=True))


def run_benchmarks(args: argparse.Namespace) -> int:
    """``--benchmark``: run benchmarks with ``--model``, or score ``--predictions``."""
    from lvlm_tune.inference.benchmarks import runner

    names = args.benchmark or []
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit: must be at least 1, got {args.limit}")
    if args.predictions:
        if len(names) != 1 or args.model:
            raise UserError("--predictions: give exactly one --benchmark and no --model")
        result = runner.score_predictions(
            names[0], args.predictions, args.data[0], limit=args.limit,
            output_dir=args.output_dir,
        )  # fmt: skip
        report = {"model": None, "benchmarks": {names[0]: result}}
        runner.save_results(args.output_dir or Path(args.predictions).parent, report)
    else:
        if not args.model:
            raise UserError("--benchmark: needs --model (or --predictions to score answers)")
        report = runner.run_benchmarks(
            args.model, _pairs(names, args.data), image_folder=args.image_folder,
            limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            output_dir=args.output_dir, base=args.base, template=args.template,
        )  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, allow_nan=False))
    print(runner.results_table(report))
    return 0
