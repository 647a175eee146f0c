"""The crash-consistency harness's machinery (after dm-log-writes and
CrashMonkey): a trace of every write, flush, truncate and allocate the provider
made on an image (tests/tools/vdwork.c records it through the provider's I/O
seam), turned into the images a crash could leave - every prefix of the
stream, and torn variants of a write - and the rule for what each must still
read back."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
RECORD = struct.Struct("<cQQI")
PUNCH_HOLE = 0x02  # FALLOC_FL_PUNCH_HOLE: an allocate that zeros a range in place
ZERO_RANGE = 0x10  # FALLOC_FL_ZERO_RANGE: the same, the space kept
MARKERS = "VDFM"  # what the workload was told: write, discard, flush, resize


@dataclass
class Op:
    kind: str  # W S T A (file), V D F M (markers)
    offset: int
    length: int
    mode: int
    data: bytes = b""


def read_trace(path: Path) -> list[Op]:
    raw = path.read_bytes()
    ops, at = [], 0
    while at < len(raw):
        kind, offset, length, mode = RECORD.unpack_from(raw, at)
        at += RECORD.size
        data = b""
        if kind == b"W":
            data = raw[at : at + length]
            at += length
        ops.append(Op(kind.decode(), offset, length, mode, data))
    return ops


_RAMP = bytes(range(256)) * 4


def sector_pattern(sector: int, seed: int) -> bytes:
    """What vdwork writes into a whole 512-byte sector: byte at disk offset o is
    (o // 512 * 131 + seed * 17 + o % 512) & 0xFF."""
    start = (sector * 131 + seed * 17) & 0xFF
    return _RAMP[start : start + SECTOR]


@dataclass
class CrashPoint:
    prefix: int  # ops[:prefix] happened (and the torn write ops[prefix], if torn)
    torn: int | None  # bytes of ops[prefix] that reached the disk
    dropped: int = 0  # writes since the last flush that did not reach the disk (all but the last)


def crash_points(path: Path, start: bytes, ops: list[Op], torn_sizes: tuple[int, ...] = (SECTOR, 4096)):
    """Leaves at path, in turn, every image a crash could leave: each prefix of
    the file operations (markers change nothing); each prefix plus the first
    torn_sizes bytes of the write that follows it; and, where writes were
    made since the last flush, the prefix with all of those lost but the
    last (a disk cache writes back in any order; only a flush orders).  The
    file is changed in place from one point to the next, so a point costs
    what its operations wrote.  Yields a CrashPoint while the file holds it."""
    path.write_bytes(start)
    size = len(start)
    unsynced: list[tuple[Op, bytes]] = []  # writes since the last flush, with what they overwrote
    with path.open("r+b", buffering=0) as f:
        yield CrashPoint(0, None)
        for index, op in enumerate(ops):
            if op.kind not in "WTAS":
                continue
            if op.kind == "A" and op.mode & (PUNCH_HOLE | ZERO_RANGE):
                # Zeros in place, never past the end (KEEP_SIZE): a write of
                # zeros as far as a crash can tell.  A zeroed range may be
                # torn (the file system changes it extent by extent).
                zero_range = bool(op.mode & ZERO_RANGE)
                op = Op("W", op.offset, max(0, min(op.length, size - op.offset)), 0, b"")
                op.data = bytes(op.length)
                if not op.length:
                    yield CrashPoint(index + 1, None)
                    continue
                torn_sizes_here: tuple[int, ...] = torn_sizes if zero_range else ()
            else:
                torn_sizes_here = torn_sizes
            if op.kind == "W":
                for torn in torn_sizes_here:
                    if torn >= op.length:
                        continue
                    f.seek(op.offset)
                    before = f.read(torn)
                    f.seek(op.offset)
                    f.write(op.data[:torn])
                    yield CrashPoint(index, torn)
                    f.seek(op.offset)
                    f.write(before)
                    f.truncate(size)
                f.seek(op.offset)
                before = f.read(op.length)  # past the end of the file: zeros
                unsynced.append((op, before + bytes(op.length - len(before))))
                f.seek(op.offset)
                f.write(op.data)
                size = max(size, op.offset + op.length)
            elif op.kind == "S":
                unsynced.clear()
            elif op.kind == "T":
                f.truncate(op.offset)
                size = op.offset
            elif op.kind == "A" and op.mode == 0 and op.offset + op.length > size:
                size = op.offset + op.length
                f.truncate(size)
            if op.kind != "S":  # a flush changes no byte: the same image as before it
                yield CrashPoint(index + 1, None)
            if op.kind == "W" and len(unsynced) > 1:
                for lost, before in reversed(unsynced[:-1]):
                    f.seek(lost.offset)
                    f.write(before)
                f.seek(op.offset)
                f.write(op.data)
                yield CrashPoint(index + 1, None, len(unsynced) - 1)
                for kept, _ in unsynced:
                    f.seek(kept.offset)
                    f.write(kept.data)


@dataclass
class Expectation:
    sizes: set[int]  # virtual sizes the disk may have
    ranges: list[tuple[int, bytes]]  # (disk offset, bytes it must read back)


def expectation(ops: list[Op], point: CrashPoint, initial_size: int) -> Expectation:
    """What the workload was promised at this crash point: every write
    acknowledged before the last acknowledged flush, except where a later
    write (acknowledged or in flight) overlaps it; the size of the last
    acknowledged resize, or that of one in flight."""
    end = point.prefix
    happened = ops[:end]
    last_flush = max((i for i, op in enumerate(happened) if op.kind == "F"), default=-1)
    size = initial_size
    sizes = {size}
    for op in happened:
        if op.kind == "M":
            size = op.offset
            sizes = {size}
    # A resize in flight: its markers come after its file operations.
    following = next((op for op in ops[end:] if op.kind in MARKERS), None)
    if following is not None and following.kind == "M":
        sizes.add(following.offset)
    durable: dict[int, int] = {}  # sector -> index of the write that owns it
    for i in range(last_flush):
        op = happened[i]
        if op.kind in "VD":
            for sector in range(op.offset // SECTOR, (op.offset + op.length + SECTOR - 1) // SECTOR):
                durable[sector] = i
    # Not yet flushed, or in flight: a sector may read old or new (or zeros).
    uncertain = [op for op in happened[last_flush + 1 :] if op.kind in "VD"]
    if following is not None and following.kind in "VD":
        uncertain.append(following)
    for op in uncertain:
        for sector in range(op.offset // SECTOR, (op.offset + op.length + SECTOR - 1) // SECTOR):
            durable.pop(sector, None)
    ranges: list[tuple[int, bytes]] = []
    for sector, i in sorted(durable.items()):
        data = bytes(SECTOR) if happened[i].kind == "D" else sector_pattern(sector, happened[i].mode)
        if ranges and ranges[-1][0] + len(ranges[-1][1]) == sector * SECTOR:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + data)
        else:
            ranges.append((sector * SECTOR, data))
    return Expectation(sizes, ranges)


def written_sectors(ops: list[Op], point: CrashPoint) -> set[int]:
    """Sectors any write may have reached at this crash point (those before it
    and the one in flight): on a disk that started empty, every other sector
    must read as zeros."""
    touched = [op for op in ops[: point.prefix] if op.kind == "V"]
    following = next((op for op in ops[point.prefix :] if op.kind in MARKERS), None)
    if following is not None and following.kind == "V":
        touched.append(following)
    return {
        s
        for op in touched
        for s in range(op.offset // SECTOR, (op.offset + op.length + SECTOR - 1) // SECTOR)
    }


def resizing(ops: list[Op], point: CrashPoint) -> bool:
    """Is this crash point inside a resize (its acknowledgement still to come)?"""
    following = next((op for op in ops[point.prefix :] if op.kind in MARKERS), None)
    return following is not None and following.kind == "M"
