"""The model-family registry: one frozen entry per family, looked up by its explicit name.

An entry says how to build a new model from parts, how to load an existing checkpoint, and
where the family's parts live inside the model (module names relative to the unwrapped HF
model, as in ``named_parameters()``). Freezing policies, LoRA targeting, the optimizer's
parameter groups and checkpoint saving all find the projector, vision tower and language
model through these names, never by guessing from a path. Adding a family (MiniGPT-4,
MiniGPT-5) is adding one entry to ``MODEL_FAMILIES``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, LlavaConfig, PretrainedConfig

from lvlm_tune.data.image_tokens import ImageTokenCounter
from lvlm_tune.models.anyres import processor_image_counter
from lvlm_tune.models.anyres_processors import load_anyres_processor
from lvlm_tune.models.llava import build_llava, load_llava, num_image_tokens
from lvlm_tune.models.llava_next import (
    build_llava_next,
    build_llava_onevision,
    load_llava_next,
    load_llava_onevision,
    processor_from_parts,
)
from lvlm_tune.models.minigpt4 import build_minigpt4, load_minigpt4, read_original_projection
from lvlm_tune.models.projectors import fixed_projector_parameters


def _no_fixed_parameters(config: PretrainedConfig) -> tuple[str, ...]:
    return ()


def _llava_image_features(model: Any, pixel_values: torch.Tensor, **_: Any) -> torch.Tensor:
    """Vision tower + projector on ``pixel_values``; one tensor of all image features."""
    out = model.model.get_image_features(pixel_values=pixel_values)
    return torch.cat([f.reshape(-1) for f in out.pooler_output])


def _anyres_image_features(
    model: Any, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None, **_: Any
) -> torch.Tensor:
    """Vision tower + projector + newline rows of a NeXT/OneVision model on ``pixel_values``
    (images, tiles, C, H, W) of images of ``image_sizes`` (height, width); flattened.

    Raises ``ValueError`` without ``image_sizes`` (the tiles cannot be placed without them).
    """
    if image_sizes is None:
        raise ValueError("anyres image features need the images' image_sizes")
    sizes = image_sizes.to(device=pixel_values.device)
    out = model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes)
    return torch.cat([f.reshape(-1) for f in out.pooler_output])


def _anyres_base_tokens(model_or_config: Any) -> int:
    """Tokens of one image at base resolution (one tile, no newline): what a NeXT/OneVision
    image is where a single fixed count is asked for; real counts come from the processor."""
    config = getattr(model_or_config, "config", model_or_config)
    vision = config.vision_config
    count = (vision.image_size // vision.patch_size) ** 2
    if config.vision_feature_select_strategy == "full" and vision.model_type.startswith("clip"):
        count += 1
    return count


def _num_query_tokens(config: Any) -> int:
    """Image tokens per image of a BLIP-2 / MiniGPT-4 model: one per Q-Former query."""
    return int(getattr(config, "config", config).num_query_tokens)


def _llava_parts_config(
    vision_tower: str, vision_feature_select_strategy: str = "default", **_: Any
) -> LlavaConfig:
    """The part of the ``LlavaConfig`` ``build_llava`` composes that fixes the image tokens."""
    vision = AutoConfig.from_pretrained(vision_tower)
    vision = getattr(vision, "vision_config", vision)
    return LlavaConfig(
        vision_config=vision.to_dict(),
        vision_feature_select_strategy=vision_feature_select_strategy,
    )


def _anyres_parts_config(
    vision_tower: str, vision_feature_select_strategy: str = "default", **_: Any
) -> PretrainedConfig:
    """The vision side of a composed NeXT/OneVision model (its base-resolution tokens)."""
    return _llava_parts_config(vision_tower, vision_feature_select_strategy)


def _blip2_parts_config(vision_tower: str, **_: Any) -> PretrainedConfig:
    """The BLIP-2 checkpoint's config (its ``num_query_tokens`` are the image tokens)."""
    return AutoConfig.from_pretrained(vision_tower)


