"""Win32 codes become OSError subclasses carrying code, errno, function, path, message."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import pytest

import virtdisk
from virtdisk import WinError
from virtdisk._errors import VirtualDiskError, error_for, system_message
from virtdisk._native import ffi, lib

MiB = 1 << 20


def test_python_codes_match_the_native_table() -> None:
    native = {}
    for index in range(lib.vd_error_table_size()):
        code = lib.vd_error_table_code(index)
        native[ffi.string(lib.vd_error_name(code)).decode()] = code
    for member in WinError:
        assert native[member.name] == member.value, member.name


@pytest.mark.parametrize(
    ("code", "cls", "builtin", "errno_value"),
    [
        (WinError.ERROR_FILE_NOT_FOUND, virtdisk.VirtualDiskNotFoundError, FileNotFoundError, errno.ENOENT),
        (WinError.ERROR_ACCESS_DENIED, virtdisk.VirtualDiskPermissionError, PermissionError, errno.EACCES),
        (
            WinError.ERROR_PRIVILEGE_NOT_HELD,
            virtdisk.VirtualDiskPermissionError,
            PermissionError,
            errno.EPERM,
        ),
        (WinError.ERROR_FILE_EXISTS, virtdisk.VirtualDiskExistsError, FileExistsError, errno.EEXIST),
        (WinError.ERROR_NOT_READY, virtdisk.NotAttachedError, OSError, errno.ENXIO),
        (WinError.ERROR_DEVICE_IN_USE, virtdisk.DiskInUseError, OSError, errno.EBUSY),
        (WinError.ERROR_VHD_DRIVE_FOOTER_CORRUPT, virtdisk.InvalidImageError, OSError, errno.EINVAL),
        (
            WinError.ERROR_VHD_PARENT_VHD_NOT_FOUND,
            virtdisk.ParentNotFoundError,
            FileNotFoundError,
            errno.ENOENT,
        ),
        (WinError.ERROR_NOT_SUPPORTED, virtdisk.NotSupportedError, OSError, errno.EOPNOTSUPP),
        (WinError.ERROR_VHD_INVALID_STATE, virtdisk.InvalidStateError, OSError, errno.EBUSY),
    ],
)
def test_codes_map_to_classes_and_errno(code, cls, builtin, errno_value) -> None:
    error = error_for(code, "OpenVirtualDisk", "/x.vhd")
    assert type(error) is cls
    assert isinstance(error, builtin) and isinstance(error, VirtualDiskError)
    assert error.errno == errno_value
    assert error.winerror == code
    assert error.function == "OpenVirtualDisk"
    assert error.filename == "/x.vhd"
    assert error.strerror == system_message(code) and error.strerror


def test_vhd_codes_keep_their_unsigned_value_and_name() -> None:
    error = error_for(-1069940715, "OpenVirtualDisk")  # 0xC03A0015 as a signed int32
    assert error.winerror == 0xC03A0015
    assert error.name == "ERROR_VIRTDISK_NOT_VIRTUAL_DISK"
    assert system_message(0xC03A0015) == "The specified disk is not a virtual disk."


def test_an_unknown_code_still_raises_with_a_message() -> None:
    error = error_for(0x12345678, "AttachVirtualDisk")
    assert type(error) is VirtualDiskError
    assert error.errno == errno.EIO
    assert "0x12345678" in str(error)


def test_errors_survive_pickling() -> None:
    error = error_for(WinError.ERROR_NOT_READY, "DetachVirtualDisk", "/a.vhd")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert (copy.winerror, copy.function, copy.filename) == (error.winerror, error.function, error.filename)


def test_a_missing_image_is_file_not_found_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.vhd"
    with pytest.raises(FileNotFoundError) as raised:
        virtdisk.open(path)
    error = raised.value
    assert isinstance(error, virtdisk.VirtualDiskError)
    assert error.winerror == WinError.ERROR_FILE_NOT_FOUND
    assert error.filename == str(path)
    assert str(path) in str(error) and "OpenVirtualDisk" in str(error)


def test_creating_over_an_existing_file_is_file_exists_and_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "precious.vhd"
    path.write_bytes(b"do not overwrite")
    with pytest.raises(FileExistsError) as raised:
        virtdisk.create(path, 4 * MiB)
    assert raised.value.winerror == WinError.ERROR_FILE_EXISTS
    assert path.read_bytes() == b"do not overwrite"


def test_a_file_that_is_no_image_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"just some text\n" * 1000)
    with pytest.raises(virtdisk.VirtualDiskError) as raised:
        virtdisk.open(path)
    assert raised.value.winerror == WinError.ERROR_VIRTDISK_PROVIDER_NOT_FOUND
    assert "not a VHD, VHDX or ISO" in raised.value.detail


def test_a_corrupt_footer_checksum_is_an_invalid_image_naming_the_footer(tmp_path: Path) -> None:
    path = tmp_path / "broken.vhd"
    virtdisk.create(path, 4 * MiB, fixed=True).close()
    data = bytearray(path.read_bytes())
    data[-512 + 48] ^= 0xFF  # current size, covered by the checksum
    path.write_bytes(data)
    with pytest.raises(virtdisk.InvalidImageError) as raised:
        virtdisk.open(path)
    assert raised.value.winerror == WinError.ERROR_VHD_DRIVE_FOOTER_CHECKSUM_MISMATCH
    assert "footer" in raised.value.detail


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"size": 1 * MiB}, "3 MiB"),
        ({"size": 4 * MiB + 100}, "multiple"),
        ({"size": 4 * MiB, "block_size": 12345}, "block size"),
        ({"size": 4 * MiB, "sector_size": 4096}, "sector size"),
    ],
)
def test_bad_create_parameters_are_invalid_parameter_and_create_nothing(
    tmp_path: Path, kwargs, needle
) -> None:
    path = tmp_path / "bad.vhd"
    with pytest.raises(virtdisk.VirtualDiskError) as raised:
        virtdisk.create(path, **kwargs)
    assert raised.value.winerror == WinError.ERROR_INVALID_PARAMETER
    assert needle in raised.value.detail
    assert not path.exists()
