"""The extension registry: a second extension costs one module and one registry line, and a
disabled extension leaves a run's records and encoding as the reader and template make them."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from lvlm_tune.data.dataset import SupervisedDataset, read_record
from lvlm_tune.data.encoder import IGNORE_INDEX, ConversationEncoder
from lvlm_tune.data.hooks import AnswerTag, DataHooks
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.sources import open_source
from lvlm_tune.errors import UserError
from lvlm_tune.training import extensions as registry
from lvlm_tune.training.recipe import parse_recipe
from lvlm_tune.training.run_card import RunCard
from lvlm_tune.training.trainer import LvlmTrainer


@dataclass
class FakeArguments:
    """A second extension's recipe keys."""

    fake_tokens: int = field(default=0, metadata={"help": "fake: on when > 0"})
    fake_weight: float = field(default=1.0, metadata={"help": "fake: a weight"})


class FakeTrainer(LvlmTrainer):
    pass


class FakeLoaded:
    def __init__(self, folder):
        self.folder = folder


@dataclass(frozen=True)
class FakeExtension(registry.Extension):
    """Adds a token, an answer tag that becomes it, a record transform and a trainer."""

    def enabled(self, args):
        return args.fake_tokens > 0

    def special_tokens(self, args):
        return ("<fake>",)

    def data_hooks(self, args, model=None):
        if not self.enabled(args):
            return DataHooks()
        return DataHooks(
            record_transform=mark_record,
            answer_tags=(AnswerTag("<beep>", ("<fake>",), "conversations"),),
        )

    def trainer_class(self, args):
        return FakeTrainer

    def load(self, folder, model, processor, args, dtype):
        return FakeLoaded(folder)

    def save_merged(self, loaded, folder, dtype):
        (folder / "fake.json").write_text(json.dumps({"from": str(loaded.folder)}))


def mark_record(raw, record):
    record.extra["fake"] = raw.get("fake_field")
    return record


@pytest.fixture
def fake(monkeypatch):
    """Register ``FakeExtension`` as ``fake`` for one test, as its module and registry line."""
    module = types.ModuleType("fake_lvlm_extension")
    module.EXTENSION = FakeExtension(
        name="fake", arguments=FakeArguments, stages=("fake_stage",), lora_stages=("fake_stage",)
    )
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(registry.EXTENSION_MODULES, "fake", module.__name__)
    registry.extensions.cache_clear()
    yield module.EXTENSION
    registry.extensions.cache_clear()


def recipe(tmp_path, *extra):
    base = ["--vision_tower", "v", "--llm_name_or_path", "l", "--output_dir", str(tmp_path)]
    return parse_recipe(None, [*base, "--use_cpu", "true", "--report_to", "none", *extra])


