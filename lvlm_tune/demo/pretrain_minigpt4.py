"""Tiny base models for the demo's MiniGPT-4 variant: a BLIP-2 vision side and a matching LLM.

MiniGPT-4 trains ONE linear layer between a frozen BLIP-2 Q-Former and a frozen LLM, so both
sides must already do their part. :func:`pretrain_blip2` builds a tiny BLIP-2 (ViT + Q-Former +
query tokens, with a throwaway tiny OPT as its text model) and trains the vision side with the
linear probes of :mod:`lvlm_tune.demo.probes` on the Q-Former's OUTPUT query states (what
``language_projection`` reads): the queries sit on a square grid, each learns the colour and
shape of "its" quadrant, and all learn the whole scene. It is saved as a BLIP-2 folder
(``Blip2ForConditionalGeneration`` + ``BlipImageProcessorPil`` config) that ``build_minigpt4``
reads. The Q-Former's dropout is set to 0: it stays frozen and must give the same queries in
training as in inference. :func:`pretrain_minigpt4_llm` pre-trains a tiny LLaMA on the stage-1
and stage-2 training conversations rendered EXACTLY as training renders them (``plain``: ``[BOS]
<image>caption\\n``, ``minigpt4``: ``###Human: <Img><image></Img> {q} ###Assistant: {a}###``,
image before or after the question) but with the caption's tokens in place of the image
tokens: a frozen LLM then already answers from a scene description where the image goes, and
the projection only has to turn the query states into caption-like soft tokens. Both leave
the global RNG untouched.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoImageProcessor, Blip2Config, Blip2ForConditionalGeneration

from lvlm_tune.data.record import IMAGE_TAG, Conversation
from lvlm_tune.data.sources import open_source
from lvlm_tune.demo.caption_llm import pretrain_caption_llm
from lvlm_tune.demo.pretrain import LanguageModelConfig
from lvlm_tune.demo.probes import GROUP_SIZES, fit, probe, probe_report, scene_batch
from lvlm_tune.templates.registry import get_template
from lvlm_tune.templates.render import place_images, render
from lvlm_tune.testing.tiny_models import write_tiny_blip2
from lvlm_tune.training.encoding import EncodingOptions

# (template, data file of make_shapes_dataset, image position) of the two stages' recipes
STAGE_DATA = (("plain", "captions_train", "before"), ("minigpt4", "instruct_train", "random"))
MAX_LENGTH = 128  # tokens per LLM pre-training sequence (the longest demo record has ~75)


@dataclass
class Blip2EncoderConfig:
    """Size and pre-training schedule of the MiniGPT-4 variant's BLIP-2 vision side."""

    image_size: int = 32  # pixels; 32 / patch 8 -> 16 patch tokens per image
    patch_size: int = 8
    hidden_size: int = 64  # ViT width
    num_layers: int = 2
    qformer_hidden_size: int = 64  # what language_projection reads
    qformer_layers: int = 2
    num_query_tokens: int = 16  # a square grid of even side: 4 queries per quadrant
    num_images: int = 8000  # freshly rendered pre-training scenes
    steps: int = 2000  # 1000: the per-quadrant probes stay near 0.6 (position answers suffer)
    batch_size: int = 64
    learning_rate: float = 3e-3
    rms_weight: float = 0.1  # pulls the query states' RMS to 1
    seed: int = 0

    def __post_init__(self) -> None:
        side = math.isqrt(self.num_query_tokens)
        if side * side != self.num_query_tokens or side % 2:
            raise ValueError(
                f"num_query_tokens must be a square of an even number (4, 16, 36, ...), "
                f"got {self.num_query_tokens}"
            )


