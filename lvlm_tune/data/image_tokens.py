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
    """A counter from a fixed count (or the counter itself)."""
    if isinstance(image_tokens, int):
        return FixedImageTokens(image_tokens)
    return image_tokens


def fixed_count(counter: ImageTokenCounter) -> int | None:
    """The count every image gets under ``counter``, or ``None`` when it depends on sizes."""
    return counter.count if isinstance(counter, FixedImageTokens) else None
