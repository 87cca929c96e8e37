"""Export a run (or one of its checkpoints) as one standard Hugging Face folder.

LoRA/DoRA adapters are folded into the LLM (PEFT ``merge_and_unload``), the projector trained
through ``modules_to_save`` replaces the base one, and the result is written as the family's
plain transformers model (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``,
``Blip2ForConditionalGeneration``): sharded safetensors, ``config.json``, the processor and
tokenizer with the training chat template (the NeXT/OneVision processors expand each
``<image>`` for its image's size themselves), the run card and a README model card
(``huggingface_hub.ModelCard``). Full-model runs (stage 1, full fine-tune) are re-exported the
same way. Only safetensors weights are written.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from lvlm_tune.errors import looks_like_path
from lvlm_tune.inference.benchmarks.runner import benchmark_figures
from lvlm_tune.inference.load import DTYPES, eval_figures, load_run
from lvlm_tune.models.registry import ModelFamily
from lvlm_tune.models.tokenizer_saving import save_processor
from lvlm_tune.training.checkpoints import checkpoint_step
from lvlm_tune.training.extensions import save_merged
from lvlm_tune.training.run_card import RUN_CARD, RunCard

SUB_CONFIGS = ("text_config", "vision_config")
BASE_KEYS = (
    ("base model", "model_name_or_path"),
    ("LLM", "llm_name_or_path"),
    ("vision side", "vision_tower"),
    ("stage-1 projector", "pretrained_projector"),
)
MODEL_CARD = """---
{{ card_data }}
---

# {{ name }} (merged with lvlm-tune)

A `{{ family }}` model exported by `lvlm-tune merge` from `{{ source }}`.
It loads with plain transformers (`AutoModelForImageTextToText`, `AutoProcessor`); the
{{ usage }}

## Base models
{% for label, value in bases %}- {{ label }}: `{{ value }}`
{% else %}- (not recorded)
{% endfor %}
## Training
{% for line in training %}- {{ line }}
{% endfor %}
## Evaluation
{% for key, value in figures %}- {{ key }}: {{ value }}
{% else %}- not evaluated yet
{% endfor %}"""


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

    Writing there (``overwrite`` deletes the folder first) would destroy or mix with the
    run. Paths are compared resolved (symlinks, ``..``).

    Raises:
        ValueError: naming the output, the run and how they overlap.
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
    """Create ``output``; refuse a non-empty folder unless ``overwrite`` (which empties it)."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not overwrite:
            raise FileExistsError(
                f"{output} exists and is not empty; pass --overwrite to replace it"
            )
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    output.mkdir(parents=True, exist_ok=True)
    return output


def _training_lines(card: RunCard, family: ModelFamily, dtype: str) -> list[str]:
    args = card.model_args
    options = ", ".join(f"{key}={args.get(key)}" for key in family.build_options)
    lines = [
        f"stage: `{card.stage}`",
        f"recipe: `{card.recipe}`",
        f"template: `{card.template}`, image position `{card.image_position}`",
        f"projector: `{', '.join(family.projector_modules)}` ({options})",
        f"LoRA: r={args.get('lora_r')}, alpha={args.get('lora_alpha')}, DoRA={args.get('use_dora')}"
        if card.stage in ("finetune_lora", "dpo_lora")
        else "full weights (no adapters)",
        f"saved dtype: `{dtype}`",
    ]
    if args.get("num_vokens"):
        lines.append(
            f"MiniGPT-5 vokens: {args.get('num_vokens')}, diffusion model "
            f"`{args.get('diffusion_model')}`, mapping module in `voken_mapper.safetensors`"
        )
    return lines


def model_card(
    card: RunCard, family: ModelFamily, source: str, dtype: str, figures: dict[str, Any]
) -> ModelCard:
    """The README.md of a merged folder: base models, recipe, stage, eval figures.

    The metadata (``ModelCardData``) names the library, pipeline, tags, the base models that
    are Hub ids and the evaluation figures' names.
    """
    bases = [(label, card.model_args[key]) for label, key in BASE_KEYS if card.model_args.get(key)]
    hub_ids = [
        str(path)
        for label, path in bases
        if label != "stage-1 projector" and not looks_like_path(str(path))
        and not os.path.exists(path)
    ]  # fmt: skip
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["lvlm-tune", family.name],
        base_model=hub_ids or None,
        metrics=sorted(figures) or None,
    )
    usage = (
        "processor's chat template renders exactly the training prompt."
        if family.processor_expands_images
        else "tokenizer's chat template renders exactly the training prompt, image tokens "
        "included (use `processor.tokenizer.apply_chat_template`: `Blip2Processor` drops "
        "its own copy on load)."
    )
    return ModelCard.from_template(
        data, template_str=MODEL_CARD, name=Path(source).name, family=family.name,
        source=source, usage=usage, bases=bases, training=_training_lines(card, family, dtype),
        figures=sorted(figures.items()),
    )  # fmt: skip


def merge(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str = "fp32",
    base: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    """Merge ``checkpoint`` into a standalone folder at ``output``; returns the folder.

    Args:
        checkpoint: a run folder or one of its ``checkpoint-N`` folders.
        output: the folder to write; it must be new or empty (see ``overwrite``) and outside
            the run.
        dtype: the saved weights' dtype (``fp32``, ``bf16``, ``fp16``); merging runs in fp32.
        base: the base model when the recorded one moved (see ``load.parse_base``).
        max_shard_size: the largest safetensors shard.
        overwrite: replace a non-empty ``output``.

    Raises:
        ValueError: an unknown ``dtype``, or an ``output`` inside (or holding) the run.
        FileExistsError: a non-empty ``output`` without ``overwrite``.
    """
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
    replace(
        run.card,
        merged_from=os.fspath(checkpoint),
        merged_dtype=dtype,
        model_args={**run.card.model_args, "model_name_or_path": str(output_dir)},
    ).write(output_dir)
    figures = {**eval_figures(checkpoint), **benchmark_figures(checkpoint)}  # latest benchmarks
    readme = model_card(run.card, run.family, os.fspath(checkpoint), dtype, figures)
    readme.save(output_dir / "README.md")
    for stray in output_dir.glob("*"):  # only safetensors weights leave this command
        if stray.suffix in (".bin", ".pt", ".pth", ".pkl"):
            stray.unlink()
    return output_dir