def query_states(model: Blip2ForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """The Q-Former's output query states of ``pixels``: what ``language_projection`` reads."""
    image = model.vision_model(pixel_values=pixels).last_hidden_state
    queries = model.query_tokens.expand(len(pixels), -1, -1)
    return model.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state


def pretrain_blip2(
    out_dir: str | os.PathLike, config: Blip2EncoderConfig | None = None
) -> dict[str, float]:
    """Build, pre-train and save the demo's tiny BLIP-2 (+ its PIL image processor).

    Args:
        out_dir: folder for the BLIP-2 checkpoint (``model.safetensors``, ``config.json``,
            ``preprocessor_config.json``); ``build_minigpt4`` reads its vision side.
        config: sizes and schedule (defaults: :class:`Blip2EncoderConfig`).

    Returns:
        ``seconds``, ``final_loss``, ``feature_rms`` and the held-out accuracy of the
        (discarded) probe heads over all query states (see :func:`probes.probe_report`).
    """
    config = config or Blip2EncoderConfig()
    start = time.perf_counter()
    write_tiny_blip2(
        out_dir, image_size=config.image_size, patch_size=config.patch_size,
        hidden_size=config.hidden_size, num_layers=config.num_layers,
        qformer_hidden_size=config.qformer_hidden_size, qformer_layers=config.qformer_layers,
        num_query_tokens=config.num_query_tokens, seed=config.seed,
    )  # fmt: skip
    model_config = Blip2Config.from_pretrained(out_dir)
    model_config.qformer_config.hidden_dropout_prob = 0.0
    model_config.qformer_config.attention_probs_dropout_prob = 0.0
    model = Blip2ForConditionalGeneration.from_pretrained(out_dir, config=model_config)
    processor = AutoImageProcessor.from_pretrained(out_dir, backend="pil")
    rng = random.Random(config.seed)
    grid, size = math.isqrt(config.num_query_tokens), config.image_size
    pixels, targets = scene_batch(processor, rng, config.num_images, size, grid)
    test_pixels, test_targets = scene_batch(processor, rng, 512, size, grid)
    trained = [*model.vision_model.parameters(), *model.qformer.parameters(), model.query_tokens]

    def batch_loss() -> torch.Tensor:
        rows = torch.randint(0, len(pixels), (config.batch_size,))
        features = query_states(model, pixels[rows])
        return probe(heads, features, targets[rows], config.rms_weight)[0]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        heads = nn.Linear(config.qformer_hidden_size, sum(GROUP_SIZES))
        model.train()
        final_loss = fit(
            [*trained, *heads.parameters()], config.steps, config.learning_rate, batch_loss
        )
    model.eval()
    with torch.no_grad():
        features = query_states(model, test_pixels)
        hits = probe(heads, features, test_targets, 0.0)[1] == test_targets
    model.save_pretrained(out_dir)
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": final_loss,
        **probe_report(hits, test_targets),
        "feature_rms": round(features.pow(2).mean().sqrt().item(), 3),
    }


def described_records(data: dict[str, Path]) -> list[tuple[str, Conversation, str]]:
    """(template, record, caption of its image) of every stage-1 and stage-2 training record."""
    captions = json.loads(Path(data["captions_train"]).read_text())
    caption_of = {row["image"]: row["caption"] for row in captions}
    found = []
    for template, name, _ in STAGE_DATA:
        source = open_source(data[name])
        records = [source.get(i) for i in range(len(source))]
        found += [(template, r, caption_of[r.images[0]]) for r in records]
    return found


def _vocabulary_line(template_name: str, record: Conversation, caption: str) -> str:
    """The record as its template renders it, the caption written where the image goes."""
    template = get_template(template_name)
    turns = place_images(record.turns, len(record.images), "before", template)
    return render(template, turns).text.replace(IMAGE_TAG, caption)


def caption_corpus(
    data: dict[str, Path], tokenizer: Any, seed: int = 0, max_length: int = MAX_LENGTH
) -> list[list[int]]:
    """The LLM's pre-training sequences: every :func:`described_records` record encoded exactly
    as training encodes it (``EncodingOptions.encoder``: template, image position, BOS), the token
    ids of its image's caption in place of the image token, EOS appended, cut to ``max_length``.
    """
    with_image = copy.deepcopy(tokenizer)
    with_image.add_special_tokens({"additional_special_tokens": [IMAGE_TAG]})
    encoders = {  # the training factory's encoders; one image token per image is replaced below
        name: EncodingOptions(name, image_position=position, seed=seed).encoder(with_image, 1)
        for name, _, position in STAGE_DATA
    }
    sequences = []
    for index, (template, record, caption) in enumerate(described_records(data)):
        encoder = encoders[template]
        caption_ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for token in encoder.tokenize(encoder.render(record, index).text)[0]:
            ids += caption_ids if token == encoder.image_token_id else [token]
        sequences.append([*ids[: max_length - 1], tokenizer.eos_token_id])
    return sequences


def pretrain_minigpt4_llm(
    data: dict[str, Path], out_dir: str | os.PathLike, config: LanguageModelConfig | None = None
) -> dict[str, float]:
    """Train a tokenizer and pre-train a tiny LLaMA on :func:`caption_corpus`; save both.

    Args:
        data: the paths :func:`lvlm_tune.demo.shapes.make_shapes_dataset` returns.
        out_dir: folder for the LM and its tokenizer.
        config: sizes and schedule (default: :class:`LanguageModelConfig` with longer lines).

    Returns:
        ``seconds`` and what :func:`lvlm_tune.demo.pretrain.pretrain_llama` returns.
    """
    config = config or LanguageModelConfig(max_length=MAX_LENGTH)
    lines = [_vocabulary_line(*sample) for sample in described_records(data)]
    return pretrain_caption_llm(lines, partial(caption_corpus, data), out_dir, config)
