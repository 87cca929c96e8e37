"""Dataset (images, bad-sample policy), collator (padding, batch a LLaVA model accepts), sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_tune.data.collator import ALL_BAD, MultimodalCollator, pad_token_id
from lvlm_tune.data.dataset import SupervisedDataset
from lvlm_tune.data.encoder import IGNORE_INDEX, ConversationEncoder
from lvlm_tune.data.errors import BadSampleError, SkippedSample, TooManyBadSamplesError
from lvlm_tune.data.images import ImageLoader, expand_to_square
from lvlm_tune.data.record import Conversation, Turn
from lvlm_tune.data.sampler import ModalityLengthGroupedSampler, grouped_length, grouped_order


class ListSource:
    """A record source over in-memory records (the same interface as open_source)."""

    def __init__(self, records, path="mem.json"):
        self.records, self.path = records, path

    def __len__(self):
        return len(self.records)

    def get(self, i):
        return self.records[i]

    def num_words(self):
        return np.array(
            [sum(len(t.content.split()) for t in r.turns) for r in self.records], dtype=np.int32
        )

    def num_images(self):
        return np.array([len(r.images) for r in self.records], dtype=np.int16)


def image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture
def image_dir(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "blue.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    return tmp_path


def record(i, image=None, n_turns=1):
    turns = []
    for k in range(n_turns):
        turns += [
            Turn("user", ("<image>\n" if image and k == 0 else "") + "what is it?"),
            Turn("assistant", f"a shape {i}"),
        ]
    return Conversation(
        id=f"id{i}", turns=turns, images=[image] if image else [], source="data.json", index=i
    )


def make_dataset(tokenizer, records, folder, policy="error", n_tokens=16, **options):
    enc = ConversationEncoder(tokenizer, "vicuna_v1", num_image_tokens=n_tokens)
    return SupervisedDataset(
        ListSource(records), enc, ImageLoader(image_processor(), folder), policy, **options
    )


def test_pad_to_square_uses_the_mean_colour():
    out = expand_to_square(Image.new("RGB", (40, 20), (255, 0, 0)), (122, 116, 104))
    assert out.size == (40, 40)
    assert out.getpixel((0, 0)) == (122, 116, 104) and out.getpixel((20, 20)) == (255, 0, 0)
    loader = ImageLoader(image_processor(), aspect_ratio="pad")
    assert loader.background == tuple(round(255 * m) for m in image_processor().image_mean)


def test_dataset_items_and_batch_forward_through_llava(sp_tokenizer, image_dir):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    records = [record(0, "red.png"), record(1), record(2, "blue.png", n_turns=2)]
    ds = make_dataset(sp_tokenizer, records, image_dir)
    items = [ds[i] for i in range(3)]
    assert items[0]["pixel_values"].shape == (1, 3, 32, 32) and items[1]["pixel_values"] is None
    collate = MultimodalCollator(pad_token_id(sp_tokenizer), pad_to_multiple_of=8)
    batch = collate(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["pixel_values"].shape[0] == 2
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    image_id = sp_tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        text_config=LlamaConfig(
            vocab_size=len(sp_tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
        vision_config=CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        image_token_index=image_id,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    text_only = collate([items[1]])
    assert "pixel_values" not in text_only and torch.isfinite(model(**text_only).loss)


@pytest.mark.parametrize(
    ("image", "reason", "message"),
    [
        (
            "missing.png",
            "missing_image",
            r"data.json: sample 'id1': field image: image file not found: .*missing.png",
        ),
        (
            "corrupt.png",
            "corrupt_image",
            r"data.json: sample 'id1': field image: cannot decode image",
        ),
    ],
)
def test_bad_images_error_then_skip(sp_tokenizer, image_dir, image, reason, message):
    records = [record(0, "red.png"), record(1, image), record(2, "blue.png")]
    ds = make_dataset(sp_tokenizer, records, image_dir)
    with pytest.raises(BadSampleError, match=message):
        ds[1]
    skipping = make_dataset(sp_tokenizer, records, image_dir, policy="skip")
    assert skipping[1] == SkippedSample(1, reason)  # nothing served in its place
    assert skipping[1] == SkippedSample(1, reason)  # read again: still counted once
    assert skipping.ledger.as_dict() == {reason: 1} and skipping.ledger.indices() == [1]
    assert reason in skipping.ledger.summary() and "1 of 3" in skipping.ledger.summary()
    batch = MultimodalCollator(0)([skipping[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 2 and ALL_BAD not in batch  # the two good ones
    for row, good in enumerate((skipping[0], skipping[2])):
        n = len(good["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], torch.as_tensor(good["input_ids"]))


def test_too_long_sample_is_skipped_and_counted_never_trained(sp_tokenizer, image_dir):
    records = [record(0, "red.png"), record(1, "red.png")]
    ds = make_dataset(sp_tokenizer, records, image_dir, policy="skip", n_tokens=16)
    ds.encoder.model_max_length = len(ds[0]["input_ids"]) - 1
    for _ in range(3):  # three epochs
        assert [ds[0], ds[1]] == [
            SkippedSample(0, "no_trained_tokens"),
            SkippedSample(1, "no_trained_tokens"),
        ]
    assert ds.ledger.as_dict() == {"no_trained_tokens": 2}


class RecordingCollator(MultimodalCollator):
    """Also returns the ids of the samples it collated (which samples an epoch trained)."""

    def __call__(self, items):
        return [i["id"] for i in items if isinstance(i, dict)], super().__call__(items)


def test_skip_ledger_is_shared_with_dataloader_workers(sp_tokenizer, image_dir):
    records = [record(i, "missing.png" if i % 3 == 0 else "red.png") for i in range(12)]
    records[4] = record(4, "corrupt.png")
    ds = make_dataset(sp_tokenizer, records, image_dir, policy="skip", max_bad_fraction=1.0)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, collate_fn=RecordingCollator(0), shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    good = {f"id{i}" for i in range(12) if i % 3 and i != 4}
    for _ in range(2):  # two epochs: exactly N - k samples each, every bad one counted once
        batches = list(loader)
        assert len(batches) == 3  # batch count unchanged: resume skips batches by count
        ids = [i for seen, _ in batches for i in seen]
        assert sorted(ids) == sorted(good) and len(ids) == 12 - 5
        assert sum(b["input_ids"].shape[0] for _, b in batches) == 7
    assert ds.ledger.as_dict() == {"missing_image": 4, "corrupt_image": 1}
    assert ds.ledger.indices() == [0, 3, 4, 6, 9]


def test_a_long_run_of_bad_samples_is_only_counted(sp_tokenizer, image_dir):
    records = [record(i, "missing.png") for i in range(1200)] + [record(1200, "red.png")]
    ds = make_dataset(sp_tokenizer, records, image_dir, policy="skip", max_bad_fraction=1.0)
    items = [ds[i] for i in range(len(ds))]  # no "consecutive bad samples" crash
    assert all(isinstance(item, SkippedSample) for item in items[:1200])
    assert items[1200]["id"] == "id1200"
    assert ds.ledger.as_dict() == {"missing_image": 1200}
    ds.check_bad_fraction()  # 1 allows any number


def test_a_batch_of_only_bad_samples_has_nothing_to_train():
    bad = [SkippedSample(3, "missing_image"), SkippedSample(5, "corrupt_image")]
    for multiple, length in ((None, 1), (8, 8)):
        batch = MultimodalCollator(7, pad_to_multiple_of=multiple)(bad)
        assert batch[ALL_BAD] is True and batch["input_ids"].shape == (1, length)
        assert (batch["labels"] == IGNORE_INDEX).all() and (batch["input_ids"] == 7).all()
        assert batch["attention_mask"].sum() == length and "pixel_values" not in batch


def test_max_bad_fraction_stops_with_a_clear_message(sp_tokenizer, image_dir):
    records = [record(i, "missing.png" if i in (3, 7) else "red.png") for i in range(10)]
    for fraction, stops in ((0.1, True), (0.2, False), (1.0, False), (0.0, True)):
        ds = make_dataset(sp_tokenizer, records, image_dir, "skip", max_bad_fraction=fraction)
        for i in range(10):
            ds[i]
        if not stops:
            ds.check_bad_fraction()
            continue
        with pytest.raises(TooManyBadSamplesError) as caught:
            ds.check_bad_fraction()
        message = str(caught.value)
        assert message.startswith("mem.json: 2 of 10 samples are bad (20.0%: missing_image=2)")
        assert f"max_bad_fraction={fraction:g}" in message
        assert "sample 'id3' (index 3): missing_image; sample 'id7'" in message
        assert isinstance(caught.value, SystemExit)  # one message, exit status 1, no traceback
    with pytest.raises(ValueError, match="max_bad_fraction"):
        make_dataset(sp_tokenizer, records, image_dir, "skip", max_bad_fraction=1.5)


def test_modality_lengths_sign(sp_tokenizer, image_dir):
    ds = make_dataset(sp_tokenizer, [record(0, "red.png"), record(1)], image_dir)
    lengths = ds.modality_lengths()
    assert lengths[0] > 16 and lengths[1] < 0


def test_grouped_sampler_groups_by_modality_and_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=1003) * np.where(rng.random(1003) < 0.7, 1, -1)
    order = grouped_order(lengths, group_size=8, seed=1, epoch=0)
    assert len(order) == grouped_length(lengths, 8) and len(order) % 8 == 0
    assert set(order.tolist()) == set(range(1003))  # nothing dropped
    assert len(order) - 1003 < 16  # only the two modality tails are padded
    groups = order.reshape(-1, 8)
    assert all(len(set(np.sign(lengths[g]))) == 1 for g in groups)
    spread = np.mean([np.ptp(np.abs(lengths[g])) for g in groups])
    random_spread = np.mean(
        [np.ptp(np.abs(lengths[g])) for g in rng.permutation(1003)[:1000].reshape(-1, 8)]
    )
    assert spread < random_spread / 4
    assert (order == grouped_order(lengths, 8, seed=1, epoch=0)).all()
    assert not (order == grouped_order(lengths, 8, seed=1, epoch=1)).all()
    sampler = ModalityLengthGroupedSampler(lengths, group_size=8, seed=1)
    assert len(list(sampler)) == len(sampler)
