"""Exact label masks: every template x image position x 1/2/5 turns x two tokenizer styles,
a property test over random conversations, truncation, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from masking import assert_exact

from lvlm_tune.data.encoder import IGNORE_INDEX, ConversationEncoder
from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.record import Conversation, Turn

TEMPLATES = ["llava_v0", "vicuna_v1", "plain", "minigpt4", "llama2", "chatml", "tokenizer"]
POSITIONS = ["before", "after", "random", "keep"]


def conversation(n_turns: int, images: int = 1, tag: str = "<image>\n") -> Conversation:
    turns = []
    for k in range(n_turns):
        q = f"what color is shape {k}?"
        turns += [
            Turn("user", (tag * images if k == 0 else "") + q),
            Turn("assistant", f"red square {k}"),
        ]
    return Conversation(id=f"s{n_turns}", turns=turns, images=[f"{i}.png" for i in range(images)])


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("n_turns", [1, 2, 5])
def test_exact_mask_grid(tokenizer, template, position, n_turns):
    enc = ConversationEncoder(tokenizer, template, num_image_tokens=4, image_position=position)
    record = conversation(n_turns)
    if template == "plain" and n_turns > 1:  # one image, one caption: see test_plain_*
        with pytest.raises(BadSampleError, match="plain_multi_turn") as err:
            enc.encode(record)
        assert err.value.reason == "template"
        return
    for index in range(3):
        sample = enc.encode(record, index=index)
        assert_exact(enc, record, sample, index=index)
        assert sample.num_images == 1 and not sample.truncated


@pytest.mark.parametrize("template", TEMPLATES)
def test_text_only_and_multi_image(tokenizer, template):
    enc = ConversationEncoder(tokenizer, template, num_image_tokens=3)
    turns = 1 if template == "plain" else 2
    for record in (conversation(turns, images=0), conversation(turns, images=3)):
        sample = enc.encode(record)
        assert_exact(enc, record, sample)
        assert sample.num_images == len(record.images)


FRAGMENTS = [
    "red", "blue square", " ", "  ", "\n", "\n\n", "###", "#", "</s>", "é", "中文", "😀", "1",
    "23", "4.5", " lead", "Human:", "ASSISTANT:", "USER", "[INST]", "<<SYS>>", "Hello", "?",
    "<|im_end|>", "\t", "ñandú", "a\nb",
]  # fmt: skip
text = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=8).map("".join)
message = text.filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    n = draw(st.integers(1, 5))
    turns = []
    for _ in range(n):
        turns += [Turn("user", draw(message)), Turn("assistant", draw(message))]
    images = draw(st.integers(0, 2))
    if images:
        turns[0] = Turn("user", "<image>\n" * images + turns[0].content)
    system = draw(st.none() | message)
    return Conversation(id="h", turns=turns, images=["x.png"] * images, system=system)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    record=conversations(),
    template=st.sampled_from(TEMPLATES),
    position=st.sampled_from(POSITIONS),
    index=st.integers(0, 99),
)
def test_property_random_conversations(tokenizer, record, template, position, index):
    enc = ConversationEncoder(tokenizer, template, num_image_tokens=2, image_position=position)
    answers = [t.content for t in record.turns[1::2]]
    if template == "plain" and len(answers) > 1:
        with pytest.raises(BadSampleError, match="plain_multi_turn"):
            enc.encode(record, index=index)
        return
    if enc.plain_stop and any(enc.plain_stop in a for a in answers):
        with pytest.raises(BadSampleError, match="stop_text_in_answer") as err:
            enc.encode(record, index=index)
        assert err.value.reason == "special_text"
        enc = ConversationEncoder(
            tokenizer, template, num_image_tokens=2, image_position=position,
            stop_text_in_answer="allow",
        )  # fmt: skip
    sample = enc.encode(record, index=index)
    assert_exact(enc, record, sample, index=index)


def test_random_position_is_reproducible_and_balanced(sp_tokenizer):
    enc = ConversationEncoder(sp_tokenizer, "vicuna_v1", image_position="random", seed=3)
    record = conversation(1)
    firsts = [enc.prepare_turns(record, i, 0)[0].content.startswith("<image>") for i in range(400)]
    assert firsts == [
        enc.prepare_turns(record, i, 0)[0].content.startswith("<image>") for i in range(400)
    ]
    assert 0.4 < np.mean(firsts) < 0.6
    other_epoch = [
        enc.prepare_turns(record, i, 1)[0].content.startswith("<image>") for i in range(400)
    ]
    assert other_epoch != firsts


def test_caption_record_draws_an_instruction(sp_tokenizer):
    enc = ConversationEncoder(sp_tokenizer, "vicuna_v1", seed=1)
    record = Conversation(
        id="c",
        turns=[Turn("user", ""), Turn("assistant", "a red circle")],
        images=["a.png"],
        instruction_pool="brief",
    )
    prompts = {enc.prepare_turns(record, i, 0)[0].content for i in range(50)}
    assert len(prompts) > 3 and all(p.startswith("<image>\n") for p in prompts)
    assert_exact(enc, record, enc.encode(record, index=7), index=7)


def test_truncation_cuts_whole_turns_and_counts_image_expansion(sp_tokenizer):
    record = conversation(5)
    full = ConversationEncoder(sp_tokenizer, "vicuna_v1", num_image_tokens=16).encode(record)
    limit = len(full.input_ids) - 5
    enc = ConversationEncoder(
        sp_tokenizer, "vicuna_v1", num_image_tokens=16, model_max_length=limit
    )
    cut = enc.encode(record)
    assert cut.truncated and len(cut.input_ids) <= limit
    assert (cut.input_ids == full.input_ids[: len(cut.input_ids)]).all()
    assert (cut.labels == full.labels[: len(cut.labels)]).all()
    # it ends exactly after a STOP (EOS) that is trained
    assert cut.input_ids[-1] == sp_tokenizer.eos_token_id and cut.labels[-1] != IGNORE_INDEX
    assert_exact(enc, record, cut)


def test_truncation_never_splits_an_image_run_and_drops_later_images(sp_tokenizer):
    turns = [
        Turn("user", "<image>\nq1"),
        Turn("assistant", "a1"),
        Turn("user", "<image>\nq2"),
        Turn("assistant", "a2"),
    ]
    record = Conversation(id="m", turns=turns, images=["1.png", "2.png"])
    enc = ConversationEncoder(sp_tokenizer, "vicuna_v1", num_image_tokens=50, image_position="keep")
    full = enc.encode(record)
    enc.model_max_length = len(full.input_ids) - 1
    cut = enc.encode(record)
    assert cut.num_images == 1
    assert (cut.input_ids == enc.image_token_id).sum() == 50


def test_sample_that_cannot_fit_one_answer_is_rejected(sp_tokenizer):
    enc = ConversationEncoder(sp_tokenizer, "vicuna_v1", num_image_tokens=64, model_max_length=60)
    with pytest.raises(BadSampleError, match=r"sample 's1'.*model_max_length=60") as err:
        enc.encode(conversation(1))
    assert err.value.reason == "no_trained_tokens"


def test_image_tag_count_mismatch(sp_tokenizer):
    enc = ConversationEncoder(sp_tokenizer, "vicuna_v1")
    record = conversation(1, images=2)
    record.images = ["only-one.png"]
    with pytest.raises(BadSampleError, match=r"field image: 2 <image> tag\(s\).*1 image") as err:
        enc.encode(record)
    assert err.value.reason == "image_tag_mismatch"
    keep = ConversationEncoder(sp_tokenizer, "vicuna_v1", image_position="keep")
    with pytest.raises(BadSampleError, match="image_position 'keep' needs one tag per image"):
        keep.encode(conversation(1, images=1, tag=""))


def test_tokenizer_without_needed_special_tokens(sp_tokenizer_dir):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    with pytest.raises(ValueError, match="no special token '<image>'"):
        ConversationEncoder(bare, "vicuna_v1")
    bare.add_special_tokens({"additional_special_tokens": ["<image>"]})
    with pytest.raises(
        ValueError, match="no special token '<\\|im_start\\|>', needed by template 'chatml'"
    ):
        ConversationEncoder(bare, "chatml")
    assert bare.pad_token is None  # no pad token: encoding works, the collator pads with unk
    ConversationEncoder(bare, "vicuna_v1").encode(conversation(1))


def test_unknown_template_and_position(sp_tokenizer):
    with pytest.raises(KeyError, match="unknown template 'vicuna'"):
        ConversationEncoder(sp_tokenizer, "vicuna")
    with pytest.raises(ValueError, match="image_position must be one of"):
        ConversationEncoder(sp_tokenizer, "vicuna_v1", image_position="middle")


def test_literal_image_tag_text_in_an_answer_is_caught(sp_tokenizer):
    record = conversation(1)
    record.turns[1] = Turn("assistant", "I see <image> here")
    enc = ConversationEncoder(sp_tokenizer, "vicuna_v1")
    with pytest.raises(BadSampleError, match="image"):
        enc.encode(record)
