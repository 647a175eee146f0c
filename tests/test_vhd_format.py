"""The VHD and ISO format modules: differencing chains and what a damaged file answers.

Damage is done the way it happens to real files (a flipped byte, a wrong field
with a recomputed checksum, a moved or replaced parent), and each case must
fail with the code Windows uses and a detail naming the structure.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
from pathlib import Path
from typing import Callable

import pytest

import virtdisk
from virtdisk import DiskType, StorageType, WinError

from .conftest import require_tool

MiB = 1 << 20
FOOTER = 512
HEADER_AT = 512  # the dynamic header, where this library (like qemu and Windows) puts it
BAT_AT = 1536


def _checksum(structure: bytes, field: int) -> int:
    return ~(sum(structure) - sum(structure[field : field + 4])) & 0xFFFFFFFF


def _edit_header(path: Path, change: Callable[[bytearray], None]) -> None:
    """Change the dynamic header and reseal it, so only the changed field is wrong."""
    data = bytearray(path.read_bytes())
    header = data[HEADER_AT : HEADER_AT + 1024]
    change(header)
    header[36:40] = struct.pack(">I", _checksum(header, 36))
    data[HEADER_AT : HEADER_AT + 1024] = header
    path.write_bytes(data)


def _open_error(path: Path, **kwargs) -> virtdisk.VirtualDiskError:
    with pytest.raises(virtdisk.VirtualDiskError) as raised:
        virtdisk.open(path, read_only=True, **kwargs).close()
    return raised.value


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    """A dynamic base and a differencing child of it, in sibling directories."""
    base = tmp_path / "base" / "base.vhd"
    child = tmp_path / "work" / "child.vhd"
    base.parent.mkdir()
    child.parent.mkdir()
    virtdisk.create(base, 8 * MiB).close()
    virtdisk.create(child, parent=base).close()
    return base, child


def test_differencing_child_finds_its_parent_and_names_its_identifier(chain) -> None:
    base, child = chain
    with virtdisk.open(base, read_only=True) as disk:
        base_id = disk.info.identifier
    with virtdisk.open(child, read_only=True) as disk:
        info = disk.info
    assert info.disk_type == DiskType.DIFFERENCING
    assert info.virtual_size == 8 * MiB
    assert info.parent_resolved is True
    assert info.parent_identifier == base_id
    assert info.parent_path == str(base)


def test_vhdiinfo_reads_the_parent_identifier_and_name_we_write(chain) -> None:
    vhdiinfo = require_tool("vhdiinfo")
    base, child = chain
    with virtdisk.open(base, read_only=True) as disk:
        base_id = disk.info.identifier
    out = subprocess.run([vhdiinfo, str(child)], capture_output=True, text=True, check=True).stdout
    assert "Differential" in out
    assert f"Parent identifier\t: {base_id}" in out
    assert "Parent filename\t\t: base.vhd" in out


def test_relative_locator_finds_the_parent_after_the_pair_moves(chain, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "base"), str(moved / "base"))
    shutil.move(str(tmp_path / "work"), str(moved / "work"))
    with virtdisk.open(moved / "work" / "child.vhd", read_only=True) as disk:
        # Only the W2ru locator (..\base\base.vhd) still leads there.
        assert disk.info.parent_path == str((moved / "base" / "base.vhd").resolve())


def test_missing_parent_is_parent_not_found_naming_every_path_tried(chain) -> None:
    base, child = chain
    base.unlink()
    error = _open_error(child)
    assert isinstance(error, virtdisk.ParentNotFoundError)
    assert error.winerror == WinError.ERROR_VHD_PARENT_VHD_NOT_FOUND
    assert str(base) in error.detail
    assert str(child.parent / "base.vhd") in error.detail  # the unicode name, beside the child


def test_no_parents_opens_the_child_alone_and_lists_where_the_parent_may_be(chain) -> None:
    base, child = chain
    base.unlink()
    with virtdisk.open(child, read_only=True, no_parents=True) as disk:
        info = disk.info
    assert info.parent_resolved is False
    assert str(base) in info.parent_paths


def test_a_different_disk_in_the_parent_place_is_an_identifier_mismatch(chain) -> None:
    base, child = chain
    base.unlink()
    virtdisk.create(base, 8 * MiB).close()
    error = _open_error(child)
    assert error.winerror == WinError.ERROR_VHD_CHILD_PARENT_ID_MISMATCH
    assert str(base) in error.detail


def test_a_parent_of_another_size_is_a_size_mismatch(chain) -> None:
    base, child = chain
    with virtdisk.open(base, read_only=True) as disk:
        base_id = disk.info.identifier
    base.unlink()
    virtdisk.create(base, 4 * MiB, unique_id=base_id).close()
    error = _open_error(child)
    assert error.winerror == WinError.ERROR_VHD_CHILD_PARENT_SIZE_MISMATCH


def test_a_broken_parent_is_an_error_in_the_chain_carrying_the_parents_detail(chain) -> None:
    base, child = chain
    _edit_header(base, lambda header: header.__setitem__(slice(32, 36), struct.pack(">I", 3000)))
    error = _open_error(child)
    assert error.winerror == WinError.ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT
    assert "block size 3000" in error.detail


def test_a_chain_that_loops_back_is_a_cycle(chain) -> None:
    base, child = chain
    # Make the base a differencing disk whose parent is the child.
    with virtdisk.open(child, read_only=True) as disk:
        child_id = disk.info.identifier
    locator = str(child).encode("utf-16-le")
    data = bytearray(base.read_bytes())
    locator_at = len(data) - FOOTER
    data[locator_at:locator_at] = locator + bytes(-len(locator) % 512)
    footer = data[-FOOTER:]
    footer[60:64] = struct.pack(">I", 4)
    footer[64:68] = struct.pack(">I", _checksum(footer, 64))
    data[-FOOTER:] = footer
    data[:FOOTER] = footer
    base.write_bytes(data)

    def make_differencing(header: bytearray) -> None:
        header[40:56] = child_id.bytes
        header[576:600] = struct.pack(">4sIIIQ", b"W2ku", 512, len(locator), 0, locator_at)

    _edit_header(base, make_differencing)
    error = _open_error(child)
    assert error.winerror == WinError.ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED


def _set(offset: int, value: bytes) -> Callable[[bytearray], None]:
    return lambda header: header.__setitem__(slice(offset, offset + len(value)), value)


@pytest.mark.parametrize(
    ("change", "reseal", "code", "needle"),
    [
        (_set(900, b"\x01"), False, WinError.ERROR_VHD_SPARSE_HEADER_CHECKSUM_MISMATCH, "checksum"),
        (
            _set(32, struct.pack(">I", 3000)),
            True,
            WinError.ERROR_VHD_INVALID_BLOCK_SIZE,
            "block size 3000",
        ),
        (
            _set(28, struct.pack(">I", 1)),
            True,
            WinError.ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT,
            "BAT entries",
        ),
        (
            _set(16, struct.pack(">Q", 1 << 40)),
            True,
            WinError.ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT,
            "runs past the footer",
        ),
        (_set(0, b"xxsparse"), True, WinError.ERROR_VHD_SPARSE_HEADER_CORRUPT, "cxsparse"),
    ],
    ids=["header-checksum", "block-size", "too-few-entries", "table-past-end", "cookie"],
)
def test_a_damaged_dynamic_header_is_refused_with_the_matching_code(
    tmp_path: Path, change, reseal, code, needle
) -> None:
    path = tmp_path / "d.vhd"
    virtdisk.create(path, 8 * MiB).close()
    if reseal:
        _edit_header(path, change)
    else:
        data = bytearray(path.read_bytes())
        header = data[HEADER_AT : HEADER_AT + 1024]
        change(header)
        data[HEADER_AT : HEADER_AT + 1024] = header
        path.write_bytes(data)
    error = _open_error(path)
    assert error.winerror == code
    assert needle in error.detail
    assert "offset" in error.detail


def test_a_bat_entry_outside_the_file_is_refused_naming_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    virtdisk.create(path, 8 * MiB).close()
    data = bytearray(path.read_bytes())
    data[BAT_AT + 8 : BAT_AT + 12] = struct.pack(">I", 0x100000)  # entry 2 -> 512 MiB into a tiny file
    path.write_bytes(data)
    error = _open_error(path)
    assert error.winerror == WinError.ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT
    assert "BAT entry 2" in error.detail


def test_a_dynamic_disk_that_lost_its_end_says_the_footer_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    virtdisk.create(path, 8 * MiB).close()
    data = path.read_bytes()
    path.write_bytes(data[:-FOOTER] + bytes(FOOTER))
    error = _open_error(path)
    assert error.winerror == WinError.ERROR_VHD_DRIVE_FOOTER_MISSING
    assert "copy at offset 0" in error.detail


def test_a_footer_from_before_virtual_pc_2004_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    virtdisk.create(path, 4 * MiB, fixed=True).close()
    path.write_bytes(path.read_bytes()[:-1])  # the 511-byte footer: the reserved last byte gone
    with virtdisk.open(path, read_only=True) as disk:
        assert disk.info.virtual_size == 4 * MiB


def test_created_identifier_is_the_footer_unique_id_in_rfc_4122_order(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    wanted = uuid.uuid4()
    virtdisk.create(path, 4 * MiB, fixed=True, unique_id=wanted).close()
    assert path.read_bytes()[-FOOTER + 68 : -FOOTER + 84] == wanted.bytes


def test_created_footer_says_win_so_qemu_uses_the_exact_size(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    virtdisk.create(path, 64 * MiB).close()
    footer = path.read_bytes()[-FOOTER:]
    assert footer[28:32] == b"win "
    assert struct.unpack(">QQ", footer[40:56]) == (64 * MiB, 64 * MiB)
    # The specification's CHS for 64 MiB (rounded down, unlike qemu's).
    assert struct.unpack(">HBB", footer[56:60]) == (963, 8, 17)


def test_vhd_size_limit_is_2040_gib(tmp_path: Path) -> None:
    with pytest.raises(virtdisk.VirtualDiskError) as raised:
        virtdisk.create(tmp_path / "big.vhd", (2040 << 30) + 512 * 4096)
    assert raised.value.winerror == WinError.ERROR_VHD_INVALID_SIZE
    assert not (tmp_path / "big.vhd").exists()


@pytest.mark.parametrize(
    ("size", "needle"),
    [(40 * 2048 + 100, "whole number"), (16 * 2048, "too short")],
)
def test_an_iso_of_impossible_size_is_file_corrupt(tmp_path: Path, size: int, needle: str) -> None:
    path = tmp_path / "x.iso"
    data = bytearray(max(size, 40 * 2048))
    data[32768:32774] = b"\x01CD001"
    path.write_bytes(data[:size])
    error = _open_error(path, storage_type=StorageType.ISO)
    assert error.winerror == WinError.ERROR_FILE_CORRUPT
    assert needle in error.detail


def test_an_iso_without_a_volume_descriptor_is_file_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "x.iso"
    path.write_bytes(bytes(40 * 2048))
    error = _open_error(path, storage_type=StorageType.ISO)
    assert error.winerror == WinError.ERROR_FILE_CORRUPT
    assert "volume descriptor" in error.detail


def test_a_udf_only_image_opens_as_iso(tmp_path: Path) -> None:
    path = tmp_path / "udf.iso"
    data = bytearray(40 * 2048)
    for index, ident in enumerate([b"BEA01", b"NSR02", b"TEA01"]):
        data[32768 + index * 2048 : 32768 + index * 2048 + 7] = b"\x00" + ident + b"\x01"
    path.write_bytes(data)
    with virtdisk.open(path) as disk:
        info = disk.info
    assert info.storage_type == StorageType.ISO
    assert info.logical_sector_size == 2048
    assert info.identifier == uuid.UUID(int=0)
