"""Crash consistency: a workload runs through the provider's format operations
with every write, flush and size change on the image recorded (the provider's
I/O seam, tests/tools/vdwork.c); then every image a crash could have left -
each prefix of that stream, and torn variants of each write - must open
(replaying a VHDX log), pass `qemu-img check` (sampled: it is slow), and read
back every write acknowledged before the last acknowledged flush.  Our own
reader checks every point; the count per format is printed (pytest -s)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import virtdisk
from tests.conftest import require_tool
from tests.crashsim import SECTOR, crash_points, expectation, read_trace, resizing, written_sectors
from tests.vhdxlog import build_tool, vdread

KiB = 1024
MiB = 1024 * KiB
CHECK_EVERY = 25  # replay on disk and qemu-img check: one crash point in this many
MIN_POINTS = 1000  # per format, over its workloads


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("tools")
    return build_tool(out, "vdwork"), build_tool(out, "vdread")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """Crash images are written hundreds of times: in memory where there is /dev/shm."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="vd-crash-", dir=shm))
        yield folder
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    else:
        yield tmp_path


def _writes(seed: int, count: int, size: int, length: int) -> list[str]:
    """count writes of length bytes at offsets spread over the disk, overwriting
    some earlier ones (a fixed recipe, so a failure reproduces)."""
    steps, x = [], seed
    for i in range(count):
        x = (x * 1103515245 + 12345) % (1 << 31)
        offset = x % (size // length) * length
        steps.append(f"w:{offset}:{length}:{seed * 100 + i}")
        if i % 7 == 6:
            steps.append("f")
    return steps


def _run(tools, scratch: Path, image: Path, steps: list[str], qemu_check: bool, empty: bool = True) -> int:
    """Runs the workload on image, then checks every crash point; returns their number.
    empty: the disk started as zeros (not a differencing child), so whatever no
    write reached must read as zeros - checked inside resizes and at sampled points."""
    vdwork, reader = tools
    start = image.read_bytes()
    trace = scratch / "trace"
    run = subprocess.run(
        [str(vdwork), str(trace), str(image), *steps], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    ops = read_trace(trace)
    trace.unlink()
    for sibling in image.parent.iterdir():  # a differencing image finds its parent beside it
        if sibling.suffix == image.suffix and sibling != image and not (scratch / sibling.name).exists():
            (scratch / sibling.name).write_bytes(sibling.read_bytes())
    crash, copy = scratch / image.name, scratch / f"replayed-{image.name}"
    crash.write_bytes(start)
    initial = int.from_bytes(vdread(reader, crash, ranges=["0:0"]).data[:8], "little")
    qemu_img = require_tool("qemu-img")
    fmt = "vpc" if image.suffix == ".vhd" else "vhdx"
    count = 0
    for count, point in enumerate(crash_points(crash, start, ops), 1):
        where = (f"{image.name}: crash point {count} (after {point.prefix} operations, torn {point.torn}, "
                 f"{point.dropped} unflushed writes lost)")  # fmt: skip
        expected = expectation(ops, point, initial)
        ranges = ["0:0", *(f"{offset}:{len(data)}" for offset, data in expected.ranges)]
        result = vdread(reader, crash, ranges=ranges)
        assert result.ok, f"{where}: {result.error}"
        size = int.from_bytes(result.data[:8], "little")
        assert size in expected.sizes, f"{where}: disk of {size} bytes, expected one of {expected.sizes}"
        at = 8
        for offset, data in expected.ranges:
            if offset + len(data) > size:
                continue
            got = result.data[at : at + len(data)]
            at += len(data)
            assert got == data, f"{where}: acknowledged data at disk offset {offset} lost"
        if empty and (resizing(ops, point) or count % CHECK_EVERY == 0):
            disk = vdread(reader, crash).data
            written = written_sectors(ops, point)
            for sector in range(len(disk) // SECTOR):
                if sector not in written:
                    chunk = disk[sector * SECTOR : (sector + 1) * SECTOR]
                    assert chunk == bytes(SECTOR), f"{where}: disk offset {sector * SECTOR} was never written"
        if count % CHECK_EVERY == 0:
            # Replayed on disk (a copy), the image reads the same; qemu-img finds it sound.
            copy.write_bytes(crash.read_bytes())
            replayed = vdread(reader, copy, writable=True)
            assert replayed.ok, f"{where}: {replayed.error}"
            assert replayed.data == vdread(reader, crash).data, where
            if qemu_check and fmt == "vhdx":
                check = subprocess.run(
                    [qemu_img, "check", "-f", fmt, str(copy)], capture_output=True, text=True
                )
                assert check.returncode == 0, f"{where}: {check.stdout}{check.stderr}"
            elif qemu_check:
                # qemu-img checks no VHD; it reads it, and must read what we read.
                raw = scratch / "qemu.raw"
                subprocess.run(
                    [qemu_img, "convert", "-f", fmt, "-O", "raw", str(crash), str(raw)], check=True
                )
                assert raw.read_bytes() == replayed.data, f"{where}: qemu-img reads another disk"
                raw.unlink()
    crash.unlink()
    copy.unlink(missing_ok=True)
    return count


def test_vhdx_survives_a_crash_at_every_point(tools, scratch: Path, tmp_path: Path) -> None:
    points = 0
    dynamic = tmp_path / "dynamic.vhdx"
    virtdisk.create(dynamic, 16 * MiB, block_size=MiB).close()
    steps = [*_writes(1, 50, 16 * MiB, 4 * KiB), "f", "r:25165824", *_writes(2, 20, 24 * MiB, 8 * KiB), "f"]
    points += _run(tools, scratch, dynamic, steps, True)
    spread = tmp_path / "spread.vhdx"
    virtdisk.create(spread, 64 * MiB, block_size=MiB).close()
    # Grown, written in the new space, shrunk.
    steps = [
        *_writes(7, 40, 64 * MiB, 16 * KiB),
        "r:83886080",
        *_writes(8, 10, 80 * MiB, 16 * KiB),
        "r:41943040",
        "f",
    ]
    points += _run(tools, scratch, spread, steps, True)
    sectors_4k = tmp_path / "sectors-4k.vhdx"
    virtdisk.create(sectors_4k, 16 * MiB, block_size=MiB, sector_size=4096).close()
    # qemu-img opens no VHDX with 4 KiB logical sectors ("Operation not supported").
    points += _run(tools, scratch, sectors_4k, [*_writes(3, 40, 16 * MiB, 4 * KiB), "f"], False)
    parent = tmp_path / "parent.vhdx"
    virtdisk.create(parent, 16 * MiB, block_size=MiB).close()
    steps = [str(tools[0]), str(tmp_path / "p.trace"), str(parent), *_writes(4, 20, 16 * MiB, 64 * KiB)]
    run = subprocess.run(steps, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    child = tmp_path / "child.vhdx"
    virtdisk.create(child, parent=parent, block_size=MiB).close()
    # Partial blocks, then the rest of block 3 in pieces: it becomes fully present.
    steps = [*_writes(5, 36, 16 * MiB, 4 * KiB), "f"]
    steps += [f"w:{3 * MiB + i * 128 * KiB}:{128 * KiB}:{600 + i}" for i in range(8)]
    steps += ["f", f"p:{parent}", *_writes(6, 6, 16 * MiB, 2 * KiB), "f"]
    # qemu-img opens no differencing VHDX either.
    points += _run(tools, scratch, child, steps, False, empty=False)
    # Each write into a partially present block is one log entry (its bitmap
    # bits): 170 of them wrap the 1 MiB log (8 KiB an entry) past its end.
    wrapping = tmp_path / "wrapping.vhdx"
    virtdisk.create(wrapping, parent=parent, block_size=MiB).close()
    steps = [f"w:{5 * MiB + i * 4 * KiB}:512:{700 + i}" for i in range(170)]
    points += _run(tools, scratch, wrapping, [*steps[:100], "f", *steps[100:], "f"], False, empty=False)
    print(f"VHDX: {points} crash points, all consistent")
    assert points >= MIN_POINTS


def test_vhd_survives_a_crash_at_every_point(tools, scratch: Path, tmp_path: Path) -> None:
    points = 0
    dynamic = tmp_path / "dynamic.vhd"
    virtdisk.create(dynamic, 16 * MiB).close()
    steps = [*_writes(11, 50, 16 * MiB, 4 * KiB), "f", "r:25165824", *_writes(12, 20, 24 * MiB, 8 * KiB), "f"]
    points += _run(tools, scratch, dynamic, steps, True)
    spread = tmp_path / "spread.vhd"
    virtdisk.create(spread, 64 * MiB).close()
    steps = [*_writes(17, 60, 64 * MiB, 16 * KiB), "r:83886080", *_writes(18, 16, 80 * MiB, 16 * KiB), "f"]
    points += _run(tools, scratch, spread, steps, True)
    fixed = tmp_path / "fixed.vhd"
    virtdisk.create(fixed, 8 * MiB, fixed=True).close()
    # Grown twice: the old footer must never show as data.
    steps = [
        *_writes(13, 20, 8 * MiB, 4 * KiB),
        "f",
        "r:10485760",
        *_writes(14, 10, 10 * MiB, 4 * KiB),
        "r:12582912",
    ]
    points += _run(tools, scratch, fixed, [*steps, "f"], True)
    parent = tmp_path / "parent.vhd"
    virtdisk.create(parent, 16 * MiB).close()
    child = tmp_path / "child.vhd"
    virtdisk.create(child, parent=parent).close()
    steps = [
        *_writes(15, 40, 16 * MiB, 4 * KiB),
        "f",
        f"p:{parent}",
        *_writes(16, 10, 16 * MiB, 2 * KiB),
        "f",
    ]
    # qemu-img reads no differencing VHD.
    points += _run(tools, scratch, child, steps, False, empty=False)
    print(f"VHD: {points} crash points, all consistent")
    assert points >= MIN_POINTS


def _parent_with_data(tools, tmp_path: Path, name: str, seed: int) -> Path:
    """A parent whose data a child's discard must hide."""
    parent = tmp_path / name
    if parent.suffix == ".vhdx":
        virtdisk.create(parent, 16 * MiB, block_size=MiB).close()
    else:
        virtdisk.create(parent, 16 * MiB).close()
    steps = [str(tools[0]), str(tmp_path / "p.trace"), str(parent), *_writes(seed, 24, 16 * MiB, 64 * KiB)]
    run = subprocess.run(steps, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    return parent


@pytest.mark.parametrize("suffix", [".vhdx", ".vhd"])
def test_discard_survives_a_crash_at_every_point(tools, scratch: Path, tmp_path: Path, suffix: str) -> None:
    """Discarded ranges read their old data or zeros at every crash point, zeros
    once a flush followed; space they freed and the next writes reuse never
    shows another block's data."""
    points = 0
    dynamic = tmp_path / f"dynamic{suffix}"
    virtdisk.create(dynamic, 16 * MiB, **({"block_size": MiB} if suffix == ".vhdx" else {})).close()
    steps = [
        *_writes(21, 24, 16 * MiB, 16 * KiB),
        "f",
        f"d:0:{4 * MiB}",  # whole blocks
        f"d:{5 * MiB + 1024}:{69 * KiB}",  # part of one
        *_writes(22, 10, 16 * MiB, 8 * KiB),  # new blocks: into the freed space (VHDX)
        f"d:{8 * MiB - 512}:{2 * MiB + 1024}",
        "f",
        *_writes(23, 6, 16 * MiB, 4 * KiB),
        "f",
    ]
    points += _run(tools, scratch, dynamic, steps, True)
    parent = _parent_with_data(tools, tmp_path, f"parent{suffix}", 24)
    child = tmp_path / f"child{suffix}"
    virtdisk.create(child, parent=parent, **({"block_size": MiB} if suffix == ".vhdx" else {})).close()
    steps = [
        *_writes(25, 12, 16 * MiB, 8 * KiB),
        "f",
        f"d:{2 * MiB}:{4 * MiB}",  # whole blocks, the parent's data hidden
        f"d:{9 * MiB + 4096}:{8 * KiB}",  # part of a block the parent holds
        "f",
        *_writes(26, 6, 16 * MiB, 4 * KiB),
        "f",
    ]
    points += _run(tools, scratch, child, steps, False, empty=False)
    print(f"{suffix} discard: {points} crash points, all consistent")
    assert points >= 200


@pytest.mark.parametrize("suffix", [".vhdx", ".vhd"])
def test_zeroing_in_place_survives_a_crash_at_every_point(
    tools, scratch: Path, tmp_path: Path, suffix: str
) -> None:
    """A zeroed range (write_zeroes: ZERO_RANGE in the file where the block's
    data is there, written zeros elsewhere) reads its old data or zeros at
    every crash point, zeros once a flush followed, as a write of zeros
    would; present blocks, part of one, one never written and one of a
    differencing child whose parent has data."""
    points = 0
    dynamic = tmp_path / f"dynamic{suffix}"
    virtdisk.create(dynamic, 16 * MiB, **({"block_size": MiB} if suffix == ".vhdx" else {})).close()
    steps = [
        *(f"w:{b * MiB}:{MiB}:{30 + b}" for b in range(6)),
        "f",
        f"Z:0:{2 * MiB}",  # whole present blocks
        f"Z:{3 * MiB + 1024}:{69 * KiB}",  # part of one
        f"Z:{5 * MiB + 512}:{2 * MiB}",  # the end of a present one and a block never written
        "f",
        *_writes(31, 4, 16 * MiB, 8 * KiB),
        f"Z:{4 * MiB}:{MiB}",
        "f",
    ]
    points += _run(tools, scratch, dynamic, steps, True)
    parent = _parent_with_data(tools, tmp_path, f"parent{suffix}", 32)
    child = tmp_path / f"child{suffix}"
    virtdisk.create(child, parent=parent, **({"block_size": MiB} if suffix == ".vhdx" else {})).close()
    steps = [
        *_writes(33, 6, 16 * MiB, 8 * KiB),
        "f",
        f"Z:{2 * MiB}:{2 * MiB}",
        f"Z:{9 * MiB + 4096}:{8 * KiB}",
        "f",
    ]
    points += _run(tools, scratch, child, steps, False, empty=False)
    print(f"{suffix} zeroing: {points} crash points, all consistent")
    assert points >= 100


def _compaction_crashes(tools, scratch: Path, image: Path, prepare: list[str], flags: int = 0) -> int:
    """Writes data and zeros with prepare, then compacts with every file
    operation recorded: at each crash point the disk must read exactly as it
    did before the compaction, also once replayed on disk, and qemu-img must
    find a dynamic VHDX sound.  Returns the number of crash points."""
    vdwork, reader = tools
    run = subprocess.run([str(vdwork), str(scratch / "prepare.trace"), str(image), *prepare],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    (scratch / "prepare.trace").unlink()
    before = vdread(reader, image)
    assert before.ok, before.error
    start = image.read_bytes()
    trace = scratch / "trace"
    run = subprocess.run([str(vdwork), str(trace), str(image), f"c:{flags}"], capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert len(image.read_bytes()) < len(start), (
        "the compaction returned no space: the workload tests nothing"
    )
    ops = read_trace(trace)
    trace.unlink()
    for sibling in image.parent.iterdir():
        if sibling.suffix == image.suffix and sibling != image and not (scratch / sibling.name).exists():
            (scratch / sibling.name).write_bytes(sibling.read_bytes())
    crash, copy = scratch / image.name, scratch / f"replayed-{image.name}"
    qemu_img = require_tool("qemu-img")
    dynamic_vhdx = image.suffix == ".vhdx" and "parent" not in image.name and "child" not in image.name
    count = 0
    for count, point in enumerate(crash_points(crash, start, ops), 1):
        where = f"{image.name}: compaction crash point {count} ({point.prefix} operations, torn {point.torn})"
        result = vdread(reader, crash)
        assert result.ok, f"{where}: {result.error}"
        assert result.data == before.data, f"{where}: the disk reads differently"
        if count % CHECK_EVERY == 0:
            copy.write_bytes(crash.read_bytes())
            replayed = vdread(reader, copy, writable=True)
            assert replayed.ok and replayed.data == before.data, f"{where}: replayed: {replayed.error}"
            if dynamic_vhdx:
                check = subprocess.run(
                    [qemu_img, "check", "-f", "vhdx", str(copy)], capture_output=True, text=True
                )
                assert check.returncode == 0, f"{where}: {check.stdout}{check.stderr}"
    crash.unlink()
    copy.unlink(missing_ok=True)
    return count


def _data_and_zeros(blocks: int, block: int, seed: int) -> list[str]:
    """Every block written, then every other one zeroed (and a sector of one
    more, which must stay)."""
    steps = [f"w:{b * block}:{block}:{seed + b}" for b in range(blocks)]
    steps += [f"z:{b * block}:{block}" for b in range(0, blocks, 2)]
    return [*steps, f"z:{block + 512}:512", "f"]


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_compaction_reads_the_same_after_a_crash_at_every_point(
    tools, scratch: Path, tmp_path: Path, suffix: str
) -> None:
    block = MiB if suffix == "vhdx" else 512 * KiB
    dynamic = tmp_path / f"dynamic.{suffix}"
    virtdisk.create(dynamic, 16 * MiB, block_size=block).close()
    points = _compaction_crashes(tools, scratch, dynamic, _data_and_zeros(16 * MiB // block, block, 10))
    # A differencing disk over a parent with data in its first half: zeroed
    # blocks there must keep hiding it (a VHD child keeps them).
    parent = tmp_path / f"parent.{suffix}"
    virtdisk.create(parent, 16 * MiB, block_size=block).close()
    run = subprocess.run([str(tools[0]), str(tmp_path / "p.trace"), str(parent), f"w:0:{8 * MiB}:3"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    child = tmp_path / f"child.{suffix}"
    virtdisk.create(child, parent=parent, block_size=block).close()
    points += _compaction_crashes(tools, scratch, child, _data_and_zeros(16 * MiB // block, block, 40))
    if suffix == "vhdx":
        # Blocks only partly the child's, all zeros over the parent's zeros:
        # dropped, and with them the chunk's sector bitmap.
        bitmap_child = tmp_path / "bitmap-child.vhdx"
        virtdisk.create(bitmap_child, parent=parent, block_size=block).close()
        partial = [f"z:{b * block + 4096}:8192" for b in (9, 11, 13)]
        points += _compaction_crashes(tools, scratch, bitmap_child, [*partial, "f"])
    print(f"{suffix}: {points} compaction crash points, all reading as before")
    assert points >= 50
