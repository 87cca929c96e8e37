"""The DPO demo (``make demo-dpo``): its data (the noisy annotator, the preference pairs, which
must read as preference samples), a ``--quick`` run that checks the plumbing and that the
summary's figures are the eval reports', and a short run (fewer images and steps than the full
demo, to keep CI short) in which DPO must repair much of what the noisy SFT got wrong. The full
demo's figures are in the README."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from lvlm_tune.data.sources import open_source
from lvlm_tune.demo import dpo, dpo_data, shapes
from lvlm_tune.demo.run import SCORED_KINDS


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return shapes.make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=400, n_test=40)


def colour_answers(path: Path) -> list[tuple[str, str]]:
    """(record id, answer) of every colour answer of a LLaVA conversations file."""
    return [
        (r["id"], r["conversations"][k]["value"])
        for r in json.loads(path.read_text())
        for k in dpo_data._colour_turns(r["conversations"])
    ]


def test_noisy_annotator_confuses_colours_one_way_on_the_asked_fraction(data, tmp_path):
    target = tmp_path / "noisy.json"
    stats = dpo_data.noisy_instructions(data["instruct_train"], target, noise=0.3, seed=1)
    clean, noisy = colour_answers(data["instruct_train"]), colour_answers(target)
    assert [i for i, _ in clean] == [i for i, _ in noisy] and stats["colour_answers"] == len(clean)
    changed = Counter((a, b) for (_, a), (_, b) in zip(clean, noisy, strict=True) if a != b)
    assert set(changed) == set(dpo_data.CONFUSED.items())  # only the confusion, one way
    assert sum(changed.values()) == stats["wrong"]
    assert stats["wrong_fraction"] == pytest.approx(0.3, abs=0.06)
    # every other answer, and every other turn, is kept as drawn
    before, after = json.loads(data["instruct_train"].read_text()), json.loads(target.read_text())
    other = [
        (t["value"], u["value"])
        for r, s in zip(before, after, strict=True)
        for t, u in zip(r["conversations"], s["conversations"], strict=True)
        if t["value"] not in dpo_data.CONFUSED
    ]
    assert all(a == b for a, b in other)
    with pytest.raises(ValueError, match="noise must be in"):
        dpo_data.noisy_instructions(data["instruct_train"], target, noise=0.9)


def test_preference_pairs_prefer_the_drawn_colour_over_the_confused_one(data, tmp_path):
    target = tmp_path / "prefs.json"
    count = dpo_data.preference_pairs(data["instruct_train"], target, seed=0)
    pairs = json.loads(target.read_text())
    assert count == len(pairs) == len(colour_answers(data["instruct_train"]))
    for pair in pairs:
        prompt = pair["conversations"]
        question = prompt[-1]["value"].removeprefix("<image>\n")
        assert prompt[-1]["from"] == "human" and question.startswith("What color")
        assert prompt[0]["value"].startswith("<image>\n")
        assert pair["chosen"] != pair["rejected"] and {pair["chosen"], pair["rejected"]} <= set(
            shapes.COLORS
        )
        if pair["chosen"] in dpo_data.CONFUSED:
            assert pair["rejected"] == dpo_data.CONFUSED[pair["chosen"]]
    # the held-out pairs: every held-out colour question, single-turn
    test = tmp_path / "prefs_test.json"
    held_out = dpo_data.preference_pairs(data["instruct_test"], test)
    kinds = Counter(r["kind"] for r in json.loads(data["instruct_test"].read_text()))
    assert held_out == kinds["colour"]
    # they read as preference samples: the prompt ends with the question, answers apart
    source = open_source(str(test))
    record = source.get(0)
    first = json.loads(test.read_text())[0]
    assert (record.chosen, record.rejected) == (first["chosen"], first["rejected"])
    assert record.prompt.turns[-1].role == "user"


def run_demo(argv: list[str]) -> tuple[Path, dict]:
    threads = torch.get_num_threads()  # the demo sets its own; later tests expect theirs
    try:
        assert dpo.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    out = Path(argv[argv.index("--out") + 1])
    summary = json.loads((out / "summary.json").read_text())
    info = json.loads((out / "data" / "dataset_info.json").read_text())
    assert summary["chance"] == info["chance"]["colour_shape"]
    kind = {
        r["id"]: r["kind"] for r in json.loads((out / "data" / "instruct_test.json").read_text())
    }
    for model, key in (("sft", "accuracy_sft"), ("merged", "accuracy_dpo")):
        samples = json.loads((out / model / "eval_test.json").read_text())["samples"]
        hits = [s["exact_match"] for s in samples if kind[s["id"]] in SCORED_KINDS]
        assert summary[key] == pytest.approx(sum(hits) / len(hits))
    return out, summary


@pytest.mark.slow
def test_quick_dpo_demo_writes_a_summary(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "dpo"), "--train-images", "40", "--test-images", "12"]
    out, summary = run_demo([*argv, "--quick"])
    assert {"data", "base_models", "stage1", "stage2", "dpo", "total"} <= set(summary["times_s"])
    assert summary["preference_pairs"]["test"] == summary["dpo"]["pairs"] > 0
    assert 0 <= summary["preference_accuracy"] <= 1
    assert (out / "dpo" / "adapter_model.safetensors").exists()
    card = json.loads((out / "dpo" / "lvlm_tune.json").read_text())
    assert card["stage"] == "dpo_lora"
    assert json.loads((out / "merged" / "config.json").read_text())["model_type"] == "llava"
    assert "DPO demo summary" in capsys.readouterr().out


# README (seed 0, 3,000 / 400 images, default steps): held-out colour + shape exact match 0.760
# for the noisy SFT model, 0.995 after DPO; preference accuracy 0.53 -> 1.00; blank images 0.275,
# chance 0.295. This run is the full demo shortened for CI (1,000 images, 300 pre-training and
# SFT steps, 80 DPO steps; 436 s on 2 cores shared with other jobs). When measured: 0.583 ->
# 0.767, colour 0.23 -> 1.00, preference accuracy 0.47 -> 1.00, blank images 0.283. Its weaker
# SFT model lets DPO's colour answers leak into other questions (shape 0.93 -> 0.53), which the
# full demo's does not; the colour questions must still be repaired, and no answer may come
# from anything but the images.
SHORT = ["--train-images", "1000", "--test-images", "120", "--pretrain-steps", "300"]


@pytest.mark.slow
def test_short_dpo_demo_beats_the_noisy_sft_model(tmp_path):
    argv = ["--out", str(tmp_path / "dpo"), *SHORT, "--sft-steps", "300", "--dpo-steps", "80"]
    _, summary = run_demo(argv)
    assert summary["noise"]["wrong_fraction"] == pytest.approx(0.3, abs=0.05)
    assert summary["accuracy_dpo"] >= summary["accuracy_sft"] + 0.1, summary
    colour = {model: summary[model]["accuracy_by_kind"]["colour"] for model in ("sft", "dpo")}
    assert colour["dpo"] >= colour["sft"] + 0.4, colour
    assert summary["preference_accuracy"] >= 0.8, summary
    assert summary["preference_accuracy"] >= summary["preference_accuracy_sft"] + 0.2, summary
    assert summary["accuracy_blank_images"] <= summary["chance"] + 0.15, summary
