"""The real VirtDisk, on an elevated Windows (the GitHub-hosted runners).

Only the raw binding (``virtdisk._native``'s ffi and lib) is used, so these
tests check the declarations and Microsoft's documented behaviour, not the
facade.  Each expectation cites the documentation (Microsoft Learn, VirtDisk
function pages); where Microsoft documents that a call fails but not with
which code, the test asserts only that it fails.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtdisk._native import ffi, lib
from virtdisk._privilege import ensure_manage_volume_privilege


def _needs_windows() -> None:
    if sys.platform != "win32":
        pytest.skip("needs Windows' VirtDisk.dll and an elevated token")


ERROR_SUCCESS = 0
ERROR_INVALID_PARAMETER = 87

DISK_SIZE = 64 * 1024 * 1024
# What GetVirtualDiskPhysicalPath returns for a disk: "\\.\PhysicalDriveN";
# an attached ISO is a CD-ROM device.
PHYSICAL_DRIVE = re.compile(r"\\\\\.\\PhysicalDrive(\d+)")
CDROM = re.compile(r"\\\\\.\\CdRom(\d+)")

ACCESS_ATTACH_RW_DETACH_INFO = (
    lib.VIRTUAL_DISK_ACCESS_ATTACH_RW | lib.VIRTUAL_DISK_ACCESS_DETACH | lib.VIRTUAL_DISK_ACCESS_GET_INFO
)


def storage_type(device: int) -> Any:
    vst = ffi.new("VIRTUAL_STORAGE_TYPE *")
    vst.DeviceId = device
    vst.VendorId = lib.VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT
    return vst


def create(path: Path, device: int) -> None:
    """A dynamically expanding disk; CREATE v2 requires access mask NONE."""
    parameters = ffi.new("CREATE_VIRTUAL_DISK_PARAMETERS *")
    parameters.Version = lib.CREATE_VIRTUAL_DISK_VERSION_2
    parameters.Version2.MaximumSize = DISK_SIZE
    handle = ffi.new("HANDLE *")
    status = lib.CreateVirtualDisk(
        storage_type(device),
        str(path),
        lib.VIRTUAL_DISK_ACCESS_NONE,
        ffi.NULL,
        lib.CREATE_VIRTUAL_DISK_FLAG_NONE,
        0,
        parameters,
        ffi.NULL,
        handle,
    )
    assert status == ERROR_SUCCESS, f"CreateVirtualDisk: {status:#x}"
    assert lib.CloseHandle(handle[0])


class Disk:
    """An open handle; closed by the fixture if the test has not."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def close(self) -> None:
        if self.handle is not None:
            assert lib.CloseHandle(self.handle)
            self.handle = None


@pytest.fixture
def opened() -> Iterator[list[Disk]]:
    _needs_windows()
    disks: list[Disk] = []
    yield disks
    for disk in disks:
        disk.close()


def open_disk(
    opened: list[Disk], path: Path, device: int, access: int, rw_depth: int = 1
) -> tuple[int, Disk | None]:
    """OpenVirtualDisk with v1 parameters: access in the mask, RWDepth 0 for
    read-only use, 1 (the default) otherwise."""
    parameters = ffi.new("OPEN_VIRTUAL_DISK_PARAMETERS *")
    parameters.Version = lib.OPEN_VIRTUAL_DISK_VERSION_1
    parameters.Version1.RWDepth = rw_depth
    handle = ffi.new("HANDLE *")
    status = lib.OpenVirtualDisk(
        storage_type(device), str(path), access, lib.OPEN_VIRTUAL_DISK_FLAG_NONE, parameters, handle
    )
    if status != ERROR_SUCCESS:
        return status, None
    disk = Disk(handle[0])
    opened.append(disk)
    return status, disk


def must_open(opened: list[Disk], path: Path, device: int, access: int, rw_depth: int = 1) -> Disk:
    status, disk = open_disk(opened, path, device, access, rw_depth)
    assert status == ERROR_SUCCESS, f"OpenVirtualDisk: {status:#x}"
    assert disk is not None
    return disk


