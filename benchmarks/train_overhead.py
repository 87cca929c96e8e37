"""Tokens/s of ``lvlm-tune train`` vs. a bare PyTorch loop on the same model and batches.

Builds a tiny LLaVA (4-layer, 256-wide LLaMA + small CLIP tower) offline, then times the same
full fine-tuning steps twice on the same batches in the same order: once through
``lvlm_tune.training.pipeline.run`` (HF Trainer + our trainer additions and data pipeline) and once through
a bare loop (DataLoader -> forward -> backward -> AdamW step) over the same dataset and collator.
The first steps of each are warm-up and not timed. Prints tokens/s of both and the ratio.
Run: ``.venv/bin/python benchmarks/train_overhead.py [--steps 40]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch
from PIL import Image
from transformers import TrainerCallback, set_seed

from lvlm_tune.data.collator import MultimodalCollator, pad_token_id
from lvlm_tune.testing.tiny_models import (
    write_tiny_llama,
    write_tiny_tokenizer,
    write_tiny_vision_tower,
)
from lvlm_tune.training.pipeline import build_dataset, build_model, run
from lvlm_tune.training.recipe import parse_recipe

WORDS = "the a red blue green square circle left right top bottom what color shape is there how many".split()


def make_data(root: str, n: int) -> str:
    rng = random.Random(0)
    samples = []
    for i in range(n):
        Image.new("RGB", (32, 32), (rng.randrange(256), 80, 160)).save(
            os.path.join(root, f"{i}.png")
        )
        turns = []
        for k in range(3):
            q = " ".join(rng.choices(WORDS, k=12)) + "?"
            a = " ".join(rng.choices(WORDS, k=30)) + "."
            turns += [
                {"from": "human", "value": ("<image>\n" if k == 0 else "") + q},
                {"from": "gpt", "value": a},
            ]
        samples.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(samples, f)
    return path


class StepClock(TrainerCallback):
    """Times the steps after ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def time_ours(argv: list[str], warmup: int) -> float:
    """Seconds for the timed steps of a real ``lvlm_tune.training.pipeline.run``."""
    clock = StepClock(warmup)
    run(*parse_recipe(None, argv), callbacks=[clock])
    return clock.end - clock.start


def time_bare(argv: list[str], warmup: int, batch_size: int) -> tuple[float, int]:
    """Seconds and tokens of the same steps in a bare loop (same init, data, order, optimizer)."""
    model_args, data_args, train_args = parse_recipe(None, argv)
    set_seed(train_args.seed)
    model, processor, family = build_model(model_args, data_args, train_args)
    dataset = build_dataset(data_args, processor, family.num_image_tokens(model), train_args.seed)
    collate = MultimodalCollator(pad_token_id(processor.tokenizer))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_args.learning_rate, weight_decay=0.0)
    model.train()
    start, tokens = 0.0, 0
    for step, batch in enumerate(loader, 1):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == warmup:
            start = time.perf_counter()
        elif step > warmup:
            tokens += int(batch["attention_mask"].sum())
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_tiny_tokenizer(
            os.path.join(tmp, "llm"), [" ".join(random.choices(WORDS, k=10)) for _ in range(2000)]
        )
        llm = write_tiny_llama(
            os.path.join(tmp, "llm"), tok, hidden_size=256, num_layers=4, num_heads=8
        )
        vision = write_tiny_vision_tower(os.path.join(tmp, "vision"), hidden_size=64, num_layers=2)
        data = make_data(tmp, args.steps * args.batch)
        overrides = {
            "vision_tower": vision, "llm_name_or_path": llm, "data_path": data, "image_folder": tmp,
            "output_dir": os.path.join(tmp, "run"), "stage": "finetune", "template": "vicuna_v1",
            "per_device_train_batch_size": args.batch, "max_steps": args.steps, "learning_rate": 1e-4,
            "weight_decay": 0.0, "lr_scheduler_type": "constant", "max_grad_norm": 0.0,
            "logging_steps": 10, "save_strategy": "no", "report_to": "none", "use_cpu": True,
            "loss_curve": False, "disable_tqdm": True, "seed": 0,
            "logits_at_labels": False,  # the bare loop's full-logits loss: overhead alone
        }  # fmt: skip
        argv = [f"--{k}={v}" for k, v in overrides.items()]

        from lvlm_tune.training import trainer as trainer_module

        trainer_module.LvlmTrainer._get_train_sampler = lambda self, ds=None: (
            torch.utils.data.SequentialSampler(self.train_dataset)
        )
        ours_times, bare_times = [], []
        for _ in range(args.repeats):  # alternate, keep the best of each (the machine is shared)
            ours_times.append(time_ours(argv, args.warmup))
            bare, tokens = time_bare(argv, args.warmup, args.batch)
            bare_times.append(bare)
        ours_time, bare_time = min(ours_times), min(bare_times)
    print(f"timed steps: {args.steps - args.warmup} x batch {args.batch}, {tokens} tokens")
    print(f"bare PyTorch loop: {tokens / bare_time:8.0f} tokens/s")
    print(f"lvlm-tune train:   {tokens / ours_time:8.0f} tokens/s")
    print(f"ratio lvlm-tune / bare loop: {bare_time / ours_time:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
