"""How many tokens each image of a sample becomes: fixed per model, or from the image sizes.

LLaVA-1.5 and MiniGPT-4 turn every image into the same number of tokens. LLaVA-NeXT and
LLaVA-OneVision tile an image at its aspect ratio ("anyres"), so the count depends on the
image's size, and OneVision also on how many images the sample holds (several images are
encoded at base resolution only). An :data:`ImageTokenCounter` is told the sizes of all the
images a sample keeps, in order, and returns each image's token count; the model family
builds it from the model's own processor (:mod:`lvlm_tune.models.anyres`).

Sizes are ``(height, width)`` in pixels, the order of the processors' ``image_sizes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

ImageSize = tuple[int, int]  # (height, width)
ImageTokenCounter = Callable[[Sequence[ImageSize]], list[int]]


class FixedImageTokens:
    """The counter of a model whose images always become ``count`` tokens."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"image tokens per image must be positive, got {count}")
        self.count = int(count)

    def __call__(self, sizes: Sequence[ImageSize]) -> list[int]:
        return [self.count] * len(sizes)

    def __repr__(self) -> str:
        return f"FixedImageTokens({self.count})"


def as_counter(image_tokens: int | ImageTokenCounter) -> ImageTokenCounter:
    """A counter from a fixed count, or the size-dependent counter memoized (:func:`memoized`)."""
    if isinstance(image_tokens, int):
        return FixedImageTokens(image_tokens)
    return memoized(image_tokens)


def fixed_count(counter: ImageTokenCounter) -> int | None:
    """The count every image gets under ``counter``, or ``None`` when it depends on sizes."""
    return counter.count if isinstance(counter, FixedImageTokens) else None


class MemoCounter:
    """``counter`` with its answers kept per tuple of sizes (at most ``limit`` of them).

    Real data repeats image sizes (a dataset's photos come in a few resolutions), and
    truncation asks for the counts of several prefixes of the same sample, so most calls are
    answered from the memo. The memo is not pickled (DataLoader workers start empty).
    """

    def __init__(self, counter: ImageTokenCounter, limit: int = 1 << 16) -> None:
        self.counter = counter
        self.limit = limit
        self._memo: dict[tuple[ImageSize, ...], list[int]] = {}

    def __call__(self, sizes: Sequence[ImageSize]) -> list[int]:
        key = tuple((int(h), int(w)) for h, w in sizes)
        counts = self._memo.get(key)
        if counts is None:
            counts = list(self.counter(key))
            if len(self._memo) >= self.limit:
                self._memo.clear()
            self._memo[key] = counts
        return list(counts)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_memo": {}}

    def __repr__(self) -> str:
        return f"MemoCounter({self.counter!r})"


def memoized(counter: ImageTokenCounter) -> ImageTokenCounter:
    """A memoizing wrapper for a size-dependent counter; a fixed counter is returned as is."""
    if isinstance(counter, FixedImageTokens | MemoCounter):
        return counter
    return MemoCounter(counter)
