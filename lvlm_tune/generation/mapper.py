"""The mapping module (MiniGPT-5): voken hidden states -> a diffusion model's text condition.

``Linear(H, d) - GELU - Linear(d, d)`` lifts the N voken states of the LLM into width ``d``; an
``nn.Transformer`` encoder-decoder reads them (encoder) with ``num_queries`` learned query tokens
(decoder input), and a final linear maps width ``d`` to the condition width ``cond_dim``: the
output is ``(num_queries, cond_dim)``, the shape of the diffusion model's text-encoder output
(77 x 1024 for Stable Diffusion 2.1-base). The configuration is saved next to the weights
(``voken_mapper.json`` + ``voken_mapper.safetensors``) so a checkpoint rebuilds it alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MAPPER_CONFIG = "voken_mapper.json"
MAPPER_WEIGHTS = "voken_mapper.safetensors"


@dataclass(frozen=True)
class MapperConfig:
    """Sizes of the mapping module.

    Attributes:
        llm_hidden_size: width H of the LLM's hidden states.
        num_vokens: N voken states per image (the encoder's sequence length).
        num_queries: output tokens (the diffusion text condition's length, 77 for SD).
        cond_dim: output width (the UNet's ``cross_attention_dim``, 1024 for SD 2.1).
        hidden_size: width ``d`` of the two-layer lift and the transformer (1024 in MiniGPT-5).
        encoder_layers / decoder_layers: transformer depth (4 + 4 in MiniGPT-5).
        heads: attention heads (must divide ``hidden_size``).
        dropout: transformer dropout.
    """

    llm_hidden_size: int
    num_vokens: int = 8
    num_queries: int = 77
    cond_dim: int = 1024
    hidden_size: int = 1024
    encoder_layers: int = 4
    decoder_layers: int = 4
    heads: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads:
            raise ValueError(
                f"mapper_heads={self.heads} must divide mapper_hidden_size={self.hidden_size}"
            )


class VokenMapper(nn.Module):
    """Maps ``(batch, num_vokens, H)`` voken states to ``(batch, num_queries, cond_dim)``."""

    def __init__(self, config: MapperConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.lift = nn.Sequential(nn.Linear(config.llm_hidden_size, d), nn.GELU(), nn.Linear(d, d))
        self.transformer = nn.Transformer(
            d_model=d,
            nhead=config.heads,
            num_encoder_layers=config.encoder_layers,
            num_decoder_layers=config.decoder_layers,
            dim_feedforward=4 * d,
            dropout=config.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.queries = nn.Parameter(torch.randn(1, config.num_queries, d) * 0.02)
        self.out = nn.Linear(d, config.cond_dim)

    def forward(self, voken_states: torch.Tensor) -> torch.Tensor:
        if voken_states.shape[1:] != (self.config.num_vokens, self.config.llm_hidden_size):
            raise ValueError(
                f"voken states of shape {tuple(voken_states.shape)}; expected "
                f"(batch, {self.config.num_vokens}, {self.config.llm_hidden_size})"
            )
        dtype = self.queries.dtype
        source = self.lift(voken_states.to(dtype))
        queries = self.queries.expand(len(source), -1, -1)
        return self.out(self.transformer(source, queries))

    def null_condition(self, batch: int = 1) -> torch.Tensor:
        """The mapping of all-zero voken states: the unconditional (negative) embedding."""
        zeros = torch.zeros(
            batch, self.config.num_vokens, self.config.llm_hidden_size,
            dtype=self.queries.dtype, device=self.queries.device,
        )  # fmt: skip
        return self(zeros)


def save_mapper(mapper: VokenMapper, folder: str | os.PathLike, state: dict | None = None) -> None:
    """Write the config and weights into ``folder`` (``state`` overrides the live weights, e.g.
    a ZeRO-3 gathered state dict)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MAPPER_CONFIG).write_text(json.dumps(asdict(mapper.config), indent=2))
    weights = state if state is not None else mapper.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, str(folder / MAPPER_WEIGHTS), metadata={"format": "pt"})


def has_mapper(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MAPPER_WEIGHTS).is_file()


def load_mapper(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> VokenMapper:
    """Rebuild the mapper saved in ``folder``; raises naming the missing file."""
    folder = Path(folder)
    for name in (MAPPER_CONFIG, MAPPER_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name} (not a MiniGPT-5 voken checkpoint?)")
    config = MapperConfig(**json.loads((folder / MAPPER_CONFIG).read_text()))
    mapper = VokenMapper(config)
    mapper.load_state_dict(load_file(str(folder / MAPPER_WEIGHTS)), strict=True)
    return mapper.to(dtype)
