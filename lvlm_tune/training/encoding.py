"""One factory for the conversation encoder and its tokenizer, used by train, eval, chat, inspect.

:class:`EncodingOptions` holds everything that decides how a conversation becomes ids and
labels, apart from the tokenizer and the model's image tokens: the template (resolved here
once), image position, truncation length, system prompt, instruction pool, the extension's
vokens and the text policies. It is read either from a recipe (:meth:`~EncodingOptions.
from_recipe`: ``train``, ``inspect RECIPE``) or from a saved folder's run card
(:meth:`~EncodingOptions.from_run_card`: ``eval``, ``chat``), and it builds the encoder
(:meth:`~EncodingOptions.encoder`) and prepares a tokenizer exactly as training does (the
template's markers and the extension's special tokens, :meth:`~EncodingOptions.
special_tokens`), so the four cannot drift apart.

Importing this module loads no model code (``lvlm-tune inspect`` stays quick to start): the
model-family registry and model configs are imported by :func:`recipe_image_tokens` only.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.hooks import DataHooks
from lvlm_tune.data.image_tokens import ImageTokenCounter
from lvlm_tune.models.tokens import prepare_tokenizer
from lvlm_tune.training.extensions import added_special_tokens, data_hooks
from lvlm_tune.training.run_card import RunCard

# The fields that are ConversationEncoder keyword arguments of the same name.
_ENCODER_KEYS = (
    "template", "image_position", "model_max_length", "seed", "system", "instruction_pool",
    "special_text", "stop_text_in_answer", "plain_multi_turn",
)  # fmt: skip


@dataclass(frozen=True)
class EncodingOptions:
    """How conversations are encoded: the :class:`ConversationEncoder` arguments but the
    tokenizer and the image tokens per image (same names and meanings), and the registered
    extensions' arguments (``ModelArguments.extensions``: their special tokens and data hooks).
    """

    template: str
    image_position: str = "before"
    model_max_length: int = 2048
    seed: int = 0
    system: str | None = None
    instruction_pool: str | None = None
    special_text: str = "escape"
    stop_text_in_answer: str = "refuse"
    plain_multi_turn: str = "refuse"
    extensions: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_recipe(
        cls, data_args: Any, *, seed: int, extensions: Mapping[str, Any] | None = None
    ) -> EncodingOptions:
        """The options of a parsed recipe: its ``DataArguments``, its seed and its extensions'
        arguments (``ModelArguments.extensions``)."""
        return cls(
            template=data_args.template,
            image_position=data_args.image_position,
            model_max_length=data_args.model_max_length,
            seed=seed,
            system=data_args.system_prompt,
            instruction_pool=data_args.instruction_pool,
            special_text=data_args.special_text,
            stop_text_in_answer=data_args.stop_text_in_answer,
            plain_multi_turn=data_args.plain_multi_turn,
            extensions=dict(extensions or {}),
        )

    @classmethod
    def from_run_card(
        cls, card: RunCard, *, template: str | None = None, image_position: str | None = None
    ) -> EncodingOptions:
        """The options a saved run was trained with, as its card records them.

        Args:
            card: the folder's run card.
            template: another template (``--template``); default: the card's.
            image_position: another image position; default: the card's. ``chat`` passes
                ``keep``: its session writes the image tag where the user attached the image.

        Per-sample random choices use seed 0 (inference draws need not repeat training's).
        """
        data = card.data_args
        defaults = cls(template="")
        return cls(
            template=template or card.template,
            image_position=image_position or card.image_position,
            model_max_length=card.model_max_length,
            system=card.system_prompt,
            instruction_pool=card.instruction_pool,
            special_text=data.get("special_text") or defaults.special_text,
            stop_text_in_answer=data.get("stop_text_in_answer") or defaults.stop_text_in_answer,
            plain_multi_turn=data.get("plain_multi_turn") or defaults.plain_multi_turn,
            extensions=card.extension_args(),
        )

    def special_tokens(self) -> tuple[str, ...]:
        """The special tokens a run adds to its tokenizer besides ``<image>`` and the pad token:
        the template's markers (none for the tokenizer's own template) and the enabled
        extensions' tokens (MiniGPT-5's vokens)."""
        return added_special_tokens(self.template, self.extensions)

    def prepare_tokenizer(self, tokenizer: Any) -> list[str]:
        """Add ``<image>``, a pad token and :meth:`special_tokens` to ``tokenizer`` in place,
        exactly as building the model does; returns the tokens that were new."""
        return prepare_tokenizer(tokenizer, self.special_tokens())

    def data_hooks(self, model: Any = None) -> DataHooks:
        """The extensions' data hooks (``model``: the built model, for hooks that need it)."""
        return data_hooks(self.extensions, model)

    def encoder(
        self,
        tokenizer: Any,
        num_image_tokens: int | ImageTokenCounter,
        hooks: DataHooks | None = None,
    ) -> ConversationEncoder:
        """The conversation encoder for a prepared ``tokenizer`` and the model's image tokens;
        ``hooks`` (default: :meth:`data_hooks` without a model) gives the answer tags."""
        hooks = self.data_hooks() if hooks is None else hooks
        kwargs = {key: getattr(self, key) for key in _ENCODER_KEYS}
        return ConversationEncoder(
            tokenizer, **kwargs, num_image_tokens=num_image_tokens, answer_tags=hooks.answer_tags
        )


