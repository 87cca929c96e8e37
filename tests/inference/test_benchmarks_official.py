"""Scores of a fixed set of saved answers, in the benchmarks' official file layouts, equal those
of the official scoring code. The official computations (LLaVA's eval_pope.py,
eval_science_qa.py, convert_seed/gqa scripts, the m4c TextVQA evaluator, MME's calculation.py)
are ported below as test oracles: the published outputs they would be checked against need the
full datasets and are not available offline."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from lvlm_tune.inference.benchmarks.base import LETTER_ANSWER, SHORT_ANSWER
from lvlm_tune.inference.benchmarks.runner import score_predictions

RNG = random.Random(0)


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def answers_file(path, pairs):
    """LLaVA's answers jsonl from (question_id, prompt, text) triples."""
    jsonl(path, [{"question_id": q, "prompt": p, "text": t, "answer_id": f"a{i}",
                  "model_id": "m", "metadata": {}} for i, (q, p, t) in enumerate(pairs)])  # fmt: skip
    return path


# --- oracles: the official computations, ported -----------------------------------------------


def oracle_pope(answers, labels):
    preds = []
    for text in answers:
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        preds.append(0 if ("No" in words or "not" in words or "no" in words) else 1)
    gold = [0 if label == "no" else 1 for label in labels]
    tp = sum(p == 1 and g == 1 for p, g in zip(preds, gold, strict=False))
    fp = sum(p == 1 and g == 0 for p, g in zip(preds, gold, strict=False))
    tn = sum(p == 0 and g == 0 for p, g in zip(preds, gold, strict=False))
    fn = sum(p == 0 and g == 1 for p, g in zip(preds, gold, strict=False))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"accuracy": (tp + tn) / (tp + tn + fp + fn), "precision": precision,
            "recall": recall, "f1": 2 * precision * recall / (precision + recall),
            "yes_ratio": preds.count(1) / len(preds)}  # fmt: skip


ORACLE_CONTRACTIONS = {"dont": "don't", "isnt": "isn't", "cant": "can't"}
ORACLE_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                "<", "@", "`", ",", "?", "!"]  # fmt: skip
ORACLE_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                  "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip


def oracle_process(item):
    item = item.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    item = item.replace("\n", " ").replace("\t", " ").strip()
    out = item
    for p in ORACLE_PUNCT:
        if (p + " " in item or " " + p in item) or re.search(r"(?<=\d)(\,)+(?=\d)", item):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = re.compile(r"(?!<=\d)(\.)(?!\d)").sub("", out, re.UNICODE)
    words = [ORACLE_NUMBERS.setdefault(w, w) for w in out.lower().split()]
    words = [w for w in words if w not in ["a", "an", "the"]]
    return " ".join(ORACLE_CONTRACTIONS.get(w, w) for w in words)


def oracle_textvqa(pred, raw_answers):
    answers = [oracle_process(a) for a in raw_answers]
    gt = list(enumerate(answers))
    scores = {}
    for unique in set(answers):
        accs = [min(1, len([o for o in gt if o != g and o[1] == unique]) / 3) for g in gt]
        scores[unique] = sum(accs) / len(accs)
    return scores.get(oracle_process(pred), 0.0)


def oracle_sqa_index(text, choices):
    options = ["A", "B", "C", "D", "E"]
    if text in options:
        answer = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        answer = text[0]
    else:
        res = re.compile(r"The answer is ([A-Z]).").findall(text)
        answer = res[0] if len(res) == 1 else "FAILED"
    return options.index(answer) if answer in options[: len(choices)] else -1


def oracle_mme_label(pred):
    pred = pred.lower()
    if pred in ["yes", "no"]:
        return pred
    return "yes" if "yes" in pred[:4] else "no" if "no" in pred[:4] else "other"


# --- the fixtures and comparisons ----------------------------------------------------------------

POPE_TEXTS = ["Yes", "No", "Yes, there is.", "No, there is not.", "There is no dog.",
              "I see a dog.", "not really", "Nope"]  # fmt: skip


