"""Fixtures for tests, benchmarks and the demo: tiny models, tokenizers and diffusion parts.

Everything here is built from configs and saved with ``save_pretrained`` so it loads back
through ``from_pretrained``, the path real checkpoints take. The library layers never import
this package.
"""
