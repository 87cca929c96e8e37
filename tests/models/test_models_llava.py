"""Composing and loading LLaVA: parts' weights reused, HF round trip, image-token counts."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.utils import is_flash_attn_2_available

from lvlm_tune.models import (
    IMAGE_TOKEN,
    build_llava,
    get_model_family,
    load_llava,
    num_image_tokens,
)
from lvlm_tune.testing.tiny_models import (
    write_tiny_llama,
    write_tiny_llava,
    write_tiny_tokenizer,
    write_tiny_vision_tower,
)

PATCHES = (32 // 8) ** 2  # tiny towers: image 32, patch 8


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("parts")
    tokenizer = write_tiny_tokenizer(root / "tokenizer")
    return {
        "tokenizer": tokenizer,
        "llm": write_tiny_llama(root / "llm", tokenizer),
        "clip": write_tiny_vision_tower(root / "clip", kind="clip"),
        "siglip": write_tiny_vision_tower(root / "siglip", kind="siglip"),
    }


def _inputs(processor: LlavaProcessor, n_images: int = 1) -> dict:
    images = [Image.new("RGB", (40 + 7 * i, 30), (200, 20 * i, 10)) for i in range(n_images)]
    text = "USER: " + f"{IMAGE_TOKEN}\n" * n_images + "what colour? ASSISTANT: red"
    batch = processor(images=images, text=[text], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    return dict(batch)


@pytest.mark.parametrize("projector_type", ["linear", "mlp2x_gelu"])
def test_build_reuses_part_weights(parts: dict, projector_type: str) -> None:
    model, _ = build_llava(parts["clip"], parts["llm"], projector_type=projector_type)
    vision = CLIPVisionModel.from_pretrained(parts["clip"])
    llm = AutoModelForCausalLM.from_pretrained(parts["llm"])

    tower = model.model.vision_tower.state_dict()
    assert tower.keys() == vision.state_dict().keys()
    assert all(torch.equal(tower[k], v) for k, v in vision.state_dict().items())
    body = model.model.language_model.state_dict()
    for key, value in llm.model.state_dict().items():
        if key == "embed_tokens.weight":  # grew by the added tokens; old rows untouched
            assert torch.equal(body[key][: value.shape[0]], value)
        else:
            assert torch.equal(body[key], value), key
    old = llm.lm_head.weight.shape[0]
    assert torch.equal(model.lm_head.weight[:old], llm.lm_head.weight)

    projector = model.model.multi_modal_projector
    if projector_type == "linear":
        assert model.config.projector_hidden_act == "linear"
        assert torch.equal(projector.linear_2.weight, torch.eye(32))
        assert not projector.linear_2.bias.any()
    else:
        assert model.config.projector_hidden_act == "gelu"


def test_tokenizer_gets_image_and_pad_tokens(parts: dict) -> None:
    model, processor = build_llava(parts["clip"], parts["llm"])
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == model.config.image_token_index
    assert tokenizer("a<image>b\n<image>", add_special_tokens=False).input_ids.count(image_id) == 2
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id not in (tokenizer.unk_token_id, image_id)
    assert model.config.text_config.pad_token_id == tokenizer.pad_token_id
    vocab = len(tokenizer)
    assert model.get_input_embeddings().num_embeddings == vocab
    assert model.lm_head.out_features == model.config.text_config.vocab_size == vocab


@pytest.mark.parametrize(("strategy", "expected"), [("default", PATCHES), ("full", PATCHES + 1)])
def test_image_token_count_matches_processor_and_model(
    parts: dict, strategy: str, expected: int
) -> None:
    model, processor = build_llava(
        parts["clip"], parts["llm"], vision_feature_select_strategy=strategy
    )
    assert num_image_tokens(model) == num_image_tokens(model.config) == expected
    assert model.config.image_seq_length == expected
    batch = _inputs(processor, n_images=2)
    assert (batch["input_ids"] == model.config.image_token_index).sum() == 2 * expected
    features = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    assert [f.shape[0] for f in features] == [expected, expected]


@pytest.mark.parametrize("projector_type", ["linear", "mlp2x_gelu"])
def test_saved_folder_round_trips_through_plain_hf(
    parts: dict, tmp_path, projector_type: str
) -> None:
    model, processor = build_llava(parts["clip"], parts["llm"], projector_type=projector_type)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded_processor, LlavaProcessor)
    assert isinstance(loaded_processor.image_processor, CLIPImageProcessorPil)
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())

    batch = _inputs(loaded_processor)
    assert (batch["input_ids"] == loaded.config.image_token_index).sum() == PATCHES
    loss = loaded(**batch).loss
    assert torch.isfinite(loss)
    assert torch.allclose(loss, model(**batch).loss)


def test_full_clip_folder_uses_its_vision_part(parts: dict, tmp_path) -> None:
    from transformers import CLIPConfig, CLIPModel

    vision_config = CLIPVisionModel.from_pretrained(parts["clip"]).config.to_dict()
    text_config = {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32}
    text_config |= {"num_hidden_layers": 1, "num_attention_heads": 2}
    clip = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config))
    clip.save_pretrained(tmp_path)
    CLIPImageProcessorPil.from_pretrained(parts["clip"]).save_pretrained(tmp_path)

    model, _ = build_llava(tmp_path, parts["llm"])
    tower = model.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], v) for k, v in clip.vision_model.state_dict().items())
    assert model.config.vision_config.model_type == "clip_vision_model"


def test_siglip_tower_needs_full_strategy(parts: dict) -> None:
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        build_llava(parts["siglip"], parts["llm"])
    model, processor = build_llava(
        parts["siglip"], parts["llm"], vision_feature_select_strategy="full"
    )
    assert num_image_tokens(model) == PATCHES
    assert torch.isfinite(model(**_inputs(processor)).loss)


def test_load_llava_round_trip(parts: dict, tmp_path) -> None:
    folder = write_tiny_llava(tmp_path / "llava", parts["tokenizer"], projector_type="linear")
    model, processor = load_llava(folder, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert model.config.projector_hidden_act == "linear"
    assert processor.tokenizer.pad_token == "<pad>"
    assert torch.isfinite(model(**_inputs(processor)).loss)

    markers = ("<|im_start|>", "<|im_end|>")
    model, processor = load_llava(folder, extra_special_tokens=markers)
    tokenizer = processor.tokenizer
    ids = tokenizer("<|im_start|>user<|im_end|>", add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids(markers[0])
    assert ids[-1] == tokenizer.convert_tokens_to_ids(markers[1])
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_dtype_and_attn_implementation_reach_every_part(parts: dict) -> None:
    model, _ = build_llava(
        parts["clip"], parts["llm"], dtype=torch.bfloat16, attn_implementation="eager"
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    configs = [model.config, model.config.text_config, model.config.vision_config]
    assert {c._attn_implementation for c in configs} == {"eager"}


@pytest.mark.skipif(is_flash_attn_2_available(), reason="flash-attn is installed here")
def test_flash_attention_without_package_fails_clearly(parts: dict) -> None:
    with pytest.raises(ImportError, match="flash-attn"):
        build_llava(parts["clip"], parts["llm"], attn_implementation="flash_attention_2")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"projector_type": "mlp3x"}, KeyError, "linear, mlp2x_gelu"),
        ({"vision_feature_select_strategy": "cls"}, ValueError, "default, full"),
        ({"attn_implementation": "flash"}, ValueError, "sdpa, eager, flash_attention_2"),
    ],
)
def test_bad_build_options_name_the_choices(parts: dict, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        build_llava(parts["clip"], parts["llm"], **kwargs)


def test_family_registry() -> None:
    family = get_model_family("llava")
    assert family.build is build_llava and family.load is load_llava
    assert family.projector_modules == ("model.multi_modal_projector",)
    assert get_model_family(family) is family
    with pytest.raises(KeyError, match="choose one of: llava"):
        get_model_family("llava-next")
