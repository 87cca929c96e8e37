"""Preference log-probabilities over exactly the trained labels, and TRL's losses on them.

Tiny LLaVA and MiniGPT-4 models (fp32) on hand-built batches of the preference layout (chosen
rows, then rejected rows): :func:`sequence_logps` equals an independent sum over the answer +
STOP tokens, the prompt's positions provably do not count, ``sigmoid`` and ``ipo`` losses of
the trainer equal their formulas on those log-probabilities, and the LoRA reference is the
adapter-disabled model (and the model before LoRA).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import minigpt4_recipe, parse, tiny_recipe
from preference_pairs import encoded_batch, write_pairs

from lvlm_tune.data.collator import ALL_BAD
from lvlm_tune.data.labels import IGNORE_INDEX
from lvlm_tune.training.pipeline import build_model
from lvlm_tune.training.preference_logps import (
    blank_pixels_if_needed,
    model_inputs,
    sequence_logps,
    token_outputs,
)

PAIRS = [0, 3, 1]  # image, text-only, image


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def _built(tmp_path, recipe):
    model_args, data_args, train_args = parse(recipe, tmp_path)
    torch.manual_seed(0)
    model, processor, family = build_model(model_args, data_args, train_args)
    return model.eval(), processor, family, data_args


def _independent(model, batch):
    """Per row: sum over t with labels[t] != -100 of log_softmax(logits[t - 1])[labels[t]]."""
    inputs = blank_pixels_if_needed(model, model_inputs(batch))
    logits = model(**inputs).logits.double()
    out = []
    for row in range(logits.shape[0]):
        total = torch.zeros((), dtype=torch.float64)
        for t in range(1, logits.shape[1]):
            label = int(batch["labels"][row, t])
            if label != IGNORE_INDEX:
                total = total + logits[row, t - 1].log_softmax(-1)[label]
        out.append(total)
    return torch.stack(out)


def _answer_text(processor, batch, row):
    labels = batch["labels"][row]
    return processor.tokenizer.decode(labels[labels != IGNORE_INDEX])


@pytest.mark.parametrize("family", ["llava", "minigpt4"])
def test_logps_are_the_answer_and_stop_tokens_only(tmp_path, tiny_parts, tiny_blip2, pairs, family):
    if family == "llava":
        recipe = tiny_recipe(tiny_parts, pairs, tmp_path / "o", stage="dpo")
    else:
        recipe = minigpt4_recipe(tiny_parts, tiny_blip2, pairs, tmp_path / "o", stage="dpo")
    model, processor, fam, data_args = _built(tmp_path, recipe)
    batch = encoded_batch(model, processor, fam, data_args, tmp_path, PAIRS)
    assert batch["input_ids"].shape[0] == 2 * len(PAIRS)
    # the trained tokens are the final answer and the template's STOP, nothing else
    answers = ["red", "hello", "blue", "blue", "goodbye", "green"]
    stop = "</s>" if family == "llava" else "###"
    for row, answer in enumerate(answers):
        assert _answer_text(processor, batch, row).replace(" ", "") == f"{answer}{stop}"
    with torch.no_grad():
        ours = sequence_logps(model, batch)
        reference = _independent(model, batch)
    assert ours.shape == (2 * len(PAIRS),)
    torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=0)


def test_prompt_positions_do_not_count_answer_positions_do(tmp_path, tiny_parts, pairs):
    recipe = tiny_recipe(tiny_parts, pairs, tmp_path / "o", stage="dpo")
    model, processor, family, data_args = _built(tmp_path, recipe)
    batch = encoded_batch(model, processor, family, data_args, tmp_path, PAIRS)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
    labels = batch["labels"]
    base = token_outputs(logits, labels).log_probs.sum(1)
    predicts_answer = labels[:, 1:] != IGNORE_INDEX  # logits[:, t] scores labels[:, t + 1]
    noisy = logits.clone()
    noisy[:, :-1][~predicts_answer] += 10 * torch.randn_like(noisy[:, :-1][~predicts_answer])
    assert torch.equal(token_outputs(noisy, labels).log_probs.sum(1), base)
    # the label of a prompt token turned into a trained one would count: the mask decides
    unmasked = labels.clone()
    prompt = (labels[0] == IGNORE_INDEX) & (batch["attention_mask"][0] == 1)
    position = int(prompt.nonzero()[3])
    unmasked[0, position] = batch["input_ids"][0, position]
    assert token_outputs(logits, unmasked).log_probs.sum(1)[0] != base[0]
    # one answer token changed (its label, or the prediction at its place) changes its row only
    t = int(predicts_answer[1].nonzero()[0])
    shifted = logits.clone()
    shifted[1, t, labels[1, t + 1]] += 1.0
    changed = token_outputs(shifted, labels).log_probs.sum(1)
    assert changed[1] != base[1]
    assert torch.equal(changed[torch.arange(len(base)) != 1], base[torch.arange(len(base)) != 1])
    relabelled = labels.clone()
    relabelled[1, t + 1] = (relabelled[1, t + 1] + 1) % logits.shape[-1]
    assert token_outputs(logits, relabelled).log_probs.sum(1)[1] != base[1]


def test_all_bad_batch_gives_zeros(tmp_path, tiny_parts, pairs):
    recipe = tiny_recipe(tiny_parts, pairs, tmp_path / "o", stage="dpo")
    model, *_ = _built(tmp_path, recipe)
    batch = {
        "input_ids": torch.zeros((2, 1), dtype=torch.long),
        "attention_mask": torch.ones((2, 1), dtype=torch.long),
        "labels": torch.full((2, 1), IGNORE_INDEX),
        ALL_BAD: True,
    }
    with torch.no_grad():
        assert torch.equal(sequence_logps(model, batch), torch.zeros(2))


def _trainer(model, processor, family, train_args, **args):
    from lvlm_tune.training.preference_trainer import PreferenceTrainer

    for key, value in args.items():
        setattr(train_args, key, value)
    return PreferenceTrainer(
        model=model, args=train_args, processing_class=processor, family=family, run_card=None
    )


def _perturb_lora(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_is_trls_formula_on_these_logps(tmp_path, tiny_parts, pairs, loss_type):
    recipe = tiny_recipe(tiny_parts, pairs, tmp_path / "o", stage="dpo_lora")
    model, processor, family, data_args = _built(tmp_path, recipe)
    train_args = parse(recipe, tmp_path)[2]
    _perturb_lora(model)
    batch = encoded_batch(model, processor, family, data_args, tmp_path, PAIRS)
    trainer = _trainer(model, processor, family, train_args, beta=0.3, loss_type=loss_type)
    model.eval()
    with torch.no_grad():
        loss, _ = trainer._model_loss(model, batch)
        policy = sequence_logps(model, batch).double()
        with model.disable_adapter():
            reference = sequence_logps(model, batch).double()
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    beta = 0.3
    if loss_type == "sigmoid":
        expected = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    else:
        lc, lr = (batch["labels"] != IGNORE_INDEX).sum(1).double().chunk(2)
        expected = (((pc - rc) / lc - (pr - rr) / lr) - 1 / (2 * beta)).pow(2).mean()
    assert abs(float(policy.sum() - reference.sum())) > 1e-3  # the adapters do something
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    metrics = trainer._metrics["eval"]  # the model is in eval mode
    margins = beta * ((pc - rc) - (pr - rr))
    assert metrics["rewards/margins"][-1] == pytest.approx(float(margins.mean()), abs=1e-5)
    accuracy = float((margins > 0).double().mean())
    assert metrics["rewards/accuracies"][-1] == pytest.approx(accuracy)


def test_lora_reference_is_the_adapter_disabled_model(tmp_path, tiny_parts, pairs):
    plain = tiny_recipe(tiny_parts, pairs, tmp_path / "p", stage="dpo")
    base, processor, family, data_args = _built(tmp_path, plain)
    batch = encoded_batch(base, processor, family, data_args, tmp_path, PAIRS)
    with torch.no_grad():
        before_lora = sequence_logps(base, batch)
    recipe = tiny_recipe(tiny_parts, pairs, tmp_path / "o", stage="dpo_lora")
    model, processor, family, _ = _built(tmp_path, recipe)
    _perturb_lora(model)
    trainer = _trainer(model, processor, family, parse(recipe, tmp_path)[2])
    assert trainer.ref_model is None  # no second copy
    with torch.no_grad():
        chosen, rejected = trainer.reference_log_probs(batch)
        with model.disable_adapter():
            disabled = sequence_logps(model, batch)
        policy = sequence_logps(model, batch)
    torch.testing.assert_close(torch.cat([chosen, rejected]), disabled, atol=1e-5, rtol=0)
    torch.testing.assert_close(disabled, before_lora, atol=1e-5, rtol=0)
    assert not torch.allclose(policy, disabled, atol=1e-3)
