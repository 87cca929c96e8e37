"""The run card: a typed view of ``lvlm_tune.json`` that reads what older versions wrote, keeps
keys it does not know, and refuses a card without a model family naming the folder."""

from __future__ import annotations

import json

import pytest
from conftest import parse, tiny_recipe

from lvlm_tune.cli import main as cli
from lvlm_tune.training.run_card import RUN_CARD, RunCard, RunCardError, fingerprint, run_options

FORMAT_1_KEYS = [
    "format", "family", "stage", "template", "image_position", "image_aspect_ratio",
    "model_max_length", "system_prompt", "instruction_pool", "recipe", "model_args", "data_args",
    "fingerprint", "run_options", "num_image_tokens",
]  # fmt: skip


def test_a_training_card_writes_the_format_1_keys_and_reads_back_equal(
    tmp_path, tiny_parts, tiny_data
):
    args = parse(
        tiny_recipe(tiny_parts, tiny_data, tmp_path / "out", template="llava_v0"), tmp_path
    )
    card = RunCard.from_args(*args, num_image_tokens=16)
    card.write(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / RUN_CARD).read_text())
    assert list(written) == FORMAT_1_KEYS
    assert written["family"] == "llava" and written["template"] == "llava_v0"
    assert written["run_options"] == run_options(*args)
    assert written["fingerprint"] == fingerprint(written["run_options"])
    assert written["model_args"]["llm_name_or_path"] == tiny_parts["llm"]
    assert RunCard.read(tmp_path / "saved") == card


def test_an_older_card_reads_with_its_values_and_unknown_keys_survive(tmp_path):
    older = {
        "format": 1, "family": "minigpt4", "stage": "pretrain", "template": "plain",
        "image_position": None, "model_max_length": None, "image_aspect_ratio": None,
        "model_args": {"num_query_tokens": 8}, "data_args": {}, "recipe": "r.yaml",
        "written_by": "a later lvlm-tune",
    }  # fmt: skip
    (tmp_path / RUN_CARD).write_text(json.dumps(older))
    card = RunCard.read(tmp_path)
    assert (card.family, card.stage, card.template) == ("minigpt4", "pretrain", "plain")
    # unset values read as training's defaults; no run identity recorded
    assert (card.image_position, card.model_max_length, card.image_aspect_ratio) == (
        "before",
        2048,
        "none",
    )
    assert card.run_options is None and card.fingerprint is None
    assert card.model_args == {"num_query_tokens": 8} and card.extra == {
        "written_by": "a later lvlm-tune"
    }
    card.write(tmp_path / "again")
    again = json.loads((tmp_path / "again" / RUN_CARD).read_text())
    assert again["written_by"] == "a later lvlm-tune" and "run_options" not in again


def test_a_card_without_a_family_is_refused_naming_the_folder(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / RUN_CARD).write_text(json.dumps({"stage": "pretrain", "template": "plain"}))
    (folder / "config.json").write_text("{}")
    with pytest.raises(RunCardError, match=rf"{folder}.*records no model family"):
        RunCard.read(folder)
    for argv in (
        ["merge", "--checkpoint", str(folder), "--output", str(tmp_path / "m")],
        ["chat", "--model", str(folder), "--prompt", "hi"],
    ):
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert f"{folder}/{RUN_CARD}: records no model family" in err and "Traceback" not in err
    (folder / RUN_CARD).write_text("{not json")
    with pytest.raises(RunCardError, match="not valid JSON"):
        RunCard.read(folder)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no {RUN_CARD}"):
        RunCard.read(tmp_path)
