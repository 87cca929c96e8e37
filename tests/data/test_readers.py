"""Raw sample -> Conversation: every format, and every bad-sample reason naming its exact field."""

from __future__ import annotations

import pytest
from PIL import Image

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.formats import count_images, count_words
from lvlm_tune.data.readers import detect_format, normalize
from lvlm_tune.data.record import Turn

SRC = "/data/train.json"


def llava(*turns: tuple[str, object], **top: object) -> dict:
    return {"conversations": [{"from": r, "value": v} for r, v in turns], **top}


def openai(*messages: tuple[str, object], **top: object) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in messages], **top}


def bad(raw: object, fmt: str, reason: str, field: str, sample_id: str = "s7") -> None:
    """Assert ``raw`` fails with ``reason`` and a message naming file, sample id and field."""
    with pytest.raises(BadSampleError) as info:
        normalize(raw, fmt, source=SRC, index=3)
    err = info.value
    assert (err.reason, err.field, err.sample_id) == (reason, field, sample_id)
    assert str(err).startswith(f"{SRC}: sample {sample_id!r}: field {field}: ")


# --- LLaVA -----------------------------------------------------------------------------------


def test_llava_sample_with_system_and_image():
    raw = llava(
        ("system", "Be brief."),
        ("human", "<image>\nWhat is it?"),
        ("gpt", "A cat."),
        ("user", "Colour?"),
        ("assistant", "Black."),
        id=12,
        image="coco/1.jpg",
    )
    conv = normalize(raw, "llava", source=SRC, index=5)
    assert conv.id == "12" and conv.system == "Be brief." and conv.images == ["coco/1.jpg"]
    assert conv.turns == [
        Turn("user", "<image>\nWhat is it?"),
        Turn("assistant", "A cat."),
        Turn("user", "Colour?"),
        Turn("assistant", "Black."),
    ]
    assert (conv.source, conv.index, conv.instruction_pool) == (SRC, 5, None)


def test_llava_text_only_without_id_uses_row_index():
    conv = normalize(llava(("human", "Hi"), ("gpt", "Hello")), "llava", source=SRC, index=3)
    assert conv.id == "3" and conv.images == [] and conv.system is None


def test_llava_multi_image_and_untagged_image():
    raw = llava(("human", "<image> vs <image>"), ("gpt", "same"), image=["a.jpg", "b.jpg"])
    assert normalize(raw, "llava", source=SRC, index=0).images == ["a.jpg", "b.jpg"]
    raw = llava(("human", "What?"), ("gpt", "A dog."), image="a.jpg")  # encoder places it
    assert normalize(raw, "llava", source=SRC, index=0).images == ["a.jpg"]


@pytest.mark.parametrize(
    ("turns", "field"),
    [
        ([("gpt", "a"), ("human", "q")], "conversations[0].from"),
        ([("human", "q"), ("human", "q2"), ("gpt", "a")], "conversations[1].from"),
        ([("human", "q"), ("gpt", "a"), ("human", "q2")], "conversations[2].from"),
        ([("human", "q"), ("bot", "a")], "conversations[1].from"),
        ([("human", "q"), ("gpt", "a"), ("system", "s"), ("gpt", "a")], "conversations[2].from"),
        ([("system", "s")], "conversations"),
        ([], "conversations"),
    ],
)
def test_llava_bad_roles(turns, field):
    bad(llava(*turns, id="s7"), "llava", "bad_roles", field)


@pytest.mark.parametrize("value", ["", "   \n", None, 42, ["a"]])
def test_llava_empty_message(value):
    bad(
        llava(("human", "q"), ("gpt", value), id="s7"),
        "llava",
        "empty_message",
        "conversations[1].value",
    )


