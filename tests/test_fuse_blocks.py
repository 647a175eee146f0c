"""The served file's st_blocks: the bytes where some layer of the chain holds
data, the very extents SEEK_DATA and SEEK_HOLE show, kept up to date through
writes, discards, zero ranges and a compaction while served read-only, so
that tools deciding by st_blocks whether to look for holes (cp
--sparse=auto, du, tar --sparse) find them.  The file is served by
tests/tools/vdserve.c (the provider's server with no loop device on top),
written and fallocated here as the loop device would; the counts are checked
against the extents, against qemu-img map of the image where qemu reads the
format, and against the blocks the test itself wrote."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import virtdisk

from .conftest import require_tool
from .test_fuse_seek import BLOCK, SIZE, _extents, _runs, _work, _write_blocks, served, tools  # noqa: F401
from .vhdxlog import bat_offset

MiB = 1 << 20
QEMU_FORMAT = {"vhd": "vpc", "vhdx": "vhdx"}


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _data_bytes(path: Path) -> int:
    return sum(end - start for start, end in _extents(path))


def _image_data(image: Path, suffix: str, size: int, block: int) -> int:
    """Bytes the image's own block table calls data: qemu-img map for a VHD
    (qemu 7's VHDX driver maps every block as data), the BAT's
    FULLY_PRESENT and PARTIALLY_PRESENT payload entries for a VHDX."""
    if suffix == "vhdx":
        data = image.read_bytes()
        bat = bat_offset(data)
        blocks = size // block
        # Disks of fewer blocks than a chunk (2048 of 2 MiB at 512-byte
        # sectors) have no sector bitmap entry among their payload entries.
        states = [struct.unpack_from("<Q", data, bat + 8 * b)[0] & 7 for b in range(blocks)]
        return sum(block for state in states if state in (6, 7))
    run = subprocess.run(
        [require_tool("qemu-img"), "map", "-U", "-f", "vpc", "--output=json", str(image)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return sum(entry["length"] for entry in json.loads(run.stdout) if entry["data"])


def _sparse_copy(source: Path, target: Path) -> None:
    """cp --sparse=auto, which looks for holes only when st_blocks says the
    file has some; the copy must read exactly as the source."""
    subprocess.run([require_tool("cp"), "--sparse=auto", str(source), str(target)], check=True)
    assert subprocess.run([require_tool("cmp"), str(source), str(target)]).returncode == 0


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_a_dynamic_disk_reports_its_allocated_blocks(images: Path, tools, served, suffix: str) -> None:  # noqa: F811
    image = images / f"disk.{suffix}"
    virtdisk.create(image, SIZE, block_size=BLOCK).close()
    written = [0, 3, 4, 11, 31]
    _write_blocks(tools, image, written, seed=9)
    path = served(image).path

    assert _allocated(path) == len(written) * BLOCK
    assert _allocated(path) == _data_bytes(path) == _image_data(image, suffix, SIZE, BLOCK)
    copy = images / "copy.raw"
    _sparse_copy(path, copy)
    # Only the data was copied (cp also leaves zeros inside data as holes).
    assert 0 < _allocated(copy) <= len(written) * BLOCK


def test_an_empty_disk_reports_nothing_allocated(images: Path, served) -> None:  # noqa: F811
    image = images / "empty.vhdx"
    virtdisk.create(image, SIZE, block_size=BLOCK).close()
    path = served(image).path
    assert os.stat(path).st_size == SIZE
    assert _allocated(path) == 0


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_a_differencing_disk_counts_what_any_layer_holds(images: Path, tools, served, suffix: str) -> None:  # noqa: F811
    """The union of the chain: a child holding nothing of its own still
    reports its parent's data (st_blocks 0 would tell tar the file is all
    holes), and a child's stated zeros hide the parent's block."""
    parent = images / f"base.{suffix}"
    virtdisk.create(parent, SIZE, block_size=BLOCK).close()
    _write_blocks(tools, parent, [0, 3, 4, 9], seed=5)
    child = images / f"child.{suffix}"
    virtdisk.create(child, 0, parent=parent).close()

    server = served(child)
    assert _allocated(server.path) == 4 * BLOCK == _data_bytes(server.path)
    copy = images / "fresh.raw"
    _sparse_copy(server.path, copy)
    server.end()

    _write_blocks(tools, child, [4, 12, 13], seed=7)
    expected = [0, 3, 4, 9, 12, 13]
    if suffix == "vhdx":
        _work(tools, child, [f"d:{9 * BLOCK}:{BLOCK}", "f"])  # ZERO: hides the parent's block 9
        expected.remove(9)
    path = served(child).path
    assert _allocated(path) == len(expected) * BLOCK == _data_bytes(path)
    _sparse_copy(path, images / "child.raw")


# Writes, discards (PUNCH_HOLE) and zero ranges (ZERO_RANGE) at random places,
# as a loop device sends them, then "done"; one batch per line on stdin.
_WORKER = textwrap.dedent(
    """
    import os, random, subprocess, sys
    path, seed, size, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDWR)
    for line in sys.stdin:
        for _ in range(int(line)):
            kind = rng.random()
            offset = rng.randrange(size // 4096) * 4096
            length = min(rng.choice([4096, 65536, block, 2 * block]), size - offset)
            if kind < 0.6:
                os.pwrite(fd, bytes([rng.randrange(1, 256)]) * length, offset)
            else:
                subprocess.run(["fallocate", "-n", "-p" if kind < 0.85 else "-z", "-o", str(offset),
                                "-l", str(length), path], check=True)
        print("done", flush=True)
    os.close(fd)
    """
)


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_the_count_follows_concurrent_writes_discards_and_zero_ranges(
    images: Path,
    tools,  # noqa: F811
    served,  # noqa: F811
    suffix: str,
) -> None:
    """Four processes change the same blocks at once, round after round; at
    each barrier st_blocks equals the data extents, and at the end the image's
    own block table (qemu-img map) and a sparse copy agree."""
    require_tool("fallocate")
    block = MiB if suffix == "vhdx" else MiB // 2  # VHD: 512 KiB or 2 MiB
    size = 24 * MiB
    image = images / f"busy.{suffix}"
    virtdisk.create(image, size, block_size=block).close()
    server = served(image, writable=True)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(server.path), str(seed), str(size), str(block)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(4)
    ]
    changed = set()
    try:
        for _round in range(12):
            for worker in workers:
                assert worker.stdin is not None
                worker.stdin.write("12\n")
                worker.stdin.flush()
            for worker in workers:
                assert worker.stdout is not None
                assert worker.stdout.readline() == "done\n"
            allocated = _allocated(server.path)
            assert allocated == _data_bytes(server.path)
            changed.add(allocated)
    finally:
        for worker in workers:
            if worker.stdin:
                worker.stdin.close()
            worker.wait(timeout=60)
    assert len(changed) > 1, "the rounds never changed the allocation"
    assert all(worker.returncode == 0 for worker in workers)
    _sparse_copy(server.path, images / "busy.raw")
    allocated = _allocated(server.path)
    server.end()
    assert allocated == _image_data(image, suffix, size, block)


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_a_compaction_while_served_read_only_lowers_the_count(
    images: Path,
    tools,  # noqa: F811
    served,  # noqa: F811
    suffix: str,
) -> None:
    """Blocks of zeros and discarded ones hold data until the compaction
    drops them (the file-system-aware mode, on the served image); then the
    count falls by exactly those, and the kernel's cached attributes with it."""
    blocks = 24
    image = images / f"compact.{suffix}"
    virtdisk.create(image, blocks * BLOCK, block_size=BLOCK).close()
    written = [b for b in range(blocks) if b != 5]
    zeroed = [2, 7, 8, 20]
    _work(tools, image, [*(f"w:{b * BLOCK}:{BLOCK}:{b + 1}" for b in written),
                         *(f"z:{b * BLOCK}:{BLOCK}" for b in zeroed), "f"])  # fmt: skip
    reference = images / f"reference.{suffix}"
    shutil.copyfile(image, reference)

    server = served(image)
    assert _allocated(server.path) == len(written) * BLOCK == _data_bytes(server.path)
    before = image.stat().st_size
    server.command("compact")
    assert image.stat().st_size < before, "the compaction dropped nothing"
    kept = [b for b in written if b not in zeroed]
    assert _allocated(server.path) == len(kept) * BLOCK == _data_bytes(server.path)
    assert _allocated(server.path) == _image_data(image, suffix, blocks * BLOCK, BLOCK)
    copy = images / "compacted.raw"
    _sparse_copy(server.path, copy)
    server.end()
    qemu_img = require_tool("qemu-img")
    compare = [qemu_img, "compare", "-f", QEMU_FORMAT[suffix], "-F", "raw", str(reference), str(copy)]
    subprocess.run(compare, check=True, capture_output=True)


def test_random_writes_match_the_blocks_written(images: Path, served) -> None:  # noqa: F811
    """A model check: the count is the number of distinct blocks written."""
    rng = random.Random(21)
    image = images / "model.vhdx"
    virtdisk.create(image, SIZE, block_size=BLOCK).close()
    server = served(image, writable=True)
    fd = os.open(server.path, os.O_RDWR)
    touched: set[int] = set()
    try:
        for _ in range(40):
            offset = rng.randrange(SIZE // 512) * 512
            length = min(rng.randrange(1, 64) * 512, SIZE - offset)
            os.pwrite(fd, b"\x5a" * length, offset)
            touched.update(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))
            assert _allocated(server.path) == len(touched) * BLOCK
    finally:
        os.close(fd)
    assert _runs(sorted(touched)) == _extents(server.path)


def _zero_range_supported(folder: Path) -> bool:
    probe = folder / "zero-range.probe"
    probe.write_bytes(b"\x01" * 65536)
    run = subprocess.run(
        [require_tool("fallocate"), "-z", "-n", "-l", "4096", str(probe)], capture_output=True
    )
    probe.unlink()
    return run.returncode == 0


def _written_by(pid: int) -> int:
    """Bytes the process has passed to write calls (wchar)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar")


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_a_zero_range_zeroes_present_blocks_in_place_and_allocates_the_rest(
    images: Path,
    tools,  # noqa: F811
    served,  # noqa: F811
    suffix: str,
) -> None:
    """fallocate ZERO_RANGE (what BLKZEROOUT and blkdiscard -z become on a
    served disk) reads zeros and keeps the range allocated; over blocks the
    image holds in place it zeroes the image file's range instead of writing
    zeros (where the host file system has ZERO_RANGE), so the server writes
    next to nothing."""
    require_tool("fallocate")
    image = images / f"zeroed.{suffix}"
    virtdisk.create(image, SIZE, block_size=BLOCK).close()
    _write_blocks(tools, image, list(range(8)), seed=3)
    server = served(image, writable=True)
    expected = bytearray(server.path.read_bytes())
    allocated_file = image.stat().st_blocks

    # Blocks 0 to 5, all present.
    before = _written_by(server.process.pid)
    subprocess.run(["fallocate", "-z", "-n", "-o", "0", "-l", str(6 * BLOCK), str(server.path)], check=True)
    written = _written_by(server.process.pid) - before
    expected[: 6 * BLOCK] = bytes(6 * BLOCK)
    if _zero_range_supported(images):
        assert written < BLOCK // 2, f"the server wrote {written} bytes to zero present blocks"
    else:
        assert written >= 6 * BLOCK
    # Part of block 6, the rest of block 7 and blocks 8 and 9, never written:
    # allocated now, reading zeros.
    start, end = 6 * BLOCK + 4096, 10 * BLOCK
    subprocess.run(
        ["fallocate", "-z", "-n", "-o", str(start), "-l", str(end - start), str(server.path)], check=True
    )
    expected[start:end] = bytes(end - start)
    assert server.path.read_bytes() == expected
    assert _allocated(server.path) == 10 * BLOCK == _data_bytes(server.path)
    assert image.stat().st_blocks >= allocated_file, "zeroing gave space back: it must stay allocated"
    server.end()
    assert _image_data(image, suffix, SIZE, BLOCK) == 10 * BLOCK
    raw = images / "expected.raw"
    raw.write_bytes(expected)
    compare = [
        require_tool("qemu-img"),
        "compare",
        "-f",
        QEMU_FORMAT[suffix],
        "-F",
        "raw",
        str(image),
        str(raw),
    ]
    assert subprocess.run(compare, capture_output=True).returncode == 0
