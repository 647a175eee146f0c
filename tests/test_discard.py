"""Discard passes through: TRIM on an attached disk (blkdiscard, fstrim) reaches
the image.  The loop device over a served disk turns it into fallocate on the
FUSE file, which the provider answers with the format's discard; a directly
attached fixed VHD has the loop device punch the image file itself.  Checked
by reading the disk back (ours and QEMU's reader), by the block map in the
file, and by the file space the host gets back."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import multiprocessing
import os
import random
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtdisk

from .conftest import require_tool, unmount
from .vhdxlog import bat_offset

pytestmark = pytest.mark.loop

MiB = 1 << 20
SIZE = 64 * MiB
BLOCK = 2 * MiB  # VHD's block size, and the VHDX images' here
UNMAPPED, ZERO, NOT_PRESENT, FULLY_PRESENT, PARTIALLY_PRESENT = 3, 2, 0, 6, 7


def pattern(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int | None:
    for at in range(0, max(len(a), len(b)), MiB):
        if a[at : at + MiB] != b[at : at + MiB]:
            return next(i for i in range(at, at + MiB) if a[i : i + 1] != b[i : i + 1])
    return None


def assert_same(actual: bytes | bytearray, expected: bytes | bytearray, what: str) -> None:
    where = first_difference(actual, expected)
    assert where is None, f"{what} differs from what was written and discarded, first at byte {where}"


def read_device(device: str, offset: int = 0, length: int = -1) -> bytes:
    with open(device, "rb") as block:
        block.seek(offset)
        return block.read(length)


def write_device(device: str, offset: int, data: bytes) -> None:
    with open(device, "r+b") as block:
        block.seek(offset)
        block.write(data)
        block.flush()
        os.fsync(block.fileno())


def blkdiscard(device: str, offset: int, length: int, zeroout: bool = False) -> None:
    """A discard, or with zeroout a write of zeros the device may not unmap
    (BLKZEROOUT: the loop device asks the file for ZERO_RANGE)."""
    zero = ["-z"] if zeroout else []
    subprocess.run(
        [require_tool("blkdiscard"), *zero, "-o", str(offset), "-l", str(length), device], check=True
    )


def allocated(path: Path) -> int:
    """Bytes the host file system holds for the file (what du counts)."""
    return path.stat().st_blocks * 512


def payload_states(image: Path) -> list[int]:
    """The BAT state of each payload block of a VHDX, read from the file."""
    data = image.read_bytes()
    with virtdisk.open(image, read_only=True, no_parents=True) as disk:
        info = disk.info
        block_size, sector, size = info.block_size, info.logical_sector_size, info.virtual_size
    chunk_ratio = (1 << 23) * sector // block_size
    bat = bat_offset(data)
    blocks = (size + block_size - 1) // block_size
    return [
        struct.unpack_from("<Q", data, bat + 8 * (block + block // chunk_ratio))[0] & 7
        for block in range(blocks)
    ]


def dump_read_only(image: Path) -> bytes:
    with virtdisk.open(image, read_only=True) as disk:
        disk.attach(read_only=True)
        data = read_device(disk.physical_path)
    return data


def qemu_raw(image: Path, out: Path) -> bytes:
    qemu_img = require_tool("qemu-img")
    fmt = {".vhd": "vpc", ".vhdx": "vhdx"}[image.suffix]
    if fmt == "vhdx":
        subprocess.run([qemu_img, "check", "-q", "-f", fmt, str(image)], check=True)
    subprocess.run([qemu_img, "convert", "-f", fmt, "-O", "raw", str(image), str(out)], check=True)
    return out.read_bytes()


# ---- the images ---------------------------------------------------------------------

# kind: (suffix, create options, differencing, QEMU reads it)
KINDS = {
    "dynamic-vhdx": (".vhdx", {"block_size": BLOCK}, False, True),
    "dynamic-vhdx-4096": (".vhdx", {"block_size": BLOCK, "sector_size": 4096}, False, False),
    "dynamic-vhd": (".vhd", {}, False, True),
    "differencing-vhdx": (".vhdx", {"block_size": BLOCK}, True, False),
    "differencing-vhd": (".vhd", {}, True, False),
}


def make(kind: str, folder: Path, size: int = SIZE) -> tuple[Path, Path | None]:
    """The image and, for a differencing kind, its parent, which holds data
    everywhere (so a discard that exposed it would show)."""
    suffix, options, differencing, _ = KINDS[kind]
    if not differencing:
        image = folder / f"disk{suffix}"
        virtdisk.create(image, size, **options).close()
        return image, None
    raw = folder / "base.raw"
    raw.write_bytes(pattern(size, 99))
    base = folder / f"base{suffix}"
    virtdisk.create(base, size, source=raw, **options).close()
    raw.unlink()
    child = folder / f"child{suffix}"
    virtdisk.create(child, 0, parent=base).close()
    return child, base


@pytest.fixture
def attached() -> Iterator[list[virtdisk.VirtualDisk]]:
    """Handles a test attached: detached and closed whatever happens."""
    disks: list[virtdisk.VirtualDisk] = []
    yield disks
    for disk in disks:
        with contextlib.suppress(ValueError):  # closed by the test already
            if disk.attached:
                disk.detach()
        disk.close()


def attach(image: Path, disks: list[virtdisk.VirtualDisk]) -> tuple[virtdisk.VirtualDisk, str]:
    disk = virtdisk.open(image)
    disks.append(disk)
    disk.attach()
    return disk, disk.physical_path


# ---- blkdiscard on a served disk ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_discarded_ranges_read_zeros_and_everything_else_keeps_its_data(
    kind: str, images: Path, attached: list
) -> None:
    _, _, differencing, qemu_reads_it = KINDS[kind]
    image, parent = make(kind, images)
    parent_digest = digest(parent.read_bytes()) if parent else None
    expected = bytearray(pattern(SIZE, 99) if differencing else bytes(SIZE))
    written = pattern(48 * MiB, 1)
    expected[: len(written)] = written

    disk, device = attach(image, attached)
    sector = disk.info.logical_sector_size
    write_device(device, 0, written)
    before = allocated(image)
    discards = [
        (4 * MiB, 8 * MiB),  # whole blocks
        (13 * MiB + 3 * sector, 77 * sector),  # inside one block, unaligned
        (20 * MiB - 64 * 1024, 128 * 1024),  # across a block boundary
        (30 * MiB + sector, 5 * MiB),  # partial, whole, partial
        (44 * MiB, 20 * MiB - sector),  # written, then only the parent's (or nothing), to near the end
        (SIZE - sector, sector),  # the last sector
    ]
    for offset, length in discards:
        blkdiscard(device, offset, length)
        expected[offset : offset + length] = bytes(length)
    assert_same(read_device(device), expected, "the attached disk")
    freed = before - allocated(image)
    disk.detach()
    disk.close()

    assert_same(dump_read_only(image), expected, "the disk attached again")
    if qemu_reads_it:
        assert_same(qemu_raw(image, images / "qemu.raw"), expected, "QEMU's reading")
    if parent:
        assert digest(parent.read_bytes()) == parent_digest, "the parent changed"
    else:
        # At least the whole blocks and the written part of the last range.
        assert freed >= 10 * MiB + 4 * MiB, f"only {freed} bytes of the image file were given back"
    if image.suffix == ".vhdx":
        states = payload_states(image)
        # Wholly discarded blocks leave the file; a differencing disk's must
        # also hide the parent, never written ones included (24-30).
        whole = [2, 3, 4, 5, 16, 22, 23] + ([24, 25, 26, 27, 28, 29, 30] if differencing else [])
        gone = ZERO if differencing else UNMAPPED
        assert {b: states[b] for b in whole} == {b: gone for b in whole}
        if not differencing:
            assert states[24:] == [NOT_PRESENT] * 8, "blocks never written were changed"
        # Partly discarded blocks keep their other data (31: zeros over the parent's).
        for block in (6, 9, 10, 15, 17) + ((31,) if differencing else ()):
            assert states[block] in (FULLY_PRESENT, PARTIALLY_PRESENT), f"block {block}: {states[block]}"


@pytest.mark.parametrize("kind", KINDS)
def test_a_zeroed_range_reads_zeros_and_keeps_its_space(kind: str, images: Path, attached: list) -> None:
    """blkdiscard -z (BLKZEROOUT, which must not unmap: the loop device asks
    the file for ZERO_RANGE) leaves zeros that are still allocated, so a
    later write there cannot fail for space: never-written blocks it covers
    are allocated, written ones stay, and the host's allocation never falls."""
    _, _, differencing, qemu_reads_it = KINDS[kind]
    image, parent = make(kind, images)
    parent_digest = digest(parent.read_bytes()) if parent else None
    expected = bytearray(pattern(SIZE, 99) if differencing else bytes(SIZE))
    written = pattern(16 * MiB, 7)
    expected[: len(written)] = written

    disk, device = attach(image, attached)
    sector = disk.info.logical_sector_size
    write_device(device, 0, written)
    before = allocated(image)
    zeroed = [
        (2 * MiB, 4 * MiB),  # whole written blocks
        (9 * MiB + sector, 77 * sector),  # inside a written block, unaligned
        (14 * MiB - 64 * 1024, 4 * MiB),  # written, then never written, across blocks
        (40 * MiB, 4 * MiB),  # whole blocks never written
    ]
    for offset, length in zeroed:
        blkdiscard(device, offset, length, zeroout=True)
        expected[offset : offset + length] = bytes(length)
    assert_same(read_device(device), expected, "the attached disk")
    grown = allocated(image) - before
    disk.detach()
    disk.close()

    # The never-written 40-44 MiB and 16-18 MiB (less 64 KiB) at least are
    # the file's now.
    assert grown >= 6 * MiB - 64 * 1024, f"the image file's allocation changed by {grown} bytes"
    assert_same(dump_read_only(image), expected, "the disk attached again")
    if qemu_reads_it:
        assert_same(qemu_raw(image, images / "qemu.raw"), expected, "QEMU's reading")
    if parent:
        assert digest(parent.read_bytes()) == parent_digest, "the parent changed"
    if image.suffix == ".vhdx":
        states = payload_states(image)
        kept = [1, 2, 4, 6, 7, 8, 20, 21]
        present = (FULLY_PRESENT, PARTIALLY_PRESENT) if differencing else (FULLY_PRESENT,)
        assert all(states[b] in present for b in kept), {b: states[b] for b in kept}


