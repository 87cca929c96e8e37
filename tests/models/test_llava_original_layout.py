"""Checkpoints in the original LLaVA layout (haotian-liu/LLaVA: ``model_type: llava_llama``,
``mm_*`` config fields, ``model.mm_projector.*`` keys, the tower outside the folder) load as
``model_name_or_path`` without a model-type warning, with the logits of the same model composed
from its parts; a stage-2 LoRA on one trains, merges and chats; what cannot be expressed is
refused naming the file and field."""

from __future__ import annotations

import json
import logging
import pickle
import warnings

import pytest
import torch
import yaml
from conftest import tiny_recipe
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from lvlm_tune.cli import main as cli_main
from lvlm_tune.inference.load import build_base, load_run
from lvlm_tune.models import IMAGE_TOKEN, build_llava, get_model_family
from lvlm_tune.models.llava_original import (
    is_original_llava,
    original_image_aspect_ratio,
    original_llava_config,
    read_weights,
)
from lvlm_tune.models.tokenizer_saving import save_processor
from lvlm_tune.training.encoding import load_tokenizer, recipe_image_tokens
from lvlm_tune.training.recipe import ModelArguments
from lvlm_tune.training.run_card import RunCard

TOWER_PREFIX = "model.vision_tower.vision_tower."
TYPE_WARNING = "model of type"


