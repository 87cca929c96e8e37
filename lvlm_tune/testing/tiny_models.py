"""Tiny models built from configs, offline, for tests and the demo.

Every builder writes a folder with ``save_pretrained`` so it loads back through exactly the
``from_pretrained`` path real checkpoints take: a SentencePiece LLaMA tokenizer, a LLaMA causal
LM sized to that tokenizer, a CLIP or SigLIP vision tower with its PIL image-processor config, and
a whole LLaVA composed from those parts with :func:`lvlm_tune.models.llava.build_llava`. Weights
are random but reproducible (``seed``) and the global RNG is left untouched.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from lvlm_tune.models.llava import build_llava
from lvlm_tune.models.tokenizer_saving import save_processor
from lvlm_tune.testing.tokenizers import train_sentencepiece

_WORDS = (
    "the a an is are what which where how many image picture shows there of in on at left right "
    "top bottom center red green blue yellow purple orange black white circle square triangle "
    "star one two three four describe color shape position count answer question yes no"
)


def _default_lines(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = _WORDS.split()
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + rng.choice(".?!")
        for _ in range(count)
    ]


def write_tiny_tokenizer(
    out_dir: str | Path, lines: Iterable[str] | None = None, vocab_size: int = 300, seed: int = 0
) -> Path:
    """Train a LLaMA-style SentencePiece BPE tokenizer and save it as a ``LlamaTokenizer`` folder.

    ``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad token, byte fallback, no normalisation, BOS added
    like LLaMA. The folder holds ``tokenizer.model`` + ``tokenizer_config.json``.

    Args:
        out_dir: folder to write.
        lines: training text (default: a few thousand random lines of common words).
        vocab_size: SentencePiece vocabulary size (>= 259 + distinct characters).
        seed: seed for the default text.
    """
    text = list(lines) if lines is not None else _default_lines(3000, seed)
    return train_sentencepiece(text, out_dir, vocab_size=vocab_size)


def write_tiny_llama(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """Save a random LLaMA causal LM sized to the tokenizer, plus the tokenizer, in ``out_dir``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    save_processor(tokenizer, out_dir)  # keeps `legacy`, as training saves it
    return Path(out_dir)


def write_tiny_vision_tower(
    out_dir: str | Path,
    kind: str = "clip",
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a random CLIP (``kind="clip"``) or SigLIP (``"siglip"``) vision model + image processor.

    The image processor resizes and crops to ``image_size``; its PIL class loads without
    torchvision.
    """
    sizes: dict[str, Any] = {
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
    }
    if kind == "clip":
        config, model_class = CLIPVisionConfig(projection_dim=hidden_size, **sizes), CLIPVisionModel
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
    elif kind == "siglip":
        config, model_class = SiglipVisionConfig(**sizes), SiglipVisionModel
        processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    else:
        raise KeyError(f"unknown tiny vision tower kind {kind!r}; choose one of: clip, siglip")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.save_pretrained(out_dir)
    save_processor(processor, out_dir)
    return Path(out_dir)


def write_tiny_llava(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    vision_kind: str = "clip",
    seed: int = 0,
    **build_kwargs: Any,
) -> Path:
    """Compose a tiny LLaVA from freshly written tiny parts and save model + processor.

    Args:
        out_dir: folder for the LLaVA checkpoint (loads with ``load_llava`` or plain HF).
        tokenizer_dir: the LLM's tokenizer folder.
        vision_kind: ``"clip"`` or ``"siglip"`` (SigLIP needs
            ``vision_feature_select_strategy="full"``).
        seed: seed for all random weights, the projector included.
        **build_kwargs: passed to :func:`build_llava` (``projector_type``, ...).
    """
    with tempfile.TemporaryDirectory() as parts:
        vision = write_tiny_vision_tower(Path(parts) / "vision", kind=vision_kind, seed=seed)
        llm = write_tiny_llama(Path(parts) / "llm", tokenizer_dir, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, processor = build_llava(vision, llm, **build_kwargs)
        model.save_pretrained(out_dir)
        save_processor(processor, out_dir)
    return Path(out_dir)


def write_tiny_blip2(
    out_dir: str | Path,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    qformer_hidden_size: int = 32,
    qformer_layers: int = 2,
    num_query_tokens: int = 32,
    seed: int = 0,
) -> Path:
    """Save a random BLIP-2 (ViT + Q-Former + query tokens + a tiny OPT) and its image processor.

    Stands in for ``Salesforce/blip2-opt-2.7b`` when composing a tiny MiniGPT-4: only the vision
    model, Q-Former and query tokens are used from it. The PIL image processor needs no
    torchvision.
    """
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessorPil,
        OPTConfig,
    )

    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
        ),
        qformer_config=Blip2QFormerConfig(
            hidden_size=qformer_hidden_size,
            intermediate_size=2 * qformer_hidden_size,
            num_hidden_layers=qformer_layers,
            num_attention_heads=4,
            cross_attention_frequency=1,
            vocab_size=64,
            max_position_embeddings=64,
        ),
        text_config=OPTConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
        ),
        num_query_tokens=num_query_tokens,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
        with torch.no_grad():  # HF initialises the query tokens to zeros; make them distinct
            model.query_tokens.normal_(std=0.02)
    model.save_pretrained(out_dir)
    BlipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    return Path(out_dir)