@pytest.mark.parametrize(
    ("turns", "image", "field"),
    [
        ([("human", "q"), ("gpt", "<image> here")], "a.jpg", "conversations[1].value"),
        ([("system", "<image>"), ("human", "q"), ("gpt", "a")], "a.jpg", "conversations[0].value"),
        ([("human", "<image><image>"), ("gpt", "a")], "a.jpg", "image"),
        ([("human", "<image>"), ("gpt", "a")], None, "image"),  # text-only sample with a tag
        ([("human", "<image>"), ("gpt", "a"), ("human", "q"), ("gpt", "a")], ["a", "b"], "image"),
    ],
)
def test_llava_image_tag_mismatch(turns, image, field):
    bad(llava(*turns, id="s7", image=image), "llava", "image_tag_mismatch", field)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"id": "s7", "conversations": "human: hi"}, "conversations"),
        ({"id": "s7"}, "conversations"),
        (
            {"id": "s7", "conversations": [{"from": "human", "value": "q"}, "gpt: a"]},
            "conversations[1]",
        ),
        (llava(("human", "q"), ("gpt", "a"), id="s7", image=7), "image"),
        (llava(("human", "q"), ("gpt", "a"), id="s7", image=["a.jpg", ""]), "image[1]"),
    ],
)
def test_llava_bad_field(raw, field):
    bad(raw, "llava", "bad_field", field)


def test_record_that_is_not_an_object():
    bad(["not", "a", "dict"], "llava", "bad_field", "<record>", sample_id="3")


def test_dataset_image_values_pass_through():
    pil = Image.new("RGB", (2, 2))
    raw = llava(("human", "<image>"), ("gpt", "a"), image={"bytes": b"PNG", "path": None})
    assert normalize(raw, "llava", source=SRC, index=0).images == [b"PNG"]
    raw = llava(("human", "q"), ("gpt", "a"), image=None, images=[pil, {"path": "x.jpg"}])
    assert normalize(raw, "llava", source=SRC, index=0).images == [pil, "x.jpg"]


# --- caption pairs ---------------------------------------------------------------------------


def test_caption_pair():
    conv = normalize(
        {"image": "cc3m/1.jpg", "caption": "A red bus."}, "caption", source=SRC, index=9
    )
    assert conv.id == "9" and conv.images == ["cc3m/1.jpg"]
    assert conv.turns == [Turn("user", ""), Turn("assistant", "A red bus.")]
    assert conv.instruction_pool == "brief" and conv.extra == {"caption": "A red bus."}


@pytest.mark.parametrize(
    ("raw", "reason", "field"),
    [
        ({"image": "a.jpg", "caption": " "}, "empty_message", "caption"),
        ({"image": "a.jpg", "caption": None}, "empty_message", "caption"),
        ({"caption": "A bus."}, "bad_field", "image"),
        ({"image": "a.jpg", "caption": "<image> a bus"}, "image_tag_mismatch", "caption"),
    ],
)
def test_caption_errors(raw, reason, field):
    bad({"id": "s7", **raw}, "caption", reason, field)


# --- OpenAI messages -------------------------------------------------------------------------


def test_openai_parts_become_tags_in_order():
    raw = openai(
        ("system", "You see."),
        (
            "user",
            [
                {"type": "image", "image": "a.jpg"},
                {"type": "text", "text": "What differs from"},
                {"type": "image_url", "image_url": {"url": "b.jpg"}},
                {"type": "text", "text": "?"},
            ],
        ),
        ("assistant", [{"type": "text", "text": "Colour."}]),
        id="o1",
    )
    conv = normalize(raw, "openai", source=SRC, index=0)
    assert conv.id == "o1" and conv.system == "You see." and conv.images == ["a.jpg", "b.jpg"]
    assert conv.turns == [
        Turn("user", "<image>\nWhat differs from\n<image>\n?"),
        Turn("assistant", "Colour."),
    ]


def test_openai_placeholder_parts_take_top_level_images():
    raw = openai(
        ("user", [{"type": "image"}, {"type": "text", "text": "What is this?"}]),
        ("assistant", "A cat."),
        ("user", [{"type": "text", "text": "And this?"}, {"type": "image"}]),
        ("assistant", "A dog."),
        images=["cat.jpg", "dog.jpg"],
    )
    conv = normalize(raw, "openai", source=SRC, index=0)
    assert conv.images == ["cat.jpg", "dog.jpg"]
    assert [t.content for t in conv.turns] == [
        "<image>\nWhat is this?",
        "A cat.",
        "And this?\n<image>",
        "A dog.",
    ]


