"""MirrorVirtualDisk and BreakMirrorVirtualDisk on attached, served disks.

The disk stays in use while it is mirrored: another process keeps writing
checksummed data through the loop device, in rounds, before, during and after
the copy.  After the break the device's writes go to the target alone.  What
the device last showed is then compared with the target (qemu-img compare,
and the writer's own checksums), and the source must show nothing written
after the break.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import virtdisk
from virtdisk import WinError
from virtdisk._native import ffi, lib

from .conftest import RUN_DIR, loops_backed_under, require_tool, server_of

pytestmark = pytest.mark.loop

MiB = 1 << 20
SIZE = 192 * MiB
QEMU_FORMAT = {"vhd": "vpc", "vhdx": "vhdx"}

# Where the hot writers write: the last 8 MiB of the disk (the copy's last
# chunks), which they keep rewriting in 512-byte pieces with O_DIRECT (each
# write reaches the server at once) until the copy is done, so that writes
# land while the copy reads and writes that very chunk.  Small pieces in
# many places: a write the mirror lost is rarely written over again before
# the writers stop.
HOT = (SIZE - 8 * MiB, SIZE)

# Writes rounds of checksummed pieces to the device until told to stop;
# tells each round's end on stdout, and at the end the checksum of what it
# last wrote at each offset.  "random": 8 pieces of 64 KiB at random places
# outside HOT, one fsync per round; "hot0"/"hot1": 16 pieces of 512 bytes in
# the even/odd sectors of HOT (two hot writers never write the same place).
_WRITER = textwrap.dedent(
    """
    import hashlib, json, mmap, os, random, select, sys
    device, seed, size, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    hot = (int(sys.argv[5]), int(sys.argv[6]))
    rng = random.Random(seed)
    piece = 65536 if mode == "random" else 512
    fd = os.open(device, os.O_RDWR | (os.O_DIRECT if mode != "random" else 0))
    buffer = mmap.mmap(-1, piece)  # page-aligned, as O_DIRECT needs
    last = {}
    round_number = 0
    while True:
        for _ in range(8 if mode == "random" else 16):
            if mode == "random":
                offset = rng.randrange(0, hot[0] // piece) * piece
            else:
                offset = hot[0] + (rng.randrange((hot[1] - hot[0]) // piece // 2) * 2 + int(mode[-1])) * piece
            data = rng.randbytes(piece)
            buffer[:] = data
            os.pwrite(fd, buffer, offset)
            last[offset] = hashlib.sha256(data).hexdigest()
        if mode == "random":
            os.fsync(fd)
        round_number += 1
        print(f"round {round_number}", flush=True)
        if select.select([sys.stdin], [], [], 0)[0]:
            sys.stdin.readline()
            break
    os.fsync(fd)
    os.close(fd)
    print(json.dumps([piece, last]), flush=True)
    """
)


def _qemu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("qemu-img"), *args], check=True, capture_output=True, text=True)


def _raw(image: Path, folder: Path, suffix: str) -> bytes:
    raw = folder / (image.name + ".raw")
    _qemu("convert", "-f", QEMU_FORMAT[suffix], "-O", "raw", str(image), str(raw))
    data = raw.read_bytes()
    raw.unlink()
    return data


def _fill(device: str, seed: int) -> dict[int, str]:
    """Checksummed data in every other MiB of the device (the rest stays
    unallocated); returns {offset: sha256} of each MiB written."""
    rng = __import__("random").Random(seed)
    sums = {}
    fd = os.open(device, os.O_RDWR)
    try:
        for offset in range(0, SIZE, 2 * MiB):
            data = rng.randbytes(MiB)
            os.pwrite(fd, data, offset)
            sums[offset] = hashlib.sha256(data).hexdigest()
        os.fsync(fd)
    finally:
        os.close(fd)
    return sums


def _read_device(device: str, length: int = SIZE) -> bytes:
    fd = os.open(device, os.O_RDONLY)
    try:
        # Whatever the page cache holds, the device's own answer.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, 0)
    finally:
        os.close(fd)


class _Writer:
    """The other process writing to the device, round after round."""

    def __init__(self, device: str, seed: int, mode: str = "random") -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WRITER, device, str(seed), str(SIZE), mode, str(HOT[0]), str(HOT[1])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.rounds = 0

    def next_round(self) -> int:
        """Waits for the end of the writer's next round (the barrier)."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("round "), f"the writer failed: {line!r}"
        self.rounds = int(line.split()[1])
        return self.rounds

    def ask_stop(self) -> None:
        assert self.process.stdin is not None
        if not self.process.stdin.closed:
            self.process.stdin.write("stop\n")
            self.process.stdin.close()

    def stop(self) -> tuple[int, dict[int, str]]:
        """Stops the writer: (piece size, {offset: sha256 of what it last wrote there})."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.ask_stop()
        for line in self.process.stdout:
            if not line.startswith("round "):
                assert self.process.wait(timeout=30) == 0
                piece, last = json.loads(line)
                return piece, {int(offset): digest for offset, digest in last.items()}
        raise AssertionError("the writer ended without its checksums")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _check_sums(data: bytes, sums: dict[int, str], length: int) -> None:
    for offset, digest in sums.items():
        assert hashlib.sha256(data[offset : offset + length]).hexdigest() == digest, (
            f"data at {offset} differs"
        )


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_mirror_while_written_then_break(images: Path, suffix: str) -> None:
    source, target = images / f"source.{suffix}", images / f"target.{suffix}"
    virtdisk.create(source, SIZE).close()
    with virtdisk.open(source) as disk:
        disk.attach(read_only=False)
        device = disk.physical_path
        filled = _fill(device, 1)
        writer = _Writer(device, 2)
        hot = [_Writer(device, 3, "hot0"), _Writer(device, 4, "hot1")]
        try:
            for each in [writer, *hot]:
                each.next_round()  # all writing before the mirror starts
            seen: list[tuple[int, int]] = []
            operation = disk.begin_mirror(target)
            rounds_during_copy = 0
            while not operation.done:
                seen.append(operation.progress())
                writer.next_round()
                rounds_during_copy += not operation.done
            for each in hot:
                each.ask_stop()  # at once: a lost write must not be written over
            operation.wait(lambda current, total: seen.append((current, total)))
            hot_written = [each.stop() for each in hot]
            # In sync: writes still reach both.
            for _ in range(3):
                writer.next_round()
            _, written = writer.stop()
        finally:
            for each in [writer, *hot]:
                each.kill()
        assert rounds_during_copy >= 1, "no write round overlapped the copy"
        assert seen[-1] == (SIZE, SIZE)
        assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:])), seen
        disk.break_mirror()
        # After the break the device writes the target alone.
        _write_after_break(device)
        shown = _read_device(device)
    # Closing the last handle detached the disk and flushed the target.
    assert not loops_backed_under(images)
    # Made by the helper, with this process's permissions, not the helper's umask.
    umask = os.umask(0o22)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o644 & ~umask
    if suffix == "vhdx":
        _qemu("check", "-f", "vhdx", str(target))
        _qemu("check", "-f", "vhdx", str(source))
    target_data = _raw(target, images, suffix)
    assert target_data == shown
    after = slice(3 * MiB, 3 * MiB + 65536)
    _check_sums(target_data, {o: d for o, d in written.items() if o != after.start}, 65536)
    for piece, sums in hot_written:
        _check_sums(target_data, sums, piece)
    overwritten = [*written, *(o for _, sums in hot_written for o in sums)]
    untouched = {o: d for o, d in filled.items() if not any(o <= w < o + MiB for w in overwritten)}
    _check_sums(target_data, untouched, MiB)
    # The source holds everything but what was written after the break.
    source_data = _raw(source, images, suffix)
    assert source_data[after] != shown[after]
    assert source_data[: after.start] == shown[: after.start]
    assert source_data[after.stop :] == shown[after.stop :]


def test_mirror_onto_existing_file_zeroes_what_the_disk_does_not_hold(images: Path) -> None:
    source, target = images / "source.vhdx", images / "existing.vhdx"
    virtdisk.create(source, SIZE).close()
    virtdisk.create(target, SIZE).close()
    with virtdisk.open(target) as other:
        other.attach(read_only=False)
        fd = os.open(other.physical_path, os.O_RDWR)
        os.pwrite(fd, b"\xee" * (4 * MiB), MiB)  # where the source holds nothing
        os.fsync(fd)
        os.close(fd)
    with virtdisk.open(source) as disk:
        disk.attach(read_only=False)
        filled = _fill(disk.physical_path, 3)
        with pytest.raises(virtdisk.VirtualDiskExistsError):
            disk.mirror(target)  # exists: EXISTING_FILE is needed
        disk.mirror(target, existing=True)
        disk.break_mirror()
        shown = _read_device(disk.physical_path)
    _qemu("check", "-f", "vhdx", str(target))
    data = _raw(target, images, "vhdx")
    assert data == shown
    assert data[MiB : 2 * MiB] == bytes(MiB)  # the old contents are gone
    _check_sums(data, filled, MiB)


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_a_discard_while_mirrored_reaches_the_target(images: Path, suffix: str) -> None:
    """The target must read zeros where the guest discarded during the
    mirror, as the device did: after the break the guest reads the target."""
    source, target = images / f"source.{suffix}", images / f"target.{suffix}"
    virtdisk.create(source, SIZE).close()
    discarded = slice(4 * MiB, 12 * MiB)  # written by _fill, every other MiB
    with virtdisk.open(source) as disk:
        disk.attach(read_only=False)
        device = disk.physical_path
        filled = _fill(device, 5)
        disk.mirror(target)
        subprocess.run(
            [
                require_tool("blkdiscard"),
                "-o",
                str(discarded.start),
                "-l",
                str(discarded.stop - discarded.start),
                device,
            ],
            check=True,
        )
        disk.break_mirror()
        shown = _read_device(device)
    assert shown[discarded] == bytes(discarded.stop - discarded.start)
    if suffix == "vhdx":  # qemu-img checks no VHD
        _qemu("check", "-f", "vhdx", str(target))
    data = _raw(target, images, suffix)
    assert data[discarded] == shown[discarded], "the target still holds what the guest discarded"
    assert data == shown
    _check_sums(data, {o: d for o, d in filled.items() if not discarded.start <= o < discarded.stop}, MiB)


def test_cancel_leaves_the_source_and_removes_a_new_target(images: Path) -> None:
    source, target = images / "source.vhdx", images / "target.vhdx"
    virtdisk.create(source, SIZE).close()
    with virtdisk.open(source) as disk:
        disk.attach(read_only=False)
        filled = _fill(disk.physical_path, 4)
        operation = disk.begin_mirror(target)
        assert operation.cancel(), "the copy ended before it could be cancelled"
        with pytest.raises(virtdisk.OperationCancelledError):
            operation.wait()
        assert not target.exists()
        with pytest.raises(virtdisk.InvalidStateError):
            disk.break_mirror()  # nothing to break
        shown = _read_device(disk.physical_path)
        # A new mirror can start after a cancelled one.
        disk.mirror(target)
        # Mirrored, the target has its one writer (share.h).
        with pytest.raises(virtdisk.VirtualDiskError) as caught:
            virtdisk.open(target).close()
        assert caught.value.winerror == WinError.ERROR_SHARING_VIOLATION
        virtdisk.open(target, read_only=True).close()
    _check_sums(shown, filled, MiB)
    _qemu("check", "-f", "vhdx", str(source))
    assert _raw(source, images, "vhdx") == shown
    # Closing the handle that started it, in sync but not broken, cancels it
    # as on Windows (a mirror is the handle's pending operation until a
    # break): the new target goes.
    assert not target.exists()


def test_cancel_of_an_existing_target_leaves_a_valid_image(images: Path) -> None:
    source, target = images / "source.vhdx", images / "existing.vhdx"
    virtdisk.create(source, SIZE).close()
    virtdisk.create(target, SIZE).close()
    with virtdisk.open(source) as disk:
        disk.attach(read_only=False)
        _fill(disk.physical_path, 5)
        operation = disk.begin_mirror(target, existing=True)
        assert operation.cancel()
        with pytest.raises(virtdisk.OperationCancelledError):
            operation.wait()
    assert target.exists()
    _qemu("check", "-f", "vhdx", str(target))


def _mirror_call(disk: virtdisk.VirtualDisk, target: Path, flags: int, overlapped: bool = True) -> int:
    parameters = ffi.new("MIRROR_VIRTUAL_DISK_PARAMETERS *", {"Version": lib.MIRROR_VIRTUAL_DISK_VERSION_1})
    text = ffi.new("WCHAR[]", str(target))
    parameters.Version1.MirrorVirtualDiskPath = text
    over = ffi.new("OVERLAPPED *") if overlapped else ffi.NULL
    with disk._using() as handle:
        return int(lib.MirrorVirtualDisk(handle, flags, parameters, over))


def test_refusals(images: Path) -> None:
    source, target = images / "source.vhdx", images / "target.vhdx"
    virtdisk.create(source, 16 * MiB).close()
    with virtdisk.open(source) as disk:
        assert _mirror_call(disk, target, 0) == WinError.ERROR_NOT_READY  # not attached
        with pytest.raises(virtdisk.VirtualDiskError) as caught:
            disk.break_mirror()
        assert caught.value.winerror == WinError.ERROR_NOT_READY
        disk.attach(read_only=False)
        assert _mirror_call(disk, target, 0, overlapped=False) == WinError.ERROR_INVALID_PARAMETER
        assert _mirror_call(disk, target, 0x100) == WinError.ERROR_INVALID_PARAMETER
        for flag, why in [
            (lib.MIRROR_VIRTUAL_DISK_FLAG_SKIP_MIRROR_ACTIVATION, "documents no meaning"),
            (lib.MIRROR_VIRTUAL_DISK_FLAG_ENABLE_SMB_COMPRESSION, "over SMB"),
            (lib.MIRROR_VIRTUAL_DISK_FLAG_IS_LIVE_MIGRATION, "live migration"),
        ]:
            assert _mirror_call(disk, target, flag) == WinError.ERROR_NOT_SUPPORTED
            assert why in ffi.string(lib.vd_last_error_detail()).decode()
        assert _mirror_call(disk, source, lib.MIRROR_VIRTUAL_DISK_FLAG_EXISTING_FILE) == (
            WinError.ERROR_INVALID_PARAMETER  # itself
        )
        small = images / "small.vhdx"
        virtdisk.create(small, 8 * MiB).close()
        assert _mirror_call(disk, small, lib.MIRROR_VIRTUAL_DISK_FLAG_EXISTING_FILE) == (
            WinError.ERROR_INVALID_PARAMETER  # another size
        )
        assert _mirror_call(disk, images / "missing.vhdx", lib.MIRROR_VIRTUAL_DISK_FLAG_EXISTING_FILE) == (
            WinError.ERROR_FILE_NOT_FOUND
        )
        assert _mirror_call(disk, small, 0) == WinError.ERROR_FILE_EXISTS
        with pytest.raises(virtdisk.VirtualDiskError) as caught:
            disk.break_mirror()
        assert caught.value.winerror == WinError.ERROR_VHD_INVALID_STATE
        assert not target.exists()
    fixed = images / "fixed.vhd"
    virtdisk.create(fixed, 16 * MiB, fixed=True).close()
    with virtdisk.open(fixed) as disk:
        disk.attach(read_only=False)  # loop-mapped directly
        assert _mirror_call(disk, target, 0) == WinError.ERROR_NOT_SUPPORTED
    assert not target.exists()


def test_killed_server_leaves_the_source_intact(images: Path) -> None:
    source, target = images / "source.vhdx", images / "target.vhdx"
    virtdisk.create(source, SIZE).close()
    with virtdisk.open(source) as disk:
        disk.attach(read_only=False)
        device = disk.physical_path
        filled = _fill(device, 6)
        shown = _read_device(device)
        operation = disk.begin_mirror(target)
        os.kill(server_of(device), signal.SIGKILL)
        deadline = time.monotonic() + 30
        with pytest.raises(virtdisk.VirtualDiskError):
            while not operation.done:
                assert time.monotonic() < deadline, "the mirror did not end after its server died"
                time.sleep(0.05)
            operation.wait()
    # Its helper removed the target the server had begun.
    assert not target.exists()
    # A killed server leaves the VHDX log for the next open to replay (as a
    # power cut would): replayed, the source holds exactly what it did.
    _qemu("check", "-r", "all", "-f", "vhdx", str(source))
    _qemu("check", "-f", "vhdx", str(source))
    data = _raw(source, images, "vhdx")
    assert data == shown
    _check_sums(data, filled, MiB)


def test_cli_moves_a_permanently_attached_disk(images: Path) -> None:
    source, target = images / "source.vhdx", images / "moved.vhdx"
    cli = [sys.executable, "-m", "virtdisk"]
    subprocess.run([*cli, "create", str(source), "--size", "32M"], check=True, capture_output=True)
    device = subprocess.run(
        [*cli, "attach", str(source)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        fd = os.open(device, os.O_RDWR)
        os.pwrite(fd, b"moved" * 1000, 5 * MiB)
        os.fsync(fd)
        os.close(fd)
        result = subprocess.run(
            [*cli, "mirror", "--json", str(source), str(target)], check=True, capture_output=True, text=True
        )
        report = json.loads(result.stdout)
        assert report["device"] == device and report["bytes_copied"] == 32 * MiB
        fd = os.open(device, os.O_RDWR)
        os.pwrite(fd, b"later" * 1000, 7 * MiB)
        os.fsync(fd)
        os.close(fd)
        # The disk is the target's now: moved again under that name, and
        # detached under the last one's.
        again = images / "again.vhdx"
        refused = subprocess.run([*cli, "mirror", "--quiet", str(source), str(again)], capture_output=True)
        assert refused.returncode != 0 and not again.exists()
        subprocess.run([*cli, "mirror", "--quiet", str(target), str(again)], check=True, capture_output=True)
        fd = os.open(device, os.O_RDWR)
        os.pwrite(fd, b"last!" * 1000, 9 * MiB)
        os.fsync(fd)
        os.close(fd)
    finally:
        detached = subprocess.run([*cli, "detach", str(again)], capture_output=True, text=True)
        if detached.returncode != 0:  # never leave the disk behind a failure
            subprocess.run([*cli, "detach", device], check=False)
    assert detached.returncode == 0, detached.stderr
    data = _raw(target, images, "vhdx")
    assert data[5 * MiB : 5 * MiB + 5000] == b"moved" * 1000
    assert data[7 * MiB : 7 * MiB + 5000] == b"later" * 1000
    assert data[9 * MiB : 9 * MiB + 5000] == bytes(5000)
    assert _raw(source, images, "vhdx")[7 * MiB : 7 * MiB + 5000] == bytes(5000)
    data = _raw(again, images, "vhdx")
    assert data[7 * MiB : 7 * MiB + 5000] == b"later" * 1000
    assert data[9 * MiB : 9 * MiB + 5000] == b"last!" * 1000


def test_mirror_of_a_differencing_disk_copies_its_whole_chain(images: Path) -> None:
    base, child, target = images / "base.vhdx", images / "child.vhdx", images / "whole.vhdx"
    virtdisk.create(base, 32 * MiB).close()
    with virtdisk.open(base) as disk:
        disk.attach(read_only=False)
        fd = os.open(disk.physical_path, os.O_RDWR)
        os.pwrite(fd, b"base" * 4096, 2 * MiB)
        os.pwrite(fd, b"hidden" * 1000, 6 * MiB)
        os.fsync(fd)
        os.close(fd)
    virtdisk.create(child, 0, parent=base).close()
    with virtdisk.open(child) as disk:
        disk.attach(read_only=False)
        fd = os.open(disk.physical_path, os.O_RDWR)
        os.pwrite(fd, b"child" * 1000, 6 * MiB)
        os.fsync(fd)
        os.close(fd)
        disk.mirror(target)
        disk.break_mirror()
        fd = os.open(disk.physical_path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        shown = os.pread(fd, 32 * MiB, 0)
        os.close(fd)
    with virtdisk.open(target, read_only=True) as disk:
        info = disk.info
    assert info.parent_path is None  # a standalone dynamic disk
    _qemu("check", "-f", "vhdx", str(target))
    data = _raw(target, images, "vhdx")
    assert data == shown
    assert data[2 * MiB : 2 * MiB + 16384] == b"base" * 4096
    assert data[6 * MiB : 6 * MiB + 5000] == b"child" * 1000


# ---- after a break the attachment is the target's --------------------------

SMALL = 64 * MiB

# What another process finds after a break, as a program of its own so that
# none of the test's handles or claims count.  Every step is tried and its
# outcome (0 or the Win32 code) reported in one JSON object, with the
# checksum of what the source shows when this process attaches it.
_AFTER_BREAK = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import virtdisk
    source, target, device, size, detach = sys.argv[1:4] + [int(sys.argv[4]), sys.argv[5] == "detach"]
    out = {}

    def attempt(name, call):
        try:
            out[name] = call()
        except OSError as error:
            out[name] = getattr(error, "winerror", None) or -1

    def attached(path):
        with virtdisk.open(path, read_only=True) as disk:
            return disk.info.attached
    attempt("source_attached", lambda: attached(source))
    attempt("target_attached", lambda: attached(target))

    def target_device():
        with virtdisk.open(target, read_only=True) as disk:
            return disk.physical_path
    attempt("target_device", target_device)

    def write_target():
        virtdisk.open(target).close()
        return 0
    attempt("write_target", write_target)

    def attach_source():
        # Free: opened for writing and attached here, on a device of its own.
        with virtdisk.open(source) as disk:
            disk.attach(read_only=False)
            fd = os.open(disk.physical_path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                data = os.pread(fd, size, 0)
            finally:
                os.close(fd)
            return [disk.physical_path, hashlib.sha256(data).hexdigest()]
    attempt("attach_source", attach_source)

    def detach_target():
        with virtdisk.open(target, read_only=True) as disk:
            disk.detach()
        return 0
    if detach:
        attempt("detach_target", detach_target)
        attempt("target_attached_after", lambda: attached(target))
    print(json.dumps(out), flush=True)
    """
)


def _after_break(source: Path, target: Path, device: str, detach: bool) -> dict[str, object]:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _AFTER_BREAK,
            str(source),
            str(target),
            device,
            str(SMALL),
            "detach" if detach else "-",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _write_checksummed(device: str, seed: int) -> None:
    """Random data in every other MiB of the first SMALL bytes (the rest stays
    unallocated), flushed."""
    rng = random.Random(seed)
    fd = os.open(device, os.O_RDWR)
    try:
        for offset in range(0, SMALL, 2 * MiB):
            os.pwrite(fd, rng.randbytes(MiB), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_after_break(device: str) -> None:
    """64 KiB at 3 MiB, which only the target may come to hold."""
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, b"after the break!" * 4096, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)


def _holders(image: Path) -> list[int]:
    """The processes that have image open (any descriptor)."""
    pids = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == str(image):
                pids.append(int(fd.parent.parent.name))
        except OSError:
            continue  # gone meanwhile
    return pids


def _record_names(images: Path) -> list[str]:
    """The image paths the run directory's live records name under images."""
    names = []
    for record in RUN_DIR.glob("*.json"):
        try:
            path = json.loads(record.read_text()).get("image", "")
        except (OSError, ValueError):
            continue
        if str(path).startswith(str(images)):
            names.append(path)
    return names


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_after_a_break_a_permanent_attachment_is_the_targets(images: Path, suffix: str) -> None:
    source, target = images / f"source.{suffix}", images / f"target.{suffix}"
    virtdisk.create(source, SMALL).close()
    with virtdisk.open(source) as disk:
        disk.attach(read_only=False, permanent=True)
        device = disk.physical_path
    try:
        _write_checksummed(device, 5)
        with virtdisk.open(source, read_only=True) as disk:
            writer = subprocess.Popen(
                [sys.executable, "-c", _WRITER, device, "6", str(SMALL), "random", str(SMALL), str(SMALL)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert writer.stdout is not None and writer.stdin is not None
                assert writer.stdout.readline().startswith("round ")  # writing before the mirror
                disk.mirror(target)
                assert writer.stdout.readline().startswith("round ")  # and while in sync
                writer.stdin.write("stop\n")
                writer.stdin.close()
                tail = writer.stdout.read().splitlines()
                assert writer.wait(timeout=60) == 0
            finally:
                if writer.poll() is None:
                    writer.kill()
                    writer.wait()
            _, written = json.loads(tail[-1])
            shown_at_break = _read_device(device, SMALL)
            disk.break_mirror()
        assert _record_names(images) == [str(target)]
        # Nothing holds the source any more: its helper let go of it.
        assert _holders(source) == []
        assert _holders(target) != []
        # The device now writes the target alone.
        _write_after_break(device)
        shown = _read_device(device, SMALL)
        seen = _after_break(source, target, device, detach=True)
    finally:
        if loops_backed_under(images):  # never leave the disk behind a failure
            subprocess.run([sys.executable, "-m", "virtdisk", "detach", device], check=False)
    assert seen["source_attached"] is False
    assert seen["target_attached"] is True
    assert seen["target_device"] == device
    assert seen["write_target"] == WinError.ERROR_SHARING_VIOLATION
    other_device, source_sum = seen["attach_source"]  # type: ignore[misc]
    assert other_device != device
    assert source_sum == hashlib.sha256(shown_at_break).hexdigest()
    assert seen["detach_target"] == 0
    assert seen["target_attached_after"] is False
    assert not loops_backed_under(images)
    assert _record_names(images) == []
    target_data = _raw(target, images, suffix)
    assert target_data == shown
    _check_sums(target_data, {int(o): d for o, d in written.items() if int(o) != 3 * MiB}, 65536)


def test_after_a_break_a_process_held_attachment_is_the_targets(images: Path) -> None:
    source, target = images / "source.vhdx", images / "target.vhdx"
    virtdisk.create(source, SMALL).close()
    with virtdisk.open(source) as disk:
        disk.attach(read_only=False)
        device = disk.physical_path
        _write_checksummed(device, 7)
        disk.mirror(target)
        shown_at_break = _read_device(device, SMALL)
        disk.break_mirror()
        assert _record_names(images) == [str(target)]
        assert disk.physical_path == device  # this handle's disk, wherever it runs
        seen = _after_break(source, target, device, detach=False)
        # This process's other handle on the target detaches the disk.
        with virtdisk.open(target, read_only=True) as other:
            other.detach()
        assert not loops_backed_under(images)
    assert seen["source_attached"] is False
    assert seen["target_attached"] is True
    assert seen["target_device"] == device
    assert seen["write_target"] == WinError.ERROR_SHARING_VIOLATION
    # This process's handle, opened for writing on the source file, keeps
    # its writer claim there until it closes (which detaches the disk).
    assert seen["attach_source"] == WinError.ERROR_SHARING_VIOLATION
    assert _raw(target, images, "vhdx") == shown_at_break
    assert _raw(source, images, "vhdx") == shown_at_break


def _vhdiinfo_identifier(image: Path) -> str:
    out = subprocess.run(
        [require_tool("vhdiinfo"), str(image)], check=True, capture_output=True, text=True
    ).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if "Identifier" in line)


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_the_target_keeps_the_disks_identity(images: Path, suffix: str) -> None:
    source, target = images / f"source.{suffix}", images / f"target.{suffix}"
    virtdisk.create(source, 16 * MiB).close()
    with virtdisk.open(source) as disk:
        disk.attach(read_only=False)
        disk.mirror(target)
        disk.break_mirror()
    with virtdisk.open(source, read_only=True) as disk:
        before = disk.info
    with virtdisk.open(target, read_only=True) as disk:
        after = disk.info
    if suffix == "vhd":
        # A VHD's unique id is its only identity: the guest's disk keeps it.
        assert after.identifier == before.identifier
        assert _vhdiinfo_identifier(target) == _vhdiinfo_identifier(source) == str(before.identifier)
    else:
        # The Page 83 data is the disk's identity; the DataWriteGuid names
        # a version of one file's contents, and the target's is its own.
        assert before.virtual_disk_id is not None
        assert after.virtual_disk_id == before.virtual_disk_id
        assert after.identifier != before.identifier
        assert _vhdiinfo_identifier(target) == str(after.identifier)
        assert _vhdiinfo_identifier(source) == str(before.identifier)


# Attaches an image without PERMANENT_LIFETIME and holds it until told to
# go (closing its handle then detaches the disk); prints the device.
_HOLDER = textwrap.dedent(
    """
    import sys
    import virtdisk
    with virtdisk.open(sys.argv[1]) as disk:
        disk.attach(read_only=False)
        print(disk.physical_path, flush=True)
        sys.stdin.readline()
    print("closed", flush=True)
    """
)


def test_another_process_mirrors_a_disk_attached_without_permanent_lifetime(images: Path) -> None:
    source, target = images / "source.vhdx", images / "target.vhdx"
    virtdisk.create(source, SMALL).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(source)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    writer = None
    try:
        assert holder.stdout is not None and holder.stdin is not None
        device = holder.stdout.readline().strip()
        assert device.startswith("/dev/loop"), device
        _write_checksummed(device, 8)
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, device, "9", str(SMALL), "random", str(SMALL), str(SMALL)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().startswith("round ")  # writing before the mirror
        # This process's handle is not the attaching one; it mirrors all the same.
        with virtdisk.open(source, read_only=True) as disk:
            seen: list[tuple[int, int]] = []
            disk.mirror(target, progress=lambda current, total: seen.append((current, total)))
            assert seen and seen[-1] == (SMALL, SMALL)
            assert writer.stdout.readline().startswith("round ")  # and while in sync
            writer.stdin.write("stop\n")
            writer.stdin.close()
            tail = writer.stdout.read().splitlines()
            assert writer.wait(timeout=60) == 0
            shown_at_break = _read_device(device, SMALL)
            disk.break_mirror()
        assert _record_names(images) == [str(target)]
        # Another process cannot detach it: its attacher's handles hold it.
        refused = subprocess.run(
            [sys.executable, "-m", "virtdisk", "detach", str(target)], capture_output=True, text=True
        )
        assert refused.returncode != 0 and "ERROR_DEVICE_IN_USE" in refused.stderr, refused.stderr
        _write_after_break(device)
        shown = _read_device(device, SMALL)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "closed"
        assert holder.wait(timeout=60) == 0
    finally:
        for process in (writer, holder):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert not loops_backed_under(images)
    _, written = json.loads(tail[-1])
    target_data = _raw(target, images, "vhdx")
    assert target_data == shown
    _check_sums(target_data, {int(o): d for o, d in written.items() if int(o) != 3 * MiB}, 65536)
    assert _raw(source, images, "vhdx") == shown_at_break


def test_a_server_killed_around_the_break_leaves_both_images_whole(images: Path) -> None:
    """A kill loop, bounded in rounds and time: the server dies at a random
    moment near the break.  Whatever the break's outcome, nothing is left
    attached or recorded, the source holds what was written before, and a
    target the break made the disk is kept whole, with what was written to
    it after."""
    rng = random.Random(13)
    deadline = time.monotonic() + 45
    outcomes = {True: 0, False: 0}
    for round_number in range(12):
        if time.monotonic() > deadline and all(outcomes.values()):
            break
        source, target = images / f"source{round_number}.vhdx", images / f"target{round_number}.vhdx"
        virtdisk.create(source, 16 * MiB).close()
        before = rng.randbytes(2 * MiB)
        after = rng.randbytes(MiB)
        after_written = False
        disk = virtdisk.open(source)
        try:
            disk.attach(read_only=False)
            device = disk.physical_path
            fd = os.open(device, os.O_RDWR)
            os.pwrite(fd, before, MiB)
            os.fsync(fd)
            os.close(fd)
            disk.mirror(target)
            server = server_of(device)
            # Round 0 kills before the break and round 1 just after it, so
            # that both outcomes are seen however fast the machine; the
            # others at a random moment around it.
            delay = {0: -1.0, 1: None}.get(round_number, rng.uniform(0, 0.02))
            killer = threading.Timer(max(delay or 0, 0), os.kill, (server, signal.SIGKILL))
            if delay is not None:
                killer.start()
                if delay < 0:
                    killer.join()
            try:
                disk.break_mirror()
                broke = True
            except virtdisk.VirtualDiskError:
                broke = False
            if delay is None:
                killer.start()
            if broke:
                try:
                    fd = os.open(device, os.O_RDWR)
                    try:
                        os.pwrite(fd, after, 8 * MiB)
                        os.fsync(fd)
                        after_written = True
                    finally:
                        os.close(fd)
                except OSError:
                    pass  # the server died: nothing acknowledged
            killer.join()
        finally:
            with contextlib.suppress(virtdisk.VirtualDiskError):
                disk.close()  # the server was killed: its final flush may fail
        outcomes[broke] += 1
        for _ in range(200):  # the helper notices its server's death and ends
            if not loops_backed_under(images) and not _record_names(images):
                break
            time.sleep(0.05)
        assert not loops_backed_under(images)
        assert _record_names(images) == []
        _qemu("check", "-r", "all", "-f", "vhdx", str(source))
        assert _raw(source, images, "vhdx")[MiB : 3 * MiB] == before
        if broke:
            assert target.exists(), "the helper removed the disk's image"
        if target.exists():
            _qemu("check", "-r", "all", "-f", "vhdx", str(target))
            data = _raw(target, images, "vhdx")
            assert data[MiB : 3 * MiB] == before
            if after_written:
                assert data[8 * MiB : 9 * MiB] == after
    assert outcomes[True] and outcomes[False], outcomes
