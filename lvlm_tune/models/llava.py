"""Build or load a LLaVA as a standard ``transformers.LlavaForConditionalGeneration``.

Owns: composing a new LLaVA from a vision-tower folder (CLIP or SigLIP, vision-only or full
dual-encoder) and a LLaMA-family LLM folder, joined by a fresh projector; preparing the tokenizer
(``<image>`` and pad tokens from :mod:`lvlm_tune.models.tokens`, embeddings resized) and the
``LlavaProcessor`` (PIL image processor, no torchvision needed); loading an existing LLaVA folder
(HF layout, or the original one through ``llava_original``); gradient checkpointing. Which
towers load, the number of image tokens one image expands to and the attention /
feature-selection checks are :mod:`lvlm_tune.models.vision_towers`. The parts' weights are used
as loaded (same tensors, never re-initialised); only the projector and the rows of newly added
tokens are new.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lvlm_tune.models.projectors import new_projector, projector_config_kwargs
from lvlm_tune.models.tokens import IMAGE_TOKEN, prepare_tokenizer
from lvlm_tune.models.vision_towers import (  # num_image_tokens: also imported from here
    check_attn_implementation,
    check_select_strategy,
    num_image_tokens,
    vision_tower_kind,
)


def _sync_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings to the tokenizer and record the pad id in the configs.

    New rows are the mean of the old rows (deterministic, unlike transformers' sampled default),
    so an adapter checkpoint's base model can be rebuilt bit for bit from its parts.
    """
    old = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for weight in (
                model.get_input_embeddings().weight,
                model.get_output_embeddings().weight,
            ):
                weight[old:] = weight[:old].mean(dim=0, keepdim=True)
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def build_llava(
    vision_tower: str | Path,
    llm: str | Path,
    projector_type: str = "mlp2x_gelu",
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    chat_template: str | None = None,
    extra_special_tokens: Sequence[str] = (),
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Compose a new LLaVA from a vision tower, an LLM and a fresh projector.

    Args:
        vision_tower: folder or hub id of a CLIP/SigLIP vision model or full CLIP/SigLIP model
            (only its vision part is used); must hold its ``preprocessor_config.json``.
        llm: folder or hub id of a LLaMA-family ``AutoModelForCausalLM`` with its tokenizer.
        projector_type: ``"linear"`` (LLaVA-1) or ``"mlp2x_gelu"`` (LLaVA-1.5).
        vision_feature_layer: vision hidden-state layer(s) fed to the projector (-2: penultimate).
        vision_feature_select_strategy: ``"default"`` drops the CLS token, ``"full"`` keeps all.
        dtype: parameter dtype of the whole model.
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"`` (needs flash-attn).
        chat_template: Jinja chat template stored with the processor (optional).
        extra_special_tokens: more special tokens to add (e.g. a template's markers).

    Returns:
        ``(model, processor)``; ``model.save_pretrained`` + ``processor.save_pretrained`` into one
        folder give a checkpoint that plain ``LlavaForConditionalGeneration.from_pretrained`` and
        ``AutoProcessor.from_pretrained`` load.
    """
    check_attn_implementation(attn_implementation)
    kind = vision_tower_kind(AutoConfig.from_pretrained(vision_tower).model_type)
    check_select_strategy(kind, vision_feature_select_strategy, vision_tower)
    load = {"dtype": dtype, "attn_implementation": attn_implementation}
    vision = kind.model_class.from_pretrained(vision_tower, **load)
    language = AutoModelForCausalLM.from_pretrained(llm, **load)
    return compose_llava(
        vision,
        language,
        AutoTokenizer.from_pretrained(llm),
        AutoImageProcessor.from_pretrained(vision_tower, backend="pil"),
        projector_type=projector_type,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        dtype=dtype,
        attn_implementation=attn_implementation,
        chat_template=chat_template,
        extra_special_tokens=extra_special_tokens,
    )


def compose_llava(
    vision: PreTrainedModel,
    language: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    *,
    projector_type: str,
    vision_feature_layer: int | list[int],
    vision_feature_select_strategy: str,
    dtype: torch.dtype,
    attn_implementation: str,
    chat_template: str | None = None,
    extra_special_tokens: Sequence[str] = (),
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Join loaded parts into a LLaVA with a fresh projector (see :func:`build_llava`).

    ``vision`` and ``language`` (a causal LM) are used as they are, not copied; ``tokenizer``
    gets ``<image>``, a pad token and ``extra_special_tokens`` in place, and the embeddings grow
    to match (new rows: the mean of the old ones).
    """
    kind = vision_tower_kind(vision.config.model_type)
    check_select_strategy(kind, vision_feature_select_strategy, vision.config.name_or_path)
    prepare_tokenizer(tokenizer, extra_special_tokens)
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=language.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        tie_word_embeddings=language.config.tie_word_embeddings,
        **projector_config_kwargs(projector_type),
    )
    config.image_seq_length = num_image_tokens(config)
    # LlavaConfig resets the shared sub-configs' attention choice; set it again for all three.
    config._attn_implementation = attn_implementation
    projector = new_projector(config, language.device, dtype)
    model = assemble(LlavaForConditionalGeneration, config, vision, language, projector)
    _sync_vocab(model, tokenizer)

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=kind.num_prefix_tokens,
        image_token=IMAGE_TOKEN,
        chat_template=chat_template,
    )
    return model, processor


