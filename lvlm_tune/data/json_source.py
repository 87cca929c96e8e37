"""JSON / JSON Lines files as record sources, through a memory-mapped Arrow record cache.

A JSON or JSONL file is streamed once (bounded memory, also for one huge JSON array) into an
Arrow IPC cache file - one compact JSON string per sample plus word and image counts - which
every later open (every rank, every run) memory-maps. The cache is keyed on the file's content,
so any edit rebuilds it; where it lives, when it is trusted and how entries are written is
:mod:`lvlm_tune.data.cache`.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lvlm_tune.data.cache import atomic_write, content_key, entry_problem, warn_once
from lvlm_tune.data.formats import count_images, count_words, detect_format
from lvlm_tune.data.jsonstream import iter_json
from lvlm_tune.data.record_source import BATCH_ROWS, CACHE_VERSION, RecordSource, cache_path


class JsonSource(RecordSource):
    """A JSON / JSONL file read through its memory-mapped Arrow record cache."""

    def __init__(self, path: str, fmt: str, cache_dir: str) -> None:
        self.path = path
        key = f"{CACHE_VERSION}:{content_key(path)}"
        self.cache_path = cache_path(path, fmt, cache_dir, ".arrow", key)
        problem = self._entry_problem(key)
        if problem is not None:
            if problem != "missing":
                warn_once(f"record cache entry {self.cache_path}: {problem}; rebuilding it")
            _build_json_cache(path, fmt, self.cache_path, key)
            problem = self._entry_problem(key)
            if problem is not None:
                raise RuntimeError(f"record cache entry {self.cache_path}: {problem}")

    def _entry_problem(self, key: str) -> str | None:
        """Open the cache entry; why it cannot be used (``None`` when it is open)."""
        try:
            meta = json.loads(self._table().schema.metadata[b"lvlm_tune"])
        except FileNotFoundError:
            return "missing"
        except (pa.ArrowInvalid, KeyError, ValueError) as error:
            return f"unreadable ({error})"
        problem = entry_problem(
            self.cache_path, (meta.get("source"), meta.get("key")), (self.path, key)
        )
        if problem is not None:
            for name in [k for k in self.__dict__ if k.startswith("_open")]:
                del self.__dict__[name]
        return problem

    def _table(self) -> pa.Table:
        if "_open_table" not in self.__dict__:
            table = pa.ipc.open_file(pa.memory_map(self.cache_path)).read_all()
            self.fmt = json.loads(table.schema.metadata[b"lvlm_tune"])["format"]
            self._open_chunks = table.column("json").chunks
            self._open_starts = np.cumsum([0] + [len(c) for c in self._open_chunks]).tolist()
            self._open_table = table
        return self._open_table

    def __len__(self) -> int:
        return self._table().num_rows

    def raw(self, index: int) -> Any:
        self._table()
        c = bisect.bisect_right(self._open_starts, index) - 1
        return json.loads(self._open_chunks[c][index - self._open_starts[c]].as_py())

    def _counts(self) -> tuple[np.ndarray, np.ndarray]:
        table = self._table()
        return (
            table.column("num_words").to_numpy().astype(np.int32),
            table.column("num_images").to_numpy().astype(np.int16),
        )


def _build_json_cache(path: str, fmt: str, cache_path: str, key: str) -> None:
    """Stream a JSON array / JSON Lines file into an Arrow IPC record cache recording ``key``."""
    records = iter_json(path)
    first = next(records, None)
    if fmt == "auto":
        if first is None:
            raise ValueError(f"{path}: no records, cannot detect the format")
        fmt = detect_format(first[1] if isinstance(first[1], dict) else [], f"{path}: record 0")
    schema = _cache_schema(fmt, path, key)
    rows = itertools.chain([first] if first else [], records)
    dump = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))

    def write(f: Any) -> None:
        with pa.ipc.new_file(f, schema) as writer:
            while batch := list(itertools.islice(rows, BATCH_ROWS)):
                columns = (
                    [text or dump(obj) for text, obj in batch],
                    [count_words(obj, fmt) for _, obj in batch],
                    [min(count_images(obj, fmt), 2**15 - 1) for _, obj in batch],
                )
                writer.write_batch(pa.record_batch(list(columns), schema=schema))

    atomic_write(cache_path, write)
    if f"{CACHE_VERSION}:{content_key(path)}" != key:  # edited while it was read
        Path(cache_path).unlink(missing_ok=True)
        raise ValueError(f"{path}: changed while its record cache was being built; run again")


def _cache_schema(fmt: str, path: str, key: str) -> pa.Schema:
    meta = {"format": fmt, "source": path, "version": CACHE_VERSION, "key": key}
    return pa.schema(
        [("json", pa.large_string()), ("num_words", pa.int32()), ("num_images", pa.int16())],
        metadata={"lvlm_tune": json.dumps(meta)},
    )
