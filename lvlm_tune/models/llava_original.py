"""Open checkpoints in the original LLaVA layout (haotian-liu/LLaVA) as a standard HF LLaVA.

The original code saves a LLaMA causal LM with ``mm_*`` fields in its ``config.json`` (read and
checked by :mod:`lvlm_tune.models.llava_original_config`) and the projector, sometimes the
vision tower, among the LLaMA weights (read and sorted by
:mod:`lvlm_tune.models.llava_original_weights`). The tower is otherwise loaded from
``mm_vision_tower`` (a folder or hub id; the recipe's ``vision_tower`` overrides it, e.g. with a
local copy when offline).

This module puts the parts together: such a folder is converted in memory into a
``LlavaForConditionalGeneration`` exactly as a new model is composed from parts
(:func:`lvlm_tune.models.llava.compose_llava`: same ``<image>`` and pad tokens, same embedding
growth), with the saved projector in place of a fresh one. The names callers use
(``is_original_llava``, ``read_original_config``, ``original_llava_config``, ``read_weights``,
...) are importable from here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import (
    AutoImageProcessor,
    GenerationConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from lvlm_tune.models.layout import CONFIG, is_original_llava
from lvlm_tune.models.llava import compose_llava
from lvlm_tune.models.llava_original_config import (
    OriginalLlava,
    original_image_aspect_ratio,
    original_llava_config,
    original_tokenizer,
    read_original_config,
    tower_config,
)
from lvlm_tune.models.llava_original_weights import (
    PROJECTOR_PREFIX,
    TOWER_PREFIX,
    read_weights,
    split_weights,
    tower_keys,
)
from lvlm_tune.models.vision_towers import (
    check_attn_implementation,
    check_select_strategy,
    vision_tower_kind,
)

__all__ = [  # the loader, and what callers import from here
    "OriginalLlava",
    "is_original_llava",
    "load_original_llava",
    "original_image_aspect_ratio",
    "original_llava_config",
    "original_tokenizer",
    "read_original_config",
    "read_weights",
]


def _language_model(
    llm: dict[str, torch.Tensor], settings: OriginalLlava, dtype: torch.dtype, attn: str
) -> LlamaForCausalLM:
    config = settings.text_config
    with torch.device("meta"):
        expected = set(LlamaForCausalLM(config).state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        llm.pop("lm_head.weight", None)
    if set(llm) != expected:
        raise ValueError(
            f"{settings.folder}: the LLaMA weights do not fit its config.json (missing: "
            f"{sorted(expected - set(llm))[:5]}, unexpected: {sorted(set(llm) - expected)[:5]})"
        )
    model = LlamaForCausalLM.from_pretrained(
        None, config=config, state_dict=llm, dtype=dtype, attn_implementation=attn
    )
    if (settings.folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(settings.folder)
    return model


def load_original_llava(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    extra_special_tokens: Sequence[str] = (),
    vision_tower: str | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load an original-layout LLaVA folder or hub id as a standard ``LlavaForConditionalGeneration``.

    Args:
        path: the checkpoint (e.g. a local copy of ``liuhaotian/llava-v1.5-7b``).
        dtype: parameter dtype.
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"``.
        extra_special_tokens: more special tokens to add (e.g. a template's markers).
        vision_tower: load the tower from here instead of ``mm_vision_tower``.

    Returns:
        ``(model, processor)``: the processor joins the folder's tokenizer (plus ``<image>`` and
        a pad token, as for a composed model) and the tower's image processor. The tower's
        weights come from the checkpoint when it holds them, else from the tower folder.
    """
    check_attn_implementation(attn_implementation)
    settings = read_original_config(path, vision_tower)
    kind = vision_tower_kind(tower_config(settings).model_type)
    check_select_strategy(kind, settings.vision_feature_select_strategy, settings.vision_tower)
    llm, projector_state, tower_state = split_weights(read_weights(settings.folder), settings)
    load = {"dtype": dtype, "attn_implementation": attn_implementation}
    vision = kind.model_class.from_pretrained(settings.vision_tower, **load)
    if vision.config.hidden_size != settings.mm_hidden_size:
        raise ValueError(
            f"{settings.folder / CONFIG}: mm_hidden_size is {settings.mm_hidden_size}, but the "
            f"vision tower {settings.vision_tower} is {vision.config.hidden_size} wide"
        )
    if tower_state:
        try:
            vision.load_state_dict(tower_keys(tower_state, vision), strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"{settings.folder}: its {TOWER_PREFIX}* weights do not fit the vision tower "
                f"{settings.vision_tower}: {error}"
            ) from None
    model, processor = compose_llava(
        vision,
        _language_model(llm, settings, dtype, attn_implementation),
        original_tokenizer(settings),
        AutoImageProcessor.from_pretrained(settings.vision_tower, backend="pil"),
        projector_type=settings.projector_type,
        vision_feature_layer=settings.vision_feature_layer,
        vision_feature_select_strategy=settings.vision_feature_select_strategy,
        dtype=dtype,
        attn_implementation=attn_implementation,
        extra_special_tokens=extra_special_tokens,
    )
    module = model.model.multi_modal_projector
    full = {**module.state_dict(), **projector_state}  # linear: keeps the identity linear_2
    try:
        module.load_state_dict(full, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{settings.folder}: {PROJECTOR_PREFIX}* do not fit: {error}") from None
    return model, processor
