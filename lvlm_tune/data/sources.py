"""Lazy, random-access record sources: JSON / JSONL files and Hugging Face datasets.

:func:`open_source` detects the container and the record format and returns a
:class:`~lvlm_tune.data.record_source.RecordSource`: ``len``, ``get(i)`` (parse and validate one
sample into a :class:`~lvlm_tune.data.record.Conversation`) and per-sample length estimates for
a length-grouped sampler. Nothing holds a Python object per sample: JSON / JSONL files are read
through a memory-mapped Arrow record cache (:mod:`lvlm_tune.data.json_source`), Hugging Face
data (``save_to_disk`` folders, ``.arrow``, ``.parquet``) through ``datasets``
(:mod:`lvlm_tune.data.hf_source`).
"""

from __future__ import annotations

import os

from lvlm_tune.data.cache import default_cache_dir, usable_cache_dir
from lvlm_tune.data.formats import FORMATS
from lvlm_tune.data.hf_source import HFSource
from lvlm_tune.data.json_source import JsonSource
from lvlm_tune.data.record_source import RecordSource

SOURCE_FORMATS: tuple[str, ...] = ("auto", *FORMATS, "hf")
HF_SUFFIXES = (".parquet", ".arrow")

__all__ = [
    "SOURCE_FORMATS",
    "HFSource",
    "JsonSource",
    "RecordSource",
    "default_cache_dir",
    "open_source",
]


def open_source(
    path: str | os.PathLike, *, fmt: str = "auto", cache_dir: str | None = None
) -> RecordSource:
    """Open a data file or dataset folder as a lazy :class:`RecordSource`.

    Args:
        path: a ``.json`` (array or JSON Lines) / ``.jsonl`` file, a ``.parquet`` or ``.arrow``
            file, or a folder written by ``datasets.Dataset.save_to_disk``.
        fmt: ``"auto"`` (detect), ``"llava"``, ``"openai"``, ``"caption"``,
            ``"llava_preference"``, ``"trl_preference"`` (record format of a JSON file, or of
            the rows of a dataset) or ``"hf"`` (a dataset, rows detected).
        cache_dir: where record caches go; default :func:`default_cache_dir`. A folder that is
            not trusted or not writable is replaced by a private temporary one (one warning).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown ``fmt``, undetectable format, or malformed JSON (naming the line).
    """
    path = os.path.abspath(os.fspath(path))
    if fmt not in SOURCE_FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choices: {SOURCE_FORMATS}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    cache_dir = usable_cache_dir(os.path.abspath(cache_dir or default_cache_dir()))
    if fmt == "hf" or os.path.isdir(path) or path.endswith(HF_SUFFIXES):
        return HFSource(path, "auto" if fmt == "hf" else fmt, cache_dir)
    if fmt == "auto" and not path.endswith((".json", ".jsonl")):
        raise ValueError(
            f"{path}: cannot tell the format from the name; pass fmt= {SOURCE_FORMATS}"
        )
    return JsonSource(path, fmt, cache_dir)
