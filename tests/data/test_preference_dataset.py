"""PreferenceDataset + PreferenceCollator: items, the 2B-row batch (chosen rows, then rejected
rows, images doubled in the same order), skip / error semantics and the ledger, lengths, the
anyres extras, and the refusal of the wrong kind of data."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from preference_masking import assert_pair_exact
from test_dataset_collator import ListSource, image_processor

from lvlm_tune.data.collator import ALL_BAD, pad_token_id
from lvlm_tune.data.dataset import SupervisedDataset
from lvlm_tune.data.encoder import IGNORE_INDEX, ConversationEncoder
from lvlm_tune.data.errors import BadSampleError, SkippedSample, TooManyBadSamplesError
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.preference import PreferenceRecord
from lvlm_tune.data.preference_dataset import PreferenceCollator, PreferenceDataset
from lvlm_tune.data.preference_encoder import PreferenceEncoder
from lvlm_tune.data.record import Conversation, Turn
from lvlm_tune.data.sources import open_source
from lvlm_tune.errors import UserError
from lvlm_tune.models.anyres import ProcessorImageCounter
from lvlm_tune.testing.anyres_processors import next_processor, onevision_processor


class PairSource(ListSource):
    """In-memory pairs; words: the prompt's and the longer answer's, as the readers count."""

    def num_words(self):
        return np.array(
            [
                sum(len(t.content.split()) for t in r.prompt.turns)
                + max(len(r.chosen.split()), len(r.rejected.split()))
                for r in self.records
            ],
            dtype=np.int32,
        )


@pytest.fixture
def image_dir(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (20, 30), (0, 0, 255)).save(tmp_path / "blue.png")
    return tmp_path


def pair(i, images=(), chosen=None, rejected=None, turns=1) -> PreferenceRecord:
    prompt = []
    for k in range(turns):
        tag = "".join("<image>\n" for _ in images) if k == 0 else ""
        prompt.append(Turn("user", f"{tag}what is shape {i}?"))
        if k < turns - 1:
            prompt.append(Turn("assistant", f"shape {k}"))
    conv = Conversation(f"p{i}", prompt, images=list(images), source="pairs.json", index=i)
    return PreferenceRecord(
        conv, chosen or f"a square {i}", rejected or f"a much larger circle {i}"
    )


def make_dataset(tokenizer, records, folder, policy="error", n_tokens=5, processor=None, **kw):
    counter = ProcessorImageCounter(processor) if processor is not None else n_tokens
    template = kw.pop("template", "vicuna_v1")
    enc = ConversationEncoder(tokenizer, template, num_image_tokens=counter, **kw)
    loader = ImageLoader(processor.image_processor if processor else image_processor(), folder)
    return PreferenceDataset(
        PairSource(records, "pairs.json"), PreferenceEncoder(enc), loader, policy
    )


def test_items_hold_both_sides_and_the_images_once(sp_tokenizer, image_dir, monkeypatch):
    records = [pair(0, ["red.png"], turns=2), pair(1), pair(2, ["red.png", "blue.png"])]
    ds = make_dataset(sp_tokenizer, records, image_dir)
    loads = []
    original = ImageLoader.model_inputs
    monkeypatch.setattr(
        ImageLoader, "model_inputs", lambda self, *a: (loads.append(a), original(self, *a))[1]
    )
    item = ds[0]
    assert len(loads) == 1  # the pair's images are loaded once, for both sides
    assert set(item) == {
        "id", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels",
        "pixel_values",
    }  # fmt: skip
    assert item["id"] == "p0" and item["pixel_values"].shape == (1, 3, 32, 32)
    assert ds[1]["pixel_values"] is None and ds[2]["pixel_values"].shape[0] == 2
    for index, record in enumerate(records):
        encoded = ds.encoder.encode(record, index)
        assert_pair_exact(ds.encoder, record, encoded, index)
        assert np.array_equal(ds[index]["chosen_labels"], encoded.chosen.labels)
        assert np.array_equal(ds[index]["rejected_input_ids"], encoded.rejected.input_ids)


def test_collator_stacks_chosen_rows_then_rejected_rows(sp_tokenizer, image_dir):
    records = [pair(0, ["red.png"]), pair(1), pair(2, ["blue.png", "red.png"], turns=3)]
    ds = make_dataset(sp_tokenizer, records, image_dir)
    items = [ds[i] for i in range(3)]
    collate = PreferenceCollator(pad_token_id(sp_tokenizer), pad_to_multiple_of=8)
    batch = collate(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["input_ids"].shape[0] == 6 and batch["input_ids"].shape[1] % 8 == 0
    rows = [(item, "chosen") for item in items] + [(item, "rejected") for item in items]
    for row, (item, side) in enumerate(rows):
        ids, labels = item[f"{side}_input_ids"], item[f"{side}_labels"]
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids.tolist()
        assert batch["labels"][row, :n].tolist() == labels.tolist()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == pad_token_id(sp_tokenizer)).all()
        assert batch["attention_mask"][row].sum() == n
    pixels = [item["pixel_values"] for item in items if item["pixel_values"] is not None]
    assert torch.equal(batch["pixel_values"], torch.cat(pixels + pixels))
    # the image features follow the image-token runs row by row
    image_id = sp_tokenizer.convert_tokens_to_ids("<image>")
    runs = (batch["input_ids"] == image_id).sum(dim=1) // 5
    assert runs.tolist() == [1, 0, 2, 1, 0, 2] and runs.sum() == len(batch["pixel_values"])


def test_skip_and_error_semantics_and_ledger(sp_tokenizer, image_dir):
    records = [
        pair(0, ["red.png"]),
        pair(1, chosen="same", rejected="same"),
        pair(2, ["missing.png"]),
        pair(3),
    ]
    with pytest.raises(BadSampleError, match="sample 'p1': field rejected"):
        make_dataset(sp_tokenizer, records, image_dir)[1]
    with pytest.raises(BadSampleError, match="sample 'p2': field image: image file not found"):
        make_dataset(sp_tokenizer, records, image_dir)[2]
    ds = make_dataset(sp_tokenizer, records, image_dir, policy="skip")
    for _ in range(2):  # two epochs: each bad pair counted once
        items = [ds[i] for i in range(4)]
    assert items[1] == SkippedSample(1, "identical_answers")
    assert items[2] == SkippedSample(2, "missing_image")
    assert ds.ledger.as_dict() == {"identical_answers": 1, "missing_image": 1}
    assert "sample 'p1' (index 1): identical_answers" in ds.bad_examples()[0]
    collate = PreferenceCollator(0)
    batch = collate(items)
    assert batch["input_ids"].shape[0] == 4 and ALL_BAD not in batch  # pairs 0 and 3, twice
    assert batch["pixel_values"].shape[0] == 2
    bad = collate([items[1], items[2]])
    assert bad[ALL_BAD] is True and bad["input_ids"].shape == (2, 1)
    assert (bad["labels"] == IGNORE_INDEX).all() and bad["attention_mask"].sum() == 2
    with pytest.raises(TooManyBadSamplesError, match="2 of 4 samples are bad"):
        ds.check_bad_fraction()
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_truncated_pairs_are_skipped_never_trained(sp_tokenizer, image_dir):
    records = [pair(0, ["red.png"], turns=2, rejected="no " * 50), pair(1, ["red.png"])]
    ds = make_dataset(sp_tokenizer, records, image_dir, policy="skip")
    ds.encoder.encoder.model_max_length = len(ds[1]["rejected_input_ids"]) + 4
    assert ds[0] == SkippedSample(0, "no_trained_tokens") and isinstance(ds[1], dict)
    assert ds.ledger.as_dict() == {"no_trained_tokens": 1}


def test_modality_lengths_use_the_longer_side(sp_tokenizer, image_dir):
    records = [pair(i, ["red.png"] if i % 2 else [], rejected="x " * (3 * i + 1)) for i in range(8)]
    ds = make_dataset(sp_tokenizer, records, image_dir, n_tokens=40)
    lengths = ds.modality_lengths()
    assert (lengths[1::2] > 0).all() and (lengths[0::2] < 0).all()
    for i in range(8):
        true = max(len(ds[i]["chosen_input_ids"]), len(ds[i]["rejected_input_ids"]))
        assert abs(abs(int(lengths[i])) - true) <= 3, (i, lengths[i], true)


def test_the_wrong_kind_of_data_is_refused(sp_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_TUNE_CACHE", str(tmp_path / "cache"))
    enc = ConversationEncoder(sp_tokenizer, "vicuna_v1")
    loader = ImageLoader(image_processor(), tmp_path)
    prefs = tmp_path / "pairs.json"
    prefs.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Q"}], "chosen": "a", "rejected": "b"}]))  # fmt: skip
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]))  # fmt: skip
    with pytest.raises(UserError, match=r"holds preference pairs .* stage trains on supervised"):
        SupervisedDataset(open_source(prefs), enc, loader)
    with pytest.raises(UserError, match="holds supervised conversations"):
        PreferenceDataset(open_source(sft), PreferenceEncoder(enc), loader)
    ds = PreferenceDataset(open_source(prefs), PreferenceEncoder(enc), loader)
    item = ds[0]
    assert sp_tokenizer.decode(item["chosen_input_ids"][item["chosen_labels"] != IGNORE_INDEX]).startswith("a")  # fmt: skip


@pytest.mark.parametrize(
    ("family", "tok"), [("llava_next", "sp"), ("llava_onevision", "bpe")], ids=["next", "onevision"]
)
def test_anyres_extras_are_doubled_in_order(family, tok, sp_tokenizer, bpe_tokenizer, tmp_path):
    tokenizer = sp_tokenizer if tok == "sp" else bpe_tokenizer
    processor = (next_processor if family == "llava_next" else onevision_processor)(tokenizer)
    rng = random.Random(3)
    names = []
    for k, (h, w) in enumerate([(20, 40), (64, 20), (33, 100), (50, 50)]):
        Image.new("RGB", (w, h), (40 * k, 90, 200)).save(tmp_path / f"{k}.png")
        names.append(f"{k}.png")
    records = [pair(i, rng.sample(names, 1 + i % 3), turns=1 + i % 2) for i in range(4)]
    template = "vicuna_v1" if tok == "sp" else "chatml"
    ds = make_dataset(tokenizer, records, tmp_path, processor=processor, template=template)
    items = [ds[i] for i in range(len(records))]
    for index, record in enumerate(records):
        sizes = ds.images.sizes(record)
        assert_pair_exact(ds.encoder, record, ds.encoder.encode(record, index, 0, sizes), index, 0, sizes)  # fmt: skip
    batch = PreferenceCollator(pad_token_id(tokenizer))(items)
    sizes = torch.cat([item["image_sizes"] for item in items])
    assert torch.equal(batch["image_sizes"], torch.cat([sizes, sizes]))
    assert len(batch["pixel_values"]) == 2 * sum(len(r.images) for r in records)
    half = len(batch["pixel_values"]) // 2
    assert torch.equal(batch["pixel_values"][:half], batch["pixel_values"][half:])
    if family == "llava_onevision":
        counts = [len(r.images) for r in records]
        assert batch["batch_num_images"].tolist() == counts + counts
    # every row's image tokens are exactly its images' counts, in the order of the pixels
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    totals = (batch["input_ids"] == image_id).sum(dim=1).tolist()
    per_pair = [sum(ds.encoder.encode(r, i, 0, ds.images.sizes(r)).chosen.image_tokens) for i, r in enumerate(records)]  # fmt: skip
    assert totals == per_pair + per_pair


def test_the_batch_runs_through_llava_each_row_as_its_sft_batch(sp_tokenizer, image_dir):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    from lvlm_tune.data.collator import MultimodalCollator

    records = [pair(0, ["red.png"]), pair(1), pair(2, ["blue.png", "red.png"], turns=2)]
    ds = make_dataset(sp_tokenizer, records, image_dir, n_tokens=16)
    items = [ds[i] for i in range(3)]
    config = LlavaConfig(
        text_config=LlamaConfig(
            vocab_size=len(sp_tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        ),
        vision_config=CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4,
        ),
        image_token_index=sp_tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Llava(config).eval()
    batch = PreferenceCollator(pad_token_id(sp_tokenizer))(items)
    with torch.no_grad():
        logits = model(**batch).logits
        sft = MultimodalCollator(pad_token_id(sp_tokenizer))
        for row, (item, side) in enumerate([(i, "chosen") for i in items] + [(i, "rejected") for i in items]):  # fmt: skip
            alone = {"id": item["id"], "input_ids": item[f"{side}_input_ids"],
                     "labels": item[f"{side}_labels"], "pixel_values": item["pixel_values"]}  # fmt: skip
            expected = model(**sft([alone])).logits[0]
            n = len(alone["input_ids"])
            assert torch.allclose(logits[row, :n], expected[:n], atol=1e-5), (row, side)
