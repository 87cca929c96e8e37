"""Image checks: every decoding problem is a bad sample naming file, sample and field; huge
images are refused from their header before decoding; paths stay inside image_folder."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huge_png import write_huge_png
from PIL import Image, ImageFile

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageLoader
from lvlm_tune.data.record import Conversation, Turn


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (24, 16), (10, 200, 30)).save(folder / "ok.png")
    Image.new("RGB", (24, 16), (10, 200, 30)).save(folder / "sub" / "deep.png")
    Image.new("RGB", (24, 16), (200, 0, 0)).save(root / "outside.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.png").write_bytes(b"this is not an image at all")
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, format="PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    write_huge_png(folder / "100mp.png", 10000, 10000)  # over the default limit
    write_huge_png(folder / "200mp.png", 20000, 10000, pixels=False)  # PIL's bomb error
    os.symlink(root / "outside.png", folder / "link_out.png")
    os.symlink(folder / "ok.png", folder / "link_in.png")
    return {"root": root, "folder": folder}


def conv(*images, gen=()):
    extra = {"gen_images": list(gen), "gen_captions": [None] * len(gen)} if gen else {}
    turns = [Turn("user", "<image>" * len(images) + "hi"), Turn("assistant", "ok")]
    return Conversation(
        id="s7", turns=turns, images=list(images), source="d.json", index=7, extra=extra
    )


def refusal(loader, ref, **kwargs):
    with pytest.raises(BadSampleError) as caught:
        loader.load(conv(ref), **kwargs)
    return caught.value


@pytest.mark.parametrize(
    ("name", "reason", "problem"),
    [
        ("missing.png", "missing_image", "image file not found"),
        ("empty.png", "corrupt_image", r"image file is empty \(0 bytes\)"),
        ("garbage.png", "corrupt_image", "cannot decode image .*UnidentifiedImageError"),
        ("truncated.png", "corrupt_image", "cannot decode image .*truncated.png"),
        ("truncated.jpg", "corrupt_image", "cannot decode image .*truncated"),
        ("100mp.png", "image_too_large", "10000x10000 = 100,000,000 pixels, more than"),
        ("200mp.png", "image_too_large", "exceeds limit of 178956970 pixels"),
    ],
)
def test_every_image_problem_is_a_bad_sample(images, name, reason, problem):
    err = refusal(ImageLoader(None, images["folder"]), name)
    assert err.reason == reason and err.field == "image" and err.sample_id == "s7"
    assert str(err).startswith("d.json: sample 's7': field image: ")
    assert name in str(err) and re.search(problem, str(err)), str(err)


def test_truncated_images_are_refused_even_where_pil_would_pad_them(images, monkeypatch):
    """A process-wide ``LOAD_TRUNCATED_IMAGES = True`` (the original LLaVA sets it) does not
    turn a cut file into a grey training image."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    loader = ImageLoader(None, images["folder"])
    for name in ("truncated.png", "truncated.jpg"):
        assert refusal(loader, name).reason == "corrupt_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_the_pixel_limit_is_read_from_the_header_and_nothing_is_decoded(images, monkeypatch):
    def no_decoding(self):
        raise AssertionError("decoded an image that should have been refused from its header")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert refusal(ImageLoader(None, images["folder"]), "100mp.png").reason == "image_too_large"
    small = ImageLoader(None, images["folder"], max_image_pixels=24 * 16 - 1)
    assert refusal(small, "ok.png").reason == "image_too_large"
    assert DEFAULT_MAX_IMAGE_PIXELS == 89_478_485
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS  # PIL's global is left alone


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc")
def test_refusing_a_100_megapixel_image_costs_no_memory(images):
    """Peak RSS of a fresh process, reset before each call (VmHWM): refusing the 10000 x 10000
    PNG from its header adds almost nothing, while decoding it (limit off) adds over 250 MB, so
    the measure does see decoding."""
    script = textwrap.dedent(f"""
        import re, sys
        from lvlm_tune.data.errors import BadSampleError
        from lvlm_tune.data.images import ImageLoader
        from lvlm_tune.data.record import Conversation, Turn
        record = Conversation("big", [Turn("user", "<image>"), Turn("assistant", "x")], ["100mp.png"])
        def growth_mb(call):
            def read(key):
                return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read())[1])
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS
            start = read("VmRSS")
            call()
            return (read("VmHWM") - start) / 1024
        def refuse():
            try:
                ImageLoader(None, {str(images["folder"])!r}).load(record)
                sys.exit("not refused")
            except BadSampleError as err:
                assert err.reason == "image_too_large", err
        def decode():
            (image,) = ImageLoader(None, {str(images["folder"])!r}, max_image_pixels=0).load(record)
            assert image.size == (10000, 10000)
        print(growth_mb(refuse), growth_mb(decode))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    refused_mb, decoded_mb = map(float, done.stdout.split())
    assert refused_mb < 20, refused_mb
    assert decoded_mb > 250, decoded_mb


def test_a_limit_above_pils_own_is_honoured(images):
    loader = ImageLoader(None, images["folder"], max_image_pixels=300_000_000)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", lambda self: None)  # header only: fast
        patch.setattr(Image.Image, "convert", lambda self, mode: self)
        (image,) = loader.load(conv("200mp.png"))
    assert image.size == (20000, 10000)


def test_decoded_and_byte_images_are_checked_too(images):
    loader = ImageLoader(None, images["folder"], max_image_pixels=100)
    big = Image.new("RGB", (20, 20))
    assert refusal(loader, big).reason == "image_too_large"
    data = (images["folder"] / "ok.png").read_bytes()
    assert refusal(loader, data).reason == "image_too_large"
    assert refusal(loader, {"bytes": data[:40], "path": None}).reason == "corrupt_image"
    assert refusal(loader, 3.5).reason == "bad_field"


@pytest.mark.parametrize(
    "ref",
    ["../outside.png", "sub/../../outside.png", "link_out.png", "ABSOLUTE_OUTSIDE"],
)
def test_paths_leaving_the_image_folder_are_bad_samples(images, ref):
    if ref == "ABSOLUTE_OUTSIDE":
        ref = str(images["root"] / "outside.png")
    err = refusal(ImageLoader(None, images["folder"]), ref)
    assert err.reason == "image_outside_folder" and err.field == "image"
    assert str(err).startswith("d.json: sample 's7': field image: image path ")
    assert "outside image_folder" in str(err) and "allow_outside_image_folder" in str(err)
    allowed = ImageLoader(None, images["folder"], allow_outside_folder=True)
    (image,) = allowed.load(conv(ref))
    assert image.getpixel((0, 0)) == (200, 0, 0)


def test_paths_that_stay_inside_are_fine(images):
    loader = ImageLoader(None, images["folder"])
    inside = [
        "ok.png",
        "sub/deep.png",
        "sub/../ok.png",
        "link_in.png",
        str(images["folder"] / "ok.png"),
    ]
    for ref in inside:
        (image,) = loader.load(conv(ref))
        assert image.size == (24, 16) and image.mode == "RGB"
    # a symlinked image folder is resolved too: its own files are inside
    link = images["root"] / "folder_link"
    if not link.exists():
        os.symlink(images["folder"], link)
    assert ImageLoader(None, link).load(conv("ok.png"))[0].size == (24, 16)
    assert refusal(ImageLoader(None, link), "../outside.png").reason == "image_outside_folder"


def test_without_an_image_folder_paths_are_not_confined(images):
    (image,) = ImageLoader(None).load(conv(str(images["root"] / "outside.png")))
    assert image.size == (24, 16)


def test_generation_targets_go_through_the_same_checks(images):
    from lvlm_tune.generation.data import load_targets  # MiniGPT-5's target images

    loader = ImageLoader(None, images["folder"])
    record = conv(gen=["ok.png", "../outside.png"])
    decoded, captions = load_targets(loader, record, 1)
    assert len(decoded) == 1 and captions == [None]
    with pytest.raises(BadSampleError) as caught:
        load_targets(loader, record, 2)
    assert caught.value.reason == "image_outside_folder"
    assert caught.value.field == "gen_images[1]" and "s7" in str(caught.value)
    with pytest.raises(BadSampleError) as caught:
        load_targets(loader, conv(gen=["100mp.png"]), 1)
    assert caught.value.reason == "image_too_large" and caught.value.field == "gen_images[0]"
