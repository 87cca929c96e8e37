"""The demo's offline parts: the synthetic shapes dataset and the tiny pre-trained base models.

Answers are checked against the drawn pixels (not against the generator's own bookkeeping), the
files must load through the same reader as real data, and the base models must load back through
``from_pretrained`` and compose into a LLaVA, or (the MiniGPT-4 variant) into a MiniGPT-4 whose
LLM was pre-trained on exactly the training encoding with captions where the images go.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from demo_checks import (
    assert_balanced_with_blank_twin,
    dataset_fixture,
    load,
    measured,
    shape_pixels,
    with_image_token,
)
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    CLIPVisionModel,
)

from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.sources import open_source
from lvlm_tune.demo import shapes
from lvlm_tune.demo.pretrain import (
    LanguageModelConfig,
    VisionTowerConfig,
    pretrain_language_model,
    pretrain_vision_tower,
    train_tokenizer,
)
from lvlm_tune.demo.pretrain_minigpt4 import (
    STAGE_DATA,
    Blip2EncoderConfig,
    caption_corpus,
    described_records,
    pretrain_blip2,
    pretrain_minigpt4_llm,
    query_states,
)
from lvlm_tune.models.llava import build_llava
from lvlm_tune.models.minigpt4 import build_minigpt4

JSON_FILES = ("captions_train", "instruct_train", "instruct_test", "instruct_test_blank")
# What the probe reports of a pre-trained vision side (printed in the demo summary).
PROBE_FIGURES = ("acc_local_colour", "acc_local_shape", "acc_count", "acc_shared", "final_loss")


dataset = dataset_fixture(shapes.make_shapes_dataset, "shapes", n_train=60, n_test=48)


def qa_pairs(record: dict) -> list[tuple[str, str]]:
    turns = record["conversations"]
    return [(q["value"], a["value"]) for q, a in zip(turns[::2], turns[1::2], strict=True)]


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    first = shapes.make_shapes_dataset(tmp_path / "a", n_train=10, n_test=8, seed=7)
    again = shapes.make_shapes_dataset(tmp_path / "b", n_train=10, n_test=8, seed=7)
    other = shapes.make_shapes_dataset(tmp_path / "c", n_train=10, n_test=8, seed=8)
    for name in (*JSON_FILES, "text_corpus", "info"):
        assert first[name].read_bytes() == again[name].read_bytes(), name
    for png in sorted((tmp_path / "a" / "images").iterdir()):
        assert png.read_bytes() == (tmp_path / "b" / "images" / png.name).read_bytes(), png.name
    assert first["instruct_train"].read_bytes() != other["instruct_train"].read_bytes()


def test_answers_agree_with_the_pixels(dataset: dict[str, Path]) -> None:
    checked = 0
    for name in ("instruct_train", "instruct_test"):
        for record in load(dataset, name):
            seen = measured(dataset["root"] / record["image"])
            for question, answer in qa_pairs(record):
                kind = next(k for k in shapes.KINDS if answer in shapes.ANSWERS[k])
                assert seen.get(kind) == answer, (record["id"], question, answer, seen)
                checked += 1
    assert checked > 150


def test_captions_agree_with_the_pixels(dataset: dict[str, Path]) -> None:
    for record in load(dataset, "captions_train"):
        seen = measured(dataset["root"] / record["image"])
        assert record["caption"].startswith(seen["count"] + " shape")
        if "colour" in seen:
            assert all(f"a {seen['colour']} " in part for part in record["caption"].split(" and "))


def test_questions_are_well_defined_and_image_tag_first() -> None:
    import random

    rng = random.Random(0)
    for _ in range(300):
        scene = shapes.random_scene(rng)
        asked = shapes.questions(scene)
        assert "count" in asked
        assert ("colour" in asked) == (len({i.colour for i in scene.items}) == 1)
        assert ("shape" in asked) == (len({i.shape for i in scene.items}) == 1)
        assert ("position" in asked) == (len(scene.items) == 1)
        assert len({i.position for i in scene.items}) == len(scene.items)


def test_test_split_is_balanced_and_blank_twin_matches(dataset: dict[str, Path]) -> None:
    test, blank = load(dataset, "instruct_test"), load(dataset, "instruct_test_blank")
    assert_balanced_with_blank_twin(test, blank, {k: shapes.ANSWERS[k] for k in shapes.KINDS}, 12)
    assert all(not shape_pixels(dataset["root"] / r["image"]).any() for r in blank)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in test)
    info = json.loads(dataset["info"].read_text())
    assert info["chance"]["colour"] == 0.25 and info["chance"]["colour_shape"] == 0.2917


def test_files_load_with_the_project_reader(dataset: dict[str, Path], tmp_path: Path) -> None:
    for name in JSON_FILES:
        source = open_source(dataset[name], cache_dir=str(tmp_path))
        raw = load(dataset, name)
        assert len(source) == len(raw)
        record = source.get(0)
        assert record.images == [raw[0]["image"]]
        assert (dataset["root"] / record.images[0]).is_file()
        assert record.turns[-1].role == "assistant"


def test_corpus_holds_every_answer_and_question(dataset: dict[str, Path]) -> None:
    corpus = dataset["text_corpus"].read_text()
    for record in load(dataset, "instruct_test"):
        for question, answer in qa_pairs(record):
            assert question.removeprefix("<image>\n") in corpus
            assert f"ASSISTANT: {answer}\n" in corpus
    assert "A chat between a curious user" in corpus  # vicuna_v1 system prompt


@pytest.mark.slow
def test_base_models_save_load_and_compose(dataset: dict[str, Path], tmp_path: Path) -> None:
    rng_state = torch.random.get_rng_state()
    vision_config = VisionTowerConfig(num_images=16, steps=2, batch_size=4)
    report = pretrain_vision_tower(tmp_path / "vision", vision_config)
    pretrain_vision_tower(tmp_path / "vision_again", vision_config)
    llm_report = pretrain_language_model(
        dataset["text_corpus"], tmp_path / "llm", LanguageModelConfig(steps=2, batch_size=4)
    )
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert set(PROBE_FIGURES) <= set(report) and llm_report["vocab_size"] > 259

    vision = CLIPVisionModel.from_pretrained(tmp_path / "vision")
    again = CLIPVisionModel.from_pretrained(tmp_path / "vision_again")
    for (name, a), (_, b) in zip(vision.state_dict().items(), again.state_dict().items(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    processor = AutoImageProcessor.from_pretrained(tmp_path / "vision", backend="pil")
    image = Image.open(dataset["root"] / load(dataset, "instruct_test")[0]["image"])
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)  # 64 px data resized to the tower's 32 px
    hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape == (1, 1 + 16, vision_config.hidden_size)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llm")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    assert lm.config.vocab_size == len(tokenizer)
    assert tokenizer.decode(tokenizer(" ASSISTANT: red")["input_ids"], skip_special_tokens=True)

    model, llava_processor = build_llava(tmp_path / "vision", tmp_path / "llm")
    inputs = llava_processor(
        text=["<image>\nWhat color is the shape? red"], images=[image], return_tensors="pt"
    )
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == 16
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)


@pytest.mark.slow
def test_vision_pretraining_reads_colours_far_above_chance(tmp_path: Path) -> None:
    """A short pre-training already teaches the tower's patches the colour in their quadrant
    (held-out probe; chance is about 1 / 4 colours, 2 steps give 0.17, 40 give 0.71)."""
    config = VisionTowerConfig(num_images=256, steps=40, batch_size=32)
    report = pretrain_vision_tower(tmp_path / "vision", config)
    assert report["acc_local_colour"] >= 2 / len(shapes.COLORS), report  # twice chance


@pytest.mark.slow
def test_minigpt4_base_models_save_load_and_compose(
    dataset: dict[str, Path], tmp_path: Path
) -> None:
    rng_state = torch.random.get_rng_state()
    config = Blip2EncoderConfig(num_images=16, steps=2, batch_size=4)
    report = pretrain_blip2(tmp_path / "blip2", config)
    llm_report = pretrain_minigpt4_llm(
        dataset, tmp_path / "llm", LanguageModelConfig(steps=2, batch_size=4, max_length=400)
    )
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert set(PROBE_FIGURES) <= set(report)
    assert llm_report["vocab_size"] > 259

    model, processor = build_minigpt4(tmp_path / "blip2", tmp_path / "llm", num_query_tokens=16)
    image = Image.open(dataset["root"] / load(dataset, "instruct_test")[0]["image"])
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)  # 64 px data resized to the BLIP-2's 32 px
    saved = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "blip2").eval()
    model.train()  # as the Trainer does: the frozen Q-Former must still give the saved queries
    with torch.no_grad():
        queries = query_states(model, pixels)
        assert queries.shape == (1, 16, config.qformer_hidden_size)
        assert torch.equal(queries, query_states(saved, pixels))
    prompt = (
        "###Human: <Img>" + "<image>" * 16 + "</Img> What color is the shape? ###Assistant: red###"
    )
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == 16
    assert torch.isfinite(model(**inputs, labels=inputs["input_ids"]).loss)


def test_minigpt4_llm_corpus_is_the_training_encoding_with_captions_for_images(
    dataset: dict[str, Path],
) -> None:
    tokenizer = train_tokenizer(dataset["text_corpus"].read_text().splitlines(), 400)
    sequences = caption_corpus(dataset, tokenizer, seed=0, max_length=1000)
    described = described_records(dataset)
    assert len(sequences) == len(described) == 2 * 60  # captions, then conversations
    with_image, image_id = with_image_token(tokenizer)
    encoders = {
        template: ConversationEncoder(
            with_image, template, num_image_tokens=16, image_position=position, seed=0
        )
        for template, _, position in STAGE_DATA
    }
    placements = set()
    for index, ((template, record, caption), sequence) in enumerate(zip(described, sequences, strict=True)):  # fmt: skip
        encoder = encoders[template]
        real = encoder.encode(record, index).input_ids.tolist()  # what stage 1 / 2 train on
        at = real.index(image_id)
        assert real[at : at + 16] == [image_id] * 16 and image_id not in real[at + 16 :]
        caption_ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        assert sequence == [*real[:at], *caption_ids, *real[at + 16 :], tokenizer.eos_token_id]
        text = encoder.render(record, index).text
        if template == "plain":
            assert text == "<image>" + caption + "\n"
        else:
            placements.add("before" if "<Img><image></Img> What" in text else "after")
    assert placements == {"before", "after"}
