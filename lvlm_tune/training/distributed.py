"""DeepSpeed guards: which DeepSpeed configs a run accepts, and ZeRO-3-safe model building.

The projector's own learning rate is an optimizer parameter group built by ``LvlmTrainer``.
A DeepSpeed JSON with an ``optimizer`` block makes the HF integration hand DeepSpeed one flat
list of parameters, and a ``scheduler`` block makes DeepSpeed set one learning rate for every
group: either silently drops the projector group, so :func:`check_deepspeed_config` refuses
them (and a recipe file that contradicts the one given to ``accelerate launch``).
Under ZeRO-3, transformers builds models inside ``deepspeed.zero.Init`` (partitioned as they
are created). Composing a LLaVA fills a ``meta`` skeleton and PEFT deep-copies the projector
for ``modules_to_save``; neither works on partitioned parameters. :func:`zero3_init_paused`
builds the model whole on every rank instead, and DeepSpeed partitions it when the engine
starts (it converts every parameter not yet partitioned).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

REFUSED_BLOCKS = ("optimizer", "scheduler")


def deepspeed_config_dict(args: Any) -> dict[str, Any] | None:
    """The DeepSpeed config of a run as a dict, or ``None`` without DeepSpeed.

    It comes from the recipe's ``deepspeed`` key, or from an ``accelerate launch`` DeepSpeed
    config when the recipe has none.

    Args:
        args: the run's ``TrainingArguments``.
    """
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is not None:
        return hf_config.config
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        return plugin.deepspeed_config
    source = getattr(args, "deepspeed", None)
    return _load_json(source) if source else None


def _load_json(source: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    with open(source, encoding="utf-8") as f:
        return json.load(f)


def check_deepspeed_config(args: Any) -> None:
    """Refuse DeepSpeed settings that would silently change the run.

    A config that defines its own optimizer or scheduler would replace the optimizer's
    parameter groups; a recipe ``deepspeed:`` file that differs from the one given to
    ``accelerate launch`` would win over it without a word.

    Raises:
        ValueError: naming the block or the two files, and what to do instead.
    """
    config = deepspeed_config_dict(args)
    if not config:
        return
    source = args.deepspeed if isinstance(args.deepspeed, str) and args.deepspeed else None
    found = [block for block in REFUSED_BLOCKS if block in config]
    if found:
        raise ValueError(
            f"deepspeed: {source or 'the DeepSpeed config'} defines "
            f"{' and '.join(repr(b) for b in found)}; that would replace lvlm-tune's optimizer "
            "parameter groups (projector_lr, no weight decay on norms and biases) with one "
            "flat group. Remove the block(s) and set the optimizer and schedule with the recipe "
            "keys (optim, learning_rate, projector_lr, weight_decay, lr_scheduler_type, "
            "warmup_steps)."
        )
    launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if source and launcher and launcher != "none" and _load_json(launcher) != _load_json(source):
        raise ValueError(
            f"deepspeed: the recipe names {source} but accelerate launch was given {launcher}; "
            "the recipe's would win silently. Leave the recipe's `deepspeed:` empty to use the "
            "launcher's, or give both the same file."
        )


def offloads_optimizer(args: Any) -> bool:
    """Whether ``args``'s DeepSpeed config keeps optimizer states on the CPU (ZeRO-Offload)."""
    zero = (deepspeed_config_dict(args) or {}).get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


@contextlib.contextmanager
def zero3_init_paused() -> Iterator[None]:
    """Build models as plain (unpartitioned) modules inside the block, even under ZeRO-3.

    transformers switches every model construction to ``deepspeed.zero.Init`` while a ZeRO-3
    config is registered (by ``TrainingArguments`` or an ``accelerate launch`` DeepSpeed
    config). Inside this block none is; DeepSpeed partitions the resulting parameters when
    ``deepspeed.initialize`` wraps the model.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    # transformers keeps the registered config in this module-level weak reference.
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def register_token_weights(model: Any) -> None:
    """Under ZeRO-3, let PEFT trainable-token layers see their base matrices in forward.

    They read ``base_layer.weight`` without calling ``base_layer``, so ZeRO-3 would not gather
    it; registering it as an external parameter of the layer makes DeepSpeed fetch it before
    the layer runs. No-op without ZeRO-3.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    import deepspeed
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for module in model.modules():
        if isinstance(module, TrainableTokensLayer):
            deepspeed.zero.register_external_parameter(module, module.base_layer.weight)
