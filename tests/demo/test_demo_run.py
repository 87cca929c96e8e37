"""The demo runner end to end in quick mode (plumbing only; accuracy is the demo's own output)."""

from __future__ import annotations

import json

from lvlm_tune.demo import run as demo


def test_quick_demo_writes_a_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LVLM_TUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert (
        demo.main(["--out", str(out), "--train-images", "40", "--test-images", "8", "--quick"]) == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["accuracy"] <= 1.0 and 0.0 <= summary["accuracy_blank_images"] <= 1.0
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
    assert demo.main([*argv, "--quick"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["accuracy"] <= 1.0 and 0.0 <= summary["accuracy_blank_images"] <= 1.0
    assert {"acc_local_colour", "acc_count"} <= set(summary["vision_pretrain"])
    for stage in ("stage1", "stage2"):  # MiniGPT-4 trains the linear projection only, twice
        assert (out / stage / "projector.safetensors").exists()
        assert not (out / stage / "adapter_model.safetensors").exists()
        card = json.loads((out / stage / "lvlm_tune.json").read_text())
        assert card["family"] == "minigpt4" and card["stage"] == "pretrain"
    assert json.loads((out / "merged" / "config.json").read_text())["model_type"] == "blip-2"
    printed = capsys.readouterr().out
    assert "demo summary (minigpt4)" in printed and "held-out colour+shape exact match" in printed
