"""Stages as freezing policies: exact trainable sets, what moves in training, projector I/O."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from lvlm_tune.models import (
    IMAGE_TOKEN,
    enable_gradient_checkpointing,
    load_llava,
    load_projector,
    save_projector,
)
from lvlm_tune.models.parts import canonical_name
from lvlm_tune.testing.tiny_models import write_tiny_llava, write_tiny_tokenizer
from lvlm_tune.training.freezing import (
    STAGES,
    LoraOptions,
    apply_stage,
    parameter_summary,
    trainable_parameter_names,
)

PROJECTOR = "model.multi_modal_projector."
VISION = "model.vision_tower."
LANGUAGE = ("model.language_model.", "lm_head.")
LM_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TINY_LORA = LoraOptions(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("llava")
    tokenizer = write_tiny_tokenizer(root / "tokenizer")
    return {
        kind: write_tiny_llava(root / kind, tokenizer, projector_type=kind)
        for kind in ("mlp2x_gelu", "linear")
    }


def _load(folders: dict, kind: str = "mlp2x_gelu"):
    return load_llava(folders[kind])


def _names(model: nn.Module, *prefixes: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def _batch(processor) -> dict:
    image = Image.new("RGB", (32, 32), (10, 200, 30))
    text = f"USER: {IMAGE_TOKEN}\nwhat colour? ASSISTANT: green"
    batch = dict(processor(images=[image], text=[text], return_tensors="pt"))
    batch["labels"] = batch["input_ids"].clone()
    return batch


def test_pretrain_trains_only_the_projector(folders: dict) -> None:
    model, _ = _load(folders)
    trained = apply_stage(model, "pretrain")
    assert trained is model
    assert set(trainable_parameter_names(model)) == _names(model, PROJECTOR)
    assert len(_names(model, PROJECTOR)) == 4


def test_linear_projector_trains_as_one_linear_layer(folders: dict) -> None:
    model, _ = _load(folders, "linear")
    apply_stage(model, "pretrain")
    assert set(trainable_parameter_names(model)) == {
        PROJECTOR + "linear_1.weight",
        PROJECTOR + "linear_1.bias",
    }


def test_finetune_trains_projector_and_whole_llm(folders: dict) -> None:
    model, _ = _load(folders)
    apply_stage(model, "finetune")
    expected = _names(model, PROJECTOR, *LANGUAGE)
    assert set(trainable_parameter_names(model)) == expected
    assert {"lm_head.weight", "model.language_model.embed_tokens.weight"} <= expected
    assert not _names(model, VISION) & expected


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_unfreeze_vision_tower_adds_exactly_the_tower(folders: dict, stage: str) -> None:
    model, _ = _load(folders)
    apply_stage(model, stage)
    before = set(trainable_parameter_names(model))
    apply_stage(model, stage, unfreeze_vision_tower=True)
    assert set(trainable_parameter_names(model)) == before | _names(model, VISION)


def test_lora_targets_every_llm_linear_layer_and_nothing_else(folders: dict) -> None:
    model, _ = _load(folders)
    linear_in_lm = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith(LANGUAGE[0])
    }
    projector_names = _names(model, PROJECTOR)
    peft_model = apply_stage(model, "finetune_lora", lora=TINY_LORA)
    assert isinstance(peft_model, PeftModel)
    wrapped = {canonical_name(n) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == linear_in_lm
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == LM_LINEAR

    trainable = {canonical_name(n) for n in trainable_parameter_names(peft_model)}
    projector = {n for n in trainable if n.startswith(PROJECTOR)}
    assert projector == projector_names  # the projector copy trains fully
    lora = trainable - projector
    assert all(n.startswith(LANGUAGE[0]) and ".lora_" in n for n in lora)
    assert len(lora) == 2 * len(linear_in_lm)
    names = trainable_parameter_names(peft_model)
    assert all(".modules_to_save." in n for n in names if PROJECTOR in n)
    assert not any(VISION in n for n in names)


def test_lora_target_subset_never_touches_the_vision_tower(folders: dict) -> None:
    model, _ = _load(folders)
    options = LoraOptions(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    peft_model = apply_stage(model, "finetune_lora", lora=options)
    wrapped = {canonical_name(n) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped and all(n.startswith(LANGUAGE[0]) for n in wrapped)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"q_proj", "v_proj"}


def test_lora_options_reach_peft(folders: dict) -> None:
    model, _ = _load(folders)
    options = LoraOptions(r=4, alpha=16, dropout=0.1, use_dora=True, use_rslora=True)
    peft_model = apply_stage(model, "finetune_lora", lora=options)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 16, 0.1)
    assert config.use_dora and config.use_rslora
    assert any("lora_magnitude_vector" in n for n in trainable_parameter_names(peft_model))


def test_lora_unknown_target_names_the_choices(folders: dict) -> None:
    model, _ = _load(folders)
    with pytest.raises(ValueError, match="available: down_proj, gate_proj"):
        apply_stage(model, "finetune_lora", lora=LoraOptions(target_modules=("fc1",)))


def test_lora_with_unfrozen_vision_tower_saves_it_too(folders: dict) -> None:
    model, _ = _load(folders)
    vision_names = _names(model, VISION)
    peft_model = apply_stage(model, "finetune_lora", lora=TINY_LORA, unfreeze_vision_tower=True)
    assert "model.vision_tower" in peft_model.peft_config["default"].modules_to_save
    trainable = {canonical_name(n) for n in trainable_parameter_names(peft_model)}
    assert vision_names <= trainable


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("stage", "kind"),
    [
        ("pretrain", "mlp2x_gelu"),
        ("pretrain", "linear"),
        ("finetune", "mlp2x_gelu"),
        ("finetune_lora", "mlp2x_gelu"),
        ("finetune_lora", "linear"),
    ],
)
def test_training_moves_trainables_and_nothing_else(folders: dict, stage: str, kind: str) -> None:
    model, processor = _load(folders, kind)
    model = apply_stage(model, stage, lora=TINY_LORA)
    model.train()
    before = _snapshot(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    batch = _batch(processor)
    for _ in range(3):  # LoRA A moves from the 2nd step on (B starts at zero)
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    trainable = set(trainable_parameter_names(model))
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), name


@pytest.mark.parametrize("stage", ["pretrain", "finetune_lora"])
def test_gradient_checkpointing_reaches_trainables(folders: dict, stage: str) -> None:
    model, processor = _load(folders)
    model = apply_stage(model, stage, lora=TINY_LORA)
    enable_gradient_checkpointing(model, use_reentrant=True)
    model.train()
    model(**_batch(processor)).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for n, g in grads.items() if "lora_A" not in n)
    assert model.config.use_cache is False


def test_projector_round_trip(folders: dict, tmp_path) -> None:
    source, _ = _load(folders)
    with torch.no_grad():
        for param in source.model.multi_modal_projector.parameters():
            param.add_(1.0)
    written = save_projector(source, tmp_path)
    assert written == tmp_path / "projector.safetensors"
    keys = set(load_file(written))
    assert keys == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}

    target, _ = _load(folders)
    assert load_projector(target, tmp_path) == written
    expected = source.model.multi_modal_projector.state_dict()
    got = target.model.multi_modal_projector.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_projector_io_with_lora_wrapped_models(folders: dict, tmp_path) -> None:
    model, processor = _load(folders)
    peft_model = apply_stage(model, "finetune_lora", lora=TINY_LORA)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model(**_batch(processor)).loss.backward()
    optimizer.step()
    wrapper = model.model.multi_modal_projector
    trained = wrapper.modules_to_save["default"].state_dict()
    saved = load_file(save_projector(peft_model, tmp_path / "stage1.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in trained.items())
    assert not torch.equal(saved["linear_1.weight"], wrapper.original_module.linear_1.weight)

    other, _ = _load(folders)
    other = apply_stage(other, "finetune_lora", lora=TINY_LORA)
    load_projector(other, tmp_path / "stage1.safetensors")
    other_wrapper = other.get_base_model().model.multi_modal_projector
    for module in (other_wrapper.modules_to_save["default"], other_wrapper.original_module):
        assert all(torch.equal(module.state_dict()[k], v) for k, v in trained.items())


def test_load_projector_errors(folders: dict, tmp_path) -> None:
    model, _ = _load(folders)
    with pytest.raises(FileNotFoundError, match=r"projector\.safetensors"):
        load_projector(model, tmp_path)
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "projector.safetensors"))
    with pytest.raises(ValueError, match="does not fit"):
        load_projector(model, tmp_path)


def test_unknown_stage_and_double_wrapping_fail(folders: dict) -> None:
    model, _ = _load(folders)
    with pytest.raises(KeyError, match=", ".join(STAGES)):
        apply_stage(model, "stage3")
    with pytest.raises(KeyError, match="choose one of: llava"):
        apply_stage(model, "pretrain", family="minigpt7")
    peft_model = apply_stage(model, "finetune_lora", lora=TINY_LORA)
    with pytest.raises(ValueError, match="already PEFT-wrapped"):
        apply_stage(peft_model, "pretrain")


def test_parameter_summary(folders: dict) -> None:
    model, _ = _load(folders)
    apply_stage(model, "pretrain")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert parameter_summary(model) == (
        f"trainable parameters: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"
    )
