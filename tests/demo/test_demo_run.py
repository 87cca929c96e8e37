"""The demo runner end to end: ``--quick`` runs check the plumbing and that the summary's figures
are the eval reports'; full runs (``make demo``, ``make demo-minigpt4``) answer from the image
far above chance, as the README reports."""

from __future__ import annotations

import json

import pytest
import torch

from lvlm_tune.demo import run as demo

pytestmark = pytest.mark.slow  # every test here pre-trains base models and trains two stages


def scored_accuracy(out, data_file: str, report_file: str) -> float:
    """Exact match over the colour and shape questions, recounted from the eval report."""
    kind = {r["id"]: r["kind"] for r in json.loads((out / "data" / data_file).read_text())}
    samples = json.loads((out / report_file).read_text())["samples"]
    assert len(samples) == len(kind)  # every held-out question was answered
    hits = [s["exact_match"] for s in samples if kind[s["id"]] in demo.SCORED_KINDS]
    return sum(hits) / len(hits)


def assert_summary_is_the_eval_reports(out, summary):
    info = json.loads((out / "data" / "dataset_info.json").read_text())
    assert summary["chance"] == info["chance"]["colour_shape"]
    test = scored_accuracy(out, "instruct_test.json", "eval_test.json")
    blank = scored_accuracy(out, "instruct_test_blank.json", "eval_blank.json")
    assert summary["accuracy"] == pytest.approx(test)
    assert summary["accuracy_blank_images"] == pytest.approx(blank)


def run_demo(argv):
    threads = torch.get_num_threads()  # the demo uses every core; later tests expect their own
    try:
        assert demo.main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def test_quick_demo_writes_a_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LVLM_TUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    run_demo(["--out", str(out), "--train-images", "40", "--test-images", "8", "--quick"])
    summary = json.loads((out / "summary.json").read_text())
    assert_summary_is_the_eval_reports(out, summary)
    assert set(summary["times_s"]) >= {
        "data",
        "base_models",
        "stage1",
        "stage2",
        "evaluate",
        "total",
    }
    assert (out / "stage1" / "projector.safetensors").exists()
    assert (out / "stage2" / "adapter_model.safetensors").exists()
    assert "held-out colour+shape exact match" in capsys.readouterr().out


def test_quick_minigpt4_demo_writes_a_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LVLM_TUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo_minigpt4"
    argv = ["--family", "minigpt4", "--out", str(out), "--train-images", "40", "--test-images", "8"]
    run_demo([*argv, "--quick"])
    summary = json.loads((out / "summary.json").read_text())
    assert_summary_is_the_eval_reports(out, summary)
    assert {"acc_local_colour", "acc_count"} <= set(summary["vision_pretrain"])
    for stage in ("stage1", "stage2"):  # MiniGPT-4 trains the linear projection only, twice
        assert (out / stage / "projector.safetensors").exists()
        assert not (out / stage / "adapter_model.safetensors").exists()
        card = json.loads((out / stage / "lvlm_tune.json").read_text())
        assert card["family"] == "minigpt4" and card["stage"] == "pretrain"
    assert json.loads((out / "merged" / "config.json").read_text())["model_type"] == "blip-2"
    printed = capsys.readouterr().out
    assert "demo summary (minigpt4)" in printed and "held-out colour+shape exact match" in printed


# README (seed 0, 3,000 / 400 images): LLaVA 1.000 held-out, 0.290 blank; MiniGPT-4 0.995 and
# 0.315; chance 0.295. A model that does not see the image answers near chance on both.
@pytest.mark.parametrize("family", ["llava", "minigpt4"])
def test_full_demo_answers_from_the_image_far_above_chance(tmp_path, monkeypatch, family):
    monkeypatch.setenv("LVLM_TUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / family
    run_demo(["--family", family, "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert_summary_is_the_eval_reports(out, summary)
    chance = summary["chance"]
    assert 0.2 < chance < 0.4
    assert summary["accuracy"] >= 0.9, summary
    assert summary["accuracy_blank_images"] <= chance + 0.15, summary  # the answers need the image
    for kind in ("colour", "shape", "position", "count"):
        assert summary["accuracy_by_kind"][kind] >= 0.8, (kind, summary["accuracy_by_kind"])
