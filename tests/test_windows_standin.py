"""The facade's Windows code paths, run in Windows CPython against the test
double of VirtDisk.dll (tests/windows/fake_virtdisk.c), which .ci/windows-test
loads under Wine with WINEDLLOVERRIDES=virtdisk=n.  Skipped anywhere else;
VIRTDISK_TEST_DOUBLE=1 (set by .ci/windows-test) makes a missing double a
failure."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import virtdisk
from virtdisk import (
    Access,
    DiskInUseError,
    InvalidImageError,
    NotAttachedError,
    NotSupportedError,
    ParentNotFoundError,
    StorageType,
    VirtualDiskError,
    VirtualDiskNotFoundError,
    VirtualDiskPermissionError,
    WinError,
)

MiB = 1 << 20
VHD, VHDX, ISO = 2, 3, 1
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4


def _load_double() -> Any:
    if sys.platform != "win32":
        return None
    import ctypes

    dll = ctypes.WinDLL("virtdisk.dll")
    if not hasattr(dll, "VdTestDoubleReset"):
        return None
    dll.VdTestDoubleAddImage.argtypes = [
        ctypes.c_wchar_p,
        ctypes.c_ulong,
        ctypes.c_ulong,
        ctypes.c_ulonglong,
        ctypes.c_wchar_p,
        ctypes.c_int,
    ]
    dll.VdTestDoubleAddImage.restype = ctypes.c_ulong
    return dll


DOUBLE = _load_double()
if DOUBLE is None:
    if os.environ.get("VIRTDISK_TEST_DOUBLE") == "1":
        raise RuntimeError("VIRTDISK_TEST_DOUBLE=1 but virtdisk.dll is not the test double")
    pytest.skip("needs Windows CPython with the VirtDisk test double", allow_module_level=True)


@pytest.fixture(autouse=True)
def double() -> Any:
    DOUBLE.VdTestDoubleReset()
    yield DOUBLE
    DOUBLE.VdTestDoubleReset()


def add(
    path: Path, device: int = VHDX, subtype: int = DYNAMIC, size: int = 64 * MiB, parents=(), resolved=False
):
    multi = "".join(f"{p}\0" for p in parents) + "\0" if parents else None
    code = DOUBLE.VdTestDoubleAddImage(str(path), device, subtype, size, multi, resolved)
    assert code == 0
    return path


def test_attach_physical_path_detach(tmp_path: Path) -> None:
    image = add(tmp_path / "a.vhdx")
    with virtdisk.open(image) as disk:
        assert not disk.attached
        assert disk.info.attached is False
        disk.attach()
        assert disk.attached
        assert disk.physical_path == r"\\.\PhysicalDrive1"
        assert disk.disk_number == 1
        assert disk.info.attached is True
        disk.detach()
        assert not disk.attached
        with pytest.raises(NotAttachedError):
            disk.detach()


def test_attached_is_the_physical_path_not_is_loaded(tmp_path: Path) -> None:
    """IS_LOADED says "mounted and in use": nothing is mounted here, the disk is attached."""
    with virtdisk.open(add(tmp_path / "a.vhdx")) as disk:
        disk.attach()
        is_loaded = disk._query(virtdisk._native.lib.GET_VIRTUAL_DISK_INFO_IS_LOADED, lambda i: i.IsLoaded)
        assert (is_loaded, disk.attached, disk.info.attached) == (0, True, True)


def test_detach_is_refused_while_another_handle_is_open(tmp_path: Path) -> None:
    image = add(tmp_path / "a.vhdx")
    with virtdisk.open(image) as disk:
        disk.attach(permanent=True)
        other = virtdisk.open(image)
        with pytest.raises(DiskInUseError) as raised:
            disk.detach()
        assert raised.value.winerror == WinError.ERROR_SHARING_VIOLATION
        other.close()
        disk.detach()
        assert not disk.attached


def test_detach_needs_detach_access(tmp_path: Path) -> None:
    image = add(tmp_path / "a.vhdx")
    with virtdisk.open(image, Access.ATTACH_RW | Access.GET_INFO) as disk:
        disk.attach()
        with pytest.raises(VirtualDiskPermissionError) as raised:
            disk.detach()
        assert raised.value.winerror == WinError.ERROR_ACCESS_DENIED


def test_an_attachment_without_permanent_ends_with_its_last_handle(tmp_path: Path) -> None:
    image = add(tmp_path / "a.vhdx")
    with virtdisk.open(image) as disk:
        disk.attach()
        assert [d.physical_path for d in virtdisk.attached_disks()] == [r"\\.\PhysicalDrive1"]
    assert virtdisk.attached_disks() == []
    with virtdisk.open(image) as disk:
        assert not disk.attached


def test_a_permanent_attachment_outlives_its_handles_until_detach(tmp_path: Path) -> None:
    image = add(tmp_path / "a.vhdx")
    with virtdisk.open(image) as disk:
        disk.attach(permanent=True)
    assert [d.physical_path for d in virtdisk.attached_disks()] == [r"\\.\PhysicalDrive1"]
    virtdisk.detach(image)
    assert virtdisk.attached_disks() == []
    assert DOUBLE.VdTestDoubleLiveHandles() == 0


def test_attached_disks_answering_device_paths(tmp_path: Path) -> None:
    for name in ("a.vhdx", "b.vhd"):
        with virtdisk.open(add(tmp_path / name)) as disk:
            disk.attach(permanent=True)
    listed = virtdisk.attached_disks()
    assert [(d.physical_path, d.image_path) for d in listed] == [
        (r"\\.\PhysicalDrive1", None),
        (r"\\.\PhysicalDrive2", None),
    ]


def test_attached_disks_answering_image_paths(tmp_path: Path) -> None:
    """Some Windows builds list the images: their physical paths come from
    opening them, and the handles opened for it are closed again."""
    # long names, so that the list outgrows the first buffer
    images = [add(tmp_path / f"{'x' * 150}{n}.vhdx") for n in range(5)]
    for image in images:
        with virtdisk.open(image) as disk:
            disk.attach(permanent=True)
    DOUBLE.VdTestDoubleListImagePaths(True)
    listed = virtdisk.attached_disks()
    assert [(d.physical_path, d.image_path) for d in listed] == [
        (rf"\\.\PhysicalDrive{n + 1}", image) for n, image in enumerate(images)
    ]
    assert DOUBLE.VdTestDoubleLiveHandles() == 0


def _finishes(function: Any) -> BaseException | None:
    """Runs function in a thread; what it raised, or a failure if it never returns."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            function()
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert outcome, "the call never returned: a size-retry loop does not stop"
    return outcome[0]


