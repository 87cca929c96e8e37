"""Exact renderings of every template (docs/masking.md) and of their generation prompts."""

from __future__ import annotations

import pytest

from lvlm_tune.data.record import Turn
from lvlm_tune.templates import get_template, render, template_names
from lvlm_tune.templates.chat_template import (
    TemplateError,
    chat_template_stop,
    render_chat_template,
)
from lvlm_tune.templates.render import place_images

LLAVA_SYS = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
TURNS = [Turn("user", "q1"), Turn("assistant", "a1"), Turn("user", "q2"), Turn("assistant", "a2")]

# [[...]] marks the trained spans.
EXPECTED = {
    "llava_v0": f"{LLAVA_SYS}###Human: q1###Assistant: [[a1###]]Human: q2###Assistant: [[a2###]]",
    "vicuna_v1": f"{VICUNA_SYS} USER: q1 ASSISTANT: [[a1</s>]]USER: q2 ASSISTANT: [[a2</s>]]",
    "plain": "[[a1\n]][[a2\n]]",
    "minigpt4": "###Human: q1 ###Assistant: [[a1###]]Human: q2 ###Assistant: [[a2###]]",
    "llama2": "[INST] <<SYS>>\nSYS\n<</SYS>>\n\nq1 [/INST] [[a1 </s>]]<s>[INST] q2 [/INST] [[a2 </s>]]",
    "chatml": (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n"
        "<|im_start|>assistant\n[[a1<|im_end|>]]\n<|im_start|>user\nq2<|im_end|>\n"
        "<|im_start|>assistant\n[[a2<|im_end|>]]\n"
    ),
}
SYSTEMS = {"llama2": "SYS", "chatml": "SYS"}


def marked(name: str, turns=TURNS) -> str:
    out = render(get_template(name), turns, system=SYSTEMS.get(name))
    text = out.text
    for span in reversed(out.spans):
        text = text[: span.start] + "[[" + text[span.start : span.end] + "]]" + text[span.end :]
    return text


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_rendering(name):
    assert marked(name) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_generation_prompt_is_training_prefix_up_to_the_answer(name):
    template = get_template(name)
    train = render(template, TURNS, system=SYSTEMS.get(name))
    prompt = render(template, TURNS[:3], system=SYSTEMS.get(name), add_generation_prompt=True)
    last = train.spans[-1]
    assert prompt.text == train.text[: last.sep_start]
    assert train.text[last.sep_start : last.start] == template.answer_sep


def test_llava_generation_prompt_ends_with_role_tag():
    prompt = render(get_template("vicuna_v1"), TURNS[:1], add_generation_prompt=True).text
    assert prompt == f"{VICUNA_SYS} USER: q1 ASSISTANT:"


@pytest.mark.parametrize(
    ("name", "position", "first_user"),
    [
        ("vicuna_v1", "before", "<image>\nq1"),
        ("vicuna_v1", "after", "q1\n<image>"),
        ("minigpt4", "before", "<Img><image></Img> q1"),
        ("minigpt4", "after", "q1 <Img><image></Img>"),
        ("plain", "after", "<image>"),
    ],
)
def test_image_placement(name, position, first_user):
    turns = [Turn("user", "<image>\nq1"), Turn("assistant", "a1")]
    placed = place_images(turns, 1, position, get_template(name))
    assert placed[0].content == first_user
    assert placed[1] == turns[1]


def test_minigpt4_single_turn_exact():
    turns = place_images(
        [Turn("user", "q1"), Turn("assistant", "a1")], 1, "before", get_template("minigpt4")
    )
    assert marked("minigpt4", turns) == "###Human: <Img><image></Img> q1 ###Assistant: [[a1###]]"


def test_plain_drops_the_question_and_keeps_the_image():
    turns = place_images(
        [Turn("user", "Describe.\n<image>"), Turn("assistant", "a red square")],
        1,
        "keep",
        get_template("plain"),
    )
    assert marked("plain", turns) == "<image>[[a red square\n]]"


def test_keep_position_replaces_tags_in_place():
    turns = [Turn("user", "look <image> here"), Turn("assistant", "ok")]
    placed = place_images(turns, 1, "keep", get_template("minigpt4"))
    assert placed[0].content == "look <Img><image></Img> here"


def test_unknown_template_names_the_choices():
    with pytest.raises(KeyError, match=r"llava_v0.*vicuna_v1.*tokenizer"):
        get_template("vicuna")
    assert "tokenizer" in template_names()


def test_roles_out_of_order_are_rejected():
    with pytest.raises(ValueError, match="turn 1 must be 'assistant'"):
        render(get_template("vicuna_v1"), [Turn("user", "a"), Turn("user", "b")])


def test_tokenizer_chat_template_incremental(bpe_tokenizer):
    stop = chat_template_stop(bpe_tokenizer, ["<|im_start|>", "<|im_end|>"])
    assert stop == "<|im_end|>"
    out = render_chat_template(bpe_tokenizer, TURNS, system="SYS", stop=stop)
    text = out.text
    assert [text[s.start : s.end] for s in out.spans] == ["a1<|im_end|>", "a2<|im_end|>"]
    assert text == bpe_tokenizer.apply_chat_template(
        [{"role": "system", "content": "SYS"}]
        + [{"role": t.role, "content": t.content} for t in TURNS],
        tokenize=False,
    )


def test_tokenizer_chat_template_that_rewrites_history_is_refused(bpe_tokenizer):
    class Rewriting:
        chat_template = "x"
        all_special_tokens = ("<|im_end|>",)

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            n = len(messages)
            return "".join(f"[{n}]{m['content']}<|im_end|>" for m in messages)

    with pytest.raises(TemplateError, match="differently once later turns follow"):
        render_chat_template(Rewriting(), TURNS, stop="<|im_end|>")


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v0", "llama2", "chatml", "minigpt4"])
@pytest.mark.parametrize("position", ["before", "after", "keep"])
def test_placement_moves_first_turn_images_only(name, position):
    """before/after move the first user turn's images; later tags stay where the data put
    them, several per turn, in tag order."""
    template = get_template(name)
    image = template.image_format
    turns = [
        Turn("user", "<image> and <image>: same?"),
        Turn("assistant", "no"),
        Turn("user", "Now <image> then\n<image>"),
        Turn("assistant", "yes"),
    ]
    placed = place_images(turns, 4, position, template)
    join = template.image_join
    first = {
        "before": image + join + image + join + "and : same?",
        "after": "and : same?" + join + image + join + image,
        "keep": f"{image} and {image}: same?",
    }[position]
    assert placed[0].content == first
    assert placed[2].content == f"Now {image} then\n{image}"
    assert placed[1] == turns[1] and placed[3] == turns[3]


@pytest.mark.parametrize("position", ["before", "after"])
def test_untagged_images_all_go_to_the_first_turn(position):
    template = get_template("vicuna_v1")
    turns = [
        Turn("user", "q1"),
        Turn("assistant", "a1"),
        Turn("user", "q2"),
        Turn("assistant", "a2"),
    ]
    placed = place_images(turns, 2, position, template)
    expected = "<image>\n<image>\nq1" if position == "before" else "q1\n<image>\n<image>"
    assert placed[0].content == expected and placed[2] == turns[2]


def test_images_only_in_a_later_turn_leave_the_first_turn_alone():
    template = get_template("minigpt4")
    turns = [Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "<image> this?"),
             Turn("assistant", "a cat")]  # fmt: skip
    placed = place_images(turns, 1, "before", template)
    assert placed[0] == turns[0] and placed[2].content == "<Img><image></Img> this?"
