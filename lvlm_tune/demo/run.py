"""``make demo``: the whole LLaVA recipe on synthetic shapes, offline, on a CPU, in minutes.

``--family minigpt4`` (``make demo-minigpt4``) runs the MiniGPT-4 variant the same way.
Steps (each timed, outputs under ``--out``, default ``runs/demo/`` or ``runs/demo_minigpt4/``):

1. data: coloured shapes on backgrounds, captions, multi-turn questions, a held-out split
   and the same held-out questions on blank images;
2. base models, pre-trained quickly on the demo's own images and text: a tiny CLIP vision
   tower and a tiny LLaMA with its tokenizer (they stand in for CLIP-L and Vicuna), or for
   MiniGPT-4 a tiny BLIP-2 (ViT + Q-Former) and a tiny LLaMA that already answers from a
   caption written where the image goes (:mod:`lvlm_tune.demo.pretrain_minigpt4`);
3. stage 1 (feature alignment, projector only) and stage 2 (LLaVA: LoRA on the LLM +
   projector; MiniGPT-4: the linear projection only, on instructions), run by the same recipe
   machinery as real runs (``recipes/demo/{family}_*.yaml``);
4. the last steps run what the user commands run (:mod:`lvlm_tune.inference`): ``lvlm-tune
   merge`` (LoRA folded into a standalone folder, ``merged/``), ``lvlm-tune eval`` on the
   held-out questions with real and with blank images (colour + shape exact match; answers
   must come from the image path), and ``lvlm-tune chat`` answering one held-out question.

It prints a summary and writes ``summary.json`` with the accuracies, chance levels, per-stage
losses and the wall time of every step.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvlm_tune.demo import pretrain, pretrain_minigpt4, shapes
from lvlm_tune.demo.steps import ask_once, final_loss, score, score_held_out, setup, train_recipe
from lvlm_tune.inference.export import merge

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "demo"
SCORED_KINDS = ("colour", "shape")


def llava_base_models(
    data: dict[str, Path], base: Path, quick: bool, steps: int | None = None
) -> dict[str, Any]:
    """The CLIP vision tower (``base/vision``) and the LLM (``base/llm``) of the LLaVA demo;
    ``steps``: both pre-trainings' steps instead of their defaults."""
    vision_config, llm_config = pretrain.VisionTowerConfig(), pretrain.LanguageModelConfig()
    if steps:
        vision_config.steps = llm_config.steps = steps
    if quick:
        vision_config.steps = llm_config.steps = 5
        vision_config.num_images = 64
    return {
        "vision_pretrain": pretrain.pretrain_vision_tower(base / "vision", vision_config),
        "llm_pretrain": pretrain.pretrain_language_model(
            data["text_corpus"], base / "llm", llm_config
        ),
    }


def minigpt4_base_models(data: dict[str, Path], base: Path, quick: bool) -> dict[str, Any]:
    """The BLIP-2 folder (``base/vision``) and the LLM (``base/llm``) of the MiniGPT-4 variant."""
    blip2_config = pretrain_minigpt4.Blip2EncoderConfig()
    llm_config = pretrain.LanguageModelConfig(max_length=pretrain_minigpt4.MAX_LENGTH)
    if quick:
        blip2_config.steps = llm_config.steps = 5
        blip2_config.num_images = 64
    return {
        "vision_pretrain": pretrain_minigpt4.pretrain_blip2(base / "vision", blip2_config),
        "llm_pretrain": pretrain_minigpt4.pretrain_minigpt4_llm(data, base / "llm", llm_config),
    }


@dataclass(frozen=True)
class Variant:
    """What differs between the demo's model families; every other step is shared."""

    base_models: Callable[[dict[str, Path], Path, bool], dict[str, Any]]
    recipes: tuple[str, str]  # stage 1, stage 2 under recipes/demo/
    stage2_trains: str  # for the summary


VARIANTS: dict[str, Variant] = {
    "llava": Variant(llava_base_models, ("llava_stage1.yaml", "llava_stage2_lora.yaml"), "LoRA"),
    "minigpt4": Variant(
        minigpt4_base_models, ("minigpt4_stage1.yaml", "minigpt4_stage2.yaml"), "projector"
    ),
}


def evaluate(model_dir: Path, path: Path) -> dict[str, Any]:
    """``lvlm-tune eval`` on a held-out LLaVA JSON; exact match over the colour and shape
    questions (:data:`SCORED_KINDS`) and per question kind (:func:`lvlm_tune.demo.steps.score`)."""
    return score(model_dir, path, SCORED_KINDS)


def step(name: str) -> float:
    """Announce a demo step; its start time."""
    print(f"[demo] {name} ...", flush=True)
    return time.perf_counter()


