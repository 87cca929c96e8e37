"""Yes/no benchmarks: POPE (per split) and MME (perception and cognition scores).

POPE: an answer is "no" when its first sentence (up to the first period, commas removed) holds
the word ``no``, ``No`` or ``not``, else "yes" (POPE's and LLaVA's rule). Per split: accuracy,
precision, recall and F1 of "yes", and the yes-ratio (the share of "yes" answers), in percent;
the headline is the F1 averaged over the splits, as LLaVA-1.5 reports it. A missing answer is
counted wrong; a ratio whose denominator is empty is 0.

MME: an answer is "yes"/"no" when it is exactly that (lower-cased), else by whether its first
four characters contain "yes" or else "no", else neither (MME's rule). Per task: ``acc`` (the
share of right answers) plus ``acc+`` (the share of images whose two questions are both right),
in percent; perception is the sum over the ten perception tasks, cognition over the four
cognition tasks (the maxima are 2000 and 800).

LLaVA's layouts: POPE ``llava_pope_test.jsonl`` with ``category`` (the split) and the splits'
``coco/coco_pope_<split>.json`` (one ``label`` a line, in question order, checked on the image
name); MME ``llava_mme.jsonl`` (``question_id`` is ``<task>/<image>``) with the answers read from
``MME_Benchmark_release_version/<task>/`` (``questions_answers_YES_or_NO/<image>.txt`` or
``<image>.txt``, one ``question<TAB>answer`` a line). Rows carrying ``answer`` or ``label``
(lmms-eval's layouts, or files written by hand) need no annotation files.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from lvlm_tune.inference.benchmarks.base import (
    SHORT_ANSWER,
    Benchmark,
    Question,
    percent,
    register,
    with_suffix,
)
from lvlm_tune.inference.benchmarks.files import bad, find_file, need, read_jsonl
from lvlm_tune.inference.benchmarks.vqa import llava_questions

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)  # fmt: skip
MME_YES_NO = " Please answer yes or no."


def pope_says_yes(text: str) -> bool:
    """POPE's reading of an answer: ``False`` for a no, ``True`` otherwise."""
    first = text.split(".")[0].replace(",", "")
    return not {"no", "No", "not"} & set(first.split(" "))


def mme_label(text: str) -> str:
    """MME's reading of an answer: ``"yes"``, ``"no"`` or ``"other"``."""
    text = text.lower().strip()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def _yes_no(value: Any, source: Any, qid: Any, field: str) -> str:
    text = str(value).strip().lower().rstrip(".")
    if text not in ("yes", "no"):
        raise bad(source, qid, field, f"expected yes or no, got {value!r:.40}")
    return text


def pope_split(pairs: list[tuple[bool, str | None]]) -> dict[str, Any]:
    """POPE's figures for ``(label is yes, answer)`` pairs."""
    tp = fp = tn = fn = 0
    yes = 0
    for label, answer in pairs:
        said = None if answer is None else pope_says_yes(answer)
        yes += bool(said)
        if said is None:  # missing: wrong whatever the label
            fn, fp = fn + label, fp + (not label)
        elif said:
            tp, fp = tp + label, fp + (not label)
        else:
            fn, tn = fn + label, tn + (not label)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": percent(tp + tn, len(pairs)), "precision": 100 * precision,
        "recall": 100 * recall, "f1": 100 * f1, "yes_ratio": percent(yes, len(pairs)),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "num_questions": len(pairs),
    }  # fmt: skip


def score_pope(questions: list[Question], answers: list[str | None]) -> dict[str, Any]:
    splits: dict[str, list[tuple[bool, str | None]]] = defaultdict(list)
    for q, a in zip(questions, answers, strict=True):
        splits[q.category or "all"].append((q.target == "yes", a))
    per_split = {name: pope_split(pairs) for name, pairs in sorted(splits.items())}

    def mean(key: str) -> float | None:
        values = [s[key] for s in per_split.values() if s[key] is not None]
        return sum(values) / len(values) if values else None

    return {
        "f1": mean("f1"), "accuracy": mean("accuracy"), "yes_ratio": mean("yes_ratio"),
        "splits": per_split, "num_questions": len(questions),
        "missing": sum(a is None for a in answers),
    }  # fmt: skip


