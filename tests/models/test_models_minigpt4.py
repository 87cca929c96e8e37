"""Composing and loading MiniGPT-4 (BLIP-2 + LLaMA): parts reused, HF round trip, freezing."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
)

from lvlm_tune.models import IMAGE_TOKEN, get_model_family
from lvlm_tune.models.minigpt4 import build_minigpt4, load_minigpt4
from lvlm_tune.testing.tiny_models import write_tiny_blip2, write_tiny_llama, write_tiny_tokenizer
from lvlm_tune.training.freezing import apply_stage

QUERIES = 8


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("parts")
    tokenizer = write_tiny_tokenizer(root / "tokenizer")
    return {
        "llm": write_tiny_llama(root / "llm", tokenizer),
        "blip2": write_tiny_blip2(root / "blip2", num_query_tokens=QUERIES),
    }


@pytest.fixture(scope="module")
def saved(parts: dict, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("minigpt4")
    torch.manual_seed(0)
    model, processor = build_minigpt4(parts["blip2"], parts["llm"], num_query_tokens=QUERIES)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out, model


def _inputs(processor: Blip2Processor) -> dict:
    """The prompt text holds all query tokens where the image goes (MiniGPT-4 style)."""
    batch = processor(
        images=[Image.new("RGB", (40, 30), (200, 20, 10))],
        text=["<Img>" + IMAGE_TOKEN * QUERIES + "</Img> a red square."],
        return_tensors="pt",
    )
    batch["labels"] = batch["input_ids"].clone()
    return dict(batch)


def test_build_reuses_part_weights(parts: dict) -> None:
    model, processor = build_minigpt4(parts["blip2"], parts["llm"], num_query_tokens=QUERIES)
    blip2 = load_file(parts["blip2"] / "model.safetensors")
    state = model.state_dict()
    vision_keys = [k for k in blip2 if k.startswith(("vision_model.", "qformer.", "query_tokens"))]
    assert vision_keys
    assert {k for k in state if k.startswith(("vision_model.", "qformer.", "query_tokens"))} == set(
        vision_keys
    )
    for key in vision_keys:
        assert torch.equal(state[key], blip2[key]), key
    assert model.query_tokens.shape == (1, QUERIES, 32)

    llm = AutoModelForCausalLM.from_pretrained(parts["llm"])
    for key, value in llm.state_dict().items():
        mine = state[f"language_model.{key}"]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):  # grew by <image> and <pad>
            assert mine.shape[0] == value.shape[0] + 2
            assert torch.equal(mine[: value.shape[0]], value)
        else:
            assert torch.equal(mine, value), key

    projection = model.language_projection
    assert isinstance(projection, torch.nn.Linear)
    assert (projection.in_features, projection.out_features) == (32, 32)

    tokenizer = processor.tokenizer
    assert model.config.image_token_index == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert tokenizer.pad_token is not None
    assert model.config.text_config.pad_token_id == tokenizer.pad_token_id
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings
    assert processor.num_query_tokens is None  # image tokens stay where the text puts them
    assert isinstance(processor.image_processor, BlipImageProcessorPil)


def test_round_trip_through_plain_transformers(saved) -> None:
    out, built = saved
    model = Blip2ForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, Blip2Processor)
    assert isinstance(processor.image_processor, BlipImageProcessorPil)
    assert processor.num_query_tokens is None
    assert model.config.text_config.model_type == "llama"
    reloaded = model.state_dict()
    for key, value in built.state_dict().items():
        assert torch.equal(reloaded[key], value), key

    batch = _inputs(processor)
    image_id = model.config.image_token_index
    assert (batch["input_ids"] == image_id).sum().item() == QUERIES
    assert batch["input_ids"][0, 0] == processor.tokenizer.bos_token_id  # BOS first, as trained
    model.eval()
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_load_minigpt4(saved) -> None:
    out, built = saved
    model, processor = load_minigpt4(out)
    assert len(processor.tokenizer) == model.get_input_embeddings().num_embeddings
    batch = _inputs(processor)
    built.eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, built(**batch).logits)


def test_forward_loss_with_explicit_image_tokens(saved) -> None:
    _, model = saved
    model.eval()
    image_id = model.config.image_token_index
    text = torch.tensor([[1, 261, 274, 259, 294, 264]])
    input_ids = torch.cat([torch.full((1, QUERIES), image_id), text], dim=1)
    labels = input_ids.clone()
    labels[:, :QUERIES] = -100
    out = model(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(1, 3, 32, 32),
        labels=labels,
    )
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grad = model.language_projection.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the loss reaches the trained layer
    model.zero_grad(set_to_none=True)


def test_pretrain_trains_only_language_projection(parts: dict) -> None:
    model, _ = build_minigpt4(parts["blip2"], parts["llm"], num_query_tokens=QUERIES)
    apply_stage(model, "pretrain", "minigpt4")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"language_projection.weight", "language_projection.bias"}


def test_registry_entry_and_image_features(saved) -> None:
    _, model = saved
    family = get_model_family("minigpt4")
    assert family.build is build_minigpt4 and family.load is load_minigpt4
    names = dict(model.named_modules())
    for module in (*family.projector_modules, *family.language_modules, *family.lora_modules):
        assert module in names, module
    params = dict(model.named_parameters())
    assert all(m in names or m in params for m in family.vision_modules)
    with torch.no_grad():
        features = family.image_features(model, torch.zeros(2, 3, 32, 32))
    assert features.shape == (2 * QUERIES * model.config.text_config.hidden_size,)


def test_build_rejects_wrong_query_count_and_flash(parts: dict) -> None:
    with pytest.raises(ValueError, match="query tokens"):
        build_minigpt4(parts["blip2"], parts["llm"], num_query_tokens=32)
    with pytest.raises(ValueError, match="attn_implementation"):
        build_minigpt4(
            parts["blip2"],
            parts["llm"],
            num_query_tokens=QUERIES,
            attn_implementation="flash_attention_2",
        )
