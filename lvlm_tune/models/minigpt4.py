"""Build or load a MiniGPT-4 as a standard ``transformers.Blip2ForConditionalGeneration``.

MiniGPT-4 (arXiv 2304.10592) is a frozen BLIP-2 vision side (ViT + Q-Former + 32 learned query
tokens) joined to a frozen LLaMA/Vicuna by ONE trained linear layer; in transformers that is
exactly ``Blip2ForConditionalGeneration`` with a LLaMA text model, the linear layer being
``language_projection``. Owns: composing a new MiniGPT-4 from a saved BLIP-2 folder (only its
vision model, Q-Former and query tokens are read) and a LLaMA-family LLM folder, with a fresh
``language_projection``; the tokenizer (``<image>`` and pad tokens, embeddings resized) and the
``Blip2Processor`` (PIL image processor, no torchvision needed); loading such a folder back;
reading the projection of an original MiniGPT-4 checkpoint (``.pth``). The parts' weights are
used as loaded; only ``language_projection`` and new token rows are new.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerModel,
    Blip2VisionModel,
)

from lvlm_tune.models.llava import IMAGE_TOKEN, _sync_vocab, prepare_loaded, prepare_tokenizer

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # the Q-Former has no flash-attention path
VISION_PREFIXES = ("vision_model.", "qformer.", "query_tokens")
ORIGINAL_PROJECTION = "llama_proj."  # the linear layer's name in the original MiniGPT-4 code


def _check_attn(attn_implementation: str) -> str:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"unsupported attn_implementation {attn_implementation!r} for MiniGPT-4 (its BLIP-2 "
            f"Q-Former has no flash-attention path); choose one of: {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    return attn_implementation


def _local_folder(path: str | Path) -> Path:
    """``path`` itself when it is a folder, else the hub snapshot (configs + safetensors only)."""
    if Path(path).is_dir():
        return Path(path)
    patterns = ["*.json", "*.safetensors"]
    return Path(snapshot_download(str(path), allow_patterns=patterns))


def _blip2_vision_state(folder: Path) -> dict[str, torch.Tensor]:
    """The ``vision_model.*``, ``qformer.*`` and ``query_tokens`` tensors of a BLIP-2 checkpoint.

    Reads only the safetensors shards that hold them (the BLIP-2 language model is never loaded).
    """
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({f for k, f in weight_map.items() if k.startswith(VISION_PREFIXES)})
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors(.index.json) BLIP-2 weights")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key.startswith(VISION_PREFIXES):
                    state[key] = f.get_tensor(key)
    return state


def _substate(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _place_images_in_text(processor: Blip2Processor) -> Blip2Processor:
    """Make the processor leave image tokens where the prompt text has them.

    HF's BLIP-2 processor puts ``num_query_tokens`` image tokens in front of the text (before
    BOS). MiniGPT-4 places the image inside the prompt (``[BOS] ... <Img><image></Img> ...``),
    so its chat template writes all query tokens in place and the processor must add none.
    """
    processor.num_query_tokens = None
    return processor


def build_minigpt4(
    blip2_path: str | Path,
    llm: str | Path,
    num_query_tokens: int = 32,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    extra_special_tokens: Sequence[str] = (),
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """Compose a new MiniGPT-4 from a BLIP-2 checkpoint, an LLM and a fresh linear projection.

    Args:
        blip2_path: folder or hub id of a BLIP-2 checkpoint (e.g. ``Salesforce/blip2-opt-2.7b``)
            with safetensors weights and its ``preprocessor_config.json``; only the vision model,
            Q-Former and query tokens are used.
        llm: folder or hub id of a LLaMA-family ``AutoModelForCausalLM`` with its tokenizer.
        num_query_tokens: Q-Former queries, i.e. image tokens per image; must equal the BLIP-2
            checkpoint's (32 for every released BLIP-2).
        dtype: parameter dtype (the Q-Former and query tokens stay float32, as in HF BLIP-2).
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        extra_special_tokens: more special tokens to add (e.g. a template's markers).

    Returns:
        ``(model, processor)``; ``save_pretrained`` of both into one folder gives a checkpoint
        that plain ``Blip2ForConditionalGeneration.from_pretrained`` and
        ``AutoProcessor.from_pretrained`` load.
    """
    _check_attn(attn_implementation)
    folder = _local_folder(blip2_path)
    blip2 = AutoConfig.from_pretrained(folder)
    if blip2.model_type != "blip-2":
        raise ValueError(f"{blip2_path} is a {blip2.model_type!r} model, not a BLIP-2 ('blip-2')")
    if num_query_tokens != blip2.num_query_tokens:
        raise ValueError(
            f"num_query_tokens={num_query_tokens}, but the BLIP-2 checkpoint {blip2_path} has "
            f"{blip2.num_query_tokens} query tokens"
        )
    language = AutoModelForCausalLM.from_pretrained(
        llm, dtype=dtype, attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(llm)
    prepare_tokenizer(tokenizer, extra_special_tokens)

    config = Blip2Config(
        vision_config=blip2.vision_config.to_dict(),
        qformer_config=blip2.qformer_config.to_dict(),
        text_config=language.config.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=language.config.tie_word_embeddings,
    )
    config._attn_implementation = attn_implementation
    state = _blip2_vision_state(folder)
    with torch.device("meta"):  # a skeleton: every submodule is replaced just below
        model = Blip2ForConditionalGeneration(config)
    vision = Blip2VisionModel(config.vision_config).to(dtype)
    vision.load_state_dict(_substate(state, "vision_model."), strict=True)
    qformer = Blip2QFormerModel(config.qformer_config)
    qformer.load_state_dict(_substate(state, "qformer."), strict=True)
    model.vision_model = vision.eval()
    model.qformer = qformer.eval()
    model.query_tokens = nn.Parameter(state["query_tokens"].float())
    model.language_model = language
    model.language_projection = nn.Linear(
        config.qformer_config.hidden_size, config.text_config.hidden_size, dtype=dtype
    )
    model.generation_config = language.generation_config
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"composed MiniGPT-4 still has uninitialised tensors: {left[:5]}")
    _sync_vocab(model, tokenizer)

    processor = Blip2Processor(
        image_processor=AutoImageProcessor.from_pretrained(folder, backend="pil"),
        tokenizer=tokenizer,
        num_query_tokens=None,  # see _place_images_in_text
    )
    return model, _place_images_in_text(processor)


def load_minigpt4(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    extra_special_tokens: Sequence[str] = (),
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """Load a MiniGPT-4 folder (a ``Blip2ForConditionalGeneration`` with a LLaMA text model).

    A pad token and ``extra_special_tokens`` are added if missing (embeddings grow to match).
    Raises ``ValueError`` when the processor's image token is not the model's
    ``image_token_index``.
    """
    _check_attn(attn_implementation)
    model = Blip2ForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation
    )
    processor = _place_images_in_text(AutoProcessor.from_pretrained(path))
    prepare_loaded(model, processor, path, extra_special_tokens)
    return model, processor


def read_original_projection(path: str | Path) -> dict[str, torch.Tensor]:
    """``language_projection`` weights from an original MiniGPT-4 checkpoint.

    The released files (e.g. ``prerained_minigpt4_7b.pth``) are ``torch.save`` pickles of
    ``{"model": {"llama_proj.weight": ..., "llama_proj.bias": ...}, ...}``; they are read with
    ``weights_only=True``, so nothing but tensors and plain containers is ever unpickled.

    Returns:
        ``{"weight": ..., "bias": ...}``, keyed as ``language_projection``'s state dict.
        Raises ``ValueError`` naming the file when it holds no ``llama_proj`` weights, and
        ``pickle.UnpicklingError`` (from torch) when it holds more than tensors.
    """
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a MiniGPT-4 checkpoint (expected a dict of tensors)")
    found = {
        key.removeprefix(ORIGINAL_PROJECTION): value
        for key, value in state.items()
        if key.startswith(ORIGINAL_PROJECTION)
    }
    missing = [k for k in ("weight", "bias") if k not in found]
    if missing:
        keys = ", ".join(sorted(state)[:8]) or "none"
        raise ValueError(
            f"{path}: no {', '.join(ORIGINAL_PROJECTION + k for k in missing)} in the checkpoint "
            f"(keys: {keys}); expected an original MiniGPT-4 projection checkpoint"
        )
    return {"weight": found["weight"], "bias": found["bias"]}
