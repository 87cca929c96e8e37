"""Video samples for LLaVA-OneVision: frame folders (and files), sampled to N frames, as pixels.

A sample names its video with the LLaVA key ``video`` (or ``videos``, a list): a folder of frame
images (``.jpg``/``.jpeg``/``.png``/``.webp``, taken in name order) or, where PyAV (``av``) is
importable, a video file (``.mp4``/``.mkv``/``.webm``/``.avi``/``.mov``). Paths are relative to the
video folder. Each video is sampled to exactly ``num_frames`` frames (OneVision trains with 32,
``frames_upbound`` in its published scripts) at evenly spaced indices that include the first
and the last frame, the same indices every epoch; a video with fewer frames is refused.

Frames become ``pixel_values_videos`` (videos, frames, C, H, W) exactly as transformers'
``LlavaOnevisionVideoProcessor`` computes them on CPU (which needs torchvision, absent here):
each frame resized to the processor's size with torch's antialiased resize on uint8 (the call
torchvision makes), then rescaled and normalised in one float32 step. ``benchmarks/video_parity.py``
checks the pixels and the model's video features against the real video processor
(``docs/video.md``). Every problem raises ``BadSampleError`` naming file, sample and field.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageLoader
from lvlm_tune.data.record import Conversation

VIDEO_TAG = "<video>"
# LLaVA-OneVision's published setting (frames_upbound in its finetune scripts).
DEFAULT_NUM_FRAMES = 32
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
VIDEO_FILE_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
VIDEO_INPUT_KEY = "pixel_values_videos"
# Where a checkpoint folder keeps its video processor's settings (new and older layouts).
VIDEO_CONFIG_FILES = ("video_preprocessor_config.json", "video_processor/preprocessor_config.json")
# PIL resampling codes -> torch interpolate modes (as torchvision maps them).
_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_SIZE_KEYS = ("height", "width", "shortest_edge")


def video_file_decoder() -> bool:
    """Whether video files can be decoded here (PyAV installed); frame folders always can."""
    return importlib.util.find_spec("av") is not None


def sample_indices(total: int, num_frames: int) -> list[int]:
    """``num_frames`` evenly spaced frame indices of ``total`` frames, first and last included
    (``floor(k * (total - 1) / (num_frames - 1))``, as ``numpy.linspace(..., dtype=int)``)."""
    if num_frames < 1:
        raise ValueError(f"video_num_frames must be positive, got {num_frames}")
    if total < num_frames:
        raise ValueError(f"{total} frame(s), fewer than video_num_frames={num_frames}")
    if num_frames == 1:
        return [0]
    return [k * (total - 1) // (num_frames - 1) for k in range(num_frames)]


@dataclass(frozen=True)
class FrameSettings:
    """How frames become pixels: the video processor's resize, rescale and normalisation."""

    height: int
    width: int
    resample: int = 3  # PIL code; 3 = bicubic
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def of(cls, image_processor: Any, video_config: dict[str, Any] | None = None) -> FrameSettings:
        """The settings of a checkpoint's video processor (``video_config``, its JSON), each
        missing key taken from the image processor (OneVision ships the same values in both)."""
        config = dict(video_config or {})

        def get(key: str) -> Any:
            return config[key] if config.get(key) is not None else getattr(image_processor, key)

        size = get("size")  # a dict, or the processors' SizeDict
        size = size if isinstance(size, dict) else {k: getattr(size, k, None) for k in _SIZE_KEYS}
        if size.get("height") and size.get("width"):
            height, width = int(size["height"]), int(size["width"])
        elif size.get("shortest_edge"):
            height = width = int(size["shortest_edge"])
        else:
            raise ValueError(f"video frames need a fixed size (height/width); got size={size}")
        resample = int(get("resample"))
        if resample not in _MODES:
            raise ValueError(f"video frames: resample {resample} is not supported ({_MODES})")
        return cls(
            height=height, width=width, resample=resample, do_resize=bool(get("do_resize")),
            do_rescale=bool(get("do_rescale")), rescale_factor=float(get("rescale_factor")),
            do_normalize=bool(get("do_normalize")),
            image_mean=tuple(float(m) for m in get("image_mean")),
            image_std=tuple(float(s) for s in get("image_std")),
        )  # fmt: skip