def test_size_retry_loops_stop_when_the_size_does_not_grow(tmp_path: Path) -> None:
    images = [add(tmp_path / f"{'x' * 150}{n}.vhdx") for n in range(5)]
    for image in images:
        with virtdisk.open(image) as disk:
            disk.attach(permanent=True)
    parents = [str(tmp_path / f"{'p' * 200}{n}.vhdx") for n in range(12)]
    child = add(tmp_path / "child.vhdx", subtype=DIFFERENCING, parents=parents)
    DOUBLE.VdTestDoubleListImagePaths(True)
    DOUBLE.VdTestDoubleStuckSizes(True)
    listing = _finishes(virtdisk.attached_disks)
    with virtdisk.open(child, no_parents=True) as disk:
        info = _finishes(lambda: disk.info)
    for error in (listing, info):
        assert isinstance(error, VirtualDiskError)
        assert error.winerror == WinError.ERROR_INSUFFICIENT_BUFFER


def test_parent_location_is_a_multi_string(tmp_path: Path) -> None:
    candidates = [str(tmp_path / "base.vhdx"), str(tmp_path / "elsewhere" / "base.vhdx")]
    # longer than the first 4096-byte buffer: the size is asked for and used
    candidates += [str(tmp_path / f"{'p' * 200}{n}.vhdx") for n in range(12)]
    child = add(tmp_path / "child.vhdx", subtype=DIFFERENCING, parents=candidates)
    with pytest.raises(ParentNotFoundError):
        virtdisk.open(child)
    with virtdisk.open(child, no_parents=True) as disk:
        info = disk.info
    assert (info.parent_resolved, info.parent_paths, info.parent_path) == (False, tuple(candidates), None)
    assert info.parent_identifier is not None


