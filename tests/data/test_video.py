"""Video samples (LLaVA-OneVision): frame folders, sampling, errors, exact labels, batches.

Pixel parity with transformers' torchvision-only video processor is checked by
``benchmarks/video_parity.py`` in an environment that has torchvision (``docs/video.md``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_tune.data.collator import MultimodalCollator
from lvlm_tune.data.dataset import SupervisedDataset
from lvlm_tune.data.encoder import IGNORE_INDEX, ConversationEncoder
from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.readers import normalize
from lvlm_tune.data.sources import open_source
from lvlm_tune.data.video import (
    VIDEO_TAG,
    FrameSettings,
    VideoLoader,
    frame_settings,
    frames_to_pixels,
    read_video_config,
    sample_indices,
    video_file_decoder,
)

QWEN2 = Path(__file__).resolve().parents[2].parent / "shared" / "tokenizers" / "qwen2"


def write_frames(folder: Path, count: int, size=(20, 28), suffix: str = ".png") -> Path:
    folder.mkdir(parents=True)
    for t in range(count):
        colour = (10 * t % 256, 255 - 10 * t % 256, 128)
        Image.new("RGB", (size[1], size[0]), colour).save(folder / f"{t:03d}{suffix}")
    return folder


def llava_sample(**extra) -> dict:
    convs = [
        {"from": "human", "value": "<video>\nWhat colour?"},
        {"from": "gpt", "value": "Red."},
    ]
    return {"id": "v1", "conversations": convs, **extra}


def test_sample_indices_evenly_spaced_first_and_last():
    assert sample_indices(10, 4) == [0, 3, 6, 9]
    assert sample_indices(32, 32) == list(range(32))
    assert sample_indices(7, 1) == [0]
    for total, n in [(100, 32), (33, 32), (1000, 7)]:
        assert sample_indices(total, n) == np.linspace(0, total - 1, n, dtype=int).tolist()
    with pytest.raises(ValueError, match="fewer than video_num_frames=5"):
        sample_indices(4, 5)


def test_reader_video_key_and_llava_image_tag_for_video():
    record = normalize(llava_sample(video="clips/a"), "llava", source="d.json", index=0)
    assert record.videos == ["clips/a"] and record.images == []
    # LLaVA video data marks the video with <image>: read as <video> when there is no image
    raw = llava_sample(videos=["a"])
    raw["conversations"][0]["value"] = "<image>\nWhat colour?"
    record = normalize(raw, "llava", source="d.json", index=0)
    assert record.turns[0].content == "<video>\nWhat colour?" and record.images == []


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (llava_sample(video=3), "video", "bad_field"),
        (llava_sample(videos=["a", ""]), "videos[1]", "bad_field"),
        (llava_sample(videos=["a", "b"]), "videos", "image_tag_mismatch"),
    ],
)
def test_reader_errors_name_field(raw, field, reason):
    with pytest.raises(BadSampleError) as err:
        normalize(raw, "llava", source="d.json", index=0)
    assert (err.value.source, err.value.sample_id, err.value.field, err.value.reason) == (
        "d.json", "v1", field, reason,
    )  # fmt: skip


def test_reader_refuses_video_tag_in_answer():
    raw = llava_sample(video="a")
    raw["conversations"][1]["value"] = "see <video>"
    with pytest.raises(BadSampleError) as err:
        normalize(raw, "llava", source="d.json", index=0)
    assert err.value.field == "conversations[1].value"


def record_for(video: str, sample_id: str = "v1"):
    return normalize(llava_sample(video=video, id=sample_id), "llava", source="d.json", index=0)


def test_folder_frames_sorted_sampled_and_reproducible(tmp_path):
    write_frames(tmp_path / "clip", 10)
    (tmp_path / "clip" / "notes.txt").write_text("not a frame")
    loader = VideoLoader(None, tmp_path, num_frames=4)
    frames = loader.frames(record_for("clip"), 0)
    colours = [f.getpixel((0, 0))[0] for f in frames]
    assert colours == [0, 30, 60, 90]  # frames 0, 3, 6, 9 in name order
    again = [f.getpixel((0, 0))[0] for f in loader.frames(record_for("clip"), 0)]
    assert again == colours


def test_video_errors(tmp_path):
    write_frames(tmp_path / "short", 3)
    (tmp_path / "empty").mkdir()
    write_frames(tmp_path / "broken", 4)
    (tmp_path / "broken" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "clip.xyz").write_bytes(b"data")
    loader = VideoLoader(None, tmp_path / "", num_frames=4)
    cases = {
        "missing": ("missing_video", "video not found"),
        "empty": ("bad_video", "no frame images"),
        "short": ("bad_video", "fewer than video_num_frames=4"),
        "broken": ("corrupt_image", "001.png"),
        "clip.xyz": ("bad_video", "expected a folder of frames"),
        "../outside": ("image_outside_folder", "outside video_folder"),
    }
    for name, (reason, words) in cases.items():
        with pytest.raises(BadSampleError) as err:
            loader.frames(record_for(name, sample_id=f"s-{name}"), 0)
        assert err.value.reason == reason, name
        assert err.value.sample_id == f"s-{name}" and err.value.field == "video", name
        assert words in str(err.value) and "d.json" in str(err.value), name


@pytest.mark.skipif(not video_file_decoder(), reason="PyAV (av) is not installed")
def test_video_file_frames(tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for t in range(9):
            frame = av.VideoFrame.from_image(Image.new("RGB", (32, 32), (25 * t, 0, 0)))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames = VideoLoader(None, tmp_path, num_frames=3).frames(record_for("clip.mp4"), 0)
    reds = [f.getpixel((16, 16))[0] for f in frames]
    assert len(frames) == 3 and abs(reds[0] - 0) < 8 and abs(reds[2] - 200) < 8


def test_frame_pixels_resize_and_normalise(tmp_path):
    settings = FrameSettings(height=16, width=16, image_mean=(0.5,) * 3, image_std=(0.25,) * 3)
    flat = Image.new("RGB", (40, 24), (51, 102, 204))
    pixels = frames_to_pixels([flat, flat], settings)
    assert pixels.shape == (2, 3, 16, 16) and pixels.dtype == torch.float32
    expected = (torch.tensor([51, 102, 204]) / 255 - 0.5) / 0.25  # a flat frame stays flat
    assert torch.allclose(pixels[:, :, 5, 7], expected.expand(2, 3), atol=1e-6)
    # the checkpoint's video settings override the image processor's
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "size": {"height": 8, "width": 8}})
    )
    image_processor = type("P", (), {"size": {"height": 16, "width": 16}, "resample": 3,
                                     "do_resize": True, "do_rescale": True, "do_normalize": True,
                                     "rescale_factor": 1 / 255, "image_mean": [0.5] * 3,
                                     "image_std": [0.5] * 3})()  # fmt: skip
    read = FrameSettings.of(image_processor, read_video_config(tmp_path))
    assert (read.height, read.image_mean, read.image_std) == (8, (0.1, 0.2, 0.3), (0.5,) * 3)
    # frame_settings: the same from a folder; the image processor's alone without its config
    assert frame_settings(image_processor, tmp_path) == read
    for folder in (None, tmp_path / "no-such-folder"):
        alone = frame_settings(image_processor, folder)
        assert alone == FrameSettings.of(image_processor)
        assert (alone.height, alone.image_mean) == (16, (0.5,) * 3)


# ---- with a tokenizer and a tiny OneVision model ---------------------------------------------


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    from transformers import LlavaOnevisionForConditionalGeneration

    from lvlm_tune.models.anyres_processors import load_anyres_processor
    from lvlm_tune.testing.tiny_anyres import write_tiny_llava_onevision

    folder = write_tiny_llava_onevision(tmp_path_factory.mktemp("ov") / "model")
    processor = load_anyres_processor(folder)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder).eval()
    return folder, processor, model


def video_count(processor, frames: int) -> int:
    from lvlm_tune.models.anyres import video_tokens

    return video_tokens(processor, frames)


def test_video_tokens_match_model_features(onevision, tmp_path):
    folder, processor, model = onevision
    count = video_count(processor, 5)
    side = math.ceil(math.isqrt(processor.num_image_tokens) / 2)
    assert count == 5 * side * side + 1
    write_frames(tmp_path / "clip", 5)
    settings = frame_settings(processor.image_processor, folder)
    pixels = VideoLoader(settings, tmp_path, num_frames=5).model_inputs(record_for("clip"))
    assert pixels["pixel_values_videos"].shape == (1, 5, 3, 32, 32)
    with torch.no_grad():
        features = model.get_video_features(**pixels).pooler_output
    assert features.shape[1] == count


def qwen2_encoder(**kw):
    if not QWEN2.is_dir():
        pytest.skip(f"the shared Qwen2 tokenizer is not at {QWEN2}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QWEN2)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", VIDEO_TAG]})
    return tokenizer, ConversationEncoder(tokenizer, "chatml", **kw)


def two_turn(video_turn: int, position: str = "keep"):
    convs = [
        {"from": "human", "value": "Describe it."},
        {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "And then?"},
        {"from": "gpt", "value": "It turns red."},
    ]
    convs[2 * video_turn]["value"] = VIDEO_TAG + "\n" + convs[2 * video_turn]["value"]
    return normalize(
        {"id": "t", "video": "clip", "conversations": convs}, "llava", source="d.json", index=0
    )


@pytest.mark.parametrize("position", ["before", "after", "keep"])
def test_exact_labels_and_processor_expansion_qwen2(onevision, position):
    _, processor, _ = onevision
    count = video_count(processor, 4)
    tokenizer, encoder = qwen2_encoder(video_tokens=count, image_position=position)
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_TAG)
    for turn in (0, 1):
        record = two_turn(turn)
        sample = encoder.encode(record)
        assert sample.num_videos == 1
        ids = sample.input_ids
        runs = np.flatnonzero(ids == video_id)
        assert len(runs) == count and runs[-1] - runs[0] == count - 1  # one whole run
        assert (sample.labels[runs] == IGNORE_INDEX).all()
        trained = tokenizer.decode(ids[sample.labels != IGNORE_INDEX])
        assert trained == "A square.<|im_end|>It turns red.<|im_end|>"
        # the processor's own expansion of the same text (its count, one run per <video>)
        text = encoder.render(record).text
        plain = tokenizer(text)["input_ids"]
        expected = processor._get_num_multimodal_tokens(video_sizes=[(4, 32, 32)])
        expanded = [
            t
            for x in plain
            for t in [x] * (expected["num_video_tokens"][0] if x == video_id else 1)
        ]
        assert ids.tolist() == expanded


def test_truncation_drops_video_with_its_turn(onevision):
    _, processor, _ = onevision
    count = video_count(processor, 4)
    tokenizer, encoder = qwen2_encoder(video_tokens=count)
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_TAG)
    full = encoder.encode(two_turn(1))
    first_end = int(np.flatnonzero(full.input_ids == video_id)[0]) + 2  # inside the run
    _, short = qwen2_encoder(video_tokens=count, model_max_length=first_end)
    cut = short.encode(two_turn(1))
    assert cut.truncated and cut.num_videos == 0 and video_id not in cut.input_ids
    assert cut.input_ids.tolist() == full.input_ids[: len(cut.input_ids)].tolist()
    assert tokenizer.decode(cut.input_ids[cut.labels != IGNORE_INDEX]) == "A square.<|im_end|>"
    _, tiny = qwen2_encoder(video_tokens=count, model_max_length=count)
    with pytest.raises(BadSampleError) as err:
        tiny.encode(two_turn(0))
    assert err.value.reason == "no_trained_tokens"


def test_video_sample_refused_without_video_support(onevision):
    _, encoder = qwen2_encoder()
    with pytest.raises(BadSampleError, match="takes no videos"):
        encoder.encode(two_turn(0))


def test_dataset_collator_and_training_step(onevision, tmp_path):
    from lvlm_tune.data.collator import pad_token_id

    folder, processor, model = onevision
    frames = 3
    for name, colour in (("red", (250, 10, 10)), ("blue", (10, 10, 250))):
        (tmp_path / name).mkdir()
        for t in range(frames + 2):
            Image.new("RGB", (40, 30), colour).save(tmp_path / name / f"{t}.jpg")
    data = [
        {"id": "a", "video": "red", "conversations": [
            {"from": "human", "value": "<video>\nColour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "b", "video": "blue", "conversations": [
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "blue"}]},
    ]  # fmt: skip
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    count = video_count(processor, frames)
    encoder = ConversationEncoder(processor.tokenizer, "tokenizer", video_tokens=count,
                                  num_image_tokens=processor.num_image_tokens)  # fmt: skip
    settings = frame_settings(processor.image_processor, folder)
    dataset = SupervisedDataset(
        open_source(str(path), cache_dir=str(tmp_path / "cache")), encoder,
        ImageLoader(processor.image_processor),
        videos=VideoLoader(settings, tmp_path, num_frames=frames),
    )  # fmt: skip
    items = [dataset[0], dataset[1]]
    assert items[0]["pixel_values_videos"].shape == (1, frames, 3, 32, 32)
    batch = MultimodalCollator(pad_token_id(processor.tokenizer))(items)
    assert batch["pixel_values_videos"].shape == (2, frames, 3, 32, 32)
    assert int((batch["input_ids"] == model.config.video_token_id).sum()) == 2 * count
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.model.vision_tower.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0  # the frames reach the loss
    model.zero_grad()
    model.eval()
