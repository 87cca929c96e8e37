"""Token labels from character spans, proved exact; image expansion and truncation.

A token is trained iff it overlaps an answer + STOP span of the rendered text. Two checks then
prove the mask is exact and raise otherwise (there is no silent "mask everything" fallback):

* no trained token reaches past the end of its STOP (it would train text of the next turn);
* a trained token that starts before its answer only covers whitespace there (the separator
  that tokenizers merge into the first answer token, as the model will generate it).

Each image token is then expanded to that image's token count (HF LLaVA convention; fixed per
model, or from the image's size for the anyres families), and truncation to
``model_max_length`` counts the expansion and drops whole trailing turns with their images.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.image_tokens import ImageSize, ImageTokenCounter
from lvlm_tune.templates.render import Span

IGNORE_INDEX = -100


def answer_labels(
    text: str,
    spans: Sequence[Span],
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    fail: Callable[[str], Exception],
) -> tuple[list[int], list[int]]:
    """Labels for ``ids`` and the token counts that end right after each answer.

    Args:
        text: the rendered text.
        spans: the trained span of every answer, in order.
        ids: token ids of ``text``.
        offsets: each token's ``(start, end)`` in ``text``.
        fail: builds the exception raised when the mask cannot be exact.
    """
    n = len(ids)
    labels = [IGNORE_INDEX] * n
    cuts: list[int] = []  # token count that ends right after answer k (truncation points)
    starts, ends = tuple(zip(*offsets, strict=True)) if n else ((), ())
    # Offsets come in text order, so both lists are sorted and a span's first and last tokens
    # are found by bisection; the scans below are the fallback for a tokenizer that does not.
    ordered = list(starts) == sorted(starts) and list(ends) == sorted(ends)
    first = 0
    for k, span in enumerate(spans):
        floor = first
        # First token overlapping the span (zero-width tokens such as BOS never train).
        if ordered:
            first = bisect_right(ends, span.start, first)
        while first < n and (ends[first] <= span.start or starts[first] == ends[first]):
            first += 1
        # A separator the tokenizer kept as its own token (e.g. the space before a special
        # token such as [IMG0], or before a digit) trains too: the generation prompt ends
        # before it, so the model has to write it.
        while (
            first > floor
            and offsets[first - 1][0] >= span.sep_start
            and offsets[first - 1][0] < offsets[first - 1][1] <= span.start
            and not text[offsets[first - 1][0] : offsets[first - 1][1]].strip()
        ):
            first -= 1
        last = bisect_left(starts, span.end, first) if ordered else first
        while last < n and starts[last] < span.end:
            last += 1
        if last == first:
            raise fail(f"answer {k + 1} produced no tokens")
        token_start, token_end = offsets[first][0], offsets[last - 1][1]
        if token_end > span.end:
            # Only legal when the overflow is the next answer's own trained text.
            nxt = spans[k + 1] if k + 1 < len(spans) else None
            if nxt is None or nxt.start != span.end or token_end > nxt.end:
                raise fail(
                    f"token {text[offsets[last - 1][0] : token_end]!r} crosses the end of "
                    f"answer {k + 1}'s STOP into untrained text"
                )
        else:
            cuts.append(last)
        follows_answer = k > 0 and spans[k - 1].end == span.sep_start
        if (
            token_start < span.start
            and text[token_start : span.start].strip()
            and not follows_answer
        ):
            raise fail(
                f"token {text[token_start : offsets[first][1]]!r} merges untrained prompt "
                f"text into answer {k + 1}"
            )
        labels[first:last] = ids[first:last]
        first = last
    return labels, cuts


def expand_and_truncate(
    record: Any,
    ids: list[int],
    labels: list[int],
    cuts: list[int],
    image_id: int,
    counter: ImageTokenCounter,
    sizes: Sequence[ImageSize],
    model_max_length: int,
) -> tuple[list[int], np.ndarray, np.ndarray, list[int], bool]:
    """Expand image tokens and cut whole trailing turns to ``model_max_length``.

    ``counter`` gives each kept image's token count from the sizes of the images the sample
    keeps (``sizes``: one per image the text holds, in order; counts may depend on how many
    are kept, as OneVision's do), so a cut is chosen by the expanded length it really leaves.
    Returns the kept unexpanded ids, the expanded ids and labels, the token count of each kept
    image and whether the sample was truncated. Raises ``BadSampleError`` when the image tokens
    do not match the record's images or not even the first answer fits.
    """
    input_ids = np.asarray(ids, dtype=np.int64)
    image_at = np.flatnonzero(input_ids == image_id).tolist()
    if len(image_at) != len(sizes):
        raise BadSampleError.of(
            record, "conversations", f"the text holds {len(image_at)} image "
            f"token(s) for {len(sizes)} image(s) (does a message contain the image "
            "token text literally?)", "image_tag_mismatch",
        )  # fmt: skip

    def expanded(keep: int) -> tuple[int, list[int]]:
        """Expanded length and per-image counts when the first ``keep`` tokens stay."""
        kept = sum(a < keep for a in image_at)
        counts = counter(sizes[:kept]) if kept else []
        return keep + sum(counts) - kept, counts

    expanded_len, counts = expanded(len(ids))
    truncated = expanded_len > model_max_length
    if truncated:
        fitting = [c for c in cuts if expanded(c)[0] <= model_max_length]
        if not fitting:
            raise BadSampleError.of(
                record, "conversations", f"{expanded_len} tokens after image "
                "expansion and even the first answer ends beyond "
                f"model_max_length={model_max_length}", "no_trained_tokens",
            )  # fmt: skip
        keep = fitting[-1]
        ids, labels, input_ids = ids[:keep], labels[:keep], input_ids[:keep]
        image_at = [a for a in image_at if a < keep]
        counts = expanded(keep)[1]
    label_arr = np.asarray(labels, dtype=np.int64)
    if image_at and any(c != 1 for c in counts):
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[image_at] = counts
        input_ids = np.repeat(input_ids, repeats)
        label_arr = np.repeat(label_arr, repeats)
    return ids, input_ids, label_arr, counts, truncated
