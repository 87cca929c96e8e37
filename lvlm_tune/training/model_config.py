"""``trl.ModelConfig`` as lvlm-tune's recipes take it: TRL's model and LoRA keys, our defaults.

:class:`LvlmModelConfig` is the base of the recipe's ``ModelArguments``
(:mod:`lvlm_tune.training.arguments`). It declares again the fields whose TRL default or help
differ: LoRA rank 128 and alpha 256 (LLaVA-1.5's), sdpa attention, the weights' ``dtype``
following ``bf16``. TRL's fields lvlm-tune cannot honour (quantized loading, a hub revision,
``use_peft``...) are no recipe keys: each is declared with ``init=False`` and a reason, which
the recipe parser gives when a recipe sets one, so none is silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from trl import ModelConfig

from lvlm_tune.errors import UserError

NOT_SUPPORTED = "not_supported"  # field metadata: why a trl.ModelConfig field is no recipe key
DTYPES = ("bfloat16", "float32")
_QLORA = "quantized (QLoRA) loading is not supported; train in bf16 or fp32"


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _not_supported(default: Any, reason: str) -> Any:
    """A field lvlm-tune does not take: ``init=False`` keeps it out of the parser, ``--help``
    and the run's options; ``reason`` is what the parser says when a recipe sets it."""
    return field(default=default, init=False, repr=False, metadata={NOT_SUPPORTED: reason})


@dataclass
class LvlmModelConfig(ModelConfig):
    """TRL's model and LoRA keys with lvlm-tune's defaults and help; the rest refused by name.

    ``lora_dropout`` (0.05), ``use_dora`` and ``use_rslora`` are TRL's fields as they are.
    """

    model_name_or_path: str | None = _help(
        "an existing checkpoint of the family (e.g. llava-hf/llava-1.5-7b-hf); "
        "leave empty to compose a new model from vision_tower + llm_name_or_path",
        default=None,
    )
    dtype: str | None = _help(
        "dtype the weights train in: bfloat16 (needs bf16: true) | float32 (without bf16); "
        "unset: follow bf16 (fp16 runs keep float32 weights under autocast)",
        default=None,
    )
    attn_implementation: str = _help("sdpa | eager | flash_attention_2", default="sdpa")
    lora_r: int = _help("LoRA rank (finetune_lora, dpo_lora, vokens_lora)", default=128)
    lora_alpha: int = _help("LoRA alpha: the adapters scale by alpha/r", default=256)
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "LLM linear layer names for LoRA (e.g. [q_proj, v_proj]); empty = all"},
    )

    model_revision: str = _not_supported("main", "download that revision and give its folder")
    use_peft: bool = _not_supported(
        False, "the stage decides: finetune_lora, dpo_lora and vokens_lora train LoRA adapters"
    )
    # list fields spell out field(): ruff (RUF009) reads a helper call there as a shared default
    lora_target_parameters: list[str] | None = field(
        default=None, init=False, repr=False, metadata={NOT_SUPPORTED: "use lora_target_modules"}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        init=False,
        repr=False,
        metadata={NOT_SUPPORTED: "the stage and unfreeze_vision_tower decide what trains in full"},
    )
    lora_task_type: str = _not_supported("CAUSAL_LM", "the adapters are always CAUSAL_LM")
    load_in_8bit: bool = _not_supported(False, _QLORA)
    load_in_4bit: bool = _not_supported(False, _QLORA)
    bnb_4bit_quant_type: str = _not_supported("nf4", _QLORA)
    use_bnb_nested_quant: bool = _not_supported(False, _QLORA)
    bnb_4bit_quant_storage: str | None = _not_supported(None, _QLORA)

    def __post_init__(self) -> None:
        """Check ``dtype``.

        ``ModelConfig.__post_init__`` is not run: it turns a one-item ``lora_target_modules``
        list into a string (which peft reads as a regex over full module names) and checks
        8/4-bit options lvlm-tune refuses anyway.
        """
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(
                f"dtype: {self.dtype!r} is not supported; choose one of: {', '.join(DTYPES)} "
                "(fp16 runs train float32 weights under autocast), or leave it unset"
            )


def not_supported_keys(cls: type) -> dict[str, str]:
    """``key -> reason`` for the fields of dataclass ``cls`` that no recipe may set."""
    return {f.name: f.metadata[NOT_SUPPORTED] for f in fields(cls) if NOT_SUPPORTED in f.metadata}
