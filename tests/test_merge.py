"""MergeVirtualDisk, asynchronous calls and progress, on real chains.

Data goes into each disk of a chain through an attached disk (the kernel's
loop device over the provider's FUSE server), each disk written before its
child is made (a VHDX child names its parent's DataWriteGuid, which a write
changes).  What the leaf shows is read back the same way before the merge;
afterwards qemu-img (which reads dynamic VHD and VHDX, not differencing
ones) compares it with the merged base, and our own reader with a merged
differencing parent.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import virtdisk
from virtdisk import Access, WinError
from virtdisk._native import ffi, lib

from .conftest import require_tool

MiB = 1 << 20
QEMU_FORMAT = {"vhd": "vpc", "vhdx": "vhdx"}


def _detach(disk: virtdisk.VirtualDisk) -> None:
    """Detach, waiting (5 s at most) while something else on this shared
    machine (udev's probe of a new device, another session's scan) briefly
    holds the device open: the provider refuses rather than detach lazily."""
    deadline = time.monotonic() + 5
    while True:
        try:
            disk.detach()
            return
        except virtdisk.DiskInUseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _write(path: Path, writes: list[tuple[int, bytes]]) -> None:
    with virtdisk.open(path) as disk:
        disk.attach()
        try:
            fd = os.open(disk.physical_path, os.O_RDWR)
            try:
                for offset, data in writes:
                    os.pwrite(fd, data, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            _detach(disk)


def _view(path: Path) -> bytes:
    """The disk's bytes as our reader shows them attached."""
    with virtdisk.open(path, read_only=True) as disk:
        disk.attach(read_only=True)
        try:
            with open(disk.physical_path, "rb") as device:
                return device.read()
        finally:
            _detach(disk)


def _pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _chain(folder: Path, suffix: str, size: int = 64 * MiB, child_data: int = 0) -> list[Path]:
    """base <- mid <- leaf, each with data of its own, some overlapping."""
    base, mid, leaf = (folder / f"{name}.{suffix}" for name in ("base", "mid", "leaf"))
    # 2 MiB blocks, which the children take from it (VHDX's default is 32 MiB).
    virtdisk.create(base, size, block_size=2 * MiB).close()
    _write(base, [(0, _pattern(1, 8 * MiB)), (30 * MiB, _pattern(2, 512))])
    virtdisk.create(mid, parent=base).close()
    _write(mid, [(4 * MiB, _pattern(3, MiB)), (20 * MiB + 4096, _pattern(4, 4096))])
    virtdisk.create(leaf, parent=mid).close()
    writes = [(4 * MiB + 512, _pattern(5, 512)), (40 * MiB, _pattern(6, 3 * MiB + 512))]
    if child_data:
        writes.append((size - child_data, _pattern(7, child_data)))
    _write(leaf, writes)
    return [leaf, mid, base]


