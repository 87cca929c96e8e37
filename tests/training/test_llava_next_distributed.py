"""LLaVA-NeXT and OneVision on two DeepSpeed ZeRO-2 and ZeRO-3 processes (CPU, gloo): every step gives one
rank an image sample (one or two images of different sizes) and the other a text-only sample,
so the text-only rank runs the anyres vision path on a blank image with its ``image_sizes``.
After the run the frozen vision tower is bit-identical and every trainable tensor changed."""

from __future__ import annotations

import json

import pytest
import torch
from dist_launch import train_and_rebuild, write_recipe
from PIL import Image
from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration

from lvlm_tune.models.parts import is_under
from lvlm_tune.testing.tiny_anyres import write_tiny_llava_next, write_tiny_llava_onevision

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

BUILDERS = {
    "llava_next": (write_tiny_llava_next, LlavaNextForConditionalGeneration, "vicuna_v1"),
    "llava_onevision": (write_tiny_llava_onevision, LlavaOnevisionForConditionalGeneration, "chatml"),
}  # fmt: skip


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory):
    """image, text, two images, text: with one sample per rank every step mixes them."""
    root = tmp_path_factory.mktemp("anyres_mixed")
    for i, (w, h) in enumerate([(50, 20), (30, 70), (64, 64)]):
        Image.new("RGB", (w, h), (60 * i, 90, 200 - 60 * i)).save(root / f"{i}.png")
    ask = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red"}]
    text = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]
    more = [{"from": "human", "value": "And <image>?"}, {"from": "gpt", "value": "blue"}]
    samples = [
        {"id": "one", "image": "0.png", "conversations": ask},
        {"id": "t0", "conversations": text},
        {"id": "two", "image": ["1.png", "2.png"], "conversations": ask + more},
        {"id": "t1", "conversations": text},
    ]
    (root / "train.json").write_text(json.dumps(samples))
    return {"data_path": str(root / "train.json"), "image_folder": str(root)}


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_two_processes(family, zero, tiny_parts, interleaved, tmp_path):
    write, model_class, template = BUILDERS[family]
    folder = str(write(tmp_path / "model"))
    recipe = write_recipe(
        tmp_path, tiny_parts, interleaved, family=family, model_name_or_path=folder,
        vision_tower="", llm_name_or_path="", template=template, image_position="keep",
        stage="finetune", max_steps=2, per_device_train_batch_size=1,
        deepspeed=f"ds_configs/{zero}.json",
    )  # fmt: skip
    out, model = train_and_rebuild(recipe, tmp_path)
    before = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    after = model_class.from_pretrained(out).state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()  # Qwen2: tied
    assert changed == trainable | tied
    assert "model.image_newline" in changed
    assert not any(is_under(k, ("model.vision_tower",)) for k in changed)
