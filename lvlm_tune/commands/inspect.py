"""``lvlm-tune inspect``: show exactly which tokens a data file trains, before any GPU is spent.

Human view: each shown sample decoded with trained spans marked (green on a terminal,
``[[...]]`` otherwise) and image runs collapsed to ``<image x N>``, then statistics over the
first ``--limit`` samples. ``--json`` prints one object per sample per line:
``{"id", "input_ids", "labels", "image_token_id"}`` (labels are -100 where masked).
``lvlm-tune inspect RECIPE.yaml`` reads the same settings from a training recipe.

Every image a sample trains with (input images and MiniGPT-5 target images that survive
truncation) is opened and decoded under training's checks (``image_folder``,
``max_image_pixels``, ``allow_outside_image_folder``), so a missing, empty, truncated, corrupt,
oversized or out-of-folder image is reported like any bad sample: with ``--on-bad-sample
error`` (the default) the first one ends the command with status 1; with ``skip`` each is
listed and counted, and the status is 1 when more than ``max_bad_fraction`` of the inspected
samples are bad (training would stop).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

from lvlm_tune.data.dataset import BAD_SAMPLE_POLICIES, DEFAULT_MAX_BAD_FRACTION, read_record
from lvlm_tune.data.encoder import IGNORE_INDEX, ConversationEncoder, EncodedSample
from lvlm_tune.data.errors import (
    BadSampleError,
    SkipLedger,
    TooManyBadSamplesError,
    check_bad_fraction,
)
from lvlm_tune.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageLoader
from lvlm_tune.errors import UserError, command, require_path
from lvlm_tune.templates import template_names
from lvlm_tune.templates.render import IMAGE_POSITIONS
from lvlm_tune.training.recipe_file import load_recipe

GREEN, RESET = "\033[32m", "\033[0m"
# recipe key -> inspect option; the first tokenizer key present in a recipe wins
RECIPE_KEYS = {
    "data_path": "data",
    "image_folder": "image_folder",
    "template": "template",
    "image_position": "image_position",
    "num_image_tokens": "num_image_tokens",
    "seed": "seed",
    "model_max_length": "model_max_length",
    "data_format": "data_format",
    "instruction_pool": "instruction_pool",
    "num_vokens": "num_vokens",
    "caption_task": "caption_task",
    "special_text": "special_text",
    "stop_text_in_answer": "stop_text_in_answer",
    "plain_multi_turn": "plain_multi_turn",
    "on_bad_sample": "on_bad_sample",
    "max_bad_fraction": "max_bad_fraction",
    "max_image_pixels": "max_image_pixels",
    "allow_outside_image_folder": "allow_outside_image_folder",
}
TOKENIZER_KEYS = ("tokenizer_name_or_path", "llm_name_or_path", "model_name_or_path")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvlm-tune inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", help="a training recipe (YAML) to read settings from")
    p.add_argument("--data", help="data file (LLaVA JSON/JSONL, captions, messages, HF dataset)")
    p.add_argument("--data-format", default="auto", help="auto | llava | openai | caption | hf")
    p.add_argument("--tokenizer", help="tokenizer folder (or the LLM folder)")
    p.add_argument("--template", help=f"one of: {', '.join(template_names())}")
    p.add_argument("--image-folder", help="folder image paths are relative to")
    p.add_argument("--image-position", choices=IMAGE_POSITIONS, help="default: before")
    p.add_argument("--num-image-tokens", type=int, help="image tokens per image (default 1)")
    p.add_argument("--model-max-length", type=int, help="truncation length (default 2048)")
    p.add_argument("--seed", type=int, help="seed of the per-sample random choices (default 0)")
    p.add_argument("--instruction-pool", help="caption pairs' instructions: brief | detailed")
    p.add_argument("--num-vokens", type=int, help="MiniGPT-5 vokens per generated image")
    p.add_argument("--caption-task", choices=("describe", "generate"), help="caption pairs' task")
    p.add_argument(
        "--special-text", choices=("escape", "refuse", "allow"),
        help="data text spelling a control token: escape (default) | refuse | allow",
    )  # fmt: skip
    p.add_argument(
        "--stop-text-in-answer", choices=("refuse", "allow"),
        help="answers holding a plain-text STOP (###): refuse (default) | allow",
    )  # fmt: skip
    p.add_argument(
        "--plain-multi-turn", choices=("refuse", "first"),
        help="several answers under the plain template: refuse (default) | first",
    )  # fmt: skip
    p.add_argument("--limit", type=int, default=1000, help="samples to encode (default 1000)")
    p.add_argument("--show", type=int, default=3, help="samples to print in full (human view)")
    p.add_argument(
        "--on-bad-sample", choices=BAD_SAMPLE_POLICIES, help="error (default): stop at the first "
        "bad sample | skip: list and count them",
    )  # fmt: skip
    p.add_argument(
        "--max-bad-fraction", type=float,
        help=f"under skip: fail when more of the samples are bad (default {DEFAULT_MAX_BAD_FRACTION})",
    )  # fmt: skip
    p.add_argument(
        "--max-image-pixels", type=int,
        help=f"refuse larger images (default {DEFAULT_MAX_IMAGE_PIXELS}; 0: no limit)",
    )  # fmt: skip
    p.add_argument(
        "--allow-outside-image-folder", action="store_true", default=None,
        help="accept image paths that resolve outside --image-folder",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object per sample per line")
    return p


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line options over recipe values over defaults."""
    settings: dict[str, Any] = {
        "data": None, "tokenizer": None, "template": None, "image_folder": None,
        "image_position": "before", "num_image_tokens": 1, "model_max_length": 2048, "seed": 0,
        "data_format": "auto", "instruction_pool": None, "num_vokens": 0,
        "caption_task": "describe", "special_text": "escape", "stop_text_in_answer": "refuse",
        "plain_multi_turn": "refuse", "on_bad_sample": "error",
        "max_bad_fraction": DEFAULT_MAX_BAD_FRACTION,
        "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS, "allow_outside_image_folder": False,
    }  # fmt: skip
    tokenizer_key = None
    if args.recipe:
        recipe = load_recipe(args.recipe)
        for key, name in RECIPE_KEYS.items():
            if recipe.get(key) is not None:
                settings[name] = recipe[key]
        tokenizer_key = next((k for k in TOKENIZER_KEYS if recipe.get(k)), None)
        settings["tokenizer"] = recipe[tokenizer_key] if tokenizer_key else None
        if recipe.get("num_image_tokens") is None:
            settings["num_image_tokens"] = recipe_image_tokens(recipe) or 1
    for name in settings:
        value = getattr(args, name, None)
        if value is not None and not (name == "data_format" and value == "auto" and args.recipe):
            settings[name] = value
    missing = [n for n in ("data", "tokenizer", "template") if not settings[n]]
    if missing:
        raise UserError(f"missing {', '.join('--' + m for m in missing)}")
    if settings["template"] not in template_names():
        raise UserError(
            f"template: unknown {settings['template']!r}; choose one of: "
            f"{', '.join(template_names())}"
        )
    data_key = "--data" if args.data else f"{args.recipe}: data_path"
    require_path(os.fspath(settings["data"]), data_key, hub_id_ok=False)
    tokenizer_key = "--tokenizer" if args.tokenizer else f"{args.recipe}: {tokenizer_key}"
    require_path(os.fspath(settings["tokenizer"]), tokenizer_key)
    return settings


