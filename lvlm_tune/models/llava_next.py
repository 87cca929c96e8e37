"""Build or load the anyres LLaVA families: LLaVA-NeXT and LLaVA-OneVision, as standard
``LlavaNextForConditionalGeneration`` / ``LlavaOnevisionForConditionalGeneration``.

Owns: composing a new model from a vision-tower folder (CLIP or SigLIP) and an LLM folder
(LLaMA, Mistral, Qwen2/2.5: any ``AutoModelForCausalLM``) with the published settings — the
tile grids (``image_grid_pinpoints``), the feature layer and selection, a fresh projector and
newline embedding (``image_newline``), OneVision's ``vision_aspect_ratio`` (``anyres_max_9``)
— and loading an existing checkpoint folder. The processors are
:mod:`lvlm_tune.models.anyres_processors`; tokens are prepared as for LLaVA
(:func:`lvlm_tune.models.llava.prepare_loaded`), OneVision adds ``<video>``.

The projector keeps PyTorch's default initialisation (drawn from the global RNG, which a run
seeds first, as for LLaVA). ``image_newline`` is drawn like the original's
(``randn(hidden) / sqrt(hidden)``) from its own generator seeded with ``newline_seed``, so a
rebuilt base holds the same newline whatever ran before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
)
from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionMultiModalProjector,
)

from lvlm_tune.models.anyres_processors import (
    NEXT_GRIDS,
    ONEVISION_GRIDS,
    VIDEO_TOKEN,
    anyres_image_processor,
    compose_processor,
    grid_pinpoints,
    load_anyres_processor,
    parse_grids,
)
from lvlm_tune.models.llava import _sync_vocab, assemble, prepare_loaded
from lvlm_tune.models.tokens import IMAGE_TOKEN, prepare_tokenizer
from lvlm_tune.models.vision_towers import (
    check_attn_implementation,
    check_select_strategy,
    vision_tower_kind,
)

KINDS = ("llava_next", "llava_onevision")
_CLASSES = {
    "llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration, NEXT_GRIDS),
    "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, ONEVISION_GRIDS),
}  # fmt: skip
_PROJECTORS = {
    "llava_next": LlavaNextMultiModalProjector,
    "llava_onevision": LlavaOnevisionMultiModalProjector,
}


def new_image_newline(hidden_size: int, seed: int, dtype: torch.dtype) -> nn.Parameter:
    """The newline embedding: ``randn(hidden) / sqrt(hidden)`` from a generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(hidden_size, generator=generator) / math.sqrt(hidden_size)
    return nn.Parameter(values.to(dtype))


def _load_tower(path: str | Path, **load: Any) -> PreTrainedModel:
    """A CLIP/SigLIP vision tower; SigLIP without its pooling head (the anyres models read a
    hidden layer, so the head would never run; the published towers are saved without it)."""
    kind = vision_tower_kind(AutoConfig.from_pretrained(path).model_type)
    vision = kind.model_class.from_pretrained(path, **load)
    inner = getattr(vision, "vision_model", vision)  # transformers 5 flattens SigLIP's
    if getattr(inner, "use_head", False):
        inner.use_head = False
        del inner.head
        vision.config.vision_use_head = False
    return vision


