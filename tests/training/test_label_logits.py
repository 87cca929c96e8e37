"""Logits only where labels train: the loss and the gradients equal the full-logits ones (padded
and packed batches, LLaVA and MiniGPT-4), through the trainer too; liger and label smoothing
keep the model's own loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import minigpt4_recipe, parse, tiny_recipe

from lvlm_tune.data.collator import MultimodalCollator
from lvlm_tune.data.packed_collator import PACKED_SAMPLES, PackedCollator
from lvlm_tune.training.label_logits import loss_at_labels, trained_positions, use_label_logits
from lvlm_tune.training.pipeline import build_dataset, build_model, run


def _model_and_items(recipe, tmp_path, n=6):
    args = parse(recipe, tmp_path)
    torch.manual_seed(0)
    model, processor, family = build_model(*args)
    dataset = build_dataset(args[1], processor, family.image_tokens(model, processor), 0)
    return model, [dataset[i] for i in range(n)]


def _compare(model, batch, num_items=None):
    """(full loss, loss at labels, max relative gradient difference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = {k: v for k, v in batch.items() if k != PACKED_SAMPLES}
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    full = model(**inputs, **extra).loss
    full_grads = torch.autograd.grad(full, params)
    labels = inputs.pop("labels")
    outputs = model(**inputs, logits_to_keep=trained_positions(labels))
    assert outputs.logits.shape[0] == int((labels[:, 1:] != -100).sum())  # only trained rows
    kept = loss_at_labels(outputs, labels, num_items)
    kept_grads = torch.autograd.grad(kept, params)
    worst = max(
        float((a - b).abs().max() / b.abs().max().clamp(min=1e-8))
        for a, b in zip(kept_grads, full_grads, strict=True)
    )
    return full, kept, worst


@pytest.mark.parametrize("packed", [False, True])
def test_llava_loss_and_gradients_at_labels_equal_the_full_logits_ones(
    tmp_path, tiny_parts, tiny_data, packed
):
    model, items = _model_and_items(tiny_recipe(tiny_parts, tiny_data, tmp_path / "o"), tmp_path)
    batch = PackedCollator(0)([items[:3], items[3:]]) if packed else MultimodalCollator(0)(items)
    for num_items in (None, torch.tensor(57)):  # the Trainer's count over accumulated batches
        full, kept, worst = _compare(model, batch, num_items)
        assert torch.allclose(full, kept, rtol=1e-6, atol=0), (full, kept)
        assert worst <= 1e-5


def test_minigpt4_loss_at_labels_equals_the_full_logits_one(
    tmp_path, tiny_parts, tiny_data, tiny_blip2
):
    recipe = minigpt4_recipe(tiny_parts, tiny_blip2, tiny_data, tmp_path / "m", stage="finetune")
    model, items = _model_and_items(recipe, tmp_path, n=3)
    items = [it for it in items if it["pixel_values"] is not None]
    full, kept, worst = _compare(model, MultimodalCollator(0)(items))
    assert torch.allclose(full, kept, rtol=1e-6, atol=0) and worst <= 1e-5


def test_a_model_that_ignores_the_mask_is_named_and_liger_keeps_its_own_loss():
    labels = torch.tensor([[-100, 5, 6, -100]])
    assert trained_positions(labels).tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="logits_at_labels: false"):
        loss_at_labels({"logits": torch.zeros(1, 4, 9)}, labels)
    args = SimpleNamespace(use_liger_kernel=False, label_smoothing_factor=0.0)
    assert use_label_logits(True, args) and not use_label_logits(False, args)
    assert not use_label_logits(True, args, family_supports=False)
    assert not use_label_logits(True, SimpleNamespace(use_liger_kernel=True))
    assert not use_label_logits(True, SimpleNamespace(label_smoothing_factor=0.1))


@pytest.mark.slow
def test_a_run_at_labels_logs_the_losses_of_a_full_logits_run(tmp_path, tiny_parts, tiny_data):
    def losses(name, on):
        recipe = tiny_recipe(
            tiny_parts, tiny_data, tmp_path / name, stage="finetune", max_steps=3,
            gradient_accumulation_steps=2, logits_at_labels=on,
        )  # fmt: skip
        trainer = run(*parse(recipe, tmp_path, f"{name}.yaml"))
        assert trainer.logits_at_labels is on
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    assert losses("labels", True) == pytest.approx(losses("full", False), rel=1e-5)
