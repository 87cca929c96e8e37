"""Image loading: RGB decode, optional pad-to-square, the model's image processor.

Images are opened from a path (relative to ``image_folder``), raw bytes, or an already decoded
PIL image (Hugging Face datasets). ``aspect_ratio="pad"`` pads to a square with the processor's
mean colour before processing, as LLaVA-1.5 does. Processing uses the processor's PIL/numpy path
(no torchvision). Missing and unreadable files raise ``BadSampleError`` naming the sample.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.record import Conversation, ImageRef

ASPECT_RATIOS = ("none", "pad")


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad ``image`` to a square, centred, filling with ``background``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class ImageLoader:
    """Turns a record's image references into ``pixel_values``.

    Args:
        image_processor: a Hugging Face image processor (PIL backend), or ``None`` to only
            decode (``inspect`` does not need pixels).
        image_folder: folder that relative image paths are resolved against.
        aspect_ratio: ``"none"`` or ``"pad"`` (pad to square with the processor's mean colour).
    """

    def __init__(
        self,
        image_processor: Any = None,
        image_folder: str | os.PathLike | None = None,
        aspect_ratio: str = "none",
    ) -> None:
        if aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(
                f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {aspect_ratio!r}"
            )
        self.processor = image_processor
        self.folder = os.fspath(image_folder) if image_folder is not None else ""
        self.aspect_ratio = aspect_ratio
        mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self.background = tuple(round(255 * m) for m in mean)

    def open(
        self, ref: ImageRef, record: Conversation, k: int, field: str | None = None
    ) -> Image.Image:
        """Decode image ``k`` of ``record`` as RGB (``field`` names it in errors)."""
        field = field or ("image" if len(record.images) == 1 else f"image[{k}]")
        try:
            if isinstance(ref, Image.Image):
                return ref.convert("RGB")
            if isinstance(ref, dict):  # datasets Image feature without decoding
                ref = ref.get("bytes") or ref.get("path")
            if isinstance(ref, bytes | bytearray):
                image = Image.open(io.BytesIO(ref))
            elif isinstance(ref, str | os.PathLike):
                path = os.path.join(self.folder, os.fspath(ref))
                if not os.path.isfile(path):
                    raise BadSampleError(
                        record.source, record.id, field, f"image file not found: {path}",
                        "missing_image",
                    )  # fmt: skip
                image = Image.open(path)
            else:
                raise BadSampleError(
                    record.source, record.id, field,
                    f"unsupported image reference of type {type(ref).__name__}", "bad_field",
                )  # fmt: skip
            image.load()
            return image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            if isinstance(err, BadSampleError):
                raise
            raise BadSampleError(
                record.source, record.id, field, f"cannot decode image {ref!s:.200}: {err}",
                "corrupt_image",
            ) from err  # fmt: skip

    def load(self, record: Conversation, count: int | None = None) -> list[Image.Image]:
        """Decode the first ``count`` images of ``record`` (all by default), padded if asked."""
        refs = record.images if count is None else record.images[:count]
        images = [self.open(ref, record, k) for k, ref in enumerate(refs)]
        if self.aspect_ratio == "pad":
            images = [expand_to_square(im, self.background) for im in images]
        return images

    def blank(self) -> torch.Tensor:
        """``pixel_values`` (1, C, H, W) of a black image: the vision input of text-only
        batches for models whose forward always runs the vision path."""
        if self.processor is None:
            raise ValueError("a blank image needs an image processor")
        pixels = self.processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")
        return pixels["pixel_values"]

    def pixel_values(self, record: Conversation, count: int | None = None) -> torch.Tensor | None:
        """``pixel_values`` (num_images, C, H, W) for the record's first ``count`` images."""
        images = self.load(record, count)
        if not images or self.processor is None:
            return None
        return self.processor(images=images, return_tensors="pt")["pixel_values"]
