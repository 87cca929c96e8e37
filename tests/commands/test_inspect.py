"""``lvlm-tune inspect``: the JSON interface other tools rely on, the human view, recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from lvlm_tune.commands import inspect as inspect_cmd

DATA = [
    {
        "id": "a1",
        "image": "x.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "And the shape?"},
            {"from": "gpt", "value": "a square"},
        ],
    },
    {
        "id": "t2",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
    },
]


@pytest.fixture
def data_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_TUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "data.json"
    path.write_text(json.dumps(DATA))
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "x.png")  # inspect opens it
    monkeypatch.chdir(tmp_path)  # no image_folder: paths are relative to the working folder
    return path


def run_json(capsys, *args):
    assert inspect_cmd.main([*args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("template", ["llava_v0", "vicuna_v1", "plain", "minigpt4"])
def test_json_interface(capsys, data_file, sp_tokenizer_dir, template):
    from transformers import AutoTokenizer

    rows = run_json(
        capsys, "--data", str(data_file), "--tokenizer", str(sp_tokenizer_dir), "--template", template,
        "--num-image-tokens", "5", "--image-position", "after", "--seed", "1",
        *(["--plain-multi-turn", "first"] if template == "plain" else []),
    )  # fmt: skip
    assert [r["id"] for r in rows] == ["a1", "t2"]
    tok = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    for row in rows:
        assert set(row) == {"id", "input_ids", "labels", "image_token_id"}
        assert row["image_token_id"] == tok.convert_tokens_to_ids("<image>")
        assert len(row["input_ids"]) == len(row["labels"])
        assert all(
            lab in (-100, tid) for lab, tid in zip(row["labels"], row["input_ids"], strict=True)
        )
    images = [t for t in rows[0]["input_ids"] if t == rows[0]["image_token_id"]]
    assert len(images) == 5
    trained = tok.decode([t for t in rows[0]["labels"] if t != -100])
    stop = {"llava_v0": "###", "vicuna_v1": "</s>", "plain": "\n", "minigpt4": "###"}[template]
    expected = f"red{stop}" if template == "plain" else f"red{stop}a square{stop}"  # first pair
    assert "".join(trained.split()) == "".join(expected.split())


def test_human_view_marks_trained_spans_and_prints_stats(capsys, data_file, sp_tokenizer_dir):
    code = inspect_cmd.main(
        [
            "--data",
            str(data_file),
            "--tokenizer",
            str(sp_tokenizer_dir),
            "--template",
            "vicuna_v1",
            "--num-image-tokens",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "<image x 3>" in out and "[[" in out and "]]" in out
    assert "samples encoded: 2" in out and "trained tokens:" in out and "truncated: 0" in out
    assert "skipped samples: none" in out


def test_recipe_settings_and_bad_data(capsys, tmp_path, data_file, sp_tokenizer_dir, tiny_parts):
    recipe = tmp_path / "recipe.yaml"
    settings = {
        "data_path": str(data_file), "llm_name_or_path": str(sp_tokenizer_dir),
        "vision_tower": tiny_parts["vision"], "template": "llava_v0",
    }  # fmt: skip
    recipe.write_text(yaml.safe_dump(settings))
    rows = run_json(capsys, str(recipe), "--num-image-tokens", "2")  # options over the recipe
    assert len(rows) == 2 and rows[0]["input_ids"].count(rows[0]["image_token_id"]) == 2
    # the recipe is read as train reads it: a key train does not know is refused
    recipe.write_text(yaml.safe_dump({**settings, "num_image_tokens": 2}))
    assert inspect_cmd.main([str(recipe)]) == 2
    assert "unknown key 'num_image_tokens'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "z9", "conversations": [{"from": "gpt", "value": "x"}]}]))
    assert (
        inspect_cmd.main(
            ["--data", str(bad), "--tokenizer", str(sp_tokenizer_dir), "--template", "plain"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "bad.json" in err and "z9" in err and "conversations[0].from" in err
    assert err.startswith("lvlm-tune inspect: error: ") and "Traceback" not in err


@pytest.mark.slow
def test_console_script(tmp_path, data_file, sp_tokenizer_dir):
    exe = os.path.join(os.path.dirname(sys.executable), "lvlm-tune")
    out = subprocess.run(
        [exe, "inspect", "--data", str(data_file), "--tokenizer", str(sp_tokenizer_dir), "--template", "minigpt4", "--json", "--limit", "1"],
        capture_output=True, text=True, check=True, env={**os.environ, "LVLM_TUNE_CACHE": str(tmp_path / "c2")},
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["id"] == "a1"


def test_recipe_image_tokens_come_from_the_vision_tower(capsys, tmp_path, data_file, tiny_parts):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "data_path": str(data_file),
                "llm_name_or_path": tiny_parts["llm"],
                "vision_tower": tiny_parts["vision"],
                "template": "vicuna_v1",
            }
        )
    )
    rows = run_json(capsys, str(recipe))
    assert (
        rows[0]["input_ids"].count(rows[0]["image_token_id"]) == 16
    )  # 32 px / patch 8, CLS dropped


HOSTILE = [
    {"id": "ok", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
    {"id": "eos", "conversations": [{"from": "human", "value": "Say </s>"},
                                    {"from": "gpt", "value": "</s> and </s>"}]},
    {"id": "hash", "conversations": [{"from": "human", "value": "Markdown?"},
                                     {"from": "gpt", "value": "### Title"}]},
]  # fmt: skip


def test_inspect_counts_escaped_and_refused_control_text(
    capsys, tmp_path, monkeypatch, sp_tokenizer_dir
):
    monkeypatch.setenv("LVLM_TUNE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "hostile.json"
    data.write_text(json.dumps(HOSTILE))
    base = ["--data", str(data), "--tokenizer", str(sp_tokenizer_dir), "--on-bad-sample", "skip"]
    base += ["--max-bad-fraction", "1"]
    assert inspect_cmd.main([*base, "--template", "llava_v0"]) == 0
    out = capsys.readouterr()
    assert "samples encoded: 2" in out.out
    assert "control-token text tokenized as text: 3 occurrence(s) in 1 sample(s)" in out.out
    assert "special_text=1" in out.out and "'###'" in out.err  # the ### answer is refused
    assert inspect_cmd.main([*base, "--template", "vicuna_v1", "--special-text", "refuse"]) == 0
    out = capsys.readouterr()
    assert "samples encoded: 2" in out.out and "special_text=1" in out.out
    assert "control token(s) '</s>'" in out.err


def bad_image_data(tmp_path):
    """Six samples: one good image, then a missing, an empty, a truncated, a 100-megapixel
    (header only) and an out-of-folder image."""
    from huge_png import write_huge_png

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8), (0, 0, 200)).save(folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    good = (folder / "good.png").read_bytes()
    Image.effect_noise((128, 128), 64).convert("RGB").save(folder / "full.png")
    (folder / "cut.png").write_bytes((folder / "full.png").read_bytes()[:3000])
    write_huge_png(folder / "huge.png", 10000, 10000, pixels=False)
    (tmp_path / "outside.png").write_bytes(good)
    names = ["good.png", "gone.png", "empty.png", "cut.png", "huge.png", "../outside.png"]
    rows = [
        {"id": f"b{k}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "blue"}]}
        for k, name in enumerate(names)
    ]  # fmt: skip
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    return path, folder


EXPECTED = {
    "b1": ("missing_image", "image file not found"),
    "b2": ("corrupt_image", "image file is empty (0 bytes)"),
    "b3": ("corrupt_image", "cannot decode image"),
    "b4": ("image_too_large", "10000x10000 = 100,000,000 pixels"),
    "b5": ("image_outside_folder", "outside image_folder"),
}


@pytest.mark.parametrize("sample_id", sorted(EXPECTED))
def test_bad_images_fail_inspect_naming_file_sample_and_field(
    capsys, tmp_path, data_file, sp_tokenizer_dir, sample_id
):
    path, folder = bad_image_data(tmp_path)
    rows = json.loads(path.read_text())
    only = tmp_path / f"{sample_id}.json"
    only.write_text(json.dumps([rows[0], rows[int(sample_id[1:])]]))
    code = inspect_cmd.main(
        ["--data", str(only), "--tokenizer", str(sp_tokenizer_dir), "--template", "vicuna_v1",
         "--image-folder", str(folder)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lvlm-tune inspect: error: ")
    assert f"{only.name}: sample {sample_id!r}: field image: " in err
    assert EXPECTED[sample_id][1] in err


def test_skip_lists_and_counts_bad_images_and_fails_beyond_max_bad_fraction(
    capsys, tmp_path, data_file, sp_tokenizer_dir
):
    path, folder = bad_image_data(tmp_path)
    base = ["--data", str(path), "--tokenizer", str(sp_tokenizer_dir), "--template", "vicuna_v1",
            "--image-folder", str(folder), "--on-bad-sample", "skip"]  # fmt: skip
    assert inspect_cmd.main([*base, "--max-bad-fraction", "1"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    for sample_id, (reason, problem) in EXPECTED.items():
        start = f"skipped ({reason}): {path}: sample {sample_id!r}: field image: "
        assert any(line.startswith(start) and problem in line for line in lines), sample_id
    assert "samples encoded: 1" in captured.out
    assert (
        "skipped samples: 5 of 6 (corrupt_image=2, image_outside_folder=1, "
        "image_too_large=1, missing_image=1)" in captured.out
    )
    assert inspect_cmd.main(base) == 1  # the default max_bad_fraction (0.01)
    err = capsys.readouterr().err
    assert "bad.json: 5 of 6 samples are bad" in err and "max_bad_fraction=0.01" in err
    allowed = inspect_cmd.main([*base, "--allow-outside-image-folder", "--max-bad-fraction", "1"])
    assert allowed == 0 and "skipped samples: 4 of 6" in capsys.readouterr().out


def test_recipe_image_options_reach_inspect(
    capsys, tmp_path, data_file, sp_tokenizer_dir, tiny_parts
):
    path, folder = bad_image_data(tmp_path)
    rows = json.loads(path.read_text())
    small = tmp_path / "small.json"
    small.write_text(json.dumps([rows[0], rows[5]]))
    recipe = {
        "data_path": str(small), "image_folder": str(folder), "template": "vicuna_v1",
        "llm_name_or_path": str(sp_tokenizer_dir), "vision_tower": tiny_parts["vision"],
        "on_bad_sample": "skip",
        "max_bad_fraction": 0.5, "allow_outside_image_folder": True, "max_image_pixels": 63,
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert inspect_cmd.main([str(tmp_path / "r.yaml")]) == 1  # both 8x8 = 64 pixels > 63
    assert "skipped samples: 2 of 2 (image_too_large=2)" in capsys.readouterr().out
    recipe["max_image_pixels"] = 64
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert inspect_cmd.main([str(tmp_path / "r.yaml")]) == 0
    assert "skipped samples: none" in capsys.readouterr().out


def test_generated_target_images_are_opened_too(capsys, tmp_path, data_file, sp_tokenizer_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    row = {
        "id": "g1",
        "conversations": [
            {"from": "human", "value": "Draw it."},
            {"from": "gpt", "value": "<gen_image>"},
        ],
        "gen_images": ["../outside.png"],
    }
    (tmp_path / "gen.json").write_text(json.dumps([row]))
    args = ["--data", str(tmp_path / "gen.json"), "--tokenizer", str(sp_tokenizer_dir),
            "--template", "vicuna_v1", "--num-vokens", "2", "--image-folder", str(folder)]  # fmt: skip
    assert inspect_cmd.main(args) == 2
    err = capsys.readouterr().err
    assert "gen.json: sample 'g1': field gen_images[0]: image path '../outside.png'" in err
    assert inspect_cmd.main([*args, "--allow-outside-image-folder"]) == 0
