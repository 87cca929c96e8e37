"""The answerer opens each image once per answer (anyres: the prompt's image sizes and the
pixels come from one decode) and gives the same ids and pixels as from the paths."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lvlm_tune.data.collator import concat_pixels
from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.record import Conversation, Turn
from lvlm_tune.inference.answer import Answerer
from lvlm_tune.models.registry import get_model_family
from lvlm_tune.testing.tiny_anyres import write_tiny_llava_onevision

SIZES = {"wide.png": (80, 30), "tall.png": (24, 70), "square.png": (32, 32)}


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    root = tmp_path_factory.mktemp("answer_images")
    for k, (name, size) in enumerate(SIZES.items()):
        Image.new("RGB", size, (70 * k, 120, 200 - 50 * k)).save(root / name)
    family = get_model_family("llava_onevision")
    model, processor = family.load(str(write_tiny_llava_onevision(root / "ov")))
    return root, family, model.eval(), processor


@pytest.mark.parametrize("aspect_ratio", ["none", "pad"])
def test_each_image_is_opened_once_with_the_same_ids_and_pixels(
    onevision, aspect_ratio, monkeypatch
):
    root, family, model, processor = onevision
    encoder = ConversationEncoder(
        processor.tokenizer, "chatml", num_image_tokens=family.image_tokens(model, processor)
    )
    images = ImageLoader(processor.image_processor, root, aspect_ratio)
    answerer = Answerer(model, processor, encoder, images)
    records = [
        Conversation("two", [Turn("user", "<image>\n<image>\nSame?")], ["wide.png", "tall.png"]),
        Conversation("one", [Turn("user", "<image>\nColour?")], ["tall.png"]),
        Conversation("none", [Turn("user", "Hello?")]),
        Conversation("three", [Turn("user", "<image> <image> <image> Which?")], list(SIZES)),
    ]
    # what the paths give: header sizes for the prompt, the files decoded for the pixels
    prompts = [answerer.prompt_ids(r, i) for i, r in enumerate(records)]
    per_record = [images.model_inputs(r) for r in records]
    opened = []
    real_open = Image.open
    monkeypatch.setattr(
        Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k)
    )
    inputs, length = answerer.model_inputs(records)
    assert sorted(opened) == sorted(str(root / n) for r in records for n in r.images)
    assert length == max(len(p) for p in prompts)
    for row, ids in enumerate(prompts):
        assert torch.equal(inputs["input_ids"][row, length - len(ids) :], ids)
        assert not inputs["attention_mask"][row, : length - len(ids)].any()
    with_images = [item for item in per_record if item]
    assert torch.equal(
        inputs["pixel_values"], concat_pixels([i["pixel_values"] for i in with_images])
    )
    assert torch.equal(inputs["image_sizes"], torch.cat([i["image_sizes"] for i in with_images]))
    assert inputs["batch_num_images"].tolist() == [2, 1, 3]
