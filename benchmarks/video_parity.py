"""Does our frame path reproduce transformers' LLaVA-OneVision video processor and features?

lvlm-tune turns video frames into ``pixel_values_videos`` without torchvision
(:func:`lvlm_tune.data.video.frames_to_pixels`). ``LlavaOnevisionVideoProcessor`` needs
torchvision, so this script runs in a separate environment that has it (not the project's):

    python3 -m venv /tmp/venv-tv
    /tmp/venv-tv/bin/pip install torch torchvision transformers==<ours> pillow numpy av
    PYTHONPATH=$PWD /tmp/venv-tv/bin/python benchmarks/video_parity.py [--ours ours.pt]

On frame folders of several sizes (PNG, so decoding is exact) it reports the largest absolute
difference between our pixels and the video processor's for the same frames (default CLIP
statistics and the published checkpoint's 0.5/0.5), the same for the image processor's PIL
resize path (for reference), then, on a tiny random OneVision model (SigLIP 384/14 + Qwen2),
the video features and the logits of a whole prompt, with ``input_ids`` from our encoder
compared with ``LlavaOnevisionProcessor(text, videos)``. With PyAV it also checks that a video
file decodes to the frames transformers' PyAV loader gives at our indices.

``--save-ours FILE`` (in the project's environment, no torchvision) writes our pixels for the
same frames; ``--ours FILE`` then compares them too, so a torch version difference between
the two environments would show. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lvlm_tune.data.record import Conversation, Turn
from lvlm_tune.data.video import FrameSettings, VideoLoader, sample_indices

SIZES = [(240, 320), (384, 384), (480, 640), (97, 131), (720, 406)]  # (height, width)
TOTAL_FRAMES, NUM_FRAMES = 20, 8
TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "qwen2"


def make_frames(root: Path) -> list[str]:
    """One folder of PNG frames per size: smooth gradients, moving blobs and noise."""
    rng = np.random.default_rng(0)
    names = []
    for h, w in SIZES:
        folder = root / f"clip_{h}x{w}"
        folder.mkdir(parents=True)
        yy, xx = np.mgrid[0:h, 0:w]
        for t in range(TOTAL_FRAMES):
            base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy + 9 * t) % 256], axis=-1)
            blob = ((xx - w * t / TOTAL_FRAMES) ** 2 + (yy - h / 2) ** 2) < (min(h, w) / 5) ** 2
            base[blob] = [250, 20, 20]
            noisy = base + rng.normal(0, 12, base.shape)
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{t:04d}.png")
        names.append(folder.name)
    return names


def record(video: str) -> Conversation:
    turns = [Turn("user", "<video>\nWhat moves?"), Turn("assistant", "A red blob.")]
    return Conversation(id=video, turns=turns, videos=[video], source="parity")


def ours(root: Path, names: list[str], settings: FrameSettings) -> dict[str, torch.Tensor]:
    loader = VideoLoader(settings, root, num_frames=NUM_FRAMES)
    return {n: loader.model_inputs(record(n))["pixel_values_videos"][0] for n in names}


def sampled_frames(root: Path, name: str) -> np.ndarray:
    files = sorted((root / name).iterdir())
    picked = sample_indices(len(files), NUM_FRAMES)
    return np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in picked])


def pil_path(frames: np.ndarray, image_processor) -> torch.Tensor:
    """The image processor's own PIL resize -> rescale -> normalize, per frame."""
    out = []
    size = image_processor.size
    for frame in frames:
        x = np.moveaxis(frame, -1, 0)
        x = image_processor.resize(x, size=size, resample=image_processor.resample)
        x = image_processor.rescale(x, image_processor.rescale_factor)
        x = image_processor.normalize(x, image_processor.image_mean, image_processor.image_std)
        out.append(torch.from_numpy(np.asarray(x, dtype=np.float32)))
    return torch.stack(out)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def pixel_parity(root: Path, names: list[str], saved: dict | None) -> tuple[dict, dict]:
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionVideoProcessor

    report: dict = {}
    for label, stats in (
        ("clip_mean_std", {}),
        ("published_0.5", {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}),
    ):
        video_processor = LlavaOnevisionVideoProcessor(**stats)
        image_processor = LlavaOnevisionImageProcessorPil(**stats)
        settings = FrameSettings.of(image_processor, video_processor.to_dict())
        mine = ours(root, names, settings)
        for name in names:
            frames = sampled_frames(root, name)
            theirs = video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
            entry = report.setdefault(name, {})
            entry[f"{label}: ours vs video processor"] = max_diff(mine[name], theirs)
            entry[f"{label}: PIL image path vs video processor"] = max_diff(
                pil_path(frames, image_processor), theirs
            )
            if saved is not None and label == "clip_mean_std":
                entry["clip_mean_std: ours (project env) vs video processor"] = max_diff(
                    saved[name], theirs
                )
        if label == "clip_mean_std":
            kept = (mine, video_processor, image_processor, settings)
    return report, dict(
        zip(("ours", "video_processor", "image_processor", "settings"), kept, strict=True)
    )


