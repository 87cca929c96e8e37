"""A test helper shared by the image and inspect tests: huge PNG files that cost no memory."""

from __future__ import annotations

import struct
import zlib


def write_huge_png(path, width, height, pixels=True):
    """A grayscale PNG of ``width`` x ``height`` black pixels, written row by row (a few
    hundred KB on disk, without ever holding the pixels in memory). ``pixels=False`` writes the
    header alone (enough for anything refused before decoding)."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    pack = zlib.compressobj(1)
    row = b"\0" * (width + 1)  # filter byte + one byte per pixel
    idat = b"".join(pack.compress(row) for _ in range(height if pixels else 1)) + pack.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat))
        f.write(chunk(b"IEND", b""))