def _projector(projector_type: str, width: int, seed: int) -> dict[str, torch.Tensor]:
    """Random projector weights under the original key names."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    if projector_type == "linear":
        return {
            "model.mm_projector.weight": rand(width, width),
            "model.mm_projector.bias": rand(width),
        }
    return {
        "model.mm_projector.0.weight": rand(width, width),
        "model.mm_projector.0.bias": rand(width),
        "model.mm_projector.2.weight": rand(width, width),
        "model.mm_projector.2.bias": rand(width),
    }


def _shards(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    keys = sorted(state)
    return [{k: state[k] for k in keys[i::n]} for i in range(n)]


def write_original(
    folder, parts, *, projector_type="mlp2x_gelu", tower=None, tower_keys=False,
    weights="safetensors", seed=0, **config_fields,
):  # fmt: skip
    """Write a tiny checkpoint the way haotian-liu/LLaVA saves one; returns its tensors too.

    ``weights``: ``safetensors`` (one file), ``sharded`` (two safetensors + index) or ``bin``
    (two ``torch.save`` shards + index). ``tower_keys`` also stores a (perturbed, so it is
    visibly the one used) copy of the vision tower under ``model.vision_tower.vision_tower.``.
    """
    folder.mkdir(parents=True)
    llm = LlamaForCausalLM.from_pretrained(parts["llm"])
    state = {k: v.clone() for k, v in llm.state_dict().items()}
    state.update(_projector(projector_type, llm.config.hidden_size, seed))
    if tower_keys:
        vision = CLIPVisionModel.from_pretrained(parts["vision"]).state_dict()
        saved = {f"vision_model.{k}": v + 0.01 for k, v in vision.items()}  # 4.x key names
        state.update({TOWER_PREFIX + k: v for k, v in saved.items()})
    config = {
        **llm.config.to_dict(),
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "rope_scaling": None,
        "max_length": 4096,
        "pretraining_tp": 1,
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": 32,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": projector_type,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str(tower or parts["vision"]),
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        **config_fields,
    }
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # transformers 4.x, which wrote these checkpoints, keeps `legacy` in tokenizer_config.json
    save_processor(AutoTokenizer.from_pretrained(parts["llm"]), folder)
    if weights == "safetensors":
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        suffix, index = (
            ("safetensors", "model.safetensors.index.json")
            if weights == "sharded"
            else ("bin", "pytorch_model.bin.index.json")
        )
        stem = "model" if weights == "sharded" else "pytorch_model"
        weight_map = {}
        for i, shard in enumerate(_shards(state, 2)):
            name = f"{stem}-{i + 1:05d}-of-00002.{suffix}"
            if weights == "sharded":
                save_file(shard, str(folder / name), metadata={"format": "pt"})
            else:
                torch.save(shard, folder / name)
            weight_map.update(dict.fromkeys(shard, name))
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, state


def reference(parts, state, projector_type):
    """The same model composed from its parts by the project, the saved projector (and tower)
    put in: what the original folder must convert to."""
    torch.manual_seed(0)
    model, processor = build_llava(parts["vision"], parts["llm"], projector_type=projector_type)
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        if projector_type == "linear":
            projector.linear_1.weight.copy_(state["model.mm_projector.weight"])
            projector.linear_1.bias.copy_(state["model.mm_projector.bias"])
        else:
            for old, new in (("0", "linear_1"), ("2", "linear_2")):
                getattr(projector, new).weight.copy_(state[f"model.mm_projector.{old}.weight"])
                getattr(projector, new).bias.copy_(state[f"model.mm_projector.{old}.bias"])
    prefix = TOWER_PREFIX + "vision_model."
    tower = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if tower:
        model.model.vision_tower.load_state_dict(tower, strict=True)
    return model.eval(), processor


def _inputs(processor):
    image = Image.new("RGB", (40, 30), (200, 60, 10))
    text = f"USER: {IMAGE_TOKEN}\nwhat colour? ASSISTANT: red"
    return dict(processor(images=[image], text=[text], return_tensors="pt"))


def _load(folder, **kwargs):
    return get_model_family("llava").load(str(folder), **kwargs)


@pytest.fixture(scope="module")
def mlp_folder(tmp_path_factory, tiny_parts):
    return write_original(tmp_path_factory.mktemp("orig") / "llava-v1.5-tiny", tiny_parts)


def test_loads_without_a_type_warning_and_gives_the_composed_models_logits(
    mlp_folder, tiny_parts, caplog
):
    folder, state = mlp_folder
    caplog.set_level(logging.WARNING)
    LlavaConfig.from_pretrained(folder)  # the path that warns: proves the capture sees it
    assert TYPE_WARNING in caplog.text
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, processor = _load(folder)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    warned += [str(w.message) for w in caught]
    assert not [m for m in warned if TYPE_WARNING in m or "initialized" in m], warned

    assert isinstance(model, LlavaForConditionalGeneration)
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.projector_hidden_act == "gelu"
    ref, ref_processor = reference(tiny_parts, state, "mlp2x_gelu")
    assert model.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    batch = _inputs(processor)
    assert torch.equal(batch["input_ids"], _inputs(ref_processor)["input_ids"])
    assert (batch["input_ids"] == model.config.image_token_index).sum() == 16
    with torch.no_grad():
        logits = model.eval()(**batch).logits
        expected = ref(**batch).logits
    assert torch.equal(logits, expected)
    # the saved LLaMA rows are the checkpoint's, bit for bit
    old = state["model.embed_tokens.weight"].shape[0]
    assert torch.equal(model.lm_head.weight[:old], state["lm_head.weight"])


def test_linear_projector_sharded_with_tower_keys(tmp_path, tiny_parts):
    folder, state = write_original(
        tmp_path / "llava-v1-tiny", tiny_parts, projector_type="linear", tower_keys=True,
        weights="sharded",
    )  # fmt: skip
    model, processor = _load(folder)
    projector = model.model.multi_modal_projector
    assert model.config.projector_hidden_act == "linear"
    assert torch.equal(projector.linear_2.weight, torch.eye(32))
    assert not projector.linear_2.bias.any()
    assert get_model_family("llava").fixed_projector_parameters(model.config) == (
        "linear_2.weight",
        "linear_2.bias",
    )
    tower = model.model.vision_tower.state_dict()
    assert torch.equal(  # the checkpoint's (perturbed) tower, not the tower folder's
        tower["post_layernorm.weight"],
        state[TOWER_PREFIX + "vision_model.post_layernorm.weight"],
    )
    ref, _ = reference(tiny_parts, state, "linear")
    batch = _inputs(processor)
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, ref(**batch).logits)


def test_bin_shards_are_read_as_tensors_only(tmp_path, tiny_parts, mlp_folder, capsys):
    folder, state = write_original(tmp_path / "bins", tiny_parts, weights="bin")
    assert read_weights(folder).keys() == state.keys()
    model, processor = _load(folder)
    base, _ = _load(mlp_folder[0])
    batch = _inputs(processor)
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, base.eval()(**batch).logits)

    class Payload:  # unpickling this would run code of the checkpoint's choosing
        def __reduce__(self):
            return (print, ("pickled code ran",))

    shard = folder / "pytorch_model-00001-of-00002.bin"
    with open(shard, "wb") as f:
        pickle.dump({"model.norm.weight": Payload()}, f)
    with pytest.raises(ValueError, match=f"{shard.name}: not a plain tensor checkpoint"):
        _load(folder)
    assert "pickled code ran" not in capsys.readouterr().out


def test_vision_tower_override_and_clear_error_when_offline(tmp_path, tiny_parts):
    hub_id = "lvlm-tune-tests/no-such-clip-tower"
    folder, state = write_original(tmp_path / "hub_tower", tiny_parts, tower=hub_id)
    with pytest.raises(FileNotFoundError, match="set vision_tower to a local copy") as error:
        _load(folder)
    assert hub_id in str(error.value) and "config.json" in str(error.value)
    ref, _ = reference(tiny_parts, state, "mlp2x_gelu")
    card = RunCard(family="llava", model_args={"model_name_or_path": str(folder)})
    with pytest.raises(FileNotFoundError, match="--base FOLDER,VISION"):
        build_base(card)  # an adapter's recorded base, its tower out of reach
    loaded = [
        _load(folder, vision_tower=tiny_parts["vision"]),
        build_base(card, base=f"{folder},{tiny_parts['vision']}"),
    ]
    for model, processor in loaded:
        batch = _inputs(processor)
        with torch.no_grad():
            assert torch.equal(model.eval()(**batch).logits, ref(**batch).logits)
    assert original_llava_config(folder, tiny_parts["vision"]).image_seq_length == 16
    recipe = ModelArguments(model_name_or_path=str(folder), vision_tower=tiny_parts["vision"])
    assert recipe_image_tokens(recipe) == 16  # lvlm-tune inspect
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == loaded[0][0].config.image_token_index


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model_type": "llava_mistral"}, "model_type 'llava_mistral' is not supported"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end is true"),
        ({"image_aspect_ratio": "anyres"}, "LLaVA-NeXT"),
        ({"mm_projector_type": "mlp3x_gelu"}, "mm_projector_type 'mlp3x_gelu'"),
        ({"mm_hidden_size": 64}, "mm_hidden_size is 64"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature 'cls'"),
    ],
)
def test_refuses_what_the_standard_llava_cannot_express(tmp_path, tiny_parts, fields, message):
    folder, _ = write_original(tmp_path / "bad", tiny_parts, **fields)
    with pytest.raises(ValueError, match=message) as error:
        _load(folder)
    assert str(folder) in str(error.value)


def test_detection_leaves_hf_folders_alone(tmp_path, tiny_parts, mlp_folder):
    from lvlm_tune.testing.tiny_models import write_tiny_llava

    hf = write_tiny_llava(tmp_path / "hf", tiny_parts["llm"])
    assert is_original_llava(mlp_folder[0]) and not is_original_llava(hf)
    assert not is_original_llava(tiny_parts["llm"]) and not is_original_llava(tmp_path / "none")
    assert original_image_aspect_ratio(mlp_folder[0]) == "pad"
    assert original_image_aspect_ratio(hf) is None


@pytest.mark.slow
def test_stage2_lora_on_an_original_folder_trains_merges_and_chats(
    tmp_path, tiny_parts, tiny_data, mlp_folder, capsys, caplog
):
    folder = mlp_folder[0]
    out = tmp_path / "lora"
    recipe = tiny_recipe(
        tiny_parts, tiny_data, out, model_name_or_path=str(folder), stage="finetune_lora",
        max_steps=3,
    )  # fmt: skip
    del recipe["vision_tower"], recipe["llm_name_or_path"]
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(recipe))
    caplog.set_level(logging.WARNING)
    assert cli_main(["train", str(tmp_path / "lora.yaml")]) == 0
    assert TYPE_WARNING not in caplog.text
    card = RunCard.read(out)
    assert card.model_args["model_name_or_path"] == str(folder)
    assert card.image_aspect_ratio == "pad"  # the checkpoint's, as the recipe left it unset

    merged = tmp_path / "merged"
    assert cli_main(["merge", "--checkpoint", str(out), "--output", str(merged)]) == 0
    run = load_run(out)
    assert run.is_adapter
    plain = LlavaForConditionalGeneration.from_pretrained(merged).eval()
    base, _ = _load(folder)
    batch = _inputs(run.processor)
    with torch.no_grad():
        adapter_logits = run.model(**batch).logits
        merged_logits = plain(**batch).logits
        base_logits = base.eval()(**batch).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=0, atol=1e-5)
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4)  # LoRA changed it

    image = f"{tiny_data['image_folder']}/0.png"
    answers = []
    for model in (out, merged):
        capsys.readouterr()
        argv = ["chat", "--model", str(model), "--image", image, "--max-new-tokens", "5"]
        assert cli_main([*argv, "--prompt", "What color is the image?"]) == 0
        answers.append(capsys.readouterr().out.strip())
    assert answers[0] and answers[0] == answers[1]