def recipe_image_tokens(recipe: dict[str, Any]) -> int | None:
    """Image tokens per image of a recipe's model, from local configs (None if not readable)."""
    from transformers import AutoConfig, LlavaConfig

    from lvlm_tune.models.llava import num_image_tokens
    from lvlm_tune.models.llava_original import is_original_llava, original_llava_config

    strategy = recipe.get("vision_feature_select_strategy", "default")
    try:
        if recipe.get("family") == "minigpt4":  # one image token per Q-Former query
            path = recipe.get("model_name_or_path") or recipe.get("vision_tower")
            return AutoConfig.from_pretrained(path).num_query_tokens if path else None
        if recipe.get("model_name_or_path"):
            path = recipe["model_name_or_path"]
            if is_original_llava(path):  # AutoConfig does not know its model type
                return num_image_tokens(original_llava_config(path, recipe.get("vision_tower")))
            return num_image_tokens(AutoConfig.from_pretrained(path))
        if recipe.get("vision_tower"):
            vision = AutoConfig.from_pretrained(recipe["vision_tower"])
            vision = getattr(vision, "vision_config", vision)
            config = LlavaConfig(
                vision_config=vision.to_dict(), vision_feature_select_strategy=strategy
            )
            return num_image_tokens(config)
    except (OSError, ValueError, KeyError, AttributeError):
        print("note: model config not found locally; pass --num-image-tokens", file=sys.stderr)
    return None


def load_tokenizer(path: str, num_vokens: int = 0) -> Any:
    """Load a tokenizer and add ``<image>``, a pad token and the MiniGPT-5 vokens when missing,
    exactly as training does (same ids)."""
    from transformers import AutoTokenizer

    from lvlm_tune.generation.vokens import voken_tokens
    from lvlm_tune.models.layout import is_original_llava
    from lvlm_tune.models.tokens import prepare_tokenizer

    if is_original_llava(path):
        from lvlm_tune.models.llava_original import original_tokenizer  # model code: only here

        tokenizer = original_tokenizer(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer, voken_tokens(num_vokens) if num_vokens else ())
    return tokenizer


