"""Several images per sample at inference (LLaVA-1.5): batched answers with left padding over
rows holding 0, 1 or 2 images equal each row answered alone, chat attaches several images per
turn and images in later turns, eval scores multi-image data."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_export import train

from lvlm_tune.data.record import Conversation, Turn
from lvlm_tune.errors import UserError
from lvlm_tune.inference.answer import Answerer
from lvlm_tune.inference.chat import ChatSession
from lvlm_tune.inference.evaluate import evaluate
from lvlm_tune.inference.load import load_run

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Samples with two images each (and a one-image and a text-only one), their folder."""
    root = tmp_path_factory.mktemp("pairs")
    names = list(COLOURS)
    for k, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (32, 32), rgb).save(root / f"{name}.png")
        Image.new("RGB", (40, 24), rgb[::-1]).save(root / f"wide-{k}.png")
    rows = []
    for k in range(6):
        first, second = names[k % 3], names[(k + 1) % 3]
        rows.append({"id": f"p{k}", "images": [f"{first}.png", f"{second}.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich image is red?"},
            {"from": "gpt", "value": "the first" if first == "red" else "the second"}]})  # fmt: skip
    rows.append({"id": "one", "image": "wide-0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "blue"}]})  # fmt: skip
    rows.append({"id": "text", "conversations": [
        {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]})  # fmt: skip
    (root / "pairs.json").write_text(json.dumps(rows))
    return {"data_path": str(root / "pairs.json"), "image_folder": str(root), "rows": rows}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_parts, pairs):
    """A stage-1 run trained on the two-image samples."""
    root = tmp_path_factory.mktemp("multi_runs")
    return train(root, tiny_parts, pairs, "s1", stage="pretrain", max_steps=1)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_run(run_dir)


def records(pairs):
    out = []
    for row in pairs["rows"]:
        images = row.get("images") or ([row["image"]] if "image" in row else [])
        question = row["conversations"][0]["value"]
        paths = [f"{pairs['image_folder']}/{name}" for name in images]
        out.append(Conversation(row["id"], [Turn("user", question)], paths))
    return out


def answerer(loaded):
    encoder = loaded.encoder()
    return Answerer(loaded.model, loaded.processor, encoder, loaded.images())


def test_batched_rows_with_different_image_counts_answer_as_alone(loaded, pairs):
    answer = answerer(loaded)
    group = records(pairs)[-4:]  # two 2-image rows, one 1-image row, one text-only row
    inputs, _ = answer.model_inputs(group)
    per_image = loaded.family.num_image_tokens(loaded.model)
    assert inputs["pixel_values"].shape[0] == 5  # images of all rows, in order
    image_id = answer.encoder.image_token_id
    assert (inputs["input_ids"] == image_id).sum(-1).tolist() == [2 * per_image] * 2 + [
        per_image,
        0,
    ]
    assert inputs["attention_mask"][:, -1].all() and not inputs["attention_mask"][:, 0].all()
    with torch.no_grad():
        batched = loaded.model(**inputs).logits[:, -1]
        for row, record in enumerate(group):
            alone, _ = answer.model_inputs([record])
            last = loaded.model(**alone).logits[0, -1]
            assert torch.allclose(batched[row], last, atol=1e-4), record.id
    together = answer.answer(group, max_new_tokens=4)
    assert together == [answer.answer([r], max_new_tokens=4)[0] for r in group]


def test_the_images_reach_the_model_in_order(loaded, pairs):
    answer = answerer(loaded)
    record = records(pairs)[0]
    swapped = Conversation("swapped", record.turns, record.images[::-1])
    with torch.no_grad():
        logits = [
            loaded.model(**answer.model_inputs([r])[0]).logits[0, -1] for r in (record, swapped)
        ]
    assert not torch.allclose(*logits, atol=1e-6)


def test_chat_attaches_several_images_and_images_in_later_turns(loaded, pairs):
    folder = pairs["image_folder"]
    session = ChatSession(loaded)
    first = session.ask(
        "Which image is red?", [f"{folder}/red.png", f"{folder}/blue.png"], max_new_tokens=3
    )
    assert session.turns[0].content == "<image>\n<image>\nWhich image is red?"
    second = session.ask("And this one?", f"{folder}/green.png", max_new_tokens=3)
    third = session.ask("Compare <image> with the first.", f"{folder}/wide-1.png", max_new_tokens=3)
    assert [t.content for t in session.turns[::2]] == [
        "<image>\n<image>\nWhich image is red?",
        "<image>\nAnd this one?",
        "Compare <image> with the first.",  # the user's tag stays where it was written
    ]
    assert [t.content for t in session.turns[1::2]] == [first, second, third]
    assert [p.rsplit("/", 1)[-1] for p in session.image_paths] == [
        "red.png", "blue.png", "green.png", "wide-1.png",
    ]  # fmt: skip
    # what the session fed the model: the keep rendering of the whole conversation, 4 images
    record = Conversation("chat", [*session.turns[:-1]], session.image_paths)
    inputs, _ = session.answerer.model_inputs([record])
    assert inputs["pixel_values"].shape[0] == 4
    assert session.answerer.answer([record], max_new_tokens=3) == [third]


def test_chat_refuses_tags_that_do_not_match_the_attached_images(loaded, pairs):
    session = ChatSession(loaded)
    image = f"{pairs['image_folder']}/red.png"
    with pytest.raises(UserError, match=r"2 <image> tag.* for 1 attached image"):
        session.ask("<image> or <image>?", image)
    assert session.turns == [] and session.image_paths == []  # the failed question left nothing


def test_chat_places_untagged_images_after_the_question_for_after_runs(loaded):
    from dataclasses import replace

    after = ChatSession(replace(loaded, card=replace(loaded.card, image_position="after")))
    assert after.place_tags("Which?", 2) == "Which?\n<image>\n<image>"
    assert ChatSession(loaded).place_tags("Which?", 2) == "<image>\n<image>\nWhich?"


def test_eval_answers_multi_image_samples(run_dir, loaded, pairs):
    report = evaluate(run_dir, pairs["data_path"], batch_size=3, progress=False)
    assert report["metrics"]["num_generated"] == len(pairs["rows"])
    answer = answerer(loaded)
    alone = [answer.answer([r], max_new_tokens=16)[0] for r in records(pairs)]
    assert [s["prediction"] for s in report["samples"]] == alone
    assert report["metrics"]["answer_tokens"] > 0 and report["metrics"]["loss"] is not None


def test_chat_refuses_a_video_for_a_family_without_videos(loaded, tmp_path):
    frames = tmp_path / "clip"
    frames.mkdir()
    for k in range(3):
        Image.new("RGB", (16, 16), (80 * k, 0, 0)).save(frames / f"{k}.png")
    session = ChatSession(loaded)
    with pytest.raises(UserError, match="llava model takes no videos"):
        session.check_video(str(frames))
    with pytest.raises(UserError, match="takes no videos"):
        session.ask("What happens?", video=str(frames))
    assert session.turns == []
    # a literal <video> in the text of such a model is text
    assert session.place_tags("What is <video>?", 0) == "What is <video>?"
