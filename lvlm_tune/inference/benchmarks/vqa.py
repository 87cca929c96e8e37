"""Short-answer benchmarks: VQAv2, TextVQA, VizWiz (VQA accuracy) and GQA (exact match).

VQA accuracy of one answer against the human answers (ten in these datasets): for each of the
leave-one-out subsets, ``min(1, matches / 3)`` where ``matches`` counts the remaining human
answers equal to the prediction, averaged over the subsets (2 matches of 10 -> 0.6, 3 -> 0.9,
4 or more -> 1.0), everything normalised with :func:`.answer_norm.normalize_answer`. GQA is
scored as its own evaluation script scores its ``accuracy``: the prediction, trailing periods
stripped and lower-cased (LLaVA's conversion to GQA's predictions file), equals the answer.

LLaVA's layouts (``playground/data/eval/<name>/``):

- TextVQA: ``llava_textvqa_val_v051_ocr.jsonl`` (``question_id`` is the image id) and
  ``TextVQA_0.5.1_val.json``, matched on the image id and the lower-cased question.
- GQA: ``llava_gqa_testdev_balanced.jsonl`` and ``data/testdev_balanced_questions.json``;
  also writes GQA's ``testdev_balanced_predictions.json`` for its official script.
- VQAv2 test-dev and VizWiz test are scored by their servers: the submission file is written
  (VQAv2: every question of ``llava_vqav2_mscoco_test2015.jsonl``, unanswered ones empty;
  VizWiz: ``image`` and ``answer``), answers normalised. A question file whose rows carry
  ``answers`` (a validation split) is scored here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lvlm_tune.inference.benchmarks.answer_norm import normalize_answer
from lvlm_tune.inference.benchmarks.base import (
    SHORT_ANSWER,
    Benchmark,
    Question,
    percent,
    register,
    with_suffix,
)
from lvlm_tune.inference.benchmarks.files import bad, find_file, need, read_json, read_jsonl


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of ``prediction`` against the human ``answers`` (0 to 1)."""
    if not answers:
        return 0.0
    guess = normalize_answer(prediction)
    truth = [normalize_answer(a) for a in answers]
    total = 0.0
    for left_out in range(len(truth)):
        matches = sum(1 for i, a in enumerate(truth) if i != left_out and a == guess)
        total += min(1.0, matches / 3)
    return total / len(truth)


def gqa_normalize(text: str) -> str:
    """LLaVA's GQA prediction cleaning: trailing periods stripped, lower-cased."""
    return text.rstrip(".").lower()


def _answer_texts(value: Any, source: Any, qid: Any) -> list[str]:
    """Human answers as strings (VQAv2/VizWiz store ``{"answer": ...}`` objects)."""
    if not isinstance(value, list):
        raise bad(source, qid, "answers", f"expected a list of answers, got {value!r:.60}")
    texts = [a.get("answer") if isinstance(a, dict) else a for a in value]
    if not all(isinstance(t, str) for t in texts):
        raise bad(source, qid, "answers", "every answer must be text (or {'answer': text})")
    return texts


def score_vqa(questions: list[Question], answers: list[str | None]) -> dict[str, Any]:
    """VQA accuracy in percent over the questions with reference answers."""
    scored = [(q, a) for q, a in zip(questions, answers, strict=True) if q.target is not None]
    total = sum(vqa_accuracy(a or "", q.target) for q, a in scored)
    return {
        "accuracy": percent(total, len(scored)),
        "num_questions": len(scored),
        "missing": sum(a is None for _, a in scored),
    }


def score_gqa(questions: list[Question], answers: list[str | None]) -> dict[str, Any]:
    """GQA accuracy in percent: exact match after :func:`gqa_normalize`."""
    right = sum(
        a is not None and gqa_normalize(a) == q.target
        for q, a in zip(questions, answers, strict=True)
    )
    return {
        "accuracy": percent(right, len(questions)),
        "num_questions": len(questions),
        "missing": sum(a is None for a in answers),
    }


def llava_questions(path: Path, suffix: str) -> list[Question]:
    """The rows of a LLaVA question jsonl (``question_id``, ``image``, ``text``, ...)."""
    questions = []
    for row in read_jsonl(path):
        qid = need(row, "question_id", path)
        text = need(row, "text", path, qid, str)
        question = Question(
            qid, with_suffix(text, suffix), row.get("image"), category=row.get("category"),
            source=str(path), extra={"row": row},
        )  # fmt: skip
        for key in ("answers", "answer", "label"):
            if row.get(key) is not None:
                question.extra["reference"] = row[key]
                break
        questions.append(question)
    return questions


def _with_row_answers(questions: list[Question]) -> list[Question]:
    for q in questions:
        if "reference" in q.extra:
            q.target = _answer_texts(q.extra["reference"], q.source, q.id)
    return questions


def textvqa_question(text: str) -> str:
    """The question inside a TextVQA prompt (OCR-token lines and the suffix dropped)."""
    if text.startswith("OCR tokens: ") and "Question: " in text:
        return text.split("Question: ", 1)[1].split(" Short answer:", 1)[0].lower()
    lines = [
        line for line in text.split("\n")
        if line.strip() and not line.startswith("Reference OCR token:")
        and line.strip() not in (SHORT_ANSWER,)
    ]  # fmt: skip
    return (lines[0] if lines else text).strip().lower()


