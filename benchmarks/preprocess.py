"""Collator throughput vs. one plain tokenizer pass, and padding efficiency of the sampler.

Prints samples/s of the encoder (render + tokenize + exact masks + image expansion) on 10k
synthetic 1-5-turn conversations, the time ratio to one plain tokenizer pass over the same
rendered texts (the floor), and real/padded tokens for random vs. modality-length grouped
batches. Run: ``.venv/bin/python benchmarks/preprocess.py [--samples 10000]``.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import numpy as np
from transformers import AutoTokenizer

from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.record import Conversation, Turn
from lvlm_tune.data.sampler import grouped_order
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--template", default="vicuna_v1")
    parser.add_argument("--num-image-tokens", type=int, default=576)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    records = synthetic(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        lines = [sentence(random.Random(i), 5, 30) for i in range(20_000)]
        tokenizer = AutoTokenizer.from_pretrained(train_sentencepiece(lines, tmp, vocab_size=4000))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
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


if __name__ == "__main__":
    main()
