"""``inspect RECIPE`` and ``train RECIPE`` encode every sample alike, for every shipped recipe.

Each recipe of ``recipes/`` and ``recipes/demo/`` is pointed at tiny local parts and data by
command-line overrides (as the recipe test of ``tests/training/test_train.py`` does), then:
the training side builds the model (and so prepares its tokenizer) and the dataset exactly as
``lvlm-tune train`` does; the inspect side runs ``lvlm-tune inspect RECIPE --json`` with the
same overrides (its own tokenizer preparation, no model). Both must keep the same samples with
the same ``input_ids`` and ``labels``, and drop the same samples for the same reasons. For the
anyres families the image tokens depend on each image's size: the data hold images of several
sizes and aspect ratios.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import MINIGPT4_QUERIES
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from lvlm_tune.commands import inspect as inspect_cmd
from lvlm_tune.data.errors import SkippedSample
from lvlm_tune.training.extensions import data_hooks
from lvlm_tune.training.pipeline import build_dataset, build_model
from lvlm_tune.training.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(ROOT.glob("*.yaml")) + sorted((ROOT / "demo").glob("*.yaml"))
SKIPPED = re.compile(r"^skipped \((\w+)\): .*: sample '([^']+)'")


@pytest.fixture(scope="module")
def parity_data(tiny_data, tmp_path_factory):
    """Conversations (image, multi-turn, text-only, image-generating, two images of other
    sizes, an image in a later turn) and caption pairs, with their image folder."""
    import shutil

    from PIL import Image

    source = Path(tiny_data["image_folder"])
    folder = tmp_path_factory.mktemp("parity")
    for i in (0, 1, 2):
        shutil.copy(source / f"{i}.png", folder / f"{i}.png")
    for name, size in {"wide": (64, 24), "tall": (20, 56), "big": (80, 80)}.items():
        Image.new("RGB", size, (40, 90, 200)).save(folder / f"{name}.png")
    rows = json.loads(Path(tiny_data["data_path"]).read_text())[:4]
    rows.append(
        {"id": "one", "image": "1.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the image?"},
            {"from": "gpt", "value": "blue"}]}
    )  # fmt: skip
    rows.append(
        {"id": "draw", "gen_images": ["2.png"], "gen_captions": ["a green picture"],
         "conversations": [{"from": "human", "value": "Show me a green picture."},
                           {"from": "gpt", "value": "Here it is: <gen_image>"}]}
    )  # fmt: skip
    rows.append(
        {"id": "two", "images": ["wide.png", "tall.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nAre they the same colour?"},
            {"from": "gpt", "value": "yes"}]}
    )  # fmt: skip
    rows.append(
        {"id": "later", "image": "big.png", "conversations": [
            {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "<image>\nAnd this one?"}, {"from": "gpt", "value": "blue"}]}
    )  # fmt: skip
    (folder / "conversations.json").write_text(json.dumps(rows))
    captions = [{"id": f"c{i}", "image": f"{i}.png", "caption": "a plain picture"} for i in (0, 1)]
    captions.append({"id": "cw", "image": "wide.png", "caption": "a wide picture"})
    (folder / "captions.json").write_text(json.dumps(captions))
    return {
        "files": [str(folder / "conversations.json"), str(folder / "captions.json")],
        "image_folder": str(folder),
    }


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    """A tiny SigLIP tower: the stand-in of recipes that select all its tokens (``full``)."""
    from lvlm_tune.testing.tiny_anyres import write_tiny_siglip

    return str(write_tiny_siglip(tmp_path_factory.mktemp("siglip") / "siglip", hidden_size=32))


def stand_ins(recipe, tiny_parts, towers, tiny_sd, tmp_path):
    model_args = parse_recipe(recipe, ["--use_cpu=true"])[0]
    unset_hf_deepspeed_config()  # parsing a ZeRO-3 recipe switches transformers to ZeRO-3 init
    minigpt4 = model_args.family == "minigpt4"
    siglip = model_args.vision_feature_select_strategy == "full"
    values = {
        "vision_tower": towers["blip2" if minigpt4 else "siglip" if siglip else "clip"],
        **({"num_query_tokens": MINIGPT4_QUERIES} if minigpt4 else {}),
        "llm_name_or_path": tiny_parts["llm"], "model_name_or_path": "",
        "pretrained_projector": "", "output_dir": str(tmp_path / "out"), "deepspeed": "",
        "bf16": False, "use_cpu": True, "on_bad_sample": "skip", "max_bad_fraction": 1,
    }  # fmt: skip
    if model_args.extensions["minigpt5"].num_vokens:
        values.update(
            diffusion_model=tiny_sd, pretrained_vokens="", mapper_hidden_size=32,
            mapper_layers=1, mapper_heads=4,
        )  # fmt: skip
    return [f"--{key}={value}" for key, value in values.items()]


def trained(dataset):
    """``id -> (input_ids, labels)`` of the samples training keeps, ``id -> reason`` of the rest."""
    kept, dropped = {}, {}
    for index in range(len(dataset)):
        item = dataset[index]
        if isinstance(item, SkippedSample):
            dropped[dataset.source.get(index).id] = item.reason
        else:
            kept[item["id"]] = (item["input_ids"].tolist(), item["labels"].tolist())
    return kept, dropped


def inspected(capsys, argv):
    assert inspect_cmd.main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    kept = {row["id"]: (row["input_ids"], row["labels"]) for row in rows}
    dropped = {m[2]: m[1] for line in captured.err.splitlines() if (m := SKIPPED.match(line))}
    return kept, dropped


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_inspect_and_train_encode_every_sample_alike(
    recipe, capsys, tmp_path, tiny_parts, tiny_data, tiny_blip2, tiny_siglip, tiny_sd, parity_data
):
    towers = {"clip": tiny_parts["vision"], "blip2": tiny_blip2, "siglip": tiny_siglip}
    overrides = stand_ins(recipe, tiny_parts, towers, tiny_sd, tmp_path)
    folder = f"--image_folder={parity_data['image_folder']}"
    model_args, data_args, train_args = parse_recipe(recipe, [*overrides, folder])
    unset_hf_deepspeed_config()
    model, processor, family = build_model(model_args, data_args, train_args)
    hooks = data_hooks(model_args.extensions, model)  # as lvlm-tune train hands them over
    encoded = 0
    for data in parity_data["files"]:
        dataset = build_dataset(
            replace(data_args, data_path=data), processor, family.image_tokens(model, processor),
            train_args.seed, hooks=hooks,
        )  # fmt: skip
        kept, dropped = trained(dataset)
        argv = [str(recipe), *overrides, folder, f"--data_path={data}"]
        assert inspected(capsys, argv) == (kept, dropped), data
        encoded += len(kept)
    assert encoded >= 2  # the comparison covers real samples, not only refusals
