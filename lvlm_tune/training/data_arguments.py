"""The recipe's data keys (:class:`DataArguments`): where the data is and how conversations
become tokens, with their help and checks (see :mod:`lvlm_tune.training.arguments`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lvlm_tune.data.dataset import BAD_SAMPLE_POLICIES, DEFAULT_MAX_BAD_FRACTION
from lvlm_tune.data.images import ASPECT_RATIOS, DEFAULT_MAX_IMAGE_PIXELS
from lvlm_tune.data.packing import DEFAULT_BUFFER_SIZE
from lvlm_tune.data.prompts import INSTRUCTION_POOLS
from lvlm_tune.data.sources import SOURCE_FORMATS
from lvlm_tune.data.text_policy import PLAIN_MULTI_TURN, SPECIAL_TEXT_POLICIES, STOP_TEXT_POLICIES
from lvlm_tune.data.video import DEFAULT_NUM_FRAMES
from lvlm_tune.errors import UserError
from lvlm_tune.templates.registry import template_names
from lvlm_tune.templates.render import IMAGE_POSITIONS


def help_field(text: str, **kwargs: Any) -> Any:
    """A dataclass field with its ``--help`` text."""
    return field(metadata={"help": text}, **kwargs)


_help = help_field


@dataclass
class DataArguments:
    """Where the data is and how conversations become tokens."""

    data_path: str | None = _help(
        "training data: LLaVA JSON/JSONL, caption pairs, OpenAI messages or an HF dataset",
        default=None,
    )
    data_format: str = _help("auto | llava | openai | caption | hf", default="auto")
    image_folder: str | None = _help("folder that image paths are relative to", default=None)
    template: str = _help(
        f"conversation template: {', '.join(template_names())}", default="vicuna_v1"
    )
    image_position: str = _help(
        "image in the first user turn: before | after | random | keep", default="before"
    )
    image_aspect_ratio: str | None = _help(
        "none | pad (pad to square with the mean colour); unset: the checkpoint's (pad for an "
        "original LLaVA-1.5 model_name_or_path), else none",
        default=None,
    )
    model_max_length: int = _help("maximum tokens per sample after image expansion", default=2048)
    on_bad_sample: str = _help(
        "error (stop, naming the sample) | skip (drop it from its batch and count it once)",
        default="error",
    )
    max_bad_fraction: float = _help(
        "under skip: stop the run when more than this fraction of the samples is bad "
        "(0: none may be, 1: any number)",
        default=DEFAULT_MAX_BAD_FRACTION,
    )
    max_image_pixels: int = _help(
        "refuse images of more pixels (width x height, read from the header before decoding) "
        "as bad samples (image_too_large); 0: no limit",
        default=DEFAULT_MAX_IMAGE_PIXELS,
    )
    allow_outside_image_folder: bool = _help(
        "accept image paths (absolute, with .., or symlinks) that resolve outside image_folder",
        default=False,
    )
    video_folder: str | None = _help(
        "folder that video paths (frame folders or files) are relative to; default: image_folder",
        default=None,
    )
    video_num_frames: int = _help(
        "frames sampled from every video, evenly, first and last included (LLaVA-OneVision: 32)",
        default=DEFAULT_NUM_FRAMES,
    )
    system_prompt: str | None = _help("override the template's default system prompt", default=None)
    instruction_pool: str | None = _help(
        "instructions for caption pairs: brief (LLaVA stage 1, the default) | detailed "
        "(MiniGPT-4 stage 2)",
        default=None,
    )
    special_text: str = _help(
        "data text that spells a control token (</s>, <|im_end|> ...): escape (tokenize it as "
        "ordinary text) | refuse (a bad sample naming the token) | allow (it becomes the token)",
        default="escape",
    )
    stop_text_in_answer: str = _help(
        "an answer holding the template's plain-text STOP (### of llava_v0 / minigpt4): refuse "
        "(a bad sample: the model would learn to stop mid-answer) | allow",
        default="refuse",
    )
    plain_multi_turn: str = _help(
        "a sample with several answers under the plain template: refuse | first (train its "
        "first question/answer pair)",
        default="refuse",
    )
    packing: bool = _help(
        "padding-free packing: several samples in one row, positions restarting per sample, "
        "no attention across them (llava, llava_next, llava_onevision; docs/packing.md)",
        default=False,
    )
    packing_max_length: int | None = _help(
        "under packing: tokens per row (>= model_max_length); default: model_max_length",
        default=None,
    )
    packing_buffer_size: int = _help(
        "under packing: samples packed together, first-fit-decreasing, per buffer",
        default=DEFAULT_BUFFER_SIZE,
    )

    def __post_init__(self) -> None:
        checks = {
            "template": (self.template, template_names()),
            "image_position": (self.image_position, IMAGE_POSITIONS),
            "image_aspect_ratio": (self.image_aspect_ratio or "none", ASPECT_RATIOS),
            "on_bad_sample": (self.on_bad_sample, BAD_SAMPLE_POLICIES),
            "instruction_pool": (self.instruction_pool or "brief", tuple(INSTRUCTION_POOLS)),
            "data_format": (self.data_format, SOURCE_FORMATS),
            "special_text": (self.special_text, SPECIAL_TEXT_POLICIES),
            "stop_text_in_answer": (self.stop_text_in_answer, STOP_TEXT_POLICIES),
            "plain_multi_turn": (self.plain_multi_turn, PLAIN_MULTI_TURN),
        }
        for key, (value, choices) in checks.items():
            if value not in choices:
                raise UserError(f"{key}: unknown {value!r}; choose one of: {', '.join(choices)}")
        if self.model_max_length < 1:
            raise UserError("model_max_length: must be positive")
        if not 0 <= self.max_bad_fraction <= 1:
            raise UserError(
                f"max_bad_fraction: {self.max_bad_fraction} is not a fraction; use a value "
                "from 0 (no bad sample allowed) to 1 (any number)"
            )
        if self.video_num_frames < 1:
            raise UserError("video_num_frames: must be positive")
        if self.packing_max_length is not None and self.packing_max_length < self.model_max_length:
            raise UserError(
                f"packing_max_length: {self.packing_max_length} is below model_max_length "
                f"({self.model_max_length}); a row must hold the longest sample"
            )
        if self.packing_buffer_size < 1:
            raise UserError("packing_buffer_size: must be positive")
        if self.max_image_pixels < 0:
            raise UserError("max_image_pixels: must be >= 0 (0: no limit)")
