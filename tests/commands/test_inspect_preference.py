"""``lvlm-tune inspect`` on preference data: the chosen and the rejected mask of every pair
(human view and ``--json``), bad pairs under error and skip, a recipe naming a pair file."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from lvlm_tune.commands import inspect as inspect_cmd

PAIRS = [
    {
        "id": "p1",
        "image": "x.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is it?"},
            {"from": "gpt", "value": "a square"},
            {"from": "human", "value": "What colour is the square?"},
        ],
        "chosen": "red",
        "rejected": "a blue circle",
    },
    {
        "id": "p2",
        "prompt": [{"role": "user", "content": "Say hello."}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "goodbye"}],
    },
]


@pytest.fixture
def pair_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_TUNE_CACHE", str(tmp_path / "cache"))
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "x.png")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llava.json").write_text(json.dumps(PAIRS[:1]))
    (tmp_path / "trl.jsonl").write_text(json.dumps(PAIRS[1]) + "\n")
    return tmp_path


def tokenizer(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v0"])
def test_json_rows_hold_both_sides_training_only_the_final_answer(
    capsys, pair_file, sp_tokenizer_dir, template
):
    base = ["--tokenizer", str(sp_tokenizer_dir), "--template", template, "--json"]
    rows = []
    for name in ("llava.json", "trl.jsonl"):
        assert inspect_cmd.main(["--data", str(pair_file / name), *base, "--num-image-tokens", "4"]) == 0  # fmt: skip
        captured = capsys.readouterr()
        rows += [json.loads(line) for line in captured.out.splitlines()]
        assert "pairs encoded: 1" in captured.err and "sides (chosen + rejected) encoded: 2" in captured.err  # fmt: skip
    tok = tokenizer(sp_tokenizer_dir)
    stop = {"vicuna_v1": "</s>", "llava_v0": "###"}[template]
    expected = {"p1": ("red", "a blue circle"), "p2": ("hello", "goodbye")}
    assert [row["id"] for row in rows] == ["p1", "p2"]
    for row in rows:
        assert set(row) == {
            "id", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels",
            "image_token_id",
        }  # fmt: skip
        for side, answer in zip(("chosen", "rejected"), expected[row["id"]], strict=True):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            trained = [t for t in labels if t != -100]
            assert "".join(tok.decode(trained).split()) == "".join(f"{answer}{stop}".split())
            at = [k for k, t in enumerate(labels) if t != -100]
            assert at == list(range(at[0], at[-1] + 1))  # one run: the final answer + STOP
            assert all(labels[k] == ids[k] for k in at)
            if row["id"] == "p1":  # the earlier answer is context, never trained
                assert "a square" in tok.decode(ids) and "square" not in tok.decode(trained)
        n = next(k for k, t in enumerate(row["chosen_labels"]) if t != -100)
        assert row["chosen_input_ids"][:n] == row["rejected_input_ids"][:n]  # the same prompt
    assert rows[0]["chosen_input_ids"].count(rows[0]["image_token_id"]) == 4


def test_human_view_shows_the_chosen_and_the_rejected_mask(capsys, pair_file, sp_tokenizer_dir):
    code = inspect_cmd.main(
        ["--data", str(pair_file / "llava.json"), "--tokenizer", str(sp_tokenizer_dir),
         "--template", "vicuna_v1", "--num-image-tokens", "3"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "=== pair 'p1'" in out and "--- chosen (" in out and "--- rejected (" in out
    chosen = out.split("--- chosen")[1].split("--- rejected")[0]
    rejected = out.split("--- rejected")[1].split("pairs encoded")[0]
    assert "<image x 3>" in chosen and "<image x 3>" in rejected
    assert "[[red</s>]]" in "".join(chosen.split()) and "[[ablue" in "".join(rejected.split())
    assert "a square" in chosen and "[[asquare" not in "".join(chosen.split())  # context only
    assert chosen.count("[[") == 1 and rejected.count("[[") == 1
    assert "pairs encoded: 1" in out and "skipped samples: none" in out


def test_bad_pairs_error_or_are_listed_and_counted(capsys, pair_file, sp_tokenizer_dir):
    bad = [PAIRS[0], {**PAIRS[0], "id": "same", "rejected": "red"}, {**PAIRS[0], "id": "empty", "chosen": " "}]  # fmt: skip
    path = pair_file / "bad.json"
    path.write_text(json.dumps(bad))
    base = ["--data", str(path), "--tokenizer", str(sp_tokenizer_dir), "--template", "vicuna_v1"]
    assert inspect_cmd.main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("lvlm-tune inspect: error: ") and "Traceback" not in err
    assert "bad.json: sample 'same': field rejected: the same answer as chosen" in err
    assert inspect_cmd.main([*base, "--on-bad-sample", "skip", "--max-bad-fraction", "1"]) == 0
    captured = capsys.readouterr()
    assert "skipped (identical_answers): " in captured.err
    assert "skipped (empty_answer): " in captured.err and "sample 'empty': field chosen" in captured.err  # fmt: skip
    assert "skipped samples: 2 of 3 (empty_answer=1, identical_answers=1)" in captured.out
    assert inspect_cmd.main([*base, "--on-bad-sample", "skip"]) == 1  # beyond max_bad_fraction


def test_recipe_naming_a_pair_file(capsys, pair_file, sp_tokenizer_dir, tiny_parts):
    recipe = pair_file / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "data_path": str(pair_file / "llava.json"),
                "llm_name_or_path": str(sp_tokenizer_dir),
                "vision_tower": tiny_parts["vision"],
                "template": "vicuna_v1",
            }
        )
    )
    assert inspect_cmd.main([str(recipe), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["id"] == "p1" and row["chosen_input_ids"].count(row["image_token_id"]) == 16