def load_tokenizer(path: str, special_tokens: Sequence[str] = ()) -> Any:
    """Load the tokenizer of a model or LLM folder (or hub id) as training loads it, and add
    ``<image>``, a pad token and ``special_tokens`` (same ids as training gives them).

    An original-layout LLaVA folder's tokenizer is read as that folder's loader reads it.
    """
    from transformers import AutoTokenizer

    from lvlm_tune.models.layout import is_original_llava

    if is_original_llava(path):
        from lvlm_tune.models.llava_original import original_tokenizer  # model code: only here

        tokenizer = original_tokenizer(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer, special_tokens)
    return tokenizer


def tokenizer_path(model_args: Any) -> tuple[str, str] | None:
    """``(recipe key, path)`` of the tokenizer a recipe's model is built with: the checkpoint's
    when it loads one, else the LLM's; ``None`` when the recipe names neither."""
    for key in ("model_name_or_path", "llm_name_or_path"):
        if getattr(model_args, key, None):
            return key, getattr(model_args, key)
    return None


def recipe_image_tokens(model_args: Any) -> int | ImageTokenCounter | None:
    """Image tokens per image of a recipe's model, from its configs alone (no weights).

    The family comes from the model-family registry: a checkpoint's config (an original-layout
    LLaVA folder's as converted), else the config the family composes from the vision side.
    For the families whose counts depend on the image sizes (NeXT, OneVision) it is the
    counter of the checkpoint's processor, or of the processor the family composes from the
    parts' config and tokenizer files. ``None`` (with a note on stderr) when the files cannot
    be read locally.
    """
    from transformers import AutoConfig

    from lvlm_tune.models.llava_original import is_original_llava, original_llava_config
    from lvlm_tune.models.registry import get_model_family

    family = get_model_family(model_args.family)
    options = {key: getattr(model_args, key) for key in family.build_options}
    path, vision = model_args.model_name_or_path, model_args.vision_tower
    llm = model_args.llm_name_or_path
    try:
        if family.sized_image_tokens is not None and family.processor_from_parts is not None:
            if path:
                return family.sized_image_tokens(family.load_processor(path))
            if vision and llm:
                return family.sized_image_tokens(
                    family.processor_from_parts(vision, llm, **options)
                )
            return None
        if path:
            if is_original_llava(path):  # AutoConfig does not know its model type
                return family.num_image_tokens(original_llava_config(path, vision))
            return family.num_image_tokens(AutoConfig.from_pretrained(path))
        if vision:
            return family.num_image_tokens(family.parts_config(vision, **options))
    except (OSError, ValueError, KeyError, AttributeError):
        print("note: model config not found locally; pass --num-image-tokens", file=sys.stderr)
    return None
