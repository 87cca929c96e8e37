"""Generative vokens (MiniGPT-5): the ``[IMG0]..[IMG{N-1}]`` tokens and where they sit in a batch.

The vokens are added to the tokenizer as special tokens; the model's input embedding and
``lm_head`` grow by N rows initialised to the mean of the existing rows (the same resize every
added token gets, :func:`lvlm_tune.models.llava._sync_vocab`). Only those N rows train: they are
wrapped with PEFT trainable tokens (:func:`trainable_token_targets`), which keep each new row's
update in its own small parameter, so the original rows are never handed to the optimizer and
stay bit-identical whatever the weight decay. ``merge_and_unload`` folds the rows back into
plain embedding matrices. In text, an answer asks for an image by writing :data:`GEN_IMAGE_TAG`;
the encoder replaces it with the N vokens (trained like any answer text; the answer tag of
:func:`lvlm_tune.generation.data.generation_hooks`). The hidden states
that feed the mapping module are the last-layer states at the N positions that PREDICT the
vokens, i.e. one position before each voken, which is also what generation sees.
"""

from __future__ import annotations

from typing import Any

import torch

GEN_IMAGE_TAG = "<gen_image>"  # where an assistant answer generates an image


def voken_tokens(count: int) -> tuple[str, ...]:
    """``("[IMG0]", ..., "[IMG{count-1}]")``."""
    if count < 1:
        raise ValueError(f"num_vokens must be positive, got {count}")
    return tuple(f"[IMG{k}]" for k in range(count))


def voken_text(count: int) -> str:
    """The answer text that generates one image: all vokens in order."""
    return "".join(voken_tokens(count))


def voken_ids(tokenizer: Any, count: int) -> list[int]:
    """Token ids of the vokens; raises naming the first token the tokenizer lacks."""
    ids = []
    for token in voken_tokens(count):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"tokenizer has no voken {token!r}; the model was not built with num_vokens={count}"
            )
        ids.append(int(token_id))
    if ids != list(range(ids[0], ids[0] + count)):
        raise ValueError(f"voken ids must be consecutive, got {ids}")
    return ids


def embedding_module_names(model: Any) -> tuple[str, str]:
    """Names of the input embedding and output (``lm_head``) modules inside ``model``."""
    found = {id(m): name for name, m in model.named_modules()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or id(inputs) not in found or id(outputs) not in found:
        raise ValueError(f"{type(model).__name__}: cannot find its input and output embeddings")
    if inputs.weight is outputs.weight:
        raise ValueError(
            "vokens need separate input and output embeddings (tie_word_embeddings=False)"
        )
    return found[id(inputs)], found[id(outputs)]


def trainable_token_targets(model: Any, ids: list[int]) -> dict[str, list[int]]:
    """PEFT ``trainable_token_indices`` training exactly the voken rows of both matrices."""
    inputs, outputs = embedding_module_names(model)
    return {inputs: list(ids), outputs: list(ids)}


def voken_runs(input_ids: torch.Tensor, first_id: int, count: int) -> torch.Tensor:
    """(num_runs, 2) ``(row, start)`` of every complete ``[IMG0]..[IMG{N-1}]`` run, in order.

    Raises ``ValueError`` when a run is cut short (e.g. by truncation) or out of order: its
    image would be trained from the wrong hidden states.
    """
    is_first = input_ids == first_id
    rows, starts = is_first.nonzero(as_tuple=True)
    expected = torch.arange(first_id, first_id + count, device=input_ids.device)
    is_voken = (input_ids >= first_id) & (input_ids < first_id + count)
    if int(is_voken.sum()) != count * len(rows):
        raise ValueError(
            f"{int(is_voken.sum())} voken tokens for {len(rows)} [IMG0] tokens: a voken run was "
            "cut or broken"
        )
    for row, start in zip(rows.tolist(), starts.tolist(), strict=True):
        if start == 0 or not torch.equal(input_ids[row, start : start + count], expected):
            raise ValueError(
                f"voken run at row {row}, position {start} is not [IMG0]..[IMG{count - 1}]"
            )
    return torch.stack([rows, starts], dim=-1)


def voken_hidden_states(hidden: torch.Tensor, runs: torch.Tensor, count: int) -> torch.Tensor:
    """(num_runs, count, H) last-layer states at the positions that predict each run's vokens."""
    offsets = torch.arange(count, device=hidden.device) - 1  # one position before each voken
    positions = runs[:, 1:2] + offsets  # (num_runs, count)
    return hidden[runs[:, 0:1], positions]
