"""Exact masks on the published tokenizers in ``../shared/tokenizers``.

Every shared tokenizer x every template that can work with it x every image placement, on
hostile conversations (control-token text in questions and answers, answers that start with a
newline, leading and trailing spaces, plain-text STOPs, unicode), checked independently by
``masking.assert_exact``: trained text is answers + STOPs only, the ids hold exactly the
template's control tokens, and every answer's generation prompt is a prefix of the training ids.
Skips, saying why, where the shared folder is absent.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import pytest
from masking import assert_exact, decode

from lvlm_tune.data.encoder import IGNORE_INDEX, ConversationEncoder
from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.record import Conversation, Turn
from lvlm_tune.models.tokenizer_saving import save_processor
from lvlm_tune.templates.registry import template_special_tokens

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "tokenizers"
NAMES = ["llama2", "llama2-nonlegacy", "llama2-spmconv", "llama3", "qwen2", "phi3"]
NAMED = ["llava_v0", "vicuna_v1", "plain", "minigpt4", "llama2", "chatml"]
POSITIONS = ["before", "after", "random", "keep"]
CONTROL = ["</s>", "<s>", "<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"]

pytestmark = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"the shared published tokenizers are not at {SHARED}"
)
# Loading the large published vocabularies takes most of this file's minute or two: the fast
# loop (`make test-fast`) runs the legacy LLaMA-2 tokenizer with the default image placement,
# `make test` runs everything.
FAST_NAME, FAST_POSITION = "llama2", "before"


def fast_if(fast: bool, *values):
    """``values`` as one parameter set, marked ``slow`` unless ``fast``."""
    return pytest.param(*values, marks=() if fast else pytest.mark.slow)


_CACHE: dict[str, object] = {}


def load(name: str, template: str = "chatml"):
    """The shared tokenizer prepared as ``train`` prepares it, for every template at once (the
    chatml markers are the only ones a template adds), loaded once per test session."""
    from transformers import AutoTokenizer

    if name not in _CACHE:
        tok = AutoTokenizer.from_pretrained(SHARED / name)
        extra = [
            t for t in ("<image>", *template_special_tokens("chatml")) if t not in tok.get_vocab()
        ]
        tok.add_special_tokens({"additional_special_tokens": extra})
        _CACHE[name] = tok
    assert set(template_special_tokens(template)) <= set(_CACHE[name].get_vocab())
    return _CACHE[name]


def combos():
    for name in NAMES:
        templates = NAMED + (["tokenizer"] if name in ("llama3", "qwen2", "phi3") else [])
        for template in templates:
            yield name, template


def hostile() -> list[Conversation]:
    """Conversations nobody would write on purpose, but real data holds."""
    one = lambda q, a, **kw: Conversation(  # noqa: E731
        id=kw.pop("id"), turns=[Turn("user", "<image>\n" + q), Turn("assistant", a)],
        images=["x.png"], **kw,
    )  # fmt: skip
    samples = [
        one("What colour is it?", "Red.", id="plain"),
        one("Quote the marker", "It reads </s> and then <s> again.", id="eos-in-answer"),
        one("What is <|im_end|> here?", "<|im_start|>user is a <|eot_id|> token", id="chatml"),
        one("Say <|endoftext|> and <|end|>", "<|end|> then <|endoftext|>", id="phi-end"),
        one("Lines?", "\nfirst line\n\nsecond line", id="leading-newline"),
        one("Spaces?", "  padded answer  ", id="spaces"),
        one("Unicode?", "café ñandú 中文 😀 4.5", id="unicode"),
        one("Digits?", "1234567", id="digits"),
        one("Ends with a newline", "answer\n", id="trailing-newline"),
        one("Tab", "\tindented", id="tab"),
        one("system", "fine", id="system-control", system="Never say </s> or <|im_end|>."),
        one("Header?", "The header was ###", id="stop-text"),
    ]
    multi = Conversation(
        id="multi",
        turns=[
            Turn("user", "<image>\nFirst </s> question?"),
            Turn("assistant", "\nFirst answer <|im_end|>"),
            Turn("user", "Second?"),
            Turn("assistant", " second <|eot_id|> answer"),
            Turn("user", "Third <|end|>?"),
            Turn("assistant", "third"),
        ],
        images=["x.png"],
    )
    images = Conversation(
        id="images-anywhere",
        turns=[
            Turn("user", "<image> or <image>: which is red?"),
            Turn("assistant", "The first."),
            Turn("user", "And this one?\n<image>"),
            Turn("assistant", "Blue </s> ."),
            Turn("user", "Compare <image>\n<image>"),
            Turn("assistant", "They match."),
        ],
        images=[f"{k}.png" for k in range(5)],
    )
    late = Conversation(
        id="image-later",
        turns=[Turn("user", "Hi"), Turn("assistant", "Hello."), Turn("user", "<image>\nThis?"),
               Turn("assistant", "A cat.")],
        images=["x.png"],
    )  # fmt: skip
    return [*samples, images, late, multi]


def named(sample_id: str) -> Conversation:
    return next(r for r in hostile() if r.id == sample_id)


REPORT: dict[tuple[str, str, str], collections.Counter] = collections.defaultdict(
    collections.Counter
)


@pytest.mark.parametrize(
    ("name", "template"), [fast_if(name == FAST_NAME, name, t) for name, t in combos()]
)
@pytest.mark.parametrize("position", [fast_if(p == FAST_POSITION, p) for p in POSITIONS])
def test_every_template_placement_on_published_tokenizers(name, template, position):
    tok = load(name, template)
    enc = ConversationEncoder(tok, template, num_image_tokens=3, image_position=position)
    counts = REPORT[(name, template, position)]
    for record in hostile():
        answers = [t.content for t in record.turns[1::2]]
        if template == "plain" and len(answers) > 1:
            with pytest.raises(BadSampleError, match="plain_multi_turn"):
                enc.encode(record)
            counts["refused: plain template, several answers"] += 1
            continue
        if enc.plain_stop and any(enc.plain_stop in a for a in answers):
            with pytest.raises(BadSampleError, match="stop_text_in_answer"):
                enc.encode(record)
            counts["refused: plain-text STOP in an answer"] += 1
            continue
        for index in range(2):
            sample = enc.encode(record, index=index)
            assert_exact(enc, record, sample, index=index)
        counts["encoded"] += 1
        counts["escaped control texts"] += sample.num_escaped
    refused = sum(v for k, v in counts.items() if k.startswith("refused"))
    assert counts["encoded"] + refused == len(hostile()), counts
    assert counts["encoded"] >= len(hostile()) - (4 if template == "plain" else 1), counts


def test_zz_report(capsys):
    """Prints the per tokenizer x template x placement table (run with -s to see it)."""
    if not REPORT:
        pytest.skip("the grid did not run in this session")
    lines = ["tokenizer template position: encoded / refused (why) / escaped control texts"]
    for (name, template, position), c in sorted(REPORT.items()):
        refused = {k: v for k, v in c.items() if k.startswith("refused")}
        lines.append(f"{name} {template} {position}: {c['encoded']} / {refused or 0} / "
                     f"{c['escaped control texts']}")  # fmt: skip
    with capsys.disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("name", [fast_if(name == FAST_NAME, name) for name in NAMES])
def test_escape_refuse_allow(name):
    tok = load(name, "vicuna_v1")
    record = hostile()[1]  # "It reads </s> and then <s> again."
    eos = tok.convert_tokens_to_ids("</s>")
    escaped = ConversationEncoder(tok, "vicuna_v1").encode(record)
    trained = escaped.input_ids[escaped.labels != IGNORE_INDEX].tolist()
    if eos is not None and eos != tok.unk_token_id:
        assert trained.count(eos) == (1 if tok.eos_token == "</s>" else 0)  # the STOP alone
    controls = [t for t in ("</s>", "<s>") if t in tok.get_added_vocab()]
    assert escaped.num_escaped == len(controls)
    text = decode(tok, trained)
    assert "It reads </s> and then <s> again." in text
    if not controls:  # LLaMA-3 and Qwen2 have no such control tokens: nothing to refuse
        return
    with pytest.raises(BadSampleError, match="'</s>'") as err:
        ConversationEncoder(tok, "vicuna_v1", special_text="refuse").encode(record)
    assert err.value.reason == "special_text" and "turn 2 (assistant)" in str(err.value)
    allowed = ConversationEncoder(tok, "vicuna_v1", special_text="allow").encode(record)
    if tok.eos_token == "</s>":
        assert allowed.input_ids.tolist().count(eos) == 2  # today's behaviour, on request


def test_plain_text_stop_in_answer_is_refused_unless_allowed():
    tok = load("llama2", "llava_v0")
    record = named("stop-text")  # "The header was ###"
    for template in ("llava_v0", "minigpt4"):
        with pytest.raises(BadSampleError, match="'###'") as err:
            ConversationEncoder(tok, template).encode(record)
        assert err.value.reason == "special_text"
        sample = ConversationEncoder(tok, template, stop_text_in_answer="allow").encode(record)
        assert sample.num_trained > 0


@pytest.mark.slow
def test_qwen2_newline_answer_keeps_the_prompt_a_prefix():
    """The prompt's final newline and the answer's leading one merge into one token in a plain
    call; the encoder cuts there, so inference's prompt ids are a prefix of the training ids."""
    tok = load("qwen2", "chatml")
    record = hostile()[4]  # answer "\nfirst line\n\nsecond line"
    for template in ("chatml", "tokenizer"):
        enc = ConversationEncoder(tok, template)
        text = enc.render(record).text
        plain = tok(text, return_offsets_mapping=True)
        prompt_end = enc.render(record).spans[0].sep_start
        assert any(a < prompt_end < b for a, b in plain["offset_mapping"]), "no merge to test"
        sample = enc.encode(record)
        prompt = tok(text[:prompt_end])["input_ids"]  # what plain transformers feeds
        assert sample.input_ids[: len(prompt)].tolist() == prompt
        assert_exact(enc, record, sample)