def attach(disk: Disk, flags: int) -> int:
    """AttachVirtualDisk with v1 parameters and no drive letters (the disks
    are blank; nothing should be mounted)."""
    ensure_manage_volume_privilege()
    parameters = ffi.new("ATTACH_VIRTUAL_DISK_PARAMETERS *")
    parameters.Version = lib.ATTACH_VIRTUAL_DISK_VERSION_1
    return int(
        lib.AttachVirtualDisk(
            disk.handle,
            ffi.NULL,
            flags | lib.ATTACH_VIRTUAL_DISK_FLAG_NO_DRIVE_LETTER,
            0,
            parameters,
            ffi.NULL,
        )
    )


def detach(disk: Disk, flags: int = 0) -> int:
    ensure_manage_volume_privilege()
    return int(lib.DetachVirtualDisk(disk.handle, flags, 0))


def physical_path(disk: Disk) -> tuple[int, str]:
    size = ffi.new("ULONG *", 260 * 2)  # bytes, not characters
    buffer = ffi.new("WCHAR[]", 260)
    status = lib.GetVirtualDiskPhysicalPath(disk.handle, size, buffer)
    return int(status), ffi.string(buffer) if status == ERROR_SUCCESS else ""


def read_device(path: str, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_BINARY)
    try:
        return os.read(fd, length)
    finally:
        os.close(fd)


@pytest.fixture(params=["vhdx", "vhd"])
def image(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, int]:
    _needs_windows()
    device = {
        "vhdx": lib.VIRTUAL_STORAGE_TYPE_DEVICE_VHDX,
        "vhd": lib.VIRTUAL_STORAGE_TYPE_DEVICE_VHD,
    }[request.param]
    path = tmp_path / f"disk.{request.param}"
    create(path, device)
    return path, device


def test_create_makes_the_image_file(image: tuple[Path, int]) -> None:
    path, _ = image
    assert path.stat().st_size > 0


def test_attach_read_write_shows_a_physical_drive_until_detached(
    image: tuple[Path, int], opened: list[Disk]
) -> None:
    path, device = image
    disk = must_open(opened, path, device, ACCESS_ATTACH_RW_DETACH_INFO)
    assert attach(disk, lib.ATTACH_VIRTUAL_DISK_FLAG_NONE) == ERROR_SUCCESS
    status, drive = physical_path(disk)
    assert status == ERROR_SUCCESS
    assert PHYSICAL_DRIVE.fullmatch(drive), drive
    assert detach(disk) == ERROR_SUCCESS
    # GetVirtualDiskPhysicalPath succeeds only while the disk is attached.
    assert physical_path(disk)[0] != ERROR_SUCCESS


def test_attach_read_only(image: tuple[Path, int], opened: list[Disk]) -> None:
    path, device = image
    disk = must_open(opened, path, device, lib.VIRTUAL_DISK_ACCESS_READ, rw_depth=0)
    assert attach(disk, lib.ATTACH_VIRTUAL_DISK_FLAG_READ_ONLY) == ERROR_SUCCESS
    status, drive = physical_path(disk)
    assert status == ERROR_SUCCESS
    assert PHYSICAL_DRIVE.fullmatch(drive), drive
    assert detach(disk) == ERROR_SUCCESS


def test_detach_with_flags_is_an_invalid_parameter(image: tuple[Path, int], opened: list[Disk]) -> None:
    """DetachVirtualDisk: Flags must be DETACH_VIRTUAL_DISK_FLAG_NONE, else
    ERROR_INVALID_PARAMETER."""
    path, device = image
    disk = must_open(opened, path, device, ACCESS_ATTACH_RW_DETACH_INFO)
    assert attach(disk, lib.ATTACH_VIRTUAL_DISK_FLAG_NONE) == ERROR_SUCCESS
    assert detach(disk, flags=1) == ERROR_INVALID_PARAMETER
    assert physical_path(disk)[0] == ERROR_SUCCESS  # still attached
    assert detach(disk) == ERROR_SUCCESS


def test_detach_needs_a_handle_opened_with_detach_access(image: tuple[Path, int], opened: list[Disk]) -> None:
    """The handle must have been opened with VIRTUAL_DISK_ACCESS_DETACH.  (The
    code is not documented.)  Without PERMANENT_LIFETIME, closing the last
    handle detaches the disk."""
    path, device = image
    access = lib.VIRTUAL_DISK_ACCESS_ATTACH_RW | lib.VIRTUAL_DISK_ACCESS_GET_INFO
    disk = must_open(opened, path, device, access)
    assert attach(disk, lib.ATTACH_VIRTUAL_DISK_FLAG_NONE) == ERROR_SUCCESS
    assert detach(disk) != ERROR_SUCCESS
    status, drive = physical_path(disk)
    assert status == ERROR_SUCCESS  # the failed detach left it attached
    assert PHYSICAL_DRIVE.fullmatch(drive), drive
    disk.close()
    assert not _drive_is_attached(opened, path, device)


