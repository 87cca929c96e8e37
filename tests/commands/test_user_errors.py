"""User errors print one line naming what to fix, exit 2, and show no traceback.

Each case runs the real command (``lvlm_tune.cli.main``) and checks the exit status, the message
on stderr and that no traceback was printed; ``LVLM_TUNE_DEBUG=1`` turns the same mistake back
into the exception. Cases that are caught before any model loads stay cheap; a few run the
console script in a fresh process to see exactly what a user sees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe

from lvlm_tune.cli import main as cli
from lvlm_tune.errors import UserError
from lvlm_tune.training.recipe import LORA_KEYS, parse_recipe

EXE = os.path.join(os.path.dirname(sys.executable), "lvlm-tune")


def fails(capsys, argv, *needles):
    """Run ``lvlm-tune ARGV``; assert status 2, one ``error:`` line holding every needle."""
    code = cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if ": error: " in line)
    for needle in needles:
        assert needle in line, line
    return line


def raises_in_debug(monkeypatch, argv, error=UserError):
    """With ``LVLM_TUNE_DEBUG=1`` the same mistake raises instead of printing one line."""
    monkeypatch.setenv("LVLM_TUNE_DEBUG", "1")
    with pytest.raises(error):
        cli(argv)
    monkeypatch.delenv("LVLM_TUNE_DEBUG")


@pytest.fixture
def recipe(tmp_path, tiny_parts, tiny_data, monkeypatch):
    """Write a tiny stage-1 recipe (plus ``extra`` keys) to a new file and return its path."""
    monkeypatch.setenv("LVLM_TUNE_CACHE", str(tmp_path / "cache"))
    count = iter(range(1000))

    def write(**extra):
        path = tmp_path / f"r{next(count)}.yaml"
        values = tiny_recipe(tiny_parts, tiny_data, tmp_path / "out", stage="pretrain")
        path.write_text(yaml.safe_dump({**values, **extra}))
        return str(path)

    return write


# --- train: recipe, paths and values ----------------------------------------------------------


def test_missing_local_folders_are_named_not_reported_as_bad_repo_ids(
    capsys, monkeypatch, recipe, tmp_path
):
    monkeypatch.chdir(tmp_path)
    path = recipe()
    line = fails(
        capsys,
        ["train", path, "--model_name_or_path", "./does-not-exist"],
        "model_name_or_path: ./does-not-exist does not exist",
        str(tmp_path),
    )
    assert "Repo id" not in line
    gone = str(tmp_path / "gone" / "llm")
    fails(capsys, ["train", path, "--llm_name_or_path", gone], f"llm_name_or_path: {gone} does not")
    fails(capsys, ["train", path, "--vision_tower", "../nowhere"], "vision_tower: ../nowhere")
    fails(capsys, ["train", path, "--data_path", "missing.json"], "data_path: missing.json")
    raises_in_debug(monkeypatch, ["train", path, "--model_name_or_path", "./does-not-exist"])


def test_a_hub_id_is_left_to_from_pretrained():
    from lvlm_tune.errors import require_path

    require_path("lmsys/vicuna-7b-v1.5", "llm_name_or_path")  # may be a Hub repo: not checked
    with pytest.raises(UserError, match="does not exist"):
        require_path("lmsys/vicuna-7b-v1.5", "data_path", hub_id_ok=False)


@pytest.mark.parametrize("key", LORA_KEYS)
def test_lora_keys_outside_the_lora_stages_are_refused(capsys, recipe, key, tmp_path):
    values = {"lora_target_modules": ["q_proj"], "use_dora": True, "use_rslora": True}
    value = values.get(key, 0.1 if key == "lora_dropout" else 4)
    path = recipe(**{key: value})
    fails(capsys, ["train", path], path, key, "stage is 'pretrain'", "finetune_lora")
    for stage, extra in (("finetune", {}), ("vokens", {"num_vokens": 2, "diffusion_model": "x"})):
        with pytest.raises(UserError, match=rf"{key}.*stage is '{stage}'"):
            parse_recipe(recipe(stage=stage, **extra, **{key: value}))
    # the same key is fine in a LoRA stage, and the dataclass defaults never count as "set"
    assert parse_recipe(path, ["--stage", "finetune_lora"])[0].stage == "finetune_lora"
    assert parse_recipe(recipe())[0].lora_r == 128


def test_lora_key_on_the_command_line_is_named_there(capsys, recipe):
    fails(capsys, ["train", recipe(), "--use_dora", "true"], "command line: use_dora")


def test_max_steps_zero_is_refused(capsys, monkeypatch, recipe):
    path = recipe()
    fails(capsys, ["train", path, "--max_steps", "0"], "max_steps: 0", "num_train_epochs")
    fails(capsys, ["train", path, "--max_steps", "-5"], "max_steps: -5")
    raises_in_debug(monkeypatch, ["train", path, "--max_steps", "0"])
    assert parse_recipe(path, ["--max_steps", "-1"])[2].max_steps == -1  # -1: use epochs


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("per_device_train_batch_size", "0", "per_device_train_batch_size: must be >= 1, got 0"),
        ("learning_rate", "-1e-4", "learning_rate: must be >= 0, got -0.0001"),
        ("gradient_accumulation_steps", "0", "gradient_accumulation_steps: must be >= 1"),
        ("projector_lr", "-1", "projector_lr: must be >= 0"),
        ("model_max_length", "0", "model_max_length: must be positive"),
    ],
)
def test_out_of_range_values_fail_at_parse_time(capsys, recipe, option, value, needle):
    fails(capsys, ["train", recipe(), f"--{option}", value], needle)


def test_duplicate_yaml_keys_are_refused_naming_key_file_and_line(capsys, monkeypatch, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("stage: pretrain\nlearning_rate: 1e-3\nlearning_rate: 2e-5\n")
    argv = ["train", str(path)]
    fails(capsys, argv, str(path), "line 3", "duplicate key 'learning_rate'", "line 2")
    raises_in_debug(monkeypatch, argv)
    fails(capsys, ["inspect", str(path)], "duplicate key 'learning_rate'")
    flow = tmp_path / "flow.yaml"
    flow.write_text("{stage: pretrain, stage: finetune}\n")
    fails(capsys, ["train", str(flow)], "duplicate key 'stage'")
    # a YAML merge key may override on purpose
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b {x: 1}\nother:\n  <<: *b\n  x: 2\n")
    from lvlm_tune.training.recipe_file import load_recipe

    assert load_recipe(merged)["other"] == {"x": 2}


def test_missing_recipe_and_bad_yaml(capsys, tmp_path):
    fails(capsys, ["train", str(tmp_path / "nope.yaml")], "nope.yaml: no such recipe file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: [pretrain\n")
    fails(capsys, ["train", str(bad)], "bad.yaml: invalid YAML: line")
    listed = tmp_path / "list.yaml"
    listed.write_text("- stage\n")
    fails(capsys, ["train", str(listed)], "a recipe is a flat YAML mapping")


def test_unknown_key_template_and_command(capsys, recipe):
    path = recipe()
    fails(capsys, ["train", path, "--learning_rat", "1"], "did you mean 'learning_rate'")
    fails(
        capsys, ["train", path, "--template", "vicuna"], "template: unknown 'vicuna'", "vicuna_v1"
    )
    fails(capsys, ["train", path, "stray"], "unexpected argument 'stray'")
    fails(capsys, ["train", path, "--data_format", "csv"], "data_format: unknown 'csv'")
    fails(capsys, ["train", path, "--deepspeed", "nope.json"], "deepspeed: nope.json does not")
    fails(capsys, ["train", path, "--bf16", "true", "--fp16", "true"], "fp16 and bf16")
    assert cli(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_list_options_in_the_recipe(capsys, recipe):
    assert parse_recipe(recipe(stage="finetune_lora", lora_target_modules="q_proj"))[
        0
    ].lora_target_modules == ["q_proj"]
    assert parse_recipe(recipe(stage="finetune_lora", lora_target_modules="q_proj,v_proj"))[
        0
    ].lora_target_modules == ["q_proj", "v_proj"]
    path = recipe(stage="finetune_lora", lora_target_modules=7)
    fails(capsys, ["train", path], "lora_target_modules: expected a list")
    path = recipe(stage="finetune_lora", lora_target_modules=["q_proj", 3])
    fails(capsys, ["train", path], "lora_target_modules: expected str items")


def test_a_bad_sample_is_one_line_naming_file_sample_and_field(capsys, tmp_path, recipe):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "z9", "conversations": [{"from": "gpt", "value": "x"}]}]))
    line = fails(
        capsys,
        ["train", recipe(), "--data_path", str(bad), "--max_steps", "1"],
        "bad.json",
        "z9",
        "conversations[0].from",
    )
    assert line.startswith("lvlm-tune train: error: ")


# --- inspect ----------------------------------------------------------------------------------


def test_inspect_paths_and_template(capsys, monkeypatch, tmp_path, sp_tokenizer_dir):
    monkeypatch.setenv("LVLM_TUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]))  # fmt: skip
    ok = ["inspect", "--data", str(data), "--tokenizer", str(sp_tokenizer_dir)]
    line = fails(capsys, [*ok[:3], "--tokenizer", "./missing", "--template", "plain"],
                 "--tokenizer: ./missing does not exist")  # fmt: skip
    assert "Repo id" not in line
    fails(capsys, [*ok, "--template", "vicuna"], "template: unknown 'vicuna'")
    fails(capsys, ["inspect", "--data", "nope.json", *ok[3:], "--template", "plain"], "--data")
    fails(capsys, ["inspect", "--template", "plain"], "missing --data, --tokenizer")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data_path": str(data), "llm_name_or_path": "./gone/llm",
                                      "vision_tower": "./gone/vision", "template": "plain"}))  # fmt: skip
    fails(capsys, ["inspect", str(recipe)], "llm_name_or_path: ./gone/llm does not exist")
    assert cli([*ok, "--template", "plain"]) == 0


# --- merge, chat, eval ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_parts, tiny_data):
    from lvlm_tune.training.pipeline import run

    root = tmp_path_factory.mktemp("user_errors_run")
    recipe = tiny_recipe(tiny_parts, tiny_data, root / "lora", stage="finetune_lora", max_steps=1)
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    run(*parse_recipe(root / "r.yaml"))
    return root / "lora"


def test_merge_base_takes_exactly_the_form_its_error_suggests(
    capsys, monkeypatch, lora_run, tiny_parts, tmp_path
):
    moved = tmp_path / "moved"
    shutil.copytree(lora_run, moved)
    card = json.loads((moved / "lvlm_tune.json").read_text())
    card["model_args"]["llm_name_or_path"] = str(tmp_path / "gone" / "llm")
    card["model_args"]["vision_tower"] = str(tmp_path / "gone" / "vision")
    (moved / "lvlm_tune.json").write_text(json.dumps(card))
    argv = ["merge", "--checkpoint", str(moved), "--output", str(tmp_path / "m0")]
    line = fails(capsys, argv, "does not exist", "--base")
    suggested = re.search(r"--base (LLM=PATH,VISION=PATH)", line)
    assert suggested, line
    parts = iter([tiny_parts["llm"], tiny_parts["vision"]])
    base = re.sub("PATH", lambda _: next(parts), suggested.group(1))
    assert cli([*argv[:-1], str(tmp_path / "m1"), "--base", base]) == 0
    assert (tmp_path / "m1" / "config.json").is_file()
    capsys.readouterr()
    # one part alone is not enough when both moved; the error names the still-missing one
    fails(capsys, [*argv[:-1], str(tmp_path / "m2"), "--base", f"LLM={tiny_parts['llm']}"],
          "vision tower", "gone")  # fmt: skip
    fails(capsys, [*argv[:-1], str(tmp_path / "m3"), "--base", "LLM=/no/where,VISION=/x"],
          "--base LLM=/no/where: no such folder")  # fmt: skip
    raises_in_debug(monkeypatch, argv, FileNotFoundError)


def test_parse_base_forms():
    from lvlm_tune.inference.load import parse_base

    assert parse_base("/m") == {"model": "/m"}
    assert parse_base("/l,/v") == {"llm": "/l", "vision": "/v"}
    assert parse_base("LLM=/l,VISION=/v") == {"llm": "/l", "vision": "/v"}
    assert parse_base("vision=/v,llm=/l") == {"llm": "/l", "vision": "/v"}
    assert parse_base("VISION=/v") == {"vision": "/v"}
    with pytest.raises(UserError, match="LLM given twice"):
        parse_base("LLM=/a,LLM=/b")
    with pytest.raises(UserError, match="expected"):
        parse_base("/a,/b,/c")


def test_chat_repl_survives_bad_images(capsys, monkeypatch, lora_run, tiny_data, tmp_path):
    import argparse

    from lvlm_tune.commands.chat import repl
    from lvlm_tune.inference.chat import ChatSession
    from lvlm_tune.inference.load import load_run

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = os.path.join(tiny_data["image_folder"], "0.png")
    session = ChatSession(load_run(lora_run))
    args = argparse.Namespace(image=None, max_new_tokens=2, temperature=0.0)
    lines = [
        f"/image {tmp_path / 'missing.png'}",
        f"/image {corrupt}",
        "/image",
        "What color is the image?",
        f"/image {good}",
        "And now?",
    ]
    repl(session, args, lines)
    captured = capsys.readouterr()
    assert captured.out.count("ASSISTANT: ") == 2
    errors = [
        line for line in captured.err.splitlines() if line.startswith("lvlm-tune chat: error")
    ]
    assert len(errors) == 3, captured.err
    assert "missing.png" in errors[0] and "corrupt.png: not a readable image" in errors[1]
    assert "Traceback" not in captured.err
    assert [t.role for t in session.turns] == ["user", "assistant"] * 2
    assert session.image_paths == [os.path.abspath(good)]
    # an image that fails while answering is dropped and the conversation is unchanged
    before = list(session.turns)
    with pytest.raises(UserError, match="not a readable image"):
        session.ask("Again?", str(corrupt))
    monkeypatch.setenv("LVLM_TUNE_DEBUG", "1")
    with pytest.raises(UserError, match="no image at"):
        repl(session, args, [f"/image {tmp_path / 'missing.png'}"])
    monkeypatch.setattr(ChatSession, "check_image", staticmethod(os.path.abspath))
    with pytest.raises(UserError, match="cannot decode image"):  # now found when encoding
        session.ask("Again?", str(corrupt))
    assert session.turns == before and session.image_paths == [os.path.abspath(good)]


def test_chat_image_option_is_checked_before_the_model_loads(capsys, tmp_path):
    fails(capsys, ["chat", "--model", str(tmp_path / "no-model"), "--image", str(tmp_path / "x.png"),
                   "--prompt", "hi"], "no image at")  # fmt: skip


def test_eval_output_and_limit_are_checked_before_evaluating(capsys, tmp_path, tiny_data):
    missing_model = str(tmp_path / "no-model")  # errors below come before the model is opened
    argv = ["eval", "--model", missing_model, "--data", tiny_data["data_path"]]
    folder = tmp_path / "out"
    folder.mkdir()
    fails(capsys, [*argv, "--json", str(folder)], "--json", "is a folder")
    fails(capsys, [*argv, "--json", str(tmp_path / "no" / "r.json")], "folder", "does not exist")
    fails(capsys, [*argv, "--limit", "0"], "--limit: must be at least 1, got 0")
    fails(capsys, [*argv, "--batch-size", "0"], "--batch-size: must be at least 1")
    fails(capsys, ["eval", "--model", missing_model, "--data", "nope.json"], "--data: nope.json")
    fails(capsys, argv, "no-model", "no such checkpoint folder")


def test_eval_report_has_no_nan(lora_run, tiny_data, tmp_path):
    from lvlm_tune.inference.evaluate import perplexity

    assert perplexity(None) is None and perplexity(1e6) is None and perplexity(0.0) == 1.0
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(lora_run), "--data", tiny_data["data_path"]]
    argv += ["--image-folder", tiny_data["image_folder"], "--limit", "1", "--json", str(out)]
    assert cli(argv) == 0
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)["metrics"]["num_samples"] == 1


# --- what a user sees: the console script in a fresh process -----------------------------------


@pytest.mark.parametrize(
    "debug", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["plain", "debug"]
)
@pytest.mark.slow
def test_console_script_prints_one_line_or_the_traceback(tmp_path, recipe, debug):
    env = {**os.environ, "LVLM_TUNE_DEBUG": "1" if debug else "0"}
    done = subprocess.run(
        [EXE, "train", recipe(), "--model_name_or_path", "./does-not-exist"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "model_name_or_path: ./does-not-exist does not exist" in done.stderr
    if debug:
        assert "Traceback" in done.stderr and "UserError" in done.stderr
    else:
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("lvlm-tune train: error: ")


def test_only_user_errors_lose_their_traceback(capsys):
    from lvlm_tune.errors import command
    from lvlm_tune.templates.registry import get_template

    @command("lvlm-tune x")
    def library_error(argv):
        raise ValueError("raised outside lvlm_tune")  # e.g. deep in torch: a bug, keep it

    @command("lvlm-tune x")
    def bug(argv):
        raise RuntimeError("boom")

    @command("lvlm-tune x")
    def lookup(argv):
        get_template("nope")  # lvlm-tune's own KeyError naming the choices

    @command("lvlm-tune x")
    def missing_file(argv):
        Path("/no/such/file.txt").read_text()

    with pytest.raises(ValueError, match="outside"):
        library_error([])
    with pytest.raises(RuntimeError):
        bug([])
    assert lookup([]) == 2
    assert capsys.readouterr().err.startswith("lvlm-tune x: error: unknown template 'nope'")
    assert missing_file([]) == 2
    assert capsys.readouterr().err == (
        "lvlm-tune x: error: /no/such/file.txt: No such file or directory\n"
    )
