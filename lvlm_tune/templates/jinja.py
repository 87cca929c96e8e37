"""Export a template as a Jinja ``chat_template`` that renders exactly what :func:`render` does.

Saved with every processor/tokenizer, so ``processor.apply_chat_template(messages,
add_generation_prompt=True)`` in plain ``transformers`` gives byte for byte the prompt the
model was trained on. Messages may hold string content (``<image>`` tags written as the
template writes images) or content lists with ``{"type": "image"}`` / ``{"type": "text"}``
parts (images joined to the text as in training).
"""

from __future__ import annotations

import json
from typing import Any

from lvlm_tune.templates.messages import IMAGE_TAG
from lvlm_tune.templates.registry import Template


def _q(text: str) -> str:
    """A Jinja string literal for ``text``."""
    return json.dumps(text, ensure_ascii=False)


def to_jinja(template: Template, bos: str = "<s>", eos: str = "</s>", image_tokens: int = 1) -> str:
    """The Jinja chat template equivalent to ``render(template, ...)`` for this tokenizer.

    ``image_tokens``: how many image tokens the rendered text holds per image: 1 when the
    processor expands the tag itself (LLaVA), the image's full token count when it does not
    (MiniGPT-4's BLIP-2 processor would put its own before BOS instead).
    """
    image_format = template.image_format.replace(IMAGE_TAG, IMAGE_TAG * image_tokens)
    before, _, after = template.system_format.partition("{system}")
    system_block = (
        f"{{%- set system_block = ({_q(before)} ~ system ~ {_q(after)}) "
        f"if (system or not {str(template.omit_empty_system).lower()}) else '' -%}}"
        if template.system_format
        else "{%- set system_block = '' -%}"
    )
    user_text = (
        f"{{%- set images = (m['content'].count({_q(image_format)}) if m['content'] is string "
        f"else (m['content'] | selectattr('type', 'equalto', 'image') | list | length)) -%}}"
        f"{{{{ ([{_q(image_format)}] * images) | join({_q(template.image_join)}) }}}}"
        if template.drop_question
        else (
            "{%- if m['content'] is string -%}"
            f"{{{{ m['content'].replace({_q(IMAGE_TAG)}, {_q(image_format)}) if {_q(image_format)} != {_q(IMAGE_TAG)} else m['content'] }}}}"
            "{%- else -%}{%- for part in m['content'] -%}"
            f"{{%- if not loop.first -%}}{{{{ {_q(template.image_join)} }}}}{{%- endif -%}}"
            f"{{{{ {_q(image_format)} if part['type'] == 'image' else part['text'] }}}}"
            "{%- endfor -%}{%- endif -%}"
        )
    )
    answer_text = (
        "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
        "{{ m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') }}"
        "{%- endif -%}"
    )
    system_text = (
        "{%- set system = messages[0]['content'] if messages[0]['content'] is string else "
        "(messages[0]['content'] | map(attribute='text') | join('')) -%}"
    )
    return "".join(
        [
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            system_text,
            "{%- set turns = messages[1:] -%}{%- else -%}",
            f"{{%- set system = {_q(template.default_system)} -%}}{{%- set turns = messages -%}}{{%- endif -%}}",
            system_block,
            "" if template.system_in_first_user else "{{ system_block }}",
            "{%- for m in turns -%}{%- if m['role'] == 'user' -%}",
            f"{{%- if not loop.first -%}}{{{{ {_q(template.turn_separator.replace('{bos}', bos))} }}}}{{%- endif -%}}",
            f"{{{{ {_q(template.user_prefix)} }}}}",
            "{%- if loop.first -%}{{ system_block }}{%- endif -%}"
            if template.system_in_first_user
            else "",
            user_text,
            f"{{{{ {_q(template.user_suffix)} }}}}",
            "{%- else -%}",
            f"{{{{ {_q(template.assistant_prefix + template.answer_sep)} }}}}",
            answer_text,
            f"{{{{ {_q(template.stop_text(eos) + template.assistant_suffix)} }}}}",
            "{%- endif -%}{%- endfor -%}",
            f"{{%- if add_generation_prompt -%}}{{{{ {_q(template.assistant_prefix)} }}}}{{%- endif -%}}",
        ]
    )


def set_chat_template(processor: Any, template: Template, image_tokens: int = 1) -> str:
    """Give ``processor`` (and its tokenizer) the Jinja form of ``template``; returns it.

    ``image_tokens``: image tokens written per image (see :func:`to_jinja`).
    """
    tokenizer = processor.tokenizer
    jinja = to_jinja(
        template, bos=tokenizer.bos_token or "", eos=tokenizer.eos_token or "",
        image_tokens=image_tokens,
    )  # fmt: skip
    processor.chat_template = jinja
    tokenizer.chat_template = jinja
    return jinja
