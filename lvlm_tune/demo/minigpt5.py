"""``make demo-minigpt5``: MiniGPT-5 stage 1 (generative vokens) on the shapes, offline, on a CPU.

Steps (each timed, outputs under ``--out``, default ``runs/demo_minigpt5/``):

1. data: close-ups of one shape each (a one-shape scene of :mod:`lvlm_tune.demo.shapes` drawn at
   twice the size and cropped to its quadrant) with captions such as ``"a red square"``, as
   caption pairs, plus a text corpus for the LLM;
2. base models: a tiny LLaMA pre-trained on the corpus (:mod:`lvlm_tune.demo.pretrain`), a
   random tiny CLIP vision tower (text-to-image prompts never show it an image), and a tiny
   text-to-image Stable Diffusion pre-trained on the same images
   (:mod:`lvlm_tune.demo.pretrain_diffusion`), which stage 1 then keeps frozen;
3. stage 1 (``recipes/demo/minigpt5_stage1.yaml``: only the voken rows and the mapping module
   train; the text CE, the LDM loss through the frozen UNet and the caption loss towards the
   frozen text encoder's embedding of the caption), run by the same machinery as real runs;
4. generation through the user path (``ChatSession`` of ``lvlm-tune chat --force-image``) for
   "a red / green / blue square" with several diffusion seeds each. An image counts as right
   when the requested colour is the closest of red, green and blue to the mean colour of its
   saturated pixels (chance: 1/3). The same score for the diffusion model prompted with the
   captions' own text embeddings is the ceiling vokens can reach.

It prints a summary and writes ``summary.json`` (accuracies, chance, losses, step times).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lvlm_tune.demo import pretrain, shapes
from lvlm_tune.demo.pretrain_diffusion import (
    DiffusionPretrainConfig,
    closest_colour,
    pretrain_diffusion,
    text_to_image_accuracy,
)
from lvlm_tune.generation.diffusion import load_diffusion_parts
from lvlm_tune.generation.trainer import LOSS_PARTS
from lvlm_tune.inference.chat import ChatSession
from lvlm_tune.inference.load import load_run
from lvlm_tune.templates.registry import get_template
from lvlm_tune.testing.tiny_models import write_tiny_vision_tower
from lvlm_tune.training.pipeline import run
from lvlm_tune.training.recipe import parse_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "demo"
SCORED = ("red", "green", "blue")  # the prompts "a red square", ...; yellow is trained, not scored
TEMPLATE = "chatml"  # the stage-1 recipe's template; its system prompt joins the LLM corpus


def make_generation_pairs(
    out_dir: str | os.PathLike, n_images: int = 2000, seed: int = 0, image_size: int = 32
) -> dict[str, Path]:
    """Write one-shape close-ups, their caption pairs and an LLM text corpus into ``out_dir``.

    Each image is a random one-shape scene rendered at ``2 * image_size`` and cropped to the
    quadrant that holds the shape, so the shape fills most of the frame; its caption is
    ``"a {colour} {shape}"``. The corpus also holds full scene captions, question / answer
    lines and the chat template's system prompt, so the LLM's tokenizer knows the demo's words
    and prompts stay short.

    Returns:
        Paths: ``root``, ``captions_train`` (``{"id", "image", "caption"}`` rows, images
        relative to ``root``) and ``text_corpus``.
    """
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows, corpus = [], []
    for n in range(n_images):
        scene = shapes.random_scene(rng, count=1)
        item = scene.items[0]
        row, col = divmod(shapes.POSITIONS.index(item.position), 2)
        box = (col * image_size, row * image_size, (col + 1) * image_size, (row + 1) * image_size)
        image = f"images/gen-{n:05d}.png"
        shapes.render(scene, 2 * image_size).crop(box).save(root / image)
        caption = f"a {item.colour} {item.shape}"
        rows.append({"id": f"gen-{n:05d}", "image": image, "caption": caption})
        other = shapes.random_scene(rng)
        corpus += [caption, shapes.caption(other)]
        corpus += [f"{q} {a}" for q, a in shapes.questions(other).values()]
    paths = {
        "root": root,
        "captions_train": root / "captions_train.json",
        "text_corpus": root / "text_corpus.txt",
    }
    paths["captions_train"].write_text(json.dumps(rows, indent=1))
    corpus += [get_template(TEMPLATE).default_system] * max(1, n_images // 20)
    paths["text_corpus"].write_text("\n".join(corpus) + "\n")
    return paths


def score_generation(session: ChatSession, seeds: list[int]) -> dict[str, Any]:
    """Ask ``"a {colour} square"`` for every scored colour and seed; score the answer's first image.

    ``session.generator.seed`` is set per answer, so every prompt is drawn from the same seeds.
    An answer may go on after its image (in stage 1 only the voken rows of ``lm_head`` train,
    not the template's STOP), so it is cut one token after the voken run. ``unforced`` says
    whether the model wrote the vokens itself (rather than ``--force-image`` appending them).
    """
    colours = {name: shapes.COLORS[name] for name in SCORED}
    max_new_tokens = session.generator.num_vokens + 1
    samples = []
    for name in SCORED:
        prompt = f"a {name} square"
        for seed in seeds:
            session.reset()
            session.generator.seed = seed
            first = len(session.saved_images)
            answer = session.ask(prompt, max_new_tokens=max_new_tokens)
            image_path = session.saved_images[first]
            with Image.open(image_path) as image:
                got = closest_colour(image, colours)
            samples.append(
                {"prompt": prompt, "seed": seed, "answer": answer, "image": image_path,
                 "unforced": answer.startswith("[image: "), "closest": got, "hit": got == name}
            )  # fmt: skip
    by_colour = {
        name: sum(s["hit"] for s in samples if s["prompt"] == f"a {name} square") / len(seeds)
        for name in SCORED
    }
    return {
        "accuracy": sum(s["hit"] for s in samples) / len(samples),
        "by_colour": by_colour,
        "unforced": sum(s["unforced"] for s in samples) / len(samples),
        "samples": samples,
    }


def final_losses(trainer: Any) -> dict[str, float]:
    """The last logged value of each loss the trainer reported."""
    last: dict[str, float] = {}
    for entry in trainer.state.log_history:
        for key in ("loss", *LOSS_PARTS):
            if key in entry:
                last[key] = round(float(entry[key]), 4)
    return last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lvlm_tune.demo.minigpt5", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="runs/demo_minigpt5", help="output folder")
    parser.add_argument("--images", type=int, default=2000, help="caption pairs to render")
    parser.add_argument("--seeds", type=int, default=8, help="diffusion seeds per prompt")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: these tiny models gain little from more, and a second thread "
        "stalls badly when other processes share the cores)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="a few steps per stage: plumbing, not accuracy"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING
    )
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    times: dict[str, float] = {}
    summary: dict[str, Any] = {"times_s": times, "chance": 1 / len(SCORED)}
    images, seeds, steps = (48, 1, 2) if args.quick else (args.images, args.seeds, args.steps)

    def step(name: str) -> float:
        print(f"[demo-minigpt5] {name} ...", flush=True)
        return time.perf_counter()

    start = step("data: one-shape close-ups with captions")
    paths = make_generation_pairs(out / "data", n_images=images, seed=args.seed)
    times["data"] = time.perf_counter() - start

    start = step("base models: LLM pre-training, vision tower")
    llm_config = pretrain.LanguageModelConfig(steps=5 if args.quick else 200)
    summary["llm_pretrain"] = pretrain.pretrain_language_model(
        paths["text_corpus"], out / "base" / "llm", llm_config
    )
    write_tiny_vision_tower(out / "base" / "vision", image_size=32, seed=args.seed)
    times["base_llm"] = time.perf_counter() - start

    start = step("base models: text-to-image diffusion pre-training (VAE, then UNet)")
    sd_config = DiffusionPretrainConfig(seed=args.seed)
    if args.quick:
        sd_config.vae_steps = sd_config.unet_steps = 2
    diffusion = out / "base" / "diffusion"
    summary["diffusion_pretrain"] = pretrain_diffusion(
        paths["captions_train"], paths["root"], diffusion, sd_config
    )
    times["base_diffusion"] = time.perf_counter() - start

    recipe = RECIPES / "minigpt5_stage1.yaml"
    start = step(f"stage 1: lvlm-tune train {recipe.relative_to(RECIPES.parents[1])}")
    values = {
        "vision_tower": out / "base" / "vision", "llm_name_or_path": out / "base" / "llm",
        "diffusion_model": diffusion, "data_path": paths["captions_train"],
        "image_folder": paths["root"], "output_dir": out / "stage1", "seed": args.seed,
        "overwrite_output_dir": True,  # the demo rebuilds its folder, whatever ran there
        **({"max_steps": 2, "logging_steps": 1} if args.quick else {}),
    }  # fmt: skip
    overrides = [f"--{key}={value}" for key, value in values.items()]
    trainer = run(*parse_recipe(recipe, overrides))
    summary["stage1_losses"] = final_losses(trainer)
    times["stage1"] = time.perf_counter() - start
    del trainer

    start = step(
        f"generate: lvlm-tune chat --model {out / 'stage1'} --force-image --steps {steps} "
        f'--image-dir {out / "generated"} --prompt "a red square" (green, blue; seeds 0..{seeds - 1})'
    )
    session = ChatSession(
        load_run(out / "stage1"), force_image=True, image_dir=str(out / "generated"), steps=steps
    )
    session.generator.pipeline.set_progress_bar_config(disable=True)
    generated = score_generation(session, list(range(seeds)))
    summary.update(
        accuracy=generated["accuracy"],
        accuracy_by_colour=generated["by_colour"],
        vokens_written_unforced=generated["unforced"],
    )
    (out / "generated.json").write_text(json.dumps(generated["samples"], indent=1))
    times["generate"] = time.perf_counter() - start

    start = step("ceiling: the diffusion model prompted with the captions' text embeddings")
    summary["diffusion_only_accuracy"] = text_to_image_accuracy(
        load_diffusion_parts(diffusion),
        {name: f"a {name} square" for name in SCORED},
        {name: shapes.COLORS[name] for name in SCORED},
        list(range(seeds)),
        steps=steps,
    )
    times["ceiling"] = time.perf_counter() - start
    times["total"] = sum(times.values())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print("\n==== lvlm-tune MiniGPT-5 demo summary ====")
    print(f"stage 1 final losses: {summary['stage1_losses']}")
    print(
        f"generated images with the requested colour closest: {summary['accuracy']:.3f} "
        f"(by colour {generated['by_colour']}; chance {summary['chance']:.3f})"
    )
    print(f"answers whose vokens the model wrote itself: {generated['unforced']:.3f}")
    print(
        f"diffusion model alone, prompted with the captions: {summary['diffusion_only_accuracy']:.3f}"
    )
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(f"outputs: {out}/ (summary.json, generated.json, generated/, stage1/, base/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
