"""The exported Jinja chat template renders byte for byte what the training renderer renders."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvlm_tune.data.record import Turn
from lvlm_tune.templates import TEMPLATES, get_template, render
from lvlm_tune.templates.jinja import to_jinja
from lvlm_tune.templates.render import place_images

text = st.text(
    alphabet=st.sampled_from(list("ab c\n#{}%'\"é<>/|")), min_size=1, max_size=12
).filter(str.strip)


def messages_for(turns, system, template):
    """Chat messages as users write them: images as plain <image> tags."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [
        {"role": t.role, "content": t.content.replace(template.image_format, "<image>")}
        for t in turns
    ]


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(sorted(TEMPLATES)),
    qa=st.lists(st.tuples(text, text), min_size=1, max_size=3),
    system=st.none() | st.just("") | text,
    position=st.sampled_from(["before", "after"]),
    images=st.integers(0, 2),
)
def test_jinja_matches_render_for_string_content(bpe_tokenizer, name, qa, system, position, images):
    template = get_template(name)
    turns = [t for q, a in qa for t in (Turn("user", q), Turn("assistant", a))]
    turns = place_images(turns, images, position, template)
    jinja = to_jinja(template, bos="<s>", eos="</s>")
    msgs = messages_for(turns, system, template)
    full = bpe_tokenizer.apply_chat_template(msgs, chat_template=jinja, tokenize=False)
    assert full == render(template, turns, system=system, bos="<s>", eos="</s>").text
    prompt = bpe_tokenizer.apply_chat_template(
        msgs[:-1], chat_template=jinja, tokenize=False, add_generation_prompt=True
    )
    assert (
        prompt
        == render(
            template, turns[:-1], system=system, bos="<s>", eos="</s>", add_generation_prompt=True
        ).text
    )


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v0", "plain", "minigpt4"])
@pytest.mark.parametrize("position", ["before", "after"])
def test_jinja_content_lists_place_images_as_training_does(bpe_tokenizer, name, position):
    template = get_template(name)
    turns = place_images(
        [Turn("user", "What is it?"), Turn("assistant", "a cat")], 1, position, template
    )
    parts = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    if position == "after":
        parts.reverse()
    msgs = [{"role": "user", "content": parts}]
    prompt = bpe_tokenizer.apply_chat_template(
        msgs, chat_template=to_jinja(template), tokenize=False, add_generation_prompt=True
    )
    assert prompt == render(template, turns[:1], add_generation_prompt=True).text
