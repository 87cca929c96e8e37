"""The packer (first-fit-decreasing, reproducible, a fixed pack count) and the packed collator
(positions restarting per sample, labels masked at boundaries, images in order, never split)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_dataset_collator import ListSource

from lvlm_tune.data.collator import ALL_BAD, MultimodalCollator
from lvlm_tune.data.dataset import SupervisedDataset
from lvlm_tune.data.encoder import IGNORE_INDEX, ConversationEncoder
from lvlm_tune.data.errors import SkippedSample
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.packed_collator import PACKED_SAMPLES, PackedCollator
from lvlm_tune.data.packing import PackSampler, epoch_packs, first_fit_decreasing, pack_order
from lvlm_tune.data.record import Conversation, Turn


def mix665k_like(n: int, seed: int = 0) -> np.ndarray:
    """Lengths like LLaVA-1.5's mix: 60 % image samples (576 + 1-10 turns), 40 % text-only."""
    rng = np.random.default_rng(seed)
    image = rng.random(n) < 0.6
    turns = rng.integers(1, 11, n)
    text = turns * rng.integers(30, 120, n)
    return np.where(image, 576 + text, -np.maximum(text, 20))


def test_first_fit_decreasing_respects_the_capacity_and_places_every_sample_once():
    lengths = [5, 9, 3, 7, 1, 10, 2, 12]
    packs = first_fit_decreasing(lengths, 10)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert [12] in [[lengths[i] for i in p] for p in packs]  # too long: a pack alone
    assert all(sum(lengths[i] for i in p) <= 10 for p in packs if len(p) > 1)
    assert [[lengths[i] for i in p] for p in packs][:3] == [[12], [10], [9, 1]]  # longest first


def test_packs_are_reproducible_fill_rows_and_keep_one_count_for_every_epoch():
    lengths = mix665k_like(5000)
    capacity = 4096
    packs = pack_order(lengths, capacity, seed=3, epoch=0, buffer_size=1024)
    assert packs == pack_order(lengths, capacity, seed=3, epoch=0, buffer_size=1024)
    assert packs != pack_order(lengths, capacity, seed=3, epoch=1, buffer_size=1024)
    counts = {len(pack_order(lengths, capacity, 3, e, 1024)) for e in range(6)}
    assert counts == {len(packs)}  # the Trainer's steps per epoch and its resume need this
    for e in range(3):
        order = pack_order(lengths, capacity, 3, e, 1024)
        assert sorted(i for p in order for i in p) == list(range(len(lengths)))
    fill = np.abs(lengths).sum() / (len(packs) * capacity)
    assert fill >= 0.97, fill


def test_an_epoch_that_packs_differently_still_yields_epoch_0s_number_of_packs():
    lengths = np.array([6, 6, 4, 4, 5, 5, 3, 7])
    counts = [len(epoch_packs(lengths, 10, 0, e, 3)) for e in range(20)]
    assert len(set(counts)) > 1  # small buffers: the raw count varies with the shuffle
    for e in range(20):
        packs = pack_order(lengths, 10, 0, e, 3)
        assert len(packs) == counts[0]
        assert sorted(i for p in packs for i in p) == list(range(len(lengths)))


def test_the_sampler_yields_packs_per_epoch_and_its_length_is_fixed():
    lengths = mix665k_like(600)
    sampler = PackSampler(lengths, 2048, seed=1, buffer_size=256)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert len(first) == len(second) == len(sampler) and first != second


def _record(i, image):
    q = ("<image>\n" if image else "") + "what is it?"
    turns = [Turn("user", q), Turn("assistant", f"a shape {i}"), Turn("user", "sure?")]
    turns.append(Turn("assistant", "yes " * (i % 3 + 1)))
    return Conversation(id=f"id{i}", turns=turns, images=[image] if image else [], index=i)


@pytest.fixture
def dataset(sp_tokenizer, tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    for i, rgb in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"{i}.png")
    records = [_record(i, f"{i % 3}.png" if i % 2 == 0 else None) for i in range(8)]
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    encoder = ConversationEncoder(sp_tokenizer, "vicuna_v1", num_image_tokens=6)
    return SupervisedDataset(ListSource(records), encoder, ImageLoader(processor, tmp_path))


def _runs(ids: torch.Tensor, token: int) -> list[tuple[int, int]]:
    """(start, length) of every run of ``token`` in ``ids``."""
    runs, start = [], None
    for p, t in enumerate([*ids.tolist(), None]):
        if t == token and start is None:
            start = p
        elif t != token and start is not None:
            runs.append((start, p - start))
            start = None
    return runs


def test_packed_rows_restart_positions_mask_boundaries_and_keep_images_whole(dataset):
    packs = [[0, 1, 2], [3, 4], [5, 6, 7]]
    batch = PackedCollator(pad_id=0)([dataset[p] for p in packs])
    image_id = dataset.encoder.image_token_id
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch[PACKED_SAMPLES] == 8 and batch["input_ids"].shape[0] == 3
    pixels = []
    for row, pack in enumerate(packs):
        at = 0
        for index in pack:
            item = dataset[index]
            n = len(item["input_ids"])
            assert batch["input_ids"][row, at : at + n].tolist() == list(item["input_ids"])
            assert batch["position_ids"][row, at : at + n].tolist() == list(range(n))
            assert batch["labels"][row, at] == IGNORE_INDEX  # nothing learns across a boundary
            assert batch["labels"][row, at + 1 : at + n].tolist() == list(item["labels"][1:])
            if item["pixel_values"] is not None:
                pixels.append(item["pixel_values"])
            at += n
        tail = batch["labels"][row, at:]
        assert (tail == IGNORE_INDEX).all()
        assert batch["position_ids"][row, at:].tolist() == list(range(len(tail)))
        runs = _runs(batch["input_ids"][row, :at], image_id)
        assert all(length == 6 for _, length in runs)  # every image run whole, in its row
    assert torch.equal(batch["pixel_values"], torch.cat(pixels))  # image features in order
    texts = sum(dataset[i]["pixel_values"] is None for p in packs for i in p)
    assert texts == 4 and len(pixels) == 4  # text-only and image samples side by side


def test_one_row_batches_and_bad_samples(dataset):
    one = PackedCollator(pad_id=0, one_row=True)([dataset[[0, 1]], dataset[[2, 3]]])
    items = [dataset[i] for i in range(4)]
    assert one["input_ids"].shape == (1, sum(len(it["input_ids"]) for it in items))
    assert one["input_ids"][0].tolist() == [t for it in items for t in it["input_ids"]]
    starts = (one["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == list(np.cumsum([0] + [len(it["input_ids"]) for it in items[:-1]]))
    bad = [[SkippedSample(0, "x"), dataset[1]], [SkippedSample(2, "x")]]
    batch = PackedCollator(pad_id=0)(bad)
    assert batch["input_ids"].shape[0] == 1 and batch[PACKED_SAMPLES] == 1
    assert PackedCollator(pad_id=0)([[SkippedSample(0, "x")]])[ALL_BAD] is True
    padded = MultimodalCollator(0)([dataset[1]])
    assert batch["input_ids"][0].tolist() == padded["input_ids"][0].tolist()
