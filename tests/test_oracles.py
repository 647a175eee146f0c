"""Images we create read correctly in qemu-img and vhdiinfo; images they create
open correctly here.  Neither tool was written by this project."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest

import virtdisk
from virtdisk import DiskType, StorageType

from .conftest import require_tool

MiB = 1 << 20


def qemu_info(path: Path, fmt: str) -> dict:
    qemu_img = require_tool("qemu-img")
    # -f is required: without it qemu probes a fixed VHD as raw.
    out = subprocess.run(
        [qemu_img, "info", "-f", fmt, "--output=json", str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def vhdiinfo(path: Path) -> dict[str, str]:
    tool = require_tool("vhdiinfo")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, check=True).stdout
    return {key.strip(): value.strip() for key, value in re.findall(r"^\s*([^:\n]+?)\s*:\s*(.+)$", out, re.M)}


@pytest.mark.parametrize(
    ("name", "fixed", "size", "disk_type"),
    [
        ("fixed.vhd", True, 16 * MiB, "Fixed"),
        ("dynamic.vhd", False, 100 * MiB, "Dynamic"),
        ("fixed.vhdx", True, 16 * MiB, "Fixed"),
        ("dynamic.vhdx", False, 64 * MiB, "Dynamic"),
    ],
)
def test_our_images_read_right_in_qemu_img_and_vhdiinfo(tmp_path: Path, name, fixed, size, disk_type) -> None:
    path = tmp_path / name
    with virtdisk.create(path, size, fixed=fixed) as disk:
        ours = disk.info
    assert ours.virtual_size == size
    assert ours.disk_type == (DiskType.FIXED if fixed else DiskType.DYNAMIC)
    fmt = "vpc" if path.suffix == ".vhd" else "vhdx"
    assert qemu_info(path, fmt)["virtual-size"] == size
    theirs = vhdiinfo(path)
    assert theirs["Disk type"] == disk_type
    assert f"({size} bytes)" in theirs["Media size"]
    assert uuid.UUID(theirs["Identifier"]) == ours.identifier


@pytest.mark.parametrize(
    ("options", "disk_type"),
    [
        ("subformat=fixed,force_size=on", DiskType.FIXED),
        ("subformat=dynamic,force_size=on", DiskType.DYNAMIC),
    ],
)
def test_qemu_made_vhd_opens_with_the_same_answers(tmp_path: Path, options, disk_type) -> None:
    qemu_img = require_tool("qemu-img")
    path = tmp_path / "qemu.vhd"
    subprocess.run([qemu_img, "create", "-q", "-f", "vpc", "-o", options, str(path), "48M"], check=True)
    with virtdisk.open(path, read_only=True) as disk:
        info = disk.info
    assert info.storage_type == StorageType.VHD
    assert info.disk_type == disk_type
    assert info.virtual_size == qemu_info(path, "vpc")["virtual-size"] == 48 * MiB
    assert info.identifier == uuid.UUID(vhdiinfo(path)["Identifier"])


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_made_vhdx_opens_with_the_same_answers(tmp_path: Path, subformat) -> None:
    qemu_img = require_tool("qemu-img")
    path = tmp_path / "qemu.vhdx"
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "vhdx", "-o", f"subformat={subformat}", str(path), "40M"], check=True
    )
    with virtdisk.open(path, read_only=True) as disk:
        info = disk.info
    assert info.storage_type == StorageType.VHDX
    assert info.virtual_size == 40 * MiB
    assert info.block_size == qemu_info(path, "vhdx")["cluster-size"]
    assert info.disk_type == (DiskType.FIXED if subformat == "fixed" else DiskType.DYNAMIC)


def test_iso_made_by_genisoimage_opens_as_iso(tmp_path: Path) -> None:
    genisoimage = require_tool("genisoimage")
    content = tmp_path / "content"
    content.mkdir()
    (content / "a.txt").write_text("a")
    path = tmp_path / "image.bin"  # no .iso suffix: the contents decide
    subprocess.run([genisoimage, "-quiet", "-o", str(path), str(content)], check=True)
    with virtdisk.open(path, read_only=True) as disk:
        info = disk.info
    assert info.storage_type == StorageType.ISO
    assert info.disk_type is None
    assert info.virtual_size == path.stat().st_size
    assert info.logical_sector_size == 2048


def test_opening_read_only_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "disk.vhdx"
    virtdisk.create(path, 8 * MiB).close()
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    with virtdisk.open(path, read_only=True) as disk:
        disk.info  # noqa: B018
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_every_info_field_comes_from_its_own_answer(tmp_path: Path) -> None:
    """Each information version is read while its buffer is alive: a field must
    never show another version's answer (this once aliased the parent's id)."""
    parent_path = tmp_path / "parent.vhdx"
    with virtdisk.create(parent_path, 8 * MiB, physical_sector_size=4096) as parent:
        parent_info = parent.info
    with virtdisk.create(tmp_path / "child.vhdx", parent=parent_path) as child:
        info = child.info
    assert info.disk_type == DiskType.DIFFERENCING
    assert info.physical_sector_size == 4096
    assert info.parent_identifier == parent_info.identifier
    assert info.virtual_disk_id not in (None, info.identifier, parent_info.identifier)
    assert info.parent_path == str(parent_path.resolve())


def test_a_vhdx_whose_bat_spans_many_chunks_reads_as_written(tmp_path: Path) -> None:
    """With 256 MiB blocks a chunk is 16 payload entries and one sector
    bitmap entry, so a 16 GiB disk's BAT interleaves four chunks.  QEMU
    writes every block of a base; the provider's own write path
    (tests/tools/vdwork.c, which places bitmaps by its own arithmetic) writes
    512 bytes of every other block of a differencing child: partly present
    blocks, with their chunks' sector bitmaps.  The open checks each BAT
    entry as payload or bitmap by its place in that cycle: a place
    miscounted refuses or misreads these images."""
    from .vhdxlog import build_tool, vdread

    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    block, blocks = 256 * MiB, 64
    base, child = tmp_path / "base.vhdx", tmp_path / "child.vhdx"
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "vhdx", "-o", "subformat=dynamic,block_size=256M", str(base), "16G"],
        check=True,
    )
    writes = [arg for b in range(blocks) for arg in ("-c", f"write -q -P {b + 1} {b * block} 4k")]
    subprocess.run([qemu_io, "-f", "vhdx", *writes, str(base)], check=True, capture_output=True)
    virtdisk.create(child, parent=base).close()
    vdwork, reader = build_tool(tmp_path, "vdwork"), build_tool(tmp_path, "vdread")
    steps = [f"w:{b * block}:512:{b}" for b in range(1, blocks, 2)]
    trace = tmp_path / "trace"
    subprocess.run([str(vdwork), str(trace), str(child), *steps], check=True, capture_output=True)

    def written(b: int) -> bytes:  # vdwork's pattern for a sector at disk offset o, seed s
        o = b * block
        return bytes((o // 512 * 131 + b * 17 + i) & 0xFF for i in range(512))

    ranges = [f"{b * block}:1024" for b in range(blocks)]
    from_base = [bytes([b + 1]) * 1024 for b in range(blocks)]
    from_child = [written(b) + from_base[b][512:] if b % 2 else from_base[b] for b in range(blocks)]
    for image, expected in ((base, from_base), (child, from_child)):
        with virtdisk.open(image, read_only=True) as disk:
            assert disk.info.virtual_size == 16 << 30
        result = vdread(reader, image, ranges=ranges)
        assert result.ok, result.error
        data = result.data[8:]
        assert [data[i * 1024 : (i + 1) * 1024] for i in range(blocks)] == expected, image.name
