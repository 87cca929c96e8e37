"""Independent checks of an encoded sample (used by the encoder tests and property tests).

They do not use offsets: trained tokens are decoded back to text with the tokenizer, and the
ids are compared with a plain tokenizer call on the rendered text (where the data spells no
control token and no token spans a generation prompt's end), or else checked to hold exactly
the control tokens the template wrote. Every answer's generation prompt, as inference encodes
it, is checked to be a prefix of the training ids.
"""

from __future__ import annotations

import numpy as np

from lvlm_tune.data.encoder import IGNORE_INDEX
from lvlm_tune.data.record import Conversation, Turn


def squash(text: str) -> str:
    return "".join(text.split())


def decode(tokenizer, ids) -> str:
    return tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(list(ids)))


def trained_runs(sample) -> list[np.ndarray]:
    """Contiguous runs of trained token ids."""
    trained = sample.labels != IGNORE_INDEX
    runs, current = [], []
    for tok, is_trained in zip(sample.input_ids, trained, strict=True):
        if is_trained:
            current.append(tok)
        elif current:
            runs.append(np.array(current))
            current = []
    if current:
        runs.append(np.array(current))
    return runs


def collapse_images(ids: np.ndarray, image_id: int, counts: list[int]) -> list[int]:
    """``ids`` with each image's run (``counts[k]`` tokens for image ``k``) as one token; every
    run is whole and there are exactly ``len(counts)`` of them."""
    out, i, k = [], 0, 0
    while i < len(ids):
        out.append(int(ids[i]))
        if ids[i] == image_id:
            assert k < len(counts), "more image tokens than the sample's images account for"
            n = counts[k]
            assert (ids[i : i + n] == image_id).all(), f"image {k}'s run is shorter than {n}"
            i, k = i + n, k + 1
        else:
            i += 1
    assert k == len(counts), f"{k} image runs for {len(counts)} kept images"
    return out


def history_images(record, turns) -> list:
    """The images a conversation cut to ``turns`` holds: those tagged in them (all, untagged)."""
    tags = sum(t.content.count("<image>") for t in record.turns)
    if not tags:
        return list(record.images)
    return list(record.images[: sum(t.content.count("<image>") for t in turns)])


def assert_exact(encoder, record, sample, index=0, epoch=0, sizes=None) -> None:
    """The mask is exact: trained text == answers + STOPs, nothing else, ids == tokenizer's.

    ``sizes``: the images' ``(height, width)`` when their token counts depend on sizes."""
    tok = encoder.tokenizer
    rendered = encoder.render(record, index, epoch)
    text = rendered.text
    add_special = not (encoder.bos and text.startswith(encoder.bos))
    reference = tok(text, add_special_tokens=add_special)["input_ids"]
    ids = sample.input_ids
    assert (
        sample.labels[sample.labels != IGNORE_INDEX] == ids[sample.labels != IGNORE_INDEX]
    ).all()
    # every kept image is one whole run of its own count, never trained
    image = ids == encoder.image_token_id
    assert not (sample.labels[image] != IGNORE_INDEX).any(), "an image token is trained"
    counts = list(sample.image_tokens)
    assert len(counts) == sample.num_images and image.sum() == sum(counts)
    if encoder.num_image_tokens is not None:
        assert counts == [encoder.num_image_tokens] * sample.num_images
    else:
        kept_sizes = list(sizes[: sample.num_images])
        assert counts == encoder.image_counter(kept_sizes), "counts are not the counter's"
    collapsed = collapse_images(ids, encoder.image_token_id, counts)
    if data_spells_control(encoder, record):
        assert_template_controls(encoder, record, collapsed, index, epoch)
    elif collapsed != (reference if not sample.truncated else reference[: len(collapsed)]):
        # Only allowed where one token of the plain call spans a prompt's or a STOP's end.
        points = {p for span in rendered.spans for p in (span.sep_start, span.end)}
        enc = tok(text, add_special_tokens=add_special, return_offsets_mapping=True)
        spanning = [p for p in points for a, b in enc["offset_mapping"] if a < p < b]
        assert spanning, "input_ids differ from the tokenizer's output"
        assert (
            decode(tok, collapsed) == decode(tok, reference[: len(collapsed)]) or sample.truncated
        )
    assert_prompt_prefixes(encoder, record, sample, index, sizes)
    if tok.bos_token_id is not None and ids[0] == tok.bos_token_id:
        assert sample.labels[0] == IGNORE_INDEX, "BOS is trained"
    # decoded trained text == each answer + STOP, in order
    answers = [text[span.start : span.end] for span in rendered.spans]  # answer + STOP as rendered
    stop = encoder.template.stop_text(encoder.eos) if not encoder.chat_template else None
    for k, turn in enumerate(record.turns[1::2]):
        # a tokenizer's chat template may trim the answer (Llama-3.1): masks follow its text
        trimmed = encoder.chat_template and answers[k].startswith(turn.content.strip())
        assert answers[k].startswith(turn.content) or trimmed
        if stop is not None:
            assert answers[k] == turn.content + stop
    runs = trained_runs(sample)
    kept = answers[: len(runs)] if len(runs) == len(answers) else answers
    decoded = "".join(decode(tok, run) for run in runs)
    if not sample.truncated:
        assert squash(decoded) == squash("".join(kept)), (decoded, kept)
    else:
        assert squash("".join(answers)).startswith(squash(decoded))
        assert decoded.strip(), "a truncated sample kept no trained text"
    # separate answers stay separate runs unless the template puts nothing untrained between
    merged = any(
        a.end == b.sep_start == b.start
        for a, b in zip(rendered.spans, rendered.spans[1:], strict=False)
    )
    if not merged and not sample.truncated:
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers, strict=True):
            assert squash(decode(tok, run)) == squash(answer)