def train_sft_stages(
    out: Path,
    paths: dict[str, Path],
    variant: Variant,
    seed: int,
    quick: bool,
    times: dict[str, float],
    instruct: Path | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """Stage 1 (captions) and stage 2 (``instruct``, default the demo's instructions) of
    ``variant`` under ``out`` (``steps``: both stages' ``max_steps``); each stage's wall time
    goes into ``times``; the trainers."""
    # The recipes name runs/demo/...; point them at --out (the same paths for `make demo`).
    paths_of = {
        "stage1": {"data_path": paths["captions_train"]},
        "stage2": {
            "data_path": instruct or paths["instruct_train"],
            "pretrained_projector": out / "stage1",
        },
    }
    steps = 3 if quick else steps
    trainers = {}
    for stage, recipe in zip(("stage1", "stage2"), variant.recipes, strict=True):
        start = step(f"{stage}: lvlm-tune train recipes/demo/{recipe}")
        values = {
            "vision_tower": out / "base" / "vision", "llm_name_or_path": out / "base" / "llm",
            "image_folder": out / "data", "output_dir": out / stage, "seed": seed,
            "overwrite_output_dir": True,  # the demo rebuilds its folder, whatever ran there
            **paths_of[stage], **({"max_steps": steps} if steps else {}),
        }  # fmt: skip
        trainers[stage] = train_recipe(RECIPES / recipe, values)
        times[stage] = time.perf_counter() - start
    return trainers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lvlm_tune.demo.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--family", choices=tuple(VARIANTS), default="llava")
    parser.add_argument(
        "--out", help="output folder (default: runs/demo, or runs/demo_minigpt4 for minigpt4)"
    )
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--test-images", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few steps per stage: checks the plumbing, not the accuracy",
    )
    args = parser.parse_args(argv)
    setup()
    variant = VARIANTS[args.family]
    out = Path(args.out or ("runs/demo" if args.family == "llava" else f"runs/demo_{args.family}"))
    times: dict[str, float] = {}
    summary: dict[str, Any] = {"times_s": times}

    start = step("data: synthetic shapes")
    paths = shapes.make_shapes_dataset(
        out / "data", n_train=args.train_images, n_test=args.test_images, seed=args.seed
    )
    times["data"] = time.perf_counter() - start

    start = step("base models: vision side and LLM pre-training")
    summary.update(variant.base_models(paths, out / "base", args.quick))
    times["base_models"] = time.perf_counter() - start

    trainers = train_sft_stages(out, paths, variant, args.seed, args.quick, times)
    for stage, trainer in trainers.items():
        summary[f"{stage}_final_loss"] = final_loss(trainer)

    start = step(f"merge: lvlm-tune merge --checkpoint {out / 'stage2'} --output {out / 'merged'}")
    merged = merge(out / "stage2", out / "merged", overwrite=True)
    times["merge"] = time.perf_counter() - start

    start = step("eval: lvlm-tune eval on held-out questions (real and blank images)")
    test, blank = score_held_out(
        merged, out, paths["instruct_test"], paths["instruct_test_blank"], SCORED_KINDS
    )
    times["evaluate"] = time.perf_counter() - start
    info = json.loads(Path(paths["info"]).read_text())
    summary.update(
        accuracy=test["accuracy"],
        accuracy_blank_images=blank["accuracy"],
        chance=info["chance"].get("colour_shape"),
        accuracy_by_kind=test["by_kind"],
        accuracy_blank_by_kind=blank["by_kind"],
        answer_loss=test["answer_loss"],
    )

    first = json.loads(Path(paths["instruct_test"]).read_text())[0]
    question = first["conversations"][0]["value"].replace("<image>", "").strip()
    image = Path(paths["root"]) / first["image"]
    start = step(f"chat: lvlm-tune chat --model {merged} --image {image} --prompt {question!r}")
    ask_once(merged, question, str(image), max_new_tokens=16)  # what `lvlm-tune chat` runs
    summary["example"] = {
        "image": str(image),
        "question": question,
        "truth": first["conversations"][1]["value"],
    }
    times["chat"] = time.perf_counter() - start
    times["total"] = sum(times.values())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\n==== lvlm-tune demo summary ({args.family}) ====")
    print(f"stage 1 (projector) final loss: {summary['stage1_final_loss']:.3f}")
    label = f"stage 2 ({variant.stage2_trains}) final loss:"
    print(f"{label:<32}{summary['stage2_final_loss']:.3f}")
    print(
        f"held-out colour+shape exact match: {summary['accuracy']:.3f}  (by kind: {test['by_kind']})"
    )
    print(
        f"same questions, blank images:      {summary['accuracy_blank_images']:.3f}  (chance {summary['chance']})"
    )
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(f"outputs: {out}/ (summary.json, stage1/, stage2/, merged/, eval_test.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