def read_textvqa(folder: Path, name: Path | None) -> list[Question]:
    path = find_file(folder, name, "llava_textvqa_val_v051_ocr.jsonl")
    questions = llava_questions(path, SHORT_ANSWER)
    annotation_path = folder / "TextVQA_0.5.1_val.json"
    if not annotation_path.is_file():
        return _with_row_answers(questions)
    data = read_json(annotation_path)
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise bad(annotation_path, None, "data", "expected TextVQA's {'data': [...]} layout")
    table = {}
    for row in rows:
        qid = row.get("question_id")
        key = (str(need(row, "image_id", annotation_path, qid)), str(row.get("question")).lower())
        table[key] = _answer_texts(need(row, "answers", annotation_path, qid), annotation_path, qid)
    for q in questions:
        key = (str(q.id), textvqa_question(q.text))
        if key not in table:
            raise bad(path, q.id, "text", f"no question {key[1]!r} of image {key[0]} in "
                      f"{annotation_path}")  # fmt: skip
        q.target = table[key]
    return questions


def read_gqa(folder: Path, name: Path | None) -> list[Question]:
    path = find_file(folder, name, "llava_gqa_testdev_balanced.jsonl")
    questions = llava_questions(path, SHORT_ANSWER)
    truth_path = folder / "data" / "testdev_balanced_questions.json"
    truth = read_json(truth_path) if truth_path.is_file() else {}
    for q in questions:
        if str(q.id) in truth:
            q.target = need(truth[str(q.id)], "answer", truth_path, q.id, str)
        elif "reference" in q.extra and isinstance(q.extra["reference"], str):
            q.target = q.extra["reference"]
        else:
            raise bad(path, q.id, "question_id", f"no answer in {truth_path} or the row")
    return questions


def read_vqav2(folder: Path, name: Path | None) -> list[Question]:
    path = find_file(folder, name, "llava_vqav2_mscoco_test-dev2015.jsonl")
    return _with_row_answers(llava_questions(path, SHORT_ANSWER))


def read_vizwiz(folder: Path, name: Path | None) -> list[Question]:
    path = find_file(folder, name, "llava_test.jsonl")
    questions = _with_row_answers(llava_questions(path, SHORT_ANSWER))
    for q in questions:
        q.extra["image_name"] = q.image
    return questions


def submit_vqav2(questions: list[Question], answers: list[str | None], folder: Path, out: Path):
    """VQAv2's server file: every test2015 question, unanswered ones with an empty answer."""
    given = {str(q.id): a for q, a in zip(questions, answers, strict=True) if a is not None}
    full = folder / "llava_vqav2_mscoco_test2015.jsonl"
    ids = [row["question_id"] for row in read_jsonl(full)] if full.is_file() else [
        q.id for q in questions
    ]  # fmt: skip
    rows = [{"question_id": i, "answer": normalize_answer(given.get(str(i), ""))} for i in ids]
    return _dump(out / "vqav2_submission.json", rows)


def submit_vizwiz(questions: list[Question], answers: list[str | None], folder: Path, out: Path):
    """VizWiz's server file: ``image`` and the normalised ``answer`` of every question."""
    rows = [
        {"image": q.extra.get("image_name"), "answer": normalize_answer(a or "")}
        for q, a in zip(questions, answers, strict=True)
    ]
    return _dump(out / "vizwiz_submission.json", rows)


def submit_gqa(questions: list[Question], answers: list[str | None], folder: Path, out: Path):
    """GQA's predictions file for its ``eval.py`` (``questionId``, ``prediction``)."""
    rows = [
        {"questionId": q.id, "prediction": gqa_normalize(a or "")}
        for q, a in zip(questions, answers, strict=True)
    ]
    return _dump(out / "testdev_balanced_predictions.json", rows)


def _dump(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _hf_vqa(rows: list[dict[str, Any]], source: str) -> list[Question]:
    """lmms-eval's VQA layouts (``question_id``, ``question``, ``image``, ``answers``)."""
    questions = []
    for row in rows:
        qid = need(row, "question_id", source)
        text = with_suffix(need(row, "question", source, qid, str), SHORT_ANSWER)
        target = row.get("answers")
        target = _answer_texts(target, source, qid) if target is not None else None
        if target is None and isinstance(row.get("answer"), str):
            target = row["answer"]  # GQA
        questions.append(Question(qid, text, row.get("image"), target, source=source))
    return questions


register(
    Benchmark("textvqa", "vqa", SHORT_ANSWER, 128, "accuracy", read_textvqa, score_vqa,
              "llava_textvqa_val_v051_ocr.jsonl", "train_images", read_hf=_hf_vqa),
    Benchmark("gqa", "vqa", SHORT_ANSWER, 128, "accuracy", read_gqa, score_gqa,
              "llava_gqa_testdev_balanced.jsonl", "data/images", submit_gqa, _hf_vqa),
    Benchmark("vqav2", "vqa", SHORT_ANSWER, 128, "accuracy", read_vqav2, score_vqa,
              "llava_vqav2_mscoco_test-dev2015.jsonl", "test2015", submit_vqav2, _hf_vqa),
    Benchmark("vizwiz", "vqa", SHORT_ANSWER, 128, "accuracy", read_vizwiz, score_vqa,
              "llava_test.jsonl", "test", submit_vizwiz, _hf_vqa),
)  # fmt: skip
