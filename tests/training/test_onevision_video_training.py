"""``lvlm-tune train`` and ``eval`` on OneVision with video samples: a frame folder sampled to
the recipe's ``video_num_frames``, expanded to the processor's video token count, trained next
to image samples, with frozen parameters bit-identical and trainable ones changed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import parse, train_and_compare
from PIL import Image

from lvlm_tune.data.collator import MultimodalCollator, pad_token_id
from lvlm_tune.inference.evaluate import evaluate
from lvlm_tune.models.anyres import video_tokens
from lvlm_tune.models.registry import get_model_family
from lvlm_tune.testing.tiny_anyres import write_tiny_llava_onevision
from lvlm_tune.training.pipeline import build_dataset, build_model, run, video_inputs

FRAMES = 3


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ov_video")
    model = write_tiny_llava_onevision(root / "ov")
    for v in range(2):
        folder = root / "media" / f"clip{v}"
        folder.mkdir(parents=True)
        for f in range(7):
            Image.new("RGB", (40 + 8 * v, 30), (30 * f, 100 * v, 60)).save(folder / f"{f:03d}.png")
    Image.new("RGB", (50, 20), (200, 10, 10)).save(root / "media" / "im.png")
    samples = [
        {"id": "v0", "video": "clip0", "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "it fades"},
        ]},
        {"id": "i0", "image": "im.png", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"},
        ]},
        {"id": "v1", "video": "clip1", "conversations": [
            {"from": "human", "value": "Describe it. <video>"}, {"from": "gpt", "value": "green"},
        ]},
    ]  # fmt: skip
    (root / "train.json").write_text(json.dumps(samples))
    return {
        "family": "llava_onevision",
        "model_name_or_path": str(model),
        "data_path": str(root / "train.json"),
        "image_folder": str(root / "media"),
        "video_num_frames": FRAMES,
        "template": "chatml",
        "image_position": "keep",
        "stage": "finetune",
        "output_dir": str(root / "out"),
        "per_device_train_batch_size": 3,
        "max_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-2,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": 3,
        "disable_tqdm": True,
    }


def test_video_samples_become_the_processors_video_tokens_and_frames(tmp_path, video_run):
    model_args, data_args, train_args = parse(video_run, tmp_path)
    model, processor, family = build_model(model_args, data_args, train_args)
    assert family is get_model_family("llava_onevision")
    videos = video_inputs(family, processor, model_args, data_args)
    assert videos is not None and videos[0] == video_tokens(processor, FRAMES)
    dataset = build_dataset(
        data_args, processor, family.image_tokens(model, processor), 0, videos=videos
    )
    batch = MultimodalCollator(pad_token_id(processor.tokenizer))([dataset[i] for i in range(3)])
    video_id = processor.tokenizer.convert_tokens_to_ids("<video>")
    assert (batch["input_ids"] == video_id).sum() == 2 * videos[0]
    assert batch["pixel_values_videos"].shape[:2] == (2, FRAMES)
    assert not (batch["labels"][batch["input_ids"] == video_id] != -100).any()
    out = model(**{k: v for k, v in batch.items() if k != "id"})
    assert torch.isfinite(out.loss)


def test_video_families_only(tmp_path, video_run):
    args = parse({**video_run, "family": "llava_next"}, tmp_path)
    assert video_inputs(get_model_family("llava_next"), None, args[0], args[1]) is None


@pytest.mark.slow
def test_train_with_video_samples_changes_exactly_the_trainable_parameters(tmp_path, video_run):
    trainer, trainable = train_and_compare(tmp_path, {**video_run, "output_dir": str(tmp_path)})
    assert any(n.startswith("model.language_model") for n in trainable)
    assert all(
        torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e
    )


@pytest.mark.slow
def test_eval_of_a_video_run_answers_and_scores_its_video_samples(tmp_path, video_run):
    recipe = {**video_run, "output_dir": str(tmp_path / "run"), "save_strategy": "no"}
    run(*parse(recipe, tmp_path))
    report = evaluate(
        str(tmp_path / "run"), video_run["data_path"], image_folder=video_run["image_folder"],
        batch_size=3, max_new_tokens=4,
    )  # fmt: skip
    assert report["metrics"]["loss"] is not None and torch.isfinite(
        torch.tensor(report["metrics"]["loss"])
    )
    assert {s["id"] for s in report["samples"]} == {"v0", "i0", "v1"}
