"""``make demo-dpo``: preference tuning (DPO) repairs a noisy SFT model, offline, on a CPU.

Steps (each timed, outputs under ``--out``, default ``runs/demo_dpo/``):

1. data: the LLaVA demo's shapes data (:mod:`lvlm_tune.demo.shapes`), its stage-2 instructions
   with ``--noise`` of the colour answers wrong (green called blue, red called yellow), and
   colour preference pairs (:mod:`lvlm_tune.demo.dpo_data`): chosen the drawn colour, rejected
   the confused one; training pairs from the training images, held-out pairs from the
   held-out colour questions;
2. base models, stage 1 and stage 2 as ``make demo`` runs them (:mod:`lvlm_tune.demo.run`),
   stage 2 on the noisy instructions; ``lvlm-tune merge`` makes the noisy SFT model (``sft/``);
3. DPO (``recipes/demo/llava_dpo_lora.yaml``: ``stage: dpo_lora`` on the SFT model; the
   reference is the SFT model, the policy with its adapters disabled) on the training pairs,
   merged into ``merged/``;
4. for the SFT and the DPO model: ``lvlm-tune eval``'s held-out exact match (colour + shape
   questions, as ``make demo``) with real and blank images, and held-out preference accuracy:
   the share of held-out pairs whose chosen answer the model gives the higher log-probability
   (summed over exactly the answer + STOP tokens, as DPO trains them).

It writes ``summary.json``: ``accuracy_sft``, ``accuracy_dpo``, ``preference_accuracy`` (the DPO
model's; ``preference_accuracy_sft`` the SFT model's), ``accuracy_blank_images`` (the DPO model
on blank images), ``chance``, per-kind figures, the noise actually applied, per-stage losses and
the wall time of every step.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from lvlm_tune.data.collator import pad_token_id
from lvlm_tune.data.preference_dataset import PreferenceCollator, PreferenceDataset
from lvlm_tune.data.preference_encoder import PreferenceEncoder
from lvlm_tune.data.sources import open_source
from lvlm_tune.demo import dpo_data, shapes
from lvlm_tune.demo.run import (
    RECIPES,
    SCORED_KINDS,
    VARIANTS,
    llava_base_models,
    step,
    train_sft_stages,
)
from lvlm_tune.demo.steps import final_loss, score_held_out, setup, train_recipe
from lvlm_tune.inference.export import merge
from lvlm_tune.inference.load import load_run
from lvlm_tune.training.preference_logps import sequence_logps

DPO_RECIPE = "llava_dpo_lora.yaml"


@torch.no_grad()
def preference_accuracy(model_dir: Path, pairs: Path, batch_size: int = 32) -> dict[str, float]:
    """How often ``model_dir`` gives the chosen answer of a held-out pair in ``pairs`` the higher
    log-probability (:func:`~lvlm_tune.training.preference_logps.sequence_logps`: the sum over
    the answer + STOP tokens, the prompt excluded), and the mean margin (chosen - rejected)."""
    loaded = load_run(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    images = loaded.images(pairs.parent)
    dataset = PreferenceDataset(open_source(pairs), PreferenceEncoder(loaded.encoder()), images)
    collate = PreferenceCollator(pad_token_id(loaded.processor.tokenizer))
    device = next(loaded.model.parameters()).device
    margins: list[float] = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logps = sequence_logps(loaded.model, batch)
        half = logps.shape[0] // 2  # rows 0..B-1 chosen, B..2B-1 rejected
        margins += (logps[:half] - logps[half:]).tolist()
    return {
        "preference_accuracy": sum(m > 0 for m in margins) / max(len(margins), 1),
        "mean_margin": sum(margins) / max(len(margins), 1),
        "pairs": len(margins),
    }


def make_data(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The shapes data, the noisy instructions and the preference pairs; paths and noise."""
    paths: dict[str, Any] = shapes.make_shapes_dataset(
        out / "data", n_train=args.train_images, n_test=args.test_images, seed=args.seed
    )
    root = Path(paths["root"])
    paths["instruct_train_noisy"] = root / "instruct_train_noisy.json"
    noise = dpo_data.noisy_instructions(
        paths["instruct_train"], paths["instruct_train_noisy"], args.noise, args.seed
    )
    paths["prefs_train"], paths["prefs_test"] = root / "prefs_train.json", root / "prefs_test.json"
    counts = {
        "train": dpo_data.preference_pairs(
            paths["instruct_train"], paths["prefs_train"], args.seed
        ),
        "test": dpo_data.preference_pairs(paths["instruct_test"], paths["prefs_test"], args.seed),
    }
    return {"paths": paths, "noise": noise, "pairs": counts}


