"""Reading benchmark files and answers files, with errors naming the file, question and field.

The question files are LLaVA's (``jsonl`` with ``question_id``, ``image``, ``text`` and maybe
``category``; a JSON list; MMBench's TSV); the answers files are what LLaVA's evaluation writes
and what ``lvlm-tune eval --benchmark`` writes: one JSON object a line with ``question_id``,
``prompt``, ``text``, ``answer_id``, ``model_id`` and ``metadata`` (plus ``round_id`` for
MMBench's rotations).
"""

from __future__ import annotations

import csv
import json
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.errors import UserError
from lvlm_tune.inference.benchmarks.base import Question


def bad(source: Any, question_id: Any, field: str, problem: str) -> BadSampleError:
    """The error for one question's bad field (the sample id is the question id)."""
    qid = None if question_id is None else str(question_id)
    return BadSampleError(str(source), qid, field, problem, "bad_field")


def read_json(path: Path) -> Any:
    """A JSON file; a missing or broken one is a user error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The objects of a JSON-lines file (blank lines skipped), errors naming the line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise UserError(f"{path}: line {number}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {number}: expected a JSON object")
            yield row


def read_tsv(path: Path) -> list[dict[str, str]]:
    """The rows of a tab-separated file with a header (MMBench); empty cells are ``""``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    csv.field_size_limit(sys.maxsize)  # base64 images are long cells
    with path.open(encoding="utf-8", newline="") as f:
        return [dict(row) for row in csv.DictReader(f, delimiter="\t")]


def need(row: dict[str, Any], key: str, source: Any, qid: Any = None, kind: type = object) -> Any:
    """``row[key]``, or an error naming the file, question and field."""
    if key not in row or row[key] is None:
        raise bad(source, qid, key, "missing")
    value = row[key]
    if kind is not object and not isinstance(value, kind):
        raise bad(source, qid, key, f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def find_file(folder: Path, name: str | None, default: str, option: str = "--data") -> Path:
    """``folder/name`` (or the default name; a pattern picks the only match)."""
    if name is not None:
        return Path(name)
    matches = sorted(folder.glob(default))
    if len(matches) == 1:
        return matches[0]
    found = "none" if not matches else ", ".join(m.name for m in matches)
    raise FileNotFoundError(
        f"{option} {folder}: expected the question file {default} (found {found}); pass the "
        "question file itself as --data"
    )


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """An answers file's rows, each checked for ``question_id`` and a text ``text``."""
    rows = []
    for row in read_jsonl(path):
        qid = need(row, "question_id", path)
        need(row, "text", path, qid, str)
        rows.append(row)
    return rows


def match_answers(
    questions: Sequence[Question], rows: Sequence[dict[str, Any]]
) -> list[str | None]:
    """The answers-file text for each question (``None`` where the file has none).

    Rows match on ``question_id`` (as text) and ``round_id`` (0 when absent). Where several
    questions share an id (TextVQA's files use the image id) the row's ``prompt`` decides.
    """
    by_key: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_key[str(row["question_id"]), int(row.get("round_id") or 0)].append(row)
    shared = defaultdict(int)
    for question in questions:
        shared[question.key] += 1
    answers: list[str | None] = []
    for question in questions:
        candidates = by_key.get(question.key, [])
        if shared[question.key] > 1:
            prompts = {question.text, question.extra.get("prompt", question.text)}
            candidates = [r for r in candidates if str(r.get("prompt", "")).strip() in prompts]
        answers.append(candidates[0]["text"] if candidates else None)
    return answers


def answer_rows(
    questions: Sequence[Question], answers: Sequence[str], model_id: str
) -> list[dict[str, Any]]:
    """LLaVA's answers-file rows for the questions and the model's answers."""
    rows = []
    for question, text in zip(questions, answers, strict=True):
        row: dict[str, Any] = {"question_id": question.id}
        if question.group is not None and question.extra.get("rotated"):
            row["round_id"] = question.round
        row.update(
            prompt=question.extra.get("prompt", question.text), text=text, answer_id=uuid.uuid4().hex, model_id=model_id,
            metadata={},
        )  # fmt: skip
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` one JSON object a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