def _qemu_compare(expected: bytes, image: Path, folder: Path, suffix: str) -> None:
    qemu_img = require_tool("qemu-img")
    raw = folder / "expected.raw"
    raw.write_bytes(expected)
    result = subprocess.run(
        [qemu_img, "compare", "-f", "raw", "-F", QEMU_FORMAT[suffix], str(raw), str(image)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_merge_into_the_base_reads_as_the_leaf_did_and_progress_rises_to_the_total(
    images: Path, suffix: str
) -> None:
    leaf, mid, base = _chain(images, suffix)
    expected = _view(leaf)
    seen: list[tuple[int, int]] = []
    virtdisk.merge(leaf, 2, progress=lambda current, total: seen.append((current, total)))
    _qemu_compare(expected, base, images, suffix)
    assert _view(base) == expected
    currents = [current for current, _ in seen]
    assert currents == sorted(currents)
    total = seen[-1][1]
    assert seen[-1] == (total, total)
    # Only what leaf and mid hold was copied: their writes, rounded to the
    # formats' blocks, far less than the disk.
    assert 4 * MiB < total < 32 * MiB
    assert leaf.exists() and mid.exists()  # nothing deleted


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_merge_into_a_differencing_parent_keeps_the_leaf_view(images: Path, suffix: str) -> None:
    leaf, mid, base = _chain(images, suffix)
    expected = _view(leaf)
    base_before = _view(base)
    virtdisk.merge(leaf, 1)
    if suffix == "vhdx":
        # The merged child names the parent's old DataWriteGuid: invalid now.
        with pytest.raises(virtdisk.InvalidImageError):
            virtdisk.open(leaf, read_only=True).close()
    assert _view(mid) == expected
    assert _view(base) == base_before


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_version_2_merges_a_middle_disk_and_repoints_the_leaf(images: Path, suffix: str) -> None:
    leaf, _mid, base = _chain(images, suffix)
    expected = _view(leaf)
    with virtdisk.open(leaf, Access.METAOPS | Access.GET_INFO, rw_depth=3) as disk:
        disk.merge(1, source_depth=2)
    with virtdisk.open(leaf, read_only=True) as disk:
        assert Path(disk.info.parent_path or "").resolve() == base.resolve()
    assert _view(leaf) == expected


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_a_cancelled_merge_leaves_a_consistent_chain_that_merges_again(images: Path, suffix: str) -> None:
    leaf, _mid, base = _chain(images, suffix, size=256 * MiB, child_data=160 * MiB)
    expected = _view(leaf)
    with virtdisk.open(leaf, Access.METAOPS | Access.GET_INFO, rw_depth=3) as disk:
        operation = disk.begin_merge(2)
        while not operation.done and operation.progress()[0] == 0:
            pass
        current, total = operation.progress()
        assert operation.cancel(), "the merge ended before it could be cancelled"
        with pytest.raises(virtdisk.OperationCancelledError):
            operation.wait()
        after, _ = operation.progress()
        assert current > 0 and after < total
    if suffix == "vhdx":
        subprocess.run(
            [require_tool("qemu-img"), "check", "-f", "vhdx", str(base)], check=True, capture_output=True
        )
    # The chain still opens (the base's DataWriteGuid is back) and reads the same.
    assert _view(leaf) == expected
    virtdisk.merge(leaf, 2)
    _qemu_compare(expected, base, images, suffix)


def test_merge_refuses_what_the_documentation_refuses(images: Path) -> None:
    leaf, _mid, base = _chain(images, "vhd")
    with virtdisk.open(leaf) as disk, pytest.raises(virtdisk.VirtualDiskPermissionError) as caught:
        disk.merge(1)  # no METAOPS
    assert caught.value.winerror == WinError.ERROR_ACCESS_DENIED
    with virtdisk.open(leaf, Access.METAOPS, rw_depth=2) as disk:
        with pytest.raises(virtdisk.VirtualDiskError) as caught:
            disk.merge(2)  # RWDepth must exceed MergeDepth
        assert caught.value.winerror == WinError.ERROR_INVALID_PARAMETER
        assert "RWDepth" in caught.value.detail
    with (
        virtdisk.open(leaf, Access.METAOPS, rw_depth=9) as disk,
        pytest.raises(virtdisk.VirtualDiskError) as caught,
    ):
        disk.merge(3)  # the chain has only two disks above the leaf
    assert caught.value.winerror == WinError.ERROR_INVALID_PARAMETER
    with (
        virtdisk.open(base, Access.METAOPS, rw_depth=2) as disk,
        pytest.raises(virtdisk.NotSupportedError) as caught,
    ):
        disk.merge(1)  # not a differencing disk
    assert caught.value.winerror == WinError.ERROR_VHD_INVALID_TYPE
    with (
        virtdisk.open(leaf, Access.METAOPS, rw_depth=2) as disk,
        virtdisk.open(leaf, read_only=True),
        pytest.raises(virtdisk.DiskInUseError),
    ):
        disk.merge(1)
    with virtdisk.open(leaf, read_only=True) as attached:
        attached.attach(read_only=True)
        try:
            # An attached disk is not changed: attached read-only, a METAOPS
            # handle opens (to compact it, README "Sharing") but holds it
            # read-only, and its merge answers the documented state error ...
            with (
                virtdisk.open(leaf, Access.METAOPS, rw_depth=2) as disk,
                pytest.raises(virtdisk.InvalidStateError),
            ):
                disk.merge(1)
        finally:
            _detach(attached)
    with virtdisk.open(_mid, read_only=True) as attached:
        attached.attach(read_only=True)
        try:
            # ... and a merge does not write into an attached parent.
            with (
                virtdisk.open(leaf, Access.METAOPS, rw_depth=2) as disk,
                pytest.raises(virtdisk.InvalidStateError),
            ):
                disk.merge(1)
        finally:
            _detach(attached)
    with virtdisk.open(leaf, Access.METAOPS, rw_depth=2) as disk:
        parameters = ffi.new("MERGE_VIRTUAL_DISK_PARAMETERS *", {"Version": 3})
        assert lib.MergeVirtualDisk(disk._handle, 0, parameters, ffi.NULL) == WinError.ERROR_INVALID_PARAMETER
        parameters = ffi.new("MERGE_VIRTUAL_DISK_PARAMETERS *", {"Version": 1})
        parameters.Version1.MergeDepth = 1
        assert lib.MergeVirtualDisk(disk._handle, 1, parameters, ffi.NULL) == WinError.ERROR_INVALID_PARAMETER


def test_raw_asynchronous_merge_signals_its_eventfd_and_reports_progress(images: Path) -> None:
    leaf, _mid, _base = _chain(images, "vhdx")
    handle = ffi.new("HANDLE *")
    storage = ffi.new("VIRTUAL_STORAGE_TYPE *")
    open_parameters = ffi.new("OPEN_VIRTUAL_DISK_PARAMETERS *", {"Version": 1})
    open_parameters.Version1.RWDepth = 2
    code = lib.OpenVirtualDisk(storage, str(leaf), Access.METAOPS, 0, open_parameters, handle)
    assert code == 0
    event = lib.CreateEventW(ffi.NULL, 1, 0, ffi.NULL)
    try:
        overlapped = ffi.new("OVERLAPPED *")
        progress = ffi.new("VIRTUAL_DISK_PROGRESS *")
        assert (
            lib.GetVirtualDiskOperationProgress(handle[0], overlapped, progress)
            == WinError.ERROR_INVALID_PARAMETER
        )
        assert not lib.CancelIoEx(handle[0], overlapped)
        assert lib.GetLastError() == WinError.ERROR_NOT_FOUND
        read_end, write_end = os.pipe()
        try:
            overlapped.hEvent = ffi.cast("HANDLE", read_end)  # not an eventfd
            parameters = ffi.new("MERGE_VIRTUAL_DISK_PARAMETERS *", {"Version": 1})
            parameters.Version1.MergeDepth = 1
            assert lib.MergeVirtualDisk(handle[0], 0, parameters, overlapped) == WinError.ERROR_INVALID_HANDLE
        finally:
            os.close(read_end)
            os.close(write_end)
        overlapped.hEvent = event
        assert lib.WaitForSingleObject(event, 0) == lib.WAIT_TIMEOUT
        assert lib.MergeVirtualDisk(handle[0], 0, parameters, overlapped) == WinError.ERROR_IO_PENDING
        assert lib.WaitForSingleObject(event, 60_000) == 0
        assert lib.GetVirtualDiskOperationProgress(handle[0], overlapped, progress) == 0
        assert progress.OperationStatus == 0
        assert progress.CurrentValue == progress.CompletionValue > 0
        assert overlapped.Internal == 0
        # The event is an eventfd, usable with select/poll: it is readable.
        fd = int(ffi.cast("intptr_t", event))
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    finally:
        lib.CloseHandle(event)
        lib.CloseHandle(handle[0])


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_create_with_a_source_reports_progress_and_a_cancelled_copy_leaves_no_file(
    images: Path, suffix: str
) -> None:
    # Sparse: the holes are found with SEEK_HOLE and never read.
    source = images / "source.raw"
    data = bytearray(48 * MiB)
    data[MiB : 9 * MiB] = _pattern(9, 8 * MiB)
    data[30 * MiB + 512 : 31 * MiB] = _pattern(10, MiB - 512)
    with open(source, "wb") as raw:
        raw.truncate(len(data))
        raw.seek(MiB)
        raw.write(data[MiB : 9 * MiB])
        raw.seek(30 * MiB + 512)
        raw.write(data[30 * MiB + 512 : 31 * MiB])
    seen: list[tuple[int, int]] = []
    target = images / f"copy.{suffix}"
    virtdisk.create(target, source=source, progress=lambda c, t: seen.append((c, t))).close()
    _qemu_compare(bytes(data), target, images, suffix)
    assert seen[-1] == (len(data), len(data))
    assert [c for c, _ in seen] == sorted(c for c, _ in seen)

    class Stop(Exception):
        pass

    def stop(current: int, total: int) -> None:
        raise Stop

    cancelled = images / f"cancelled.{suffix}"
    with pytest.raises(Stop):
        virtdisk.create(cancelled, source=source, progress=stop)
    assert not cancelled.exists()


def test_cli_merge_and_convert_print_json_and_no_bar_without_a_terminal(images: Path) -> None:
    leaf, _mid, base = _chain(images, "vhdx")
    expected = _view(leaf)
    run = [sys.executable, "-m", "virtdisk"]
    result = subprocess.run(
        [*run, "merge", str(leaf), "--depth", "2", "--json"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    answer = json.loads(result.stdout)
    assert Path(answer["target"]).resolve() == base.resolve() and answer["bytes_copied"] > 0
    converted = images / "converted.vhd"
    result = subprocess.run(
        [*run, "convert", str(base), str(converted), "--type", "fixed"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "VHD fixed" in result.stdout
    _qemu_compare(expected, converted, images, "vhd")


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_a_merge_killed_at_any_moment_leaves_a_chain_that_reads_the_same_and_merges_again(
    images: Path, suffix: str
) -> None:
    leaf, _mid, base = _chain(images, suffix, size=256 * MiB, child_data=160 * MiB)
    expected = _view(leaf)
    script = "import sys, virtdisk; virtdisk.merge(sys.argv[1], 2); print('merged', flush=True)"
    rng = random.Random(11)
    merged = False
    for _ in range(4):
        merging = subprocess.Popen(
            [sys.executable, "-c", script, str(leaf)], stdout=subprocess.PIPE, text=True
        )
        time.sleep(rng.uniform(0.05, 0.4))
        merging.kill()
        output, _ = merging.communicate(timeout=30)
        if output == "merged\n":
            merged = True  # it ended before the kill: checked below
            break
        # Killed before, during or after the copy: the leaf still opens and
        # shows what it showed.
        assert _view(leaf) == expected
    if not merged:
        virtdisk.merge(leaf, 2)
    _qemu_compare(expected, base, images, suffix)
    if suffix == "vhdx":
        subprocess.run(
            [require_tool("qemu-img"), "check", "-f", "vhdx", str(base)], check=True, capture_output=True
        )


def test_a_running_merge_keeps_its_overlapped_and_handle_busy_and_closing_the_handle_cancels_it(
    images: Path,
) -> None:
    leaf, _mid, base = _chain(images, "vhd", size=256 * MiB, child_data=160 * MiB)
    expected = _view(leaf)
    handle = ffi.new("HANDLE *")
    storage = ffi.new("VIRTUAL_STORAGE_TYPE *")
    open_parameters = ffi.new("OPEN_VIRTUAL_DISK_PARAMETERS *", {"Version": 1})
    open_parameters.Version1.RWDepth = 3
    access = Access.METAOPS | Access.ATTACH_RO | Access.GET_INFO
    assert lib.OpenVirtualDisk(storage, str(leaf), access, 0, open_parameters, handle) == 0
    event = lib.CreateEventW(ffi.NULL, 1, 0, ffi.NULL)
    try:
        overlapped = ffi.new("OVERLAPPED *", {"hEvent": event})
        parameters = ffi.new("MERGE_VIRTUAL_DISK_PARAMETERS *", {"Version": 1})
        parameters.Version1.MergeDepth = 2
        assert lib.MergeVirtualDisk(handle[0], 0, parameters, overlapped) == WinError.ERROR_IO_PENDING
        # Both refusals come before the 160 MiB copy can have ended.
        assert lib.MergeVirtualDisk(handle[0], 0, parameters, overlapped) == WinError.ERROR_BUSY
        flags = lib.ATTACH_VIRTUAL_DISK_FLAG_READ_ONLY
        assert lib.AttachVirtualDisk(handle[0], ffi.NULL, flags, 0, ffi.NULL, ffi.NULL) == WinError.ERROR_BUSY
        assert lib.CloseHandle(handle[0])
        # The event still comes: the job ends, cancelled, and lets the handle go.
        assert lib.WaitForSingleObject(event, 60_000) == 0
        assert overlapped.Internal == WinError.ERROR_OPERATION_ABORTED
    finally:
        lib.CloseHandle(event)
    assert _view(leaf) == expected
    virtdisk.merge(leaf, 2)
    _qemu_compare(expected, base, images, "vhd")


class _TerminalDouble(io.StringIO):
    """A test double for stderr on a terminal."""

    def isatty(self) -> bool:
        return True


def test_the_progress_bar_draws_on_a_terminal_only_and_ends_its_line() -> None:
    from virtdisk._progress import ProgressBar

    terminal = _TerminalDouble()
    bar = ProgressBar("merging", stream=terminal)
    bar(0, 4 * MiB)
    bar(4 * MiB, 4 * MiB)
    bar.finish()
    lines = terminal.getvalue().split("\r")
    assert lines[-1].startswith("merging [" + "#" * 30 + "] 100.0%") and lines[-1].endswith("\n")
    assert "  0.0%" in lines[1]
    pipe = io.StringIO()
    quiet = ProgressBar("merging", stream=pipe)
    quiet(1, 2)
    quiet.finish()
    silenced = ProgressBar("merging", stream=terminal, quiet=True)
    before = terminal.getvalue()
    silenced(1, 2)
    silenced.finish()
    assert pipe.getvalue() == "" and terminal.getvalue() == before


def test_raw_asynchronous_create_returns_a_handle_at_once_and_a_cancelled_copy_removes_the_file(
    images: Path,
) -> None:
    source = images / "source.raw"
    source.write_bytes(_pattern(12, 96 * MiB))
    storage = ffi.new("VIRTUAL_STORAGE_TYPE *")
    event = lib.CreateEventW(ffi.NULL, 1, 0, ffi.NULL)
    progress = ffi.new("VIRTUAL_DISK_PROGRESS *")
    try:
        for name, cancel in (("plain.vhdx", False), ("copied.vhdx", False), ("cancelled.vhdx", True)):
            parameters = ffi.new("CREATE_VIRTUAL_DISK_PARAMETERS *", {"Version": 2})
            keep = ffi.new("WCHAR[]", str(source))
            if name == "plain.vhdx":
                parameters.Version2.MaximumSize = 64 * MiB
            else:
                parameters.Version2.SourcePath = keep
            overlapped = ffi.new("OVERLAPPED *", {"hEvent": event})
            handle = ffi.new("HANDLE *")
            path = images / name
            code = lib.CreateVirtualDisk(
                storage, str(path), 0, ffi.NULL, 0, 0, parameters, overlapped, handle
            )
            assert code == WinError.ERROR_IO_PENDING
            if cancel:
                assert lib.CancelIoEx(handle[0], overlapped)
            assert lib.WaitForSingleObject(event, 60_000) == 0
            assert lib.GetVirtualDiskOperationProgress(handle[0], overlapped, progress) == 0
            lib.CloseHandle(handle[0])
            if cancel:
                assert progress.OperationStatus == WinError.ERROR_OPERATION_ABORTED
                assert progress.CurrentValue < progress.CompletionValue == 96 * MiB
                assert not path.exists()
            else:
                assert progress.OperationStatus == 0
                assert progress.CurrentValue == progress.CompletionValue
                with virtdisk.open(path, read_only=True) as disk:
                    assert disk.info.virtual_size == (64 if name == "plain.vhdx" else 96) * MiB
    finally:
        lib.CloseHandle(event)
    _qemu_compare(source.read_bytes(), images / "copied.vhdx", images, "vhdx")


def test_cli_merge_says_what_is_wrong_with_a_chain_too_short_or_a_disk_not_differencing(images: Path) -> None:
    base = images / "base.vhd"
    child = images / "child.vhd"
    virtdisk.create(base, 16 * MiB).close()
    virtdisk.create(child, parent=base).close()
    run = [sys.executable, "-m", "virtdisk", "merge"]
    result = subprocess.run([*run, str(child), "--depth", "2"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert "ERROR_INVALID_PARAMETER" in result.stderr and "ends at depth 2" in result.stderr
    result = subprocess.run([*run, str(base)], capture_output=True, text=True)
    assert result.returncode == 1 and "ERROR_VHD_INVALID_TYPE" in result.stderr
