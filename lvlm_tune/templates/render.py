"""The one renderer: a conversation -> text plus the character spans that are trained.

Training and inference both call :func:`render`, so the prompt a model sees when it answers is
byte for byte the prefix it was trained on. For training the result carries, per assistant turn,
the span ``[start, end)`` of answer + STOP (trained) and the separator before it (which a
tokenizer may merge into the first answer token). :func:`place_images` puts the first user turn's
images before or after its question (``before`` / ``after``) and every other image where the
data put its tag (``keep`` leaves all of them there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lvlm_tune.templates.messages import IMAGE_TAG, Turn
from lvlm_tune.templates.registry import Template

IMAGE_POSITIONS = ("before", "after", "random", "keep")


@dataclass(frozen=True)
class Span:
    """A trained answer: ``text[start:end]`` is answer + STOP; ``text[sep_start:start]`` is the
    separator before it (e.g. the space after ``ASSISTANT:``). The generation prompt ends before
    the separator, so its tokens are trained, merged into the first answer token or alone."""

    sep_start: int
    start: int
    end: int


@dataclass
class Rendered:
    """Rendered text and the trained span of every answer, in order."""

    text: str
    spans: list[Span] = field(default_factory=list)


def place_images(
    turns: Sequence[Turn], num_images: int, position: str, template: Template
) -> list[Turn]:
    """Write the template's image string for each image into the user turns.

    ``keep`` replaces every ``<image>`` tag in place. ``before``/``after`` apply to the first
    user turn only: the images whose tags are in it (all ``num_images`` when the conversation
    has no tag at all) are put before/after its question, joined with ``template.image_join``;
    tags in later turns are replaced in place, as under ``keep``. Either way the images keep
    the order of their tags. ``random`` must be resolved to ``before``/``after`` by the caller
    (it is per sample).
    """
    if position not in ("before", "after", "keep"):
        raise ValueError(f"image position must be before, after or keep here, got {position!r}")
    out = [
        Turn(
            t.role,
            t.content.replace(IMAGE_TAG, template.image_format) if t.role == "user" else t.content,
        )
        for t in turns
    ]
    if position == "keep" or not turns:
        return out
    first = turns[0]
    tagged = any(IMAGE_TAG in t.content for t in turns)
    count = first.content.count(IMAGE_TAG) if tagged else num_images
    if count == 0:
        return out
    question = first.content.replace(IMAGE_TAG, "").strip()
    images = template.image_join.join([template.image_format] * count)
    if template.drop_question or not question:
        content = images
    elif position == "before":
        content = images + template.image_join + question
    else:
        content = question + template.image_join + images
    out[0] = Turn(first.role, content)
    return out


def _check_turns(turns: Sequence[Turn], add_generation_prompt: bool) -> None:
    for i, turn in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if turn.role != want:
            raise ValueError(f"turn {i} must be {want!r}, got {turn.role!r}")
    expected_last = "user" if add_generation_prompt else "assistant"
    if not turns or turns[-1].role != expected_last:
        raise ValueError(f"a conversation to render must end with an {expected_last} turn")


def render(
    template: Template,
    turns: Sequence[Turn],
    *,
    system: str | None = None,
    bos: str = "<s>",
    eos: str = "</s>",
    add_generation_prompt: bool = False,
) -> Rendered:
    """Render alternating user/assistant ``turns`` with ``template``.

    Args:
        template: the template table.
        turns: user/assistant turns; images already placed (see :func:`place_images`).
        system: system prompt; ``None`` uses the template's default.
        bos: the tokenizer's BOS string (templates that repeat it between turns).
        eos: the tokenizer's EOS string (templates whose STOP is the EOS token).
        add_generation_prompt: render for inference: ``turns`` ends with a user turn and the
            text ends where the model starts its answer.

    Returns:
        The text and the trained span of every answer.
    """
    _check_turns(turns, add_generation_prompt)
    system_text = template.default_system if system is None else system
    system_block = ""
    if template.system_format and not (template.omit_empty_system and not system_text):
        system_block = template.system_format.format(system=system_text)
    stop = template.stop_text(eos)
    separator = template.turn_separator.replace("{bos}", bos)

    parts: list[str] = []
    length = 0
    rendered = Rendered(text="")

    def emit(piece: str) -> None:
        nonlocal length
        parts.append(piece)
        length += len(piece)

    if not template.system_in_first_user:
        emit(system_block)
    for i in range(0, len(turns), 2):
        if i:
            emit(separator)
        emit(template.user_prefix)
        if i == 0 and template.system_in_first_user:
            emit(system_block)
        if template.drop_question:
            num_images = turns[i].content.count(template.image_format)
            emit(template.image_join.join([template.image_format] * num_images))
        else:
            emit(turns[i].content)
        emit(template.user_suffix)
        emit(template.assistant_prefix)
        if i + 1 == len(turns):
            break
        sep_start = length
        emit(template.answer_sep)
        start = length
        emit(turns[i + 1].content)
        emit(stop)
        rendered.spans.append(Span(sep_start, start, length))
        emit(template.assistant_suffix)
    rendered.text = "".join(parts)
    return rendered
