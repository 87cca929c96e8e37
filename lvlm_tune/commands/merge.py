"""``lvlm-tune merge``: turn a run (or one of its checkpoints) into one standard HF folder.

LoRA/DoRA adapters are folded into the LLM (PEFT ``merge_and_unload``), the projector trained
through ``modules_to_save`` replaces the base one, and the result is written as a plain
``LlavaForConditionalGeneration`` folder: sharded safetensors, ``config.json``, the processor and
tokenizer with the training chat template, the run card and a README model card. Full-model runs
(stage 1, full fine-tune) are re-exported the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from lvlm_tune.errors import command
from lvlm_tune.inference.load import DTYPES, eval_figures, load_run
from lvlm_tune.models.registry import get_model_family
from lvlm_tune.models.tokenizer_saving import save_processor
from lvlm_tune.training.checkpoints import checkpoint_step
from lvlm_tune.training.extensions import save_merged
from lvlm_tune.training.run_card import RUN_CARD, write_run_card

SUB_CONFIGS = ("text_config", "vision_config")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvlm-tune merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run folder or run/checkpoint-N")
    p.add_argument("--output", required=True, help="folder to write (must be empty or new)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="saved weight dtype")
    p.add_argument(
        "--base",
        help="base model when the recorded one moved: a model folder, or LLM=PATH,VISION=PATH "
        "(either part alone keeps the other from the run card)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return p


def input_run(checkpoint: str | os.PathLike) -> Path:
    """The run folder ``checkpoint`` belongs to, resolved (its parent for a ``checkpoint-N``).

    A ``checkpoint-N`` belongs to its parent when the parent holds a run card or other
    checkpoints; a lone copied ``checkpoint-N`` is its own run.
    """
    source = Path(checkpoint).resolve()
    parent = source.parent
    if checkpoint_step(source) is not None and (
        (parent / RUN_CARD).is_file()
        or any(checkpoint_step(p) is not None for p in parent.iterdir() if p != source)
    ):
        return parent
    return source


def check_output_outside_run(checkpoint: str | os.PathLike, output: str | os.PathLike) -> None:
    """Refuse an ``output`` that is, contains or lies inside the run being merged.

    Writing there (``--overwrite`` deletes the folder first) would destroy or mix with the
    run. Paths are compared resolved (symlinks, ``..``).
    """
    run, out = input_run(checkpoint), Path(output).resolve()
    where = (
        "is" if out == run else "contains" if out in run.parents else "lies inside"
        if run in out.parents else None
    )  # fmt: skip
    if where is not None:
        raise ValueError(
            f"--output {output} {where} the run being merged ({run}); write the merged model to "
            "a folder outside the run"
        )


def prepare_output(output: str | os.PathLike, overwrite: bool) -> Path:
    """Create ``output``; refuse a non-empty folder unless ``overwrite``."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not overwrite:
            raise FileExistsError(
                f"{output} exists and is not empty; pass --overwrite to replace it"
            )
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    output.mkdir(parents=True, exist_ok=True)
    return output


def model_card(card: dict[str, Any], source: str, dtype: str, figures: dict[str, Any]) -> str:
    """The README.md of a merged folder: base models, recipe, stage, eval figures."""
    args = card.get("model_args", {})
    family = get_model_family(card.get("family", "llava"))
    options = ", ".join(f"{key}={args.get(key)}" for key in family.build_options)
    usage = (
        "processor's chat template renders exactly the training prompt."
        if family.processor_expands_images
        else "tokenizer's chat template renders exactly the training prompt, image tokens "
        "included (use `processor.tokenizer.apply_chat_template`: `Blip2Processor` drops "
        "its own copy on load)."
    )
    bases = [
        f"- {label}: `{args[key]}`"
        for label, key in (
            ("base model", "model_name_or_path"),
            ("LLM", "llm_name_or_path"),
            ("vision side", "vision_tower"),
            ("stage-1 projector", "pretrained_projector"),
        )
        if args.get(key)
    ]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        f"tags: [lvlm-tune, {family.name}]",
        "---",
        "",
        f"# {Path(source).name} (merged with lvlm-tune)",
        "",
        f"A `{family.name}` model exported by `lvlm-tune merge` from `{source}`.",
        "It loads with plain transformers (`AutoModelForImageTextToText`, `AutoProcessor`); the",
        usage,
        "",
        "## Base models",
        *(bases or ["- (not recorded)"]),
        "",
        "## Training",
        f"- stage: `{card.get('stage')}`",
        f"- recipe: `{card.get('recipe')}`",
        f"- template: `{card.get('template')}`, image position `{card.get('image_position')}`",
        f"- projector: `{', '.join(family.projector_modules)}` ({options})",
        f"- LoRA: r={args.get('lora_r')}, alpha={args.get('lora_alpha')}, "
        f"DoRA={args.get('use_dora')}"
        if card.get("stage") == "finetune_lora"
        else "- full weights (no adapters)",
        f"- saved dtype: `{dtype}`",
        *(
            [
                f"- MiniGPT-5 vokens: {args.get('num_vokens')}, diffusion model "
                f"`{args.get('diffusion_model')}`, mapping module in `voken_mapper.safetensors`"
            ]
            if args.get("num_vokens")
            else []
        ),
        "",
        "## Evaluation",
        *([f"- {k}: {v}" for k, v in sorted(figures.items())] or ["- not evaluated yet"]),
        "",
    ]
    return "\n".join(lines)


def merge(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str = "fp32",
    base: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    """Merge ``checkpoint`` into a standalone folder at ``output``; returns the folder."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_output_outside_run(checkpoint, output)
    run = load_run(checkpoint, base=base)  # fp32: merge exactly, cast afterwards
    output_dir = prepare_output(output, overwrite)
    model = run.model.merge_and_unload() if run.is_adapter else run.model
    model = model.to(DTYPES[dtype])
    for config in (model.config, *(getattr(model.config, k, None) for k in SUB_CONFIGS)):
        if config is not None:
            config.dtype = DTYPES[dtype]
    model.save_pretrained(output_dir, max_shard_size=max_shard_size, safe_serialization=True)
    save_processor(run.processor, output_dir)
    save_merged(run.extensions, output_dir, DTYPES[dtype])  # MiniGPT-5: the mapping module
    card = {
        **run.card,
        "merged_from": os.fspath(checkpoint),
        "merged_dtype": dtype,
        "model_args": {**run.card.get("model_args", {}), "model_name_or_path": str(output_dir)},
    }
    write_run_card(output_dir, card)
    figures = eval_figures(checkpoint)
    readme = model_card(run.card, os.fspath(checkpoint), dtype, figures)
    (output_dir / "README.md").write_text(readme, encoding="utf-8")
    for stray in output_dir.glob("*"):  # only safetensors weights leave this command
        if stray.suffix in (".bin", ".pt", ".pth", ".pkl"):
            stray.unlink()
    return output_dir


@command("lvlm-tune merge", also=(ValueError,))
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = merge(
        args.checkpoint,
        args.output,
        dtype=args.dtype,
        base=args.base,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(json.dumps({"merged": str(out), "files": sorted(os.listdir(out))}))
    return 0
