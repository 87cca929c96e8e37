"""Start-up time of ``lvlm-tune inspect`` vs. loading the same tokenizer in plain transformers.

Times, in fresh subprocesses and alternating so that machine load hits both alike,
``python -c "from transformers import AutoTokenizer; AutoTokenizer.from_pretrained(DIR)"`` and
``lvlm-tune inspect --data X --tokenizer DIR --template vicuna_v1 --limit 10`` on a small JSON
written to a temp folder, and prints both medians and their ratio (the target is under 1.5).
Run: ``.venv/bin/python benchmarks/inspect_startup.py [--tokenizer DIR] [--repeats 5]``. The
commands run in a temp folder, so the ``lvlm_tune`` measured is the installed one, or the one
on ``PYTHONPATH`` (to compare two checkouts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "llama2"


def write_data(folder: Path, count: int = 20) -> Path:
    """A text-only LLaVA JSON of ``count`` two-turn conversations."""
    rows = [
        {
            "id": f"q{i}",
            "conversations": [
                {"from": "human", "value": f"What is {i} plus {i}?"},
                {"from": "gpt", "value": f"It is {2 * i}."},
            ],
        }
        for i in range(count)
    ]
    path = folder / "data.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def timed(cmd: list[str], env: dict[str, str], cwd: str) -> float:
    """Wall-clock seconds of one run of ``cmd`` (which must succeed)."""
    start = time.perf_counter()
    subprocess.run(
        cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer folder")
    p.add_argument("--repeats", type=int, default=5, help="runs of each command")
    args = p.parse_args()
    if not Path(args.tokenizer).is_dir():
        sys.exit(f"no tokenizer folder at {args.tokenizer}; pass --tokenizer DIR")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        env["LVLM_TUNE_CACHE"] = str(Path(tmp) / "cache")
        data = write_data(Path(tmp))
        plain = [
            sys.executable,
            "-c",
            "import sys; from transformers import AutoTokenizer; "
            "AutoTokenizer.from_pretrained(sys.argv[1])",
            args.tokenizer,
        ]
        inspect = [
            sys.executable, "-m", "lvlm_tune.cli", "inspect", "--data", str(data),
            "--tokenizer", args.tokenizer, "--template", "vicuna_v1", "--limit", "10",
        ]  # fmt: skip
        timed(inspect, env, tmp)  # warm the page cache and build the data cache once
        times: dict[str, list[float]] = {"tokenizer": [], "inspect": []}
        for _ in range(args.repeats):
            times["tokenizer"].append(timed(plain, env, tmp))
            times["inspect"].append(timed(inspect, env, tmp))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        runs = " ".join(f"{v:.2f}" for v in values)
        print(f"{name:<10} median {medians[name]:.2f} s   runs: {runs}")
    print(f"ratio inspect / tokenizer: {medians['inspect'] / medians['tokenizer']:.2f}")


if __name__ == "__main__":
    main()
