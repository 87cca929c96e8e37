"""``lvlm-tune inspect``: show exactly which tokens a data file trains, before any GPU is spent.

Human view: each shown sample decoded with trained spans marked (green on a terminal,
``[[...]]`` otherwise) and image runs collapsed to ``<image x N>``, then statistics over the
first ``--limit`` samples. ``--json`` prints one object per sample per line:
``{"id", "input_ids", "labels", "image_token_id"}`` (labels are -100 where masked). Preference
pairs (``docs/preference_data.md``) are shown side by side: each pair's chosen and rejected
sequence with its mask (only the final answer + STOP trains), and ``--json`` rows
``{"id", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels",
"image_token_id"}``; the statistics count pairs, then both sides.
``lvlm-tune inspect RECIPE.yaml`` reads the recipe with the parser ``lvlm-tune train`` uses
(further ``--key=value`` pairs override its keys, as for train), loads the tokenizer the model
is built with, and encodes exactly as training does.

For the anyres families (LLaVA-NeXT, OneVision) the tokens of each image come from its size:
``inspect RECIPE`` counts them as the model's processor does, from the sizes in the images'
headers (after ``image_aspect_ratio: pad``, as training pads); without a recipe every image
becomes ``--num-image-tokens`` tokens.

Every image a sample trains with (input images and MiniGPT-5 target images that survive
truncation) is opened and decoded under training's checks (``image_folder``,
``max_image_pixels``, ``allow_outside_image_folder``), so a missing, empty, truncated, corrupt,
oversized or out-of-folder image is reported like any bad sample: with ``--on-bad-sample
error`` (the default) the first one ends the command with status 2; with ``skip`` each is
listed and counted, and the status is 1 when more than ``max_bad_fraction`` of the inspected
samples are bad (training would stop).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lvlm_tune.commands.inspect_settings import (
    Settings,
    settings_from_options,
    settings_from_recipe,
)
from lvlm_tune.commands.inspect_view import (
    pair_row,
    pairs_report,
    sample_row,
    show_pair,
    show_sample,
    stats_report,
)
from lvlm_tune.data.dataset import BAD_SAMPLE_POLICIES, DEFAULT_MAX_BAD_FRACTION, read_record
from lvlm_tune.data.encoder import ConversationEncoder, EncodedSample
from lvlm_tune.data.errors import (
    BadSampleError,
    SkipLedger,
    TooManyBadSamplesError,
    check_bad_fraction,
)
from lvlm_tune.data.hooks import DataHooks
from lvlm_tune.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageLoader
from lvlm_tune.data.preference_encoder import EncodedPair, PreferenceEncoder
from lvlm_tune.data.preference_readers import PREFERENCE_FORMATS
from lvlm_tune.errors import command
from lvlm_tune.templates import template_names
from lvlm_tune.templates.render import IMAGE_POSITIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvlm-tune inspect", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "recipe", nargs="?", help="a training recipe (YAML) to read settings from; further "
        "--key=value pairs override its keys, as for lvlm-tune train",
    )  # fmt: skip
    p.add_argument(
        "--data", help="data file (LLaVA JSON/JSONL, captions, messages, preference pairs, HF "
        "dataset)",
    )  # fmt: skip
    p.add_argument(
        "--data-format",
        help="auto (default) | llava | openai | caption | llava_preference | trl_preference | hf",
    )
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


def resolve_settings(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    """Parse the command line into its options and the settings they resolve to."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args.recipe:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    settings = settings_from_recipe(args, extra) if args.recipe else settings_from_options(args)
    return args, settings


def open_inputs(settings: Settings) -> tuple[ConversationEncoder, Any, ImageLoader]:
    """The encoder (tokenizer prepared as training prepares it), data source and image loader."""
    from lvlm_tune.data.sources import open_source

    tokenizer = settings.load_tokenizer()
    encoder = settings.options.encoder(tokenizer, settings.num_image_tokens, settings.hooks)
    source = open_source(settings.data, fmt=settings.data_format)
    images = ImageLoader(
        None, settings.image_folder, settings.image_aspect_ratio,
        max_image_pixels=settings.max_image_pixels,
        allow_outside_folder=settings.allow_outside_image_folder,
    )  # fmt: skip
    return encoder, source, images


def encode_sample(
    encoder: ConversationEncoder, images: ImageLoader, source: Any, index: int, hooks: DataHooks
) -> EncodedSample:
    """Encode sample ``index`` as the training dataset does (``hooks``: the extensions' data
    hooks), opening every image it trains with; raises ``BadSampleError`` when training would
    refuse it."""
    record = read_record(source, index, hooks)
    sizes = images.sizes(record) if encoder.num_image_tokens is None else None
    sample = encoder.encode(record, index, image_sizes=sizes)
    images.load(record, sample.num_images)  # decoded as training decodes them
    if hooks.sample_extras is not None:  # e.g. MiniGPT-5's target images, decoded too
        hooks.sample_extras(record, sample, images)
    return sample


def encode_pair(
    encoder: ConversationEncoder, images: ImageLoader, source: Any, index: int
) -> EncodedPair:
    """Encode preference pair ``index`` as the preference dataset does, opening its images;
    raises ``BadSampleError`` when training would refuse it."""
    record = source.get(index)
    sizes = images.sizes(record) if encoder.num_image_tokens is None else None
    pair = PreferenceEncoder(encoder).encode(record, index, image_sizes=sizes)
    images.load(record.prompt, pair.num_images)  # decoded as training decodes them
    return pair


@command("lvlm-tune inspect")
def main(argv: list[str] | None = None) -> int:
    args, cfg = resolve_settings(argv)
    encoder, source, images = open_inputs(cfg)
    count = min(args.limit, len(source))
    ledger = SkipLedger(count)
    color = sys.stdout.isatty()
    image_id = encoder.image_token_id
    pairs = source.fmt in PREFERENCE_FORMATS  # both sides of each pair are shown
    show, row = (show_pair, pair_row) if pairs else (show_sample, sample_row)
    encoded: list[Any] = []
    for index in range(count):
        try:
            if pairs:
                item = encode_pair(encoder, images, source, index)
            else:
                item = encode_sample(encoder, images, source, index, cfg.hooks)
        except BadSampleError as err:
            if cfg.on_bad_sample == "error":
                raise  # printed as one line by @command, exit status 2
            ledger.add(index, err.reason)
            print(f"skipped ({err.reason}): {err}", file=sys.stderr)
            continue
        encoded.append(item)
        if args.json:
            print(json.dumps(row(item, image_id), ensure_ascii=False))
        elif len(encoded) <= args.show:
            print(show(encoder.tokenizer, item, image_id, color))
    report = pairs_report(encoded, ledger) if pairs else stats_report(encoded, ledger)
    print(report, file=sys.stderr if args.json else sys.stdout)
    try:
        check_bad_fraction(ledger, cfg.max_bad_fraction, str(cfg.data))
    except TooManyBadSamplesError as err:
        print(f"lvlm-tune inspect: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