def render_sample(tokenizer: Any, sample: EncodedSample, image_id: int, color: bool) -> str:
    """Decode a sample with trained spans marked and image runs collapsed."""
    trained = sample.labels != IGNORE_INDEX
    ids, out, i = sample.input_ids, [], 0
    while i < len(ids):
        j = i
        if ids[i] == image_id:
            while j < len(ids) and ids[j] == image_id:
                j += 1
            out.append(f"<image x {j - i}>")
        else:
            while j < len(ids) and ids[j] != image_id and trained[j] == trained[i]:
                j += 1
            text = tokenizer.decode(ids[i:j].tolist())
            if trained[i]:
                text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
            out.append(text)
        i = j
    return "".join(out)


def stats_report(samples: list[EncodedSample], ledger: SkipLedger) -> str:
    lengths = np.array([len(s.input_ids) for s in samples]) if samples else np.zeros(1)
    trained = sum(s.num_trained for s in samples)
    total = max(int(lengths.sum()), 1)
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return "\n".join(
        [
            f"samples encoded: {len(samples)}",
            f"trained tokens: {trained} of {total} ({trained / total:.1%})",
            f"length p50/p90/p99/max: {p50:.0f}/{p90:.0f}/{p99:.0f}/{lengths.max()}",
            f"truncated: {sum(s.truncated for s in samples)}",
            f"control-token text tokenized as text: {sum(s.num_escaped for s in samples)} "
            f"occurrence(s) in {sum(1 for s in samples if s.num_escaped)} sample(s)",
            ledger.summary(),
        ]
    )


@command("lvlm-tune inspect")
def main(argv: list[str] | None = None) -> int:
    from lvlm_tune.data.sources import open_source

    args = build_parser().parse_args(argv)
    cfg = resolve_settings(args)
    from lvlm_tune.generation.data import generation_hooks  # MiniGPT-5's data hooks

    tokenizer = load_tokenizer(cfg["tokenizer"], int(cfg["num_vokens"]))
    hooks = generation_hooks(int(cfg["num_vokens"]), cfg["caption_task"])
    encoder = ConversationEncoder(
        tokenizer,
        cfg["template"],
        num_image_tokens=int(cfg["num_image_tokens"]),
        model_max_length=int(cfg["model_max_length"]),
        image_position=cfg["image_position"],
        seed=int(cfg["seed"]),
        instruction_pool=cfg["instruction_pool"],
        answer_tags=hooks.answer_tags,
        special_text=cfg["special_text"],
        stop_text_in_answer=cfg["stop_text_in_answer"],
        plain_multi_turn=cfg["plain_multi_turn"],
    )
    source = open_source(cfg["data"], fmt=cfg["data_format"])
    images = ImageLoader(
        None, cfg["image_folder"], max_image_pixels=int(cfg["max_image_pixels"]),
        allow_outside_folder=bool(cfg["allow_outside_image_folder"]),
    )  # fmt: skip
    count = min(args.limit, len(source))
    ledger = SkipLedger(count)
    color = sys.stdout.isatty()
    samples: list[EncodedSample] = []
    for index in range(count):
        try:
            record = read_record(source, index, hooks)
            sample = encoder.encode(record, index)
            images.load(record, sample.num_images)  # decoded as training decodes them
            if hooks.sample_extras is not None:  # MiniGPT-5: its target images, decoded too
                hooks.sample_extras(record, sample, images)
        except BadSampleError as err:
            if cfg["on_bad_sample"] == "error":
                raise  # printed as one line by @command, exit status 2
            ledger.add(index, err.reason)
            print(f"skipped ({err.reason}): {err}", file=sys.stderr)
            continue
        samples.append(sample)
        if args.json:
            row = {
                "id": sample.id,
                "input_ids": sample.input_ids.tolist(),
                "labels": sample.labels.tolist(),
                "image_token_id": encoder.image_token_id,
            }
            print(json.dumps(row, ensure_ascii=False))
        elif len(samples) <= args.show:
            print(f"=== sample {sample.id!r} ({len(sample.input_ids)} tokens) ===")
            print(render_sample(tokenizer, sample, encoder.image_token_id, color))
            print()
    print(stats_report(samples, ledger), file=sys.stderr if args.json else sys.stdout)
    try:
        check_bad_fraction(ledger, float(cfg["max_bad_fraction"]), str(cfg["data"]))
    except TooManyBadSamplesError as err:
        print(f"lvlm-tune inspect: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
