"""The human view of ``lvlm-tune inspect``: a sample decoded with its trained spans marked, and
the statistics over the inspected samples."""

from __future__ import annotations

from typing import Any

import numpy as np

from lvlm_tune.data.encoder import IGNORE_INDEX, EncodedSample
from lvlm_tune.data.errors import SkipLedger

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


def stats_report(samples: list[EncodedSample], ledger: SkipLedger) -> str:
    """Counts, trained share, length percentiles, truncations, image tokens, escaped control
    text, skips."""
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
            f"samples encoded: {len(samples)}",
            f"trained tokens: {trained} of {total} ({trained / total:.1%})",
            f"length p50/p90/p99/max: {p50:.0f}/{p90:.0f}/{p99:.0f}/{lengths.max()}",
            f"truncated: {sum(s.truncated for s in samples)}",
            images,
            f"control-token text tokenized as text: {sum(s.num_escaped for s in samples)} "
            f"occurrence(s) in {sum(1 for s in samples if s.num_escaped)} sample(s)",
            ledger.summary(),
        ]
    )