def test_space_a_discard_frees_is_reused_before_the_file_grows(images: Path, attached: list) -> None:
    """Also in a later session, which finds the holes afresh; a reused range
    reads as zeros wherever the new block is not written."""
    image, _ = make("dynamic-vhdx", images)
    disk, device = attach(image, attached)
    write_device(device, 0, pattern(16 * MiB, 2))
    blkdiscard(device, 0, 8 * MiB)
    grown_to = image.stat().st_size
    write_device(device, 32 * MiB + 4096, b"A" * 4096)  # a new block, mostly unwritten
    write_device(device, 40 * MiB, pattern(2 * MiB, 3))
    assert image.stat().st_size == grown_to, "the file grew although discarded blocks were free"
    disk.detach()
    disk.close()

    disk, device = attach(image, attached)
    write_device(device, 50 * MiB, pattern(4 * MiB, 4))
    assert image.stat().st_size == grown_to, "a later session grew the file instead of filling its holes"
    disk.detach()
    disk.close()

    expected = bytearray(SIZE)
    expected[8 * MiB : 16 * MiB] = pattern(16 * MiB, 2)[8 * MiB :]
    expected[32 * MiB + 4096 : 32 * MiB + 8192] = b"A" * 4096
    expected[40 * MiB : 42 * MiB] = pattern(2 * MiB, 3)
    expected[50 * MiB : 54 * MiB] = pattern(4 * MiB, 4)
    assert_same(qemu_raw(image, images / "qemu.raw"), expected, "QEMU's reading")
    assert_same(dump_read_only(image), expected, "our reading")
    states = payload_states(image)
    assert states[:4] == [UNMAPPED] * 4
    assert [b for b, s in enumerate(states) if s == FULLY_PRESENT] == [4, 5, 6, 7, 16, 20, 25, 26]


