"""Training throughput of random, grouped and packed batches, with and without logits only at
trained labels, and the peak memory of the loss with full logits vs. logits at labels.

The data is synthetic, with the shape of LLaVA-1.5's mix665k: 60 % image samples (a system
prompt, 576 image tokens, 1-10 turns of questions and short or long answers) and 40 %
text-only samples of 1-10 turns with longer answers, up to 2048 tokens; only answers and their
STOP train, as the encoder labels them. The timed model is a LLaMA of 2 layers, 512 wide,
vocab 32k (sdpa), fed the image tokens as ordinary ids: the vision tower costs the same per image
whatever the batching, so the language model is where batching and the loss differ. Every
step is forward, backward and an AdamW step on batches made by the project's own pieces
(``grouped_order``, ``pack_order``, the padded and the packed collator, ``loss_at_labels``).

Figures: real (non-pad) and trained tokens per second of each of the six runs (each trains
the same random subset of the samples: batches of 4 padded samples, or 2 packs of 4096); padding
efficiency (real / padded tokens) of each batching over a whole epoch, and how full the packs
are (real / rows x ``packing_max_length``); peak memory of the loss's forward + backward (peak
RSS growth in a fresh process, the LM head frozen as in stage 1) on stage-1 samples (576 image
tokens + a 10-30 token caption) at vocab 32k and 152k, full logits (transformers' causal-LM
loss) vs. logits at labels. ``--json`` prints them as one JSON object on the last line.
Run: ``.venv/bin/python benchmarks/throughput.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from lvlm_tune.data.collator import MultimodalCollator
from lvlm_tune.data.labels import IGNORE_INDEX
from lvlm_tune.data.packed_collator import PACKED_SAMPLES, PackedCollator
from lvlm_tune.data.packing import pack_order
from lvlm_tune.data.sampler import grouped_order
from lvlm_tune.training.label_logits import loss_at_labels, trained_positions

IMAGE_TOKENS = 576
MAX_LENGTH = 2048
PAD = 0


def _span(rng: np.random.Generator, vocab: int, n: int, train: bool) -> tuple[list, list]:
    ids = rng.integers(3, vocab - 1, n).tolist()
    return ids, ids if train else [IGNORE_INDEX] * n


def conversation(rng: np.random.Generator, image: bool, vocab: int) -> dict[str, Any]:
    """One synthetic sample: header, image run, turns of masked questions, trained answers."""
    ids, labels = _span(rng, vocab, 35, False)
    if image:
        ids, labels = ids + [vocab - 1] * IMAGE_TOKENS, labels + [IGNORE_INDEX] * IMAGE_TOKENS
    for _ in range(int(rng.integers(1, 11))):
        q = _span(rng, vocab, int(rng.integers(8, 30 if image else 80)), False)
        if image:
            n = int(rng.integers(1, 6)) if rng.random() < 0.5 else int(rng.integers(20, 150))
        else:
            n = int(min(rng.lognormal(4.8, 0.8), 600))
        a = _span(rng, vocab, n + 1, True)  # the answer and its STOP
        if len(ids) + len(q[0]) + len(a[0]) > MAX_LENGTH:
            break
        ids, labels = ids + q[0] + a[0], labels + q[1] + a[1]
    if all(label == IGNORE_INDEX for label in labels):  # the first answer did not fit
        ids, labels = [*ids[: MAX_LENGTH - 2], 5, 2], [*labels[: MAX_LENGTH - 2], 5, 2]
    return {"input_ids": np.array(ids), "labels": np.array(labels), "pixel_values": None}


def mix665k_like(n: int, vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [conversation(rng, rng.random() < 0.6, vocab) for _ in range(n)]


def stage1_like(n: int, vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """LLaVA stage 1 (plain template): 576 image tokens then a 10-30 token caption."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        caption = [*rng.integers(3, vocab - 1, int(rng.integers(10, 31))).tolist(), 2]
        ids = [vocab - 1] * IMAGE_TOKENS + caption
        out.append({"input_ids": np.array(ids),
                    "labels": np.array([IGNORE_INDEX] * IMAGE_TOKENS + caption),
                    "pixel_values": None})  # fmt: skip
    return out


