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
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lvlm_tune.errors import command, require_writable_file
from lvlm_tune.inference.evaluate import evaluate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvlm-tune eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="merged folder, run folder or checkpoint-N")
    p.add_argument("--data", required=True, help="data file (any format training reads)")
    p.add_argument("--template", help="override the template recorded in the run card")
    p.add_argument("--image-folder", help="image folder (default: the data file's folder)")
    p.add_argument("--json", dest="json_out", help="write the report (JSON) here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--short-answer-words", type=int, default=8, help="longest answer to generate")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.add_argument("--base", help="base model when the recorded one moved (adapter checkpoints)")
    return p


@command("lvlm-tune eval", also=(ValueError,))
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json_out:
        require_writable_file(args.json_out, "--json")  # before the whole evaluation runs
    report = evaluate(
        args.model,
        args.data,
        template=args.template,
        image_folder=args.image_folder,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        short_answer_words=args.short_answer_words,
        limit=args.limit,
        base=args.base,
    )
    if args.json_out:
        text = json.dumps(report, indent=2, allow_nan=False)
        Path(args.json_out).write_text(text, encoding="utf-8")
    print(json.dumps(report["metrics"], indent=2, allow_nan=False))
    return 0
