"""The conversation-template registry: one frozen table of strings per template.

A template says how a system prompt, a user turn and an assistant turn are written around the
message text, which string ends an answer (the STOP, trained with the answer), and how an image
is written into the first user turn. Adding a template is adding one entry to ``TEMPLATES``.
The renderings and the masking rules are described in ``docs/masking.md``; ``tests/test_templates.py``
pins them.

The special name ``"tokenizer"`` selects the tokenizer's own ``chat_template``
(see :mod:`lvlm_tune.templates.chat_template`).
"""

from __future__ import annotations

from dataclasses import dataclass

TOKENIZER_TEMPLATE = "tokenizer"


@dataclass(frozen=True)
class Template:
    """Strings that frame one conversation. ``{eos}``/``{bos}`` are filled from the tokenizer.

    Rendering of a conversation with turns (q1, a1), (q2, a2), ...::

        system_format(system)        # skipped for an empty system prompt if omit_empty_system
        [turn_separator]  user_prefix q user_suffix  assistant_prefix answer_sep  [[a stop]]  assistant_suffix

    ``turn_separator`` is written before every turn but the first. Only ``[[a stop]]`` is trained.
    The generation prompt (inference) stops right after ``assistant_prefix``; the model then
    generates ``answer_sep`` merged into its first answer token, as it learned in training.
    """

    name: str
    system_format: str = ""
    default_system: str = ""
    system_in_first_user: bool = False
    omit_empty_system: bool = False
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    answer_sep: str = ""
    stop: str = ""
    assistant_suffix: str = ""
    turn_separator: str = ""
    image_format: str = "<image>"
    image_join: str = "\n"
    drop_question: bool = False
    required_special_tokens: tuple[str, ...] = ()

    def stop_text(self, eos: str) -> str:
        """The STOP string with the tokenizer's EOS filled in."""
        return self.stop.replace("{eos}", eos)


_LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using "
    "natural language."
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            name="llava_v0",
            system_format="{system}###",
            default_system=_LLAVA_SYSTEM,
            user_prefix="Human: ",
            user_suffix="###",
            assistant_prefix="Assistant:",
            answer_sep=" ",
            stop="###",
        ),
        Template(
            name="vicuna_v1",
            system_format="{system} ",
            default_system=_VICUNA_SYSTEM,
            user_prefix="USER: ",
            user_suffix=" ",
            assistant_prefix="ASSISTANT:",
            answer_sep=" ",
            stop="{eos}",
        ),
        Template(name="plain", drop_question=True, stop="\n", image_join=""),
        Template(
            name="minigpt4",
            system_format="{system}###",
            user_prefix="Human: ",
            user_suffix=" ###",
            assistant_prefix="Assistant:",
            answer_sep=" ",
            stop="###",
            image_format="<Img><image></Img>",
            image_join=" ",
        ),
        Template(
            name="llama2",
            system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
            default_system=_LLAMA2_SYSTEM,
            system_in_first_user=True,
            omit_empty_system=True,
            user_prefix="[INST] ",
            user_suffix=" ",
            assistant_prefix="[/INST]",
            answer_sep=" ",
            stop=" {eos}",
            turn_separator="{bos}",
        ),
        Template(
            name="chatml",
            system_format="<|im_start|>system\n{system}<|im_end|>\n",
            default_system="You are a helpful assistant.",
            omit_empty_system=True,
            user_prefix="<|im_start|>user\n",
            user_suffix="<|im_end|>\n",
            assistant_prefix="<|im_start|>assistant\n",
            stop="<|im_end|>",
            assistant_suffix="\n",
            required_special_tokens=("<|im_start|>", "<|im_end|>"),
        ),
    )
}


def template_names() -> list[str]:
    """All valid template names, including the tokenizer's own chat template."""
    return [*TEMPLATES, TOKENIZER_TEMPLATE]


def get_template(name: str) -> Template:
    """Look up a template by name; raises ``KeyError`` naming the choices."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(
            f"unknown template {name!r}; choose one of: {', '.join(template_names())}"
        ) from None


def template_special_tokens(name: str) -> tuple[str, ...]:
    """Special tokens a run with template ``name`` adds to its tokenizer: the template's markers
    (none for the tokenizer's own chat template, whose markers the tokenizer already has)."""
    return () if name == TOKENIZER_TEMPLATE else get_template(name).required_special_tokens
