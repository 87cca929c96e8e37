"""The DPO recipe keys and stages: parsing, refusals naming the key, what each stage trains."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import parse

from lvlm_tune.errors import UserError
from lvlm_tune.training.freezing import apply_stage, trainable_parameter_names
from lvlm_tune.training.recipe import parse_recipe
from lvlm_tune.training.run_card import RunCard

REPO = Path(__file__).resolve().parents[2]
BASE = {"vision_tower": "v", "llm_name_or_path": "l", "report_to": "none", "use_cpu": True}


def test_shipped_dpo_recipes_parse(monkeypatch):
    from transformers.integrations import unset_hf_deepspeed_config

    monkeypatch.chdir(REPO)
    model, _, train = parse_recipe(REPO / "recipes/llava_dpo_lora.yaml", ["--use_cpu=true"])
    unset_hf_deepspeed_config()  # parsing a ZeRO-3 recipe switches transformers to ZeRO-3 init
    assert (model.stage, train.beta, train.loss_type, train.learning_rate) == (
        "dpo_lora",
        0.1,
        "sigmoid",
        5e-6,
    )
    model, _, train = parse_recipe(REPO / "recipes/minigpt4_dpo.yaml", ["--use_cpu=true"])
    assert (model.family, model.stage, train.beta) == ("minigpt4", "dpo", 0.1)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"loss_type": "dpo"}, "loss_type: unknown 'dpo'"),
        ({"beta": 0.0}, "beta: must be > 0"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing: robust"),
        ({"loss_type": "exo_pair"}, "label_smoothing: exo_pair"),
        ({"rpo_alpha": -1.0}, "rpo_alpha: must be >= 0"),
    ],
)
def test_bad_dpo_values_name_the_key(tmp_path, keys, message):
    with pytest.raises(UserError, match=message):
        parse({**BASE, "stage": "dpo", **keys}, tmp_path)


def test_dpo_keys_are_refused_outside_the_dpo_stages(tmp_path):
    with pytest.raises(UserError, match=r"beta only act in the preference stages"):
        parse({**BASE, "stage": "finetune", "beta": 0.2}, tmp_path)
    model, _, train = parse({**BASE, "stage": "dpo_lora", "lora_r": 4, "rpo_alpha": 1.0}, tmp_path)
    assert (model.lora_r, model.use_peft, train.rpo_alpha) == (4, True, 1.0)


def test_run_card_records_stage_and_dpo_keys(tmp_path):
    args = parse({**BASE, "stage": "dpo", "beta": 0.25, "loss_type": "ipo"}, tmp_path)
    card = RunCard.from_args(*args)
    assert card.stage == "dpo"
    assert card.preference == {
        "beta": 0.25, "loss_type": "ipo", "label_smoothing": 0.0, "rpo_alpha": None,
        "precompute_ref_log_probs": False,
    }  # fmt: skip
    assert RunCard.from_dict(card.to_dict()).preference == card.preference
    assert RunCard.from_args(*parse({**BASE, "stage": "finetune"}, tmp_path)).preference is None


def test_dpo_stages_train_what_their_sft_counterparts_train(tmp_path):
    from lvlm_tune.models import load_llava
    from lvlm_tune.models.parts import canonical_name
    from lvlm_tune.testing.tiny_models import write_tiny_llava, write_tiny_tokenizer
    from lvlm_tune.training.freezing import LoraOptions

    folder = write_tiny_llava(tmp_path / "m", write_tiny_tokenizer(tmp_path / "t"))

    def trained(stage):
        model = apply_stage(load_llava(folder)[0], stage, "llava", lora=LoraOptions(r=4))
        return sorted(canonical_name(n) for n in trainable_parameter_names(model))

    assert trained("dpo") == trained("finetune")
    assert trained("dpo_lora") == trained("finetune_lora")
