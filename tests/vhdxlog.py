"""Helpers for the VHDX log tests: our own reader (tests/tools/vdread.c built
against the provider's format code), dirty logs left by QEMU, and log entries
built by [MS-VHDX] §2.3 where no independent writer makes the case."""

from __future__ import annotations

import json
import struct
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require_tool

KiB = 1024
MiB = 1024 * KiB
ROOT = Path(__file__).resolve().parent.parent
PROVIDER = ROOT / "src" / "provider"
# The format modules and what they use, as fuzz/build.sh lists them, and the
# compaction engine (which vdwork runs).
READER_SOURCES = [
    "image.c",
    "vhd.c",
    "iso.c",
    "crc32c.c",
    "bytes.c",
    "utf16.c",
    "errors.c",
    "reserve.c",
    "compact.c",
]


def build_tool(out: Path, name: str, *extra: str) -> Path:
    """tests/tools/NAME.c linked with the provider's format code (extra: more
    compiler or linker options)."""
    cc = require_tool("gcc")
    sources = [PROVIDER / source for source in READER_SOURCES] + sorted(PROVIDER.glob("vhdx*.c"))
    binary = out / name
    subprocess.run(
        [cc, "-std=gnu11", "-O2", "-Wall", "-Werror", "-Wno-unused-parameter", f"-I{PROVIDER}",
         f"-I{ROOT / 'src' / '_cffi_src'}", "-o", str(binary), str(ROOT / "tests" / "tools" / f"{name}.c"),
         str(ROOT / "src" / "_cffi_src" / "messages.c"), *map(str, sources), "-lpthread", *extra],
        check=True,
    )  # fmt: skip
    return binary


def build_vdread(out: Path) -> Path:
    return build_tool(out, "vdread")


@dataclass
class ReadResult:
    ok: bool
    data: bytes
    error: str  # "0xCODE detail" when not ok


def vdread(
    reader: Path, image: Path, *, writable: bool = False, ranges: list[str] | None = None
) -> ReadResult:
    """The whole disk; with ranges ("OFFSET:LENGTH"), its size (8 bytes, little-endian)
    then those ranges that lie inside it."""
    args = [str(reader), *(["-w"] if writable else []), str(image), *(ranges or [])]
    out = subprocess.run(args, capture_output=True, check=False)
    assert out.returncode in (0, 2), out.stderr
    return ReadResult(out.returncode == 0, out.stdout, out.stderr.decode().strip())


# ---- reading the structures ---------------------------------------------------

_CRC32C_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C_TABLE.append(_c)


def crc32c(data: bytes | bytearray) -> int:
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


HEADERS = (64 * KiB, 128 * KiB)
BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le


def current_header(data: bytes | bytearray) -> int:
    """File offset of the current header (the valid one with the higher sequence number)."""

    def valid(at: int) -> bool:
        body = bytearray(data[at : at + 4 * KiB])
        stored = struct.unpack_from("<I", body, 4)[0]
        body[4:8] = bytes(4)
        return body[:4] == b"head" and crc32c(body) == stored

    return max((at for at in HEADERS if valid(at)), key=lambda at: struct.unpack_from("<Q", data, at + 8)[0])


def log_guid(data: bytes | bytearray) -> bytes:
    at = current_header(data)
    return bytes(data[at + 48 : at + 64])


def log_region(data: bytes | bytearray) -> tuple[int, int]:
    at = current_header(data)
    length, offset = struct.unpack_from("<IQ", data, at + 68)
    return offset, length


def bat_offset(data: bytes | bytearray) -> int:
    table = 192 * KiB
    for i in range(struct.unpack_from("<I", data, table + 8)[0]):
        entry = table + 16 + 32 * i
        if data[entry : entry + 16] == BAT_GUID:
            return struct.unpack_from("<Q", data, entry + 16)[0]
    raise AssertionError("no BAT region")


def set_log_guid(data: bytearray, guid: bytes) -> None:
    """Names guid as the log in the current header (resealed)."""
    at = current_header(data)
    data[at + 48 : at + 64] = guid
    data[at + 4 : at + 8] = bytes(4)
    struct.pack_into("<I", data, at + 4, crc32c(data[at : at + 4 * KiB]))


