"""Composing and loading LLaVA-NeXT / OneVision: HF round trips, parts reused, processors."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionForConditionalGeneration,
    SiglipVisionModel,
)

from lvlm_tune.models import get_model_family, load_anyres_processor
from lvlm_tune.models.anyres import processor_image_counter
from lvlm_tune.models.anyres_processors import OnevisionImageProcessor, parse_grids
from lvlm_tune.models.llava_next import build_anyres, load_anyres, new_image_newline
from lvlm_tune.testing.tiny_anyres import (
    TINY_GRIDS,
    write_tiny_llava_next,
    write_tiny_llava_onevision,
    write_tiny_qwen2,
    write_tiny_siglip,
)
from lvlm_tune.testing.tiny_models import write_tiny_vision_tower

SIZES = [(20, 50), (64, 64), (33, 31), (100, 17), (8, 90), (45, 70)]  # (height, width)
CLASSES = {
    "llava_next": LlavaNextForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("anyres")
    return {
        "next_llama_clip": ("llava_next", write_tiny_llava_next(root / "a")),
        "next_qwen2_siglip": (
            "llava_next", write_tiny_llava_next(root / "b", llm="qwen2", vision="siglip"),
        ),
        "onevision": ("llava_onevision", write_tiny_llava_onevision(root / "c")),
        "onevision_clip": ("llava_onevision", _onevision_clip(root / "d")),
    }  # fmt: skip


def _onevision_clip(out):
    """OneVision composed on a CLIP tower (CLS dropped, ``default``): the processor counts
    the CLS its strategy removes."""
    tower = write_tiny_vision_tower(out / "clip", kind="clip")
    llm = write_tiny_qwen2(out / "llm")
    model, processor = build_anyres(
        "llava_onevision", tower, llm, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=TINY_GRIDS,
    )  # fmt: skip
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    return out / "model"


@pytest.mark.parametrize("name", ["next_llama_clip", "next_qwen2_siglip", "onevision"])
def test_saved_folder_loads_with_ours_and_plain_transformers(folders: dict, name: str) -> None:
    kind, folder = folders[name]
    family = get_model_family(kind)
    model, processor = family.load(folder)
    plain = CLASSES[kind].from_pretrained(folder)
    ours, theirs = model.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert type(family.load_processor(folder)) is type(processor)
    if kind == "llava_onevision":
        assert isinstance(processor, OnevisionImageProcessor)
        token = processor.tokenizer.convert_tokens_to_ids("<video>")
        assert token == model.config.video_token_index
    else:
        assert isinstance(processor, LlavaNextProcessor)
    assert not any(".head." in n for n, _ in model.named_parameters())  # SigLIP pooling head


@pytest.mark.parametrize(
    "name", ["next_llama_clip", "next_qwen2_siglip", "onevision", "onevision_clip"]
)
def test_counter_matches_processor_and_model_features(folders: dict, name: str) -> None:
    kind, folder = folders[name]
    model, processor = get_model_family(kind).load(folder)
    counter = processor_image_counter(processor)
    image_id = model.config.image_token_index
    seen = set()
    for n_images in (1, 2):
        for start in range(len(SIZES) - n_images + 1):
            sizes = SIZES[start : start + n_images]
            images = [Image.new("RGB", (w, h), (200, 30, 30)) for h, w in sizes]
            batch = processor(
                images=[images], text=["<image>" * n_images + " hi"], return_tensors="pt"
            )
            counts = counter(sizes)
            assert int((batch["input_ids"] == image_id).sum()) == sum(counts)
            with torch.no_grad():  # the model's own check: features == image tokens
                model(**batch)
            seen.update(counts)
    assert len(seen) >= 4  # the sizes really give different tilings


def test_composed_model_reuses_parts_and_newline_is_seeded(tmp_path) -> None:
    vision = write_tiny_siglip(tmp_path / "siglip")
    llm = write_tiny_qwen2(tmp_path / "qwen2")
    model, processor = build_anyres(
        "llava_onevision", vision, llm, vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints="1x2,2x1", newline_seed=3,
    )  # fmt: skip
    tower = SiglipVisionModel.from_pretrained(vision)
    for name, tensor in model.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, tower.state_dict()[name])
    language = AutoModelForCausalLM.from_pretrained(llm)
    rows = language.get_input_embeddings().weight
    grown = model.get_input_embeddings().weight
    assert torch.equal(grown[: rows.shape[0]], rows)
    assert torch.equal(model.model.image_newline, new_image_newline(32, 3, torch.float32))
    assert not torch.equal(
        new_image_newline(32, 3, torch.float32), new_image_newline(32, 4, torch.float32)
    )
    assert model.config.image_grid_pinpoints == [[32, 64], [64, 32]]
    assert processor.image_processor.image_grid_pinpoints == [[32, 64], [64, 32]]
    assert model.config.vision_aspect_ratio == "anyres_max_9"


def test_onevision_folder_has_the_published_layout(folders: dict, tmp_path) -> None:
    _, folder = folders["onevision"]
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["processor_class"] == "LlavaOnevisionProcessor"
    video = json.loads((folder / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "LlavaOnevisionVideoProcessor"
    assert video["size"] == {"height": 32, "width": 32}
    # A published folder keeps the image processor in preprocessor_config.json.
    published = tmp_path / "published"
    published.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (published / name).write_bytes((folder / name).read_bytes())
    image = config.pop("image_processor")
    (published / "preprocessor_config.json").write_text(json.dumps(image))
    (published / "processor_config.json").write_text(json.dumps(config))
    loaded = load_anyres_processor(published)
    assert isinstance(loaded, OnevisionImageProcessor)
    assert loaded.image_processor.image_grid_pinpoints == image["image_grid_pinpoints"]
    assert loaded.num_image_tokens == 16


def test_load_refuses_another_model_type(folders: dict) -> None:
    with pytest.raises(ValueError, match="llava_next"):
        load_anyres("llava_onevision", folders["next_llama_clip"][1])


@pytest.mark.parametrize(
    ("spec", "grids"),
    [("1x2, 2x1", [(1, 2), (2, 1)]), (None, [(9, 9)]), ("3x3", [(3, 3)])],
)
def test_parse_grids(spec, grids) -> None:
    assert parse_grids(spec, [(9, 9)]) == grids


@pytest.mark.parametrize("spec", ["1x", "2*2", "0x1", "ax2"])
def test_parse_grids_refuses(spec) -> None:
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        parse_grids(spec, ())
