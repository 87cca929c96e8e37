"""``make demo-onevision``: LLaVA-OneVision on questions that need two images, offline, on a CPU.

Steps (each timed, outputs under ``--out``, default ``runs/demo_onevision/``):

1. data (:mod:`lvlm_tune.demo.pairs`): pairs of shapes images, described for stage 1, asked
   about for stage 2 (which image has more shapes, how many shapes the two hold together,
   which colours they show), a held-out split and its blank-images twin;
2. base models: a tiny SigLIP tower pre-trained as the LLaVA demo's CLIP is
   (:mod:`lvlm_tune.demo.pretrain`; it exposes its last hidden state, OneVision's feature
   layer) and a tiny LLaMA pre-trained on the training conversations with captions where the images go
   (:mod:`lvlm_tune.demo.pretrain_onevision`);
3. stage 1 (projector only) and stage 2 (LoRA + projector) of ``family: llava_onevision``,
   composed from those parts by the same recipe machinery as real runs
   (``recipes/demo/llava_onevision_*.yaml``); two images per sample, each encoded at base
   resolution (16 tokens + 1 newline);
4. what the user commands run: ``lvlm-tune merge``, ``lvlm-tune eval`` on the held-out
   questions with real and with blank images, ``lvlm-tune chat`` with two images.

It writes ``summary.json``: ``accuracy`` (held-out exact match over all questions),
``accuracy_blank_images``, ``chance`` (the best constant answer per kind), per-kind figures,
per-stage losses and the wall time of every step.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from lvlm_tune.demo import pairs, pretrain
from lvlm_tune.demo.pretrain_onevision import MAX_LENGTH, pretrain_onevision_llm
from lvlm_tune.demo.steps import ask_once, final_loss, score_held_out, setup, train_recipe
from lvlm_tune.inference.export import merge

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "demo"
STAGES = (("stage1", "llava_onevision_stage1.yaml"), ("stage2", "llava_onevision_stage2_lora.yaml"))


def base_models(
    base: Path, data: dict[str, Path], quick: bool, steps: int | None = None
) -> dict[str, Any]:
    """The SigLIP tower (``base/vision``) and the caption-pre-trained LLM (``base/llm``);
    ``steps``: both pre-trainings' steps instead of their defaults."""
    vision = pretrain.VisionTowerConfig(kind="siglip", feature_layer=-1, num_layers=2)
    llm = pretrain.LanguageModelConfig(max_length=MAX_LENGTH)
    if steps:
        vision.steps = llm.steps = steps
    if quick:
        vision.steps = llm.steps = 5
        vision.num_images = 64
    return {
        "vision_pretrain": pretrain.pretrain_vision_tower(base / "vision", vision),
        "llm_pretrain": pretrain_onevision_llm(data, base / "llm", llm),
    }


def train_stages(out: Path, data: dict[str, Path], seed: int, steps: int | None) -> dict[str, Any]:
    """Stage 1 and stage 2 through ``lvlm-tune train``'s machinery; the trainers."""
    trainers = {}
    files = {"stage1": data["describe_train"], "stage2": data["pairs_train"]}
    for stage, recipe in STAGES:
        values = {
            "vision_tower": out / "base" / "vision", "llm_name_or_path": out / "base" / "llm",
            "image_folder": out / "data", "data_path": files[stage], "output_dir": out / stage,
            "seed": seed, "overwrite_output_dir": True,
            **({"pretrained_projector": out / "stage1"} if stage == "stage2" else {}),
            **({"max_steps": steps} if steps else {}),
        }  # fmt: skip
        print(f"[demo] {stage}: lvlm-tune train recipes/demo/{recipe}", flush=True)
        trainers[stage] = train_recipe(RECIPES / recipe, values)
    return trainers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lvlm_tune.demo.onevision", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="runs/demo_onevision", help="output folder")
    parser.add_argument("--train-pairs", type=int, default=3000)
    parser.add_argument("--test-pairs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage-steps", type=int, help="override both stages' max_steps")
    parser.add_argument(
        "--pretrain-steps", type=int, help="override both base-model pre-trainings' steps"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps per stage: the plumbing, not accuracy"
    )
    args = parser.parse_args(argv)
    # every core, unless OMP_NUM_THREADS says otherwise (on shared cores one thread is faster)
    setup(int(os.environ.get("OMP_NUM_THREADS") or 0))
    out = Path(args.out)
    times: dict[str, float] = {}
    summary: dict[str, Any] = {"times_s": times}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        times[name] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    print("[demo] data: two-image shapes pairs", flush=True)
    data = pairs.make_pairs_dataset(
        out / "data", n_train=args.train_pairs, n_test=args.test_pairs, seed=args.seed
    )
    lap("data")
    print("[demo] base models: vision tower and caption-pre-trained LLM", flush=True)
    summary.update(base_models(out / "base", data, args.quick, args.pretrain_steps))
    lap("base_models")
    steps = 3 if args.quick else args.stage_steps
    for stage, trainer in train_stages(out, data, args.seed, steps).items():
        summary[f"{stage}_final_loss"] = final_loss(trainer)
    lap("train")

    print(f"[demo] merge: lvlm-tune merge --checkpoint {out / 'stage2'}", flush=True)
    merged = merge(out / "stage2", out / "merged", overwrite=True)
    lap("merge")
    print("[demo] eval: held-out questions, real and blank images", flush=True)
    test, blank = score_held_out(merged, out, data["pairs_test"], data["pairs_test_blank"])
    lap("evaluate")
    info = json.loads(data["info"].read_text())
    summary.update(
        accuracy=test["accuracy"], accuracy_blank_images=blank["accuracy"],
        chance=info["chance"]["all"], chance_by_kind=info["chance"],
        accuracy_by_kind=test["by_kind"], accuracy_blank_by_kind=blank["by_kind"],
        answer_loss=test["answer_loss"],
    )  # fmt: skip

    first = json.loads(data["pairs_test"].read_text())[0]
    question = first["conversations"][0]["value"].replace("<image>", "").strip()
    images = [str(data["root"] / name) for name in first["images"]]
    print(f"[demo] chat: lvlm-tune chat --model {merged} --image {' '.join(images)}", flush=True)
    ask_once(merged, question, images, max_new_tokens=8)
    summary["example"] = {"images": images, "question": question, "truth": first["conversations"][1]["value"]}  # fmt: skip
    lap("chat")
    times["total"] = round(sum(times.values()), 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print("\n==== lvlm-tune demo summary (llava_onevision, two images per question) ====")
    print(f"stage 1 (projector) final loss: {summary['stage1_final_loss']:.3f}")
    print(f"stage 2 (LoRA) final loss:      {summary['stage2_final_loss']:.3f}")
    print(f"held-out exact match:   {summary['accuracy']:.3f}  (by kind: {test['by_kind']})")
    print(f"blank images:           {summary['accuracy_blank_images']:.3f}  (chance {summary['chance']})")  # fmt: skip
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(f"outputs: {out}/ (summary.json, stage1/, stage2/, merged/, eval_test.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