def read_video_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The video processor JSON of a checkpoint folder, or ``None`` when it has none."""
    for name in VIDEO_CONFIG_FILES:
        path = os.path.join(os.fspath(folder), name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    return None


def frame_settings(image_processor: Any, folder: str | os.PathLike | None = None) -> FrameSettings:
    """The frame settings of the checkpoint in ``folder``: its saved video processor
    (:func:`read_video_config`), each missing key (or all, without a folder or a saved video
    processor) taken from ``image_processor``. Training (the model folder it starts from) and
    inference (the folder it opens) both call this, so they process frames the same way."""
    config = read_video_config(folder) if folder and os.path.isdir(folder) else None
    return FrameSettings.of(image_processor, config)


def frames_to_pixels(frames: Sequence[Image.Image], settings: FrameSettings) -> torch.Tensor:
    """``(frames, 3, H, W)`` float32 pixels of RGB ``frames``, computed as the OneVision video
    processor computes them on CPU: torch's antialiased resize of the uint8 frame, then
    ``(x - mean / rescale_factor) / (std / rescale_factor)`` in float32."""
    size = [settings.height, settings.width]
    arrays = [torch.from_numpy(np.array(f.convert("RGB"))).permute(2, 0, 1) for f in frames]
    # Frames of one size are resized as one (frames, C, H, W) batch, as the processor does.
    same = len({tuple(a.shape) for a in arrays}) == 1
    batches = [torch.stack(arrays)] if same else [a[None] for a in arrays]
    out = []
    for pixels in batches:
        pixels = pixels.contiguous()
        if settings.do_resize and list(pixels.shape[-2:]) != size:
            mode = _MODES[settings.resample]
            pixels = torch.nn.functional.interpolate(
                pixels, size=size, mode=mode, antialias=mode != "nearest",
                align_corners=None if mode == "nearest" else False,
            )  # fmt: skip
        out.extend(pixels)
    video = torch.stack(out).to(torch.float32)
    mean = torch.tensor(settings.image_mean)
    std = torch.tensor(settings.image_std)
    if settings.do_rescale and settings.do_normalize:  # fused, as transformers does it
        mean, std = mean * (1.0 / settings.rescale_factor), std * (1.0 / settings.rescale_factor)
    elif settings.do_rescale:
        return video * settings.rescale_factor
    if settings.do_normalize:
        video = (video - mean[:, None, None]) / std[:, None, None]
    return video


class VideoLoader:
    """Turns a record's videos into ``pixel_values_videos``.

    Args:
        settings: the frame processing (:meth:`FrameSettings.of`); ``None`` only decodes.
        video_folder: folder that video paths are resolved against.
        num_frames: frames sampled from every video (``video_num_frames``).
        max_image_pixels: frames with more pixels are refused (as images are).
        allow_outside_folder: accept paths that resolve outside ``video_folder``.
    """

    def __init__(
        self,
        settings: FrameSettings | None,
        video_folder: str | os.PathLike | None = None,
        num_frames: int = DEFAULT_NUM_FRAMES,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        allow_outside_folder: bool = False,
    ) -> None:
        sample_indices(num_frames, num_frames)  # raises on a count below 1
        self.settings = settings
        self.folder = os.fspath(video_folder) if video_folder is not None else ""
        self.num_frames = int(num_frames)
        self.allow_outside_folder = allow_outside_folder
        self.frame_reader = ImageLoader(
            None, self.folder, max_image_pixels=max_image_pixels,
            allow_outside_folder=allow_outside_folder,
        )  # fmt: skip

    def _field(self, record: Conversation, k: int) -> str:
        return "video" if len(record.videos) == 1 else f"videos[{k}]"

    def _bad(self, record: Conversation, k: int, problem: str, reason: str) -> BadSampleError:
        return BadSampleError.of(record, self._field(record, k), problem, reason)

    def _resolve(self, record: Conversation, k: int) -> str:
        """The folder or file video ``k`` names, checked to exist and stay inside the folder."""
        ref = record.videos[k]
        path = os.path.join(self.folder, ref)
        if self.folder and not self.allow_outside_folder:
            root, real = os.path.realpath(self.folder), os.path.realpath(path)
            if os.path.commonpath([root, real]) != root:
                raise self._bad(
                    record, k, f"video path {ref!r} resolves to {real}, outside video_folder "
                    f"{root} (set allow_outside_image_folder: true to allow such paths)",
                    "image_outside_folder",
                )  # fmt: skip
        if not os.path.exists(path):
            raise self._bad(record, k, f"video not found: {path}", "missing_video")
        return path

    def frames(self, record: Conversation, k: int) -> list[Image.Image]:
        """The ``num_frames`` sampled frames of video ``k`` of ``record``, decoded as RGB."""
        path = self._resolve(record, k)
        if os.path.isdir(path):
            return self._folder_frames(record, k, path)
        if path.lower().endswith(VIDEO_FILE_SUFFIXES) and video_file_decoder():
            from lvlm_tune.data.video_file import decode_frames

            try:
                return decode_frames(path, self.num_frames, self.frame_reader.max_pixels)
            except ValueError as err:
                raise self._bad(record, k, f"{path}: {err}", "bad_video") from err
        kinds = "a folder of frames" + (
            f" or a video file ({', '.join(VIDEO_FILE_SUFFIXES)})"
            if video_file_decoder()
            else " (video files need PyAV: pip install av)"
        )
        raise self._bad(record, k, f"{path}: expected {kinds}", "bad_video")

    def _folder_frames(self, record: Conversation, k: int, path: str) -> list[Image.Image]:
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(FRAME_SUFFIXES))
        if not names:
            problem = f"no frame images ({', '.join(FRAME_SUFFIXES)}) in the folder {path}"
            raise self._bad(record, k, problem, "bad_video")
        try:
            picked = sample_indices(len(names), self.num_frames)
        except ValueError as err:
            raise self._bad(record, k, f"{path}: {err}", "bad_video") from err
        field = self._field(record, k)
        ref = record.videos[k]
        return [
            self.frame_reader.open(os.path.join(ref, names[i]), record, k, field) for i in picked
        ]

    def model_inputs(self, record: Conversation, count: int | None = None) -> dict[str, Any]:
        """``{"pixel_values_videos": (videos, frames, C, H, W)}`` for the record's first
        ``count`` videos (all by default); empty without videos."""
        count = len(record.videos) if count is None else count
        if not count:
            return {}
        if self.settings is None:
            raise ValueError("video pixels need frame settings (FrameSettings.of)")
        videos = [frames_to_pixels(self.frames(record, k), self.settings) for k in range(count)]
        return {VIDEO_INPUT_KEY: torch.stack(videos)}
