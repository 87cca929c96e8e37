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


@pytest.fixture(scope="module")
def loaded(ov):
    return load_run(ov["run"])


def test_chat_attaches_a_frame_folder_and_answers_as_the_answerer(ov, loaded):
    from lvlm_tune.inference.answer import Answerer
    from lvlm_tune.inference.chat import ChatSession

    session = ChatSession(loaded)
    clip = str(ov["media"] / "clip0")
    answer = session.ask("What happens?", video=clip, max_new_tokens=4)
    assert session.turns[0].content == "<video>\nWhat happens?"  # before, as training placed it
    assert session.video_paths == [clip]
    # the same prompt, frames and answer as the answerer on the record with the frame folder
    videos = loaded.videos(ov["media"])
    answerer = Answerer(loaded.model, loaded.processor, loaded.encoder(), loaded.images(),
                        videos=videos)  # fmt: skip
    record = video_record(ov)
    assert answer == answerer.answer([record], max_new_tokens=4)[0]
    inputs, _ = session.answerer.model_inputs([asked(session, 1)])
    expected, _ = answerer.model_inputs([record])
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.equal(inputs["pixel_values_videos"], expected["pixel_values_videos"])
    video_id = loaded.processor.tokenizer.convert_tokens_to_ids("<video>")
    count = loaded.family.video_tokens(loaded.processor, FRAMES)
    assert int((expected["input_ids"] == video_id).sum()) == count
    # a later turn attaches another video, at its own tag; both are the model's inputs
    session.ask("And here? <video>", video=str(ov["media"] / "clip1"), max_new_tokens=2)
    assert session.turns[2].content == "And here? <video>" and len(session.video_paths) == 2
    inputs, _ = session.answerer.model_inputs([asked(session, 3)])
    assert inputs["pixel_values_videos"].shape[:2] == (2, FRAMES)
    assert int((inputs["input_ids"] == video_id).sum()) == 2 * count


def asked(session, turns):
    """The record of the session's first ``turns`` turns and the videos they attach."""
    head = session.turns[:turns]
    count = sum(t.content.count("<video>") for t in head)
    return Conversation("chat", head, session.image_paths, videos=session.video_paths[:count])


def test_chat_refuses_videos_it_cannot_read_and_keeps_the_conversation(ov, loaded, tmp_path):
    from lvlm_tune.data.video import video_file_decoder
    from lvlm_tune.errors import UserError
    from lvlm_tune.inference.chat import ChatSession

    session = ChatSession(loaded)
    few = tmp_path / "few"
    few.mkdir()
    Image.new("RGB", (8, 8)).save(few / "0.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 16)
    cases = {
        str(few): r"1 frame\(s\), fewer than the run's video_num_frames=3",
        str(empty): "no frame images",
        str(tmp_path / "notes.txt"): "not a video; give a folder of frames",
        str(tmp_path / "missing"): "no video at",
    }
    if not video_file_decoder():
        cases[str(tmp_path / "clip.mp4")] = (
            r"video files need PyAV.*pip install av.*folder of frames"
        )
    for path, message in cases.items():
        with pytest.raises(UserError, match=message):
            session.ask("What happens?", video=path)
        assert session.turns == [] and session.video_paths == []
    with pytest.raises(UserError, match=r"1 <video> tag\(s\) for 0 attached video"):
        session.ask("What is <video>?")


def test_chat_command_takes_a_video(ov, capsys, tmp_path):
    from lvlm_tune.commands.chat import main as chat_main
    from lvlm_tune.commands.chat import repl
    from lvlm_tune.inference.chat import ChatSession

    clip = str(ov["media"] / "clip0")
    argv = ["--model", str(ov["run"]), "--max-new-tokens", "3"]
    assert chat_main([*argv, "--video", clip, "--prompt", "What happens?"]) == 0
    printed = capsys.readouterr().out.strip()
    session = ChatSession(load_run(ov["run"]))
    assert printed == session.ask("What happens?", video=clip, max_new_tokens=3)
    # before the model loads: a path that is no video
    assert chat_main([*argv, "--video", str(tmp_path / "none"), "--prompt", "Hi"]) != 0
    assert "no video at" in capsys.readouterr().err
    import argparse

    session.reset()
    args = argparse.Namespace(image=None, video=None, max_new_tokens=2, temperature=0.0)
    repl(session, args, [f"/video {tmp_path / 'none'}", f"/video {clip}", "What happens?"])
    captured = capsys.readouterr()
    assert "no video at" in captured.err and captured.out.count("ASSISTANT: ") == 1
    assert session.video_paths == [clip] and session.turns[0].content.startswith("<video>")
