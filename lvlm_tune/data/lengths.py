"""Per-sample token lengths for the length-grouped sampler and the length statistics.

A sample's length is its text tokens plus its image tokens, capped at ``model_max_length``:

* **image tokens** are exact: a fixed count per image, or, for the anyres families, the
  encoder's counter told the sizes of the sample's images, read from the image headers (no
  decoding) once per sample; the counter is memoized per tuple of sizes, so repeated sizes
  cost nothing;
* **text tokens** come from the word counts the record cache already holds, through a linear
  fit ``tokens = a * words + b`` measured on a seeded sample of the data encoded by the run's
  own encoder (template, system prompt and tokenizer included), rather than a fixed
  words-to-tokens ratio that ignores the template's text.

Lengths are negative for samples without images (the sampler groups by that sign). A sample
whose record or image cannot be read counts its text only; encoding will report it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lvlm_tune.data.errors import BadSampleError

CALIBRATION_SAMPLES = 256


def image_token_totals(
    source: Any, encoder: Any, images: Any, read: Any, known: dict | None = None
) -> np.ndarray:
    """Total image tokens of every sample (``int64``), from header sizes when counts vary
    (``read(index)``: the record as the run trains it). ``known``, when given, is filled with
    the sizes read (sample index -> tuple of ``(height, width)``), so encoding need not read
    the headers again."""
    num_images = source.num_images().astype(np.int64)
    if encoder.num_image_tokens is not None:
        return num_images * encoder.num_image_tokens
    totals = np.zeros(len(source), dtype=np.int64)
    for index in np.flatnonzero(num_images):
        try:
            sizes = tuple(images.sizes(read(int(index))))
        except BadSampleError:
            continue
        if known is not None:
            known[int(index)] = sizes
        if sizes:
            totals[index] = sum(encoder.image_counter(sizes))
    return totals


def text_token_fit(source: Any, encode: Any, seed: int = 0) -> tuple[float, float]:
    """``(a, b)`` of ``text tokens = a * words + b`` over a seeded sample of the data.

    ``encode(index)`` returns the encoded sample (``EncodedSample``); truncated and bad
    samples are left out of the fit. Falls back to the common 4/3 tokens per word.
    """
    words = source.num_words().astype(np.float64)
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(source))[:CALIBRATION_SAMPLES]
    xs, ys = [], []
    for index in picked:
        try:
            sample = encode(int(index))
        except BadSampleError:
            continue
        if sample.truncated:
            continue
        xs.append(words[index])
        ys.append(len(sample.input_ids) - sum(sample.image_tokens))
    if len(xs) >= 2 and np.ptp(xs) > 0:
        a, b = np.polyfit(np.asarray(xs), np.asarray(ys, dtype=np.float64), 1)
        return float(a), float(b)
    if xs:
        return float(np.mean(ys) / max(np.mean(xs), 1.0)), 0.0
    return 4 / 3, 1.0


def modality_lengths(
    source: Any, encoder: Any, images: Any, read: Any, encode: Any, known: dict | None = None
) -> np.ndarray:
    """Estimated length of every sample, negative for samples without images (the sampler's
    input); ``read(index)`` gives the record, ``encode(index)`` the encoded sample, ``known``
    collects the image sizes read (see :func:`image_token_totals`)."""
    totals = image_token_totals(source, encoder, images, read, known)
    a, b = text_token_fit(source, encode, seed=encoder.seed)
    text = np.maximum(np.rint(a * source.num_words().astype(np.float64) + b), 1).astype(np.int64)
    length = np.minimum(text + totals, encoder.model_max_length)
    return np.where(source.num_images() > 0, length, -length)