def tiny_model(tokenizer):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        image_size=384, patch_size=14, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2,
    )  # fmt: skip
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )  # fmt: skip
    return LlavaOnevisionForConditionalGeneration(config).eval()


def model_parity(root: Path, name: str, kept: dict) -> dict:
    """Our ids, features and logits for video ``name`` vs the processor's on the same text."""
    from transformers import AutoTokenizer, LlavaOnevisionProcessor

    from lvlm_tune.data.encoder import ConversationEncoder
    from lvlm_tune.models.anyres import video_tokens

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    processor = LlavaOnevisionProcessor(
        image_processor=kept["image_processor"], tokenizer=tokenizer,
        video_processor=kept["video_processor"], num_image_tokens=(384 // 14) ** 2,
        vision_feature_select_strategy="full",
    )  # fmt: skip
    model = tiny_model(tokenizer)
    count = video_tokens(processor, NUM_FRAMES)
    encoder = ConversationEncoder(tokenizer, "chatml", video_tokens=count, model_max_length=4096)
    sample = record(name)
    ours_ids = encoder.encode(sample).input_ids
    text = encoder.render(sample).text
    frames = sampled_frames(root, name)
    hf = processor(text=text, videos=[frames], return_tensors="pt")
    ours_pixels = kept["ours"][name][None]
    with torch.no_grad():
        f_ours = model.get_video_features(pixel_values_videos=ours_pixels).pooler_output
        f_hf = model.get_video_features(pixel_values_videos=hf["pixel_values_videos"]).pooler_output
        l_ours = model(
            input_ids=torch.as_tensor(ours_ids)[None], pixel_values_videos=ours_pixels
        ).logits
        l_hf = model(**{k: v for k, v in hf.items() if k != "attention_mask"}).logits
    return {
        "video": name,
        "video_tokens (ours)": count,
        "video tokens in processor ids": int((hf["input_ids"] == processor.video_token_id).sum()),
        "input_ids equal": bool(torch.equal(torch.as_tensor(ours_ids), hf["input_ids"][0])),
        "video features max abs diff": max_diff(f_ours, f_hf),
        "logits max abs diff": max_diff(l_ours, l_hf),
    }


def file_parity(root: Path, name: str) -> dict:
    """A video file written with PyAV: our decoder vs transformers' PyAV loader, same indices."""
    import av
    from transformers.video_utils import load_video

    from lvlm_tune.data.video_file import decode_frames

    path = str(root / "clip.mp4")
    files = sorted((root / name).iterdir())
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=10)
        first = Image.open(files[0])
        stream.width, stream.height, stream.pix_fmt = first.width, first.height, "yuv420p"
        for f in files:
            for packet in stream.encode(av.VideoFrame.from_image(Image.open(f).convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    mine = np.stack([np.asarray(im) for im in decode_frames(path, NUM_FRAMES, None)])
    theirs, _ = load_video(
        path, backend="pyav", sample_indices_fn=lambda metadata, **_: np.asarray(
            sample_indices(metadata.total_num_frames, NUM_FRAMES)
        ),
    )  # fmt: skip
    return {
        "container": "mp4/h264",
        "frames": int(mine.shape[0]),
        "decoded frames max abs diff (uint8)": int(
            np.abs(mine.astype(int) - theirs.astype(int)).max()
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-ours", help="write our pixels (project environment) and stop")
    parser.add_argument("--ours", help="our pixels saved by --save-ours, compared as well")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_frames(root)
        if args.save_ours:
            from transformers import LlavaOnevisionImageProcessorPil

            settings = FrameSettings.of(LlavaOnevisionImageProcessorPil())
            torch.save(ours(root, names, settings), args.save_ours)
            return
        saved = torch.load(args.ours) if args.ours else None
        pixels, kept = pixel_parity(root, names, saved)
        report = {"torch": torch.__version__, "pixels": pixels}
        if TOKENIZER.is_dir():
            report["model"] = [model_parity(root, name, kept) for name in names]
        else:
            report["model"] = f"no tokenizer at {TOKENIZER}"
        try:
            import av  # noqa: F401
        except ImportError:
            report["file"] = "PyAV not installed"
        else:
            report["file"] = file_parity(root, names[0])
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