def test_create_hands_the_api_a_fully_qualified_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add(tmp_path / "base.vhdx", subtype=FIXED)
    monkeypatch.chdir(tmp_path)
    with virtdisk.create("child.vhdx", parent="base.vhdx") as child:
        info = child.info
    assert info.parent_resolved
    assert info.parent_path == str(tmp_path / "base.vhdx")


def test_info_of_an_iso_leaves_what_it_lacks_none(tmp_path: Path) -> None:
    image = add(tmp_path / "disc.iso", device=ISO, subtype=0, size=4 * MiB)
    with virtdisk.open(image) as disk:
        info = disk.info
        assert (info.storage_type, info.identifier, info.disk_type, info.virtual_disk_id) == (
            StorageType.ISO,
            None,
            None,
            None,
        )
        assert info.logical_sector_size == 2048
        disk.attach(read_only=True)
        assert disk.physical_path == r"\\.\CdRom1"
        with pytest.raises(NotSupportedError):
            _ = disk.disk_number


def test_open_errors_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(VirtualDiskNotFoundError) as missing:
        virtdisk.open(tmp_path / "missing.vhdx")
    assert missing.value.filename == str(tmp_path / "missing.vhdx")
    (tmp_path / "text.vhd").write_text("not a disk")
    with pytest.raises(InvalidImageError) as foreign:
        virtdisk.open(tmp_path / "text.vhd")
    assert foreign.value.name == "ERROR_VHD_DRIVE_FOOTER_MISSING"


# ---- SeManageVolumePrivilege --------------------------------------------------


def _set_privilege(enabled: bool) -> None:
    """Enables or disables SeManageVolumePrivilege in this process's token, and
    makes the facade forget that it saw it enabled."""
    import ctypes
    from ctypes import wintypes

    from virtdisk import _privilege

    class Privileges(ctypes.Structure):
        # TOKEN_PRIVILEGES with one entry; a LUID is two 32-bit halves (4-aligned)
        _fields_ = [
            ("count", wintypes.DWORD),
            ("luid_low", wintypes.DWORD),
            ("luid_high", wintypes.LONG),
            ("attributes", wintypes.DWORD),
        ]

    advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
    kernel32 = ctypes.WinDLL("kernel32")
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE  # (HANDLE)-1, 64 bits wide
    advapi32.OpenProcessToken.argtypes = [wintypes.HANDLE, wintypes.DWORD, ctypes.POINTER(wintypes.HANDLE)]
    token = wintypes.HANDLE()
    token_adjust_privileges_and_query = 0x28
    assert advapi32.OpenProcessToken(kernel32.GetCurrentProcess(), token_adjust_privileges_and_query, token)
    wanted = Privileges(1, 0, 0, 2 if enabled else 0)
    assert advapi32.LookupPrivilegeValueW(None, "SeManageVolumePrivilege", ctypes.byref(wanted, 4))
    pointer = ctypes.c_void_p
    advapi32.AdjustTokenPrivileges.argtypes = [
        wintypes.HANDLE,
        wintypes.BOOL,
        pointer,
        wintypes.DWORD,
        pointer,
        pointer,
    ]
    assert advapi32.AdjustTokenPrivileges(token, False, ctypes.byref(wanted), 0, None, None)
    assert ctypes.get_last_error() == 0, "the token does not hold SeManageVolumePrivilege"
    kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
    kernel32.CloseHandle(token)
    _privilege._enabled.clear()


