"""The processors of the anyres families (LLaVA-NeXT, LLaVA-OneVision), without torchvision.

Owns: the grid pinpoints (the tile grids an image may be cut into) in pixels for a tower's
tile size; composing a ``LlavaNextProcessor`` or a OneVision processor from a tokenizer and a
PIL image processor; saving and loading them.

``transformers``' ``LlavaOnevisionProcessor`` always holds a video processor, and its only
video processor (``LlavaOnevisionVideoProcessor``) needs torchvision: neither constructing the
processor (even with ``video_processor=None``) nor ``AutoProcessor.from_pretrained`` of any
OneVision folder works without it. :class:`OnevisionImageProcessor` is the same processor
(same ``__call__``, token counts and saved fields) without a video processor. It saves the
published folder layout — ``processor_config.json`` naming ``LlavaOnevisionProcessor``,
``preprocessor_config.json`` (the image processor) and ``video_preprocessor_config.json`` (the
video processor's settings, written as JSON) — so plain transformers with torchvision loads
our folders with ``AutoProcessor``, and :func:`load_anyres_processor` reads our folders and
published ones (``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``) here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
)

from lvlm_tune.data.video import read_video_config

VIDEO_TOKEN = "<video>"
PROCESSOR_FILE = "processor_config.json"
VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"

# The published tile grids, (rows, columns) in tiles. LLaVA-NeXT (llava-v1.6-*: 336 px tiles
# -> [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]); OneVision
# (llava-onevision-qwen2-*-ov: 384 px tiles, every grid from 1x1 to 6x6).
NEXT_GRIDS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
ONEVISION_GRIDS: tuple[tuple[int, int], ...] = tuple(
    (rows, cols) for rows in range(1, 7) for cols in range(1, 7)
)


def parse_grids(spec: str | None, default: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Tile grids from a recipe's ``image_grid_pinpoints`` text: ``"1x2,2x1,2x2"`` (rows x
    columns, in tiles); ``None`` or empty: ``default``. Raises ``ValueError`` naming the key."""
    if not spec:
        return list(default)
    grids = []
    for item in str(spec).replace(" ", "").split(","):
        rows, x, cols = item.partition("x")
        if not (x and rows.isdigit() and cols.isdigit()) or int(rows) < 1 or int(cols) < 1:
            raise ValueError(
                f"image_grid_pinpoints: cannot read {item!r}; write grids as ROWSxCOLUMNS "
                "in tiles, comma-separated (e.g. 1x2,2x1,2x2)"
            )
        grids.append((int(rows), int(cols)))
    return grids


def check_anyres_options(image_grid_pinpoints: str | None, vision_aspect_ratio: str) -> None:
    """Raise ``ValueError`` naming the key for unreadable grids or an ``anyres_max_N`` typo."""
    parse_grids(image_grid_pinpoints, ())
    count = vision_aspect_ratio.removeprefix("anyres_max_")
    if count == vision_aspect_ratio or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"vision_aspect_ratio: {vision_aspect_ratio!r} is not anyres_max_N (e.g. anyres_max_9)"
        )


def grid_pinpoints(grids: Sequence[tuple[int, int]], tile: int) -> list[list[int]]:
    """The ``image_grid_pinpoints`` (``[height, width]`` in pixels) of ``grids`` for ``tile``."""
    return [[rows * tile, cols * tile] for rows, cols in grids]


def anyres_image_processor(base: Any, kind: str, pinpoints: list[list[int]]) -> Any:
    """The PIL anyres image processor with ``base``'s (the tower's) tile size and normalisation.

    ``kind``: ``"llava_next"`` or ``"llava_onevision"``. The tile is the base processor's crop
    size (CLIP) or size (SigLIP); OneVision resizes to the tile without cropping, as published.
    """
    size = getattr(base, "crop_size", None) or base.size
    tile = {"height": int(size["height"]), "width": int(size["width"])}
    common = {
        "image_mean": list(base.image_mean),
        "image_std": list(base.image_std),
        "image_grid_pinpoints": pinpoints,
        "do_pad": True,
    }
    if kind == "llava_next":
        return LlavaNextImageProcessorPil(
            size={"shortest_edge": tile["height"]}, crop_size=tile, **common
        )
    return LlavaOnevisionImageProcessorPil(size=tile, **common)


class OnevisionImageProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without its (torchvision-only) video processor.

    Takes the same arguments but ``video_processor``; ``__call__`` on images and text, the
    token counts and the saved fields are the parent's. Saving writes the published layout
    (see the module docstring).

    ``video_settings``: the video processor JSON of the folder it was loaded from; saving writes
    it back (over the settings derived from the image processor) so a folder saved from a loaded
    checkpoint processes frames as the checkpoint did.
    """

    video_settings: dict[str, Any] | None = None

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = VIDEO_TOKEN,
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs: Any,
    ) -> None:
        # The parent passes (image_processor, tokenizer, video_processor) on; ProcessorMixin
        # keeps only this class's attributes (image_processor, tokenizer).
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Any:
        """Save in the published layout: every ``processor_class`` is ``LlavaOnevisionProcessor``
        and the video processor's settings are written beside the image processor's."""
        out = super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        for name in (PROCESSOR_FILE, "preprocessor_config.json", "tokenizer_config.json"):
            path = folder / name
            if path.is_file():
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("processor_class") == type(self).__name__:
                    data["processor_class"] = LlavaOnevisionProcessor.__name__
                    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        video = {**video_processor_settings(self.image_processor), **(self.video_settings or {})}
        (folder / VIDEO_PROCESSOR_FILE).write_text(json.dumps(video, indent=2) + "\n")
        return out


def video_processor_settings(image_processor: Any) -> dict[str, Any]:
    """``LlavaOnevisionVideoProcessor``'s saved settings for frames processed like the images
    (each frame resized to the tile, no tiling), as the published folders hold them."""
    return {
        "video_processor_type": "LlavaOnevisionVideoProcessor",
        "processor_class": LlavaOnevisionProcessor.__name__,
        "do_resize": True,
        "size": dict(image_processor.size),
        "resample": int(image_processor.resample),
        "do_rescale": True,
        "rescale_factor": float(image_processor.rescale_factor),
        "do_normalize": True,
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
        "do_convert_rgb": True,
    }


def compose_processor(kind: str, tokenizer: Any, image_processor: Any, **fields: Any) -> Any:
    """``LlavaNextProcessor`` (``kind="llava_next"``) or :class:`OnevisionImageProcessor`."""
    if kind == "llava_next":
        return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, **fields)
    return OnevisionImageProcessor(image_processor=image_processor, tokenizer=tokenizer, **fields)


def load_anyres_processor(path: str | os.PathLike) -> Any:
    """The processor of a NeXT or OneVision folder (ours or a published one), without
    torchvision: the tokenizer, the image processor (PIL) and ``processor_config.json``'s
    fields; a OneVision folder's video processor is not read.

    Raises ``ValueError`` when the folder's ``config.json`` is of another model type.
    """
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type == "llava_next":
        return LlavaNextProcessor.from_pretrained(path)
    if model_type != "llava_onevision":
        raise ValueError(f"{path}: model_type {model_type!r} is not llava_next or llava_onevision")
    processor = OnevisionImageProcessor.from_pretrained(path)
    processor.video_settings = read_video_config(path) if os.path.isdir(path) else None
    return processor
