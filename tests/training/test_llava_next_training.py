"""Tiny ``lvlm-tune train`` runs of LLaVA-NeXT and OneVision: exact trainable sets per stage,
frozen parameters bit-identical and trainable ones changed, the vision tower's own learning
rate, the blank-image pass of text-only batches and the stage-1 projector (with the newline)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import parse, tiny_recipe, train_and_compare
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback, set_seed

from lvlm_tune.models.parts import canonical_name, is_under, unwrap_model
from lvlm_tune.testing.tiny_anyres import (
    TINY_GRIDS,
    write_tiny_llava_next,
    write_tiny_llava_onevision,
    write_tiny_qwen2,
    write_tiny_siglip,
)
from lvlm_tune.training.optimizer import parameter_groups
from lvlm_tune.training.pipeline import build_model, run

PROJECTOR = ("model.multi_modal_projector", "model.image_newline")
LANGUAGE = ("model.language_model", "lm_head")
VISION = ("model.vision_tower",)
SIZES = [(20, 50), (64, 64), (33, 31), (100, 17), (45, 70), (32, 32)]  # width, height


@pytest.fixture(scope="session")
def anyres_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("anyres_models")
    return {
        "llava_next": str(write_tiny_llava_next(root / "next")),
        "llava_onevision": str(write_tiny_llava_onevision(root / "ov")),
        "siglip": str(write_tiny_siglip(root / "siglip")),
        "qwen2": str(write_tiny_qwen2(root / "qwen2")),
    }


@pytest.fixture(scope="session")
def anyres_data(tmp_path_factory):
    """Text-only, one-image and two-image samples (one image in a later turn), mixed sizes."""
    root = tmp_path_factory.mktemp("anyres_data")
    for i, (w, h) in enumerate(SIZES):
        Image.new("RGB", (w, h), (40 * i, 200 - 30 * i, 90)).save(root / f"{i}.png")
    samples = []
    for i in range(12):
        turns = [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "red"},
        ]
        if i % 3 == 0:
            samples.append({"id": f"t{i}", "conversations": [
                {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]})  # fmt: skip
        elif i % 3 == 1:
            samples.append({"id": f"s{i}", "image": f"{i % 6}.png", "conversations": turns})
        else:
            later = [
                {"from": "human", "value": "And <image> this one?"},
                {"from": "gpt", "value": "blue"},
            ]
            samples.append({"id": f"m{i}", "image": [f"{i % 6}.png", f"{(i + 1) % 6}.png"],
                            "conversations": turns + later})  # fmt: skip
    (root / "train.json").write_text(json.dumps(samples))
    return {"data_path": str(root / "train.json"), "image_folder": str(root)}


def anyres_recipe(models, data, out, family, **overrides):
    """A tiny run of a saved NeXT/OneVision model (``tiny_recipe`` with a checkpoint)."""
    settings = {
        "family": family, "model_name_or_path": models[family], "per_device_train_batch_size": 3,
        "template": "chatml" if family == "llava_onevision" else "vicuna_v1",
        "image_position": "keep",
    }  # fmt: skip
    recipe = tiny_recipe({"vision": None, "llm": None}, data, out, **{**settings, **overrides})
    return {k: v for k, v in recipe.items() if v is not None}


def _names(model, parts):
    return {n for n, _ in model.named_parameters() if is_under(canonical_name(n), parts)}


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune", "finetune_lora"])
def test_trainable_sets_per_stage(tmp_path, anyres_models, anyres_data, family, stage):
    args = parse(
        anyres_recipe(anyres_models, anyres_data, tmp_path / "x", family, stage=stage), tmp_path
    )
    model = build_model(*args)[0]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if stage == "pretrain":
        assert trainable == _names(model, PROJECTOR)
        assert "model.image_newline" in trainable
    elif stage == "finetune":
        assert trainable == _names(model, PROJECTOR + LANGUAGE)
    else:
        projector = {n for n in trainable if is_under(canonical_name(n), PROJECTOR)}
        lora = trainable - projector
        assert lora and all(
            "lora_" in n and is_under(canonical_name(n), ("model.language_model",)) for n in lora
        )
        assert projector and all(".modules_to_save." in n for n in projector)
        assert not any("image_newline" in n for n in trainable)  # a bare parameter: frozen


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_vision_tower_trains_at_its_own_rate(tmp_path, anyres_models, anyres_data, family):
    recipe = anyres_recipe(
        anyres_models, anyres_data, tmp_path / "x", family, stage="finetune",
        unfreeze_vision_tower=True, learning_rate=1e-5, vision_tower_lr=2e-6, projector_lr=1e-3,
    )  # fmt: skip
    model_args, data_args, train_args = parse(recipe, tmp_path)
    model, _, family_entry = build_model(model_args, data_args, train_args)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _names(model, PROJECTOR + LANGUAGE + VISION)
    groups = parameter_groups(model, train_args, family_entry)
    ids = {name: id(p) for name, p in model.named_parameters()}
    by_rate = {}
    for group in groups:
        for param in group["params"]:
            by_rate[id(param)] = group.get("lr", train_args.learning_rate)
    for name in trainable:
        expected = 2e-6 if is_under(name, VISION) else 1e-3 if is_under(name, PROJECTOR) else 1e-5
        assert by_rate[ids[name]] == expected, name


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune", "finetune_lora"])
def test_train_changes_exactly_the_trainable_parameters(
    tmp_path, anyres_models, anyres_data, family, stage
):
    recipe = anyres_recipe(anyres_models, anyres_data, tmp_path / "run", family, stage=stage)
    trainer, trainable = train_and_compare(tmp_path, recipe)
    assert trainable
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    card = json.loads((tmp_path / "run" / "lvlm_tune.json").read_text())
    assert card["family"] == family and card.get("num_image_tokens") is None  # sizes decide
    if stage == "pretrain":
        saved = load_file(tmp_path / "run" / "projector.safetensors")
        assert torch.equal(saved["model.image_newline"], trainer.model.model.image_newline.detach())


@pytest.mark.slow
def test_onevision_composed_from_parts_unfrozen_tower(tmp_path, anyres_models, anyres_data):
    recipe = anyres_recipe(
        anyres_models, anyres_data, tmp_path / "run", "llava_onevision", stage="finetune",
        model_name_or_path="", vision_tower=anyres_models["siglip"],
        llm_name_or_path=anyres_models["qwen2"], vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=TINY_GRIDS,
        unfreeze_vision_tower=True, vision_tower_lr=2e-3,
    )  # fmt: skip
    args = parse(recipe, tmp_path)
    set_seed(args[2].seed)
    before = {n: p.detach().clone() for n, p in build_model(*args)[0].named_parameters()}
    trainer = run(*parse(recipe, tmp_path))
    unused = "model.vision_tower.post_layernorm."  # after the last layer, which layer -1 reads
    for name, param in trainer.model.named_parameters():
        same = torch.equal(before[name], param.detach())
        if param.requires_grad and not name.startswith(unused):
            assert not same, f"{name} did not train"
        else:
            assert same, f"{name} changed"
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained == _names(trainer.model, PROJECTOR + LANGUAGE + VISION)


class CountProjectorCalls(TrainerCallback):
    """Counts the projector's forward calls during training."""

    def __init__(self):
        self.calls = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        projector = unwrap_model(model).model.multi_modal_projector

        def count(*_):
            self.calls += 1

        projector.register_forward_hook(count)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_text_only_batches_run_the_vision_path(tmp_path, anyres_models, anyres_data, family):
    """A run on text-only data still runs the vision path (a blank image with its
    ``image_sizes``) in every step, as ZeRO needs every rank to run the same modules."""
    data = tmp_path / "text.json"
    data.write_text(json.dumps([
        {"id": f"t{i}", "conversations": [{"from": "human", "value": "Say hi."},
                                          {"from": "gpt", "value": "hi"}]} for i in range(6)]))  # fmt: skip
    recipe = anyres_recipe(
        anyres_models, {**anyres_data, "data_path": str(data)}, tmp_path / "run", family,
        stage="pretrain",
    )  # fmt: skip
    counter = CountProjectorCalls()
    trainer = run(*parse(recipe, tmp_path), callbacks=[counter])
    assert trainer.blank_image_sizes.tolist() == [[8, 8]]
    assert counter.calls == 2  # one blank pass per step
