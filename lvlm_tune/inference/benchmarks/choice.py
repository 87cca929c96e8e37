"""Multiple-choice benchmarks: ScienceQA-IMG, MMBench (circular evaluation), SEED-Bench.

Options are shown as ``A. text`` lines after the question and the model is asked for the
letter. How an answer becomes a letter follows each benchmark's scorer: ScienceQA takes an
answer that is a letter, starts with ``X. `` or holds exactly one ``The answer is X.``;
SEED-Bench (LLaVA's conversion) compares the whole answer with the letter; MMBench takes a
lone letter, a leading ``X.``/``X)``, the only option letter standing as a word (an ``A`` in a
sentence of more than three words is taken for the article), or the only option whose text
the answer contains (the rule-based step of MMBench's matching; its GPT fallback is not run).

MMBench's circular evaluation: a question counts as right only when every rotation of its
options is answered right. Its TSVs hold the rotations as extra rows (``index`` plus a
multiple of 1,000,000); a TSV without them is rotated here (``round_id`` in the answers file).

LLaVA's layouts: ScienceQA ``llava_test_CQM-A.json`` (LLaVA conversations) with
``problems.json`` (``answer`` is the option's index); MMBench one ``*.tsv`` (base64 images);
SEED ``llava-seed-bench.jsonl`` with ``SEED-Bench.json`` (``questions``: ``answer``,
``data_type``, ``question_type_id``).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from lvlm_tune.inference.benchmarks.base import (
    LETTER_ANSWER,
    LETTERS,
    Benchmark,
    Question,
    percent,
    register,
    with_suffix,
)
from lvlm_tune.inference.benchmarks.files import (
    bad,
    find_file,
    need,
    read_json,
    read_tsv,
    write_jsonl,
)
from lvlm_tune.inference.benchmarks.vqa import llava_questions

ROTATION = 1_000_000
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def sqa_letter(text: str, count: int) -> str | None:
    """ScienceQA's reading of an answer (``None``: no letter among the first ``count``)."""
    options = LETTERS[:5]
    if text in options:
        letter = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter is not None and letter in LETTERS[:count] else None


def mmbench_letter(text: str, options: dict[str, str]) -> str | None:
    """MMBench's rule-based reading of an answer among ``options`` (letter -> text)."""
    text = text.strip()
    if text in options:
        return text
    if len(text) >= 2 and text[0] in options and text[1] in ".):":
        return text[0]
    words = re.split(r"[^0-9A-Za-z]+", text)
    letters = {w for w in words if w in options}
    if len(letters) == 1:
        letter = letters.pop()
        if not (letter == "A" and len([w for w in words if w]) > 3):
            return letter
    inside = [k for k, v in options.items() if v and v.lower() in text.lower()]
    return inside[0] if len(inside) == 1 else None


def options_text(question: str, options: list[str], hint: str | None = None) -> str:
    """``hint``, the question and ``A. option`` lines, as LLaVA and lmms-eval lay them out."""
    text = f"{hint}\n{question}" if hint else question
    return text + "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(options))


def _accuracy(rights: list[bool]) -> float | None:
    return percent(sum(rights), len(rights))


def score_sqa(questions: list[Question], answers: list[str | None]) -> dict[str, Any]:
    rights = [
        a is not None and sqa_letter(a, len(q.extra["choices"])) == q.target
        for q, a in zip(questions, answers, strict=True)
    ]
    img = [r for q, r in zip(questions, rights, strict=True) if q.image is not None]
    return {
        "img_accuracy": _accuracy(img), "accuracy": _accuracy(rights),
        "num_questions": len(questions), "num_img_questions": len(img),
        "missing": sum(a is None for a in answers),
    }  # fmt: skip


