"""Packed batches train every sample exactly as alone: per-sample loss and gradients, no
attention across a boundary (and the combinations that would attend across are refused), the
anyres families, a whole run with packing resumed mid-epoch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import StopAt, minigpt4_recipe, parse, tiny_recipe
from test_llava_next_training import anyres_data, anyres_models, anyres_recipe  # noqa: F401
from test_onevision_video_training import video_run  # noqa: F401

from lvlm_tune.data.collator import pad_token_id
from lvlm_tune.data.packed_collator import PACKED_SAMPLES, PackedCollator
from lvlm_tune.errors import UserError
from lvlm_tune.models.registry import get_model_family
from lvlm_tune.training.packing import packing_plan
from lvlm_tune.training.pipeline import build_dataset, build_model, run, video_inputs
from lvlm_tune.training.recipe import parse_recipe


def _build(recipe, tmp_path):
    args = parse(recipe, tmp_path)
    torch.manual_seed(0)
    model, processor, family = build_model(*args)
    videos = video_inputs(family, processor, args[0], args[1])  # as run() does; None: no video
    tokens = family.image_tokens(model, processor)
    dataset = build_dataset(args[1], processor, tokens, 0, videos=videos)
    return model.float(), processor, dataset, args


def _inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("labels", PACKED_SAMPLES)}


def _token_losses(logits, labels):
    """Per-position next-token cross-entropy (0 where the label is -100), summed per row."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="none"
    ).view(labels.shape[0], -1)


def _alone(model, item):
    inputs = {"input_ids": torch.as_tensor(item["input_ids"])[None]}
    for key in ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos"):
        if item.get(key) is not None:
            inputs[key] = item[key]
    labels = torch.as_tensor(item["labels"])[None]
    return _token_losses(model(**inputs).logits, labels).sum()