def batch_orders(
    lengths: np.ndarray, batch: int, rows: int, capacity: int, seed: int
) -> dict[str, list]:
    """The index groups of one epoch per batching: samples per batch, or packs per batch."""
    random = np.random.default_rng(seed).permutation(len(lengths))
    grouped = grouped_order(lengths, batch, seed, 0)
    packs = pack_order(lengths, capacity, seed, 0)
    return {
        "random": [random[i : i + batch].tolist() for i in range(0, len(random), batch)],
        "grouped": [grouped[i : i + batch].tolist() for i in range(0, len(grouped), batch)],
        "packed": [packs[i : i + rows] for i in range(0, len(packs), rows)],
    }


def padding_efficiency(sizes: np.ndarray, groups: list, packed: bool) -> float:
    """Real / padded tokens over the batches (rows padded to the longest row of a batch)."""
    real = padded = 0
    for group in groups:
        rows = [int(sizes[p].sum()) for p in group] if packed else sizes[group].tolist()
        real += sum(rows)
        padded += max(rows) * len(rows)
    return real / padded


def _real(sizes: np.ndarray, group: list, packed: bool) -> int:
    return int(sum(sizes[p].sum() for p in group) if packed else sizes[group].sum())


def collate(samples: list, group: list, packed: bool) -> dict[str, Any]:
    if packed:
        return PackedCollator(PAD)([[samples[i] for i in pack] for pack in group])
    return MultimodalCollator(PAD)([samples[i] for i in group])