def score_mmbench(questions: list[Question], answers: list[str | None]) -> dict[str, Any]:
    groups: dict[Any, list[bool]] = defaultdict(list)
    first: dict[Any, bool] = {}
    category: dict[Any, str] = {}
    for q, a in zip(questions, answers, strict=True):
        right = a is not None and mmbench_letter(a, q.extra["options"]) == q.target
        groups[q.group].append(right)
        if q.round == 0 and q.id == q.group:  # the main row: the non-circular figure
            first[q.group] = right
        category[q.group] = q.category or ""
    circular = {g: all(r) for g, r in groups.items()}
    per_category: dict[str, list[bool]] = defaultdict(list)
    for g, right in circular.items():
        per_category[category[g]].append(right)
    return {
        "circular_accuracy": _accuracy(list(circular.values())),
        "vanilla_accuracy": _accuracy(list(first.values())),
        "categories": {c: _accuracy(r) for c, r in sorted(per_category.items())},
        "num_questions": len(circular), "num_prompts": len(questions),
        "missing": sum(a is None for a in answers),
    }  # fmt: skip


def score_seed(questions: list[Question], answers: list[str | None]) -> dict[str, Any]:
    by_type: dict[str, list[bool]] = defaultdict(list)
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for q, a in zip(questions, answers, strict=True):
        right = a is not None and a.strip() == q.target
        by_type[q.category or "image"].append(right)
        by_kind[str(q.extra.get("question_type", ""))].append(right)
    rights = [r for rs in by_type.values() for r in rs]
    return {
        "image_accuracy": _accuracy(by_type.get("image", [])), "accuracy": _accuracy(rights),
        "data_types": {t: _accuracy(r) for t, r in sorted(by_type.items())},
        "question_types": {t: _accuracy(r) for t, r in sorted(by_kind.items())},
        "num_questions": len(questions), "missing": sum(a is None for a in answers),
    }  # fmt: skip


def read_sqa(folder: Path, name: Path | None) -> list[Question]:
    path = find_file(folder, name, "llava_test_CQM-A.json")
    rows = read_json(path)
    if not isinstance(rows, list):
        raise bad(path, None, "", "expected a JSON list of LLaVA conversations")
    problems_path = folder / "problems.json"
    problems = read_json(problems_path) if problems_path.is_file() else {}
    questions = []
    for row in rows:
        pid = need(row, "id", path)
        turns = need(row, "conversations", path, pid, list)
        text = need(turns[0], "value", path, pid, str).replace("<image>", "").strip()
        problem = problems.get(str(pid))
        if problem is not None:
            choices = need(problem, "choices", problems_path, pid, list)
            target = LETTERS[need(problem, "answer", problems_path, pid, int)]
        elif len(turns) > 1 and "choices" in row:
            choices, target = row["choices"], sqa_letter(str(turns[1].get("value")), 5)
        else:
            raise bad(path, pid, "id", f"no problem {pid} in {problems_path}")
        text = with_suffix(text, LETTER_ANSWER)
        image = row.get("image")
        prompt = f"<image>\n{text}" if image is not None else text  # LLaVA's IMG marker
        extra = {"choices": choices, "prompt": prompt}
        questions.append(Question(pid, text, image, target, source=str(path), extra=extra))
    return questions