def _check_packed_equals_alone(model, items, packs, pad_id):
    """Per-sample loss of a packed batch vs. each sample alone, and the gradients of the sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    batch = PackedCollator(pad_id)([[items[i] for i in pack] for pack in packs])
    per_token = _token_losses(model(**_inputs(batch)).logits, batch["labels"])
    packed_grads = torch.autograd.grad(per_token.sum(), params, retain_graph=True)
    alone_total = 0.0
    for row, pack in enumerate(packs):
        at = 0
        for i in pack:
            n = len(items[i]["input_ids"])
            mine = per_token[row, at : at + n - 1].sum()  # the sample's own predictions only
            alone = _alone(model, items[i])
            assert torch.allclose(mine, alone, rtol=1e-5, atol=1e-6), (i, mine, alone)
            alone_total = alone_total + alone
            at += n
        assert per_token[row, at - 1 :].sum() == 0  # boundary into padding: nothing trained
    alone_grads = torch.autograd.grad(alone_total, params)
    for got, want in zip(packed_grads, alone_grads, strict=True):
        scale = want.abs().max().clamp(min=1e-8)
        assert (got - want).abs().max() / scale <= 1e-4


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_llava_batch_trains_each_sample_as_alone(
    tmp_path, tiny_parts, tiny_data, attention
):
    recipe = tiny_recipe(tiny_parts, tiny_data, tmp_path / "o", attn_implementation=attention)
    model, processor, dataset, _ = _build(recipe, tmp_path)
    items = [dataset[i] for i in range(8)]  # 3, 7: text-only
    assert any(it["pixel_values"] is None for it in items[:4])
    _check_packed_equals_alone(
        model, items, [[0, 1, 3, 2], [4, 7, 5]], pad_token_id(processor.tokenizer)
    )


def test_attention_never_crosses_a_boundary_and_would_without_the_packed_mask(
    tmp_path, tiny_parts, tiny_data
):
    model, _, dataset, _ = _build(tiny_recipe(tiny_parts, tiny_data, tmp_path / "o"), tmp_path)
    a, b = dataset[0], dataset[1]
    batch = PackedCollator(0)([[a, b]])
    n = len(a["input_ids"])
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    image_id = dataset.encoder.image_token_id
    text = (changed["input_ids"][0, :n] != image_id).nonzero().flatten()[1:]
    changed["input_ids"][0, text] = (changed["input_ids"][0, text] + 7) % 300
    with torch.no_grad():
        base = model(**_inputs(batch)).logits[0, n:]
        moved = model(**_inputs(changed)).logits[0, n:]
        assert torch.equal(base, moved)  # sample B sees nothing of sample A
        # the same rows with a cache (use_cache on) or a 2-D mask: B would attend to A
        for extra in ({"use_cache": True}, {"attention_mask": torch.ones_like(batch["input_ids"])}):
            leak = model(**{**_inputs(batch), **extra}).logits[0, n:]
            leak2 = model(**{**_inputs(changed), **extra}).logits[0, n:]
            assert (leak - leak2).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_a_packed_anyres_batch_trains_each_sample_as_alone(
    tmp_path,
    anyres_models,  # noqa: F811 (the fixture imported above)
    anyres_data,  # noqa: F811
    family,
):
    recipe = anyres_recipe(anyres_models, anyres_data, tmp_path / "o", family)
    model, processor, dataset, _ = _build(recipe, tmp_path)
    items = [dataset[i] for i in range(6)]  # text-only, one image, two images (sizes differ)
    assert items[2]["pixel_values"].shape[0] == 2
    _check_packed_equals_alone(
        model, items, [[1, 0, 2], [5, 3, 4]], pad_token_id(processor.tokenizer)
    )


def test_a_packed_onevision_batch_of_videos_and_images_trains_each_sample_as_alone(
    tmp_path,
    video_run,  # noqa: F811 (the fixture imported above)
):
    model, processor, dataset, _ = _build(
        {**video_run, "output_dir": str(tmp_path / "o")}, tmp_path
    )
    items = [dataset[i] for i in range(3)]  # video, image, video
    assert items[0].get("pixel_values_videos") is not None and items[1]["pixel_values"] is not None
    pad = pad_token_id(processor.tokenizer)
    _check_packed_equals_alone(model, items, [[0, 1], [2]], pad)
    _check_packed_equals_alone(model, items, [[1, 2, 0]], pad)


def test_combinations_that_would_attend_across_samples_are_refused(
    tmp_path, tiny_parts, tiny_data, tiny_blip2
):
    recipe = tiny_recipe(tiny_parts, tiny_data, tmp_path / "o", packing=True)
    model, _, _, (_, data_args, train_args) = _build(recipe, tmp_path)
    llava = get_model_family("llava")
    plan = packing_plan(data_args, train_args, llava, model, [])
    assert plan.max_length == data_args.model_max_length and not plan.one_row
    model.config.get_text_config()._attn_implementation = "flex_attention"
    with pytest.raises(UserError, match="attn_implementation: 'flex_attention'"):
        packing_plan(data_args, train_args, llava, model, [])
    model.config.get_text_config()._attn_implementation = "flash_attention_2"
    assert packing_plan(data_args, train_args, llava, model, []).one_row
    with pytest.raises(UserError, match="packing: not with the minigpt5"):
        packing_plan(data_args, train_args, llava, model, ["minigpt5"])
    train_args.group_by_modality_length = True
    with pytest.raises(UserError, match="group_by_modality_length"):
        packing_plan(data_args, train_args, llava, model, [])
    with pytest.raises(UserError, match="packing_max_length: 8 is below"):
        parse({**recipe, "packing_max_length": 8}, tmp_path, "short.yaml")
    # MiniGPT-4: refused, and rightly: its forward puts a 2-D all-ones mask back
    mg = minigpt4_recipe(tiny_parts, tiny_blip2, tiny_data, tmp_path / "m", packing=True)
    model, _, dataset, (_, data_args, train_args) = _build(mg, tmp_path)
    with pytest.raises(UserError, match="packing: not with family minigpt4"):
        packing_plan(data_args, train_args, get_model_family("minigpt4"), model, [])
    a, b = dataset[0], dataset[2]
    batch = PackedCollator(0)([[a, b]])
    n = len(a["input_ids"])
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, n - 3] = (changed["input_ids"][0, n - 3] + 5) % 300
    with torch.no_grad():
        leak = model(**_inputs(batch)).logits[0, n:] - model(**_inputs(changed)).logits[0, n:]
    assert leak.abs().max() > 1e-4


def _packed_recipe(tiny_parts, tiny_data, out, **overrides):
    return tiny_recipe(
        tiny_parts, tiny_data, out, stage="finetune", packing=True, model_max_length=256,
        packing_max_length=384, per_device_train_batch_size=2, max_steps=6,
        save_strategy="steps", save_steps=1, **overrides,
    )  # fmt: skip


@pytest.mark.slow
def test_a_packed_run_trains_and_resumes_mid_epoch_with_the_same_losses(
    tmp_path, tiny_parts, tiny_data
):
    def train(name, resume=None, callbacks=None):
        recipe = _packed_recipe(tiny_parts, tiny_data, tmp_path / name)
        recipe["resume_from_checkpoint"] = resume
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        trainer = run(*parse_recipe(tmp_path / f"{name}.yaml"), callbacks=callbacks)
        return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    trainer, reference = train("full")
    per_epoch = len(trainer.get_train_dataloader())
    assert 2 <= per_epoch <= 4  # the 6 steps cross an epoch boundary
    assert isinstance(trainer.data_collator, PackedCollator) and trainer.logits_at_labels
    train("cut", callbacks=[StopAt(per_epoch + 1)])  # stopped in the middle of epoch 2
    _, resumed = train("cut", resume=True)
    assert len(resumed) == 6 and resumed == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_a_packed_onevision_run_with_videos_trains(
    tmp_path,
    video_run,  # noqa: F811
):
    recipe = {**video_run, "output_dir": str(tmp_path / "o"), "packing": True,
              "per_device_train_batch_size": 1, "max_steps": 3}  # fmt: skip
    (tmp_path / "ov.yaml").write_text(yaml.safe_dump(recipe))
    trainer = run(*parse_recipe(tmp_path / "ov.yaml"))
    assert isinstance(trainer.data_collator, PackedCollator) and trainer.logits_at_labels
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "o" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_zero_two_processes_with_packing_match_one_process(tmp_path, tiny_parts, tiny_data, zero):
    import sys

    from dist_launch import finish, losses, module, start, torchrun, worker, write_recipe

    common = {"stage": "finetune", "packing": True, "model_max_length": 256,
              "packing_max_length": 384, "max_steps": 2}  # fmt: skip
    two = write_recipe(
        tmp_path / "two", tiny_parts, tiny_data, deepspeed=f"ds_configs/{zero}.json",
        per_device_train_batch_size=1, **common,
    )  # fmt: skip
    one = write_recipe(
        tmp_path / "one", tiny_parts, tiny_data, per_device_train_batch_size=2, **common
    )
    finish([start(torchrun(worker(two)), tmp_path / "two")], tmp_path / "two")
    finish([start([sys.executable, *module(one)], tmp_path / "one")], tmp_path / "one")
    got, want = losses(tmp_path / "two" / "out"), losses(tmp_path / "one" / "out")
    assert len(got) == len(want) == 2
    assert got == pytest.approx(want, rel=1e-3)
