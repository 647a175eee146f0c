"""GetVirtualDiskInformation beyond size and identity: the minimum safe size from
the partition table, fragmentation, change tracking, the parent's time stamp,
sector sizes of the host disk; and the facade's DiskInfo and ``info --json``."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import virtdisk
from virtdisk import WinError
from virtdisk._native import ffi, lib

from .conftest import make_image, require_tool

MiB = 1 << 20
VHD_EPOCH = 946684800


def raw_info(disk: virtdisk.VirtualDisk, version: int, size: int = 64) -> tuple[int, object]:
    """(code, GET_VIRTUAL_DISK_INFO view) straight from the native call."""
    buffer = ffi.new("char[]", size)
    info = ffi.cast("GET_VIRTUAL_DISK_INFO *", buffer)
    info.Version = version
    info_size = ffi.new("ULONG *", size)
    used = ffi.new("ULONG *")
    code = lib.GetVirtualDiskInformation(disk._handle, info_size, info, used)
    raw_info.keep = buffer  # type: ignore[attr-defined]
    return code, info


def write_mbr(path: Path, partitions: list[tuple[int, int, int]]) -> None:
    """An MBR at offset 0 of a file whose data starts at 0 (raw, fixed VHD)."""
    sector = bytearray(512)
    for i, (kind, start, count) in enumerate(partitions):
        struct.pack_into("<B3xB3xII", sector, 446 + 16 * i, 0, kind, start, count)
    sector[510:512] = b"\x55\xaa"
    with path.open("r+b") as f:
        f.write(sector)


def sfdisk(path: Path, script: str) -> None:
    tool = require_tool("sfdisk")
    subprocess.run(
        [tool, "-q", "--no-reread", "--no-tell-kernel", str(path)],
        input=script,
        text=True,
        check=True,
        capture_output=True,
    )


def qemu_convert(raw: Path, target: Path, fmt: str, options: str = "") -> None:
    qemu_img = require_tool("qemu-img")
    command = [qemu_img, "convert", "-q", "-f", "raw", "-O", fmt]
    if options:
        command += ["-o", options]
    subprocess.run([*command, str(raw), str(target)], check=True)


def test_without_a_partition_table_the_smallest_safe_size_is_the_size(tmp_path: Path) -> None:
    with virtdisk.create(tmp_path / "blank.vhdx", 64 * MiB) as disk:
        assert disk.info.smallest_safe_size == 64 * MiB


def test_mbr_smallest_safe_size_is_the_end_of_the_last_partition(tmp_path: Path) -> None:
    path = tmp_path / "mbr.vhd"
    virtdisk.create(path, 64 * MiB, fixed=True).close()
    # Two partitions, the later-ending one listed first.
    write_mbr(path, [(0x83, 30720, 20480), (0x83, 2048, 20480)])
    with virtdisk.open(path, read_only=True) as disk:
        assert disk.info.smallest_safe_size == (30720 + 20480) * 512


def test_an_empty_mbr_can_shrink_to_the_three_mib_minimum(tmp_path: Path) -> None:
    path = tmp_path / "empty.vhd"
    virtdisk.create(path, 64 * MiB, fixed=True).close()
    write_mbr(path, [])
    with virtdisk.open(path, read_only=True) as disk:
        assert disk.info.smallest_safe_size == 3 * MiB


@pytest.mark.parametrize(("fmt", "options"), [("vhdx", ""), ("vpc", "subformat=dynamic,force_size=on")])
def test_gpt_smallest_safe_size_keeps_the_backup_table(tmp_path: Path, fmt: str, options: str) -> None:
    """sfdisk writes the table, qemu-img the image: neither is ours."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"")
    os.truncate(raw, 64 * MiB)
    sfdisk(raw, "label: gpt\nstart=2048, size=20480\nstart=40960, size=4096\n")
    image = tmp_path / f"gpt.{'vhdx' if fmt == 'vhdx' else 'vhd'}"
    qemu_convert(raw, image, fmt, options)
    with virtdisk.open(image, read_only=True) as disk:
        info = disk.info
    last_lba = 40960 + 4096 - 1
    # 128 entries of 128 bytes: 32 sectors of backup array, then the backup header.
    assert info.smallest_safe_size == (last_lba + 1 + 32 + 1) * 512


