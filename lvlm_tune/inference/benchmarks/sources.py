"""Where a benchmark's questions come from: a LLaVA folder, a question file, or lmms-eval's
Hugging Face layout (parquet files, or a ``datasets`` folder saved with ``save_to_disk``).

``--data`` may name the benchmark's folder (``playground/data/eval/pope``), the folder above
it (``playground/data/eval``, the benchmark's LLaVA folder name is looked up inside), the
question file itself, or a folder / parquet file of lmms-eval's dataset for the benchmark
(read offline with ``datasets``; nothing is downloaded). ``--limit N`` keeps the first N
questions, a question being all rows scored together (MMBench's rotations, MME's pairs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvlm_tune.errors import UserError
from lvlm_tune.inference.benchmarks.base import BENCHMARKS, Benchmark, Question

# The benchmark folders under LLaVA's playground/data/eval/.
LLAVA_FOLDERS = {
    "pope": "pope", "mme": "MME", "mmbench": "mmbench", "scienceqa": "scienceqa",
    "seed": "seed_bench", "textvqa": "textvqa", "gqa": "gqa", "vqav2": "vqav2",
    "vizwiz": "vizwiz",
}  # fmt: skip


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark ``name`` (a user error naming the choices otherwise)."""
    from lvlm_tune.inference.benchmarks import choice, vqa, yesno  # noqa: F401  (register)

    key = name.strip().lower()
    if key not in BENCHMARKS:
        raise UserError(f"--benchmark {name}: unknown; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


@dataclass
class BenchmarkData:
    """A benchmark's questions and where they were read from."""

    benchmark: Benchmark
    questions: list[Question]
    folder: Path
    image_folder: Path
    source: str


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    return sorted(path.rglob("*.parquet"))


def _hf_rows(path: Path) -> list[dict[str, Any]] | None:
    """The rows of lmms-eval's dataset at ``path``, or ``None`` when it is not one."""
    files = _parquet_files(path)
    saved = path.is_dir() and (path / "dataset_info.json").is_file()
    if not files and not saved:
        return None
    import datasets

    if saved:
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if len(dataset) != 1:
                raise UserError(f"--data {path}: splits {list(dataset)}; pass one split's folder")
            dataset = next(iter(dataset.values()))
    else:
        dataset = datasets.load_dataset(
            "parquet", data_files=[str(f) for f in files], split="train"
        )
    return [dict(row) for row in dataset]


def _limit(questions: list[Question], limit: int | None) -> list[Question]:
    if limit is None:
        return questions
    seen: set[Any] = set()
    kept = []
    for q in questions:
        unit = q.group if q.group is not None else q.key
        if unit not in seen and len(seen) == limit:
            break
        seen.add(unit)
        kept.append(q)
    return kept


def load_benchmark(
    name: str,
    data: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    limit: int | None = None,
) -> BenchmarkData:
    """Read benchmark ``name`` from ``data`` (see the module docstring)."""
    bench = get_benchmark(name)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    sub = path / LLAVA_FOLDERS.get(bench.name, bench.name)
    if path.is_dir() and sub.is_dir():
        path = sub
    rows = _hf_rows(path)
    if rows is not None:
        if bench.read_hf is None:
            raise UserError(f"--data {data}: no reader of lmms-eval's layout for {bench.name}")
        questions = bench.read_hf(rows, str(path))
        folder = path if path.is_dir() else path.parent
        default_images = folder
    else:
        folder, name_given = (path.parent, path) if path.is_file() else (path, None)
        questions = bench.read(folder, name_given)
        default_images = folder / bench.image_folder
    if not questions:
        raise UserError(f"--data {data}: no {bench.name} questions found")
    images = Path(image_folder) if image_folder is not None else default_images
    if image_folder is not None and not images.is_dir():
        raise FileNotFoundError(f"--image-folder {image_folder}: no such folder")
    return BenchmarkData(bench, _limit(questions, limit), folder, images, str(path))