@pytest.mark.slow
def test_stop_comes_from_the_template():
    """Phi-3.5 ends a turn with <|end|> (not its EOS <|endoftext|>), Llama-3.1 with
    <|eot_id|>, Qwen2.5 with <|im_end|>: exactly that trains, once per answer."""
    multi = hostile()[-1]
    for name, stop in (("phi3", "<|end|>"), ("llama3", "<|eot_id|>"), ("qwen2", "<|im_end|>")):
        tok = load(name, "tokenizer")
        enc = ConversationEncoder(tok, "tokenizer")
        assert enc.stop == stop
        record = Conversation(id="m", turns=[Turn(t.role, t.content.replace("<", "(")) for t in
                                             multi.turns], images=multi.images)  # fmt: skip
        sample = enc.encode(record)
        trained = sample.input_ids[sample.labels != IGNORE_INDEX].tolist()
        stop_id = tok.convert_tokens_to_ids(stop)
        assert trained.count(stop_id) == 3
        other = {tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>",)} - {stop_id}
        assert not other & set(trained), "a token after the end of turn is trained"


@pytest.mark.slow
def test_trimming_template_follows_the_rendered_text():
    tok = load("llama3", "tokenizer")
    enc = ConversationEncoder(tok, "tokenizer")
    record = hostile()[5]  # "  padded answer  "
    sample = enc.encode(record)
    trained = sample.input_ids[sample.labels != IGNORE_INDEX].tolist()
    assert decode(tok, trained).strip() == "padded answer<|eot_id|>"


@pytest.mark.slow
def test_template_render_error_is_a_bad_sample():
    from transformers import AutoTokenizer

    raising = AutoTokenizer.from_pretrained(SHARED / "qwen2")
    raising.add_special_tokens({"additional_special_tokens": ["<image>"]})
    raising.chat_template = (
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}"
        "{{ raise_exception('no forbidden words') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    enc = ConversationEncoder(raising, "tokenizer")
    assert enc.stop == "<|im_end|>"
    bad = Conversation(id="b7", turns=[Turn("user", "a forbidden word"), Turn("assistant", "x")])
    with pytest.raises(BadSampleError, match="no forbidden words") as err:
        enc.encode(bad)
    assert err.value.reason == "template" and err.value.sample_id == "b7"
    good = Conversation(id="g", turns=[Turn("user", "fine"), Turn("assistant", "x")])
    assert enc.encode(good).num_trained > 0


@pytest.mark.slow
def test_multi_turn_phi3_renders_history_and_masks_exactly():
    """Phi-3.5 closes a finished conversation with EOS but not a turn followed by another one:
    each generation prompt is still a prefix of the whole rendering, so multi-turn data works."""
    tok = load("phi3", "tokenizer")
    enc = ConversationEncoder(tok, "tokenizer", image_position="keep")
    record = hostile()[-1]
    sample = enc.encode(record)
    assert_exact(enc, record, sample)
    assert enc.render(record).text.endswith("<|end|>\n<|endoftext|>")


def test_plain_is_one_image_and_one_caption():
    tok = load("llama2", "plain")
    record = hostile()[-1]
    with pytest.raises(BadSampleError, match="plain_multi_turn: first") as err:
        ConversationEncoder(tok, "plain").encode(record)
    assert err.value.reason == "template" and "'plain'" in str(err.value)
    first = ConversationEncoder(tok, "plain", plain_multi_turn="first").encode(record)
    trained = first.input_ids[first.labels != IGNORE_INDEX].tolist()
    assert decode(tok, trained).strip().startswith("First answer")
    assert "second" not in decode(tok, trained)


@pytest.mark.parametrize("position", ["before", "after", "random", "keep"])
def test_image_tag_in_a_later_turn_stays_there(position):
    """Placement applies to the first user turn; an image tagged in a later turn stays in it,
    is expanded there and trains nothing."""
    tok = load("llama2", "vicuna_v1")
    record = named("image-later")  # "Hi" / "Hello." / "<image>\nThis?" / "A cat."
    enc = ConversationEncoder(tok, "vicuna_v1", image_position=position, num_image_tokens=4)
    sample = enc.encode(record)
    assert_exact(enc, record, sample)
    text = enc.render(record).text
    assert "USER: Hi ASSISTANT:" in text and "USER: <image>\nThis? ASSISTANT:" in text
    assert sample.num_images == 1 and sample.image_tokens == [4]
    image_at = sample.input_ids.tolist().index(enc.image_token_id)
    stops = [k for k, t in enumerate(sample.labels.tolist()) if t == tok.eos_token_id]
    assert stops[0] < image_at < stops[1]  # between the first answer and the second


def test_tag_and_image_count_mismatch_is_still_refused():
    tok = load("llama2", "vicuna_v1")
    record = named("image-later")
    two = Conversation(id="two", turns=record.turns, images=["a.png", "b.png"])
    for position in POSITIONS:
        with pytest.raises(BadSampleError, match=r"1 <image> tag\(s\) in the text but 2") as err:
            ConversationEncoder(tok, "vicuna_v1", image_position=position).encode(two)
        assert err.value.reason == "image_tag_mismatch"


HOSTILE_STRINGS = [
    "Hello world", " leading space", "<s>Hi</s> there", "</s> after", "a\n\nb", "  two",
    "x<|im_end|>y", "é café 123", "\n\nfoo", "ASSISTANT: Paris", "[INST] x [/INST]", "<image>z",
    "<|eot_id|><|end|> q", "tab\tand\r\nwindows", "😀 emoji", "   ", "###Human:",
]  # fmt: skip


@pytest.mark.parametrize("name", [fast_if(name == FAST_NAME, name) for name in NAMES])
def test_saved_tokenizer_tokenizes_as_training_did(name):
    """Every folder the project writes reloads tokenizing identically (``legacy`` survives)."""
    from transformers import AutoTokenizer

    tok = load(name, "chatml")
    with tempfile.TemporaryDirectory() as out:
        save_processor(tok, out)
        again = AutoTokenizer.from_pretrained(out)
        for s in HOSTILE_STRINGS:
            assert again(s)["input_ids"] == tok(s)["input_ids"], (name, s)
            assert (
                again(s, add_special_tokens=False)["input_ids"]
                == tok(s, add_special_tokens=False)["input_ids"]
            )


@pytest.mark.slow
def test_inference_stops_at_the_template_stop():
    """Generation ends where training's STOP is: Phi-3.5's <|end|> id joins the EOS ids."""
    from types import SimpleNamespace

    from lvlm_tune.inference.answer import Answerer

    tok = load("phi3", "tokenizer")
    enc = ConversationEncoder(tok, "tokenizer")
    answerer = Answerer(None, SimpleNamespace(tokenizer=tok), enc, None)
    kwargs = answerer.stop_kwargs()
    assert tok.convert_tokens_to_ids("<|end|>") in kwargs["eos_token_id"]
    assert "stop_strings" not in kwargs
    hashes = Answerer(
        None, SimpleNamespace(tokenizer=tok), ConversationEncoder(tok, "llava_v0"), None
    )
    assert hashes.stop_kwargs()["stop_strings"] == ["###"]