def test_a_gpt_with_a_bad_header_crc_counts_as_no_table(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"")
    os.truncate(raw, 32 * MiB)
    sfdisk(raw, "label: gpt\nstart=2048, size=4096\n")
    with raw.open("r+b") as f:
        f.seek(512 + 24)  # MyLBA in the primary header, covered by its CRC
        f.write(b"\x07")
    image = tmp_path / "bad.vhdx"
    qemu_convert(raw, image, "vhdx")
    with virtdisk.open(image, read_only=True) as disk:
        assert disk.info.smallest_safe_size == 32 * MiB


def test_smallest_safe_size_of_a_child_opened_without_its_parent_is_unknown(tmp_path: Path) -> None:
    parent = tmp_path / "parent.vhdx"
    virtdisk.create(parent, 16 * MiB).close()
    virtdisk.create(tmp_path / "child.vhdx", parent=parent).close()
    with virtdisk.open(tmp_path / "child.vhdx", read_only=True, no_parents=True) as disk:
        code, _ = raw_info(disk, lib.GET_VIRTUAL_DISK_INFO_SMALLEST_SAFE_VIRTUAL_SIZE)
        assert code == WinError.ERROR_VHD_COULD_NOT_COMPUTE_MINIMUM_VIRTUAL_SIZE
        assert disk.info.smallest_safe_size is None


def filefrag_extents(path: Path) -> int:
    tool = require_tool("filefrag")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+) extents? found", out)
    assert match, out
    return int(match.group(1))


def test_a_file_in_one_extent_is_not_fragmented(tmp_path: Path) -> None:
    path = tmp_path / "fixed.vhd"
    virtdisk.create(path, 8 * MiB, fixed=True).close()
    extents = filefrag_extents(path)
    with virtdisk.open(path, read_only=True) as disk:
        fragmentation = disk.info.fragmentation
    # Where the file system split the file after all, the answer must say so
    # rather than the test skipping.
    assert (fragmentation == 0) == (extents == 1), (fragmentation, extents)


def test_an_interleaved_copy_is_fragmented(tmp_path: Path) -> None:
    """Copy a fixed VHD in chunks, each followed by a chunk of another file and a
    flush, so that the copy's blocks are physically interleaved with the other's."""
    source = tmp_path / "fixed.vhd"
    virtdisk.create(source, 4 * MiB, fixed=True).close()
    data = source.read_bytes()
    copy, spacer = tmp_path / "copy.vhd", tmp_path / "spacer"
    chunk = 64 * 1024
    with copy.open("wb") as a, spacer.open("wb") as b:
        for offset in range(0, len(data), chunk):
            a.write(data[offset : offset + chunk] or b"")
            a.flush()
            os.fsync(a.fileno())
            b.write(os.urandom(chunk))
            b.flush()
            os.fsync(b.fileno())
    extents = filefrag_extents(copy)
    with virtdisk.open(copy, read_only=True) as disk:
        fragmentation = disk.info.fragmentation
    assert fragmentation is not None and 0 <= fragmentation <= 100
    # A file system that kept the copy contiguous anyway must get 0, not skip.
    assert (fragmentation >= 1) == (extents >= 2), (fragmentation, extents)


def test_change_tracking_is_off_on_vhdx_and_does_not_apply_to_vhd(tmp_path: Path) -> None:
    with virtdisk.create(tmp_path / "a.vhdx", 8 * MiB) as disk:
        info = disk.info
        assert info.change_tracking_enabled is False and info.change_tracking_id == ""
        code, _ = raw_info(disk, lib.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE, 16)
        assert code == WinError.ERROR_INSUFFICIENT_BUFFER
    with virtdisk.create(tmp_path / "a.vhd", 8 * MiB) as disk:
        code, _ = raw_info(disk, lib.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE)
        assert code == WinError.ERROR_VHD_INVALID_TYPE
        assert disk.info.change_tracking_enabled is None


def test_vhd_child_records_the_parents_modification_time(tmp_path: Path) -> None:
    parent = tmp_path / "parent.vhd"
    virtdisk.create(parent, 8 * MiB).close()
    os.utime(parent, (VHD_EPOCH + 123456789, VHD_EPOCH + 123456789))
    with virtdisk.create(tmp_path / "child.vhd", parent=parent) as disk:
        assert disk.info.parent_timestamp == 123456789