def tiny_llama(vocab: int, hidden: int, layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.7 * hidden),
        num_hidden_layers=layers, num_attention_heads=max(hidden // 32, 1),
        num_key_value_heads=max(hidden // 32, 1), max_position_embeddings=MAX_LENGTH,
        attn_implementation="sdpa", tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def step_loss(model: Any, batch: dict[str, Any], at_labels: bool) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", PACKED_SAMPLES, "pixel_values")}
    labels = batch["labels"]
    if not at_labels:
        return model(**inputs, labels=labels).loss
    outputs = model(**inputs, logits_to_keep=trained_positions(labels))
    return loss_at_labels(outputs, labels)


def train_speed(model: Any, batches: list, at_labels: bool) -> dict[str, float]:
    """Real and trained tokens per second over the ``(batch, real tokens)`` (after one
    untimed warm-up step on the first batch)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: dict[str, Any]) -> None:
        step_loss(model, batch, at_labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0][0])
    start = time.perf_counter()
    for batch, _ in batches:
        step(batch)
    seconds = time.perf_counter() - start
    real = sum(tokens for _, tokens in batches)
    trained = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b, _ in batches)
    return {"real_tokens_per_s": real / seconds, "trained_tokens_per_s": trained / seconds}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> int:
    """Reset the peak RSS (Linux ``clear_refs`` 5) and return the current RSS."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def _loss_peak(vocab: int, at_labels: bool, hidden: int, batch: int, out: Any) -> None:
    """In a fresh process: peak RSS growth of one loss forward + backward (frozen LM head)."""
    torch.set_num_threads(1)
    batch_inputs = MultimodalCollator(PAD)(stage1_like(batch, vocab, seed=1))
    labels = batch_inputs["labels"]
    torch.manual_seed(0)
    states = torch.randn(*labels.shape, hidden, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    before = _reset_peak()
    if at_labels:
        keep = trained_positions(labels)
        loss = loss_at_labels({"logits": head(states[keep])}, labels)
    else:
        loss = ForCausalLMLoss(head(states), labels, vocab)
    loss.backward()
    out.put((_status_bytes("VmHWM") - before, float(loss.detach())))


def loss_peak_memory(vocab: int, at_labels: bool, hidden: int, batch: int) -> tuple[int, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    proc = context.Process(target=_loss_peak, args=(vocab, at_labels, hidden, batch, queue))
    proc.start()
    result = queue.get(timeout=600)
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (seconds)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON last")
    parser.add_argument("--samples", type=int, default=4000, help="samples for the epoch stats")
    parser.add_argument("--timed", type=int, default=48, help="samples each timed run trains")
    parser.add_argument("--hidden", type=int, default=512, help="width of the timed LLaMA")
    parser.add_argument("--layers", type=int, default=2, help="layers of the timed LLaMA")
    parser.add_argument("--batch", type=int, default=4, help="samples per padded batch")
    parser.add_argument("--rows", type=int, default=2, help="packs per packed batch")
    parser.add_argument("--packing-max-length", type=int, default=4096, help="tokens per pack")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    quick = args.quick
    vocab, hidden, layers = (4096, 64, 2) if quick else (32000, args.hidden, args.layers)
    samples = mix665k_like(400 if quick else args.samples, vocab)
    sizes = np.array([len(s["input_ids"]) for s in samples])
    has_image = np.array([(s["input_ids"] == vocab - 1).any() for s in samples])
    lengths = np.where(has_image, sizes, -sizes)
    capacity = args.packing_max_length
    orders = batch_orders(lengths, args.batch, args.rows, capacity, seed=0)
    figures: dict[str, Any] = {"samples": len(samples), "vocab": vocab, "hidden": hidden}
    for mode, groups in orders.items():
        figures[f"padding_efficiency_{mode}"] = padding_efficiency(sizes, groups, mode == "packed")
    packs = [p for group in orders["packed"] for p in group]
    figures["pack_fill_packed"] = float(sizes.sum() / (len(packs) * capacity))
    # Timed: every batching trains the same samples (a random subset), so the real tokens
    # are equal and the time is what differs.
    timed = np.random.default_rng(1).permutation(len(samples))[: 12 if quick else args.timed]
    subset = [samples[i] for i in timed]
    for mode, groups in batch_orders(lengths[timed], args.batch, args.rows, capacity, 0).items():
        packed = mode == "packed"
        batches = [(collate(subset, g, packed), _real(sizes[timed], g, packed)) for g in groups]
        for at_labels in (False, True):
            speed = train_speed(tiny_llama(vocab, hidden, layers), batches, at_labels)
            suffix = f"{mode}{'_labels' if at_labels else ''}"
            for key, value in speed.items():
                figures[f"{key}_{suffix}"] = value
    for tail in ("", "_labels"):
        figures[f"real_tokens_per_s_packed_vs_random{tail}"] = (
            figures[f"real_tokens_per_s_packed{tail}"] / figures[f"real_tokens_per_s_random{tail}"]
        )
    figures["trained_tokens_per_s_labels_vs_full_packed"] = (
        figures["trained_tokens_per_s_packed_labels"] / figures["trained_tokens_per_s_packed"]
    )
    mem_hidden, mem_batch = (64, 2) if quick else (1024, 4)
    for vocab_size, name in ((32000, "32k"), (152064, "152k")):
        full, full_loss = loss_peak_memory(vocab_size, False, mem_hidden, mem_batch)
        kept, kept_loss = loss_peak_memory(vocab_size, True, mem_hidden, mem_batch)
        assert abs(full_loss - kept_loss) <= 1e-4 * abs(full_loss), (full_loss, kept_loss)
        figures[f"loss_peak_mib_full_{name}"] = full / 2**20
        figures[f"loss_peak_mib_labels_{name}"] = kept / 2**20
        figures[f"loss_peak_memory_full_vs_labels_{name}"] = full / max(kept, 1)
    report(figures)
    if args.json:
        print(json.dumps(figures))


def report(f: dict[str, Any]) -> None:
    print(f"{f['samples']} mix665k-like samples, LLaMA {f['hidden']} wide, vocab {f['vocab']}")
    print("padding efficiency: " + ", ".join(
        f"{m} {f[f'padding_efficiency_{m}']:.3f}" for m in ("random", "grouped", "packed")
    ) + f"; packs {f['pack_fill_packed']:.3f} full")  # fmt: skip
    for mode in ("random", "grouped", "packed"):
        for tail, what in (("", "full logits"), ("_labels", "logits at labels")):
            print(f"{mode:8s} {what:17s} real {f[f'real_tokens_per_s_{mode}{tail}']:8.0f} "
                  f"tok/s, trained {f[f'trained_tokens_per_s_{mode}{tail}']:7.0f} tok/s")  # fmt: skip
    print(f"packed / random real tokens/s: {f['real_tokens_per_s_packed_vs_random_labels']:.2f}x "
          f"(full logits: {f['real_tokens_per_s_packed_vs_random']:.2f}x)")  # fmt: skip
    for name in ("32k", "152k"):
        print(f"loss peak memory, vocab {name}: full {f[f'loss_peak_mib_full_{name}']:.0f} MiB, "
              f"at labels {f[f'loss_peak_mib_labels_{name}']:.1f} MiB: "
              f"{f[f'loss_peak_memory_full_vs_labels_{name}']:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
