"""Resize, expand and fixed creation as asynchronous operations with progress.

The provider reserves a fixed disk's space (new or grown) in steps on the
operation's thread; the rest of a resize changes metadata only.  Contents are
checked with qemu-img against a raw copy of what went in.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import virtdisk
from virtdisk import Access, WinError
from virtdisk._native import ffi, lib

from .conftest import require_tool

MiB = 1 << 20
GiB = 1 << 30
QEMU_FORMAT = {"vhd": "vpc", "vhdx": "vhdx"}
METAOPS = Access.METAOPS | Access.GET_INFO


def _filled(folder: Path, suffix: str, size: int, fixed: bool) -> tuple[Path, bytes]:
    """An image made from a raw file with data at the start and near the end."""
    data = bytearray(size)
    data[:MiB] = random.Random(1).randbytes(MiB)
    data[size - 3 * MiB : size - 2 * MiB] = random.Random(2).randbytes(MiB)
    raw = folder / f"source-{suffix}.raw"
    raw.write_bytes(data)
    image = folder / f"disk-{'fixed' if fixed else 'dynamic'}.{suffix}"
    virtdisk.create(image, source=raw, fixed=fixed).close()
    return image, bytes(data)


def _qemu_compare(expected: bytes, image: Path, suffix: str) -> None:
    raw = image.with_suffix(".expected.raw")
    raw.write_bytes(expected)
    result = subprocess.run(
        [require_tool("qemu-img"), "compare", "-f", "raw", "-F", QEMU_FORMAT[suffix], str(raw), str(image)],
        capture_output=True,
        text=True,
    )
    raw.unlink()
    assert result.returncode == 0, result.stdout + result.stderr


def _qemu_size(image: Path, suffix: str) -> int:
    result = subprocess.run(
        [require_tool("qemu-img"), "info", "--output=json", "-f", QEMU_FORMAT[suffix], str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(json.loads(result.stdout)["virtual-size"])


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "dynamic"])
def test_resize_and_expand_report_progress_up_to_the_total_and_keep_the_data(
    tmp_path: Path, suffix: str, fixed: bool
) -> None:
    image, data = _filled(tmp_path, suffix, 16 * MiB, fixed)
    for grow, size in (("resize", 48 * MiB), ("expand", 96 * MiB)):
        seen: list[tuple[int, int]] = []
        with virtdisk.open(image, METAOPS) as disk:
            getattr(disk, grow)(size, progress=lambda c, t, seen=seen: seen.append((c, t)))
            assert disk.info.virtual_size == size
            block = disk.info.block_size or 1  # a fixed VHD has no blocks
        current, total = seen[-1]
        assert current == total > 0
        assert [c for c, _ in seen] == sorted(c for c, _ in seen)
        if fixed:
            # A fixed disk's progress is the bytes it reserved for the new size
            # (whole blocks of a VHDX).
            assert total == -(-size // block) * block - -(-len(data) // block) * block
        assert _qemu_size(image, suffix) == size
        _qemu_compare(data + bytes(size - len(data)), image, suffix)
        data += bytes(size - len(data))


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_a_cancelled_grow_keeps_the_old_size_gives_the_space_back_and_grows_again(
    tmp_path: Path, suffix: str
) -> None:
    # 16 GiB reserved in 64 MiB steps, cancelled once the first is done.  A
    # cancel can lose the race with the end (as CancelIoEx can on Windows):
    # then the grow is whole, and another image is tried.
    for attempt in range(5):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        image, data = _filled(folder, suffix, 16 * MiB, fixed=True)
        allocated = os.stat(image).st_blocks * 512
        with virtdisk.open(image, METAOPS) as disk:
            operation = disk.begin_expand(16 * GiB)
            while not operation.done and operation.progress()[0] == 0:
                pass
            cancelled = operation.cancel()
            try:
                operation.wait()
                whole = True
            except virtdisk.OperationCancelledError:
                whole = False
            if whole:
                assert disk.info.virtual_size == 16 * GiB  # it had ended: whole
            else:
                assert cancelled
                current, total = operation.progress()
                assert 0 < current < total and total >= 16 * GiB - 32 * MiB
                assert disk.info.virtual_size == 16 * MiB
        if not whole:
            break
        image.unlink()  # 16 GiB of real space
    else:
        pytest.fail("every grow ended before it could be cancelled")
    assert os.stat(image).st_blocks * 512 < allocated + 64 * MiB
    assert _qemu_size(image, suffix) == 16 * MiB
    _qemu_compare(data, image, suffix)
    with virtdisk.open(image, METAOPS) as disk:
        disk.expand(64 * MiB)
    _qemu_compare(data + bytes(48 * MiB), image, suffix)


@pytest.mark.parametrize("suffix", ["vhd", "vhdx"])
def test_fixed_create_reports_progress_allocates_everything_and_a_cancel_leaves_no_file(
    tmp_path: Path, suffix: str
) -> None:
    image = tmp_path / f"fixed.{suffix}"
    seen: list[tuple[int, int]] = []
    with virtdisk.create(image, 256 * MiB, fixed=True, progress=lambda c, t: seen.append((c, t))) as disk:
        assert disk.info.disk_type == virtdisk.DiskType.FIXED
    current, total = seen[-1]
    assert current == total == os.stat(image).st_size
    assert os.stat(image).st_blocks * 512 >= 256 * MiB  # fully provisioned, not sparse
    assert _qemu_size(image, suffix) == 256 * MiB
    _qemu_compare(bytes(256 * MiB), image, suffix)

    class Stop(Exception):
        pass

    def stop(current: int, total: int) -> None:
        raise Stop

    cancelled = tmp_path / f"cancelled.{suffix}"
    with pytest.raises(Stop):
        virtdisk.create(cancelled, 16 * GiB, fixed=True, progress=stop)
    assert not cancelled.exists()


def test_raw_asynchronous_resize_signals_its_event_and_checks_arguments_before_starting(
    tmp_path: Path,
) -> None:
    image = tmp_path / "raw.vhdx"
    virtdisk.create(image, 16 * MiB, fixed=True).close()
    handle = ffi.new("HANDLE *")
    storage = ffi.new("VIRTUAL_STORAGE_TYPE *")
    assert lib.OpenVirtualDisk(storage, str(image), Access.METAOPS, 0, ffi.NULL, handle) == 0
    event = lib.CreateEventW(ffi.NULL, 1, 0, ffi.NULL)
    try:
        overlapped = ffi.new("OVERLAPPED *", {"hEvent": event})
        progress = ffi.new("VIRTUAL_DISK_PROGRESS *")
        parameters = ffi.new("RESIZE_VIRTUAL_DISK_PARAMETERS *", {"Version": 1})
        parameters.Version1.NewSize = 16 * MiB + 100  # not whole sectors: refused at once
        assert lib.ResizeVirtualDisk(handle[0], 0, parameters, overlapped) == WinError.ERROR_INVALID_PARAMETER
        assert lib.WaitForSingleObject(event, 0) == lib.WAIT_TIMEOUT
        assert (
            lib.GetVirtualDiskOperationProgress(handle[0], overlapped, progress)
            == WinError.ERROR_INVALID_PARAMETER
        )  # nothing was started
        parameters.Version1.NewSize = 80 * MiB
        assert lib.ResizeVirtualDisk(handle[0], 0, parameters, overlapped) == WinError.ERROR_IO_PENDING
        assert lib.WaitForSingleObject(event, 60_000) == 0
        assert lib.GetVirtualDiskOperationProgress(handle[0], overlapped, progress) == 0
        assert progress.OperationStatus == 0 and overlapped.Internal == 0
        assert progress.CurrentValue == progress.CompletionValue == 64 * MiB
        expand = ffi.new("EXPAND_VIRTUAL_DISK_PARAMETERS *", {"Version": 1})
        expand.Version1.NewSize = 64 * MiB  # smaller than now
        assert lib.ExpandVirtualDisk(handle[0], 0, expand, overlapped) == WinError.ERROR_INVALID_PARAMETER
        # Within the last 32 MiB block: nothing to reserve, one unit of progress
        # (this grow once failed, fallocate refusing a length of 0).
        expand.Version1.NewSize = 96 * MiB
        assert lib.ExpandVirtualDisk(handle[0], 0, expand, overlapped) == WinError.ERROR_IO_PENDING
        assert lib.WaitForSingleObject(event, 60_000) == 0
        assert lib.GetVirtualDiskOperationProgress(handle[0], overlapped, progress) == 0
        assert progress.OperationStatus == 0
        assert progress.CurrentValue == progress.CompletionValue == 1
    finally:
        lib.CloseHandle(event)
        lib.CloseHandle(handle[0])
    assert _qemu_size(image, "vhdx") == 96 * MiB
    _qemu_compare(bytes(96 * MiB), image, "vhdx")


def test_a_handle_with_a_running_grow_refuses_other_changes_and_closing_it_cancels(tmp_path: Path) -> None:
    image = tmp_path / "busy.vhd"
    virtdisk.create(image, 16 * MiB, fixed=True).close()
    with virtdisk.open(image, METAOPS) as disk:
        operation = disk.begin_expand(16 * GiB)
        refused = None
        while not operation.done:
            try:
                disk.resize(32 * MiB)
            except virtdisk.VirtualDiskError as error:
                refused = error
                break
        assert refused is not None, "the grow ended before a second change was tried"
        assert refused.winerror == WinError.ERROR_BUSY
        operation.cancel()
        with pytest.raises(virtdisk.OperationCancelledError):
            operation.wait()
    with virtdisk.open(image, read_only=True) as disk:
        assert disk.info.virtual_size == 16 * MiB


def test_without_fallocate_a_fixed_disk_is_written_as_zeros_with_progress(tmp_path: Path) -> None:
    """tests/doubles/no_fallocate_double.c: the fallback writes zeros into the
    holes of the new file only, so the metadata stays and the disk reads zeros."""
    library = tmp_path / "no_fallocate_double.so"
    source = Path(__file__).parent / "doubles" / "no_fallocate_double.c"
    subprocess.run(
        [require_tool("gcc"), "-shared", "-fPIC", "-O1", "-Wall", "-o", str(library), str(source)], check=True
    )
    script = """if True:
        import json, sys, virtdisk
        seen = []
        for name in ("fixed.vhdx", "fixed.vhd"):
            virtdisk.create(sys.argv[1] + "/" + name, 64 << 20, fixed=True,
                            progress=lambda c, t: seen.append((c, t))).close()
            print(json.dumps(seen[-1]))
        with virtdisk.open(sys.argv[1] + "/fixed.vhd", virtdisk.Access.METAOPS) as disk:
            disk.expand(96 << 20)
    """
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env={**os.environ, "LD_PRELOAD": str(library)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for line, name in zip(result.stdout.splitlines(), ("fixed.vhdx", "fixed.vhd")):
        image = tmp_path / name
        current, total = json.loads(line)
        assert current == total > 64 * MiB - 1
        assert os.stat(image).st_blocks * 512 >= 64 * MiB  # written, not left sparse
    _qemu_compare(bytes(64 * MiB), tmp_path / "fixed.vhdx", "vhdx")
    _qemu_compare(bytes(96 * MiB), tmp_path / "fixed.vhd", "vhd")
    subprocess.run(
        [require_tool("qemu-img"), "check", "-f", "vhdx", str(tmp_path / "fixed.vhdx")], check=True
    )


def test_raw_asynchronous_fixed_create_returns_a_handle_at_once_and_a_cancel_leaves_no_file(
    tmp_path: Path,
) -> None:
    storage = ffi.new("VIRTUAL_STORAGE_TYPE *")
    parameters = ffi.new("CREATE_VIRTUAL_DISK_PARAMETERS *", {"Version": 2})
    parameters.Version2.MaximumSize = 16 * GiB
    event = lib.CreateEventW(ffi.NULL, 1, 0, ffi.NULL)
    try:
        # A cancel can lose the race with the end: then another file is tried.
        for attempt in range(5):
            image = tmp_path / f"fixed-{attempt}.vhdx"
            handle = ffi.new("HANDLE *")
            overlapped = ffi.new("OVERLAPPED *", {"hEvent": event})
            flags = lib.CREATE_VIRTUAL_DISK_FLAG_FULL_PHYSICAL_ALLOCATION
            code = lib.CreateVirtualDisk(
                storage, str(image), 0, ffi.NULL, flags, 0, parameters, overlapped, handle
            )
            assert code == WinError.ERROR_IO_PENDING
            assert handle[0] != ffi.NULL and image.exists()  # the handle and the file at once
            cancelled = lib.CancelIoEx(handle[0], overlapped)
            assert lib.WaitForSingleObject(event, 60_000) == 0
            progress = ffi.new("VIRTUAL_DISK_PROGRESS *")
            assert lib.GetVirtualDiskOperationProgress(handle[0], overlapped, progress) == 0
            lib.CloseHandle(handle[0])
            if progress.OperationStatus == 0:
                assert image.stat().st_size > 16 * GiB  # it had ended: whole
                image.unlink()
                continue
            assert cancelled
            assert progress.OperationStatus == WinError.ERROR_OPERATION_ABORTED
            assert overlapped.Internal == WinError.ERROR_OPERATION_ABORTED
            assert progress.CurrentValue < progress.CompletionValue
            assert not image.exists()
            break
        else:
            pytest.fail("every create ended before it could be cancelled")
    finally:
        lib.CloseHandle(event)


def _raw_fixed_create_from(source: Path, image: Path, event) -> tuple[int, Any, Any, Any]:
    """CreateVirtualDisk of a fixed VHDX from source with an OVERLAPPED: the
    code, the handle, the OVERLAPPED and the parameters (kept alive by the
    caller while the job runs)."""
    storage = ffi.new("VIRTUAL_STORAGE_TYPE *")
    parameters = ffi.new("CREATE_VIRTUAL_DISK_PARAMETERS *", {"Version": 2})
    path = ffi.new("WCHAR[]", str(source))
    parameters.Version2.SourcePath = path
    handle = ffi.new("HANDLE *")
    overlapped = ffi.new("OVERLAPPED *", {"hEvent": event})
    flags = lib.CREATE_VIRTUAL_DISK_FLAG_FULL_PHYSICAL_ALLOCATION
    code = lib.CreateVirtualDisk(storage, str(image), 0, ffi.NULL, flags, 0, parameters, overlapped, handle)
    return code, handle, overlapped, (parameters, path)


def test_raw_asynchronous_fixed_create_from_a_source_reserves_its_space_in_the_job(tmp_path: Path) -> None:
    """The reservation is part of the job (progress: the file's bytes, then
    the source's), not done before ERROR_IO_PENDING; a cancel right away
    stops it and leaves no file."""
    size = GiB
    source = tmp_path / "source.raw"
    with open(source, "wb") as raw:
        raw.truncate(size)
        raw.write(random.Random(3).randbytes(MiB))
        raw.seek(size - 5 * MiB)
        raw.write(random.Random(4).randbytes(MiB))
    event = lib.CreateEventW(ffi.NULL, 1, 0, ffi.NULL)
    try:
        image = tmp_path / "fixed.vhdx"
        code, handle, overlapped, keep = _raw_fixed_create_from(source, image, event)
        assert code == WinError.ERROR_IO_PENDING
        assert handle[0] != ffi.NULL and image.exists()
        seen: list[tuple[int, int]] = []
        progress = ffi.new("VIRTUAL_DISK_PROGRESS *")
        while True:
            signalled = lib.WaitForSingleObject(event, 0) == 0
            assert lib.GetVirtualDiskOperationProgress(handle[0], overlapped, progress) == 0
            seen.append((progress.CurrentValue, progress.CompletionValue))
            if signalled:
                break
            lib.WaitForSingleObject(event, 10)
        assert progress.OperationStatus == 0
        lib.CloseHandle(handle[0])
    finally:
        lib.CloseHandle(event)
    file_size = image.stat().st_size
    totals = {total for _, total in seen if total}
    assert totals == {file_size + size}, "the reservation is not part of the job's progress"
    currents = [current for current, _ in seen]
    assert currents == sorted(currents) and currents[-1] == file_size + size
    assert image.stat().st_blocks * 512 >= size  # fully provisioned
    compared = subprocess.run(
        [require_tool("qemu-img"), "compare", "-f", "raw", "-F", "vhdx", str(source), str(image)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stdout + compared.stderr
    image.unlink()

    # A cancel at once: the reservation stops, and no file stays.
    for attempt in range(5):
        event = lib.CreateEventW(ffi.NULL, 1, 0, ffi.NULL)
        try:
            image = tmp_path / f"cancelled-{attempt}.vhdx"
            code, handle, overlapped, keep = _raw_fixed_create_from(source, image, event)
            assert code == WinError.ERROR_IO_PENDING
            cancelled = lib.CancelIoEx(handle[0], overlapped)
            assert lib.WaitForSingleObject(event, 60_000) == 0
            assert lib.GetVirtualDiskOperationProgress(handle[0], overlapped, progress) == 0
            lib.CloseHandle(handle[0])
        finally:
            lib.CloseHandle(event)
        if progress.OperationStatus == 0:
            image.unlink()  # it had ended: another try
            continue
        assert cancelled
        assert progress.OperationStatus == WinError.ERROR_OPERATION_ABORTED
        assert progress.CurrentValue < progress.CompletionValue
        assert not image.exists()
        break
    else:
        pytest.fail("every create ended before it could be cancelled")
    del keep
