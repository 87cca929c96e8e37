"""What a benchmark is: its questions, its prompt suffix and generation length, its scorer.

A :class:`Question` is one prompt the model answers (an image, the question text exactly as the
model sees it, the suffix included, and what the scorer compares against). A :class:`Benchmark`
is data plus three functions: ``read`` turns a benchmark folder into questions, ``score`` turns
the questions and the model's answers (``None`` where an answer is missing) into figures, and
the optional ``submit`` writes the file an evaluation server expects. Every family module
(:mod:`.vqa`, :mod:`.choice`, :mod:`.yesno`) registers its benchmarks in :data:`BENCHMARKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The suffixes LLaVA-1.5's evaluation appends to each question (its docs/Evaluation.md).
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"


@dataclass
class Question:
    """One prompt of a benchmark.

    Attributes:
        id: the question id as the data writes it (int or str); answers files repeat it.
        text: the prompt text the model gets after its image (the suffix included), which is
            the ``prompt`` field of LLaVA's answers files.
        image: the image reference (a path relative to the image folder, bytes or a PIL image),
            ``None`` for a text-only question.
        target: what the scorer compares with: the reference answers (VQA), the answer
            (GQA, POPE, MME), the correct letter (multiple choice); ``None`` on server splits.
        category: the benchmark's split or category (POPE split, MME task, SEED type).
        group: questions scored together (MMBench's circular copies, MME's image pairs).
        round: the rotation of the options (MMBench rotations made here), else 0.
        source: the file the question came from (error messages).
        extra: what a benchmark needs for its submission file (e.g. VizWiz's image name).
    """

    id: Any
    text: str
    image: Any = None
    target: Any = None
    category: str | None = None
    group: Any = None
    round: int = 0
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        """What an answers-file row is matched on: the id as text and the round."""
        return str(self.id), self.round


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark.

    Attributes:
        name: the ``--benchmark`` name.
        family: ``vqa``, ``choice`` or ``yesno`` (the module that defines it).
        suffix: the instruction appended to each question (LLaVA-1.5's).
        max_new_tokens: the generation limit LLaVA-1.5's scripts use.
        headline: the metric a paper's table reports (the results table shows it).
        read: ``(folder, question_file) -> questions`` for LLaVA's layout (``question_file``
            is ``None`` for the default name).
        score: ``(questions, answers) -> metrics``; ``answers[i]`` is the model's text for
            ``questions[i]`` or ``None``.
        default_file: the question file's name in LLaVA's ``playground/data/eval/<name>/``.
        image_folder: the images' folder relative to the benchmark folder.
        submit: ``(questions, answers, folder, out_dir) -> path`` writing the server's file.
        read_hf: ``(rows, source) -> questions`` for lmms-eval's Hugging Face layout.
    """

    name: str
    family: str
    suffix: str
    max_new_tokens: int
    headline: str
    read: Callable[[Path, Path | None], list[Question]]
    score: Callable[[list[Question], list[str | None]], dict[str, Any]]
    default_file: str
    image_folder: str = ""
    submit: Callable[..., Path] | None = None
    read_hf: Callable[[list[dict[str, Any]], str], list[Question]] | None = None


def with_suffix(text: str, suffix: str) -> str:
    """``text`` ending with ``suffix`` on its own line (LLaVA's files carry it already)."""
    text = text.strip()
    if not suffix or text.endswith(suffix):
        return text
    return f"{text}\n{suffix}"


def percent(part: float, whole: int) -> float | None:
    """``100 * part / whole``, or ``None`` for an empty set (JSON has no NaN)."""
    return 100.0 * part / whole if whole else None


BENCHMARKS: dict[str, Benchmark] = {}


def register(*benchmarks: Benchmark) -> None:
    """Add benchmarks to the registry (each family module calls it on import)."""
    for bench in benchmarks:
        if bench.name in BENCHMARKS:
            raise ValueError(f"benchmark {bench.name!r} registered twice")
        BENCHMARKS[bench.name] = bench