def test_a_read_only_served_disk_refuses_discard_and_stays_unchanged(images: Path) -> None:
    image, _ = make("dynamic-vhdx", images)
    with virtdisk.open(image) as disk:
        disk.attach()
        write_device(disk.physical_path, 0, pattern(4 * MiB, 5))
        disk.detach()
    before = digest(image.read_bytes())
    with virtdisk.open(image, read_only=True) as disk:
        disk.attach(read_only=True)
        result = subprocess.run(
            [require_tool("blkdiscard"), "-o", "0", "-l", str(2 * MiB), disk.physical_path],
            capture_output=True,
            check=False,
        )
        disk.detach()
    assert result.returncode != 0
    assert digest(image.read_bytes()) == before


# ---- a file system on top --------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, online", [("dynamic-vhdx", False), ("dynamic-vhd", False), ("dynamic-vhdx", True)]
)
def test_fstrim_gives_the_space_of_deleted_files_back_to_the_host(
    kind: str, online: bool, images: Path, attached: list, mount_point: Path
) -> None:
    """fstrim after deleting a file, or (online) `mount -o discard`, which
    discards as the journal commits the deletion."""
    mkfs, fstrim, e2fsck = require_tool("mkfs.ext4"), require_tool("fstrim"), require_tool("e2fsck")
    size = 256 * MiB
    image, _ = make(kind, images, size)
    disk, device = attach(image, attached)
    # nodiscard: the trim measured is fstrim's, not mkfs's.
    subprocess.run([mkfs, "-q", "-F", "-E", "nodiscard", device], check=True)
    subprocess.run(["mount", *(["-o", "discard"] if online else []), device, str(mount_point)], check=True)
    keep = pattern(8 * MiB, 6)
    (mount_point / "keep.bin").write_bytes(keep)
    (mount_point / "big.bin").write_bytes(pattern(128 * MiB, 7))
    subprocess.run(["sync", "-f", str(mount_point)], check=True)
    used = allocated(image)
    states_used = payload_states(image).count(FULLY_PRESENT) if kind.endswith("vhdx") else None
    (mount_point / "big.bin").unlink()
    # Blocks of a deleted file are free for fstrim once the journal commits.
    subprocess.run(["sync", "-f", str(mount_point)], check=True)
    how = "mount -o discard"
    if not online:
        trimmed = subprocess.run([fstrim, "-v", str(mount_point)], capture_output=True, text=True, check=True)
        how = trimmed.stdout.strip()
    else:
        # ext4 discards what a commit freed from a work item, after the commit:
        # waited for (bounded), then measured like fstrim's.
        deadline = time.monotonic() + 60
        while used - allocated(image) < 100 * MiB and time.monotonic() < deadline:
            time.sleep(0.5)
            subprocess.run(["sync", "-f", str(mount_point)], check=True)
    subprocess.run(["umount", str(mount_point)], check=True)
    after = allocated(image)
    print(f"{kind}: {how}; image file {used} -> {after} bytes allocated")
    assert used - after >= 100 * MiB, f"fstrim gave back only {used - after} bytes"
    if states_used is not None:
        states_after = payload_states(image).count(FULLY_PRESENT)
        print(f"{kind}: present blocks {states_used} -> {states_after}")
        # Online discard comes per freed extent, which cut more blocks in part.
        assert states_used - states_after >= (64 if online else 100) * MiB // BLOCK
    subprocess.run(["mount", device, str(mount_point)], check=True)
    assert (mount_point / "keep.bin").read_bytes() == keep
    unmount(mount_point, device)
    disk.detach()
    disk.close()
    raw = images / "fs.raw"
    raw.write_bytes(dump_read_only(image))
    subprocess.run([e2fsck, "-f", "-n", str(raw)], check=True, capture_output=True)