def test_pope_matches_eval_pope(tmp_path):
    questions, answers, per_split = [], [], {}
    qid = 0
    for split in ("adversarial", "popular", "random"):
        labels = [RNG.choice(["yes", "no"]) for _ in range(20)]
        labels[:2] = ["yes", "no"]
        rows = []
        for k, label in enumerate(labels):
            qid += 1
            image = f"COCO_val2014_{k:012d}.jpg"
            text = f"Is there a thing {k} in the image?\n{SHORT_ANSWER}"
            questions.append({"question_id": qid, "image": image, "text": text,
                              "category": split})  # fmt: skip
            rows.append({"question_id": k + 1, "image": image, "text": text, "label": label})
            answers.append((qid, text, RNG.choice(POPE_TEXTS)))
        jsonl(tmp_path / "coco" / f"coco_pope_{split}.json", rows)
        mine = [t for q, _, t in answers if questions[q - 1]["category"] == split]
        per_split[split] = oracle_pope(mine, labels)
    jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    RNG.shuffle(answers)  # matched on question_id, not on order
    result = score_predictions("pope", answers_file(tmp_path / "a.jsonl", answers), tmp_path)
    for split, expected in per_split.items():
        got = result["metrics"]["splits"][split]
        for key, value in expected.items():
            assert got[key] == pytest.approx(100 * value), (split, key)
    assert result["score"] == pytest.approx(100 * sum(s["f1"] for s in per_split.values()) / 3)


def test_textvqa_matches_the_m4c_evaluator(tmp_path):
    words = ["dont", "don't", "Two", "2", "the sign", "sign", "stop-sign", "stop sign", "isnt"]
    data, questions, answers, expected = [], [], [], []
    for k in range(24):
        image_id = f"img{k // 2}"  # two questions per image: LLaVA's question_id is the image
        humans = [RNG.choice(words) for _ in range(10)]
        question = f"what is written {k}?"
        data.append({"question_id": k, "image_id": image_id, "question": question,
                     "answers": humans})  # fmt: skip
        text = f"{question.capitalize()}\nReference OCR token: a, b\n{SHORT_ANSWER}"
        questions.append({"question_id": image_id, "image": f"{image_id}.jpg", "text": text})
        pred = RNG.choice([*words, "nothing"])
        answers.append((image_id, text, pred))
        expected.append(oracle_textvqa(pred, humans))
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": data}))
    jsonl(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", questions)
    result = score_predictions("textvqa", answers_file(tmp_path / "a.jsonl", answers), tmp_path)
    assert result["score"] == pytest.approx(100 * sum(expected) / len(expected))
    assert 0 < result["score"] < 100


def test_scienceqa_matches_eval_science_qa(tmp_path):
    problems, rows, answers, right, img_right, img_total = {}, [], [], 0, 0, 0
    texts = ["A", "B", "C", "C. water", "The answer is B.", "B) no", "E", "b"]
    for k in range(30):
        choices = ["x", "y", "z"][: 2 + k % 2]
        problems[str(k)] = {"choices": choices, "answer": k % len(choices)}
        prompt = f"Question {k}?\n" + "\n".join(f"{'ABC'[i]}. {c}" for i, c in enumerate(choices))
        row = {"id": str(k), "conversations": [{"from": "human", "value": prompt},
                                                 {"from": "gpt", "value": "A"}]}  # fmt: skip
        if k % 3:
            row["image"] = f"{k}/image.png"
            row["conversations"][0]["value"] = "<image>\n" + prompt
        rows.append(row)
        pred = RNG.choice(texts)
        shown = ("<image>\n" if "image" in row else "") + f"{prompt}\n{LETTER_ANSWER}"
        answers.append((str(k), shown, pred))
        ok = oracle_sqa_index(pred, choices) == problems[str(k)]["answer"]
        right += ok
        if "<image>" in shown:
            img_right, img_total = img_right + ok, img_total + 1
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps(rows))
    result = score_predictions("scienceqa", answers_file(tmp_path / "a.jsonl", answers), tmp_path)
    assert result["metrics"]["accuracy"] == pytest.approx(100 * right / 30)
    assert result["score"] == pytest.approx(100 * img_right / img_total)