def _privilege_state() -> int:
    from virtdisk._privilege import NativeToken

    return int(NativeToken().state())


def test_attach_enables_the_privilege(tmp_path: Path) -> None:
    _set_privilege(False)
    assert _privilege_state() == 1  # held, disabled
    with virtdisk.open(add(tmp_path / "a.vhdx")) as disk:
        disk.attach()
        assert disk.attached
    assert _privilege_state() == 2


@pytest.mark.parametrize("server", [False, True])
def test_detach_asks_for_the_privilege_only_where_refused_without_it(tmp_path: Path, server: bool) -> None:
    image = add(tmp_path / "a.vhdx")
    with virtdisk.open(image) as disk:
        disk.attach(permanent=True)
    _set_privilege(False)
    DOUBLE.VdTestDoubleServer(server)
    virtdisk.detach(image)
    assert virtdisk.attached_disks() == []
    # a client Windows detached without it; a server needed it, and got it
    assert _privilege_state() == (2 if server else 1)


# ---- long operations through kernel32's Overlapped machinery --------------
# The double issues a real pending I/O with the caller's OVERLAPPED, so Wine's
# kernel32 sets its event and Internal, and kernel32's CancelIoEx cancels it.

STATUS_CANCELLED = 0xC0000120


def _rising(seen: list[tuple[int, int]], total: int) -> None:
    """Progress that rises, passes through values between, and ends at the total."""
    assert seen[-1] == (total, total), seen[-3:]
    currents = [current for current, _ in seen]
    assert currents == sorted(currents)
    assert any(0 < current < total for current in currents), currents


def test_merge_reports_progress_up_to_the_total(tmp_path: Path) -> None:
    base = add(tmp_path / "base.vhdx", size=64 * MiB)
    child = add(
        tmp_path / "child.vhdx", subtype=DIFFERENCING, size=64 * MiB, parents=[str(base)], resolved=True
    )
    seen: list[tuple[int, int]] = []
    virtdisk.merge(child, 1, progress=lambda current, total: seen.append((current, total)))
    _rising(seen, 64 * MiB)
    with virtdisk.open(base, Access.METAOPS) as disk, pytest.raises(VirtualDiskError) as raised:
        disk.merge(1)  # not a differencing disk
    assert raised.value.winerror == WinError.ERROR_VHD_INVALID_TYPE


def test_resize_reports_progress_and_a_cancel_keeps_the_old_size(tmp_path: Path) -> None:
    image = add(tmp_path / "a.vhdx", subtype=FIXED, size=64 * MiB)
    with virtdisk.open(image, Access.METAOPS | Access.GET_INFO) as disk:
        seen: list[tuple[int, int]] = []
        disk.resize(128 * MiB, progress=lambda current, total: seen.append((current, total)))
        _rising(seen, 64 * MiB)
        assert disk.info.virtual_size == 128 * MiB
        operation = disk.begin_expand(256 * MiB)
        while operation.progress()[0] == 0 and not operation.done:
            pass
        assert operation.cancel(), "the expansion ended before it could be cancelled"
        with pytest.raises(virtdisk.OperationCancelledError):
            operation.wait()
        # kernel32 completed the caller's I/O as cancelled.
        assert operation._overlapped.Internal == STATUS_CANCELLED
        assert disk.info.virtual_size == 128 * MiB

        class Stop(Exception):
            pass

        def stop(current: int, total: int) -> None:
            raise Stop

        with pytest.raises(Stop):
            disk.resize(512 * MiB, progress=stop)  # the callback's exception cancels
        assert disk.info.virtual_size == 128 * MiB
        with pytest.raises(VirtualDiskError) as raised:
            disk.resize(32 * MiB)  # no partitions known: shrinking needs allow_unsafe
        assert raised.value.winerror == WinError.ERROR_VHD_RESIZE_WOULD_TRUNCATE_DATA
        disk.resize(32 * MiB, allow_unsafe=True)
        assert disk.info.virtual_size == 32 * MiB


