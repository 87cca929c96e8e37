"""The LLM of the OneVision demo: a tiny LLaMA that already answers two-image questions from
captions written where the images go.

The demo's questions need both images at once (which image has more shapes, the shapes of both
counted together, the colours of the two). A tiny LLM does not learn to compare and add from
soft image tokens in a few minutes, so, as for the MiniGPT-4 variant
(:mod:`lvlm_tune.demo.pretrain_minigpt4`), it is pre-trained on the stage-1 and stage-2 training
conversations encoded EXACTLY as training encodes them (the recipes' template and image
position, through the training factory ``EncodingOptions``) but with each image's caption
(``"two red circles"``) in place of its image token, the answers (and their STOP) as the only
targets, as in training. Stage 1 then only has to make the projector
write caption-like soft tokens for each image, and stage 2 (LoRA) fits the rest. The vision
tower is the LLaVA demo's (:func:`lvlm_tune.demo.pretrain.pretrain_vision_tower`).
"""

from __future__ import annotations

import copy
import json
import os
from functools import partial
from pathlib import Path
from typing import Any

from lvlm_tune.data.encoder import IGNORE_INDEX
from lvlm_tune.data.record import IMAGE_TAG, Conversation
from lvlm_tune.data.sources import open_source
from lvlm_tune.demo.caption_llm import pretrain_caption_llm
from lvlm_tune.demo.pretrain import LanguageModelConfig
from lvlm_tune.templates.registry import get_template
from lvlm_tune.templates.render import place_images, render
from lvlm_tune.training.encoding import EncodingOptions

# (data file of make_pairs_dataset, template, image position) of the two stages' recipes
STAGE_DATA = (("describe_train", "vicuna_v1", "before"), ("pairs_train", "vicuna_v1", "before"))
MAX_LENGTH = 128  # tokens per pre-training sequence (the longest demo record has about 95)


def captioned_records(data: dict[str, Path]) -> list[tuple[str, str, Conversation, list[str]]]:
    """(template, image position, record, caption of each of its images) of every stage-1 and
    stage-2 training record."""
    caption_of = json.loads(Path(data["captions"]).read_text())
    found = []
    for name, template, position in STAGE_DATA:
        source = open_source(data[name])
        for index in range(len(source)):
            record = source.get(index)
            found.append((template, position, record, [caption_of[i] for i in record.images]))
    return found


def vocabulary_lines(data: dict[str, Path]) -> list[str]:
    """The tokenizer's training text: each record as its template renders it, the captions
    written where the images go."""
    lines = []
    for template_name, position, record, captions in captioned_records(data):
        template = get_template(template_name)
        turns = place_images(record.turns, len(record.images), position, template)
        pieces = render(template, turns).text.split(IMAGE_TAG)
        lines.append(pieces[0] + "".join(c + p for c, p in zip(captions, pieces[1:], strict=True)))
    return lines


def caption_corpus(
    data: dict[str, Path], tokenizer: Any, seed: int = 0, max_length: int = MAX_LENGTH
) -> tuple[list[list[int]], list[list[bool]]]:
    """Every :func:`captioned_records` record encoded as training encodes it (ids and labels),
    the token ids of each image's caption in place of its image token, EOS appended, cut to
    ``max_length``; and which tokens are targets: the answers and their STOP, as in training."""
    with_image = copy.deepcopy(tokenizer)
    with_image.add_special_tokens({"additional_special_tokens": [IMAGE_TAG]})
    encoders = {  # one image token per image here, each replaced by its caption below
        (template, position): EncodingOptions(template, image_position=position, seed=seed).encoder(
            with_image, 1
        )
        for _, template, position in STAGE_DATA
    }
    sequences, targets = [], []
    for index, (template, position, record, captions) in enumerate(captioned_records(data)):
        encoder = encoders[template, position]
        sample = encoder.encode(record, index)
        pending = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
        ids: list[int] = []
        trained: list[bool] = []
        for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist(), strict=True):
            piece = pending.pop(0) if token == encoder.image_token_id else [token]
            ids += piece
            trained += [label != IGNORE_INDEX] * len(piece)
        sequences.append([*ids[: max_length - 1], tokenizer.eos_token_id])
        targets.append([*trained[: max_length - 1], False])
    return sequences, targets


def pretrain_onevision_llm(
    data: dict[str, Path], out_dir: str | os.PathLike, config: LanguageModelConfig | None = None
) -> dict[str, float]:
    """Train a tokenizer and pre-train a tiny LLaMA on :func:`caption_corpus`; save both.

    Args:
        data: the paths :func:`lvlm_tune.demo.pairs.make_pairs_dataset` returns.
        out_dir: folder for the LM and its tokenizer.
        config: sizes and schedule (default: :class:`LanguageModelConfig` with longer lines).

    Returns:
        ``seconds`` and what :func:`lvlm_tune.demo.pretrain.pretrain_llama` returns.
    """
    config = config or LanguageModelConfig(max_length=MAX_LENGTH)
    return pretrain_caption_llm(
        vocabulary_lines(data), partial(caption_corpus, data), out_dir, config
    )
