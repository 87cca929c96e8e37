"""Raw preference samples -> PreferenceRecord: both formats, detection through every source,
counts, and every bad field named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.formats import count_images, count_words, detect_format, normalize
from lvlm_tune.data.preference import PreferenceRecord
from lvlm_tune.data.record import Conversation, Turn
from lvlm_tune.data.sources import open_source


def llava_pair(**kw) -> dict:
    raw = {
        "id": "p1",
        "image": "cat.png",
        "conversations": [
            {"from": "system", "value": "Be exact."},
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "What colour?"},
        ],
        "chosen": "Black.",
        "rejected": "Green.",
    }
    raw.update(kw)
    return raw


def trl_pair(**kw) -> dict:
    raw = {
        "images": ["a.png", "b.png"],
        "prompt": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Left?"}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": [{"type": "text", "text": "Right?"}, {"type": "image"}]},
        ],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}],
        "rejected": [{"role": "assistant", "content": "A cow."}],
    }
    raw.update(kw)
    return raw


def read(raw, fmt=None, index=0):
    fmt = fmt or detect_format(raw, "test")
    return normalize(raw, fmt, source="pairs.json", index=index)


def test_llava_pair_with_context_turns_system_and_image():
    record = read(llava_pair())
    assert isinstance(record, PreferenceRecord)
    assert record.id == "p1" and record.source == "pairs.json" and record.images == ["cat.png"]
    assert record.prompt.system == "Be exact."
    assert record.prompt.turns == [
        Turn("user", "<image>\nWhat is it?"),
        Turn("assistant", "A cat."),
        Turn("user", "What colour?"),
    ]
    assert (record.chosen, record.rejected) == ("Black.", "Green.")
    for side, answer in (("chosen", "Black."), ("rejected", "Green.")):
        conv = record.with_answer(side)
        assert isinstance(conv, Conversation) and conv.turns[-1] == Turn("assistant", answer)
        assert conv.turns[:-1] == record.prompt.turns and conv.images == ["cat.png"]
        assert conv.source == "pairs.json" and conv.id == "p1"
    assert len(record.prompt.turns) == 3  # with_answer copies, never appends to the prompt
    with pytest.raises(ValueError, match="chosen"):
        record.with_answer("both")


def test_llava_pair_videos_read_as_for_sft():
    raw = {
        "id": "v",
        "video": "clip.mp4",
        "conversations": [{"from": "human", "value": "<image>\nWhat happens?"}],
        "chosen": "A ball rolls.",
        "rejected": "Nothing.",
    }
    record = read(raw)
    assert record.videos == ["clip.mp4"] and record.images == []
    assert record.prompt.turns == [Turn("user", "<video>\nWhat happens?")]


def test_trl_pair_typed_parts_take_the_top_level_images_in_order():
    record = read(trl_pair())
    assert record.id == "0" and record.images == ["a.png", "b.png"]
    assert record.prompt.turns == [
        Turn("user", "<image>\nLeft?"),
        Turn("assistant", "A cat."),
        Turn("user", "Right?\n<image>"),
    ]
    assert (record.chosen, record.rejected) == ("A dog.", "A cow.")


def test_trl_standard_strings_and_rlaif_v_columns():
    record = read(
        {"prompt": "<image> Describe.", "images": ["x.png"], "chosen": "A", "rejected": "B"}
    )
    assert record.prompt.turns == [Turn("user", "<image> Describe.")]
    rlaif = {"image": "x.png", "question": "Describe it.", "chosen": "Red.", "rejected": "Blue."}
    record = read(rlaif)
    assert record.images == ["x.png"] and record.prompt.turns == [Turn("user", "Describe it.")]


def test_trl_implicit_prompt_is_the_shared_leading_messages():
    shared = [
        {"role": "system", "content": "Short answers."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Colour?"},
    ]
    raw = {
        "chosen": [*shared, {"role": "assistant", "content": "Red."}],
        "rejected": [*shared, {"role": "assistant", "content": "Blue."}],
    }
    record = read(raw)
    assert record.prompt.system == "Short answers."
    assert [t.content for t in record.prompt.turns] == ["Hi", "Hello.", "Colour?"]
    assert (record.chosen, record.rejected) == ("Red.", "Blue.")
    raw["rejected"] = [*shared, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "?"}]  # fmt: skip
    with pytest.raises(
        BadSampleError, match="field rejected: expected one assistant message"
    ) as err:
        read(raw)
    assert err.value.reason == "bad_roles"


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"chosen": ""}, "chosen", "empty_answer"),
        ({"rejected": "   "}, "rejected", "empty_answer"),
        ({"rejected": 3}, "rejected", "empty_answer"),
        ({"chosen": None}, "chosen", "bad_field"),
        ({"chosen": "<image> here"}, "chosen", "image_tag_mismatch"),
        ({"rejected": "see <video>"}, "rejected", "image_tag_mismatch"),
        ({"image": None}, "image", "image_tag_mismatch"),
        ({"image": ["a.png", "b.png"]}, "image", "image_tag_mismatch"),
        ({"conversations": []}, "conversations", "bad_roles"),
        (
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
            "conversations[1].from",
            "bad_roles",
        ),
        ({"conversations": [{"from": "human", "value": ""}]}, "conversations[0].value", "empty_message"),
        ({"conversations": [{"from": "robot", "value": "Q"}]}, "conversations[0].from", "bad_roles"),
        ({"conversations": "Q"}, "conversations", "bad_field"),
    ],
)  # fmt: skip
def test_llava_pair_errors_name_the_field(change, field, reason):
    raw = llava_pair(**change)
    with pytest.raises(BadSampleError) as err:
        read(raw, "llava_preference")
    assert err.value.field == field and err.value.reason == reason, str(err.value)
    assert err.value.source == "pairs.json" and err.value.sample_id == "p1"
    assert f"field {field}:" in str(err.value)


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"chosen": []}, "chosen", "bad_roles"),
        ({"chosen": [{"role": "user", "content": "x"}]}, "chosen[0].role", "bad_roles"),
        ({"rejected": [{"role": "assistant", "content": [{"type": "image"}]}]},
         "rejected[0].content[0]", "image_tag_mismatch"),
        ({"rejected": [{"role": "assistant", "content": [{"type": "text", "text": " "}]}]},
         "rejected[0].content", "empty_answer"),
        ({"chosen": "x", "rejected": {"text": "y"}}, "rejected", "bad_field"),
        ({"images": ["a.png", "b.png", "c.png"]}, "images", "image_tag_mismatch"),
        ({"images": ["a.png"]}, "images", "image_tag_mismatch"),
        ({"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
         "prompt[1].role", "bad_roles"),
        ({"prompt": [{"role": "user", "content": [{"type": "audio"}]}]}, "prompt[0].content[0]", "bad_field"),
        ({"prompt": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]},
         "prompt[0].role", "bad_roles"),
    ],
)  # fmt: skip
def test_trl_pair_errors_name_the_field(change, field, reason):
    with pytest.raises(BadSampleError) as err:
        read(trl_pair(**change, id="t7"), "trl_preference")
    assert err.value.field == field and err.value.reason == reason, str(err.value)
    assert err.value.sample_id == "t7" and "pairs.json" in str(err.value)


def test_detection_and_counts():
    assert detect_format(llava_pair(), "x") == "llava_preference"
    assert detect_format(trl_pair(), "x") == "trl_preference"
    assert detect_format({"conversations": [], "rejected": "x"}, "x") == "llava_preference"
    assert detect_format({"conversations": []}, "x") == "llava"
    with pytest.raises(ValueError, match="chosen"):
        detect_format({"foo": 1}, "where")
    # the prompt's words plus the longer answer's; images from the image parts
    assert count_words(llava_pair(rejected="a much longer answer"), "llava_preference") == 2 + 4 + 2 + 2 + 4  # fmt: skip
    assert count_words(trl_pair(), "trl_preference") == 1 + 2 + 1 + 2
    assert count_images(trl_pair(), "trl_preference") == 2
    assert count_images(llava_pair(), "llava_preference") == 1
    implicit = {"chosen": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}],
                "rejected": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "d e f"}]}  # fmt: skip
    assert count_words(implicit, "trl_preference") == 5
    assert count_words("not a dict", "trl_preference") == 0


def test_open_source_reads_pairs_from_json_jsonl_and_hf_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_TUNE_CACHE", str(tmp_path / "cache"))
    pairs = [llava_pair(id=f"p{i}") for i in range(3)]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(trl_pair()) + "\n" for _ in range(2)))
    source = open_source(tmp_path / "pairs.json")
    assert source.fmt == "llava_preference" and len(source) == 3
    assert source.get(2).id == "p2" and source.get(2).chosen == "Black."
    assert source.num_images().tolist() == [1, 1, 1] and (source.num_words() > 0).all()
    jsonl = open_source(tmp_path / "pairs.jsonl")
    assert jsonl.fmt == "trl_preference" and jsonl.get(1).images == ["a.png", "b.png"]
    bad = [llava_pair(id="ok"), llava_pair(id="bad", chosen="")]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(BadSampleError, match=r"bad\.json: sample 'bad': field chosen"):
        open_source(tmp_path / "bad.json").get(1)

    import datasets

    image = Image.new("RGB", (12, 8), (200, 10, 10))
    picture = {"type": "image", "text": None}

    def user(*parts):
        return [{"role": "user", "content": [*parts]}]

    def answer(text):
        return [{"role": "assistant", "content": text}]

    rows = {
        "images": [[image], [image, image]],
        "prompt": [
            user(picture, {"type": "text", "text": "Colour?"}),
            user(picture, picture, {"type": "text", "text": "Same?"}),
        ],
        "chosen": [answer("Red."), answer("Yes.")],
        "rejected": [answer("Blue."), answer("No.")],
    }
    text = datasets.Value("string")
    message = {"role": text, "content": text}
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "prompt": [{"role": text, "content": [{"type": text, "text": text}]}],
            "chosen": [message],
            "rejected": [message],
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "hf")
    hf = open_source(tmp_path / "hf")
    assert hf.fmt == "trl_preference" and len(hf) == 2
    record = hf.get(1)
    assert len(record.images) == 2 and isinstance(record.images[0], Image.Image)
    assert record.prompt.turns == [Turn("user", "<image>\n<image>\nSame?")]
    assert (record.chosen, record.rejected) == ("Yes.", "No.")
    assert hf.num_images().tolist() == [1, 2]
    assert np.array_equal(hf.num_words(), [2, 2])