def merge_and_score(
    checkpoint: Path, output: Path, paths: dict[str, Any], name: str, times: dict[str, float]
) -> dict[str, Any]:
    """``lvlm-tune merge`` of ``checkpoint`` (the ``name`` model) into ``output``; its held-out
    exact match with real and blank images (the eval reports go to ``output/eval_test.json``
    and ``output/eval_blank.json``) and its held-out preference accuracy."""
    start = step(f"merge: lvlm-tune merge --checkpoint {checkpoint} --output {output}")
    model = merge(checkpoint, output, overwrite=True)
    times[f"merge_{name}"] = time.perf_counter() - start
    start = step(f"eval: the {name} model on held-out questions and pairs")
    test, blank = score_held_out(
        model, model, paths["instruct_test"], paths["instruct_test_blank"], SCORED_KINDS
    )
    figures = {
        "accuracy": test["accuracy"], "accuracy_blank_images": blank["accuracy"],
        "accuracy_by_kind": test["by_kind"], "accuracy_blank_by_kind": blank["by_kind"],
        "answer_loss": test["answer_loss"],
        **preference_accuracy(model, Path(paths["prefs_test"])),
    }  # fmt: skip
    times[f"evaluate_{name}"] = time.perf_counter() - start
    return figures


def dpo_logs(trainer: Any) -> dict[str, float]:
    """The last logged value of every DPO figure (``rewards/...``, ``logps/...``)."""
    logs: dict[str, float] = {}
    for entry in trainer.state.log_history:
        logs.update({k: v for k, v in entry.items() if k.startswith(("rewards/", "logps/"))})
    return logs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lvlm_tune.demo.dpo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="runs/demo_dpo", help="output folder")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--test-images", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--noise", type=float, default=0.3,
        help="fraction of the SFT colour answers made wrong (green called blue, red yellow)",
    )  # fmt: skip
    parser.add_argument(
        "--pretrain-steps", type=int, help="override both base-model pre-trainings' steps"
    )
    parser.add_argument("--sft-steps", type=int, help="override both SFT stages' max_steps")
    parser.add_argument("--dpo-steps", type=int, help="override the DPO recipe's max_steps")
    parser.add_argument(
        "--quick", action="store_true", help="a few steps per stage: the plumbing, not accuracy"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # every core, unless OMP_NUM_THREADS says otherwise (on shared cores one thread is faster)
    setup(int(os.environ.get("OMP_NUM_THREADS") or 0) or None)
    out = Path(args.out)
    times: dict[str, float] = {}
    summary: dict[str, Any] = {"times_s": times}

    start = step("data: synthetic shapes, noisy instructions, colour preference pairs")
    data = make_data(out, args)
    paths = data["paths"]
    summary.update(noise=data["noise"], preference_pairs=data["pairs"])
    times["data"] = time.perf_counter() - start

    start = step("base models: vision tower and LLM pre-training")
    summary.update(llava_base_models(paths, out / "base", args.quick, args.pretrain_steps))
    times["base_models"] = time.perf_counter() - start
    sft = train_sft_stages(
        out, paths, VARIANTS["llava"], args.seed, args.quick, times,
        instruct=paths["instruct_train_noisy"], steps=args.sft_steps,
    )  # fmt: skip
    for stage, trainer in sft.items():
        summary[f"{stage}_final_loss"] = final_loss(trainer)
    before = merge_and_score(out / "stage2", out / "sft", paths, "sft", times)

    start = step(f"dpo: lvlm-tune train recipes/demo/{DPO_RECIPE}")
    values = {
        "model_name_or_path": out / "sft", "data_path": paths["prefs_train"],
        "image_folder": out / "data", "output_dir": out / "dpo", "seed": args.seed,
        **({"max_steps": args.dpo_steps} if args.dpo_steps else {}),
    }  # fmt: skip
    values.update(overwrite_output_dir=True, **({"max_steps": 3} if args.quick else {}))
    trainer = train_recipe(RECIPES / DPO_RECIPE, values)
    summary.update(dpo_final_loss=final_loss(trainer), dpo_logs=dpo_logs(trainer))
    times["dpo"] = time.perf_counter() - start
    after = merge_and_score(out / "dpo", out / "merged", paths, "dpo", times)
    times["total"] = sum(times.values())
    info = json.loads(Path(paths["info"]).read_text())
    summary.update(
        accuracy_sft=before["accuracy"], accuracy_dpo=after["accuracy"],
        preference_accuracy=after["preference_accuracy"],
        preference_accuracy_sft=before["preference_accuracy"],
        accuracy_blank_images=after["accuracy_blank_images"],
        accuracy_blank_images_sft=before["accuracy_blank_images"],
        chance=info["chance"]["colour_shape"], sft=before, dpo=after,
    )  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print("\n==== lvlm-tune DPO demo summary (llava, dpo_lora) ====")
    confused = ", ".join(f"{a} called {b}" for a, b in dpo_data.CONFUSED.items())
    print(f"SFT colour answers wrong: {data['noise']['wrong_fraction']:.3f} ({confused})")
    for name, figures in (("noisy SFT", before), ("after DPO", after)):
        print(
            f"{name:<10} held-out colour+shape exact match {figures['accuracy']:.3f} "
            f"(colour {figures['accuracy_by_kind']['colour']:.2f}, shape "
            f"{figures['accuracy_by_kind']['shape']:.2f}); preference accuracy "
            f"{figures['preference_accuracy']:.3f}; blank images "
            f"{figures['accuracy_blank_images']:.3f}"
        )
    print(f"chance (best constant answer): {summary['chance']}")
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(f"outputs: {out}/ (summary.json, sft/ and merged/ with their eval_*.json, dpo/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
