"""Training stages as freezing policies: which parameters of a model train in each stage.

``pretrain`` (feature alignment) trains only the projector. ``finetune`` trains the projector
and the whole LLM (embeddings and ``lm_head`` included); the vision tower stays frozen.
``dpo`` (preference tuning) trains what ``finetune`` trains, except for the families in
:data:`PROJECTOR_ONLY_DPO` (MiniGPT-4: its projection only, as in its paper), and ``dpo_lora``
what ``finetune_lora`` trains. ``finetune_lora`` wraps the model with PEFT LoRA on the linear layers of the LLM only (never the
vision tower or projector, even when their layers share names such as ``q_proj``) and trains the
projector fully through PEFT ``modules_to_save``, so the adapter folder carries it and
``merge_and_unload`` folds it in; a projector-side bare parameter (the anyres families'
``image_newline``) cannot be a PEFT module to save, so under LoRA it stays frozen at the
base's value (the checkpoint's, or a ``pretrained_projector``'s). ``unfreeze_vision_tower`` additionally trains the vision tower
in any stage. Parts are found through the model-family registry; parameters a family fixes
(the identity ``linear_2`` of a ``linear`` projector) never train. An extension may add stages
of its own (MiniGPT-5's ``vokens``, ``vokens_lora``); it freezes for them itself, with the
helpers here (:mod:`lvlm_tune.training.extensions`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lvlm_tune.models.parts import canonical_name, is_parameter, is_under, unwrap_model
from lvlm_tune.models.registry import ModelFamily, get_model_family

STAGES = ("pretrain", "finetune", "finetune_lora", "dpo", "dpo_lora")  # extensions add theirs
# Families whose full-weight preference stage trains only the projector, as their own
# instruction tuning does (MiniGPT-4's paper trains only its projection layer after stage 1).
PROJECTOR_ONLY_DPO = frozenset({"minigpt4"})


@dataclass(frozen=True)
class LoraOptions:
    """LoRA settings for ``finetune_lora`` (defaults: LLaVA-1.5's LoRA recipe).

    Attributes:
        r: rank of the update matrices.
        alpha: scaling numerator (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout on the LoRA input.
        target_modules: leaf names of linear layers inside the LLM (e.g. ``("q_proj",
            "v_proj")``); ``None`` means every linear layer of the LLM.
        use_dora: weight-decomposed LoRA (DoRA).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
    """

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    use_dora: bool = False
    use_rslora: bool = False


def lora_target_regex(
    model: nn.Module, family: str | ModelFamily, target_modules: tuple[str, ...] | None = None
) -> str:
    """A PEFT ``target_modules`` regex matching the chosen linear layers inside the LLM only.

    Raises ``ValueError`` naming the available names when ``target_modules`` match nothing.
    """
    family = get_model_family(family)
    scope = family.lora_modules
    linear = [
        name
        for name, module in unwrap_model(model).named_modules()
        if isinstance(module, nn.Linear) and is_under(name, scope) and name not in scope
    ]
    available = sorted({name.rsplit(".", 1)[-1] for name in linear})
    wanted = available if target_modules is None else sorted(set(target_modules))
    missing = [name for name in wanted if name not in available]
    if missing or not wanted:
        raise ValueError(
            f"LoRA target_modules {missing or wanted} are not linear layers of "
            f"{', '.join(scope)}; available: {', '.join(available)}"
        )
    prefixes = "|".join(re.escape(p) for p in scope)
    leaves = "|".join(re.escape(n) for n in wanted)
    return rf"^(?:{prefixes})\.(?:.*\.)?(?:{leaves})$"


def set_trainable(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Train exactly the parameters under ``prefixes`` (names as in the unwrapped model)."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_under(canonical_name(name), prefixes))


def _freeze_fixed(model: nn.Module, family: ModelFamily) -> None:
    config = unwrap_model(model).config
    fixed = {
        f"{module}.{param}"
        for module in family.projector_modules
        for param in family.fixed_projector_parameters(config)
    }
    for name, param in model.named_parameters():
        if canonical_name(name) in fixed:
            param.requires_grad_(False)


def apply_stage(
    model: nn.Module,
    stage: str,
    family: str | ModelFamily = "llava",
    *,
    lora: LoraOptions | None = None,
    unfreeze_vision_tower: bool = False,
) -> nn.Module:
    """Set ``requires_grad`` for ``stage`` (and wrap with LoRA for ``finetune_lora``, ``dpo_lora``).

    Args:
        model: an unwrapped HF model of ``family``.
        stage: one of :data:`STAGES`.
        family: model family name or registry entry.
        lora: LoRA settings for ``finetune_lora`` (``LoraOptions()`` when omitted).
        unfreeze_vision_tower: also train the vision tower (under LoRA: fully, via
            ``modules_to_save``).

    Returns:
        The model to train: ``model`` itself, or a ``PeftModel`` for the LoRA stages.
    """
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    if isinstance(model, PeftModel):
        raise ValueError("apply_stage expects an unwrapped model; this one is already PEFT-wrapped")
    family = get_model_family(family)
    vision = family.vision_modules if unfreeze_vision_tower else ()
    if stage == "pretrain":
        set_trainable(model, family.projector_modules + vision)
    elif stage == "finetune" or (stage == "dpo" and family.name not in PROJECTOR_ONLY_DPO):
        set_trainable(model, family.projector_modules + family.language_modules + vision)
    elif stage == "dpo":
        set_trainable(model, family.projector_modules + vision)
    else:
        lora = lora or LoraOptions()
        set_trainable(model, ())
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_target_regex(model, family, lora.target_modules),
            # modules only: a bare parameter part (NeXT's image_newline) stays frozen
            modules_to_save=[
                n for n in (*family.projector_modules, *vision) if not is_parameter(model, n)
            ],
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    _freeze_fixed(model, family)
    return model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names (as ``model.named_parameters()`` gives them) of parameters that require grad."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def _numel(param: nn.Parameter) -> int:
    return getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 partitions show 0 numel


def parameter_summary(model: nn.Module) -> str:
    """One line: trainable and total parameter counts (tied weights counted once)."""
    params = list(model.parameters())  # shared (tied) parameters are listed once
    total = sum(_numel(p) for p in params)
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    share = 100 * trainable / total if total else 0.0
    return f"trainable parameters: {trainable:,} / {total:,} ({share:.2f}%)"