def data_spells_control(encoder, record) -> bool:
    """The record's text holds control-token text that the encoder escapes."""
    if encoder.special_text != "escape":
        return False
    texts = [record.system or ""] + [t.content for t in record.turns]
    return any(encoder.exact.find_control(t) for t in texts)


def assert_template_controls(encoder, record, collapsed, index, epoch) -> None:
    """The ids hold exactly the template's control tokens: those of the same conversation with
    every control-token text of the data replaced by ``@``, tokenized by a plain call."""
    tok = encoder.tokenizer
    exact = encoder.exact

    def scrub(text):
        for a, b in reversed(exact.find_control(text)):
            text = text[:a] + "@" + text[b:]
        return text

    clean = Conversation(
        id=record.id,
        turns=[Turn(t.role, scrub(t.content)) for t in record.turns],
        images=record.images,
        system=scrub(record.system) if record.system else record.system,
    )
    text = encoder.render(clean, index, epoch).text
    add_special = not (encoder.bos and text.startswith(encoder.bos))
    plain = tok(text, add_special_tokens=add_special)["input_ids"]
    controls = set(exact.control.values())
    assert [t for t in collapsed if t in controls] == [t for t in plain if t in controls]


def assert_prompt_prefixes(encoder, record, sample, index, sizes=None) -> None:
    """Before every kept answer, the generation prompt inference encodes is a prefix of the ids
    (the prompt holds the images tagged up to that question).

    OneVision encodes a sample of several images at base resolution and a single image with
    anyres tiles, so a prompt showing fewer images than the sample may expand them to other
    counts: there the ids must agree with each image run taken as one token."""
    full = sample.input_ids.tolist()
    image_id = encoder.image_token_id
    for k in range(len(record.turns) // 2):
        turns = record.turns[: 2 * k + 1]
        images = history_images(record, turns)
        history = Conversation(
            id=record.id,
            turns=turns,
            images=images,
            system=record.system,
            instruction_pool=record.instruction_pool,
        )
        if len(images) > sample.num_images:
            assert sample.truncated, f"answer {k + 1}'s images are missing from the sample"
            return  # truncation dropped this answer with its images
        kept_sizes = None if sizes is None else list(sizes[: len(images)])
        prompt = encoder.encode_prompt(history, index, image_sizes=kept_sizes).tolist()
        counts = encoder.image_counter(kept_sizes or [(0, 0)] * len(images)) if images else []
        ids = full
        if counts != sample.image_tokens[: len(counts)]:
            assert encoder.num_image_tokens is None and len(images) < sample.num_images
            prompt = collapse_images(np.asarray(prompt), image_id, counts)
            ids = collapse_images(sample.input_ids, image_id, sample.image_tokens)
        if len(prompt) >= len(ids):
            assert sample.truncated, f"the prompt of answer {k + 1} is not shorter than the sample"
            return
        assert ids[: len(prompt)] == prompt, f"the generation prompt of answer {k + 1} is no prefix"
