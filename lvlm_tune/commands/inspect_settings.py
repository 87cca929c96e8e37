"""The settings ``lvlm-tune inspect`` encodes with: from its options alone, or from a recipe
read as ``lvlm-tune train`` reads it.

With a recipe, the image tokens are the model's (``recipe_image_tokens``, from config and
tokenizer files, no weights): a fixed count, or for the anyres families (LLaVA-NeXT, OneVision)
a counter from each image's size on the processor the model is built with. Without a recipe
every image becomes ``--num-image-tokens`` tokens.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from lvlm_tune.data.dataset import DEFAULT_MAX_BAD_FRACTION
from lvlm_tune.data.hooks import DataHooks
from lvlm_tune.data.image_tokens import ImageTokenCounter
from lvlm_tune.data.images import DEFAULT_MAX_IMAGE_PIXELS
from lvlm_tune.errors import UserError, require_path
from lvlm_tune.templates import template_names
from lvlm_tune.training.encoding import EncodingOptions, load_tokenizer

# inspect option -> the recipe key it sets (given with a recipe, it overrides the recipe's)
RECIPE_KEYS = {
    "data": "data_path", "data_format": "data_format", "image_folder": "image_folder",
    "template": "template", "image_position": "image_position",
    "model_max_length": "model_max_length", "seed": "seed",
    "instruction_pool": "instruction_pool", "num_vokens": "num_vokens",
    "caption_task": "caption_task", "special_text": "special_text",
    "stop_text_in_answer": "stop_text_in_answer", "plain_multi_turn": "plain_multi_turn",
    "on_bad_sample": "on_bad_sample", "max_bad_fraction": "max_bad_fraction",
    "max_image_pixels": "max_image_pixels",
    "allow_outside_image_folder": "allow_outside_image_folder",
}  # fmt: skip
# Training-only options a recipe may set that would stop it from parsing on this machine (bf16
# without a GPU, a DeepSpeed config elsewhere); inspect trains nothing.
NOT_TRAINING = ("--use_cpu=true", "--deepspeed=")


@dataclass
class Settings:
    """What inspect encodes, with which tokenizer, and how bad samples are treated."""

    options: EncodingOptions
    hooks: DataHooks
    special_tokens: tuple[str, ...]
    tokenizer: str
    num_image_tokens: int | ImageTokenCounter  # a counter from the sizes for anyres families
    data: str
    data_format: str = "auto"
    image_folder: str | None = None
    on_bad_sample: str = "error"
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allow_outside_image_folder: bool = False
    image_aspect_ratio: str = "none"
    prepared_tokenizer: Any = None  # the model's own, when building prepares it further

    def load_tokenizer(self) -> Any:
        """The tokenizer, prepared as training prepares it."""
        if self.prepared_tokenizer is not None:
            return self.prepared_tokenizer
        return load_tokenizer(self.tokenizer, self.special_tokens)


def _given(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name)
    return default if value is None else value


def settings_from_options(args: argparse.Namespace) -> Settings:
    """The settings of ``inspect --data ... --tokenizer ... --template ...`` (no recipe)."""
    missing = [n for n in ("data", "tokenizer", "template") if not getattr(args, n)]
    if missing:
        raise UserError(f"missing {', '.join('--' + m for m in missing)}")
    if args.template not in template_names():
        raise UserError(
            f"template: unknown {args.template!r}; choose one of: {', '.join(template_names())}"
        )
    defaults = EncodingOptions(template=args.template)
    options = EncodingOptions(
        **{
            name: _given(args, name, getattr(defaults, name))
            for name in ("template", "image_position", "model_max_length", "seed",
                         "instruction_pool", "special_text", "stop_text_in_answer",
                         "plain_multi_turn")
        }
    )  # fmt: skip
    require_path(args.data, "--data", hub_id_ok=False)
    require_path(args.tokenizer, "--tokenizer")
    # Without a recipe there are no MiniGPT-5 arguments to parse (no diffusion model): its data
    # hooks and vokens come straight from the two options.
    from lvlm_tune.generation.data import generation_hooks
    from lvlm_tune.generation.vokens import voken_tokens

    vokens = _given(args, "num_vokens", 0)
    hooks = generation_hooks(vokens, _given(args, "caption_task", "describe"))
    return Settings(
        options, hooks, (*options.special_tokens(), *(voken_tokens(vokens) if vokens else ())),
        args.tokenizer, _given(args, "num_image_tokens", 1), args.data,
        data_format=_given(args, "data_format", "auto"), image_folder=args.image_folder,
        on_bad_sample=_given(args, "on_bad_sample", "error"),
        max_bad_fraction=_given(args, "max_bad_fraction", DEFAULT_MAX_BAD_FRACTION),
        max_image_pixels=_given(args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
        allow_outside_image_folder=bool(args.allow_outside_image_folder),
    )  # fmt: skip


def settings_from_recipe(args: argparse.Namespace, overrides: list[str]) -> Settings:
    """The settings of ``inspect RECIPE``: the recipe as ``lvlm-tune train`` parses it, with
    ``overrides`` and the given inspect options applied; the tokenizer the model is built with
    (unless ``--tokenizer``) and its image tokens from the model's configs (the model-family
    registry) unless ``--num-image-tokens``."""
    from lvlm_tune.models.llava_original import original_image_aspect_ratio
    from lvlm_tune.training.encoding import recipe_image_tokens, tokenizer_path
    from lvlm_tune.training.recipe import parse_recipe

    given = [
        f"--{key}={value}" for name, key in RECIPE_KEYS.items()
        if (value := getattr(args, name)) is not None
    ]  # fmt: skip
    model_args, data_args, train_args = parse_recipe(
        args.recipe, [*overrides, *given, *NOT_TRAINING]
    )
    if not data_args.data_path:
        raise UserError(f"{args.recipe}: data_path: set it, or pass --data")
    require_path(data_args.data_path, f"{args.recipe}: data_path", hub_id_ok=False)
    found = ("--tokenizer", args.tokenizer) if args.tokenizer else tokenizer_path(model_args)
    if found is None:
        raise UserError(f"{args.recipe}: names no model or LLM to take the tokenizer from")
    key = found[0] if args.tokenizer else f"{args.recipe}: {found[0]}"
    require_path(found[1], key)
    image_tokens = args.num_image_tokens or recipe_image_tokens(model_args) or 1
    options = EncodingOptions.from_recipe(
        data_args, seed=train_args.seed, extensions=model_args.extensions
    )
    prepared = None if args.tokenizer else composed_tokenizer(model_args, options.special_tokens())
    return Settings(
        options, options.data_hooks(), options.special_tokens(), found[1], image_tokens,
        data_args.data_path, data_format=data_args.data_format, image_folder=data_args.image_folder, on_bad_sample=data_args.on_bad_sample,
        max_bad_fraction=data_args.max_bad_fraction,
        max_image_pixels=data_args.max_image_pixels,
        allow_outside_image_folder=data_args.allow_outside_image_folder,
        image_aspect_ratio=data_args.image_aspect_ratio
        or original_image_aspect_ratio(model_args.model_name_or_path) or "none",
        prepared_tokenizer=prepared,
    )  # fmt: skip


def composed_tokenizer(model_args: Any, special_tokens: tuple[str, ...]) -> Any:
    """The tokenizer of the processor a family composes from parts (NeXT, OneVision: OneVision
    adds ``<video>`` before the run's tokens), from config and tokenizer files; ``None`` for
    families whose tokenizer is the LLM's, prepared by ``load_tokenizer``."""
    from lvlm_tune.models.registry import get_model_family

    family = get_model_family(model_args.family)
    if model_args.model_name_or_path or family.processor_from_parts is None:
        return None
    options = {key: getattr(model_args, key) for key in family.build_options}
    processor = family.processor_from_parts(
        model_args.vision_tower, model_args.llm_name_or_path, **options,
        extra_special_tokens=special_tokens,
    )  # fmt: skip
    return processor.tokenizer
