"""Collator throughput vs. one plain tokenizer pass, and padding efficiency of the sampler.

Prints samples/s of the encoder (render + tokenize + exact masks + image expansion) on 10k
synthetic 1-5-turn conversations, the time ratio to one plain tokenizer pass over the same
rendered texts (the floor), and real/padded tokens for random vs. modality-length grouped
batches. The anyres case (``--anyres``, on by default) does the same with LLaVA-OneVision
settings (``lvlm_tune.testing.anyres_processors``, anyres_max_9) over images of mixed sizes,
1-3 per sample, some tagged in later turns: the dataset's encoding (header sizes + the
counter + the encoder; first with the headers read, then with the sizes the length pass
kept) and the collator, and the padding efficiency of batches grouped by the
dataset's true lengths (``SupervisedDataset.modality_lengths``).
Run: ``.venv/bin/python benchmarks/preprocess.py [--samples 10000]``.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import numpy as np
from transformers import AutoTokenizer

from lvlm_tune.data.collator import MultimodalCollator, pad_token_id
from lvlm_tune.data.dataset import SupervisedDataset
from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.record import Conversation, Turn
from lvlm_tune.data.sampler import grouped_order
from lvlm_tune.models.anyres import ProcessorImageCounter
from lvlm_tune.testing.anyres_processors import onevision_processor
from lvlm_tune.testing.tokenizers import train_sentencepiece

WORDS = (
    "the a red blue green yellow square circle triangle star image picture shows left "
    "right top bottom what which color is are shape there how many describe in detail "
    "small large object person dog cat car tree sky road building window table chair "
    "people standing sitting"
).split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def synthetic(n: int, seed: int = 0) -> list[Conversation]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = []
        for k in range(rng.randint(1, 5)):
            q = sentence(rng, 4, 20)
            turns += [
                Turn("user", ("<image>\n" if k == 0 else "") + q),
                Turn("assistant", sentence(rng, 5, 60)),
            ]
        images = ["x.jpg"] if rng.random() < 0.8 else []
        if not images:
            turns[0] = Turn("user", turns[0].content.replace("<image>\n", ""))
        out.append(Conversation(id=str(i), turns=turns, images=images))
    return out


def padding_efficiency(lengths: np.ndarray, order: np.ndarray, batch: int) -> float:
    real = padded = 0
    for lo in range(0, len(order) - batch + 1, batch):
        group = lengths[order[lo : lo + batch]]
        real += int(group.sum())
        padded += int(group.max()) * batch
    return real / padded


class RecordList:
    """A record source over in-memory records (what ``open_source`` gives, without a file)."""

    def __init__(self, records: list[Conversation]) -> None:
        self.records, self.path = records, "<synthetic>"

    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: int) -> Conversation:
        return self.records[index]

    def num_words(self) -> np.ndarray:
        return np.array([sum(len(t.content.split()) for t in r.turns) for r in self.records])

    def num_images(self) -> np.ndarray:
        return np.array([len(r.images) for r in self.records])


def synthetic_anyres(n: int, names: list[str], seed: int = 0) -> list[Conversation]:
    """1-5 turns, 80% with 1-3 images of mixed sizes, each tagged in a random user turn."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        n_turns = rng.randint(1, 5)
        images = [rng.choice(names) for _ in range(rng.randint(1, 3))] if rng.random() < 0.8 else []
        homes = sorted(rng.randrange(n_turns) for _ in images)
        turns = []
        for k in range(n_turns):
            tags = "<image>\n" * homes.count(k)
            turns += [
                Turn("user", tags + sentence(rng, 4, 20)),
                Turn("assistant", sentence(rng, 5, 60)),
            ]
        out.append(Conversation(id=str(i), turns=turns, images=images))
    return out


