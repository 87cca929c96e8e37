"""Benchmark data (:mod:`lvlm_tune.inference.benchmarks.sources`): bad files name the file,
question and field; lmms-eval's parquet layout reads offline; server splits write the file the
server expects; ``--limit`` keeps whole questions; the CLI scores saved answers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from lvlm_tune.commands.eval import main as eval_main
from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.inference.benchmarks import load_benchmark
from lvlm_tune.inference.benchmarks.base import SHORT_ANSWER
from lvlm_tune.inference.benchmarks.runner import benchmark_figures, score_predictions


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_row_without_text_names_file_question_and_field(tmp_path):
    jsonl(tmp_path / "llava_pope_test.jsonl", [{"question_id": 7, "image": "x.jpg"}])
    with pytest.raises(BadSampleError) as caught:
        load_benchmark("pope", tmp_path)
    message = str(caught.value)
    assert "llava_pope_test.jsonl" in message and "'7'" in message and "field text" in message


def test_pope_labels_out_of_order_are_refused(tmp_path):
    rows = [{"question_id": i, "image": f"{i}.jpg", "text": "q", "category": "random"}
            for i in (1, 2)]  # fmt: skip
    jsonl(tmp_path / "llava_pope_test.jsonl", rows)
    jsonl(tmp_path / "coco" / "coco_pope_random.json",
          [{"image": "2.jpg", "label": "yes"}, {"image": "1.jpg", "label": "no"}])  # fmt: skip
    with pytest.raises(BadSampleError, match=r"'1'.*field image.*not in the same order"):
        load_benchmark("pope", tmp_path)
    jsonl(tmp_path / "coco" / "coco_pope_random.json", [{"image": "1.jpg", "label": "maybe"}])
    with pytest.raises(BadSampleError, match="1 labels for the 2 questions"):
        load_benchmark("pope", tmp_path)


def test_missing_folder_file_and_unknown_benchmark_are_user_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"llava_mme\.jsonl"):
        load_benchmark("mme", tmp_path)
    assert eval_main(["--benchmark", "nope", "--predictions", "p", "--data", str(tmp_path)]) == 2
    assert "unknown; choose from" in capsys.readouterr().err


def test_lmms_eval_parquet_layout_reads_offline(tmp_path):
    import datasets

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buffer, format="PNG")
    rows = {"question_id": ["a", "b"], "question": ["Is it red?", "Is it blue?"],
            "answer": ["yes", "no"], "category": ["random", "random"],
            "image": [{"bytes": buffer.getvalue(), "path": None}] * 2}  # fmt: skip
    features = datasets.Features({
        "question_id": datasets.Value("string"), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "category": datasets.Value("string"),
        "image": datasets.Image(),
    })  # fmt: skip
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        tmp_path / "data" / "test-00000-of-00001.parquet"
    )
    data = load_benchmark("pope", tmp_path)
    assert [q.text for q in data.questions] == [f"Is it red?\n{SHORT_ANSWER}",
                                                f"Is it blue?\n{SHORT_ANSWER}"]  # fmt: skip
    assert data.questions[0].image.size == (8, 8) and data.questions[1].target == "no"
    preds = jsonl(tmp_path / "p.jsonl", [{"question_id": "a", "text": "Yes"},
                                         {"question_id": "b", "text": "Yes"}])  # fmt: skip
    result = score_predictions("pope", preds, tmp_path)
    assert result["metrics"]["accuracy"] == 50.0 and result["metrics"]["yes_ratio"] == 100.0


def test_server_splits_write_the_submission_files(tmp_path):
    vqav2 = tmp_path / "vqav2"
    rows = [{"question_id": i, "image": f"{i}.jpg", "text": f"q{i}?"} for i in range(3)]
    jsonl(vqav2 / "llava_vqav2_mscoco_test-dev2015.jsonl", rows[:2])
    jsonl(vqav2 / "llava_vqav2_mscoco_test2015.jsonl", rows)
    preds = jsonl(tmp_path / "v.jsonl", [{"question_id": 0, "text": "Two dogs."},
                                         {"question_id": 1, "text": "Yes"}])  # fmt: skip
    result = score_predictions("vqav2", preds, vqav2, output_dir=tmp_path / "out")
    assert result["score"] is None  # the server scores test-dev
    assert json.loads(Path(result["submission"]).read_text()) == [
        {"question_id": 0, "answer": "2 dogs"}, {"question_id": 1, "answer": "yes"},
        {"question_id": 2, "answer": ""},
    ]  # fmt: skip
    vizwiz = tmp_path / "vizwiz"
    jsonl(vizwiz / "llava_test.jsonl", [{"question_id": 5, "image": "VizWiz_test_5.jpg",
                                          "text": "What is it?"}])  # fmt: skip
    preds = jsonl(tmp_path / "z.jsonl", [{"question_id": 5, "text": "A can of soup."}])
    result = score_predictions("vizwiz", preds, vizwiz, output_dir=tmp_path / "out")
    assert json.loads(Path(result["submission"]).read_text()) == [
        {"image": "VizWiz_test_5.jpg", "answer": "can of soup"}
    ]


def test_limit_keeps_whole_mme_pairs_and_the_cli_saves_results(tmp_path, capsys):
    rows = []
    for k in range(3):
        for question, answer in ((f"Is it {k}?", "Yes"), (f"Is it not {k}?", "No")):
            rows.append({"question_id": f"color/{k}.png", "image": f"color/{k}.png",
                         "text": question, "category": "color", "answer": answer})  # fmt: skip
    jsonl(tmp_path / "llava_mme.jsonl", rows)
    data = load_benchmark("mme", tmp_path, limit=2)
    assert len(data.questions) == 4 and data.questions[0].text.endswith(SHORT_ANSWER)
    preds = jsonl(tmp_path / "a.jsonl", [
        {"question_id": r["question_id"], "prompt": f"{r['text']}\n{SHORT_ANSWER}",
         "text": "Yes"} for r in rows
    ])  # fmt: skip
    argv = ["--benchmark", "mme", "--predictions", str(preds), "--data", str(tmp_path)]
    assert eval_main([*argv, "--limit", "2", "--output-dir", str(tmp_path / "r")]) == 0
    assert "perception" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r" / "benchmark_results.json").read_text())
    assert saved["benchmarks"]["mme"]["score"] == pytest.approx(50.0)  # acc 50, acc+ 0
    (tmp_path / "m" / "benchmarks").mkdir(parents=True)
    (tmp_path / "r" / "benchmark_results.json").rename(
        tmp_path / "m" / "benchmarks" / "benchmark_results.json"
    )
    assert benchmark_figures(tmp_path / "m") == {"mme_perception": 50.0}
