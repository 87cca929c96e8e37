"""Tiny anyres models (LLaVA-NeXT, LLaVA-OneVision) and their parts, built offline from configs.

Like :mod:`lvlm_tune.testing.tiny_models`, every builder writes a folder with
``save_pretrained`` that loads back through the ``from_pretrained`` path real checkpoints
take: a SigLIP vision tower (PIL image processor), a Qwen2 causal LM with a ChatML byte-level
BPE tokenizer and a Qwen-style chat template, and whole NeXT / OneVision models composed from
such parts with :func:`lvlm_tune.models.llava_next.build_anyres`. Tiles are 32 px (patch 8:
16 patches a tile) and the grids small (:data:`TINY_GRIDS`), so small images really are tiled.
Weights are random but reproducible (``seed``); the global RNG is left untouched.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from lvlm_tune.models.llava_next import build_anyres
from lvlm_tune.models.tokenizer_saving import save_processor
from lvlm_tune.testing.tiny_models import (
    _default_lines,
    write_tiny_llama,
    write_tiny_tokenizer,
    write_tiny_vision_tower,
)
from lvlm_tune.testing.tokenizers import train_chatml_bpe

# Tile grids of the tiny models (ROWSxCOLUMNS in 32 px tiles): 32x64, 64x32 and 64x64 px.
TINY_GRIDS = "1x2,2x1,2x2"

# Qwen2's chat template, reduced to what text conversations use (a default system turn).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_siglip(
    out_dir: str | Path, image_size: int = 32, seed: int = 0, **sizes: Any
) -> Path:
    """Save a random SigLIP vision model (``patch_size`` 8 by default) + its PIL processor."""
    return write_tiny_vision_tower(
        out_dir, kind="siglip", image_size=image_size, seed=seed, **sizes
    )


def write_tiny_qwen2(
    out_dir: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 400,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Save a random Qwen2 causal LM with a ChatML byte-level BPE tokenizer (no BOS,
    ``<|im_end|>`` as EOS, ``<|endoftext|>`` as pad) and a Qwen-style chat template.

    Tied embeddings by default, as the small Qwen2 / Qwen2.5 checkpoints ship.
    """
    out = Path(out_dir)
    train_chatml_bpe(_default_lines(3000, seed), out, vocab_size=vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    save_processor(tokenizer, out)
    return out


def _write_anyres(
    kind: str, out_dir: str | Path, vision: Path, llm: Path, seed: int, **kw: Any
) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = build_anyres(kind, vision, llm, newline_seed=seed, **kw)
    model.save_pretrained(out_dir)
    save_processor(processor, out_dir)
    return Path(out_dir)


def write_tiny_llava_next(
    out_dir: str | Path,
    llm: str = "llama",
    vision: str = "clip",
    seed: int = 0,
    image_grid_pinpoints: str = TINY_GRIDS,
    **build_kwargs: Any,
) -> Path:
    """Compose a tiny LLaVA-NeXT from fresh tiny parts and save model + processor.

    Args:
        out_dir: the checkpoint folder (loads with ``load_llava_next`` and plain HF).
        llm: ``"llama"`` (SentencePiece tokenizer) or ``"qwen2"`` (ChatML BPE).
        vision: ``"clip"`` (feature selection ``default``: CLS dropped) or ``"siglip"``
            (``full``).
        seed: seed of every random weight (parts, projector, newline).
        image_grid_pinpoints: tile grids (``ROWSxCOLUMNS,...``).
        **build_kwargs: passed to :func:`build_anyres` (``vision_feature_layer``, ...).
    """
    if llm not in ("llama", "qwen2"):
        raise KeyError(f"unknown tiny llm {llm!r}; choose one of: llama, qwen2")
    strategy = "default" if vision == "clip" else "full"
    build_kwargs.setdefault("vision_feature_select_strategy", strategy)
    with tempfile.TemporaryDirectory() as parts:
        root = Path(parts)
        tower = write_tiny_vision_tower(root / "vision", kind=vision, seed=seed)
        if llm == "llama":
            lm = write_tiny_llama(root / "llm", write_tiny_tokenizer(root / "tok"), seed=seed)
        else:
            lm = write_tiny_qwen2(root / "llm", seed=seed)
        return _write_anyres(
            "llava_next", out_dir, tower, lm, seed,
            image_grid_pinpoints=image_grid_pinpoints, **build_kwargs,
        )  # fmt: skip


def write_tiny_llava_onevision(
    out_dir: str | Path,
    seed: int = 0,
    image_grid_pinpoints: str = TINY_GRIDS,
    vision_aspect_ratio: str = "anyres_max_9",
    **build_kwargs: Any,
) -> Path:
    """Compose a tiny LLaVA-OneVision (SigLIP + Qwen2, layer -1, ``full``, ``anyres_max_9``)
    from fresh tiny parts and save model + processor (see :func:`write_tiny_llava_next`)."""
    build_kwargs.setdefault("vision_feature_layer", -1)
    build_kwargs.setdefault("vision_feature_select_strategy", "full")
    with tempfile.TemporaryDirectory() as parts:
        root = Path(parts)
        tower = write_tiny_siglip(root / "vision", seed=seed)
        lm = write_tiny_qwen2(root / "llm", seed=seed)
        return _write_anyres(
            "llava_onevision", out_dir, tower, lm, seed, image_grid_pinpoints=image_grid_pinpoints,
            vision_aspect_ratio=vision_aspect_ratio, **build_kwargs,
        )  # fmt: skip