def test_a_touched_parent_still_opens(tmp_path: Path) -> None:
    """The unique id links child and parent; the time stamp is not checked,
    because copying or backing up a parent changes its modification time and
    Windows, qemu and libvhdi all keep opening such chains."""
    parent = tmp_path / "parent.vhd"
    virtdisk.create(parent, 8 * MiB).close()
    virtdisk.create(tmp_path / "child.vhd", parent=parent).close()
    os.utime(parent, (VHD_EPOCH + 5, VHD_EPOCH + 5))
    with virtdisk.open(tmp_path / "child.vhd", read_only=True) as disk:
        assert disk.info.parent_resolved


def test_vhdx_has_no_parent_timestamp(tmp_path: Path) -> None:
    parent = tmp_path / "parent.vhdx"
    virtdisk.create(parent, 8 * MiB).close()
    with virtdisk.create(tmp_path / "child.vhdx", parent=parent) as disk:
        code, _ = raw_info(disk, lib.GET_VIRTUAL_DISK_INFO_PARENT_TIMESTAMP)
        assert code == WinError.ERROR_VHD_INVALID_TYPE
        assert disk.info.parent_timestamp is None


def test_host_disk_sectors_are_those_of_the_block_device_holding_the_image(tmp_path: Path) -> None:
    path = tmp_path / "a.vhd"
    with virtdisk.create(path, 8 * MiB) as disk:
        info = disk.info
    st = os.stat(path)
    queue = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/queue")
    if not queue.exists():
        pytest.skip("the image's file system has no block device")
    assert info.host_logical_sector_size == int((queue / "logical_block_size").read_text())
    assert info.host_physical_sector_size == int((queue / "physical_block_size").read_text())
    assert info.host_is_remote is False


@pytest.mark.parametrize(
    ("name", "fixed", "aligned"), [("f.vhd", True, True), ("d.vhd", False, False), ("d.vhdx", False, True)]
)
def test_is_4k_aligned(tmp_path: Path, name: str, fixed: bool, aligned: bool) -> None:
    with virtdisk.create(tmp_path / name, 8 * MiB, fixed=fixed) as disk:
        assert disk.info.is_4k_aligned is aligned


