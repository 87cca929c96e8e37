"""Tiny base models for the demo, built from configs and pre-trained in about a minute each on CPU.

LLaVA starts from a vision encoder that already sees and an LLM that already speaks; the demo
makes both offline. :func:`pretrain_vision_tower` trains a small ``CLIPVisionModel`` with linear
heads on the patch tokens of its PENULTIMATE hidden state (what LLaVA feeds the projector with
``vision_feature_layer=-2``, CLS dropped): every patch token learns to tell its quadrant and the
colour and shape there, the colour and shape in every quadrant, the number of shapes and the
colour / shape they share, on freshly rendered scenes from :mod:`lvlm_tune.demo.shapes`. A
small penalty keeps the features' RMS near 1: features of large scale make the projector's
stage-1 training degenerate (seen: colour was lost for good). The heads are thrown away; the
tower is saved with its ``CLIPImageProcessorPil`` config. :func:`pretrain_language_model`
trains a SentencePiece tokenizer and a small ``LlamaForCausalLM`` on the demo's text corpus
(captions and question / answer turns in chat styles, each line ending with EOS), so it knows
the words and the short-answer format but not, of course, which colour an unseen image shows.
Both write folders that load back with ``from_pretrained``; the global RNG is left untouched.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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

_QUADRANTS = len(shapes.POSITIONS)
_COLOUR_CLASSES = 1 + len(shapes.COLORS)  # class 0 = empty quadrant
_SHAPE_CLASSES = 1 + len(shapes.SHAPES)
# Classes of each target group read by the probe heads from every patch token: the colour and
# shape in the token's own quadrant and which quadrant that is; then the colour and shape of
# every quadrant, the number of shapes, and the colour / shape all shapes share (0 = mixed).
_LOCAL_GROUPS = 3
_GROUP_SIZES = (
    [_COLOUR_CLASSES, _SHAPE_CLASSES, _QUADRANTS]
    + [_COLOUR_CLASSES] * _QUADRANTS
    + [_SHAPE_CLASSES] * _QUADRANTS
    + [len(shapes.COUNTS), _COLOUR_CLASSES, _SHAPE_CLASSES]
)
_COUNT_GROUP = _LOCAL_GROUPS + 2 * _QUADRANTS


@dataclass
class VisionTowerConfig:
    """Size and pre-training schedule of the demo's CLIP vision tower."""

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


def _scene_targets(scene: shapes.Scene) -> list[int]:
    """Per quadrant colour and shape (0 = none), the count index, the shared colour and shape."""
    colours, kinds = [0] * _QUADRANTS, [0] * _QUADRANTS
    for item in scene.items:
        q = shapes.POSITIONS.index(item.position)
        colours[q] = 1 + list(shapes.COLORS).index(item.colour)
        kinds[q] = 1 + shapes.SHAPES.index(item.shape)
    used_colours, used_shapes = {c for c in colours if c}, {k for k in kinds if k}
    shared_colour = used_colours.pop() if len(used_colours) == 1 else 0
    shared_shape = used_shapes.pop() if len(used_shapes) == 1 else 0
    return [*colours, *kinds, len(scene.items) - 1, shared_colour, shared_shape]


def _token_targets(scene_targets: torch.Tensor, grid: int) -> torch.Tensor:
    """(batch, tokens, groups) class targets of every patch token (row-major patch order)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    quadrant = ((rows >= grid // 2) * 2 + (cols >= grid // 2)).flatten()  # POSITIONS order
    local = torch.stack(
        [
            scene_targets[:, quadrant],
            scene_targets[:, _QUADRANTS + quadrant],
            quadrant.expand(len(scene_targets), -1),
        ],
        dim=-1,
    )
    shared = scene_targets[:, None, :].expand(-1, grid * grid, -1)
    return torch.cat([local, shared], dim=-1)


def _vision_batch(
    processor: CLIPImageProcessorPil, rng: random.Random, count: int, size: int, grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = [shapes.random_scene(rng) for _ in range(count)]
    pixels = processor(images=[shapes.render(s, size) for s in scenes], return_tensors="pt")
    targets = torch.tensor([_scene_targets(s) for s in scenes])
    return pixels["pixel_values"], _token_targets(targets, grid)


def _penultimate_patches(model: CLIPVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """Patch tokens (CLS dropped) of the penultimate hidden state, as LLaVA's default reads them."""
    return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


def _probe(
    heads: nn.Linear, features: torch.Tensor, targets: torch.Tensor, rms_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over tokens and groups (+ the feature-scale penalty), and each token's
    predicted class per group."""
    groups = heads(features).split(_GROUP_SIZES, dim=-1)
    loss = sum(
        nn.functional.cross_entropy(g.flatten(0, 1), targets[..., k].flatten())
        for k, g in enumerate(groups)
    ) / len(groups)
    loss = loss + rms_weight * (features.pow(2).mean(-1) - 1).pow(2).mean()
    return loss, torch.stack([g.argmax(-1) for g in groups], dim=-1)


def _fit(
    params: Iterable[nn.Parameter], steps: int, lr: float, loss_fn: Callable[[], torch.Tensor]
) -> float:
    """AdamW (no weight decay) with a one-cycle schedule for ``steps`` steps; the last loss."""
    optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return round(loss.item(), 4)


def pretrain_vision_tower(
    out_dir: str | os.PathLike, config: VisionTowerConfig | None = None
) -> dict[str, float]:
    """Build, pre-train and save the demo's CLIP vision tower (+ its PIL image processor).

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
    grid = size // config.patch_size
    pixels, targets = _vision_batch(processor, rng, config.num_images, size, grid)
    test_pixels, test_targets = _vision_batch(processor, rng, 512, size, grid)

    def batch_loss() -> torch.Tensor:
        rows = torch.randint(0, len(pixels), (config.batch_size,))
        features = _penultimate_patches(model, pixels[rows])
        return _probe(heads, features, targets[rows], config.rms_weight)[0]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = CLIPVisionModel(model_config).train()
        heads = nn.Linear(config.hidden_size, sum(_GROUP_SIZES))
        final_loss = _fit(
            [*model.parameters(), *heads.parameters()], config.steps, config.learning_rate,
            batch_loss,
        )  # fmt: skip
    model.eval()
    with torch.no_grad():
        features = _penultimate_patches(model, test_pixels)
        hits = _probe(heads, features, test_targets, 0.0)[1] == test_targets
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    occupied = test_targets[..., :2] > 0
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": final_loss,
        "acc_local_colour": _rate(hits[..., 0], occupied[..., 0]),
        "acc_local_shape": _rate(hits[..., 1], occupied[..., 1]),
        "acc_count": _rate(hits[..., _COUNT_GROUP], torch.ones_like(hits[..., 0])),
        "acc_shared": _rate(hits[..., _COUNT_GROUP + 1 :], torch.ones_like(hits[..., -2:])),
        "feature_rms": round(features.pow(2).mean().sqrt().item(), 3),
    }


def _rate(hits: torch.Tensor, mask: torch.Tensor) -> float:
    return round(hits[mask].float().mean().item(), 4)


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

    def batch_loss() -> torch.Tensor:
        rows = [encoded[i] for i in torch.randint(0, len(encoded), (config.batch_size,))]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.eos_token_id)
        labels = torch.full((len(rows), width), -100)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = labels[r, : len(row)] = torch.tensor(row)
        return model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(model_config).train()
        final_loss = _fit(model.parameters(), config.steps, config.learning_rate, batch_loss)
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": final_loss,
        "vocab_size": len(tokenizer),
        "tokens_per_line": round(sum(map(len, encoded)) / len(encoded), 1),
    }