def test_fixed_create_reports_progress_and_a_cancelled_one_leaves_no_image(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    with virtdisk.create(
        tmp_path / "fixed.vhdx", 32 * MiB, fixed=True, progress=lambda c, t: seen.append((c, t))
    ) as disk:
        assert disk.info.disk_type == virtdisk.DiskType.FIXED
    _rising(seen, 32 * MiB)

    class Stop(Exception):
        pass

    def stop(current: int, total: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        virtdisk.create(tmp_path / "cancelled.vhdx", 32 * MiB, fixed=True, progress=stop)
    with pytest.raises(VirtualDiskNotFoundError):
        virtdisk.open(tmp_path / "cancelled.vhdx")


def test_compact_of_a_detached_dynamic_disk_runs_with_progress(tmp_path: Path) -> None:
    from virtdisk._native import ffi, lib
    from virtdisk._operation import Operation

    def compact(disk: virtdisk.VirtualDisk) -> Operation:
        parameters = ffi.new("COMPACT_VIRTUAL_DISK_PARAMETERS *", {"Version": 1})
        handle = disk._handle
        return Operation(
            lambda: handle,
            lambda overlapped: lib.CompactVirtualDisk(handle, 0, parameters, overlapped),
            "CompactVirtualDisk",
            str(disk.path),
        )

    with virtdisk.open(add(tmp_path / "dynamic.vhdx", size=64 * MiB), Access.METAOPS) as disk:
        seen: list[tuple[int, int]] = []
        compact(disk).wait(lambda current, total: seen.append((current, total)))
        _rising(seen, 16 * MiB)  # the double's physical size: a quarter
    with virtdisk.open(add(tmp_path / "fixed.vhdx", subtype=FIXED), Access.METAOPS) as disk:
        with pytest.raises(VirtualDiskError) as raised:
            compact(disk)
        assert raised.value.winerror == WinError.ERROR_VHD_INVALID_TYPE
    with virtdisk.open(add(tmp_path / "other.vhdx")) as disk, pytest.raises(VirtualDiskPermissionError):
        compact(disk)  # no METAOPS


def test_set_parent_path_identifier_and_physical_sector_size(tmp_path: Path) -> None:
    import uuid

    moved = add(tmp_path / "moved" / "base.vhdx")
    child = add(tmp_path / "child.vhdx", subtype=DIFFERENCING, parents=[str(tmp_path / "base.vhdx")])
    with pytest.raises(ParentNotFoundError):
        virtdisk.open(child)
    with virtdisk.open(child, Access.METAOPS | Access.GET_INFO, no_parents=True) as disk:
        with pytest.raises(ParentNotFoundError):
            disk.set_parent_path(tmp_path / "nowhere.vhdx")
        disk.set_parent_path(moved)
    with virtdisk.open(child) as disk:
        assert disk.info.parent_resolved and disk.info.parent_path == str(moved)
    identifier = uuid.uuid4()
    with virtdisk.open(moved, Access.METAOPS | Access.GET_INFO) as disk:
        disk.set_identifier(identifier)
        disk.set_physical_sector_size(512)
        info = disk.info
    assert (info.identifier, info.physical_sector_size) == (identifier, 512)
    with virtdisk.open(moved) as disk, pytest.raises(VirtualDiskPermissionError):
        disk.set_identifier(identifier)  # no METAOPS: the facade says how to get it
    vhd = add(tmp_path / "a.vhd", device=VHD)
    with virtdisk.open(vhd, Access.METAOPS) as disk, pytest.raises(NotSupportedError):
        disk.set_physical_sector_size(4096)
