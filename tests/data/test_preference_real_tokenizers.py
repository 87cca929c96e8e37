"""Exact preference masks on the published tokenizers in ``../shared/tokenizers``.

Every shared tokenizer x every template that works with it (the tokenizer's own chat template
for LLaMA-3, Qwen2 and Phi-3) x image placements, on pairs made from the hostile
conversations of ``test_real_tokenizers`` (control-token text, leading newlines, padded and
unicode answers, images in later turns, several earlier answers as context), each side checked
by ``preference_masking.assert_pair_exact``: its ids are SFT's, only the final answer + STOP
trains, and the generation prompt is the same prefix of both sides.
"""

from __future__ import annotations

import pytest
from preference_masking import assert_pair_exact
from test_real_tokenizers import FAST_NAME, NAMES, SHARED, combos, fast_if, hostile, load

from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.preference import PreferenceRecord
from lvlm_tune.data.preference_encoder import PreferenceEncoder
from lvlm_tune.data.record import Conversation

pytestmark = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"the shared published tokenizers are not at {SHARED}"
)
REJECTED = [
    "\nNo </s> it is not.",
    "  something else  ",
    "<|eot_id|> wrong <|im_end|>",
    "ñandú 中文 😀 7",
    "Blue.",
]


def hostile_pairs() -> list[PreferenceRecord]:
    """Every hostile conversation as a pair: its last answer chosen, a hostile one rejected."""
    out = []
    for k, conv in enumerate(hostile()):
        prompt = Conversation(
            id=conv.id, turns=conv.turns[:-1], images=conv.images, system=conv.system,
            source="pairs.json",
        )  # fmt: skip
        rejected = REJECTED[k % len(REJECTED)]
        if rejected == conv.turns[-1].content:
            rejected = REJECTED[(k + 1) % len(REJECTED)]
        out.append(PreferenceRecord(prompt, conv.turns[-1].content, rejected))
    return out


@pytest.mark.parametrize(
    ("name", "template"), [fast_if(name == FAST_NAME, name, t) for name, t in combos()]
)
@pytest.mark.parametrize("position", ["before", fast_if(False, "random")])
def test_pairs_on_published_tokenizers(name, template, position):
    tok = load(name, template)
    enc = ConversationEncoder(tok, template, num_image_tokens=3, image_position=position)
    pairs_enc = PreferenceEncoder(enc)
    encoded = 0
    for record in hostile_pairs():
        answers = [t.content for t in record.prompt.turns[1::2]] + [record.chosen, record.rejected]
        if template == "plain" and len(record.prompt.turns) > 1:
            with pytest.raises(BadSampleError, match="plain_multi_turn"):
                pairs_enc.encode(record)
            continue
        if enc.plain_stop and any(enc.plain_stop in a for a in answers):
            with pytest.raises(BadSampleError, match="stop_text_in_answer"):
                pairs_enc.encode(record)
            continue
        for index, epoch in ((0, 0), (1, 2)):
            pair = pairs_enc.encode(record, index, epoch)
            assert_pair_exact(pairs_enc, record, pair, index, epoch)
        encoded += 1
    assert encoded >= len(hostile_pairs()) - (4 if template == "plain" else 1)


@pytest.mark.parametrize("name", [fast_if(name == FAST_NAME, name) for name in NAMES])
def test_identical_and_truncated_pairs_on_published_tokenizers(name):
    tok = load(name, "vicuna_v1")
    enc = ConversationEncoder(tok, "vicuna_v1", num_image_tokens=3)
    pairs_enc = PreferenceEncoder(enc)
    record = next(r for r in hostile_pairs() if r.id == "multi")
    same = PreferenceRecord(record.prompt, record.chosen, record.chosen)
    with pytest.raises(BadSampleError, match="field rejected") as err:
        pairs_enc.encode(same)
    assert err.value.reason == "identical_answers"
    long = PreferenceRecord(record.prompt, record.chosen, record.chosen + " and more" * 40)
    enc.model_max_length = len(enc.encode(long.with_answer("chosen")).input_ids) + 1
    with pytest.raises(
        BadSampleError, match="field rejected: the final answer does not fit"
    ) as err:
        pairs_enc.encode(long)
    assert err.value.reason == "no_trained_tokens"
