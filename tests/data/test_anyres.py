"""LLaVA-NeXT / LLaVA-OneVision data: the collator's ids are the processor's, token for token.

Processors are the transformers classes with small tiles (``lvlm_tune.testing.anyres_processors``)
over real tokenizers (``../shared/tokenizers``: Qwen2 for OneVision, LLaMA-2 and LLaMA-3 for
NeXT) and the project's tiny ones. For many image sizes and aspect ratios, 1-3 images per sample
tagged in any turn, 1/2/5 turns:

* ``SupervisedDataset`` + ``MultimodalCollator`` over real image files give the ``input_ids``,
  ``pixel_values``, ``image_sizes`` and ``batch_num_images`` that
  ``processor(images=[[...]], text=<the encoder's rendering>)`` gives;
* the labels train exactly each answer + STOP (decoded, ``tests/masking.py``);
* a seeded property loop over random sizes, placements and ``model_max_length``: truncation
  keeps whole image runs only, and the kept runs, pixel rows, size rows and images per sample
  always agree with each other and with what the processor makes of the kept images.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from masking import assert_exact, collapse_images
from PIL import Image

from lvlm_tune.data.collator import MultimodalCollator, pad_token_id
from lvlm_tune.data.dataset import SupervisedDataset
from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.lengths import image_token_totals
from lvlm_tune.data.record import Conversation, Turn
from lvlm_tune.models.anyres import ProcessorImageCounter
from lvlm_tune.testing.anyres_processors import next_processor, onevision_processor

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "tokenizers"
# (height, width): wide, tall, square, tiny, huge, extreme aspect ratios
SIZES = [(20, 40), (40, 20), (33, 100), (300, 17), (50, 50), (64, 200), (500, 500), (31, 257),
         (97, 61), (8, 8), (128, 40)]  # fmt: skip
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (200, 200, 30), (90, 20, 160)]
QUESTIONS = ["What colour is it?", "Which one is larger?", "Describe the shape.", "How many?"]
ANSWERS = ["Red.", "The first one is larger.", "A small square on the left.", "Two of them."]

_TOKENIZERS: dict[str, object] = {}


def shared_tokenizer(name: str):
    from transformers import AutoTokenizer

    if not (SHARED / name).is_dir():
        pytest.skip(f"the shared published tokenizers are not at {SHARED}")
    if name not in _TOKENIZERS:
        tok = AutoTokenizer.from_pretrained(SHARED / name)
        extra = [t for t in ("<image>", "<|im_start|>", "<|im_end|>") if t not in tok.get_vocab()]
        tok.add_special_tokens({"additional_special_tokens": extra})
        _TOKENIZERS[name] = tok
    return _TOKENIZERS[name]


# (family, tokenizer, template): the processor over that tokenizer, and the encoder's template
CASES = [
    pytest.param("llava_next", "sp", "vicuna_v1", id="next-tiny-sp-vicuna"),
    pytest.param("llava_onevision", "bpe", "chatml", id="onevision-tiny-bpe-chatml"),
    pytest.param("llava_next", "llama2", "vicuna_v1", id="next-llama2-vicuna"),
    pytest.param("llava_next", "llama2", "llama2", id="next-llama2-llama2"),
    pytest.param("llava_onevision", "qwen2", "chatml", id="onevision-qwen2-chatml"),
    pytest.param("llava_onevision", "qwen2", "tokenizer", id="onevision-qwen2-own",
                 marks=pytest.mark.slow),
    pytest.param("llava_next", "llama3", "tokenizer", id="next-llama3-own",
                 marks=pytest.mark.slow),
]  # fmt: skip


@pytest.fixture
def tokenizer_of(sp_tokenizer, bpe_tokenizer):
    def get(name):
        return {"sp": sp_tokenizer, "bpe": bpe_tokenizer}.get(name) or shared_tokenizer(name)

    return get


def make_processor(family: str, tokenizer):
    return (next_processor if family == "llava_next" else onevision_processor)(tokenizer)


def conversation(rng: random.Random, sample_id: str, n_turns: int, images: list) -> Conversation:
    """``n_turns`` question/answer pairs; each image tagged in a random user turn (tag order =
    image order), some tags in the first turn, some later, several per turn."""
    homes = sorted(rng.randrange(n_turns) for _ in images)
    turns = []
    for k in range(n_turns):
        tags = homes.count(k)
        question = rng.choice(QUESTIONS)
        if tags:
            parts = ["<image>"] * tags
            question = (" ".join(parts) + "\n" + question) if rng.random() < 0.5 else (
                question + " " + "\n".join(parts))  # fmt: skip
        turns += [Turn("user", question), Turn("assistant", rng.choice(ANSWERS))]
    return Conversation(id=sample_id, turns=turns, images=list(images), source="mem.json")


class ListSource:
    def __init__(self, records):
        self.records, self.path = records, "mem.json"

    def __len__(self):
        return len(self.records)

    def get(self, i):
        return self.records[i]

    def num_words(self):
        return np.array([sum(len(t.content.split()) for t in r.turns) for r in self.records])

    def num_images(self):
        return np.array([len(r.images) for r in self.records])


def write_images(folder: Path) -> list[str]:
    names = []
    for k, (h, w) in enumerate(SIZES):
        name = f"im{k}_{h}x{w}.png"
        Image.new("RGB", (w, h), COLOURS[k % len(COLOURS)]).save(folder / name)
        names.append(name)
    return names


def processor_inputs(processor, encoder, record, index, folder):
    """What ``processor`` makes of the encoder's rendering and the record's images."""
    text = encoder.render(record, index).text
    images = [Image.open(folder / name).convert("RGB") for name in record.images]
    # The processor tokenizes with the tokenizer's specials; a template that writes the BOS
    # itself (a chat template) is tokenized without them, as apply_chat_template does.
    adds = not (encoder.bos and text.startswith(encoder.bos))
    return processor(images=[images], text=text, add_special_tokens=adds, return_tensors="pt")


@pytest.mark.parametrize(("family", "tok_name", "template"), CASES)
def test_collator_ids_equal_the_processors(family, tok_name, template, tokenizer_of, tmp_path):
    tok = tokenizer_of(tok_name)
    processor = make_processor(family, tok)
    names = write_images(tmp_path)
    rng = random.Random(13)
    records = []
    for n_turns in (1, 2, 5):
        for n_images in (1, 2, 3):
            for _ in range(2):
                images = [rng.choice(names) for _ in range(n_images)]
                records.append(conversation(rng, f"s{len(records)}", n_turns, images))
    assert len({n for r in records for n in r.images}) >= 5  # at least five sizes and ratios
    position = "keep" if template == "tokenizer" else "before"
    enc = ConversationEncoder(tok, template, num_image_tokens=ProcessorImageCounter(processor),
                              model_max_length=100_000, image_position=position)  # fmt: skip
    loader = ImageLoader(processor.image_processor, tmp_path)
    dataset = SupervisedDataset(ListSource(records), enc, loader)
    collate = MultimodalCollator(pad_token_id(tok))
    for index, record in enumerate(records):
        batch = collate([dataset[index]])
        expected = processor_inputs(processor, enc, record, index, tmp_path)
        assert batch["input_ids"][0].tolist() == expected["input_ids"][0].tolist(), record.id
        assert torch.equal(batch["pixel_values"], expected["pixel_values"])
        assert torch.equal(batch["image_sizes"], expected["image_sizes"])
        if family == "llava_onevision":
            assert batch["batch_num_images"].tolist() == expected["batch_num_images"].tolist()
        sizes = loader.sizes(record)
        sample = enc.encode(record, index, image_sizes=sizes)
        assert sample.input_ids.tolist() == batch["input_ids"][0].tolist()
        assert_exact(enc, record, sample, index=index, sizes=sizes)
    # several samples in one batch: rows are the samples, pixels concatenated in order
    items = [dataset[i] for i in range(len(records))]
    batch = collate(items)
    expected = [processor_inputs(processor, enc, r, i, tmp_path) for i, r in enumerate(records)]
    for row, exp in enumerate(expected):
        n = len(items[row]["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == exp["input_ids"][0].tolist()
    assert torch.equal(batch["image_sizes"], torch.cat([e["image_sizes"] for e in expected]))
    tiles = batch["pixel_values"].shape[1]
    start = 0
    for exp in expected:
        pixels = exp["pixel_values"]
        got = batch["pixel_values"][start : start + len(pixels)]
        assert torch.equal(got[:, : pixels.shape[1]], pixels)
        assert not got[:, pixels.shape[1] : tiles].any()  # zero padding of the extra tiles
        start += len(pixels)
    assert start == len(batch["pixel_values"])


@pytest.mark.parametrize(
    ("family", "tok_name", "template"),
    [CASES[0], CASES[1], pytest.param("llava_onevision", "qwen2", "chatml", id="onevision-qwen2")],
)
def test_truncation_property(family, tok_name, template, tokenizer_of):
    """300 seeded cases: random sizes, tag placements, turns and model_max_length."""
    tok = tokenizer_of(tok_name)
    processor = make_processor(family, tok)
    counter = ProcessorImageCounter(processor)
    image_id = tok.convert_tokens_to_ids("<image>")
    rng = random.Random(2024)
    stats = {"kept": 0, "truncated": 0, "refused": 0, "dropped_images": 0}
    for case in range(300):
        n_images = rng.randint(0, 3)
        sizes = [(rng.randint(6, 420), rng.randint(6, 420)) for _ in range(n_images)]
        images = [Image.new("RGB", (w, h), COLOURS[k % 5]) for k, (h, w) in enumerate(sizes)]
        record = conversation(rng, f"p{case}", rng.choice([1, 2, 3, 5]), images)
        position = rng.choice(["before", "after", "random", "keep"])
        full = ConversationEncoder(tok, template, num_image_tokens=counter,
                                   model_max_length=10**6, image_position=position)  # fmt: skip
        whole = full.encode(record, 0, image_sizes=sizes)
        max_len = rng.randint(max(8, len(whole.input_ids) // 3), len(whole.input_ids) + 40)
        enc = ConversationEncoder(tok, template, num_image_tokens=counter, model_max_length=max_len,
                                  image_position=position)  # fmt: skip
        dataset = SupervisedDataset(
            ListSource([record]), enc, ImageLoader(processor.image_processor)
        )
        try:
            item = dataset.encode(0)
        except BadSampleError as err:
            assert err.reason == "no_trained_tokens" and len(whole.input_ids) > max_len
            stats["refused"] += 1
            continue
        sample = enc.encode(record, 0, image_sizes=sizes)  # what dataset[0] encodes
        ids = np.asarray(item["input_ids"])
        assert ids.tolist() == sample.input_ids.tolist() and len(ids) <= max_len
        assert sample.truncated == (len(whole.input_ids) > max_len)
        kept = sample.num_images
        # whole runs only: the runs are the counts of the kept images, in order
        collapsed = collapse_images(ids, image_id, sample.image_tokens)
        assert collapsed.count(image_id) == kept
        assert sample.image_tokens == (counter(sizes[:kept]) if kept else [])
        # never tokens without features nor features without tokens
        if kept:
            pixels, image_sizes = item["pixel_values"], item["image_sizes"]
            assert len(pixels) == len(image_sizes) == kept
            assert image_sizes.tolist() == [list(s) for s in sizes[:kept]]
            if family == "llava_onevision":
                assert item["batch_num_images"].tolist() == [kept]
            reference = processor(images=[images[:kept]], text="<image>" * kept,
                                  add_special_tokens=False, return_tensors="pt")  # fmt: skip
            assert int((reference["input_ids"] == image_id).sum()) == sum(sample.image_tokens)
            assert torch.equal(pixels, reference["pixel_values"])
        else:
            assert item["pixel_values"] is None and "image_sizes" not in item
        assert_exact(enc, record, sample, index=0, sizes=sizes)
        stats["kept"] += 1
        stats["truncated"] += sample.truncated
        stats["dropped_images"] += n_images - kept
    # the loop really exercised truncation, dropped images and refusals
    assert stats["truncated"] >= 50 and stats["dropped_images"] >= 30, stats
    assert stats["refused"] >= 10 and stats["kept"] >= 150, stats


@pytest.mark.parametrize(("family", "tok_name", "template"), [CASES[0], CASES[1]])
def test_modality_lengths_count_true_image_tokens(family, tok_name, template, tokenizer_of,
                                                  tmp_path):  # fmt: skip
    tok = tokenizer_of(tok_name)
    processor = make_processor(family, tok)
    names = write_images(tmp_path)
    rng = random.Random(5)
    records = [
        conversation(rng, f"m{i}", rng.choice([1, 2, 5]),
                     [rng.choice(names) for _ in range(rng.randint(0, 3))])
        for i in range(80)
    ]  # fmt: skip
    enc = ConversationEncoder(tok, template, num_image_tokens=ProcessorImageCounter(processor),
                              model_max_length=100_000)  # fmt: skip
    ds = SupervisedDataset(
        ListSource(records), enc, ImageLoader(processor.image_processor, tmp_path)
    )
    samples = [ds.encode_sample(i)[1] for i in range(len(records))]
    totals = image_token_totals(ds.source, enc, ds.images, ds.source.get)
    assert totals.tolist() == [sum(s.image_tokens) for s in samples]  # exact, from headers
    lengths = ds.modality_lengths()
    true = np.array([len(s.input_ids) for s in samples])
    assert (np.sign(lengths) == np.where(ds.source.num_images() > 0, 1, -1)).all()
    error = np.abs(np.abs(lengths) - true) / true
    assert error.mean() < 0.1 and error.max() < 0.3, (error.mean(), error.max())
    assert ds.modality_lengths() is lengths  # computed once