def test_mme_matches_its_calculation(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    questions, answers, scores = [], [], {}
    texts = ["Yes", "No", "yes, it is", "No.", "There is", "not at all"]
    for task in ("color", "OCR", "code_reasoning"):
        folder = root / task / "questions_answers_YES_or_NO"
        folder.mkdir(parents=True)
        acc = acc_plus = 0
        for k in range(6):
            pair = [(f"Is it {k}? Please answer yes or no.", "Yes"),
                    (f"Is it not {k}? Please answer yes or no.", "No")]  # fmt: skip
            (folder / f"{k}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pair))
            both = True
            for question, truth in pair:
                text = question.replace(" Please answer yes or no.", "") + "\n" + SHORT_ANSWER
                qid = f"{task}/{k}.png"
                questions.append({"question_id": qid, "image": qid, "text": text,
                                  "category": task})  # fmt: skip
                pred = RNG.choice(texts)
                answers.append((qid, text, pred))
                ok = oracle_mme_label(pred) == truth.lower()
                acc, both = acc + ok, both and ok
            acc_plus += both
        scores[task] = 100 * acc / 12 + 100 * acc_plus / 6
    jsonl(tmp_path / "llava_mme.jsonl", questions)
    result = score_predictions("mme", answers_file(tmp_path / "a.jsonl", answers), tmp_path)
    for task, value in scores.items():
        assert result["metrics"]["tasks"][task]["score"] == pytest.approx(value)
    assert result["score"] == pytest.approx(scores["color"] + scores["OCR"])
    assert result["metrics"]["cognition"] == pytest.approx(scores["code_reasoning"])


def test_seed_and_gqa_match_llavas_conversion_scripts(tmp_path):
    seed, gqa = tmp_path / "seed", tmp_path / "gqa"
    truth, questions, answers, right = [], [], [], 0
    for k in range(20):
        kind = "image" if k % 4 else "video"
        truth.append({"question_id": str(k), "answer": "ABCD"[k % 4], "data_type": kind,
                      "question_type_id": k % 3})  # fmt: skip
        text = f"Q{k}\nA. a\nB. b\nC. c\nD. d\n{LETTER_ANSWER}"
        questions.append({"question_id": str(k), "image": f"{k}.jpg", "text": text})
        pred = RNG.choice(["A", "B", "C", "D", "A."])
        answers.append((str(k), text, pred))
        right += kind == "image" and pred == "ABCD"[k % 4]
    seed.mkdir()
    (seed / "SEED-Bench.json").write_text(json.dumps({"questions": truth, "question_type": {}}))
    jsonl(seed / "llava-seed-bench.jsonl", questions)
    result = score_predictions("seed", answers_file(seed / "a.jsonl", answers), seed)
    assert result["score"] == pytest.approx(100 * right / 15)
    upload = [json.loads(line) for line in Path(result["submission"]).read_text().splitlines()]
    assert [r["question_id"] for r in upload] == [str(k) for k in range(20)]

    gold, questions, answers, right = {}, [], [], 0
    for k in range(20):
        gold[f"{k:05d}"] = {"answer": RNG.choice(["left", "no", "table"]), "imageId": "n1"}
        text = f"Where {k}?\n{SHORT_ANSWER}"
        questions.append({"question_id": f"{k:05d}", "image": "n1.jpg", "text": text})
        pred = RNG.choice(["Left.", "left", "No", "table..", "chair"])
        answers.append((f"{k:05d}", text, pred))
        right += pred.rstrip(".").lower() == gold[f"{k:05d}"]["answer"]
    (gqa / "data").mkdir(parents=True)
    (gqa / "data" / "testdev_balanced_questions.json").write_text(json.dumps(gold))
    jsonl(gqa / "llava_gqa_testdev_balanced.jsonl", questions)
    result = score_predictions("gqa", answers_file(gqa / "a.jsonl", answers), gqa)
    assert result["score"] == pytest.approx(100 * right / 20)
    predictions = json.loads(Path(result["submission"]).read_text())
    assert predictions[0] == {
        "questionId": "00000",
        "prediction": answers[0][2].rstrip(".").lower(),
    }