def anyres_case(tokenizer, samples: int, batch: int, folder: str) -> None:
    """The OneVision case: dataset encoding and collation vs. a plain tokenizer pass."""
    from PIL import Image

    rng = random.Random(1)
    names = []
    for k in range(64):  # photos come in a few dozen resolutions
        height, width = rng.randint(16, 400), rng.randint(16, 400)
        names.append(f"im{k}.png")
        Image.new("RGB", (width, height), (k * 3, 100, 200)).save(f"{folder}/{names[-1]}")
    records = synthetic_anyres(samples, names)
    processor = onevision_processor(tokenizer)
    enc = ConversationEncoder(tokenizer, "chatml", num_image_tokens=ProcessorImageCounter(processor),
                              model_max_length=2048, image_position="before")  # fmt: skip
    dataset = SupervisedDataset(
        RecordList(records), enc, ImageLoader(processor.image_processor, folder)
    )
    texts = [enc.render(r, i).text for i, r in enumerate(records)]
    collate = MultimodalCollator(pad_token_id(tokenizer))

    def plain_pass() -> float:
        start = time.perf_counter()
        for text in texts:
            tokenizer(text)
        return time.perf_counter() - start

    def encode_pass() -> tuple[float, list]:
        start = time.perf_counter()
        out = [dataset.encode_sample(i)[1] for i in range(len(records))]
        return time.perf_counter() - start, out

    def collate_pass(encoded: list) -> float:
        items = [{"id": s.id, "input_ids": s.input_ids, "labels": s.labels} for s in encoded]
        start = time.perf_counter()
        for lo in range(0, len(items), batch):
            collate(items[lo : lo + batch])
        return time.perf_counter() - start

    plain_pass()
    cold = encode_pass()[0]  # image sizes read from the headers, the counter's memo filling
    start = time.perf_counter()
    modality = dataset.modality_lengths()  # reads every header once and keeps the sizes
    took = time.perf_counter() - start
    plain = min(plain_pass() for _ in range(3))
    runs = [encode_pass() for _ in range(3)]
    ours = min(t for t, _ in runs)
    encoded = runs[0][1]
    collating = min(collate_pass(encoded) for _ in range(3))
    start = time.perf_counter()
    pixels = sum(dataset[i]["pixel_values"] is not None for i in range(min(200, len(records))))
    per_item = (time.perf_counter() - start) / min(200, len(records))
    tokens = sum(sum(s.image_tokens) for s in encoded) / max(1, sum(s.num_images for s in encoded))
    print(f"\nanyres (OneVision settings, anyres_max_9, 32-pixel tiles): {len(records)} samples, "
          f"{sum(len(r.images) for r in records)} images, {tokens:.0f} image tokens per image")  # fmt: skip
    print(f"plain tokenizer pass (per sample): {len(records) / plain:9.0f} samples/s")
    n = len(records)
    print(f"dataset encoding, headers read (first pass): {n / cold:9.0f} samples/s")
    print(f"dataset encoding, sizes known (counter + encoder): {n / ours:9.0f} samples/s")
    print(
        f"collator over the encoded samples (batch {batch}): {len(records) / collating:9.0f} samples/s"
    )
    print(f"encoding + collation: {n / (ours + collating):9.0f} samples/s; ratio to the plain "
          f"pass {(ours + collating) / plain:.2f}x (goal <= 1.5x); first pass, headers read: "
          f"{(cold + collating) / plain:.2f}x")  # fmt: skip
    print(f"a whole item with pixels (image decode + processor, {pixels} with images of 200): "
          f"{1 / per_item:7.0f} samples/s")  # fmt: skip
    lengths = np.array([len(s.input_ids) for s in encoded])
    random_eff = padding_efficiency(
        lengths, np.random.default_rng(0).permutation(len(lengths)), batch
    )
    grouped_eff = padding_efficiency(
        lengths, grouped_order(modality, batch, seed=0, epoch=0), batch
    )
    error = np.abs(np.abs(modality) - lengths) / lengths
    print(f"true lengths in {took:.2f} s (length estimate error: mean {error.mean():.3f}, "
          f"max {error.max():.3f})")  # fmt: skip
    print(f"padding efficiency, batch {batch}: random {random_eff:.3f}  grouped {grouped_eff:.3f} "
          "(goal >= 0.9)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--template", default="vicuna_v1")
    parser.add_argument("--num-image-tokens", type=int, default=576)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-anyres", dest="anyres", action="store_false",
                        help="skip the anyres (OneVision) case")  # fmt: skip
    args = parser.parse_args()

    records = synthetic(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        lines = [sentence(random.Random(i), 5, 30) for i in range(20_000)]
        tokenizer = AutoTokenizer.from_pretrained(train_sentencepiece(lines, tmp, vocab_size=4000))
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<image>", "<|im_start|>", "<|im_end|>"]}
    )
    enc = ConversationEncoder(
        tokenizer, args.template, num_image_tokens=args.num_image_tokens, model_max_length=8192
    )
    texts = [enc.render(r, i).text for i, r in enumerate(records)]

    def plain_pass() -> float:
        start = time.perf_counter()
        for text in texts:
            tokenizer(text)
        return time.perf_counter() - start

    def encoder_pass() -> tuple[float, list]:
        start = time.perf_counter()
        samples = [enc.encode(r, i) for i, r in enumerate(records)]
        return time.perf_counter() - start, samples

    plain_pass(), encoder_pass()  # warm up
    plain = min(plain_pass() for _ in range(3))
    runs = [encoder_pass() for _ in range(3)]
    ours = min(t for t, _ in runs)
    samples = runs[0][1]
    start = time.perf_counter()
    tokenizer(texts)
    batched = time.perf_counter() - start
    print(f"samples: {len(records)}  template: {args.template}  vocab: {len(tokenizer)}")
    print(f"plain tokenizer pass (per sample): {len(records) / plain:9.0f} samples/s")
    print(f"plain tokenizer pass (one batch):  {len(records) / batched:9.0f} samples/s")
    print(f"lvlm-tune encoder (render+tokenize+mask+expand): {len(records) / ours:9.0f} samples/s")
    print(f"ratio encoder / plain per-sample pass: {ours / plain:.2f}x (goal <= 1.3x)")
    print(f"ratio encoder / plain batched pass:    {ours / batched:.2f}x")

    lengths = np.array([len(s.input_ids) for s in samples])
    modality = np.array([1 if r.images else -1 for r in records]) * lengths
    rng = np.random.default_rng(0)
    random_eff = padding_efficiency(lengths, rng.permutation(len(lengths)), args.batch)
    grouped = grouped_order(modality, args.batch, seed=0, epoch=0)
    grouped_eff = padding_efficiency(lengths, grouped, args.batch)
    print(
        f"padding efficiency, batch {args.batch}: random {random_eff:.3f}  grouped {grouped_eff:.3f} (goal >= 0.9)"
    )
    if args.anyres:
        with tempfile.TemporaryDirectory() as folder:
            anyres_case(tokenizer, args.samples, args.batch, folder)


if __name__ == "__main__":
    main()
