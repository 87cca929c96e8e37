"""``lvlm-tune eval --benchmark`` end to end: a tiny saved LLaVA answers POPE-style and
MMBench-style questions written in the official layouts, the answers file is LLaVA's format,
re-scoring it with ``--predictions`` gives the same figures, and ``merge`` puts the results in
the model card."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from lvlm_tune.commands.eval import main as eval_main
from lvlm_tune.inference.benchmarks.base import LETTER_ANSWER, SHORT_ANSWER

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def png(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from lvlm_tune.testing.tiny_models import write_tiny_llava, write_tiny_tokenizer
    from lvlm_tune.training.run_card import RunCard

    root = tmp_path_factory.mktemp("bench_model")
    folder = write_tiny_llava(root / "model", write_tiny_tokenizer(root / "tok"))
    RunCard(family="llava", stage="finetune", template="vicuna_v1").write(folder)
    return folder


def write_pope(folder):
    (folder / "val2014").mkdir(parents=True)
    (folder / "coco").mkdir()
    questions, qid = [], 0
    for split in ("adversarial", "random"):
        labels = []
        for k, (name, rgb) in enumerate(COLOURS.items()):
            image = f"COCO_val2014_{split}_{k}.png"
            (folder / "val2014" / image).write_bytes(png(rgb))
            for asked in ("red", "blue"):
                qid += 1
                text = f"Is there a {asked} square in the image?\n{SHORT_ANSWER}"
                questions.append({"question_id": qid, "image": image, "text": text,
                                  "category": split})  # fmt: skip
                labels.append({"question_id": len(labels) + 1, "image": image, "text": text,
                               "label": "yes" if asked == name else "no"})  # fmt: skip
        lines = "".join(json.dumps(r) + "\n" for r in labels)
        (folder / "coco" / f"coco_pope_{split}.json").write_text(lines)
    lines = "".join(json.dumps(q) + "\n" for q in questions)
    (folder / "llava_pope_test.jsonl").write_text(lines)


def write_mmbench(folder):
    folder.mkdir()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = ["\t".join(header)]
    for k, (name, rgb) in enumerate(COLOURS.items()):
        image = base64.b64encode(png(rgb)).decode()
        options = list(COLOURS)
        answer = "ABC"[options.index(name)]
        hint = "A plain picture." if k == 0 else "nan"
        cells = [str(k), "What color is the image?", hint, *options, "", answer, "colour", image]
        rows.append("\t".join(cells))
    (folder / "mmbench_dev_20230712.tsv").write_text("\n".join(rows) + "\n")


@pytest.mark.slow
def test_benchmarks_run_rescore_and_reach_the_model_card(tmp_path, model, capsys):
    from huggingface_hub import ModelCard

    from lvlm_tune.inference.export import merge

    write_pope(tmp_path / "eval" / "pope")
    write_mmbench(tmp_path / "eval" / "mmbench")
    out = tmp_path / "report.json"
    argv = ["--model", str(model), "--benchmark", "pope", "mmbench", "--data",
            str(tmp_path / "eval"), "--max-new-tokens", "3", "--batch-size", "4"]  # fmt: skip
    assert eval_main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pope" in printed and "circular_accuracy" in printed
    report = json.loads(out.read_text())["benchmarks"]
    assert report["pope"]["metrics"]["num_questions"] == 12
    assert set(report["pope"]["metrics"]["splits"]) == {"adversarial", "random"}
    assert report["mmbench"]["metrics"]["num_questions"] == 3
    assert report["mmbench"]["metrics"]["num_prompts"] == 9  # three rotations each

    lines = Path(report["mmbench"]["answers"]).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert set(rows[0]) == {"question_id", "round_id", "prompt", "text", "answer_id",
                            "model_id", "metadata"}  # fmt: skip
    assert rows[0]["prompt"].startswith("A plain picture.\nWhat color is the image?\nA. red")
    assert rows[0]["prompt"].endswith(LETTER_ANSWER) and rows[1]["prompt"].count("A. blue")

    for name in ("pope", "mmbench"):
        again = tmp_path / f"{name}.json"
        argv = ["--benchmark", name, "--predictions", report[name]["answers"], "--data",
                str(tmp_path / "eval" / name), "--json", str(again)]  # fmt: skip
        assert eval_main(argv) == 0
        rescored = json.loads(again.read_text())["benchmarks"][name]
        assert rescored["metrics"] == report[name]["metrics"]

    merged = merge(model, tmp_path / "merged")
    card = ModelCard.load(merged / "README.md")
    assert f"- pope_f1: {round(report['pope']['score'], 2)}" in card.text
    assert "mmbench_circular_accuracy" in card.data.metrics
