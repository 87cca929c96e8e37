"""Use a tokenizer's own ``chat_template`` with exact label masks, by rendering incrementally.

For each assistant turn we render the conversation up to the user turn before it with the
generation prompt, then with the answer. The rendering must grow by appending (else the
template rewrites history and cannot be masked exactly, and we raise). The appended text is
``separator + answer + rest``: whitespace before the answer is the separator, the answer is
trained, and the STOP is the rest up to and including the first special token (e.g. ``</s>``,
``<|im_end|>``, ``<|eot_id|>``); anything after it (a newline) is not trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lvlm_tune.data.record import Turn
from lvlm_tune.templates.registry import TOKENIZER_TEMPLATE, Template
from lvlm_tune.templates.render import Rendered, Span

# How images are written into user text when the tokenizer's template is used.
CHAT_TEMPLATE_IMAGES = Template(name=TOKENIZER_TEMPLATE)


def _messages(turns: Sequence[Turn], system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": t.role, "content": t.content} for t in turns]


def _apply(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _stop_length(rest: str, special_tokens: Sequence[str]) -> int:
    """Length of the STOP at the start of ``rest``: up to the end of the first special token."""
    best = -1
    for token in special_tokens:
        at = rest.find(token)
        if at >= 0 and (best < 0 or at + len(token) < best):
            best = at + len(token)
    return best


def render_chat_template(
    tokenizer: Any,
    turns: Sequence[Turn],
    *,
    system: str | None = None,
    add_generation_prompt: bool = False,
) -> Rendered:
    """Render ``turns`` with ``tokenizer.chat_template``; same result type as ``render``."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "template 'tokenizer' needs a tokenizer with a chat_template; this one has none "
            "(pick a named template instead)"
        )
    messages = _messages(turns, system)
    offset = len(messages) - len(turns)
    special = [t for t in tokenizer.all_special_tokens if t]
    rendered = Rendered(text="")
    text = ""
    for i in range(1, len(turns), 2):
        prompt = _apply(tokenizer, messages[: offset + i], add_generation_prompt=True)
        full = _apply(tokenizer, messages[: offset + i + 1], add_generation_prompt=False)
        if not prompt.startswith(text) or not full.startswith(prompt):
            raise ValueError(
                "the tokenizer's chat_template rewrites earlier turns when a turn is added, so "
                "its answers cannot be masked exactly; pick a named template instead"
            )
        answer = turns[i].content
        added = full[len(prompt) :]
        at = added.find(answer)
        if at < 0 or added[:at].strip():
            raise ValueError(
                "the tokenizer's chat_template changes the answer text (e.g. strips it); "
                "cannot mask exactly, pick a named template instead"
            )
        stop_len = _stop_length(added[at + len(answer) :], special)
        if stop_len < 0:
            raise ValueError(
                "the tokenizer's chat_template closes an answer with no special token, so "
                "there is no STOP to train; pick a named template instead"
            )
        start = len(prompt) + at
        rendered.spans.append(Span(len(prompt), start, start + len(answer) + stop_len))
        text = full
    if add_generation_prompt:
        final = _apply(tokenizer, messages, add_generation_prompt=True)
        if not final.startswith(text):
            raise ValueError("the tokenizer's chat_template rewrites earlier turns")
        text = final
    rendered.text = text
    return rendered