def test_info_json_shows_every_field(tmp_path: Path) -> None:
    parent = tmp_path / "parent.vhd"
    virtdisk.create(parent, 8 * MiB).close()
    child = tmp_path / "child.vhd"
    virtdisk.create(child, parent=parent).close()
    out = subprocess.run(
        [sys.executable, "-m", "virtdisk", "info", "--json", str(child)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(out)
    assert data["disk_type"] == "differencing"
    assert data["parent_path"] == str(parent.resolve())
    assert data["parent_timestamp"] == int(os.stat(parent).st_mtime) - VHD_EPOCH
    assert data["smallest_safe_size"] == 8 * MiB
    for key in (
        "fragmentation",
        "is_4k_aligned",
        "host_logical_sector_size",
        "host_physical_sector_size",
        "change_tracking_enabled",
    ):
        assert key in data
    assert uuid.UUID(data["parent_identifier"])


def _info_asking_each_version(disk: virtdisk.VirtualDisk) -> virtdisk.DiskInfo:
    """DiskInfo as the facade reads it on Windows: one GetVirtualDiskInformation per version."""
    from virtdisk import _disk

    with disk._using() as handle:
        return disk._info(_disk._Query(handle, disk.path))


def _images_of_every_kind(folder: Path) -> list[tuple[Path, dict[str, object]]]:
    base_vhd, base_vhdx = folder / "base.vhd", folder / "base.vhdx"
    virtdisk.create(base_vhd, 8 * MiB).close()
    virtdisk.create(base_vhdx, 8 * MiB).close()
    virtdisk.create(folder / "fixed.vhd", 8 * MiB, fixed=True).close()
    virtdisk.create(folder / "fixed.vhdx", 8 * MiB, fixed=True).close()
    virtdisk.create(folder / "child.vhd", parent=base_vhd).close()
    virtdisk.create(folder / "child.vhdx", parent=base_vhdx).close()
    names = ["base.vhd", "base.vhdx", "fixed.vhd", "fixed.vhdx", "child.vhd", "child.vhdx"]
    cases: list[tuple[Path, dict[str, object]]] = [(folder / name, {}) for name in names]
    cases += [(folder / "child.vhdx", {"no_parents": True}), (folder / "child.vhd", {"no_parents": True})]
    return cases


@pytest.mark.skipif(not hasattr(lib, "vd_get_information_batch"), reason="the batched call is Linux's")
def test_info_in_one_call_equals_info_asked_version_by_version(tmp_path: Path) -> None:
    """The Linux facade reads DiskInfo through one batched native call; the
    Windows path asks each version on its own.  Both must give the same
    answer for every kind of image, a child without its parent included."""
    for path, options in _images_of_every_kind(tmp_path):
        with virtdisk.open(path, read_only=True, **options) as disk:  # type: ignore[arg-type]
            batched = disk.info
            assert batched == _info_asking_each_version(disk), (path, options)
            assert batched.path == path and batched.virtual_size == 8 * MiB


@pytest.mark.skipif(not hasattr(lib, "vd_get_information_batch"), reason="the batched call is Linux's")
def test_a_refused_batch_raises_what_the_version_asked_alone_raises(tmp_path: Path) -> None:
    path = tmp_path / "a.vhdx"
    virtdisk.create(path, 8 * MiB).close()
    with virtdisk.open(path, virtdisk.Access.ATTACH_RO) as disk:
        with pytest.raises(virtdisk.VirtualDiskError) as batched:
            disk.info  # noqa: B018
        with pytest.raises(virtdisk.VirtualDiskError) as alone:
            _info_asking_each_version(disk)
    assert batched.value.winerror == alone.value.winerror == WinError.ERROR_ACCESS_DENIED
    assert batched.value.detail == alone.value.detail != ""
    assert type(batched.value) is type(alone.value)


def test_disk_info_made_quickly_equals_the_dataclass_made_by_its_init(tmp_path: Path) -> None:
    from virtdisk import _disk

    path = tmp_path / "a.vhdx"
    virtdisk.create(path, 8 * MiB).close()
    with virtdisk.open(path, read_only=True) as disk:
        info = disk.info
    values = {name: getattr(info, name) for name in info.__dataclass_fields__}
    made = _disk._new_disk_info(values)
    assert made == virtdisk.DiskInfo(**values) and type(made) is virtdisk.DiskInfo
    assert made.__dict__ == virtdisk.DiskInfo(**values).__dict__
    with pytest.raises(AttributeError):
        made.virtual_size = 1  # type: ignore[misc]


@pytest.mark.skipif(not hasattr(lib, "vd_get_information_batch"), reason="the batched call is Linux's")
def test_info_unpacked_from_the_batch_equals_info_read_field_by_field(tmp_path: Path) -> None:
    """DiskInfo of an image without a parent is unpacked from the batch's
    bytes (_BatchQuery.disk_info); it must equal, field for field and type
    for type, what reading each answer's fields through cffi gives.  A
    differencing disk is left to the field-by-field path (None)."""
    from virtdisk import _disk

    (tmp_path / "iso").mkdir()
    cases = _images_of_every_kind(tmp_path)
    cases += [(make_image("iso", tmp_path / "iso"), {}), (make_image("dynamic-vhdx-4096", tmp_path), {})]
    for path, options in cases:
        disk = virtdisk.open(path, read_only=True, **options)  # type: ignore[arg-type]
        with disk, disk._using() as handle:
            unpacked = _disk._BatchQuery(handle, path).disk_info()
            by_field = disk._info(_disk._BatchQuery(handle, path))
        if by_field.disk_type == virtdisk.DiskType.DIFFERENCING:
            assert unpacked is None, path
            continue
        assert unpacked is not None, path
        assert type(unpacked) is virtdisk.DiskInfo
        for name in virtdisk.DiskInfo.__dataclass_fields__:
            mine, theirs = getattr(unpacked, name), getattr(by_field, name)
            assert (mine, type(mine)) == (theirs, type(theirs)), (path, name)
        assert unpacked.__dict__ == by_field.__dict__
