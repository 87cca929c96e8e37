"""Tiny base models for the LLaVA demo, built from configs and pre-trained in about a minute each.

LLaVA starts from a vision encoder that already sees and an LLM that already speaks; the demo
makes both offline. :func:`pretrain_vision_tower` trains a small ``CLIPVisionModel`` with the
linear probes of :mod:`lvlm_tune.demo.probes` on the patch tokens of its PENULTIMATE hidden
state (what LLaVA feeds the projector with ``vision_feature_layer=-2``, CLS dropped) and saves
it with its ``CLIPImageProcessorPil`` config; ``kind="siglip"`` (the OneVision demo) trains a
``SiglipVisionModel`` the same way, on the tokens of the hidden state
``VisionTowerConfig.feature_layer`` names (SigLIP has no CLS token). :func:`pretrain_language_model` trains a
SentencePiece tokenizer and a small ``LlamaForCausalLM`` on the demo's text corpus (captions
and question / answer turns in chat styles, each line ending with EOS), so it knows the words
and the short-answer format but not, of course, which colour an unseen image shows; its two
halves, :func:`train_tokenizer` and :func:`pretrain_llama`, also serve the MiniGPT-4 variant
(:mod:`lvlm_tune.demo.pretrain_minigpt4`). Both write folders that load back with
``from_pretrained``; the global RNG is left untouched.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from lvlm_tune.demo.probes import GROUP_SIZES, fit, probe, probe_report, scene_batch
from lvlm_tune.models.tokenizer_saving import save_processor
from lvlm_tune.testing.tokenizers import train_sentencepiece


@dataclass
class VisionTowerConfig:
    """Size and pre-training schedule of the demo's vision tower (CLIP, or SigLIP)."""

    kind: str = "clip"  # "siglip": the OneVision demo's tower
    feature_layer: int = -2  # the hidden state the probes (and later the projector) read
    image_size: int = 32  # pixels; 32 / patch 8 -> 16 patch tokens per image
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 3  # LLaVA reads layer -2, so the last layer is never trained or used
    num_heads: int = 4
    num_images: int = 8000  # freshly rendered pre-training scenes
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 3e-3
    rms_weight: float = 0.1  # pulls the features' RMS to 1 (raw scale is what the projector sees)
    seed: int = 0


@dataclass
class LanguageModelConfig:
    """Size and pre-training schedule of the demo's tokenizer and LLaMA LM."""

    vocab_size: int = 512  # SentencePiece target (259 of it are byte + special tokens)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    max_length: int = 96  # corpus lines are cut to this many tokens
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0


def _patches(model: Any, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """Patch tokens of hidden state ``layer`` (CLIP's CLS dropped), as the projector reads them."""
    hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:] if isinstance(model, CLIPVisionModel) else hidden


def _tower(config: VisionTowerConfig) -> tuple[Any, type, Any]:
    """The model config, model class and PIL image processor of a ``config.kind`` tower."""
    size = config.image_size
    sizes = {
        "image_size": size, "patch_size": config.patch_size, "hidden_size": config.hidden_size,
        "intermediate_size": 4 * config.hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
    }  # fmt: skip
    if config.kind == "clip":
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        model_config = CLIPVisionConfig(**sizes, projection_dim=config.hidden_size)
        return model_config, CLIPVisionModel, processor
    if config.kind == "siglip":
        processor = SiglipImageProcessorPil(size={"height": size, "width": size})
        return SiglipVisionConfig(**sizes), SiglipVisionModel, processor
    raise ValueError(f"vision tower kind must be clip or siglip, got {config.kind!r}")


