"""PreferenceEncoder on the project's tiny tokenizers: each side is exactly SFT's encoding, only
the final answer + STOP trains, the prompt is the same on both sides; bad pairs are refused
with their reasons."""

from __future__ import annotations

import copy

import pytest
from preference_masking import assert_pair_exact

from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.preference import PreferenceRecord
from lvlm_tune.data.preference_encoder import PreferenceEncoder
from lvlm_tune.data.record import Conversation, Turn

TEMPLATES = ["llava_v0", "vicuna_v1", "minigpt4", "llama2", "chatml", "tokenizer"]
POSITIONS = ["before", "after", "random", "keep"]


def pair(pair_id, turns, chosen, rejected, images=(), system=None) -> PreferenceRecord:
    prompt = Conversation(
        id=pair_id, turns=list(turns), images=list(images), system=system, source="pairs.json"
    )
    return PreferenceRecord(prompt, chosen, rejected)


def pairs() -> list[PreferenceRecord]:
    return [
        pair("one", [Turn("user", "<image>\nWhat colour is it?")], "Red.", "Blue.", ["x.png"]),
        pair("text", [Turn("user", "Say hello.")], "hello", "goodbye"),
        pair(
            "multi",
            [
                Turn("user", "<image>\nWhat shape?"),
                Turn("assistant", "A square."),
                Turn("user", "And this one? <image>"),
                Turn("assistant", "A circle </s> too."),
                Turn("user", "Which is larger?"),
            ],
            "The square is larger.",
            "\nThe circle, <|im_end|> clearly.",
            ["a.png", "b.png"],
            system="Answer briefly.",
        ),
        pair("prefix", [Turn("user", "Count?")], "two", "two three"),  # one extends the other
        pair("spaces", [Turn("user", "<image> Colour?")], "  red  ", "red!", ["x.png"]),
    ]


def encoders(tokenizer, template, position, **options):
    enc = ConversationEncoder(
        tokenizer, template, num_image_tokens=3, image_position=position, **options
    )
    return enc, PreferenceEncoder(enc)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("position", POSITIONS)
def test_sides_are_sft_encodings_training_only_the_final_answer(tokenizer, template, position):
    enc, pairs_enc = encoders(tokenizer, template, position)
    for record in pairs():
        if enc.plain_stop and any(enc.plain_stop in a for a in (record.chosen, record.rejected)):
            continue
        if position == "keep" and record.images and "<image>" not in record.prompt.turns[0].content:
            continue
        for index, epoch in ((0, 0), (1, 0), (1, 3)):
            encoded = pairs_enc.encode(record, index, epoch)
            assert_pair_exact(pairs_enc, record, encoded, index, epoch)
            assert encoded.num_images == len(record.images)


def test_identical_answers_are_refused(tokenizer):
    _, pairs_enc = encoders(tokenizer, "vicuna_v1", "before")
    record = pair("same", [Turn("user", "Q?")], "Same answer.", "Same answer.")
    with pytest.raises(BadSampleError, match=r"pairs\.json: sample 'same': field rejected") as err:
        pairs_enc.encode(record)
    assert err.value.reason == "identical_answers"


def test_answers_that_encode_the_same_are_identical(sp_tokenizer):
    tok = copy.deepcopy(sp_tokenizer)  # a chat template that trims answers, as Llama-3.1's does
    tok.chat_template = tok.chat_template.replace("{{ m['content'] }}{{ eos", "{{ m['content'] | trim }}{{ eos")  # fmt: skip
    pairs_enc = PreferenceEncoder(ConversationEncoder(tok, "tokenizer"))
    record = pair("trim", [Turn("user", "Q?")], "red", "red  ")
    with pytest.raises(BadSampleError, match="encode to the same trained tokens") as err:
        pairs_enc.encode(record)
    assert err.value.reason == "identical_answers" and err.value.field == "rejected"
    different = pair("ok", [Turn("user", "Q?")], "red", "blue  ")
    assert_pair_exact(pairs_enc, different, pairs_enc.encode(different))


@pytest.mark.parametrize("template", ["vicuna_v1", "chatml"])
def test_a_side_whose_final_answer_is_truncated_away_is_refused(tokenizer, template):
    turns = [Turn("user", "<image>\nQ one?"), Turn("assistant", "short"), Turn("user", "Q two?")]
    record = pair("long", turns, "yes", "no " * 60, ["x.png"])
    enc, pairs_enc = encoders(tokenizer, template, "before")
    chosen = enc.encode(record.with_answer("chosen"))
    enc.model_max_length = len(chosen.input_ids) + 2  # chosen fits, rejected does not
    with pytest.raises(
        BadSampleError, match="field rejected: the final answer does not fit"
    ) as err:
        pairs_enc.encode(record)
    assert err.value.reason == "no_trained_tokens"
    # the encoder alone would have kept the earlier answer and trained it: the pair may not
    assert enc.encode(record.with_answer("rejected")).num_trained > 0
    enc.model_max_length = 8  # not even the first answer fits: refused by the SFT encoder
    with pytest.raises(BadSampleError) as err:
        pairs_enc.encode(record)
    assert err.value.reason == "no_trained_tokens"
    enc.model_max_length = 10_000
    assert_pair_exact(pairs_enc, record, pairs_enc.encode(record))


def test_sft_refusals_reach_the_pair(tokenizer):
    _, pairs_enc = encoders(tokenizer, "vicuna_v1", "before")
    two_tags = pair("tags", [Turn("user", "<image> <image> Q?")], "a", "b", ["x.png"])
    with pytest.raises(BadSampleError) as err:
        pairs_enc.encode(two_tags)
    assert err.value.reason == "image_tag_mismatch" and err.value.sample_id == "tags"
    refusing = PreferenceEncoder(ConversationEncoder(tokenizer, "vicuna_v1", special_text="refuse"))
    with pytest.raises(BadSampleError) as err:
        refusing.encode(pair("ctl", [Turn("user", "Q?")], "fine", "it says <|im_end|>"))
    assert err.value.reason == "special_text"
    plain_stop = PreferenceEncoder(ConversationEncoder(tokenizer, "llava_v0"))
    with pytest.raises(BadSampleError, match="stop_text_in_answer") as err:
        plain_stop.encode(pair("stop", [Turn("user", "Q?")], "fine", "a ### b"))
