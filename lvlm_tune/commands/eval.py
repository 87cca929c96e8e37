"""``lvlm-tune eval``: how good a trained model is on a data file.

Two kinds of numbers. Loss and perplexity on the answer tokens: the data go through the training
dataset and collator (same template, masking, image expansion and truncation), and the loss is
averaged over every trained token of the file. Answer accuracy: for samples whose final answer is
short, the model answers the conversation up to its last question (greedy, batched, the training
prompt and STOP) and the answer is compared to the reference: exact match and "contains" after
lower-casing and stripping punctuation. Works on merged folders and adapter checkpoints. Loss
and perplexity are ``null`` (never NaN) when the samples hold no answer tokens; ``--json`` and
``--limit`` are checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import string
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lvlm_tune.data.collator import MultimodalCollator, pad_token_id
from lvlm_tune.data.dataset import SupervisedDataset
from lvlm_tune.data.encoder import IGNORE_INDEX, ConversationEncoder
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.sources import open_source
from lvlm_tune.errors import UserError, command, require_path, require_writable_file
from lvlm_tune.inference.answer import Answerer
from lvlm_tune.inference.load import load_run
from lvlm_tune.models.parts import unwrap_model


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


def normalize(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def answer_loss(model: Any, batches: Any, blank: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed cross-entropy over answer tokens (labels != -100) and their count.

    ``blank``: pixels for text-only batches of models whose forward always runs the vision path.
    """
    total, count = 0.0, 0
    for batch in batches:
        labels = batch.pop("labels")
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        inputs = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" not in inputs and blank is not None:
            inputs["pixel_values"] = blank.to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        logits = model(**inputs).logits.float()
        shifted = labels[:, 1:].to(device)
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            shifted.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        count += int((shifted != IGNORE_INDEX).sum())
    return total, count


def perplexity(loss: float | None) -> float | None:
    """``exp(loss)``; ``None`` without a loss or where it would overflow (JSON has no inf)."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return None


def evaluate(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    *,
    template: str | None = None,
    image_folder: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    short_answer_words: int = 8,
    limit: int | None = None,
    base: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` on ``data``; returns the report (``metrics`` + per-sample answers).

    Raises:
        UserError: ``limit`` or ``batch_size`` below 1, or a missing data file or image folder
            (checked before the model loads).
    """
    for key, value in (("--limit", limit), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{key}: must be at least 1, got {value}")
    require_path(os.fspath(data), "--data", hub_id_ok=False)
    if image_folder:
        require_path(os.fspath(image_folder), "--image-folder", hub_id_ok=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_run(model_dir, base=base, device=device)
    card, processor = loaded.card, loaded.processor
    template = template or card.get("template", "tokenizer")
    encoder = ConversationEncoder(
        processor.tokenizer,
        template,
        num_image_tokens=loaded.family.num_image_tokens(unwrap_model(loaded.model)),
        model_max_length=card.get("model_max_length") or 2048,
        image_position=card.get("image_position") or "before",
        system=card.get("system_prompt"),
        instruction_pool=card.get("instruction_pool"),
    )
    folder = image_folder or os.path.dirname(os.path.abspath(data))
    images = ImageLoader(
        processor.image_processor, folder, card.get("image_aspect_ratio") or "none",
        allow_outside_folder=image_folder is None,  # only an explicit folder confines paths
    )  # fmt: skip
    source = open_source(data)
    dataset = SupervisedDataset(source, encoder, images)
    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    collate = MultimodalCollator(pad_token_id(processor.tokenizer))
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    batches = (
        collate([dataset[i] for i in chunk])
        for chunk in tqdm(chunks, desc="loss", disable=not progress)
    )
    blank = images.blank() if loaded.family.forward_needs_pixels else None
    total, count = answer_loss(loaded.model, batches, blank)

    records = [source.get(i) for i in indices]
    short = [
        r
        for r in records
        if r.turns
        and r.turns[-1].role == "assistant"
        and len(r.turns[-1].content.split()) <= short_answer_words
    ]
    answerer = Answerer(
        loaded.model, processor, encoder, images, needs_pixels=loaded.family.forward_needs_pixels
    )
    samples = []
    for start in tqdm(range(0, len(short), batch_size), desc="answers", disable=not progress):
        group = short[start : start + batch_size]
        prompts = [replace(r, turns=r.turns[:-1]) for r in group]
        for record, prediction in zip(
            group, answerer.answer(prompts, max_new_tokens=max_new_tokens), strict=True
        ):
            reference = record.turns[-1].content
            samples.append(
                {
                    "id": record.id,
                    "reference": reference,
                    "prediction": prediction,
                    "exact_match": normalize(prediction) == normalize(reference),
                    "contains": normalize(reference) in normalize(prediction),
                }
            )
    mean = total / count if count else None  # no answer tokens: no loss (JSON has no NaN)
    metrics: dict[str, Any] = {
        "loss": mean,
        "perplexity": perplexity(mean),
        "answer_tokens": count,
        "num_samples": len(indices),
        "num_generated": len(samples),
    }
    if samples:
        metrics["exact_match"] = sum(s["exact_match"] for s in samples) / len(samples)
        metrics["contains"] = sum(s["contains"] for s in samples) / len(samples)
    return {
        "model": os.fspath(model_dir),
        "data": os.fspath(data),
        "template": template,
        "metrics": metrics,
        "samples": samples,
    }


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