# ---- directly attached flat images ----------------------------------------------------


@pytest.mark.parametrize("name", ["fixed.vhd", "fixed.vhdx"])
def test_discard_on_a_direct_fixed_image_punches_the_file_and_spares_its_metadata(
    name: str, images: Path, attached: list
) -> None:
    image = images / name
    virtdisk.create(image, SIZE, fixed=True).close()
    disk, device = attach(image, attached)
    assert not any(d.served for d in virtdisk.attached_disks() if d.physical_path == device)
    write_device(device, 0, pattern(SIZE, 8))
    disk.detach()
    disk.close()
    written = image.read_bytes()
    disk, device = attach(image, attached)
    before = allocated(image)
    # The whole device: the loop device's offset and size limit must keep
    # it on the data, off the VHD footer and the VHDX metadata.
    blkdiscard(device, 0, SIZE)
    assert read_device(device) == bytes(SIZE)
    disk.detach()
    disk.close()
    after = image.read_bytes()
    # Where the disk's bytes lie in the file: a fixed VHDX's blocks are in
    # order, from block 0's; a fixed VHD's from the start.
    data_at = 0
    if name.endswith(".vhdx"):
        data_at = struct.unpack_from("<Q", after, bat_offset(after))[0] & ~0xFFFFF
    assert written[data_at : data_at + SIZE] == pattern(SIZE, 8)
    assert after[data_at : data_at + SIZE] == bytes(SIZE)
    # The VHDX headers change (a new DataWriteGuid for the session), nothing else.
    assert written[256 * 1024 : data_at] == after[256 * 1024 : data_at], "metadata before the data changed"
    assert written[data_at + SIZE :] == after[data_at + SIZE :], "bytes past the data changed"
    assert before - allocated(image) >= SIZE - MiB
    if name.endswith(".vhdx"):
        subprocess.run([require_tool("qemu-img"), "check", "-q", "-f", "vhdx", str(image)], check=True)
    with virtdisk.open(image, read_only=True) as reopened:
        assert reopened.info.virtual_size == SIZE