def _blip2_image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Vision model + Q-Former + ``language_projection`` on ``pixel_values``, flattened."""
    return model.get_image_features(pixel_values=pixel_values).pooler_output.reshape(-1)


@dataclass(frozen=True)
class ModelFamily:
    """A model family and where its parts live.

    Attributes:
        name: registry key, saved with every checkpoint.
        build: composes a new model from parts; returns ``(model, processor)``.
        load: loads an existing checkpoint folder; returns ``(model, processor)``.
        projector_modules: module names of the vision-to-language projector(s).
        vision_modules: module (or parameter) names of the frozen-by-default vision side.
        language_modules: module names of the LLM, including embeddings and ``lm_head``.
        lora_modules: modules whose linear layers LoRA targets by default (the LLM body,
            without ``lm_head``).
        fixed_projector_parameters: given the model config, projector parameter names
            (relative to the projector module) that never train.
        image_features: runs the vision path (vision tower + projector) of an unwrapped
            model on ``pixel_values`` (and, for anyres families, ``image_sizes=``); the
            trainer calls it on a blank image for text-only batches so every rank runs the
            same modules.
        num_image_tokens: given a model (or its config), the image tokens one image becomes
            (families with a fixed count).
        sized_image_tokens: given the processor, the counter of the families whose image
            tokens depend on the image sizes (:mod:`lvlm_tune.models.anyres`); ``None`` when
            the count is fixed (see :meth:`image_tokens`).
        parts_config: given the vision side and the ``build_options``, a config of the model
            ``build`` would compose, read from config files only, that ``num_image_tokens``
            takes (``lvlm-tune inspect`` counts image tokens without building the model).
        processor_from_parts: given the vision side, the LLM and the ``build_options``, the
            processor ``build`` would give, from config and tokenizer files only (families
            whose image tokens come from the processor: ``inspect`` counts with it).
        load_processor: reads a saved folder's processor (default ``AutoProcessor``; the
            OneVision processor is read without its torchvision-only video processor).
        build_options: the ``ModelArguments`` fields (beyond the two parts, dtype, attention
            and tokens) that ``build`` takes, recorded in the run card and passed again
            when an adapter's base is rebuilt.
        load_options: the ``ModelArguments`` fields ``load`` also takes when they are set
            (LLaVA: ``vision_tower``, the tower of an original-layout checkpoint).
        forward_needs_pixels: the model's ``forward``/``generate`` always run the vision
            path, so text-only batches pass a blank image (with no image tokens in the text).
        processor_expands_images: the saved processor turns each ``<image>`` of a prompt
            into the image's tokens (LLaVA); when ``False`` the exported chat template writes
            them all (MiniGPT-4, whose BLIP-2 processor is told not to add its own).
        read_original_projector: reads the projector from the family's original release
            format (a ``.pth``, with ``weights_only=True``) as a projector state dict; ``None``
            when only our ``projector.safetensors`` is read.
    """

    name: str
    build: Callable[..., tuple[Any, Any]]
    load: Callable[..., tuple[Any, Any]]
    projector_modules: tuple[str, ...]
    vision_modules: tuple[str, ...]
    language_modules: tuple[str, ...]
    lora_modules: tuple[str, ...]
    fixed_projector_parameters: Callable[[PretrainedConfig], tuple[str, ...]] = _no_fixed_parameters
    image_features: Callable[..., torch.Tensor] = _llava_image_features
    num_image_tokens: Callable[[Any], int] = num_image_tokens
    sized_image_tokens: Callable[[Any], ImageTokenCounter] | None = None
    parts_config: Callable[..., PretrainedConfig] = _llava_parts_config
    processor_from_parts: Callable[..., Any] | None = None
    load_processor: Callable[[Any], Any] = AutoProcessor.from_pretrained
    build_options: tuple[str, ...] = ()
    load_options: tuple[str, ...] = ()
    forward_needs_pixels: bool = False
    processor_expands_images: bool = True
    read_original_projector: Callable[[Path], dict[str, torch.Tensor]] | None = None

    def image_tokens(self, model: Any, processor: Any) -> int | ImageTokenCounter:
        """What each image of a sample becomes: a fixed count, or a counter from the sizes
        (the encoder takes either as its ``num_image_tokens``)."""
        if self.sized_image_tokens is not None:
            return self.sized_image_tokens(processor)
        return self.num_image_tokens(model)

    def prompt_image_tokens(self, model: Any) -> int:
        """Image tokens per image in an exported chat template's text (see ``to_jinja``)."""
        return 1 if self.processor_expands_images else self.num_image_tokens(model)


