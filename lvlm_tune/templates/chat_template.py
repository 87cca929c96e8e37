"""Use a tokenizer's own ``chat_template`` with exact label masks.

The training text is the template's rendering of the whole conversation. For each answer the
template also renders the generation prompt (the conversation up to the user turn before it,
with ``add_generation_prompt``); that prompt must be a prefix of the training text, or the
model would be trained on a context inference never shows it, and the sample is refused. What
follows the prompt is ``separator + answer + STOP``: leading whitespace is the separator, the
answer is the message as the template wrote it (templates that ``trim`` it are followed), and the
STOP is the template's end-of-turn text, found once by rendering a probe conversation: what
follows an answer both when the conversation ends there and when another user turn follows, up
to the last control token in it (``<|im_end|>``, ``<|eot_id|>``, Phi-3's ``<|end|>``). Text the
template writes after it (a newline, a closing EOS) is not trained.

Every failure to render or to mask raises :class:`TemplateError`, which the encoder reports as
a bad sample (file, sample id, field) so that ``on_bad_sample: skip`` applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lvlm_tune.templates.messages import Turn
from lvlm_tune.templates.registry import TOKENIZER_TEMPLATE, Template
from lvlm_tune.templates.render import Rendered, Span

# How images are written into user text when the tokenizer's template is used.
CHAT_TEMPLATE_IMAGES = Template(name=TOKENIZER_TEMPLATE)

# Probe contents: code points no data or template uses (the last of Unicode's private use area).
_PROBE_USER, _PROBE_ANSWER, _PROBE_NEXT = "\U0010fffb", "\U0010fffc", "\U0010fffd"


class TemplateError(ValueError):
    """The tokenizer's chat template cannot render or exactly mask a conversation."""


def _messages(turns: Sequence[Turn], system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": t.role, "content": t.content} for t in turns]


def _apply(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # Jinja raises many kinds (TemplateError, TypeError, KeyError ...)
        raise TemplateError(
            f"the tokenizer's chat_template failed to render it: {type(err).__name__}: {err}"
        ) from err


def check_chat_template(tokenizer: Any) -> None:
    """Raise ``ValueError`` unless ``tokenizer`` has a chat template to render with."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "template 'tokenizer' needs a tokenizer with a chat_template; this one has none "
            "(pick a named template instead)"
        )


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def chat_template_stop(tokenizer: Any, control_tokens: Sequence[str]) -> str:
    """The template's end-of-turn text (the STOP trained after every answer).

    Args:
        tokenizer: a tokenizer with a ``chat_template``.
        control_tokens: the tokenizer's added-token texts.

    Raises:
        ValueError: the template cannot render the probe, or ends answers with no control
            token (there would be no STOP for the model to learn).
    """
    check_chat_template(tokenizer)
    user = {"role": "user", "content": _PROBE_USER}
    answer = {"role": "assistant", "content": _PROBE_ANSWER}
    nxt = {"role": "user", "content": _PROBE_NEXT}
    try:
        last = _apply(tokenizer, [user, answer], add_generation_prompt=False)
        middle = _apply(tokenizer, [user, answer, nxt], add_generation_prompt=False)
    except TemplateError as err:
        raise ValueError(
            f"template 'tokenizer': cannot render a probe conversation: {err}"
        ) from None
    if _PROBE_ANSWER not in last or _PROBE_ANSWER not in middle:
        raise ValueError("template 'tokenizer': the chat_template does not write the answer text")
    closing = _common_prefix(
        last[last.index(_PROBE_ANSWER) + 1 :], middle[middle.index(_PROBE_ANSWER) + 1 :]
    )
    end = max((closing.rfind(t) + len(t) for t in control_tokens if t and t in closing), default=-1)
    if end <= 0:
        raise ValueError(
            "template 'tokenizer': the chat_template closes an answer with no special token "
            f"(it writes {closing!r}), so there is no STOP to train; pick a named template"
        )
    return closing[:end]


def _answer_span(rest: str, answer: str, stop: str, offset: int, k: int) -> tuple[int, int]:
    """``(start, end)`` in the full text of answer ``k`` as rendered, plus its STOP."""
    for shown in dict.fromkeys((answer, answer.strip())):
        at = rest.find(shown) if shown else -1
        if at >= 0 and not rest[:at].strip() and rest[at + len(shown) :].startswith(stop):
            return offset + at, offset + at + len(shown) + len(stop)
    raise TemplateError(
        f"the tokenizer's chat_template does not write answer {k} as its text followed by the "
        f"end-of-turn {stop!r}, so it cannot be masked exactly"
    )


def render_chat_template(
    tokenizer: Any,
    turns: Sequence[Turn],
    *,
    stop: str,
    system: str | None = None,
    add_generation_prompt: bool = False,
) -> Rendered:
    """Render ``turns`` with ``tokenizer.chat_template``; same result type as ``render``.

    Args:
        tokenizer: a tokenizer with a ``chat_template``.
        turns: alternating user/assistant turns, images already placed.
        stop: the end-of-turn text (:func:`chat_template_stop`).
        system: system prompt, or ``None`` for none.
        add_generation_prompt: ``turns`` ends with a user turn; render the prompt to answer it.

    Raises:
        TemplateError: the template fails, or a generation prompt is not a prefix of the text.
    """
    messages = _messages(turns, system)
    offset = len(messages) - len(turns)
    text = _apply(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    rendered = Rendered(text=text)
    for i in range(1, len(turns), 2):
        prompt = _apply(tokenizer, messages[: offset + i], add_generation_prompt=True)
        if not text.startswith(prompt):
            raise TemplateError(
                f"the tokenizer's chat_template renders the conversation before answer "
                f"{i // 2 + 1} differently once later turns follow, so the training context "
                "would not be the generation prompt; pick a named template"
            )
        start, end = _answer_span(
            text[len(prompt) :], turns[i].content, stop, len(prompt), i // 2 + 1
        )
        rendered.spans.append(Span(len(prompt), start, end))
    return rendered
