"""Stream the records of a JSON array or JSON Lines file with bounded memory.

A JSON array of a million samples is decoded element by element over a rolling text buffer
(``json.JSONDecoder.raw_decode``), so memory stays at a few buffers whatever the file size;
errors name the line, column and character offset.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, TextIO

CHUNK_CHARS = 4 << 20
_WS = re.compile(r"[ \t\n\r]*")


def iter_json(path: str) -> Iterator[tuple[str | None, Any]]:
    """Yield ``(line text or None, record)`` from a JSON array or a JSON Lines file."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        head = f.read(CHUNK_CHARS)
        while head.isspace() and (more := f.read(CHUNK_CHARS)):
            head += more
        if not path.endswith(".jsonl") and head.lstrip().startswith("["):
            yield from ((None, obj) for obj in _JsonArray(f, head, path).values())
            return
        f.seek(0)
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            try:
                yield text, json.loads(text)
            except json.JSONDecodeError as e:
                hint = "" if path.endswith(".jsonl") else " (expected a JSON array or JSON Lines)"
                where = f"line {lineno}, column {e.colno}"
                raise ValueError(f"{path}: invalid JSON on {where}: {e.msg}{hint}") from None


class _JsonArray:
    """Streams the elements of one (possibly huge) JSON array over a rolling text buffer."""

    def __init__(self, f: TextIO, head: str, path: str) -> None:
        self.f, self.buf, self.path = f, head, path
        self.pos = self.skipped_chars = self.skipped_lines = 0
        self.last_error, self.line_start = -1, 0
        self.decode = json.JSONDecoder().raw_decode

    def fill(self, at_least: int = 0) -> bool:
        """Drop the consumed text and read more; False (buffer untouched) at end of file."""
        more = self.f.read(max(CHUNK_CHARS, at_least))
        if not more:
            return False
        self.skipped_lines += self.buf.count("\n", 0, self.pos)
        self.line_start = self._line_start(self.pos)
        self.skipped_chars += self.pos
        self.buf, self.pos = self.buf[self.pos :] + more, 0
        return True

    def peek(self) -> str:
        """Skip whitespace; the next character, or "" at end of file."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def _line_start(self, at: int) -> int:
        """Offset in the file of the line that holds buffer position ``at``."""
        newline = self.buf.rfind("\n", 0, at)
        return self.skipped_chars + newline + 1 if newline >= 0 else self.line_start

    def error(self, problem: str, at: int) -> ValueError:
        line = self.skipped_lines + self.buf.count("\n", 0, at) + 1
        column = self.skipped_chars + at - self._line_start(at) + 1
        where = f"line {line}, column {column} (character {self.skipped_chars + at})"
        return ValueError(f"{self.path}: invalid JSON at {where}: {problem}")

    def values(self) -> Iterator[Any]:
        if self.peek() != "[":
            raise self.error("expected '[' to open a JSON array of records", self.pos)
        self.pos += 1
        sep = "]" if self.peek() == "]" else ","
        if sep == "]":
            self.pos += 1
        while sep == ",":
            if not self.peek():
                raise self.error("unexpected end of file inside the array", self.pos)
            try:
                obj, end = self.decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # Retry with more text while the record may just be cut off by the buffer end:
                # a real error stays at the same place once more text is there.
                at = self.skipped_chars + e.pos
                moved, self.last_error = at != self.last_error, at
                cut = e.msg.startswith("Unterminated") or e.pos > len(self.buf) - 16
                if (cut or moved) and self.fill(len(self.buf) - self.pos):
                    continue
                raise self.error(e.msg, e.pos) from None
            if end > len(self.buf) - 16 and self.fill():
                continue  # a bare scalar ("1." of "1.5") might go on in the next chunk
            yield obj
            self.pos = end
            sep = self.peek()
            if sep not in (",", "]"):
                found = repr(sep) if sep else "the end of the file"
                raise self.error(f"expected ',' or ']' after a record, found {found}", self.pos)
            self.pos += 1
        if self.peek():
            raise self.error("extra data after the JSON array", self.pos)