LLAVA = ModelFamily(
    name="llava",
    build=build_llava,
    load=load_llava,
    projector_modules=("model.multi_modal_projector",),
    vision_modules=("model.vision_tower",),
    language_modules=("model.language_model", "lm_head"),
    lora_modules=("model.language_model",),
    fixed_projector_parameters=fixed_projector_parameters,
    build_options=("projector_type", "vision_feature_layer", "vision_feature_select_strategy"),
    load_options=("vision_tower",),
)

# MiniGPT-4 is a Blip2ForConditionalGeneration with a LLaMA text model; lm_head lives inside
# ``language_model`` (a whole causal LM), so ``language_model.model`` is the LoRA body.
MINIGPT4 = ModelFamily(
    name="minigpt4",
    build=build_minigpt4,
    load=load_minigpt4,
    projector_modules=("language_projection",),
    vision_modules=("vision_model", "qformer", "query_tokens"),
    language_modules=("language_model",),
    lora_modules=("language_model.model",),
    image_features=_blip2_image_features,
    num_image_tokens=_num_query_tokens,
    parts_config=_blip2_parts_config,
    build_options=("num_query_tokens",),
    forward_needs_pixels=True,
    processor_expands_images=False,
    read_original_projector=read_original_projection,
)

# LLaVA-NeXT and OneVision: the newline embedding ``model.image_newline`` (a bare parameter,
# new in a composed model, read with the projector's output) belongs to the projector side: it
# trains with the projector and is saved in ``projector.safetensors``. Under LoRA it stays
# frozen (PEFT's ``modules_to_save`` takes modules only), see training/freezing.py.
_ANYRES_OPTIONS = ("vision_feature_layer", "vision_feature_select_strategy", "image_grid_pinpoints")
_ANYRES_PARTS: dict[str, Any] = {
    "projector_modules": ("model.multi_modal_projector", "model.image_newline"),
    "vision_modules": ("model.vision_tower",),
    "language_modules": ("model.language_model", "lm_head"),
    "lora_modules": ("model.language_model",),
    "image_features": _anyres_image_features,
    "num_image_tokens": _anyres_base_tokens,
    "sized_image_tokens": processor_image_counter,
    "parts_config": _anyres_parts_config,
    "load_processor": load_anyres_processor,
}

LLAVA_NEXT = ModelFamily(
    name="llava_next",
    build=build_llava_next,
    load=load_llava_next,
    processor_from_parts=functools.partial(processor_from_parts, "llava_next"),
    build_options=_ANYRES_OPTIONS,
    **_ANYRES_PARTS,
)

LLAVA_ONEVISION = ModelFamily(
    name="llava_onevision",
    build=build_llava_onevision,
    load=load_llava_onevision,
    processor_from_parts=functools.partial(processor_from_parts, "llava_onevision"),
    build_options=(*_ANYRES_OPTIONS, "vision_aspect_ratio"),
    **_ANYRES_PARTS,
)

MODEL_FAMILIES: dict[str, ModelFamily] = {
    family.name: family for family in (LLAVA, MINIGPT4, LLAVA_NEXT, LLAVA_ONEVISION)
}


def family_names() -> list[str]:
    """All registered model-family names."""
    return list(MODEL_FAMILIES)


def get_model_family(name: str | ModelFamily) -> ModelFamily:
    """Look up a family by name (an entry passes through); raises ``KeyError`` naming the choices."""
    if isinstance(name, ModelFamily):
        return name
    try:
        return MODEL_FAMILIES[name]
    except KeyError:
        raise KeyError(
            f"unknown model family {name!r}; choose one of: {', '.join(family_names())}"
        ) from None