def _drive_is_attached(opened: list[Disk], path: Path, device: int) -> bool:
    disk = must_open(opened, path, device, lib.VIRTUAL_DISK_ACCESS_GET_INFO)
    try:
        return physical_path(disk)[0] == ERROR_SUCCESS
    finally:
        disk.close()


def test_closing_the_last_handle_detaches_a_disk_attached_without_permanent_lifetime(
    image: tuple[Path, int], opened: list[Disk]
) -> None:
    path, device = image
    disk = must_open(opened, path, device, ACCESS_ATTACH_RW_DETACH_INFO)
    assert attach(disk, lib.ATTACH_VIRTUAL_DISK_FLAG_NONE) == ERROR_SUCCESS
    disk.close()
    assert not _drive_is_attached(opened, path, device)


def test_detach_of_a_disk_that_is_not_attached_fails(image: tuple[Path, int], opened: list[Disk]) -> None:
    """DetachVirtualDisk fails if the image is not attached (code undocumented)."""
    path, device = image
    disk = must_open(opened, path, device, ACCESS_ATTACH_RW_DETACH_INFO)
    assert detach(disk) != ERROR_SUCCESS


ATTACH_PERMANENTLY = textwrap.dedent(
    """
    import sys
    from virtdisk._native import ffi, lib
    from virtdisk._privilege import ensure_manage_volume_privilege

    ensure_manage_volume_privilege()
    vst = ffi.new("VIRTUAL_STORAGE_TYPE *")
    vst.DeviceId = int(sys.argv[2])
    vst.VendorId = lib.VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT
    op = ffi.new("OPEN_VIRTUAL_DISK_PARAMETERS *")
    op.Version = lib.OPEN_VIRTUAL_DISK_VERSION_1
    op.Version1.RWDepth = 1
    handle = ffi.new("HANDLE *")
    access = (lib.VIRTUAL_DISK_ACCESS_ATTACH_RW | lib.VIRTUAL_DISK_ACCESS_DETACH
              | lib.VIRTUAL_DISK_ACCESS_GET_INFO)
    status = lib.OpenVirtualDisk(vst, sys.argv[1], access, 0, op, handle)
    assert status == 0, hex(status)
    ap = ffi.new("ATTACH_VIRTUAL_DISK_PARAMETERS *")
    ap.Version = lib.ATTACH_VIRTUAL_DISK_VERSION_1
    flags = (lib.ATTACH_VIRTUAL_DISK_FLAG_PERMANENT_LIFETIME
             | lib.ATTACH_VIRTUAL_DISK_FLAG_NO_DRIVE_LETTER)
    status = lib.AttachVirtualDisk(handle[0], ffi.NULL, flags, 0, ap, ffi.NULL)
    assert status == 0, hex(status)
    size = ffi.new("ULONG *", 520)
    buffer = ffi.new("WCHAR[]", 260)
    status = lib.GetVirtualDiskPhysicalPath(handle[0], size, buffer)
    assert status == 0, hex(status)
    print(ffi.string(buffer))
    # exits without detaching: the handle closes with the process
    """
)