# ---- QEMU as the independent writer -----------------------------------------------


def qemu_io(
    image: Path, command: str, *, fail_bat_write_at: int | None = None
) -> subprocess.CompletedProcess:
    """Runs one qemu-io command on image; with fail_bat_write_at, the first write
    to that file offset (a BAT sector: QEMU writes BAT entries through its log and
    then in place) fails with EIO, which leaves QEMU's log entry unreplayed."""
    file_node: dict = {"driver": "file", "filename": str(image)}
    if fail_bat_write_at is not None:
        file_node = {
            "driver": "blkdebug",
            "inject-error": [
                {"event": "pwritev", "sector": fail_bat_write_at // 512, "errno": 5, "once": True}
            ],
            "image": file_node,
        }
    spec = "json:" + json.dumps({"driver": "vhdx", "file": file_node})
    return subprocess.run(
        [require_tool("qemu-io"), "-c", command, spec], capture_output=True, text=True, check=False
    )


def qemu_replayed_raw(image: Path, scratch: Path) -> bytes:
    """The virtual disk as QEMU sees it after replaying the log of a copy of image."""
    qemu_img = require_tool("qemu-img")
    copy = scratch / (image.name + ".qemu")
    copy.write_bytes(image.read_bytes())
    subprocess.run(
        [qemu_img, "check", "-q", "-r", "all", "-f", "vhdx", str(copy)], capture_output=True, check=False
    )
    raw = scratch / (image.name + ".raw")
    subprocess.run([qemu_img, "convert", "-f", "vhdx", "-O", "raw", str(copy), str(raw)], check=True)
    data = raw.read_bytes()
    copy.unlink()
    raw.unlink()
    return data


def qemu_check(image: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_tool("qemu-img"), "check", "-f", "vhdx", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )


# ---- log entries by the spec ----------------------------------------------------


@dataclass
class Write:
    file_offset: int
    data: bytes | None = None  # 4 KiB, or None for a zero descriptor
    zero_length: int = 0


def log_entry(
    sequence: int, tail: int, guid: bytes, writes: list[Write], *, flushed: int, last: int
) -> bytearray:
    """One log entry (§2.3.1): header and descriptors, then a data sector per data descriptor."""
    count = len(writes)
    descriptor_sectors = (count + 2 + 127) // 128
    data_writes = [w for w in writes if w.data is not None]
    entry = bytearray((descriptor_sectors + len(data_writes)) * 4 * KiB)
    struct.pack_into("<4sIIIQII16sQQ", entry, 0, b"loge", 0, len(entry), tail, sequence, count, 0, guid,
                     flushed, last)  # fmt: skip
    data_at = descriptor_sectors * 4 * KiB
    for i, w in enumerate(writes):
        at = 64 + 32 * i
        if w.data is None:
            struct.pack_into("<4sIQQQ", entry, at, b"zero", 0, w.zero_length, w.file_offset, sequence)
        else:
            assert len(w.data) == 4 * KiB
            entry[at : at + 4] = b"desc"
            entry[at + 4 : at + 8] = w.data[4092:]
            entry[at + 8 : at + 16] = w.data[:8]
            struct.pack_into("<QQ", entry, at + 16, w.file_offset, sequence)
            struct.pack_into("<4sI", entry, data_at, b"data", sequence >> 32)
            entry[data_at + 8 : data_at + 4092] = w.data[8:4092]
            struct.pack_into("<I", entry, data_at + 4092, sequence & 0xFFFFFFFF)
            data_at += 4 * KiB
    struct.pack_into("<I", entry, 4, crc32c(entry))
    return entry


def put_in_log(data: bytearray, position: int, entry: bytes | bytearray) -> None:
    """Writes entry at position in the circular log, wrapping at its end."""
    offset, length = log_region(data)
    for i in range(0, len(entry), 4 * KiB):
        at = offset + (position + i) % length
        data[at : at + 4 * KiB] = entry[i : i + 4 * KiB]
