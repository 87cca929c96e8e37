"""Video at inference (LLaVA-OneVision): eval and chat process frames with the frame settings
training used (the checkpoint's saved video processor, kept through training and merging), and
a chat turn may attach a video (a frame folder; a file where PyAV is installed)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from lvlm_tune.data.record import Conversation, Turn
from lvlm_tune.data.video import frame_settings
from lvlm_tune.inference.export import merge
from lvlm_tune.inference.load import load_run
from lvlm_tune.testing.tiny_anyres import write_tiny_llava_onevision
from lvlm_tune.training.pipeline import build_model, run, video_inputs
from lvlm_tune.training.recipe import parse_recipe

FRAMES = 3
# A saved video processor that differs from the image processor's settings (bilinear, other
# mean/std), as a checkpoint may ship it; the size stays the tower's.
VIDEO_CONFIG = {"resample": 2, "image_mean": [0.2, 0.4, 0.6], "image_std": [0.3, 0.25, 0.2]}


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
    """A tiny OneVision whose saved video config differs from its image processor, frame
    folders, a data file with a video and an image sample, and a 1-step LoRA run on it."""
    root = tmp_path_factory.mktemp("ov_video_inference")
    base = write_tiny_llava_onevision(root / "base")
    path = base / "video_preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **VIDEO_CONFIG}))
    media = root / "media"
    for v in range(2):
        (media / f"clip{v}").mkdir(parents=True)
        for f in range(5):
            colour = (40 * f, 90 * v + 20, 200 - 30 * f)
            Image.new("RGB", (40, 30), colour).save(media / f"clip{v}" / f"{f:03d}.png")
    Image.new("RGB", (50, 20), (200, 10, 10)).save(media / "im.png")
    rows = [
        {"id": "v0", "video": "clip0", "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "fades"}]},
        {"id": "i0", "image": "im.png", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]},
    ]  # fmt: skip
    (root / "data.json").write_text(json.dumps(rows))
    recipe = {
        "family": "llava_onevision", "model_name_or_path": str(base), "stage": "finetune_lora",
        "template": "chatml", "image_position": "keep", "lora_r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "data_path": str(root / "data.json"), "image_folder": str(media),
        "video_num_frames": FRAMES, "output_dir": str(root / "lora"),
        "per_device_train_batch_size": 2, "max_steps": 1, "learning_rate": 1e-2,
        "save_strategy": "no", "report_to": "none", "use_cpu": True,
        "dataloader_num_workers": 0, "seed": 7, "disable_tqdm": True,
    }  # fmt: skip
    (root / "lora.yaml").write_text(yaml.safe_dump(recipe))
    args = parse_recipe(root / "lora.yaml")
    run(*args)
    return {"root": root, "base": base, "media": media, "args": args, "run": root / "lora"}


def video_record(ov, name="clip0"):
    return Conversation("v", [Turn("user", "<video>\nWhat happens?")], videos=[name])


def test_frame_settings_read_the_folders_video_config_over_the_image_processor(ov):
    _, processor, _ = build_model(*ov["args"])
    saved = frame_settings(processor.image_processor, ov["base"])
    default = frame_settings(processor.image_processor)
    assert (saved.resample, saved.image_mean, saved.image_std) == (
        2,
        (0.2, 0.4, 0.6),
        (0.3, 0.25, 0.2),
    )
    assert (default.resample, default.image_mean) == (
        3,
        tuple(processor.image_processor.image_mean),
    )
    assert (saved.height, saved.width) == (default.height, default.width)


def test_eval_and_merged_folders_process_frames_as_training_did(ov):
    model_args, data_args, train_args = ov["args"]
    _, processor, family = build_model(model_args, data_args, train_args)
    _, train_videos = video_inputs(family, processor, model_args, data_args)
    record = video_record(ov)
    trained = train_videos.model_inputs(record)["pixel_values_videos"]
    assert trained.shape[:2] == (1, FRAMES)
    # the default settings give other pixels: the check below can tell them apart
    other = frame_settings(processor.image_processor)
    assert other != train_videos.settings
    merged = merge(ov["run"], ov["root"] / "merged")
    for folder in (ov["run"], merged):
        loaded = load_run(folder)
        videos = loaded.videos(ov["media"])
        assert videos.settings == train_videos.settings, folder
        assert torch.equal(videos.model_inputs(record)["pixel_values_videos"], trained), folder
