"""Independent checks of an encoded preference pair (the preference encoder and dataset tests).

Each side must be exactly the SFT encoding of its conversation (prompt + that answer), whose
mask ``masking.assert_exact`` proves from the decoded text and a plain tokenizer call; on top of
it, only the final answer + STOP trains: one run of trained tokens, decoding to the final
answer's trained span of the rendering, starting right after the generation prompt inference
encodes, and that prompt is the same prefix of both sides.
"""

from __future__ import annotations

import numpy as np
from masking import assert_exact, decode, squash, trained_runs

from lvlm_tune.data.encoder import IGNORE_INDEX


def assert_pair_exact(pair_encoder, record, pair, index=0, epoch=0, sizes=None) -> None:
    """``pair`` (``PreferenceEncoder.encode(record, index, epoch, sizes)``) is exact."""
    encoder = pair_encoder.encoder
    tok = encoder.tokenizer
    prompt = encoder.encode_prompt(record.prompt, index, sizes, epoch)
    n = len(prompt)
    assert pair.prompt_length == n and pair.id == record.id
    for side in ("chosen", "rejected"):
        got = getattr(pair, side)
        conversation = record.with_answer(side)
        sft = encoder.encode(conversation, index, epoch, image_sizes=sizes)
        assert_exact(encoder, conversation, sft, index, epoch, sizes)  # the SFT mask is exact
        assert np.array_equal(got.input_ids, sft.input_ids), f"{side}: ids differ from SFT's"
        assert got.image_tokens == sft.image_tokens and got.num_images == pair.num_images
        assert np.array_equal(got.input_ids[:n], prompt), f"{side}: the prompt is no prefix"
        assert (got.labels[:n] == IGNORE_INDEX).all(), f"{side}: a prompt token trains"
        assert np.array_equal(got.labels[n:], sft.labels[n:]), f"{side}: the answer's mask"
        trained = got.labels != IGNORE_INDEX
        assert (got.labels[trained] == got.input_ids[trained]).all()
        assert got.num_trained == int(trained.sum()) > 0
        runs = trained_runs(got)
        assert len(runs) == 1, f"{side}: the trained tokens are not one run"
        rendered = encoder.render(conversation, index, epoch)
        final = rendered.spans[-1]
        answer = rendered.text[final.start : final.end]  # the final answer + STOP as rendered
        assert squash(decode(tok, runs[0])) == squash(answer)
        assert squash(answer).startswith(squash(getattr(record, side)))
        # every earlier answer is in the ids, untrained
        earlier = int((sft.labels[:n] != IGNORE_INDEX).sum())
        assert (earlier > 0) == (len(record.prompt.turns) > 1)
    assert np.array_equal(pair.chosen.input_ids[:n], pair.rejected.input_ids[:n])