def _none(value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def _image_bytes(value: Any, source: Any, qid: Any) -> Any:
    if not isinstance(value, str):
        return value  # a datasets image (lmms-eval's layout)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad(source, qid, "image", "not a base64 image") from None


def mmbench_questions(rows: list[dict[str, Any]], source: str) -> list[Question]:
    """MMBench rows (TSV or lmms-eval parquet) as questions, rotated where the file is not."""
    rows = [{k.lower(): v for k, v in row.items()} for row in rows]
    has_rotations = any(int(need(r, "index", source)) >= ROTATION for r in rows)
    questions = []
    for row in rows:
        qid = int(row["index"])
        options = []
        for letter in LETTERS:
            if _none(row.get(letter.lower())):
                break
            options.append(str(row[letter.lower()]))
        if len(options) < 2:
            raise bad(source, qid, "A", "fewer than two options")
        answer = None if _none(row.get("answer")) else str(row["answer"]).strip()
        if answer is not None and answer not in LETTERS[: len(options)]:
            raise bad(source, qid, "answer", f"{answer!r} is not one of the option letters")
        hint = None if _none(row.get("hint")) else str(row["hint"])
        question = str(need(row, "question", source, qid))
        image = _image_bytes(row.get("image"), source, qid)
        rounds = 1 if has_rotations else len(options)
        for r in range(rounds):
            shown = options[r:] + options[:r]
            target = None if answer is None else LETTERS[(LETTERS.index(answer) - r) % len(shown)]
            text = with_suffix(options_text(question, shown, hint), LETTER_ANSWER)
            extra = {"options": dict(zip(LETTERS, shown, strict=False)), "rotated": rounds > 1}
            questions.append(Question(
                qid, text, image, target, category=row.get("category"), group=qid % ROTATION,
                round=r, source=source, extra=extra,
            ))  # fmt: skip
    return questions


def read_mmbench(folder: Path, name: Path | None) -> list[Question]:
    path = find_file(folder, name, "*.tsv")
    return mmbench_questions(read_tsv(path), str(path))


def read_seed(folder: Path, name: Path | None) -> list[Question]:
    path = find_file(folder, name, "llava-seed-bench.jsonl")
    questions = llava_questions(path, LETTER_ANSWER)
    truth_path = folder / "SEED-Bench.json"
    truth = {}
    if truth_path.is_file():
        data = read_json(truth_path)
        for row in need(data, "questions", truth_path, None, list):
            truth[str(need(row, "question_id", truth_path))] = row
    for q in questions:
        row = truth.get(str(q.id)) or q.extra["row"]
        if row.get("answer") is None:
            raise bad(path, q.id, "question_id", f"no answer in {truth_path} or the row")
        q.target = str(row["answer"]).strip()
        q.category = row.get("data_type") or q.category
        q.extra["question_type"] = row.get("question_type_id", q.extra["row"].get("category"))
    return questions


def submit_seed(questions: list[Question], answers: list[str | None], folder: Path, out: Path):
    """SEED-Bench's leaderboard file: ``question_id`` and ``prediction`` a line."""
    rows = [
        {"question_id": q.id, "prediction": a or ""}
        for q, a in zip(questions, answers, strict=True)
    ]
    return write_jsonl(out / "seed_submission.jsonl", rows)


def _hf_sqa(rows: list[dict[str, Any]], source: str) -> list[Question]:
    """lmms-eval's ScienceQA-IMG (``question``, ``choices``, ``answer`` index, ``hint``)."""
    questions = []
    for i, row in enumerate(rows):
        qid = row.get("question_id", i)
        choices = need(row, "choices", source, qid, list)
        hint = row.get("hint")
        text = options_text(need(row, "question", source, qid, str), choices,
                            f"Context: {hint}" if hint else None)  # fmt: skip
        target = LETTERS[need(row, "answer", source, qid, int)]
        extra = {"choices": choices}
        image = row.get("image")
        questions.append(Question(qid, with_suffix(text, LETTER_ANSWER), image, target,
                                  source=source, extra=extra))  # fmt: skip
    return questions


def _hf_seed(rows: list[dict[str, Any]], source: str) -> list[Question]:
    """lmms-eval's SEED-Bench (``choice_a`` ... ``choice_d``); its image questions."""
    questions = []
    for row in rows:
        if row.get("data_type", "image") != "image":
            continue
        qid = need(row, "question_id", source)
        choices = [str(row.get(f"choice_{c}")) for c in "abcd"]
        text = options_text(need(row, "question", source, qid, str), choices)
        image = row.get("image")
        image = image[0] if isinstance(image, list) else image
        extra = {"question_type": row.get("question_type_id")}
        questions.append(Question(qid, with_suffix(text, LETTER_ANSWER), image,
                                  str(need(row, "answer", source, qid)).strip(),
                                  category="image", source=source, extra=extra))  # fmt: skip
    return questions


register(
    Benchmark("scienceqa", "choice", LETTER_ANSWER, 1024, "img_accuracy", read_sqa, score_sqa,
              "llava_test_CQM-A.json", "images/test", read_hf=_hf_sqa),
    Benchmark("mmbench", "choice", LETTER_ANSWER, 1024, "circular_accuracy", read_mmbench,
              score_mmbench, "*.tsv", read_hf=mmbench_questions),
    Benchmark("seed", "choice", LETTER_ANSWER, 128, "image_accuracy", read_seed, score_seed,
              "llava-seed-bench.jsonl", "", submit_seed, _hf_seed),
)  # fmt: skip