# ---- discards racing writes ------------------------------------------------------------

BLKDISCARD = 0x1277  # _IO(0x12, 119)
ROUNDS = 150


def _direct(device: str) -> int:
    return os.open(device, os.O_RDWR | os.O_DIRECT)


def _aligned(data: bytes) -> mmap.mmap:
    buffer = mmap.mmap(-1, len(data))
    buffer.write(data)
    return buffer


def _churn(device: str, barrier, seed: int) -> None:
    """Writes and discards whole blocks of the first 16 MiB, at random."""
    fd, rng = _direct(device), random.Random(seed)
    buffer = _aligned(pattern(BLOCK, seed))
    barrier.wait()
    for _ in range(ROUNDS):
        offset = rng.randrange(8) * BLOCK
        if rng.random() < 0.5:
            os.pwrite(fd, buffer, offset)
        else:
            fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, BLOCK))
    os.close(fd)


def _fill(device: str, barrier, done, result) -> None:
    """Gives the blocks of [32 MiB, 64 MiB) new data again and again (each
    time in freshly allocated space: discarded first), checking each."""
    fd, rng = _direct(device), random.Random(7)
    barrier.wait()
    last: dict[int, bytes] = {}
    problem = None
    for round_ in range(ROUNDS):
        offset = 32 * MiB + rng.randrange(16) * BLOCK
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, BLOCK))
        data = pattern(BLOCK, 1000 + round_)
        os.pwrite(fd, _aligned(data), offset)
        last[offset] = data
        back = _aligned(bytes(BLOCK))
        os.preadv(fd, [back], offset)
        if bytes(back) != data:
            problem = f"round {round_}: block at {offset} read back other data"
            break
    # Everything still there once the other processes are done.
    done.wait()
    for offset, data in last.items():
        back = _aligned(bytes(BLOCK))
        os.preadv(fd, [back], offset)
        if problem is None and bytes(back) != data:
            problem = f"block at {offset} changed after it was written"
    os.close(fd)
    result.put(problem)


def test_blocks_allocated_in_freed_space_keep_their_data_while_other_blocks_are_discarded(
    images: Path, attached: list
) -> None:
    """Three processes through a barrier: two write and discard blocks at the
    start of the disk (freeing space), the third keeps allocating blocks
    elsewhere, which take that space, and checks their data; a write still
    aimed at a discarded block's old place would land in them."""
    image, _ = make("dynamic-vhdx", images)
    disk, device = attach(image, attached)
    context = multiprocessing.get_context("spawn")
    barrier, done, result = context.Barrier(3), context.Barrier(2), context.Queue()
    churners = [context.Process(target=_churn, args=(device, barrier, seed)) for seed in (1, 2)]
    filler = context.Process(target=_fill, args=(device, barrier, done, result))
    for process in (*churners, filler):
        process.start()
    for process in churners:
        process.join(timeout=300)
    for process in churners:
        assert process.exitcode == 0, "a churning process failed or hung"
    done.wait(timeout=300)  # lets the filler check what it wrote last
    outcome = result.get(timeout=300)
    filler.join(timeout=60)
    assert outcome is None, outcome
    disk.detach()
    disk.close()
    subprocess.run([require_tool("qemu-img"), "check", "-q", "-f", "vhdx", str(image)], check=True)


def test_a_write_in_flight_into_a_discarded_block_never_lands_in_the_block_reusing_its_space(
    images: Path,
) -> None:
    """Deterministic: tests/tools/vdrace.c holds a write to a present block
    back inside its pwrite while the block is discarded and its space given
    to a new block; the discard must wait for the write."""
    from .vhdxlog import build_tool

    tool = build_tool(images, "vdrace", "-Wl,--wrap=pwrite")
    image = images / "race.vhdx"
    virtdisk.create(image, 16 * MiB, block_size=MiB).close()
    with virtdisk.open(image) as disk:
        disk.attach()
        write_device(disk.physical_path, 0, pattern(MiB, 9))
        disk.detach()
    run = subprocess.run([str(tool), str(image)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    with virtdisk.open(image, read_only=True) as disk:
        disk.attach(read_only=True)
        assert read_device(disk.physical_path, 5 * MiB, MiB) == b"B" * MiB
        disk.detach()