def pretrain_vision_tower(
    out_dir: str | os.PathLike, config: VisionTowerConfig | None = None
) -> dict[str, float]:
    """Build, pre-train and save the demo's vision tower (+ its PIL image processor).

    Args:
        out_dir: folder for ``config.json``, ``model.safetensors``, ``preprocessor_config.json``.
        config: sizes and schedule (defaults: :class:`VisionTowerConfig`).

    Returns:
        ``seconds``, ``final_loss``, ``feature_rms`` and the held-out accuracy of the
        (discarded) probe heads over all patch tokens: ``acc_local_colour`` /
        ``acc_local_shape`` (the token's own quadrant, when occupied), ``acc_count`` and
        ``acc_shared`` (the colour / shape all shapes share, or "mixed").
    """
    config = config or VisionTowerConfig()
    start = time.perf_counter()
    size = config.image_size
    model_config, model_class, processor = _tower(config)
    rng = random.Random(config.seed)
    grid = size // config.patch_size
    pixels, targets = scene_batch(processor, rng, config.num_images, size, grid)
    test_pixels, test_targets = scene_batch(processor, rng, 512, size, grid)

    def batch_loss() -> torch.Tensor:
        rows = torch.randint(0, len(pixels), (config.batch_size,))
        features = _patches(model, pixels[rows], config.feature_layer)
        return probe(heads, features, targets[rows], config.rms_weight)[0]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = model_class(model_config).train()
        heads = nn.Linear(config.hidden_size, sum(GROUP_SIZES))
        final_loss = fit(
            [*model.parameters(), *heads.parameters()], config.steps, config.learning_rate,
            batch_loss,
        )  # fmt: skip
    model.eval()
    with torch.no_grad():
        features = _patches(model, test_pixels, config.feature_layer)
        hits = probe(heads, features, test_targets, 0.0)[1] == test_targets
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": final_loss,
        **probe_report(hits, test_targets),
        "feature_rms": round(features.pow(2).mean().sqrt().item(), 3),
    }


def _encode_lines(tokenizer: object, lines: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each line with BOS in front and EOS at the end, cut to ``max_length``."""
    ids = tokenizer(lines, add_special_tokens=True)["input_ids"]
    return [[*row[: max_length - 1], tokenizer.eos_token_id] for row in ids]


def train_tokenizer(lines: list[str], vocab_size: int) -> Any:
    """A LLaMA-style SentencePiece tokenizer trained on ``lines`` (held in memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        return AutoTokenizer.from_pretrained(train_sentencepiece(lines, tmp, vocab_size))


def pretrain_language_model(
    corpus: str | os.PathLike, out_dir: str | os.PathLike, config: LanguageModelConfig | None = None
) -> dict[str, float]:
    """Train the demo tokenizer and pre-train a tiny LLaMA LM on ``corpus``; save both together.

    Args:
        corpus: a text file, one training line per line (``text_corpus.txt`` of the dataset).
        out_dir: folder for the LM and its tokenizer (``AutoModelForCausalLM`` /
            ``AutoTokenizer`` both load it).
        config: sizes and schedule (defaults: :class:`LanguageModelConfig`).

    Returns:
        ``seconds`` and what :func:`pretrain_llama` returns.
    """
    config = config or LanguageModelConfig()
    start = time.perf_counter()
    lines = [line for line in Path(corpus).read_text().splitlines() if line.strip()]
    tokenizer = train_tokenizer(lines, config.vocab_size)
    encoded = _encode_lines(tokenizer, lines, config.max_length)
    report = pretrain_llama(tokenizer, encoded, out_dir, config)
    return {"seconds": round(time.perf_counter() - start, 2), **report}


def pretrain_llama(
    tokenizer: Any, sequences: list[list[int]], out_dir: str | os.PathLike,
    config: LanguageModelConfig, targets: list[list[bool]] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Pre-train a tiny LLaMA sized to ``tokenizer`` on token-id ``sequences`` (every token is a
    target, or those ``targets`` marks; rows padded with EOS); save it with the tokenizer in
    ``out_dir``.

    Returns:
        ``final_loss`` (mean token cross-entropy of the last step), ``vocab_size`` and
        ``tokens_per_line`` (mean).
    """
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )

    def batch_loss() -> torch.Tensor:
        picked = torch.randint(0, len(sequences), (config.batch_size,))
        rows = [sequences[i] for i in picked.tolist()]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.eos_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (i, row) in enumerate(zip(picked.tolist(), rows, strict=True)):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
            keep = (
                torch.tensor(targets[i])
                if targets is not None
                else torch.ones(len(row), dtype=torch.bool)
            )
            labels[r, : len(row)] = torch.where(keep, ids[r, : len(row)], -100)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(model_config).train()
        final_loss = fit(model.parameters(), config.steps, config.learning_rate, batch_loss)
    model.eval()
    model.save_pretrained(out_dir)
    save_processor(tokenizer, out_dir)  # keeps `legacy`, as training saves it
    return {
        "final_loss": final_loss,
        "vocab_size": len(tokenizer),
        "tokens_per_line": round(sum(map(len, sequences)) / len(sequences), 1),
    }
