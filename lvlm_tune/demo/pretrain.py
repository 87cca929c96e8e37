"""Tiny base models for the demo, built from configs and pre-trained in about a minute each on CPU.

LLaVA starts from a vision encoder that already sees and an LLM that already speaks; the demo
makes both offline. :func:`pretrain_vision_tower` trains a small ``CLIPVisionModel`` with linear
heads on the patch tokens of its PENULTIMATE hidden state (what LLaVA feeds the projector with
``vision_feature_layer=-2``, CLS dropped): every patch token learns to tell the colour and shape
in each quadrant and the number of shapes, on freshly rendered scenes from
:mod:`lvlm_tune.demo.shapes`. The heads are thrown away; the tower is saved with its
``CLIPImageProcessorPil`` config. :func:`pretrain_language_model` trains a SentencePiece
tokenizer and a small ``LlamaForCausalLM`` on the demo's text corpus (captions and question /
answer turns in chat styles, each line ending with EOS), so it knows the words and the
short-answer format but not, of course, which colour an unseen image shows. Both write folders
that load back with ``from_pretrained``.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from lvlm_tune.demo import shapes
from lvlm_tune.tokenizers import train_sentencepiece

# Per-token targets of the vision pre-training: (name, number of classes), "none" = empty quadrant.
_COLOUR_CLASSES = 1 + len(shapes.COLORS)
_SHAPE_CLASSES = 1 + len(shapes.SHAPES)


@dataclass
class VisionTowerConfig:
    """Size and pre-training schedule of the demo's CLIP vision tower."""

    image_size: int = 32  # pixels; 32 / patch 8 -> 16 patch tokens per image
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 3  # LLaVA reads layer -2, so the last layer is never trained or used
    num_heads: int = 4
    num_images: int = 8000  # freshly rendered pre-training scenes
    steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 3e-3
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
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0


def _scene_targets(scene: shapes.Scene) -> list[int]:
    """Per quadrant colour (0 = none) and shape (0 = none), then the count index."""
    colours, kinds = [0] * len(shapes.POSITIONS), [0] * len(shapes.POSITIONS)
    for item in scene.items:
        q = shapes.POSITIONS.index(item.position)
        colours[q] = 1 + list(shapes.COLORS).index(item.colour)
        kinds[q] = 1 + shapes.SHAPES.index(item.shape)
    return [*colours, *kinds, len(scene.items) - 1]


def _head_logits(logits: torch.Tensor) -> list[torch.Tensor]:
    """Split head outputs (..., 4*5 + 4*4 + 3) into the 9 classification groups."""
    n = len(shapes.POSITIONS)
    sizes = [_COLOUR_CLASSES] * n + [_SHAPE_CLASSES] * n + [len(shapes.COUNTS)]
    return list(logits.split(sizes, dim=-1))


def _vision_batch(
    processor: CLIPImageProcessorPil, rng: random.Random, count: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = [shapes.random_scene(rng) for _ in range(count)]
    pixels = processor(images=[shapes.render(s, size) for s in scenes], return_tensors="pt")
    return pixels["pixel_values"], torch.tensor([_scene_targets(s) for s in scenes])


def _penultimate_patches(model: CLIPVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """Patch tokens (CLS dropped) of the penultimate hidden state, as LLaVA's default reads them."""
    return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


def _head_loss_and_votes(
    heads: nn.Linear, features: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over every patch token and group; each group's vote over the tokens."""
    groups = _head_logits(heads(features))  # each (batch, tokens, classes)
    loss = sum(
        nn.functional.cross_entropy(g.flatten(0, 1), targets[:, k].repeat_interleave(g.shape[1]))
        for k, g in enumerate(groups)
    ) / len(groups)
    return loss, torch.stack([g.mean(1).argmax(-1) for g in groups], dim=1)


def pretrain_vision_tower(
    out_dir: str | os.PathLike, config: VisionTowerConfig | None = None
) -> dict[str, float]:
    """Build, pre-train and save the demo's CLIP vision tower (+ its PIL image processor).

    Args:
        out_dir: folder for ``config.json``, ``model.safetensors``, ``preprocessor_config.json``.
        config: sizes and schedule (defaults: :class:`VisionTowerConfig`).

    Returns:
        ``seconds``, ``final_loss`` and held-out accuracies of the (discarded) probe heads, by
        a vote over the patch tokens: ``acc_colour`` / ``acc_shape`` of the occupied quadrants,
        ``acc_empty`` (empty quadrants seen as empty) and ``acc_count``.
    """
    config = config or VisionTowerConfig()
    start = time.perf_counter()
    size = config.image_size
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    model_config = CLIPVisionConfig(
        image_size=size,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        intermediate_size=4 * config.hidden_size,
        projection_dim=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
    )
    rng = random.Random(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = CLIPVisionModel(model_config)
        n_out = len(shapes.POSITIONS) * (_COLOUR_CLASSES + _SHAPE_CLASSES) + len(shapes.COUNTS)
        heads = nn.Linear(config.hidden_size, n_out)
        pixels, targets = _vision_batch(processor, rng, config.num_images, size)
        test_pixels, test_targets = _vision_batch(processor, rng, 512, size)
        params = [p for p in [*model.parameters(), *heads.parameters()] if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, config.learning_rate, total_steps=config.steps, pct_start=0.1
        )
        model.train()
        loss = torch.zeros(())
        for _ in range(config.steps):
            rows = torch.randint(0, len(pixels), (config.batch_size,))
            loss, _ = _head_loss_and_votes(
                heads, _penultimate_patches(model, pixels[rows]), targets[rows]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        _, votes = _head_loss_and_votes(
            heads, _penultimate_patches(model, test_pixels), test_targets
        )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    n = len(shapes.POSITIONS)
    hits = votes == test_targets
    occupied = test_targets[:, :n] > 0
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": round(loss.item(), 4),
        "acc_colour": round(hits[:, :n][occupied].float().mean().item(), 4),
        "acc_shape": round(hits[:, n : 2 * n][occupied].float().mean().item(), 4),
        "acc_empty": round(hits[:, :n][~occupied].float().mean().item(), 4),
        "acc_count": round(hits[:, -1].float().mean().item(), 4),
    }


def _encode_lines(tokenizer: object, lines: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each line with BOS in front and EOS at the end, cut to ``max_length``."""
    ids = tokenizer(lines, add_special_tokens=True)["input_ids"]
    return [[*row[: max_length - 1], tokenizer.eos_token_id] for row in ids]


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
        ``seconds``, ``final_loss`` (mean token cross-entropy of the last step), ``vocab_size``
        and ``tokens_per_line`` (mean).
    """
    config = config or LanguageModelConfig()
    start = time.perf_counter()
    lines = [line for line in Path(corpus).read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(
            train_sentencepiece(lines, tmp, config.vocab_size)
        )
    encoded = _encode_lines(tokenizer, lines, config.max_length)
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(model_config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, config.learning_rate, total_steps=config.steps, pct_start=0.1
        )
        model.train()
        loss = torch.zeros(())
        for _ in range(config.steps):
            rows = [encoded[i] for i in torch.randint(0, len(encoded), (config.batch_size,))]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), tokenizer.eos_token_id)
            labels = torch.full((len(rows), width), -100)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = labels[r, : len(row)] = torch.tensor(row)
            loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": round(loss.item(), 4),
        "vocab_size": len(tokenizer),
        "tokens_per_line": round(sum(map(len, encoded)) / len(encoded), 1),
    }


def config_dict(config: VisionTowerConfig | LanguageModelConfig) -> dict[str, object]:
    """A config as a plain dict (for run summaries)."""
    return asdict(config)
