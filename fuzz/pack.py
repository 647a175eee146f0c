"""The fuzz targets' input encoding (see harness.h): an image as its non-zero bytes.

    python fuzz/pack.py pack IMAGE INPUT      # image file -> fuzz input
    python fuzz/pack.py unpack INPUT IMAGE    # fuzz input -> image file (to reproduce a finding)

An input is ``u64 file_size`` then records ``{u32 offset, u16 length, bytes}``,
little-endian; the harness writes each record's bytes at its offset into a
file of file_size bytes (capped at 64 MiB) whose holes read as zeros, then
recomputes the checksums of the VHD footer and dynamic header and of the VHDX
headers and region tables unless bit 63 of file_size (KEEP_CHECKSUMS) is set.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

MAX_FILE = 64 << 20
KEEP_CHECKSUMS = 1 << 63
MAX_RECORD = 0xFFFF
# Zero runs shorter than this stay inside a record: fewer, larger records.
GAP = 64


def _runs(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the non-zero stretches, joined across short zero gaps."""
    runs: list[tuple[int, int]] = []
    position, size = 0, len(data)
    while position < size:
        start = position
        while start < size and data[start] == 0:
            start += 1
        if start == size:
            break
        end = start
        while end < size:
            zero = data.find(b"\0" * GAP, end)
            if zero < 0:
                end = size
                break
            end = zero
            break
        if runs and start - runs[-1][1] < GAP:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
        position = end
    return runs


def pack(image: bytes, file_size: int | None = None) -> bytes:
    """The fuzz input that reproduces ``image`` (beyond 4 GiB offsets are dropped)."""
    out = bytearray(struct.pack("<Q", len(image) if file_size is None else file_size))
    for start, end in _runs(image):
        for at in range(start, end, MAX_RECORD):
            piece = image[at : min(end, at + MAX_RECORD)]
            if at + len(piece) <= MAX_FILE:
                out += struct.pack("<IH", at, len(piece)) + piece
    return bytes(out)


def _crc32c(data: bytes | bytearray) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _reseal(image: bytearray, at: int, signature: bytes, length: int, checksum_at: int, vhd: bool) -> None:
    if at + length > len(image) or image[at : at + len(signature)] != signature:
        return
    body = bytearray(image[at : at + length])
    body[checksum_at : checksum_at + 4] = bytes(4)
    if vhd:
        struct.pack_into(">I", image, at + checksum_at, ~sum(body) & 0xFFFFFFFF)
    else:
        struct.pack_into("<I", image, at + checksum_at, _crc32c(body))


def reseal(image: bytearray) -> None:
    """What the harness does to the checksums (see harness.c)."""
    size = len(image)
    if size >= 512 and image[size - 512 : size - 504] == b"conectix":
        _reseal(image, size - 512, b"conectix", 512, 64, True)
        header = struct.unpack_from(">Q", image, size - 512 + 16)[0]
        if header < size and size - header >= 1024:
            _reseal(image, header, b"cxsparse", 1024, 36, True)
    for at in (64 << 10, 128 << 10):
        _reseal(image, at, b"head", 4096, 4, False)
    for at in (192 << 10, 256 << 10):
        _reseal(image, at, b"regi", 65536, 4, False)


def unpack(data: bytes) -> bytes:
    """The image file the harness writes for fuzz input ``data``."""
    declared = struct.unpack_from("<Q", data)[0] if len(data) >= 8 else 0
    size = min(declared & ~KEEP_CHECKSUMS, MAX_FILE)
    image = bytearray(size)
    at = min(len(data), 8)
    while len(data) - at >= 6:
        offset, length = struct.unpack_from("<IH", data, at)
        at += 6
        piece = data[at : at + length]
        at += len(piece)
        if offset + len(piece) <= MAX_FILE:
            if offset + len(piece) > len(image):
                image.extend(bytes(offset + len(piece) - len(image)))
            image[offset : offset + len(piece)] = piece
    if not declared & KEEP_CHECKSUMS:
        reseal(image)
    return bytes(image)


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[1] not in ("pack", "unpack"):
        print(__doc__, file=sys.stderr)
        return 2
    source, target = Path(argv[2]), Path(argv[3])
    convert = pack if argv[1] == "pack" else unpack
    target.write_bytes(convert(source.read_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
