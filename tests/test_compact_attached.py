"""CompactVirtualDisk's file-system-aware mode: a disk attached read-only,
compacted while it stays attached and in use.

The compaction runs inside the disk's FUSE server, which reopens the image
writable and moves blocks under the very block table the guest's reads use.
Reader processes keep reading the device with O_DIRECT (each read reaches
the server) and compare every byte with a raw copy taken before, round after
round, through a barrier: at least one round before the compaction starts and
one after it ends.  Afterwards the file must have shrunk by exactly the
blocks that were zeros or that the guest had discarded (blkdiscard on a
read-write attach before), qemu-img must find the image equal to a copy taken
before, and its check clean.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import virtdisk
from virtdisk import Access, WinError
from virtdisk._native import ffi, lib

from .conftest import require_tool, server_of, unmount
from .test_compact import SPAN, _dynamic, _qemu_check, _qemu_compare, _read, _work, tools  # noqa: F401
from .test_mirror import _holders

pytestmark = pytest.mark.loop

MiB = 1 << 20
QEMU_FORMAT = {"vhd": "vpc", "vhdx": "vhdx"}
FS_AWARE = Access.METAOPS | Access.ATTACH_RO | Access.DETACH | Access.GET_INFO

# Reads random pieces of the device with O_DIRECT and compares them with the
# raw reference; says "round N" after each round of 32 reads, stops when a
# line arrives on stdin, then prints its count of failed or mismatching reads.  Pieces
# of 64 KiB to 1 MiB at 64 KiB steps, half of them in the last quarter of the
# disk, whose blocks are the ones a compaction moves.
_READER = textwrap.dedent(
    """
    import json, mmap, os, random, select, sys
    device, raw, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    reference = open(raw, "rb").read()
    size = len(reference)
    step = 65536
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, 1 << 20)
    wrong, reads, round_number = [], 0, 0
    while True:
        for i in range(32):
            length = rng.randrange(1, 17) * step
            low = size * 3 // 4 if i % 2 else 0
            offset = rng.randrange(low // step, (size - length) // step + 1) * step
            view = memoryview(buffer)[:length]
            try:
                good = os.preadv(fd, [view], offset) == length and view == reference[offset:offset + length]
            except OSError:
                good = False
            reads += 1
            if not good:
                wrong.append(offset)
        round_number += 1
        print(f"round {round_number}", flush=True)
        if select.select([sys.stdin], [], [], 0)[0]:
            break
    os.close(fd)
    print(json.dumps({"reads": reads, "wrong": wrong[:20], "wrong_count": len(wrong)}), flush=True)
    """
)


class _Reader:
    def __init__(self, device: str, raw: Path, seed: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _READER, device, str(raw), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def next_round(self) -> int:
        """Waits for the end of the reader's next round (the barrier)."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("round "), f"the reader failed: {line!r}"
        return int(line.split()[1])

    def stop(self) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("stop\n")
        self.process.stdin.close()
        for line in self.process.stdout:
            if not line.startswith("round "):
                assert self.process.wait(timeout=60) == 0
                return json.loads(line)
        raise AssertionError("the reader ended without its count")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _raw(image: Path, suffix: str) -> Path:
    raw = image.with_name(image.name + ".raw")
    subprocess.run(
        [require_tool("qemu-img"), "convert", "-f", QEMU_FORMAT[suffix], "-O", "raw", str(image), str(raw)],
        check=True,
        capture_output=True,
    )
    return raw


def _discard(image: Path, offsets: list[int], length: int) -> None:
    """What a guest's fstrim leaves: the ranges discarded through a
    read-write attach."""
    with virtdisk.open(image) as disk:
        disk.attach()
        for offset in offsets:
            subprocess.run(
                [require_tool("blkdiscard"), "-o", str(offset), "-l", str(length), disk.physical_path],
                check=True,
            )
        disk.detach()


def _prepared(images: Path, tools, suffix: str, blocks: int) -> tuple[Path, int, int]:  # noqa: F811
    """A dynamic image with data in every block but the zeroed ones, the
    ones the guest discarded and two never written (so that it is served,
    not loop-mapped as one stretch of the file); returns it, its block size
    and how many blocks a compaction drops."""
    image, block = _dynamic(images, suffix, blocks)
    zeroed = list(range(0, blocks // 2, 3))
    written = [b for b in range(blocks) if b not in (2, blocks // 2)]
    steps = [f"w:{b * block}:{block}:{b + 1}" for b in written] + [f"z:{b * block}:{block}" for b in zeroed]
    _work(tools, image, [*steps, "f"])
    discarded = [blocks // 2 + 1, blocks // 2 + 4]
    _discard(image, [b * block for b in discarded], block)
    return image, block, len(zeroed) + len(discarded)


def _rises_to_the_total(seen: list[tuple[int, int]]) -> None:
    assert seen, "no progress reported"
    currents = [current for current, _ in seen]
    assert currents == sorted(currents)
    total = seen[-1][1]
    assert total > 0 and currents[-1] == total


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_compacting_while_attached_read_only_and_read(images: Path, tools, suffix: str) -> None:  # noqa: F811
    blocks = 96
    image, block, dropped = _prepared(images, tools, suffix, blocks)
    reference = images / f"reference.{suffix}"
    shutil.copyfile(image, reference)
    raw = _raw(reference, suffix)
    before = image.stat().st_size

    with virtdisk.open(image, FS_AWARE) as disk:
        disk.attach(read_only=True)
        device = disk.physical_path
        readers = [_Reader(device, raw, seed) for seed in range(3)]
        try:
            for reader in readers:
                reader.next_round()  # every reader reads before the compaction
            seen: list[tuple[int, int]] = []
            disk.compact(progress=lambda current, total: seen.append((current, total)))
            for reader in readers:
                reader.next_round()  # ... and after it
                reader.next_round()
            results = [reader.stop() for reader in readers]
        finally:
            for reader in readers:
                reader.kill()
        # Still attached, still read-only, and reading as before.
        fd = os.open(device, os.O_RDWR)
        try:
            with pytest.raises(OSError):
                os.pwrite(fd, b"x" * 512, 0)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, blocks * block, 0) == raw.read_bytes()
        finally:
            os.close(fd)
        assert image.stat().st_size == before - dropped * SPAN[suffix]
        disk.detach()

    for result in results:
        assert result["wrong_count"] == 0, f"a reader saw wrong bytes at {result['wrong']}"
        assert result["reads"] >= 96
    _rises_to_the_total(seen)
    assert image.stat().st_size == before - dropped * SPAN[suffix]
    _qemu_compare(reference, image, suffix)
    _qemu_check(image, suffix)


def test_a_cancel_leaves_the_attached_disk_consistent_and_a_second_run_finishes(
    images: Path,
    tools,  # noqa: F811
) -> None:
    # A cancel can lose the race with the end (as CancelIoEx can on
    # Windows): then the finished compaction is checked and a fresh image
    # tried, and the test fails only if every cancel came too late.
    for attempt in range(3):
        folder = images / f"attempt-{attempt}"
        folder.mkdir()
        image, _block, dropped = _prepared(folder, tools, "vhdx", 96)
        reference = folder / "reference.vhdx"
        shutil.copyfile(image, reference)
        raw = _raw(reference, "vhdx").read_bytes()
        before = image.stat().st_size
        with virtdisk.open(image, FS_AWARE) as disk:
            disk.attach(read_only=True)
            operation = disk.begin_compact()
            operation.cancel()
            try:
                operation.wait()
                cancelled = False
            except virtdisk.OperationCancelledError:
                cancelled = True
            assert image.stat().st_size <= before
            fd = os.open(disk.physical_path, os.O_RDONLY | os.O_DIRECT)
            try:
                buffer = memoryview(mmap.mmap(-1, len(raw)))
                assert os.preadv(fd, [buffer], 0) == len(raw) and buffer == raw
            finally:
                os.close(fd)
            # The server takes a new compaction after a cancelled one.
            disk.compact()
            assert image.stat().st_size == before - dropped * SPAN["vhdx"]
            disk.detach()
        _qemu_compare(reference, image, "vhdx")
        _qemu_check(image, "vhdx")
        if cancelled:
            return
    pytest.fail("every compaction ended before its cancel reached the server")


def test_refusals_name_the_fix(images: Path) -> None:
    image = images / "dynamic.vhdx"
    virtdisk.create(image, 16 * MiB, block_size=MiB).close()
    with virtdisk.open(image, Access.ALL & ~Access.CREATE) as disk:
        disk.attach(read_only=False)
        # Attached read-write: a second writer (METAOPS) is refused at open ...
        with pytest.raises(virtdisk.VirtualDiskError) as opened:
            virtdisk.open(image, Access.METAOPS | Access.GET_INFO)
        assert opened.value.winerror == WinError.ERROR_SHARING_VIOLATION
        assert "read-only" in opened.value.detail
        # ... and the attaching handle's compaction answers what to do.
        with pytest.raises(virtdisk.NotSupportedError) as compacted:
            disk.compact()
        assert "attach it read-only" in compacted.value.detail
        disk.detach()
    # A METAOPS handle on a disk attached read-only refuses every change but
    # the compaction: those need the disk detached.
    with virtdisk.open(image, FS_AWARE) as disk:
        disk.attach(read_only=True, permanent=True)
    try:
        with virtdisk.open(image, Access.METAOPS | Access.GET_INFO) as disk:
            with pytest.raises(virtdisk.VirtualDiskError) as resized:
                disk.resize(32 * MiB)
            assert resized.value.winerror == WinError.ERROR_VHD_INVALID_STATE
            # No handle without METAOPS compacts.
        with virtdisk.open(image, Access.GET_INFO) as disk:
            with pytest.raises(virtdisk.VirtualDiskError) as denied:
                disk.compact()
            assert denied.value.winerror == WinError.ERROR_ACCESS_DENIED
    finally:
        virtdisk.detach(image)


def test_the_command_line_and_the_module_function_compact_a_permanently_attached_disk(
    images: Path,
    tools,  # noqa: F811
) -> None:
    image, _block, dropped = _prepared(images, tools, "vhd", 64)
    reference = images / "reference.vhd"
    shutil.copyfile(image, reference)
    before = image.stat().st_size
    cli = [sys.executable, "-m", "virtdisk"]
    subprocess.run([*cli, "attach", str(image), "--read-only"], check=True, capture_output=True)
    try:
        run = subprocess.run([*cli, "compact", str(image), "--json"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        assert result["size_before"] == before
        assert result["size_after"] == image.stat().st_size == before - dropped * SPAN["vhd"]
        # Nothing left to return: the module function changes nothing more.
        virtdisk.compact(image)
        assert image.stat().st_size == before - dropped * SPAN["vhd"]
        assert any(disk.image_path == image and disk.read_only for disk in virtdisk.attached_disks())
    finally:
        subprocess.run([*cli, "detach", str(image)], check=True, capture_output=True)
    _qemu_compare(reference, image, "vhd")


def test_another_process_compacts_a_disk_attached_without_permanent_lifetime(
    images: Path,
    tools,  # noqa: F811
) -> None:
    """As with a mirror, any privileged process's handle reaches the disk's
    server, not only the attacher's."""
    image, _block, dropped = _prepared(images, tools, "vhdx", 64)
    reference = images / "reference.vhdx"
    shutil.copyfile(image, reference)
    before = image.stat().st_size
    with virtdisk.open(image, read_only=True) as disk:
        disk.attach(read_only=True)
        run = subprocess.run(
            [sys.executable, "-c", "import sys, virtdisk; virtdisk.compact(sys.argv[1])", str(image)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert image.stat().st_size == before - dropped * SPAN["vhdx"]
        assert disk.info.attached
    _qemu_compare(reference, image, "vhdx")


def test_after_a_compaction_and_a_mirrors_break_the_server_holds_only_the_target(
    images: Path,
    tools,  # noqa: F811
) -> None:
    """The compaction's writable open is the attachment's: a later mirror's
    break lets go of the source as it would of any served image."""
    image, _block, _dropped = _prepared(images, tools, "vhdx", 64)
    target = images / "target.vhdx"
    with virtdisk.open(image, FS_AWARE) as disk:
        disk.attach(read_only=True)
        server = server_of(disk.physical_path)
        disk.compact()
        assert _holders(image).count(server) == 1  # the read-only open went
        disk.mirror(target)
        disk.break_mirror()
        assert server not in _holders(image)
        assert server in _holders(target)


def test_a_differencing_disk_compacts_attached_and_keeps_its_parent_hidden(
    images: Path,
    tools,  # noqa: F811
) -> None:
    block, blocks = MiB, 32
    parent = images / "parent.vhdx"
    virtdisk.create(parent, blocks * block, block_size=block).close()
    _work(tools, parent, [f"w:0:{blocks * block}:7", "f"])
    child = images / "child.vhdx"
    virtdisk.create(child, parent=parent, block_size=block).close()
    zeroed = list(range(0, blocks, 2))
    steps = [f"w:{b * block}:{block}:{50 + b}" for b in range(1, blocks) if b != 5]
    _work(tools, child, [*steps, *(f"z:{b * block}:{block}" for b in zeroed), "f"])
    expected = _read(tools, child)  # qemu-img reads no differencing VHDX
    assert expected[:block] == bytes(block), "the zeroed block must hide the parent's data"
    before = child.stat().st_size
    with virtdisk.open(child, FS_AWARE) as disk:
        disk.attach(read_only=True)
        # Synchronous (no OVERLAPPED): the call follows the server's work.
        assert lib.CompactVirtualDisk(disk._handle, 0, ffi.NULL, ffi.NULL) == WinError.ERROR_SUCCESS
        disk.detach()
    # Zeroed blocks become ZERO (the parent stays hidden).
    assert child.stat().st_size == before - len(zeroed) * SPAN["vhdx"]
    assert _read(tools, child) == expected


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_a_server_killed_while_compacting_leaves_an_image_that_reads_the_same(
    images: Path,
    tools,  # noqa: F811
    suffix: str,
) -> None:
    original, _block, _ = _prepared(images, tools, suffix, 96)
    reference = images / f"reference.{suffix}"
    shutil.copyfile(original, reference)
    image = images / f"killed.{suffix}"
    deadline = time.monotonic() + 90
    rng = __import__("random").Random(13)
    rounds = interrupted = 0
    while rounds < 8 and time.monotonic() < deadline:
        shutil.copyfile(reference, image)
        with virtdisk.open(image, FS_AWARE) as disk:
            disk.attach(read_only=True)
            operation = disk.begin_compact()
            time.sleep(rng.uniform(0, 0.25))
            os.kill(server_of(disk.physical_path), signal.SIGKILL)
            try:
                operation.wait()
            except virtdisk.VirtualDiskError:
                interrupted += 1
        if suffix == "vhdx":
            # The log replays (as after a power cut) at qemu-img's repair.
            subprocess.run(
                [require_tool("qemu-img"), "check", "-r", "all", "-f", "vhdx", str(image)],
                capture_output=True,
            )
        _qemu_compare(reference, image, suffix)
        _qemu_check(image, suffix)
        rounds += 1
    assert rounds >= 3
    assert interrupted, "no kill landed while the compaction ran"
    print(f"{interrupted} of {rounds} kills landed while compacting")


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_fstrim_then_compact_while_mounted_read_only(images: Path, suffix: str) -> None:
    """The WSL recipe: delete files, fstrim, attach read-only, compact.  The
    file system stays mounted (read-only) through the compaction."""
    mkfs, fstrim, e2fsck = require_tool("mkfs.ext4"), require_tool("fstrim"), require_tool("e2fsck")
    image = images / f"ext4.{suffix}"
    # Blocks smaller than the default 32 MiB of VHDX: ext4 spreads its
    # metadata, and only wholly discarded blocks leave the file.
    virtdisk.create(image, 128 * MiB, block_size=MiB if suffix == "vhdx" else 512 * 1024).close()
    mount_point = images / "mnt"
    mount_point.mkdir()
    keep = os.urandom(8 * MiB)
    with virtdisk.open(image) as disk:
        disk.attach()
        # nodiscard: what the compaction returns is what fstrim discarded.
        subprocess.run([mkfs, "-q", "-F", "-E", "nodiscard", disk.physical_path], check=True)
        subprocess.run(["mount", disk.physical_path, str(mount_point)], check=True)
        try:
            (mount_point / "keep.bin").write_bytes(keep)
            (mount_point / "big.bin").write_bytes(os.urandom(64 * MiB))
            subprocess.run(["sync", "-f", str(mount_point)], check=True)
            (mount_point / "big.bin").unlink()
            subprocess.run(["sync", "-f", str(mount_point)], check=True)
            subprocess.run([fstrim, str(mount_point)], check=True)
        finally:
            unmount(mount_point, disk.physical_path)
        disk.detach()
    before = image.stat().st_size

    with virtdisk.open(image, FS_AWARE) as disk:
        disk.attach(read_only=True)
        device = disk.physical_path
        subprocess.run(["mount", "-o", "ro", device, str(mount_point)], check=True)
        try:
            disk.compact()
        finally:
            unmount(mount_point, device)
        fd = os.open(device, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # e2fsck reads what the server serves now
        os.close(fd)
        subprocess.run([e2fsck, "-f", "-n", device], check=True, capture_output=True)
        disk.detach()
    after = image.stat().st_size
    print(f"{suffix}: {before} -> {after} bytes after fstrim and an attached compaction")
    assert before - after >= 48 * MiB
    # A fresh attachment (nothing cached) reads the kept file.
    with virtdisk.open(image, Access.ATTACH_RO | Access.DETACH | Access.GET_INFO) as disk:
        disk.attach(read_only=True)
        subprocess.run(["mount", "-o", "ro", disk.physical_path, str(mount_point)], check=True)
        try:
            assert (mount_point / "keep.bin").read_bytes() == keep
        finally:
            unmount(mount_point, disk.physical_path)
        disk.detach()
