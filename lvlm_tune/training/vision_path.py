"""Text-only batches run the vision path too, on a blank image and with zero effect.

An image batch runs embeddings -> vision tower -> projector -> LLM. Under DeepSpeed every rank
must run the same modules in the same order in every step (ZeRO-3 gathers parameters as modules
run, ZeRO-2/3 reduce gradients in buckets), so a rank whose batch holds no image still runs the
vision path: the blank image's features, times zero, are added to the token embeddings right
after they are computed (:func:`vision_path_after_embeddings`), or to the loss when the
family's forward never embeds tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image

from lvlm_tune.models.parts import unwrap_model
from lvlm_tune.models.registry import ModelFamily


def blank_image_sizes(pixel_values: torch.Tensor | None, processor: Any) -> torch.Tensor | None:
    """``image_sizes`` of the blank image (``ImageLoader.blank``: 8 x 8 pixels) for processors
    that tile images by size (anyres: 5-D ``pixel_values``); ``None`` for the others."""
    if pixel_values is None or pixel_values.dim() != 5:
        return None
    image_processor = getattr(processor, "image_processor", processor)
    out = image_processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")
    return out["image_sizes"]


def blank_features(
    family: ModelFamily,
    model: Any,
    blank: torch.Tensor,
    like: torch.Tensor,
    image_sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The family's image features of ``blank`` (pixels; anyres: of ``image_sizes``), on
    ``like``'s device."""
    base = unwrap_model(model)
    dtype = next(base.parameters()).dtype
    pixels = blank.to(device=like.device, dtype=dtype)
    if image_sizes is None:
        return family.image_features(base, pixels)
    return family.image_features(base, pixels, image_sizes=image_sizes)


@contextlib.contextmanager
def vision_path_after_embeddings(
    model: Any, features: Callable[[torch.Tensor], torch.Tensor], *, every_forward: bool = False
) -> Iterator[list[bool]]:
    """Inside the block, ``model``'s first token embedding also runs ``features(output)``
    (times zero). Yields a list that holds ``True`` once it ran.

    ``every_forward``: every token embedding runs it, for blocks that run the model more than
    once (a preference step's policy and reference forwards); each forward of the families
    that use this hook embeds its tokens exactly once."""
    fired: list[bool] = []
    embeddings = unwrap_model(model).get_input_embeddings()

    def add_vision_path(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        if fired and not every_forward:
            return output
        fired.append(True)
        return output + 0.0 * features(output).sum().to(output.dtype)

    handle = embeddings.register_forward_hook(add_vision_path)
    try:
        yield fired
    finally:
        handle.remove()