def test_openai_string_content_with_top_level_images():
    raw = openai(("user", "<image>\nWhat?"), ("assistant", "A bus."), images=["a.jpg"])
    conv = normalize(raw, "openai", source=SRC, index=0)
    assert conv.images == ["a.jpg"] and conv.turns[0].content == "<image>\nWhat?"


@pytest.mark.parametrize(
    ("messages", "top", "reason", "field"),
    [
        ([("assistant", "a"), ("user", "q")], {}, "bad_roles", "messages[0].role"),
        ([("user", "q"), ("gpt", "a")], {}, "bad_roles", "messages[1].role"),
        ([("user", "q"), ("assistant", "a"), ("user", "q")], {}, "bad_roles", "messages[2].role"),
        ([("user", "q"), ("assistant", "")], {}, "empty_message", "messages[1].content"),
        (
            [("user", [{"type": "text", "text": 5}]), ("assistant", "a")],
            {},
            "empty_message",
            "messages[0].content[0].text",
        ),
        (
            [("user", [{"type": "audio"}]), ("assistant", "a")],
            {},
            "bad_field",
            "messages[0].content[0]",
        ),
        ([("user", [{"type": "image"}]), ("assistant", "a")], {}, "image_tag_mismatch", "images"),
        (
            [("user", [{"type": "image"}]), ("assistant", "a")],
            {"images": ["a", "b"]},
            "image_tag_mismatch",
            "images",
        ),
        (
            [("user", "<image><image>"), ("assistant", "a")],
            {"images": ["a"]},
            "image_tag_mismatch",
            "images",
        ),
        (
            [("user", "q"), ("assistant", "<image>")],
            {"images": ["a"]},
            "image_tag_mismatch",
            "messages[1].content",
        ),
    ],
)
def test_openai_errors(messages, top, reason, field):
    bad(openai(*messages, id="s7", **top), "openai", reason, field)


def test_openai_messages_not_a_list():
    bad({"id": "s7", "messages": {"role": "user"}}, "openai", "bad_field", "messages")
    bad({"id": "s7", "messages": [None]}, "openai", "bad_field", "messages[0]")


# --- detection and counts --------------------------------------------------------------------


def test_detect_format():
    assert detect_format(["id", "image", "conversations"], "f") == "llava"
    assert detect_format({"messages", "images"}, "f") == "openai"
    assert detect_format(["caption", "image"], "f") == "caption"
    with pytest.raises(ValueError, match=r"f\.json: cannot detect .*\['foo', 'text'\]"):
        detect_format(["text", "foo"], "f.json")
    with pytest.raises(ValueError, match="unknown record format 'sharegpt'"):
        normalize({}, "sharegpt", source=SRC, index=0)


def test_counts():
    raw = llava(("human", "<image>\nWhat  is it?"), ("gpt", "A black cat."), image="a.jpg")
    assert (count_words(raw, "llava"), count_images(raw, "llava")) == (7, 1)
    raw = openai(
        ("user", [{"type": "image"}, {"type": "text", "text": "two words"}, {"type": "image"}]),
        ("assistant", "ok"),
        images=["a", "b"],
    )
    assert (count_words(raw, "openai"), count_images(raw, "openai")) == (3, 2)
    raw = openai(("user", "<image> hi"), ("assistant", "ok"), images=["a"])
    assert (count_words(raw, "openai"), count_images(raw, "openai")) == (3, 1)
    assert (
        count_words({"caption": "a b c", "image": "x"}, "caption"),
        count_images({"image": "x"}, "caption"),
    ) == (3, 1)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        {"conversations": 5},
        {"conversations": [None, {"value": 3}]},
        {"messages": [{"content": [1, None]}]},
    ],
)
@pytest.mark.parametrize("fmt", ["llava", "openai", "caption"])
def test_counts_never_raise(raw, fmt):
    # nothing in these is text or an image: they count as empty (the reader refuses them later)
    assert (count_words(raw, fmt), count_images(raw, fmt)) == (0, 0)