def build_anyres(
    kind: str,
    vision_tower: str | Path,
    llm: str | Path,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    image_grid_pinpoints: str | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    chat_template: str | None = None,
    extra_special_tokens: Sequence[str] = (),
    newline_seed: int = 0,
) -> tuple[PreTrainedModel, Any]:
    """Compose a new NeXT (``kind="llava_next"``) or OneVision model from a tower and an LLM.

    Args:
        kind: ``"llava_next"`` or ``"llava_onevision"``.
        vision_tower: folder or hub id of a CLIP/SigLIP (vision or dual-encoder) model with its
            ``preprocessor_config.json``; its image size is the tile size.
        llm: folder or hub id of a causal LM with its tokenizer.
        vision_feature_layer: hidden layer(s) fed to the projector (NeXT: -2, OneVision: -1).
        vision_feature_select_strategy: ``"default"`` drops CLS (CLIP), ``"full"`` (SigLIP).
        image_grid_pinpoints: tile grids, ``"ROWSxCOLS,..."``; ``None``: the family's
            published grids (see :mod:`lvlm_tune.models.anyres_processors`).
        vision_aspect_ratio: OneVision's ``anyres_max_N`` (ignored for NeXT).
        dtype, attn_implementation, chat_template, extra_special_tokens: as for LLaVA.
        newline_seed: seed of the newline embedding.

    Returns:
        ``(model, processor)``; saved into one folder they load with :func:`load_anyres` and
        with plain ``from_pretrained``.
    """
    config_class, model_class, _ = _CLASSES[_check_kind(kind)]
    check_attn_implementation(attn_implementation)
    tower_kind = vision_tower_kind(AutoConfig.from_pretrained(vision_tower).model_type)
    check_select_strategy(tower_kind, vision_feature_select_strategy, vision_tower)
    load = {"dtype": dtype, "attn_implementation": attn_implementation}
    vision = _load_tower(vision_tower, **load)
    language = AutoModelForCausalLM.from_pretrained(llm, **load)
    processor = processor_from_parts(
        kind, vision_tower, llm, vision_feature_select_strategy=vision_feature_select_strategy,
        image_grid_pinpoints=image_grid_pinpoints, vision_aspect_ratio=vision_aspect_ratio,
        chat_template=chat_template, extra_special_tokens=extra_special_tokens,
    )  # fmt: skip
    tokenizer = processor.tokenizer
    fields: dict[str, Any] = {
        "vision_config": vision.config,
        "text_config": language.config,
        "image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "vision_feature_layer": vision_feature_layer,
        "vision_feature_select_strategy": vision_feature_select_strategy,
        "image_grid_pinpoints": processor.image_processor.image_grid_pinpoints,
        "tie_word_embeddings": language.config.tie_word_embeddings,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
    }
    if kind == "llava_onevision":
        fields["video_token_index"] = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        fields["vision_aspect_ratio"] = vision_aspect_ratio
    else:
        patches = (vision.config.image_size // vision.config.patch_size) ** 2
        fields["image_seq_length"] = patches + tower_kind.num_prefix_tokens
    config = config_class(**fields)
    config._attn_implementation = attn_implementation
    projector = _PROJECTORS[kind](config).to(device=language.device, dtype=dtype)
    newline = new_image_newline(language.config.hidden_size, newline_seed, dtype)
    model = assemble(model_class, config, vision, language, projector, image_newline=newline)
    _sync_vocab(model, tokenizer)
    return model, processor


def processor_from_parts(
    kind: str,
    vision_tower: str | Path,
    llm: str | Path,
    vision_feature_select_strategy: str = "default",
    image_grid_pinpoints: str | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
    chat_template: str | None = None,
    extra_special_tokens: Sequence[str] = (),
    **_: Any,
) -> Any:
    """The processor :func:`build_anyres` gives its model, from the parts' config and tokenizer
    files only (no weights: ``lvlm-tune inspect`` counts image tokens with it). Other build
    options (``vision_feature_layer``) do not change it and are ignored.

    The tokenizer is prepared as building prepares it (``<image>``, a pad token, OneVision's
    ``<video>``, ``extra_special_tokens``).
    """
    _, _, default_grids = _CLASSES[_check_kind(kind)]
    vision = AutoConfig.from_pretrained(vision_tower)
    vision = getattr(vision, "vision_config", vision)
    tower_kind = vision_tower_kind(vision.model_type)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    extra = (
        (VIDEO_TOKEN, *extra_special_tokens) if kind == "llava_onevision" else extra_special_tokens
    )
    prepare_tokenizer(tokenizer, tuple(extra))
    tile = int(vision.image_size)
    pinpoints = grid_pinpoints(parse_grids(image_grid_pinpoints, default_grids), tile)
    image_processor = anyres_image_processor(
        AutoImageProcessor.from_pretrained(vision_tower, backend="pil"), kind, pinpoints
    )
    if kind == "llava_next":
        fields: dict[str, Any] = {
            "patch_size": vision.patch_size,
            "num_additional_image_tokens": tower_kind.num_prefix_tokens,
        }
    else:
        fields = {
            # the processor drops one for the CLS under "default" (a CLIP tower), as NeXT's
            # num_additional_image_tokens does
            "num_image_tokens": (tile // vision.patch_size) ** 2 + tower_kind.num_prefix_tokens,
            "vision_aspect_ratio": vision_aspect_ratio,
            "video_token": VIDEO_TOKEN,
        }
    return compose_processor(
        kind, tokenizer, image_processor, image_token=IMAGE_TOKEN, chat_template=chat_template,
        vision_feature_select_strategy=vision_feature_select_strategy, **fields,
    )  # fmt: skip


def load_anyres(
    kind: str,
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    extra_special_tokens: Sequence[str] = (),
) -> tuple[PreTrainedModel, Any]:
    """Load an existing NeXT/OneVision folder or hub id (``llava-hf/llava-v1.6-mistral-7b-hf``,
    ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``) with its processor (no torchvision).

    A pad token and ``extra_special_tokens`` are added if missing (embeddings grow to match).
    Raises ``ValueError`` when the folder holds another model type or its processor's image
    token is not the model's ``image_token_index``.
    """
    _, model_class, _ = _CLASSES[_check_kind(kind)]
    check_attn_implementation(attn_implementation)
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type != kind:
        raise ValueError(f"{path}: model_type {model_type!r}; the {kind} family loads {kind}")
    model = model_class.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    processor = load_anyres_processor(path)
    prepare_loaded(model, processor, path, extra_special_tokens)
    return model, processor


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise KeyError(f"unknown anyres kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return kind


def build_llava_next(
    vision_tower: str | Path, llm: str | Path, **kwargs: Any
) -> tuple[LlavaNextForConditionalGeneration, Any]:
    """:func:`build_anyres` for LLaVA-NeXT (defaults: layer -2, ``default`` selection)."""
    return build_anyres("llava_next", vision_tower, llm, **kwargs)


def build_llava_onevision(
    vision_tower: str | Path,
    llm: str | Path,
    vision_feature_layer: int | list[int] = -1,
    vision_feature_select_strategy: str = "full",
    **kwargs: Any,
) -> tuple[LlavaOnevisionForConditionalGeneration, Any]:
    """:func:`build_anyres` for OneVision (published: SigLIP layer -1, ``full``, anyres_max_9)."""
    return build_anyres(
        "llava_onevision", vision_tower, llm, vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy, **kwargs,
    )  # fmt: skip


def load_llava_next(path: str | Path, **kwargs: Any) -> tuple[Any, Any]:
    """:func:`load_anyres` for a LLaVA-NeXT folder."""
    return load_anyres("llava_next", path, **kwargs)


def load_llava_onevision(path: str | Path, **kwargs: Any) -> tuple[Any, Any]:
    """:func:`load_anyres` for a LLaVA-OneVision folder."""
    return load_anyres("llava_onevision", path, **kwargs)
