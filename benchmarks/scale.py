"""Time to the first collated batch, and peak RSS, on a 1,000,000-sample LLaVA JSON.

Writes a synthetic LLaVA JSON array (2-6 turns per sample, image file names pointing at 100
small PNGs), then runs, each in a fresh process: cold (no record cache yet) and warm (the
cache from the cold run). Each run opens the data, builds the dataset, the modality-length
grouped sampler and a DataLoader, and times until the first batch is collated.
Run: ``.venv/bin/python benchmarks/scale.py [--samples 1000000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

WORDS = (
    "the a red blue green square circle left right top what color shape how many is in of"
).split()


def write_data(path: str, n: int, images: str) -> None:
    from PIL import Image

    os.makedirs(images, exist_ok=True)
    for k in range(100):
        Image.new("RGB", (32, 32), (k, 2 * k, 255 - k)).save(os.path.join(images, f"{k}.png"))
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n):
            turns = []
            for k in range(rng.randint(1, 3)):
                q = " ".join(rng.choices(WORDS, k=rng.randint(5, 15))) + "?"
                a = " ".join(rng.choices(WORDS, k=rng.randint(5, 40))) + "."
                turns += [
                    {"from": "human", "value": ("<image>\n" if k == 0 else "") + q},
                    {"from": "gpt", "value": a},
                ]
            sample = {"id": f"s{i}", "image": f"{i % 100}.png", "conversations": turns}
            f.write(("," if i else "") + json.dumps(sample))
        f.write("]")


def first_batch(data: str, images: str, tokenizer_dir: str) -> None:
    """Child process: open -> dataset -> sampler -> first collated batch; print JSON figures."""
    start = time.perf_counter()
    import torch
    from transformers import AutoTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from lvlm_tune.data.collator import MultimodalCollator, pad_token_id
    from lvlm_tune.data.dataset import SupervisedDataset
    from lvlm_tune.data.encoder import ConversationEncoder
    from lvlm_tune.data.images import ImageLoader
    from lvlm_tune.data.sampler import ModalityLengthGroupedSampler
    from lvlm_tune.data.sources import open_source

    imports = time.perf_counter() - start
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    source = open_source(data)
    opened = time.perf_counter() - start
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    ds = SupervisedDataset(
        source,
        ConversationEncoder(tok, "vicuna_v1", num_image_tokens=16),
        ImageLoader(processor, images),
    )
    sampler = ModalityLengthGroupedSampler(ds.modality_lengths(), group_size=16)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=16, sampler=sampler, collate_fn=MultimodalCollator(pad_token_id(tok))
    )
    batch = next(iter(loader))
    total = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    print(
        json.dumps(
            {
                "samples": len(ds),
                "imports_s": imports,
                "open_s": opened,
                "first_batch_s": total,
                "peak_rss_gib": rss,
                "batch_shape": list(batch["input_ids"].shape),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        first_batch(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        from lvlm_tune.testing.tokenizers import train_sentencepiece

        data, images = os.path.join(tmp, "llava.json"), os.path.join(tmp, "images")
        t0 = time.perf_counter()
        write_data(data, args.samples, images)
        size = os.path.getsize(data) / 1024**2
        print(f"wrote {args.samples} samples ({size:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
        tok_dir = train_sentencepiece(
            [" ".join(random.choices(WORDS, k=12)) for _ in range(2000)], os.path.join(tmp, "tok")
        )
        env = {**os.environ, "LVLM_TUNE_CACHE": os.path.join(tmp, "cache")}
        for label in ("cold", "warm"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", data, images, str(tok_dir)],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{label}: first collated batch after {r['first_batch_s']:.1f} s "
                f"(imports {r['imports_s']:.1f} s, open {r['open_s']:.1f} s), "
                f"peak RSS {r['peak_rss_gib']:.2f} GiB, batch {r['batch_shape']}"
            )
        print("goals: cold < 120 s and < 4 GB RSS; warm < 10 s")


if __name__ == "__main__":
    main()
