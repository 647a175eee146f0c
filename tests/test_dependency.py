"""GetStorageDependencyInformation: the chain behind a virtual disk handle or an
attached loop device, versions 1 and 2, buffer sizing, and what is no
virtual disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import virtdisk
from virtdisk import WinError
from virtdisk._native import ffi, lib

MiB = 1 << 20


def dependency(handle: object, version: int, size: int = 4096, flags: int = 0) -> tuple[int, int, object]:
    buffer = ffi.new("char[]", size)
    info = ffi.cast("STORAGE_DEPENDENCY_INFO *", buffer)
    info.Version = version
    used = ffi.new("ULONG *")
    code = lib.GetStorageDependencyInformation(handle, flags, size, info, used)
    dependency.keep = buffer  # type: ignore[attr-defined]
    return int(code), int(used[0]), info


def text(pointer: object) -> str:
    return "" if pointer == ffi.NULL else str(ffi.string(pointer))


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    base, middle, leaf = tmp_path / "base.vhdx", tmp_path / "middle.vhdx", tmp_path / "leaf.vhdx"
    virtdisk.create(base, 8 * MiB, fixed=True).close()
    virtdisk.create(middle, parent=base).close()
    virtdisk.create(leaf, parent=middle).close()
    return base, middle, leaf


def test_version_2_lists_the_chain_with_strings_in_the_callers_buffer(chain) -> None:
    base, middle, leaf = chain
    with virtdisk.open(leaf, read_only=True) as disk:
        code, used, info = dependency(disk._handle, 2, flags=lib.GET_STORAGE_DEPENDENCY_FLAG_DISK_HANDLE)
        assert code == 0 and info.NumberEntries == 3
        start = int(ffi.cast("uintptr_t", info))
        entries = ffi.cast("STORAGE_DEPENDENCY_INFO_TYPE_2 *", info.Version2Entries)  # [1] in the cdef
        for level, (entry, path) in enumerate(
            zip([entries[0], entries[1], entries[2]], [leaf, middle, base]), 1
        ):
            assert entry.AncestorLevel == level
            assert entry.VirtualStorageType.DeviceId == lib.VIRTUAL_STORAGE_TYPE_DEVICE_VHDX
            host = text(entry.HostVolumeName)
            assert os.path.join(host, text(entry.DependentVolumeRelativePath)) == str(path)
            for pointer in (entry.HostVolumeName, entry.DependentVolumeRelativePath):
                assert start < int(ffi.cast("uintptr_t", pointer)) < start + used
        assert not entries[0].DependencyTypeFlags & lib.DEPENDENT_DISK_FLAG_PARENT
        assert entries[1].DependencyTypeFlags & lib.DEPENDENT_DISK_FLAG_PARENT
        assert entries[2].DependencyTypeFlags & lib.DEPENDENT_DISK_FLAG_FULLY_ALLOCATED
        assert text(entries[0].DependencyDeviceName) == ""  # not attached


def test_version_1_and_a_too_small_buffer(chain) -> None:
    _, _, leaf = chain
    with virtdisk.open(leaf, read_only=True) as disk:
        code, used, info = dependency(disk._handle, 1)
        assert code == 0 and info.NumberEntries == 3 and used == 8 + 3 * 28
        code, needed, _ = dependency(disk._handle, 2, size=64)
        assert code == WinError.ERROR_INSUFFICIENT_BUFFER and needed > 8 + 3 * 64
        code, used, info = dependency(disk._handle, 2, size=needed)
        assert code == 0 and used == needed
        assert dependency(disk._handle, 3)[0] == WinError.ERROR_INVALID_PARAMETER
        assert dependency(disk._handle, 2, size=4)[0] == WinError.ERROR_INVALID_PARAMETER


def test_a_file_that_is_no_virtual_disk_says_so(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        code, used, _ = dependency(
            ffi.cast("HANDLE", fd), 2, flags=lib.GET_STORAGE_DEPENDENCY_FLAG_HOST_VOLUMES
        )
    finally:
        os.close(fd)
    assert code == WinError.ERROR_VIRTDISK_NOT_VIRTUAL_DISK and used == 0


@pytest.mark.loop
def test_an_attached_disk_answers_through_its_device(images: Path) -> None:
    path = images / "fixed.vhd"
    with virtdisk.create(path, 8 * MiB, fixed=True) as disk:
        disk.attach(read_only=True)
        try:
            device = disk.physical_path
            code, _, info = dependency(disk._handle, 2)
            assert code == 0
            entry = info.Version2Entries[0]
            assert text(entry.DependencyDeviceName) == device
            assert entry.DependencyTypeFlags & lib.DEPENDENT_DISK_FLAG_READ_ONLY
            assert not entry.DependencyTypeFlags & lib.DEPENDENT_DISK_FLAG_PERMANENT_LIFETIME
            fd = os.open(device, os.O_RDONLY)
            try:
                code, _, info = dependency(
                    ffi.cast("HANDLE", fd), 2, flags=lib.GET_STORAGE_DEPENDENCY_FLAG_DISK_HANDLE
                )
            finally:
                os.close(fd)
            assert code == 0 and info.NumberEntries == 1
            entry = info.Version2Entries[0]
            host = text(entry.HostVolumeName)
            assert os.path.join(host, text(entry.DependentVolumeRelativePath)) == str(path.resolve())
        finally:
            disk.detach()


@pytest.mark.loop
def test_a_permanent_attachment_is_flagged(images: Path) -> None:
    path = images / "fixed.vhd"
    with virtdisk.create(path, 8 * MiB, fixed=True) as disk:
        disk.attach(permanent=True)
    try:
        with virtdisk.open(path, read_only=True) as disk:
            code, _, info = dependency(disk._handle, 1)
            assert code == 0
            assert info.Version1Entries[0].DependencyTypeFlags & lib.DEPENDENT_DISK_FLAG_PERMANENT_LIFETIME
    finally:
        virtdisk.detach(path)