def assemble(
    model_class: type,
    config: PretrainedConfig,
    vision: PreTrainedModel,
    language: PreTrainedModel,
    projector: torch.nn.Module,
    **more: torch.nn.Module | torch.nn.Parameter,
) -> Any:
    """A LLaVA-family model of ``model_class`` made of the given parts: a skeleton on the
    meta device whose vision tower, language model, ``lm_head`` and projector (and ``more``
    parts of ``model.model``, e.g. NeXT's ``image_newline``) are replaced by the ones given.

    Raises ``RuntimeError`` when the skeleton still holds a tensor no part replaced.
    """
    with torch.device("meta"):  # a skeleton: every submodule is replaced just below
        model = model_class(config)
    model.model.vision_tower = vision
    model.model.language_model = language.base_model
    model.lm_head = language.get_output_embeddings()
    model.model.multi_modal_projector = projector
    for name, part in more.items():
        setattr(model.model, name, part)
    model.generation_config = language.generation_config
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(
            f"composed {config.model_type} still has uninitialised tensors: {left[:5]}"
        )
    return model


def load_llava(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    extra_special_tokens: Sequence[str] = (),
    vision_tower: str | Path | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load an existing LLaVA folder or hub id (e.g. ``llava-hf/llava-1.5-7b-hf``).

    A folder in the original LLaVA layout (``liuhaotian/llava-v1.5-7b``: ``llava_llama``
    config, ``mm_projector`` weights) is converted in memory, see
    :mod:`lvlm_tune.models.llava_original`; ``vision_tower`` then replaces its
    ``mm_vision_tower`` (it is ignored for HF folders, which hold their tower).
    A pad token and ``extra_special_tokens`` are added if missing (embeddings grow to match).
    Raises ``ValueError`` when the processor's image token is not the model's
    ``image_token_index``.

    Returns:
        ``(model, processor)``.
    """
    # imported here: llava_original composes its model with this module's functions
    from lvlm_tune.models.llava_original import is_original_llava, load_original_llava

    check_attn_implementation(attn_implementation)
    if is_original_llava(path):
        return load_original_llava(
            path, dtype, attn_implementation, extra_special_tokens, vision_tower
        )
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation
    )
    processor = AutoProcessor.from_pretrained(path)
    prepare_loaded(model, processor, path, extra_special_tokens)
    return model, processor


def prepare_loaded(
    model: PreTrainedModel, processor: Any, path: str | Path, extra_special_tokens: Sequence[str]
) -> None:
    """Check a loaded checkpoint's image token, then add missing tokens and grow embeddings.

    Raises ``ValueError`` when the processor's image token is not the model's
    ``image_token_index``.
    """
    tokenizer = processor.tokenizer
    image_token = str(processor.image_token)
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_id != model.config.image_token_index:
        raise ValueError(
            f"{path}: processor image token {image_token!r} has id {image_id}, "
            f"but the model config has image_token_index={model.config.image_token_index}"
        )
    prepare_tokenizer(tokenizer, extra_special_tokens)
    _sync_vocab(model, tokenizer)


def enable_gradient_checkpointing(model: PreTrainedModel, use_reentrant: bool = False) -> None:
    """Turn on gradient checkpointing and make embedding outputs require grad.

    ``enable_input_require_grads`` lets gradients reach trainable layers (LoRA, the projector
    path) through checkpointed blocks even when the embeddings themselves are frozen. The KV
    cache is switched off, as it is useless in training and conflicts with checkpointing.
    """
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    config: PretrainedConfig = model.config
    config.use_cache = False
    text_config = config.get_text_config()
    text_config.use_cache = False
