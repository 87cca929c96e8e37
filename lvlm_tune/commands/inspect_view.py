"""The views of ``lvlm-tune inspect``: a sample (or both sides of a preference pair) decoded
with its trained spans marked, its ``--json`` row, and the statistics over the inspected
samples."""

from __future__ import annotations

from typing import Any

import numpy as np

from lvlm_tune.data.encoder import IGNORE_INDEX, EncodedSample
from lvlm_tune.data.errors import SkipLedger
from lvlm_tune.data.preference import SIDES
from lvlm_tune.data.preference_encoder import EncodedPair

GREEN, RESET = "\033[32m", "\033[0m"


def render_sample(tokenizer: Any, sample: EncodedSample, image_id: int, color: bool) -> str:
    """Decode a sample with trained spans marked (green, or ``[[...]]`` without ``color``) and
    image runs collapsed to ``<image x N>``."""
    trained = sample.labels != IGNORE_INDEX
    ids, out, i = sample.input_ids, [], 0
    while i < len(ids):
        j = i
        if ids[i] == image_id:
            while j < len(ids) and ids[j] == image_id:
                j += 1
            out.append(f"<image x {j - i}>")
        else:
            while j < len(ids) and ids[j] != image_id and trained[j] == trained[i]:
                j += 1
            text = tokenizer.decode(ids[i:j].tolist())
            if trained[i]:
                text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
            out.append(text)
        i = j
    return "".join(out)


def show_sample(tokenizer: Any, sample: EncodedSample, image_id: int, color: bool) -> str:
    """A sample's human view: a header and the sample with its trained spans marked."""
    header = f"=== sample {sample.id!r} ({len(sample.input_ids)} tokens) ==="
    return f"{header}\n{render_sample(tokenizer, sample, image_id, color)}\n"


def show_pair(tokenizer: Any, pair: EncodedPair, image_id: int, color: bool) -> str:
    """A pair's human view: the chosen and the rejected side, each with its mask marked (only
    the final answer + STOP trains)."""
    lines = [f"=== pair {pair.id!r} ({pair.prompt_length} prompt tokens) ==="]
    for side in SIDES:
        sample = getattr(pair, side)
        lines.append(f"--- {side} ({len(sample.input_ids)} tokens, {sample.num_trained} trained) ---")  # fmt: skip
        lines.append(render_sample(tokenizer, sample, image_id, color))
    return "\n".join(lines) + "\n"


def sample_row(sample: EncodedSample, image_id: int) -> dict[str, Any]:
    """A sample's ``--json`` row."""
    return {
        "id": sample.id,
        "input_ids": sample.input_ids.tolist(),
        "labels": sample.labels.tolist(),
        "image_token_id": image_id,
    }


def pair_row(pair: EncodedPair, image_id: int) -> dict[str, Any]:
    """A pair's ``--json`` row: both sides' ids and labels."""
    row: dict[str, Any] = {"id": pair.id}
    for side in SIDES:
        sample = getattr(pair, side)
        row[f"{side}_input_ids"] = sample.input_ids.tolist()
        row[f"{side}_labels"] = sample.labels.tolist()
    return {**row, "image_token_id": image_id}


def pairs_report(pairs: list[EncodedPair], ledger: SkipLedger) -> str:
    """:func:`stats_report` over both sides of the pairs, after the pair count."""
    sides = [getattr(pair, side) for pair in pairs for side in SIDES]
    return f"pairs encoded: {len(pairs)}\n" + stats_report(sides, ledger, "sides (chosen + rejected)")  # fmt: skip


def stats_report(samples: list[EncodedSample], ledger: SkipLedger, what: str = "samples") -> str:
    """Counts, trained share, length percentiles, truncations, image tokens, escaped control
    text, skips (``what``: the name of the encoded things)."""
    per_image = [n for s in samples for n in s.image_tokens]
    images = (
        f"images kept: {len(per_image)}, tokens per image min/max: "
        f"{min(per_image)}/{max(per_image)}"
        if per_image
        else "images kept: 0"
    )
    lengths = np.array([len(s.input_ids) for s in samples]) if samples else np.zeros(1)
    trained = sum(s.num_trained for s in samples)
    total = max(int(lengths.sum()), 1)
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return "\n".join(
        [
            f"{what} encoded: {len(samples)}",
            f"trained tokens: {trained} of {total} ({trained / total:.1%})",
            f"length p50/p90/p99/max: {p50:.0f}/{p90:.0f}/{p99:.0f}/{lengths.max()}",
            f"truncated: {sum(s.truncated for s in samples)}",
            images,
            f"control-token text tokenized as text: {sum(s.num_escaped for s in samples)} "
            f"occurrence(s) in {sum(1 for s in samples if s.num_escaped)} sample(s)",
            ledger.summary(),
        ]
    )
