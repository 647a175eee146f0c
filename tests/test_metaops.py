"""SetVirtualDiskInformation, ResizeVirtualDisk and ExpandVirtualDisk, checked
against qemu-img and vhdiinfo where they can judge."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

import virtdisk
from virtdisk import Access, WinError
from virtdisk._disk import _uuid_to_guid
from virtdisk._native import ffi, lib

from .conftest import require_tool

MiB = 1 << 20
# Offline changes need METAOPS, which open() does not ask for by default.
METAOPS = Access.ALL & ~Access.CREATE


def set_info(disk: virtdisk.VirtualDisk, version: int, **fields: object) -> int:
    info = ffi.new("SET_VIRTUAL_DISK_INFO *")
    info.Version = version
    keep = []
    for name, value in fields.items():
        if isinstance(value, uuid.UUID):
            _uuid_to_guid(value, getattr(info, name))
        elif isinstance(value, str):
            text = ffi.new("WCHAR[]", value)
            keep.append(text)
            setattr(info, name, text)
        elif isinstance(value, tuple):  # ParentPathWithDepthInfo
            depth, path = value
            text = ffi.new("WCHAR[]", path)
            keep.append(text)
            info.ParentPathWithDepthInfo.ChildDepth = depth
            info.ParentPathWithDepthInfo.ParentFilePath = text
        else:
            setattr(info, name, value)
    return int(lib.SetVirtualDiskInformation(disk._handle, info))


def resize(disk: virtdisk.VirtualDisk, size: int, flags: int = 0) -> int:
    parameters = ffi.new("RESIZE_VIRTUAL_DISK_PARAMETERS *", {"Version": 1})
    parameters.Version1.NewSize = size
    return int(lib.ResizeVirtualDisk(disk._handle, flags, parameters, ffi.NULL))


def qemu_info(path: Path) -> dict:
    fmt = "vhdx" if path.suffix == ".vhdx" else "vpc"
    out = subprocess.run(
        [require_tool("qemu-img"), "info", "-f", fmt, "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def vhdiinfo(path: Path) -> str:
    return subprocess.run(
        [require_tool("vhdiinfo"), str(path)], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize("name", ["d.vhd", "f.vhd", "d.vhdx"])
def test_set_identifier_is_what_vhdiinfo_reads(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    new = uuid.uuid4()
    with virtdisk.create(path, 8 * MiB, fixed=name.startswith("f")) as disk:
        assert set_info(disk, lib.SET_VIRTUAL_DISK_INFO_IDENTIFIER, UniqueIdentifier=new) == 0
        assert disk.info.identifier == new
    with virtdisk.open(path, read_only=True) as disk:
        assert disk.info.identifier == new
    assert str(new) in vhdiinfo(path).lower()
    if path.suffix == ".vhd" and not name.startswith("f"):
        data = path.read_bytes()
        assert data[:512] == data[-512:], "both footers of a dynamic VHD carry the new id"


def test_set_needs_metaops_access_and_a_detached_disk(tmp_path: Path) -> None:
    path = tmp_path / "a.vhd"
    virtdisk.create(path, 8 * MiB).close()
    with virtdisk.open(path, Access.GET_INFO) as disk:
        assert (
            set_info(disk, lib.SET_VIRTUAL_DISK_INFO_IDENTIFIER, UniqueIdentifier=uuid.uuid4())
            == WinError.ERROR_ACCESS_DENIED
        )
    with virtdisk.open(path, Access.ALL & ~Access.CREATE) as disk, virtdisk.open(path, read_only=True):
        assert (
            set_info(disk, lib.SET_VIRTUAL_DISK_INFO_IDENTIFIER, UniqueIdentifier=uuid.uuid4())
            == WinError.ERROR_SHARING_VIOLATION
        )


@pytest.mark.loop
def test_set_is_refused_while_attached(images: Path) -> None:
    path = images / "a.vhd"
    with virtdisk.create(path, 8 * MiB, fixed=True) as disk:
        disk.attach()
        assert (
            set_info(disk, lib.SET_VIRTUAL_DISK_INFO_IDENTIFIER, UniqueIdentifier=uuid.uuid4())
            == WinError.ERROR_VHD_INVALID_STATE
        )
        assert resize(disk, 16 * MiB) == WinError.ERROR_VHD_INVALID_STATE
        disk.detach()


def test_vhdx_physical_sector_size_and_virtual_disk_id(tmp_path: Path) -> None:
    path = tmp_path / "a.vhdx"
    disk_id = uuid.uuid4()
    with virtdisk.create(path, 8 * MiB) as disk:
        assert set_info(disk, lib.SET_VIRTUAL_DISK_INFO_PHYSICAL_SECTOR_SIZE, VhdPhysicalSectorSize=4096) == 0
        assert (
            set_info(disk, lib.SET_VIRTUAL_DISK_INFO_PHYSICAL_SECTOR_SIZE, VhdPhysicalSectorSize=1024)
            == WinError.ERROR_INVALID_PARAMETER
        )
        assert set_info(disk, lib.SET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID, VirtualDiskId=disk_id) == 0
    with virtdisk.open(path, read_only=True) as disk:
        info = disk.info
    assert info.physical_sector_size == 4096 and info.virtual_disk_id == disk_id
    subprocess.run([require_tool("qemu-img"), "check", "-q", "-f", "vhdx", str(path)], check=True)


def test_vhd_has_no_virtual_disk_id_and_only_512_byte_sectors(tmp_path: Path) -> None:
    with virtdisk.create(tmp_path / "a.vhd", 8 * MiB) as disk:
        assert (
            set_info(disk, lib.SET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID, VirtualDiskId=uuid.uuid4())
            == WinError.ERROR_VHD_INVALID_TYPE
        )
        assert set_info(disk, lib.SET_VIRTUAL_DISK_INFO_PHYSICAL_SECTOR_SIZE, VhdPhysicalSectorSize=512) == 0
        assert (
            set_info(disk, lib.SET_VIRTUAL_DISK_INFO_PHYSICAL_SECTOR_SIZE, VhdPhysicalSectorSize=4096)
            == WinError.ERROR_VHD_INVALID_TYPE
        )


@pytest.mark.parametrize("suffix", [".vhd", ".vhdx"])
def test_parent_path_follows_a_moved_parent(tmp_path: Path, suffix: str) -> None:
    parent, child = tmp_path / f"parent{suffix}", tmp_path / f"child{suffix}"
    virtdisk.create(parent, 8 * MiB).close()
    virtdisk.create(child, parent=parent).close()
    moved = tmp_path / "elsewhere" / f"renamed{suffix}"
    moved.parent.mkdir()
    parent.rename(moved)
    with virtdisk.open(child, METAOPS, no_parents=True) as disk:
        assert (
            set_info(disk, lib.SET_VIRTUAL_DISK_INFO_PARENT_PATH, ParentFilePath=str(tmp_path / "nope"))
            == WinError.ERROR_VHD_PARENT_VHD_NOT_FOUND
        )
        assert set_info(disk, lib.SET_VIRTUAL_DISK_INFO_PARENT_PATH, ParentFilePath=str(moved)) == 0
        assert disk.info.parent_path == str(moved)
    with virtdisk.open(child, read_only=True) as disk:
        info = disk.info
    assert info.parent_resolved and info.parent_path == str(moved)
    if suffix == ".vhd":
        assert "renamed.vhd" in vhdiinfo(child)


def test_a_parent_that_is_another_disk_is_an_identifier_mismatch(tmp_path: Path) -> None:
    parent, child, other = tmp_path / "p.vhdx", tmp_path / "c.vhdx", tmp_path / "o.vhdx"
    virtdisk.create(parent, 8 * MiB).close()
    virtdisk.create(other, 8 * MiB).close()
    virtdisk.create(child, parent=parent).close()
    with virtdisk.open(child, METAOPS) as disk:
        assert (
            set_info(disk, lib.SET_VIRTUAL_DISK_INFO_PARENT_PATH, ParentFilePath=str(other))
            == WinError.ERROR_VHD_CHILD_PARENT_ID_MISMATCH
        )
        assert (
            set_info(disk, lib.SET_VIRTUAL_DISK_INFO_PARENT_PATH, ParentFilePath=str(child))
            == WinError.ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED
        )
    with virtdisk.open(parent, METAOPS) as disk:
        assert (
            set_info(disk, lib.SET_VIRTUAL_DISK_INFO_PARENT_PATH, ParentFilePath=str(other))
            == WinError.ERROR_VHD_INVALID_TYPE
        )


def test_parent_path_with_depth_changes_the_grandchilds_ancestor(tmp_path: Path) -> None:
    base, middle, leaf = tmp_path / "base.vhd", tmp_path / "middle.vhd", tmp_path / "leaf.vhd"
    virtdisk.create(base, 8 * MiB).close()
    virtdisk.create(middle, parent=base).close()
    virtdisk.create(leaf, parent=middle).close()
    copy = tmp_path / "copy-of-base.vhd"
    copy.write_bytes(base.read_bytes())
    with virtdisk.open(leaf, METAOPS) as disk:
        assert (
            set_info(
                disk, lib.SET_VIRTUAL_DISK_INFO_PARENT_PATH_WITH_DEPTH, ParentPathWithDepthInfo=(2, str(copy))
            )
            == 0
        )
    with virtdisk.open(middle, read_only=True) as disk:
        assert disk.info.parent_path == str(copy)


@pytest.mark.parametrize(
    ("name", "fixed"), [("d.vhd", False), ("f.vhd", True), ("d.vhdx", False), ("f.vhdx", True)]
)
def test_expand_grows_and_qemu_agrees(tmp_path: Path, name: str, fixed: bool) -> None:
    path = tmp_path / name
    with virtdisk.create(path, 8 * MiB, fixed=fixed) as disk:
        disk.expand(200 * MiB)
        assert disk.info.virtual_size == 200 * MiB
    with virtdisk.open(path, read_only=True) as disk:
        assert disk.info.virtual_size == 200 * MiB
    assert qemu_info(path)["virtual-size"] == 200 * MiB
    if path.suffix == ".vhdx":
        # vhdiinfo gives a VHD's original size (creation time, which the
        # specification calls informational and Windows keeps), so only VHDX.
        assert "(209715200 bytes)" in vhdiinfo(path)
    if path.suffix == ".vhdx":
        subprocess.run([require_tool("qemu-img"), "check", "-q", "-f", "vhdx", str(path)], check=True)


def test_grown_disk_keeps_its_data_and_reads_zeros_beyond(tmp_path: Path) -> None:
    """Data written by qemu-img, the disk grown here, the contents judged by qemu-img."""
    qemu_img = require_tool("qemu-img")
    raw = tmp_path / "data.raw"
    raw.write_bytes(os.urandom(5 * MiB))
    for fmt, name, options in (("vpc", "a.vhd", "subformat=dynamic,force_size=on"), ("vhdx", "a.vhdx", "")):
        path = tmp_path / name
        subprocess.run(
            [
                qemu_img,
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                fmt,
                "-o",
                options or "subformat=dynamic",
                str(raw),
                str(path),
            ],
            check=True,
        )
        with virtdisk.open(path, METAOPS) as disk:
            disk.resize(40 * MiB)
        expected = tmp_path / "expected.raw"
        expected.write_bytes(raw.read_bytes() + bytes(35 * MiB))
        subprocess.run(
            [qemu_img, "compare", "-q", "-f", fmt, "-F", "raw", str(path), str(expected)], check=True
        )


def test_vhdx_shrinks_to_the_smallest_safe_size_and_no_further(tmp_path: Path) -> None:
    path = tmp_path / "a.vhdx"
    virtdisk.create(path, 64 * MiB).close()
    with path.open("r+b"):
        pass
    raw = tmp_path / "table.raw"
    raw.write_bytes(b"")
    os.truncate(raw, 64 * MiB)
    subprocess.run(
        [require_tool("sfdisk"), "-q", "--no-reread", "--no-tell-kernel", str(raw)],
        input="label: dos\nstart=2048, size=20480\n",
        text=True,
        check=True,
        capture_output=True,
    )
    with raw.open("r+b") as f:
        f.seek(2048 * 512)
        f.write(os.urandom(20480 * 512))
    path.unlink()
    subprocess.run(
        [require_tool("qemu-img"), "convert", "-q", "-f", "raw", "-O", "vhdx", str(raw), str(path)],
        check=True,
    )
    end = (2048 + 20480) * 512
    with virtdisk.open(path, METAOPS) as disk:
        with pytest.raises(virtdisk.VirtualDiskError) as raised:
            disk.resize(end - MiB)
        assert raised.value.winerror == WinError.ERROR_VHD_RESIZE_WOULD_TRUNCATE_DATA
        assert resize(disk, 0, lib.RESIZE_VIRTUAL_DISK_FLAG_RESIZE_TO_SMALLEST_SAFE_VIRTUAL_SIZE) == 0
        assert disk.info.virtual_size == end
        assert (
            resize(disk, 0, lib.RESIZE_VIRTUAL_DISK_FLAG_RESIZE_TO_SMALLEST_SAFE_VIRTUAL_SIZE)
            == WinError.ERROR_VHD_ALREADY_AT_OR_BELOW_MINIMUM_VIRTUAL_SIZE
        )
    assert qemu_info(path)["virtual-size"] == end
    truncated = tmp_path / "truncated.raw"
    truncated.write_bytes(raw.read_bytes()[:end])
    subprocess.run(
        [require_tool("qemu-img"), "compare", "-q", "-f", "vhdx", "-F", "raw", str(path), str(truncated)],
        check=True,
    )
    # Growing again brings back zeros, not the blocks cut off.
    with virtdisk.open(path, METAOPS) as disk:
        disk.resize(64 * MiB)
    truncated.write_bytes(raw.read_bytes()[:end] + bytes(64 * MiB - end))
    subprocess.run(
        [require_tool("qemu-img"), "compare", "-q", "-f", "vhdx", "-F", "raw", str(path), str(truncated)],
        check=True,
    )


def test_shrinking_without_a_table_needs_allow_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "a.vhdx"
    with virtdisk.create(path, 64 * MiB) as disk:
        assert resize(disk, 32 * MiB) == WinError.ERROR_VHD_RESIZE_WOULD_TRUNCATE_DATA
        assert (
            resize(disk, 0, lib.RESIZE_VIRTUAL_DISK_FLAG_RESIZE_TO_SMALLEST_SAFE_VIRTUAL_SIZE)
            == WinError.ERROR_VHD_COULD_NOT_COMPUTE_MINIMUM_VIRTUAL_SIZE
        )
        disk.resize(32 * MiB, allow_unsafe=True)
        assert disk.info.virtual_size == 32 * MiB
    assert qemu_info(path)["virtual-size"] == 32 * MiB


def test_resize_and_expand_refuse_what_windows_refuses(tmp_path: Path) -> None:
    with virtdisk.create(tmp_path / "a.vhd", 16 * MiB) as disk:
        assert (
            resize(disk, 8 * MiB, lib.RESIZE_VIRTUAL_DISK_FLAG_ALLOW_UNSAFE_VIRTUAL_SIZE)
            == WinError.ERROR_VHD_INVALID_TYPE
        )  # VHD cannot shrink
        assert resize(disk, 0) == WinError.ERROR_INVALID_PARAMETER
        assert resize(disk, 16 * MiB + 100) == WinError.ERROR_INVALID_PARAMETER
        with pytest.raises(virtdisk.VirtualDiskError) as raised:
            disk.expand(8 * MiB)
        assert raised.value.winerror == WinError.ERROR_INVALID_PARAMETER
    parent = tmp_path / "a.vhd"
    with (
        virtdisk.create(tmp_path / "child.vhd", parent=parent) as disk,
        pytest.raises(virtdisk.NotSupportedError),
    ):
        disk.expand(32 * MiB)
