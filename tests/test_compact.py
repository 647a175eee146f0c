"""CompactVirtualDisk on real images: what is dropped, what moves, what the
file shrinks by, and that the disk reads the same byte for byte.

Data goes in through the provider's own format code (tests/tools/vdwork.c:
pattern writes, zero writes), without attaching anything.  A copy taken
before the compaction is the reference: qemu-img compares dynamic images
with it (it reads dynamic VHD and VHDX), our reader (tests/tools/vdread.c)
the differencing ones.  Sizes after are computed from the block counts.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import virtdisk
from virtdisk import Access, WinError
from virtdisk._native import ffi, lib

from .conftest import require_tool
from .vhdxlog import bat_offset, build_tool, vdread

KiB = 1 << 10
MiB = 1 << 20
QEMU_FORMAT = {"vhd": "vpc", "vhdx": "vhdx"}
# Blocks of the tests' images, and what one costs in the file: a VHD block
# carries a 512-byte sector bitmap (one bit per sector, padded to a sector).
BLOCK = {"vhd": 512 * KiB, "vhdx": MiB}
SPAN = {"vhd": 512 * KiB + 512, "vhdx": MiB}
PAYLOAD_BLOCK_UNMAPPED = 3


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("tools")
    return build_tool(out, "vdwork"), build_tool(out, "vdread")


def _work(tools, image: Path, steps: list[str]) -> None:
    trace = image.with_suffix(".trace")
    run = subprocess.run([str(tools[0]), str(trace), str(image), *steps], capture_output=True, text=True)
    trace.unlink(missing_ok=True)
    assert run.returncode == 0, run.stderr


def _read(tools, image: Path) -> bytes:
    result = vdread(tools[1], image)
    assert result.ok, result.error
    return result.data


def _dynamic(images: Path, suffix: str, blocks: int) -> tuple[Path, int]:
    """A new dynamic image of blocks blocks of the format's test block size,
    and that size."""
    block = BLOCK[suffix]
    image = images / f"dynamic.{suffix}"
    virtdisk.create(image, blocks * block, block_size=block).close()
    return image, block


def _fill(tools, image: Path, blocks: int, block: int, zeroed: list[int], seed: int = 1) -> None:
    """Every block written with a pattern, then the blocks in zeroed written
    with zeros; a sector of block 1 zeroed too (which keeps the block)."""
    steps = [f"w:{b * block}:{block}:{seed + b}" for b in range(blocks)]
    steps += [f"z:{b * block}:{block}" for b in zeroed]
    _work(tools, image, [*steps, f"z:{block + 4096}:512", "f"])


def _unmap(image: Path, blocks: list[int]) -> None:
    """What a discard leaves in a VHDX (the trim work): the blocks' BAT
    entries UNMAPPED, their file offsets still set.  Written in place (the
    image's log is clean); a dynamic disk of fewer than 4096 blocks has its
    payload entry b at index b."""
    data = bytearray(image.read_bytes())
    bat = bat_offset(data)
    for b in blocks:
        (entry,) = struct.unpack_from("<Q", data, bat + 8 * b)
        assert entry & 7 == 6, f"block {b} is not fully present"
        struct.pack_into("<Q", data, bat + 8 * b, entry & ~7 | PAYLOAD_BLOCK_UNMAPPED)
    image.write_bytes(data)


def _qemu_compare(first: Path, second: Path, suffix: str) -> None:
    fmt = QEMU_FORMAT[suffix]
    result = subprocess.run(
        [require_tool("qemu-img"), "compare", "-f", fmt, "-F", fmt, str(first), str(second)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _qemu_check(image: Path, suffix: str) -> None:
    if suffix == "vhdx":  # qemu-img checks no VHD
        result = subprocess.run(
            [require_tool("qemu-img"), "check", "-f", "vhdx", str(image)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


def _compact(image: Path, **flags: bool) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    virtdisk.compact(image, progress=lambda current, total: seen.append((current, total)), **flags)
    return seen


def _assert_rises_to_the_total(seen: list[tuple[int, int]]) -> None:
    assert seen, "no progress reported"
    currents = [current for current, _ in seen]
    assert currents == sorted(currents)
    total = seen[-1][1]
    assert total > 0 and all(t == total for _, t in seen if t) and currents[-1] == total


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_compaction_drops_zero_and_unmapped_blocks_and_the_file_shrinks_by_them(
    images: Path, tools, suffix: str
) -> None:
    blocks = 64
    image, block = _dynamic(images, suffix, blocks)
    zeroed = list(range(0, blocks, 2))
    _fill(tools, image, blocks, block, zeroed)
    unmapped = [3, 5] if suffix == "vhdx" else []
    _unmap(image, unmapped) if unmapped else None
    reference = images / f"reference.{suffix}"
    shutil.copyfile(image, reference)
    before = image.stat().st_size

    seen = _compact(image)

    _qemu_compare(reference, image, suffix)
    _qemu_check(image, suffix)
    assert _read(tools, image) == _read(tools, reference)
    assert image.stat().st_size == before - (len(zeroed) + len(unmapped)) * SPAN[suffix]
    _assert_rises_to_the_total(seen)
    # Nothing is left to drop: a second compaction changes nothing.
    _compact(image)
    assert image.stat().st_size == before - (len(zeroed) + len(unmapped)) * SPAN[suffix]
    _qemu_compare(reference, image, suffix)


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_differencing_compaction_never_shows_the_parent_through_a_dropped_block(
    images: Path, tools, suffix: str
) -> None:
    block, blocks = BLOCK[suffix], 32
    parent = images / f"parent.{suffix}"
    virtdisk.create(parent, blocks * block, block_size=block).close()
    # The parent holds data in its first half, zeros in the second.
    _work(tools, parent, [f"w:0:{blocks // 2 * block}:7", "f"])
    child = images / f"child.{suffix}"
    virtdisk.create(child, parent=parent, block_size=block).close()
    zeroed = list(range(0, blocks, 2))
    _fill(tools, child, blocks, block, zeroed, seed=50)
    expected = _read(tools, child)
    assert expected[:block] == bytes(block), "the zeroed block must hide the parent's data"
    before = child.stat().st_size

    seen = _compact(child)

    assert _read(tools, child) == expected
    # A VHDX states zeros (the ZERO state) whatever the parent holds; an
    # unallocated VHD block shows the parent, so only the blocks over the
    # parent's zeros go.
    dropped = len(zeroed) if suffix == "vhdx" else len([b for b in zeroed if b >= blocks // 2])
    assert child.stat().st_size == before - dropped * SPAN[suffix]
    _assert_rises_to_the_total(seen)
    assert _read(tools, parent)[: blocks // 2 * block] != bytes(blocks // 2 * block)


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_no_block_moves_cuts_only_the_free_end_and_no_zero_scan_drops_only_what_is_marked(
    images: Path, tools, suffix: str
) -> None:
    blocks = 32
    image, block = _dynamic(images, suffix, blocks)
    zeroed = [*range(0, blocks - 4, 2), *range(blocks - 4, blocks)]  # every other one, and the last four
    _fill(tools, image, blocks, block, zeroed)
    reference = images / f"reference.{suffix}"
    shutil.copyfile(image, reference)
    before = image.stat().st_size

    _compact(image, block_moves=False)
    _qemu_compare(reference, image, suffix)
    assert image.stat().st_size == before - 4 * SPAN[suffix]

    # The zero blocks in the middle are unallocated now: moves close the holes.
    _compact(image, zero_scan=False)
    _qemu_compare(reference, image, suffix)
    _qemu_check(image, suffix)
    assert image.stat().st_size == before - len(zeroed) * SPAN[suffix]


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_no_block_moves_gives_the_space_of_dropped_blocks_in_the_middle_back_to_the_host(
    images: Path, tools, suffix: str
) -> None:
    """Nothing moves, so the file keeps its size, but each dropped block is
    punched out of it: the host's allocation falls by at least their span."""
    blocks = 32
    image, block = _dynamic(images, suffix, blocks)
    zeroed = [*range(2, blocks - 2, 3)]  # none at the end: no truncation helps
    _fill(tools, image, blocks, block, zeroed)
    reference = images / f"reference.{suffix}"
    shutil.copyfile(image, reference)
    size, held = image.stat().st_size, image.stat().st_blocks * 512

    _compact(image, block_moves=False)
    _qemu_compare(reference, image, suffix)
    _qemu_check(image, suffix)
    assert _read(tools, image) == _read(tools, reference)
    assert image.stat().st_size == size
    # A VHD block starts on a sector: the host's blocks it shares with its
    # neighbours at either end stay.
    partial = 0 if suffix == "vhdx" else 2 * os.statvfs(images).f_bsize
    freed = held - image.stat().st_blocks * 512
    assert freed >= len(zeroed) * (SPAN[suffix] - partial), f"{freed} bytes back for {len(zeroed)} blocks"


def test_no_zero_scan_keeps_zero_blocks_but_drops_unmapped_ones(images: Path, tools) -> None:
    blocks = 16
    image, block = _dynamic(images, "vhdx", blocks)
    _fill(tools, image, blocks, block, zeroed=[2, 4])
    _unmap(image, [7, 9, 11])
    reference = images / "reference.vhdx"
    shutil.copyfile(image, reference)
    before = image.stat().st_size
    _compact(image, zero_scan=False)
    _qemu_compare(reference, image, "vhdx")
    _qemu_check(image, "vhdx")
    assert image.stat().st_size == before - 3 * block


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_a_cancelled_compaction_leaves_a_consistent_image_that_compacts_again(
    images: Path, tools, suffix: str
) -> None:
    blocks = 512
    image, block = _dynamic(images, suffix, blocks)
    zeroed = list(range(0, blocks, 2))
    _fill(tools, image, blocks, block, zeroed)
    reference = images / f"reference.{suffix}"
    shutil.copyfile(image, reference)
    before = image.stat().st_size
    with virtdisk.open(image, Access.METAOPS | Access.GET_INFO) as disk:
        operation = disk.begin_compact()
        while not operation.done and operation.progress()[0] == 0:
            pass
        current, total = operation.progress()
        assert operation.cancel(), "the compaction ended before it could be cancelled"
        with pytest.raises(virtdisk.OperationCancelledError):
            operation.wait()
        after, _ = operation.progress()
        assert current > 0 and after < total
    _qemu_compare(reference, image, suffix)
    _qemu_check(image, suffix)
    _compact(image)
    _qemu_compare(reference, image, suffix)
    assert image.stat().st_size == before - len(zeroed) * SPAN[suffix]


def test_a_running_compaction_keeps_other_changes_off_the_image(images: Path, tools) -> None:
    blocks = 256
    image, block = _dynamic(images, "vhdx", blocks)
    _fill(tools, image, blocks, block, list(range(0, blocks, 2)))
    reference = images / "reference.vhdx"
    shutil.copyfile(image, reference)
    with virtdisk.open(image, Access.METAOPS | Access.GET_INFO) as disk:
        operation = disk.begin_compact()
        with pytest.raises(virtdisk.VirtualDiskError) as caught:
            disk.expand(2 * blocks * block)  # would write the BAT the compaction is changing
        assert caught.value.winerror == WinError.ERROR_BUSY
        assert not operation.done, "the compaction ended too soon for this test to mean anything"
        operation.wait()
    _qemu_compare(reference, image, "vhdx")
    with virtdisk.open(image, read_only=True) as disk:
        assert disk.info.virtual_size == blocks * block


def test_compaction_refuses_what_the_documentation_refuses(images: Path, tools) -> None:
    image = images / "dynamic.vhdx"
    virtdisk.create(image, 16 * MiB, block_size=MiB).close()
    with virtdisk.open(image) as disk, pytest.raises(virtdisk.VirtualDiskPermissionError) as caught:
        disk.compact()  # no METAOPS
    assert caught.value.winerror == WinError.ERROR_ACCESS_DENIED
    for fixed in (images / "fixed.vhd", images / "fixed.vhdx"):
        virtdisk.create(fixed, 4 * MiB, fixed=True).close()
        with (
            virtdisk.open(fixed, Access.METAOPS) as disk,
            pytest.raises(virtdisk.NotSupportedError) as caught,
        ):
            disk.compact()
        assert caught.value.winerror == WinError.ERROR_VHD_INVALID_TYPE, fixed
    with (
        virtdisk.open(image, Access.METAOPS) as disk,
        virtdisk.open(image, read_only=True),
        pytest.raises(virtdisk.DiskInUseError) as caught,
    ):
        disk.compact()
    assert caught.value.winerror == WinError.ERROR_SHARING_VIOLATION
    with virtdisk.open(image, Access.METAOPS) as disk:
        parameters = ffi.new("COMPACT_VIRTUAL_DISK_PARAMETERS *", {"Version": 2})
        assert (
            lib.CompactVirtualDisk(disk._handle, 0, parameters, ffi.NULL) == WinError.ERROR_INVALID_PARAMETER
        )
        parameters.Version = 0
        assert (
            lib.CompactVirtualDisk(disk._handle, 0, parameters, ffi.NULL) == WinError.ERROR_INVALID_PARAMETER
        )
        parameters.Version = 1
        assert (
            lib.CompactVirtualDisk(disk._handle, 4, parameters, ffi.NULL) == WinError.ERROR_INVALID_PARAMETER
        )
        # Parameters are optional: NULL is version 1.
        assert lib.CompactVirtualDisk(disk._handle, 3, ffi.NULL, ffi.NULL) == WinError.ERROR_SUCCESS


def test_a_disk_attached_read_write_is_refused_with_a_clear_error(images: Path) -> None:
    image = images / "dynamic.vhdx"
    virtdisk.create(image, 16 * MiB, block_size=MiB).close()
    # Attached read-only, a disk compacts in its server
    # (tests/test_compact_attached.py); attached read-write it does not.
    with virtdisk.open(image, Access.ALL & ~Access.CREATE) as disk:
        disk.attach(read_only=False)
        try:
            with pytest.raises(virtdisk.NotSupportedError) as caught:
                disk.compact()
            assert caught.value.winerror == WinError.ERROR_NOT_SUPPORTED
            assert "attached read-write" in caught.value.detail
            assert "attach it read-only" in caught.value.detail
        finally:
            disk.detach()


def test_the_command_line_compacts_and_reports_the_sizes(images: Path, tools) -> None:
    image = images / "dynamic.vhdx"
    virtdisk.create(image, 16 * MiB, block_size=MiB).close()
    _fill(tools, image, 16, MiB, zeroed=[0, 1, 2, 3])
    before = image.stat().st_size
    run = subprocess.run(
        [sys.executable, "-m", "virtdisk", "compact", str(image), "--json"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["size_before"] == before
    assert result["size_after"] == image.stat().st_size == before - 4 * MiB
    assert result["bytes_returned"] == 4 * MiB
    assert run.stderr == ""  # no progress bar without a terminal


def test_the_command_line_draws_a_progress_bar_on_a_terminal(images: Path, tools) -> None:
    image = images / "dynamic.vhdx"
    virtdisk.create(image, 16 * MiB, block_size=MiB).close()
    _fill(tools, image, 16, MiB, zeroed=[0, 1])
    controller, terminal = pty.openpty()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "virtdisk", "compact", str(image)],
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
        )
        os.close(terminal)
        terminal = -1
        drawn = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert run.returncode == 0
    assert b"compacting" in drawn and b"100.0%" in drawn, drawn
    assert run.stdout.startswith(f"compacted {image}: ")


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_raw_asynchronous_compaction_signals_its_event_and_reports_progress(
    images: Path, tools, suffix: str
) -> None:
    block = BLOCK[suffix]
    image = images / f"dynamic.{suffix}"
    virtdisk.create(image, 32 * block, block_size=block).close()
    _fill(tools, image, 32, block, zeroed=list(range(0, 32, 2)))
    before = image.stat().st_size
    with virtdisk.open(image, Access.METAOPS | Access.GET_INFO) as disk:
        event = lib.CreateEventW(ffi.NULL, 1, 0, ffi.NULL)
        try:
            overlapped = ffi.new("OVERLAPPED *")
            overlapped.hEvent = event
            progress = ffi.new("VIRTUAL_DISK_PROGRESS *")
            assert lib.CompactVirtualDisk(disk._handle, 0, ffi.NULL, overlapped) == WinError.ERROR_IO_PENDING
            assert lib.WaitForSingleObject(event, 60_000) == 0
            assert lib.GetVirtualDiskOperationProgress(disk._handle, overlapped, progress) == 0
            assert progress.OperationStatus == 0
            assert progress.CurrentValue == progress.CompletionValue > 0
            assert overlapped.Internal == 0
        finally:
            lib.CloseHandle(event)
        assert disk.info.physical_size == image.stat().st_size == before - 16 * SPAN[suffix]


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_what_a_discard_freed_is_returned_without_a_zero_scan(images: Path, tools, suffix: str) -> None:
    blocks = 32
    image, block = _dynamic(images, suffix, blocks)
    discarded = list(range(0, blocks, 2))
    _fill(tools, image, blocks, block, zeroed=[])
    # What fstrim on the attached disk does (the provider's discard).
    _work(tools, image, [*(f"d:{b * block}:{block}" for b in discarded), "f"])
    reference = images / f"reference.{suffix}"
    shutil.copyfile(image, reference)
    expected = _read(tools, image)
    before = image.stat().st_size

    _compact(image, zero_scan=False)

    assert _read(tools, image) == expected
    _qemu_compare(reference, image, suffix)
    _qemu_check(image, suffix)
    # A VHDX discard takes whole blocks out of the file; a VHD one zeroes them
    # in place, which only the zero scan then finds.
    assert image.stat().st_size == before - (len(discarded) * SPAN[suffix] if suffix == "vhdx" else 0)
    _compact(image)
    assert image.stat().st_size == before - len(discarded) * SPAN[suffix]
    _qemu_compare(reference, image, suffix)


def _pattern(offset: int, length: int, seed: int) -> bytes:
    """What vdwork's w:OFFSET:LENGTH:SEED writes there."""
    return bytes(((o // 512) * 131 + seed * 17 + o % 512) & 0xFF for o in range(offset, offset + length))


def test_a_differencing_vhdx_chunk_with_no_block_left_loses_its_sector_bitmap(images: Path, tools) -> None:
    """Blocks partly this file's need their chunk's sector bitmap; once
    compaction has dropped every block of a chunk, the bitmap goes too
    (SB_BLOCK_NOT_PRESENT) and its space with it.  A chunk that keeps a
    block keeps its bitmap, and a later partial write gets a new one."""
    block = MiB
    chunk = (1 << 23) * 512 // block  # payload blocks per sector bitmap
    size = 2 * chunk * block  # two chunks
    parent = images / "parent.vhdx"
    virtdisk.create(parent, size, block_size=block).close()
    _work(tools, parent, [f"w:0:{4 * block}:7", f"w:{chunk * block}:{4 * block}:8", "f"])
    child = images / "child.vhdx"
    virtdisk.create(child, parent=parent).close()
    # Chunk 0: block 1 partly data over the parent's, block 9 partly zeros
    # over the parent's zeros.  Chunk 1: blocks 6 and 9 as block 9.
    _work(
        tools,
        child,
        [f"w:{block + 4096}:8192:9", *(f"z:{b * block + 4096}:8192" for b in (9, chunk + 6, chunk + 9)), "f"],
    )
    ranges = [f"0:{16 * block}", f"{chunk * block}:{16 * block}"]
    expected = vdread(tools[1], child, ranges=ranges)
    assert expected.ok, expected.error

    def states() -> dict[str, int]:
        data = child.read_bytes()
        bat = bat_offset(data)

        def state(index: int) -> int:
            return struct.unpack_from("<Q", data, bat + 8 * index)[0] & 7

        blocks = {f"block {b}": state(b + b // chunk) for b in (1, 9, chunk + 6, chunk + 9)}
        return {**blocks, "bitmap 0": state(chunk), "bitmap 1": state(2 * chunk + 1)}

    assert states() == {"block 1": 7, "block 9": 7, f"block {chunk + 6}": 7, f"block {chunk + 9}": 7,
                        "bitmap 0": 6, "bitmap 1": 6}  # fmt: skip
    before = child.stat().st_size

    _compact(child)

    after = vdread(tools[1], child, ranges=ranges)
    assert after.ok and after.data == expected.data
    # ZERO: zeros that hide the parent; SB_BLOCK_NOT_PRESENT: 0.
    assert states() == {"block 1": 7, "block 9": 2, f"block {chunk + 6}": 2, f"block {chunk + 9}": 2,
                        "bitmap 0": 6, "bitmap 1": 0}  # fmt: skip
    assert child.stat().st_size == before - 4 * MiB  # three blocks and a bitmap

    # A partial write into chunk 1 again: a new, clear bitmap.
    at = (chunk + 3) * block
    _work(tools, child, [f"w:{at + 512}:1024:11", "f"])
    assert states()["bitmap 1"] == 6
    shown = vdread(tools[1], child, ranges=[f"{at}:{block}"])
    parent_block = vdread(tools[1], parent, ranges=[f"{at}:{block}"])
    assert shown.ok and parent_block.ok
    wanted = bytearray(parent_block.data[8:])
    wanted[512:1536] = _pattern(at + 512, 1024, 11)
    assert shown.data[8:] == bytes(wanted)
    rest = bytearray(expected.data)  # the size, then the ranges back to back
    rest[8 + 19 * block + 512 : 8 + 19 * block + 1536] = _pattern(at + 512, 1024, 11)
    assert vdread(tools[1], child, ranges=ranges).data == bytes(rest)
