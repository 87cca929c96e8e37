"""Per-rank bytes of parameters, gradients and optimizer state under ZeRO-0, ZeRO-2 and ZeRO-3.

Builds a small LLaVA offline (CLIP 4 x 128 + LLaMA 4 x 256, about 4M parameters, vision tower
frozen, projector + LLM trained: the ``finetune`` stage), then for each ZeRO stage runs
``torchrun --nproc_per_node 2`` on this file: a real ``lvlm-tune train`` run (bf16, AdamW) whose
DeepSpeed optimizer is measured on every rank right before the second optimizer step, when
parameters, gradients and Adam moments all exist. Every tensor reachable from the model and
from DeepSpeed's optimizer is counted once (by storage) as:

* parameters: the module's parameters (under ZeRO-3 this rank's partitions, plus the small
  persistent ones), and the bf16 flat buffers they live in;
* gradients: ``.grad`` tensors and DeepSpeed's gradient buffers and partitions;
* optimizer: Adam moments and the fp32 master copy of the trained parameters.

ZeRO-0 is DeepSpeed with ``"stage": 0`` (plain data parallelism with the same bf16 optimizer).
Run: ``.venv/bin/python benchmarks/zero_memory.py [--json out.json]`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = (0, 2, 3)
CATEGORIES = ("parameters", "gradients", "optimizer")


# ---- the worker (one rank) ---------------------------------------------------------------


def _tensors(obj: Any, path: str, seen: set[int], depth: int = 0) -> Any:
    """Yield ``(attribute path, tensor)`` for tensors reachable from ``obj``."""
    if id(obj) in seen or depth > 6 or isinstance(obj, torch.nn.Module):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        if obj.grad is not None:
            yield f"{path}.grad", obj.grad
        return
    if isinstance(obj, dict):
        items = [(f"{path}[{k if isinstance(k, str | int) else '.'}]", v) for k, v in obj.items()]
    elif isinstance(obj, list | tuple | set):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
        items = [(f"{path}.{k}", v) for k, v in vars(obj).items()]
    else:
        return
    for sub_path, value in items:
        yield from _tensors(value, sub_path, seen, depth + 1)


def account(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """Bytes per category held by this rank (every storage counted once), and where they are."""
    counted: dict[int, tuple[str, str, int]] = {}

    def add(tensor: torch.Tensor, category: str, where: str) -> None:
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in counted:
            counted[storage.data_ptr()] = (
                category,
                re.sub(r"\[\d+\]", "[i]", where),
                storage.nbytes(),
            )

    for param in model.parameters():
        add(param.data, "parameters", "module parameters")
        if hasattr(param, "ds_tensor"):
            add(param.ds_tensor, "parameters", "module parameters (ZeRO-3 partitions)")
    for path, tensor in _tensors(optimizer, "optimizer", set()):
        lowered = path.lower()
        if "grad" in lowered or "ipg" in lowered:
            add(tensor, "gradients", path)
        elif any(
            tag in lowered for tag in ("bit16", "fp16_groups", "fp16_partitioned", "bf16_groups")
        ):
            add(tensor, "parameters", path)
        else:
            add(tensor, "optimizer", path)
    for param in model.parameters():
        if param.grad is not None:
            add(param.grad, "gradients", "module .grad")
    totals: dict[str, Any] = dict.fromkeys(CATEGORIES, 0)
    details: dict[str, int] = {}
    for category, where, size in counted.values():
        totals[category] += size
        details[f"{category}: {where}"] = details.get(f"{category}: {where}", 0) + size
    totals["details"] = details
    return totals


def worker(recipe: str, out: str) -> None:
    from transformers import TrainerCallback

    from lvlm_tune.training.pipeline import run
    from lvlm_tune.training.recipe import parse_recipe

    class Measure(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model, optimizer = kwargs["model"], kwargs["optimizer"].optimizer
            step, calls = optimizer.step, []

            def measured_step(*a: Any, **kw: Any) -> Any:
                calls.append(1)
                if len(calls) == 2:  # Adam moments exist since the first step
                    rank = torch.distributed.get_rank()
                    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
                        json.dump(account(model, optimizer), f)
                return step(*a, **kw)

            optimizer.step = measured_step

    run(*parse_recipe(recipe), callbacks=[Measure()])
    torch.distributed.destroy_process_group()


# ---- the driver ----------------------------------------------------------------------------


def build_inputs(root: Path) -> dict[str, str]:
    """Tiny-but-not-trivial parts and a few samples, written offline."""
    from PIL import Image

    from lvlm_tune.testing.tiny_models import (
        write_tiny_llama,
        write_tiny_tokenizer,
        write_tiny_vision_tower,
    )

    tok = write_tiny_tokenizer(root / "llm", vocab_size=400)
    llm = write_tiny_llama(root / "llm", tok, hidden_size=256, num_layers=4, num_heads=4)
    vision = write_tiny_vision_tower(root / "vision", hidden_size=128, num_layers=4)
    samples = []
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 20, 200 - 20 * i)).save(root / f"{i}.png")
        samples.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is it?"},
                    {"from": "gpt", "value": "It is a red square on the left."},
                ],
            }
        )
    (root / "data.json").write_text(json.dumps(samples))
    return {"llm": str(llm), "vision": str(vision), "data": str(root / "data.json")}


def write_recipe(root: Path, inputs: dict[str, str], stage: int) -> Path:
    import yaml

    ds = json.loads(
        (
            ROOT / "ds_configs/zero3.json" if stage == 3 else ROOT / "ds_configs/zero2.json"
        ).read_text()
    )
    ds["zero_optimization"]["stage"] = stage
    (root / f"zero{stage}.json").write_text(json.dumps(ds))
    recipe = {
        "vision_tower": inputs["vision"],
        "llm_name_or_path": inputs["llm"],
        "data_path": inputs["data"],
        "image_folder": str(root),
        "template": "vicuna_v1",
        "stage": "finetune",
        "deepspeed": str(root / f"zero{stage}.json"),
        "bf16": True,
        "use_cpu": True,
        "per_device_train_batch_size": 2,
        "max_steps": 2,
        "save_strategy": "no",
        "report_to": "none",
        "loss_curve": False,
        "output_dir": str(root / f"run{stage}"),
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    path = root / f"zero{stage}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def measure(root: Path, inputs: dict[str, str], stage: int) -> list[dict[str, int]]:
    """Run one 2-rank job; returns the per-rank byte counts."""
    out = root / f"measure{stage}"
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node=2",
        f"--master_port={port}",
        __file__,
        "--worker",
        str(write_recipe(root, inputs, stage)),
        str(out),
    ]
    env = {**os.environ, "LVLM_TUNE_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        sys.exit(f"ZeRO-{stage} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--details", action="store_true", help="list the buffers counted")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = build_inputs(root)
        results = {stage: measure(root, inputs, stage) for stage in STAGES}
    mib = 2**20
    total = {s: max(sum(r[c] for c in CATEGORIES) for r in ranks) for s, ranks in results.items()}
    print(
        "| ZeRO | parameters MiB | gradients MiB | optimizer MiB | total MiB / rank | vs ZeRO-0 |"
    )
    print("|---|---|---|---|---|---|")
    for stage, ranks in results.items():
        worst = max(ranks, key=lambda r: sum(r[c] for c in CATEGORIES))
        cells = " | ".join(f"{worst[c] / mib:.2f}" for c in CATEGORIES)
        print(f"| {stage} | {cells} | {total[stage] / mib:.2f} | {total[stage] / total[0]:.2f} |")
    if args.details:
        for stage, ranks in results.items():
            print(f"ZeRO-{stage}, rank 0:")
            for where, size in sorted(ranks[0]["details"].items()):
                print(f"  {size / mib:8.3f} MiB  {where}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({f"zero{s}": r for s, r in results.items()}, indent=2)
        )


if __name__ == "__main__":
    main()
