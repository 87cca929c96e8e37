"""Image loading: RGB decode, optional pad-to-square, the model's image processor.

Images are opened from a path (relative to ``image_folder``), raw bytes, or an already decoded
PIL image (Hugging Face datasets). ``aspect_ratio="pad"`` pads to a square with the processor's
mean colour before processing, as LLaVA-1.5 does. Processing uses the processor's PIL/numpy path
(no torchvision).

Every problem raises ``BadSampleError`` naming the file, sample and field: a missing or empty
file (``missing_image`` / ``corrupt_image``), anything PIL cannot decode, truncated files
included (``corrupt_image``), an image of more than ``max_image_pixels`` pixels
(``image_too_large``: refused from the size in its header, before any pixel is decoded), and,
when an ``image_folder`` is set, a path that resolves (through ``..``, an absolute path or a
symlink) to a file outside it (``image_outside_folder``, unless ``allow_outside_folder``).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image, ImageFile

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.record import Conversation, ImageRef

ASPECT_RATIOS = ("none", "pad")
# The image processors' outputs that are model inputs (LLaVA: pixel_values; NeXT/OneVision add
# the sizes the features are unpadded with and, OneVision, the images per sample).
IMAGE_INPUT_KEYS = ("pixel_values", "image_sizes", "batch_num_images")
# PIL's own default (Image.MAX_IMAGE_PIXELS): about 9459 x 9459, a 268 MB RGB decode.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


@contextlib.contextmanager
def _pil_settings(max_pixels: int | None) -> Iterator[None]:
    """Run PIL with ``max_pixels`` as its decompression-bomb limit, refusing truncated files.

    Both are process-wide PIL settings (code elsewhere, such as the original LLaVA's, sets
    ``ImageFile.LOAD_TRUNCATED_IMAGES = True``, which decodes a cut file as grey). Each loader
    has its own limit, checked from the header right after opening, so PIL is told the same
    while the loader opens a file (it refuses over twice its limit while opening and warns
    above it; the warning is silenced, the loader refuses such an image itself).
    """
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


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
        max_image_pixels: images with more pixels (width x height, from the file's header) are
            refused before decoding; 0 or ``None``: no limit.
        allow_outside_folder: accept paths that resolve outside ``image_folder``.
    """

    def __init__(
        self,
        image_processor: Any = None,
        image_folder: str | os.PathLike | None = None,
        aspect_ratio: str = "none",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        allow_outside_folder: bool = False,
    ) -> None:
        if aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(
                f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {aspect_ratio!r}"
            )
        if max_image_pixels is not None and max_image_pixels < 0:
            raise ValueError(f"max_image_pixels must be >= 0, got {max_image_pixels}")
        self.processor = image_processor
        self.folder = os.fspath(image_folder) if image_folder is not None else ""
        self.aspect_ratio = aspect_ratio
        self.max_pixels = max_image_pixels or None
        self.allow_outside_folder = allow_outside_folder
        mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self.background = tuple(round(255 * m) for m in mean)

    def open(
        self, ref: ImageRef, record: Conversation, k: int, field: str | None = None
    ) -> Image.Image:
        """Decode image ``k`` of ``record`` as RGB (``field`` names it in errors)."""
        return self._read(ref, record, k, field, decode=True)

    def size(
        self, ref: ImageRef, record: Conversation, k: int, field: str | None = None
    ) -> tuple[int, int]:
        """``(height, width)`` of image ``k`` of ``record`` from its header (no decoding),
        after padding to a square when ``aspect_ratio`` is ``pad``; the same checks as
        :meth:`open` but for a truncated body, which only decoding finds."""
        width, height = self._read(ref, record, k, field, decode=False)
        if self.aspect_ratio == "pad":
            width = height = max(width, height)
        return height, width

    def _read(
        self, ref: ImageRef, record: Conversation, k: int, field: str | None, decode: bool
    ) -> Any:
        """The decoded RGB image, or (``decode=False``) its ``(width, height)``."""
        field = field or ("image" if len(record.images) == 1 else f"image[{k}]")

        def bad(problem: str, reason: str) -> BadSampleError:
            return BadSampleError(record.source, record.id, field, problem, reason)

        name = f"{ref!s:.200}"
        try:
            if isinstance(ref, dict):  # datasets Image feature without decoding
                ref = ref.get("bytes") or ref.get("path")
            if isinstance(ref, Image.Image):  # decoded already (Hugging Face datasets)
                self._check_size(ref.size, "the image", bad)
                return ref.convert("RGB") if decode else ref.size
            if isinstance(ref, bytes | bytearray):
                name, fp = f"<{len(ref)} bytes>", io.BytesIO(ref)
            elif isinstance(ref, str | os.PathLike):
                name = fp = self._resolve(ref, bad)
            else:
                raise bad(f"unsupported image reference of type {type(ref).__name__}", "bad_field")
            with _pil_settings(self.max_pixels), Image.open(fp) as image:
                self._check_size(image.size, name, bad)
                if not decode:
                    return image.size
                image.load()
                return image.convert("RGB")
        except BadSampleError:
            raise
        except Image.DecompressionBombError as err:
            raise bad(f"{name}: {err}", "image_too_large") from err
        except Exception as err:
            # PIL's format plugins raise many types for malformed files (OSError for truncated
            # data, SyntaxError, ValueError, struct.error, EOFError, IndexError...): every
            # failure to decode one sample's image is that sample's problem.
            problem = f"cannot decode image {name}: {type(err).__name__}: {err}"
            raise bad(problem, "corrupt_image") from err

    def _resolve(self, ref: str | os.PathLike, bad: Any) -> str:
        """The file ``ref`` names, checked to exist, be non-empty and stay inside the folder."""
        path = os.path.join(self.folder, os.fspath(ref))
        if self.folder and not self.allow_outside_folder:
            root, real = os.path.realpath(self.folder), os.path.realpath(path)
            try:
                inside = os.path.commonpath([root, real]) == root
            except ValueError:  # different drives
                inside = False
            if not inside:
                raise bad(
                    f"image path {os.fspath(ref)!r} resolves to {real}, outside image_folder "
                    f"{root} (set allow_outside_image_folder: true to allow such paths)",
                    "image_outside_folder",
                )
        if not os.path.isfile(path):
            raise bad(f"image file not found: {path}", "missing_image")
        if os.path.getsize(path) == 0:
            raise bad(f"image file is empty (0 bytes): {path}", "corrupt_image")
        return path

    def _check_size(self, size: tuple[int, int], name: str, bad: Any) -> None:
        width, height = size
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise bad(
                f"{name}: {width}x{height} = {width * height:,} pixels, more than "
                f"max_image_pixels={self.max_pixels:,} (refused before decoding)",
                "image_too_large",
            )

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

    def sizes(self, record: Conversation, count: int | None = None) -> list[tuple[int, int]]:
        """``(height, width)`` of the first ``count`` images (all by default), from headers."""
        refs = record.images if count is None else record.images[:count]
        return [self.size(ref, record, k) for k, ref in enumerate(refs)]

    def model_inputs(self, record: Conversation, count: int | None = None) -> dict[str, Any]:
        """The image processor's outputs for the record's first ``count`` images as one
        sample's model inputs: ``pixel_values`` (num_images, C, H, W), or (num_images,
        patches, C, H, W) for the anyres processors, which add ``image_sizes`` and, for
        OneVision, ``batch_num_images`` (this sample's image count); empty without images."""
        images = self.load(record, count)
        if not images or self.processor is None:
            return {}
        # One nested list: the images of one sample (OneVision counts them per sample).
        out = self.processor(images=[images], return_tensors="pt")
        return {key: out[key] for key in out if key in IMAGE_INPUT_KEYS}

    def pixel_values(self, record: Conversation, count: int | None = None) -> torch.Tensor | None:
        """``pixel_values`` for the record's first ``count`` images (see :meth:`model_inputs`)."""
        return self.model_inputs(record, count).get("pixel_values")