def score_mme(questions: list[Question], answers: list[str | None]) -> dict[str, Any]:
    by_task: dict[str, dict[Any, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for q, a in zip(questions, answers, strict=True):
        right = a is not None and mme_label(a) == q.target
        by_task[q.category or ""][q.group].append(right)
    tasks = {}
    for task, images in sorted(by_task.items()):
        results = [r for image in images.values() for r in image]
        acc = 100 * sum(results) / len(results)
        acc_plus = 100 * sum(all(image) for image in images.values()) / len(images)
        tasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {
        "perception": sum(t["score"] for n, t in tasks.items() if n in MME_PERCEPTION),
        "cognition": sum(t["score"] for n, t in tasks.items() if n in MME_COGNITION),
        "tasks": tasks, "num_questions": len(questions),
        "missing": sum(a is None for a in answers),
    }  # fmt: skip


def read_pope(folder: Path, name: Path | None) -> list[Question]:
    path = find_file(folder, name, "llava_pope_test.jsonl")
    questions = llava_questions(path, SHORT_ANSWER)
    by_split: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        if "reference" in q.extra:
            q.target = _yes_no(q.extra["reference"], path, q.id, "label")
        else:
            by_split[need(q.extra["row"], "category", path, q.id, str)].append(q)
    for split, members in by_split.items():
        labels_path = folder / "coco" / f"coco_pope_{split}.json"
        labels = list(read_jsonl(labels_path))
        if len(labels) < len(members):
            raise bad(labels_path, None, "label", f"{len(labels)} labels for the "
                      f"{len(members)} questions of split {split!r} in {path}")  # fmt: skip
        for q, row in zip(members, labels, strict=False):
            image = row.get("image")
            if (
                image is not None
                and q.image is not None
                and Path(str(image)).name != Path(str(q.image)).name
            ):
                raise bad(path, q.id, "image", f"{q.image} but the matching line of "
                          f"{labels_path} (question {row.get('question_id')}) is about {image}; "
                          "the question file and the labels are not in the same order")  # fmt: skip
            q.target = _yes_no(need(row, "label", labels_path, row.get("question_id")),
                               labels_path, row.get("question_id"), "label")  # fmt: skip
    return questions


def _mme_key(text: str) -> str:
    """A question as MME's files and LLaVA's prompts both write it: no instruction, one space."""
    text = text.replace(SHORT_ANSWER, "").replace(MME_YES_NO.strip(), "")
    return re.sub(r"\s+", " ", text).strip()


def _mme_truth(root: Path, task: str, image: str, path: Path, qid: Any) -> dict[str, str]:
    stem = Path(image).stem
    for sub in ("questions_answers_YES_or_NO", ""):
        truth = root / task / sub / f"{stem}.txt"
        if truth.is_file():
            pairs = [line.rstrip("\n").split("\t") for line in truth.read_text().splitlines()]
            return {_mme_key(p[0]): _yes_no(p[-1], truth, qid, "answer") for p in pairs if p[0]}
    raise bad(path, qid, "question_id", f"no answers file {stem}.txt under {root / task}")


def read_mme(folder: Path, name: Path | None) -> list[Question]:
    path = find_file(folder, name, "llava_mme.jsonl")
    questions = llava_questions(path, SHORT_ANSWER)
    root = folder / "MME_Benchmark_release_version"
    cache: dict[tuple[str, str], dict[str, str]] = {}
    for q in questions:
        q.category = q.category or str(q.id).split("/")[0]
        q.group = str(q.id)
        if "reference" in q.extra:
            q.target = _yes_no(q.extra["reference"], path, q.id, "answer")
            continue
        image = str(q.image or q.id)
        if (q.category, image) not in cache:
            cache[q.category, image] = _mme_truth(root, q.category, image, path, q.id)
        truth = cache[q.category, image]
        key = _mme_key(q.text)
        if key not in truth:
            raise bad(path, q.id, "text", f"question {key!r} is not among the answers of "
                      f"{image} in {root / q.category}")  # fmt: skip
        q.target = truth[key]
    return questions


def _hf_yes_no(rows: list[dict[str, Any]], source: str) -> list[Question]:
    """lmms-eval's POPE and MME layouts (``question_id``, ``question``, ``answer``,
    ``category``, ``image``)."""
    questions = []
    for row in rows:
        qid = need(row, "question_id", source)
        text = need(row, "question", source, qid, str).replace(MME_YES_NO, "")
        questions.append(Question(
            qid, with_suffix(text, SHORT_ANSWER), row.get("image"),
            _yes_no(need(row, "answer", source, qid), source, qid, "answer"),
            category=row.get("category"), group=str(qid), source=source,
        ))  # fmt: skip
    return questions


register(
    Benchmark("pope", "yesno", SHORT_ANSWER, 128, "f1", read_pope, score_pope,
              "llava_pope_test.jsonl", "val2014", read_hf=_hf_yes_no),
    Benchmark("mme", "yesno", SHORT_ANSWER, 128, "perception", read_mme, score_mme,
              "llava_mme.jsonl", "MME_Benchmark_release_version", read_hf=_hf_yes_no),
)  # fmt: skip