def test_permanent_lifetime_outlives_the_attaching_process(
    image: tuple[Path, int], opened: list[Disk]
) -> None:
    """With PERMANENT_LIFETIME the disk stays attached after every handle has
    closed, until DetachVirtualDisk on a handle opened with DETACH access."""
    path, device = image
    result = subprocess.run(
        [sys.executable, "-c", ATTACH_PERMANENTLY, str(path), str(device)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    drive = result.stdout.strip()
    assert PHYSICAL_DRIVE.fullmatch(drive), drive
    # OpenVirtualDisk on a permanently attached disk: the mask must include
    # VIRTUAL_DISK_ACCESS_DETACH.
    disk = must_open(opened, path, device, lib.VIRTUAL_DISK_ACCESS_DETACH | lib.VIRTUAL_DISK_ACCESS_GET_INFO)
    try:
        assert physical_path(disk) == (ERROR_SUCCESS, drive)
    finally:
        assert detach(disk) == ERROR_SUCCESS
    assert physical_path(disk)[0] != ERROR_SUCCESS


# ---- ISO ------------------------------------------------------------------

SECTOR = 2048


def _both16(value: int) -> bytes:
    return struct.pack("<H", value) + struct.pack(">H", value)


def _both32(value: int) -> bytes:
    return struct.pack("<I", value) + struct.pack(">I", value)


def _directory_record(extent: int, name: bytes) -> bytes:
    record = (
        bytes([34, 0])
        + _both32(extent)
        + _both32(SECTOR)
        + bytes([124, 1, 1, 0, 0, 0, 0])  # recorded 2024-01-01 00:00:00 UTC
        + bytes([0x02, 0, 0])  # a directory; not interleaved
        + _both16(1)
        + bytes([len(name)])
        + name
    )
    assert len(record) == 34
    return record


def minimal_iso9660(volume_id: str = "VIRTDISK_TEST") -> bytes:
    """An empty ISO 9660 (ECMA-119) volume: 32 sectors of 2048 bytes (Windows
    wants a multiple of 2048 and more than 34,816 bytes), a primary volume
    descriptor, a terminator, the two path tables and the root directory."""
    root, l_table, m_table, total = 20, 18, 19, 32
    blank_date = b"0" * 16 + b"\x00"
    pvd = (
        b"\x01CD001\x01\x00"
        + b" " * 32  # system identifier
        + volume_id.ljust(32).encode("ascii")
        + bytes(8)
        + _both32(total)
        + bytes(32)
        + _both16(1)  # volume set size
        + _both16(1)  # volume sequence number
        + _both16(SECTOR)
        + _both32(10)  # path table size
        + struct.pack("<I", l_table)
        + bytes(4)
        + struct.pack(">I", m_table)
        + bytes(4)
        + _directory_record(root, b"\x00")
        + b" " * (128 * 4 + 37 * 3)  # set, publisher, preparer, application, file ids
        + blank_date * 4
        + b"\x01\x00"  # file structure version
    )
    assert len(pvd) == 883
    pvd = pvd.ljust(SECTOR, b"\x00")
    terminator = b"\xffCD001\x01".ljust(SECTOR, b"\x00")
    l_path = bytes([1, 0]) + struct.pack("<I", root) + struct.pack("<H", 1) + b"\x00\x00"
    m_path = bytes([1, 0]) + struct.pack(">I", root) + struct.pack(">H", 1) + b"\x00\x00"
    directory = _directory_record(root, b"\x00") + _directory_record(root, b"\x01")
    image = (
        bytes(16 * SECTOR)
        + pvd
        + terminator
        + l_path.ljust(SECTOR, b"\x00")
        + m_path.ljust(SECTOR, b"\x00")
        + directory.ljust(SECTOR, b"\x00")
    )
    return image.ljust(total * SECTOR, b"\x00")


def test_the_minimal_iso_is_well_formed() -> None:
    """Runs everywhere: the image the ISO test attaches."""
    image = minimal_iso9660()
    assert len(image) % SECTOR == 0 and len(image) > 34816
    assert image[16 * SECTOR : 16 * SECTOR + 6] == b"\x01CD001"
    assert image[17 * SECTOR] == 0xFF


def test_iso_attaches_read_only_as_a_cdrom(tmp_path: Path, opened: list[Disk]) -> None:
    """ISO (Windows 8 and later): read access only, and AttachVirtualDisk
    needs ATTACH_VIRTUAL_DISK_FLAG_READ_ONLY."""
    path = tmp_path / "tiny.iso"
    path.write_bytes(minimal_iso9660())
    device = lib.VIRTUAL_STORAGE_TYPE_DEVICE_ISO
    disk = must_open(opened, path, device, lib.VIRTUAL_DISK_ACCESS_READ, rw_depth=0)
    assert attach(disk, lib.ATTACH_VIRTUAL_DISK_FLAG_READ_ONLY) == ERROR_SUCCESS
    try:
        status, drive = physical_path(disk)
        assert status == ERROR_SUCCESS
        assert CDROM.fullmatch(drive) or PHYSICAL_DRIVE.fullmatch(drive), drive
        sectors = read_device(drive, 17 * SECTOR)
        assert sectors[16 * SECTOR : 16 * SECTOR + 6] == b"\x01CD001"
    finally:
        assert detach(disk) == ERROR_SUCCESS
