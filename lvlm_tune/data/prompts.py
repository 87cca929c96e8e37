"""Built-in instruction pools and the reproducible per-sample draws that use them.

Caption pairs become one question/answer turn whose question is drawn from a pool: ``brief``
(LLaVA feature alignment) or ``detailed`` (MiniGPT-4 stage 2). Every random choice made for a
sample (its instruction, its image position) is a pure function of (seed, sample index, epoch),
so a run is reproducible and a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import struct

INSTRUCTION_POOLS: dict[str, tuple[str, ...]] = {
    "brief": (
        "Describe the image concisely.",
        "Provide a brief description of the given image.",
        "Offer a succinct explanation of the picture presented.",
        "Summarize the visual content of the image.",
        "Give a short and clear explanation of the subsequent image.",
        "Share a concise interpretation of the image provided.",
        "Present a compact description of the photo's key features.",
        "Relay a brief, clear account of the picture shown.",
        "Render a clear and concise summary of the photo.",
        "Write a terse but informative summary of the picture.",
        "Create a compact narrative representing the image presented.",
    ),
    "detailed": (
        "Describe this image in detail.",
        "Take a look at this image and describe what you notice.",
        "Please provide a detailed description of the picture.",
        "Could you describe the contents of this image for me?",
    ),
}


def get_pool(name: str) -> tuple[str, ...]:
    """Look up an instruction pool; raises ``KeyError`` naming the choices."""
    try:
        return INSTRUCTION_POOLS[name]
    except KeyError:
        choices = ", ".join(INSTRUCTION_POOLS)
        raise KeyError(f"unknown instruction pool {name!r}; choose one of: {choices}") from None


def sample_uniform(seed: int, index: int, epoch: int, salt: str) -> float:
    """A number in [0, 1) that depends only on its arguments (same on every rank and worker)."""
    key = struct.pack("<qqq", seed, index, epoch) + salt.encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def draw_instruction(pool: str, seed: int, index: int, epoch: int) -> str:
    """The instruction for one sample, drawn reproducibly from ``pool``."""
    choices = get_pool(pool)
    return choices[int(sample_uniform(seed, index, epoch, "instruction") * len(choices))]
