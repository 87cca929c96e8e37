"""The record-source interface and where a source's cache entries are named.

A :class:`RecordSource` gives random access to the samples of one data file as
:class:`~lvlm_tune.data.record.Conversation` records, plus per-sample word and image counts (for
a length-grouped sampler); :mod:`lvlm_tune.data.json_source` and :mod:`lvlm_tune.data.hf_source`
implement it, :func:`lvlm_tune.data.sources.open_source` picks one. Both keep their caches under
names from :func:`cache_path` (one per file and tag, stale versions removed).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from lvlm_tune.data.formats import normalize
from lvlm_tune.data.preference import PreferenceRecord
from lvlm_tune.data.record import Conversation

CACHE_VERSION = "3"  # bump when the cache layout or the counting rules change
BATCH_ROWS = 10_000


class RecordSource:
    """Random access to the samples of one data file as :class:`Conversation` records.

    Attributes:
        path: the data file (named in every error message).
        fmt: the record format, ``"llava"``, ``"openai"``, ``"caption"``, or a preference
            format (``"llava_preference"``, ``"trl_preference"``: ``get`` gives
            :class:`~lvlm_tune.data.preference.PreferenceRecord`).
    """

    path: str
    fmt: str

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, index: int) -> Any:
        """The unvalidated sample at ``index`` (a dict as the data holds it)."""
        raise NotImplementedError

    def _counts(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def get(self, index: int) -> Conversation | PreferenceRecord:
        """Parse and validate sample ``index``; raises ``BadSampleError`` naming the field."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range for {len(self)} samples")
        return normalize(self.raw(index), self.fmt, source=self.path, index=index)

    def num_words(self) -> np.ndarray:
        """Whitespace word count of all message texts, ``int32`` per sample."""
        return self._counts()[0]

    def num_images(self) -> np.ndarray:
        """Number of images, ``int16`` per sample."""
        return self._counts()[1]

    def __getstate__(self) -> dict:  # re-open memory maps in DataLoader workers, never copy
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_open")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, fmt={self.fmt!r}, n={len(self)})"


def cache_path(path: str, tag: str, cache_dir: str, suffix: str, key: str) -> str:
    """Cache file for (path, tag) at the data's current ``key``; removes stale versions."""
    ident = hashlib.sha1(f"{path}\0{tag}".encode()).hexdigest()[:12]
    state = hashlib.sha1(key.encode()).hexdigest()[:12]
    prefix = f"{Path(path).name}-{ident}-"
    for old in Path(cache_dir).glob(f"{_glob_escape(prefix)}*{suffix}"):
        if old.name != f"{prefix}{state}{suffix}":
            old.unlink(missing_ok=True)  # readers that mapped it keep their mapping
    return os.path.join(cache_dir, f"{prefix}{state}{suffix}")


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)
