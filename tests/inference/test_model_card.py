"""The README of a merged folder is a ``huggingface_hub.ModelCard``: its metadata names the
library, pipeline, tags, the base models that are Hub ids and the evaluation figures, and its
text says what the run was."""

from __future__ import annotations


def test_model_card_metadata_names_tags_hub_base_models_and_metrics(tmp_path):
    from huggingface_hub import ModelCard

    from lvlm_tune.inference.export import model_card
    from lvlm_tune.models.registry import get_model_family
    from lvlm_tune.training.run_card import RunCard

    args = {
        "model_name_or_path": "llava-hf/llava-1.5-7b-hf", "pretrained_projector": str(tmp_path),
        "lora_r": 8, "lora_alpha": 16, "use_dora": True, "projector_type": "mlp2x_gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    }  # fmt: skip
    card = RunCard(family="llava", stage="finetune_lora", template="vicuna_v1", model_args=args)
    figures = {"eval_loss": 0.25, "exact_match": 0.5}
    readme = ModelCard(str(model_card(card, get_model_family("llava"), "runs/x", "bf16", figures)))
    assert readme.data.library_name == "transformers"
    assert readme.data.pipeline_tag == "image-text-to-text"
    assert readme.data.tags == ["lvlm-tune", "llava"]
    assert readme.data.base_model == ["llava-hf/llava-1.5-7b-hf"]  # the local projector is not
    assert readme.data.metrics == ["eval_loss", "exact_match"]
    assert "# x (merged with lvlm-tune)" in readme.text
    assert "- base model: `llava-hf/llava-1.5-7b-hf`" in readme.text
    assert f"- stage-1 projector: `{tmp_path}`" in readme.text
    assert "- LoRA: r=8, alpha=16, DoRA=True" in readme.text
    assert "- saved dtype: `bf16`" in readme.text
    assert "- eval_loss: 0.25\n- exact_match: 0.5" in readme.text
