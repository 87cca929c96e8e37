"""What an encoder refuses or escapes in a conversation's text before it is tokenized.

* Control-token text in the data (``</s>``, ``<|im_end|>`` ...): ``special_text: escape`` finds
  which control tokens of the rendering came from the data (by rendering again with the data's
  control-token texts masked) so the tokenizer treats them as text; ``refuse`` makes the sample
  a bad sample naming the token and turn; ``allow`` keeps them as control tokens.
* A plain-text STOP (``###``) inside an answer, which cannot be escaped: refused unless
  ``stop_text_in_answer: allow``.
* ``plain`` (one image, one caption) with several answers: refused unless
  ``plain_multi_turn: first`` (which keeps the first pair and the images tagged in it).

See ``docs/masking.md``.
"""

from __future__ import annotations

from collections.abc import Callable

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.exact_tokenizer import ExactTokenizer
from lvlm_tune.data.record import Conversation, Turn

SPECIAL_TEXT_POLICIES = ("escape", "refuse", "allow")
STOP_TEXT_POLICIES = ("refuse", "allow")
PLAIN_MULTI_TURN = ("refuse", "first")


def turn_field(index: int, turn: Turn) -> str:
    """How a message is named in errors: ``turn 3 (user)``."""
    return f"turn {index + 1} ({turn.role})"


class TextPolicy:
    """The text checks of one encoder (see the module docstring for each option)."""

    def __init__(
        self,
        exact: ExactTokenizer,
        template_name: str,
        stop: str,
        *,
        special_text: str,
        stop_text_in_answer: str,
        plain_multi_turn: str,
        drop_question: bool,
    ) -> None:
        self.exact = exact
        self.template_name = template_name
        self.special_text = special_text
        self.stop_text_in_answer = stop_text_in_answer
        self.plain_multi_turn = plain_multi_turn
        self.drop_question = drop_question
        stripped = stop.strip()
        # A STOP written as plain text cannot be escaped inside an answer.
        self.plain_stop = stripped if stripped and not exact.find_control(stripped) else ""

    def check_turns(self, record: Conversation, turns: list[Turn]) -> list[Turn]:
        """The turns to train, or ``BadSampleError`` for what the template cannot train."""
        if self.drop_question and len(turns) > 2:
            if self.plain_multi_turn == "refuse":
                raise BadSampleError.of(
                    record, "conversations", f"template {self.template_name!r} trains one image "
                    f"and one caption, but the sample has {len(turns) // 2} answers (their "
                    "questions would be dropped); use a conversation template, or "
                    "plain_multi_turn: first to train the first answer only", "template",
                )  # fmt: skip
            turns = turns[:2]
        for i, turn in enumerate(turns):
            problem = self.exact.check_text(turn.content)
            if problem:
                raise BadSampleError.of(record, turn_field(i, turn), problem, "special_text")
            if (
                self.plain_stop
                and turn.role == "assistant"
                and self.plain_stop in turn.content
                and self.stop_text_in_answer == "refuse"
            ):
                raise BadSampleError.of(
                    record, turn_field(i, turn), f"the answer holds {self.plain_stop!r}, the STOP "
                    f"of template {self.template_name!r}: the model would learn to stop "
                    "mid-answer (stop_text_in_answer: allow trains it anyway)", "special_text",
                )  # fmt: skip
        return turns

    def escapes(
        self,
        record: Conversation,
        text: str,
        turns: list[Turn],
        system: str | None,
        rerender: Callable[[list[Turn], str | None], str],
    ) -> list[tuple[int, int]]:
        """``(start, end)`` of the control-token texts in ``text`` that the data wrote.

        Args:
            record: the sample (for errors).
            text: the rendering of ``turns`` and ``system``.
            turns: the turns as rendered (images placed).
            system: the system prompt as rendered.
            rerender: renders other turns and system prompt the same way.
        """
        if self.special_text == "allow":
            return []
        texts = [system or "", *(t.content for t in turns)]
        spelled = [k for k, value in enumerate(texts) if self.exact.has_control(value)]
        if not spelled:
            return []
        if self.special_text == "refuse":
            k = spelled[0]
            field = "system" if k == 0 else turn_field(k - 1, turns[k - 1])
            names = self.exact.control_names(texts[k])
            raise BadSampleError.of(
                record, field, f"the text spells control token(s) {', '.join(map(repr, names))} "
                "(special_text: escape tokenizes such text as ordinary text, allow keeps the "
                "tokens)", "special_text",
            )  # fmt: skip
        # The template's own control tokens are those both renderings share.
        masked = rerender(
            [Turn(t.role, self.exact.mask(t.content)) for t in turns],
            self.exact.mask(system) if system else system,
        )
        if len(masked) != len(text):
            raise BadSampleError.of(
                record, "conversations", "the template renders control-token text in the data "
                "differently from other text, so it cannot be escaped", "special_text",
            )  # fmt: skip
        return [(a, b) for a, b in self.exact.find_control(text) if masked[a:b] != text[a:b]]