@pytest.fixture
def tokenizer(sp_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake>", "[IMG0]", "[IMG1]"]})
    return tok


class Source:
    """Raw rows in memory, read as LLaVA records."""

    def __init__(self, rows):
        from lvlm_tune.data.readers import normalize

        self.rows, self.normalize, self.path = rows, normalize, "mem.json"

    def __len__(self):
        return len(self.rows)

    def raw(self, i):
        return self.rows[i]

    def get(self, i):
        return self.normalize(self.rows[i], "llava", source=self.path, index=i)


def chat(answer, **extra):
    turns = [{"from": "human", "value": "Say it."}, {"from": "gpt", "value": answer}]
    return {"id": "s", "conversations": turns, **extra}


def test_a_second_extension_works_through_every_hook(fake, tmp_path, tokenizer):
    model_args, data_args, train_args = recipe(
        tmp_path, "--fake_tokens", "2", "--stage", "fake_stage", "--lora_r", "4"
    )
    args = model_args.extensions["fake"]
    assert args == FakeArguments(fake_tokens=2)
    assert registry.stage_owner(model_args) == (fake, args)  # it freezes for its own stage
    assert [ext.name for ext, _ in registry.active_extensions(model_args.extensions)] == ["fake"]
    with pytest.raises(UserError, match="stage: 'fake_stage' needs the fake options set"):
        recipe(tmp_path, "--stage", "fake_stage")
    with pytest.raises(UserError, match="did you mean 'fake_tokens'"):
        recipe(tmp_path, "--fake_token", "2")
    with pytest.raises(
        UserError, match=r"LoRA stages \(finetune_lora, dpo_lora, vokens_lora, fake_stage\)"
    ):
        recipe(tmp_path, "--lora_r", "4", "--stage", "finetune")
    assert registry.added_special_tokens("chatml", model_args.extensions) == (
        "<|im_start|>", "<|im_end|>", "<fake>",
    )  # fmt: skip
    assert registry.added_special_tokens("chatml", {}) == ("<|im_start|>", "<|im_end|>")

    card = RunCard.from_args(model_args, data_args, train_args).to_dict()
    assert card["model_args"]["fake_tokens"] == 2 and "extensions" not in card["model_args"]
    assert card["run_options"]["fake_weight"] == 1.0
    read_back = RunCard.from_dict(card).extension_args()  # as a loaded run reads its card
    assert read_back["fake"] == args

    hooks = registry.data_hooks(model_args.extensions)
    assert [t.tag for t in hooks.answer_tags] == ["<gen_image>", "<beep>"]  # MiniGPT-5 is off
    record = read_record(Source([chat("yes <beep>", fake_field="f")]), 0, hooks)
    assert record.extra == {"fake": "f"}
    encoder = ConversationEncoder(tokenizer, "vicuna_v1", answer_tags=hooks.answer_tags)
    sample = encoder.encode(record)
    fake_id = tokenizer.convert_tokens_to_ids("<fake>")
    assert fake_id in [int(t) for t in sample.labels if t != IGNORE_INDEX]  # trained
    assert sample.tag_counts == {"<beep>": 1}

    assert registry.trainer_class(model_args.extensions, LvlmTrainer) is FakeTrainer
    both, *_ = recipe(
        tmp_path, "--fake_tokens", "1", "--num_vokens", "2", "--diffusion_model", "x",
        "--stage", "vokens",
    )  # fmt: skip
    with pytest.raises(UserError, match="different trainers"):
        registry.trainer_class(both.extensions, LvlmTrainer)

    loaded = registry.load_extensions(tmp_path, None, None, read_back, None)
    assert list(loaded) == ["fake"] and loaded["fake"].folder == tmp_path
    registry.save_merged(loaded, tmp_path, None)
    assert json.loads((tmp_path / "fake.json").read_text()) == {"from": str(tmp_path)}


def test_a_disabled_extension_changes_nothing(fake, tmp_path):
    model_args, *_ = recipe(tmp_path)
    assert registry.active_extensions(model_args.extensions) == []
    assert registry.trainer_class(model_args.extensions, LvlmTrainer) is LvlmTrainer
    assert registry.added_special_tokens("vicuna_v1", model_args.extensions) == ()
    card = RunCard.from_args(model_args, *recipe(tmp_path)[1:])
    assert registry.load_extensions(tmp_path, None, None, card.extension_args(), None) == {}


@pytest.fixture
def gen_data(tmp_path):
    """A text sample, one that also lists generation targets (no <gen_image> in it) and one that
    generates an image."""
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "red.png")
    rows = [
        chat("hello"),
        {**chat("a red one"), "gen_images": ["red.png"]},
        {**chat("here <gen_image>"), "gen_images": ["red.png"], "gen_captions": ["red"]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    return open_source(str(tmp_path / "d.json"), cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def transform_calls(monkeypatch):
    """Count the calls of MiniGPT-5's record transform (reading the generation targets)."""
    from lvlm_tune.generation import data

    calls = []
    attach = data.attach_generation_targets

    def spy(raw, record):
        calls.append(record.id)
        return attach(raw, record)

    monkeypatch.setattr(data, "attach_generation_targets", spy)
    return calls


def test_a_llava_run_never_calls_the_minigpt5_record_transform(
    tmp_path, tokenizer, gen_data, transform_calls
):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from lvlm_tune.data.errors import BadSampleError
    from lvlm_tune.training.pipeline import build_dataset

    data = ["--data_path", gen_data.path, "--image_folder", str(tmp_path)]
    model_args, data_args, _ = recipe(tmp_path, *data)
    hooks = registry.data_hooks(model_args.extensions)
    assert hooks.record_transform is None and hooks.sample_extras is None
    processor = SimpleNamespace(tokenizer=tokenizer, image_processor=CLIPImageProcessorPil())
    dataset = build_dataset(data_args, processor, 1, 0, hooks=hooks)
    plain = SupervisedDataset(
        gen_data, ConversationEncoder(tokenizer, "vicuna_v1"), ImageLoader(None, tmp_path)
    )
    for i in (0, 1):  # the same items as without any extension, targets left unread
        item, reference = dataset[i], plain[i]
        assert item.keys() == reference.keys() == {"id", "input_ids", "labels", "pixel_values"}
        assert (item["input_ids"] == reference["input_ids"]).all()
        assert (item["labels"] == reference["labels"]).all()
    assert read_record(gen_data, 1, hooks).extra == {}
    with pytest.raises(BadSampleError, match="no vokens") as info:  # only MiniGPT-5 trains it
        dataset[2]
    assert info.value.field == "gen_images"
    assert transform_calls == []

    vokens, data_args, _ = recipe(
        tmp_path, *data, "--num_vokens", "2", "--diffusion_model", "x", "--stage", "vokens",
    )  # fmt: skip
    hooks = registry.data_hooks(vokens.extensions)
    dataset = build_dataset(data_args, processor, 1, 0, hooks=hooks)
    first = tokenizer.convert_tokens_to_ids("[IMG0]")
    assert first in dataset[2]["input_ids"] and first not in dataset[0]["input_ids"]
    assert transform_calls == ["s", "s"]  # MiniGPT-5 on: its transform reads every record
