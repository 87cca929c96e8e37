"""How good a trained model is on a data file: answer-token loss, perplexity, answer accuracy.

Loss and perplexity on the answer tokens: the data go through the training dataset and
collator (the run's encoder from :meth:`~lvlm_tune.inference.load.LoadedRun.encoder`: same
template, masking, image expansion and truncation), and the loss is averaged over every
trained token of the file. Answer accuracy: for samples whose final answer is short, the model
answers the conversation up to its last question (greedy, batched, the training prompt and
STOP) and the answer is compared to the reference: exact match and "contains" after
lower-casing and stripping punctuation. Loss and perplexity are ``None`` (never NaN) when the
samples hold no answer tokens.
"""

from __future__ import annotations

import math
import os
import re
import string
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from lvlm_tune.data.collator import MultimodalCollator, pad_token_id
from lvlm_tune.data.dataset import SupervisedDataset
from lvlm_tune.data.encoder import IGNORE_INDEX
from lvlm_tune.data.sources import open_source
from lvlm_tune.errors import UserError, require_path
from lvlm_tune.inference.answer import Answerer
from lvlm_tune.inference.load import load_run


def normalize(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def answer_loss(
    model: Any, batches: Iterable[dict[str, Any]], blank: torch.Tensor | None = None
) -> tuple[float, int]:
    """Summed cross-entropy over answer tokens (labels != -100) and their count.

    The loss is the model's own (``loss_function``, the one training minimises), asked for
    the sum: ``num_items_in_batch=1`` is transformers' hook for normalising by a token count
    that spans batches, here the whole file's, divided once by the caller. The loop stays
    hand-written because ``Trainer.evaluate`` averages per-batch mean losses weighted by batch
    size, not by answer tokens, which is not the file's per-token loss (or perplexity).

    ``blank``: pixels for text-only batches of models whose forward always runs the vision path.
    """
    total, count = 0.0, 0
    param = next(model.parameters())
    for batch in batches:
        inputs = {k: v.to(param.device) for k, v in batch.items()}
        if "pixel_values" not in inputs and blank is not None:
            inputs["pixel_values"] = blank.to(param.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
        total += model(**inputs, num_items_in_batch=1).loss.item()
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total, count


def perplexity(loss: float | None) -> float | None:
    """``exp(loss)``; ``None`` without a loss or where it would overflow (JSON has no inf)."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return None


def _check(limit: int | None, batch_size: int, data: Any, image_folder: Any) -> None:
    for key, value in (("--limit", limit), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{key}: must be at least 1, got {value}")
    require_path(os.fspath(data), "--data", hub_id_ok=False)
    if image_folder:
        require_path(os.fspath(image_folder), "--image-folder", hub_id_ok=False)


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

    Args:
        model_dir: a merged folder, run folder or ``checkpoint-N``.
        data: a data file in any format training reads.
        template: another template than the run card's.
        image_folder: where image paths are relative to (default: the data file's folder;
            only an explicit folder confines the paths).
        batch_size: samples per forward pass and per ``generate`` call.
        max_new_tokens: the longest generated answer.
        short_answer_words: samples whose final answer has at most this many words are
            answered and scored.
        limit: evaluate only the first ``limit`` samples.
        base: the base model when the recorded one moved (adapter checkpoints).
        progress: show progress bars.

    Raises:
        UserError: ``limit`` or ``batch_size`` below 1, or a missing data file or image folder
            (checked before the model loads).
    """
    _check(limit, batch_size, data, image_folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_run(model_dir, base=base, device=device)
    encoder = loaded.encoder(template)
    folder = image_folder or os.path.dirname(os.path.abspath(data))
    images = loaded.images(folder, allow_outside_folder=image_folder is None)
    source = open_source(data)
    videos = loaded.videos(folder, allow_outside_folder=image_folder is None)
    dataset = SupervisedDataset(source, encoder, images, videos=videos)
    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    collate = MultimodalCollator(pad_token_id(loaded.processor.tokenizer))
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
        loaded.model, loaded.processor, encoder, images,
        needs_pixels=loaded.family.forward_needs_pixels, videos=videos,
    )  # fmt: skip
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
        "template": encoder.template_name,
        "metrics": metrics,
        "samples": samples,
    }
