"""lvlm-tune: fine-tune vision-language models with exact answer-only supervision."""

__version__ = "0.1.0"
