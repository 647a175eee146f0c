"""CreateVirtualDisk version 2 in full (SourcePath, UniqueId, block and sector
sizes, the sparse flag), and contents judged by independent tools: data that
qemu-img wrote is read by our reader (copied into a new image that qemu-img
then compares with the original), and images we fill are compared by qemu-img
with their source."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import virtdisk
from virtdisk import DiskType, WinError

from .conftest import require_tool

MiB = 1 << 20


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("qemu-img"), *args], capture_output=True, text=True, check=True)


def compare(image: Path, raw: Path) -> None:
    fmt = "vhdx" if image.suffix == ".vhdx" else "vpc"
    result = subprocess.run(
        [require_tool("qemu-img"), "compare", "-f", fmt, "-F", "raw", str(image), str(raw)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def vhdiinfo(path: Path) -> str:
    return subprocess.run(
        [require_tool("vhdiinfo"), str(path)], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """24 MiB of known data with holes: random, zeros, random, zeros, a short tail."""
    path = tmp_path / "data.raw"
    with path.open("wb") as f:
        f.write(os.urandom(3 * MiB + 4096))
        f.seek(11 * MiB)
        f.write(os.urandom(2 * MiB))
        f.seek(24 * MiB - 512)
        f.write(os.urandom(512))
    return path


# Every subformat qemu-img 7.2 can make for vpc and vhdx.
QEMU_MADE = [
    ("vpc", "subformat=dynamic,force_size=on", "q.vhd"),
    ("vpc", "subformat=fixed,force_size=on", "q.vhd"),
    ("vhdx", "subformat=dynamic", "q.vhdx"),
    ("vhdx", "subformat=fixed", "q.vhdx"),
    ("vhdx", "subformat=dynamic,block_size=1M", "q.vhdx"),
    ("vhdx", "subformat=dynamic,block_state_zero=off", "q.vhdx"),
]


@pytest.mark.parametrize(("fmt", "options", "name"), QEMU_MADE)
@pytest.mark.parametrize("target", ["copy.vhd", "copy.vhdx"])
def test_contents_qemu_wrote_read_back_through_our_reader(
    tmp_path: Path, raw: Path, fmt: str, options: str, name: str, target: str
) -> None:
    made = tmp_path / name
    qemu_img("convert", "-q", "-f", "raw", "-O", fmt, "-o", options, str(raw), str(made))
    copy = tmp_path / target
    with virtdisk.create(copy, source=made) as disk:
        info = disk.info
    assert info.virtual_size == 24 * MiB and info.disk_type == DiskType.DYNAMIC
    compare(copy, raw)


@pytest.mark.parametrize("name", ["a.vhd", "a.vhdx"])
@pytest.mark.parametrize("fixed", [False, True])
def test_images_made_from_a_raw_file_compare_equal_to_it(
    tmp_path: Path, raw: Path, name: str, fixed: bool
) -> None:
    path = tmp_path / name
    with virtdisk.create(path, source=raw, fixed=fixed) as disk:
        info = disk.info
    assert info.virtual_size == 24 * MiB
    assert info.disk_type == (DiskType.FIXED if fixed else DiskType.DYNAMIC)
    compare(path, raw)
    if not fixed:
        # Zero stretches are not copied: 5 MiB of data in 2 MiB (VHD) or
        # 32 MiB (VHDX) blocks, not the whole 24 MiB.
        used = os.stat(path).st_blocks * 512
        assert used < (12 * MiB if name.endswith(".vhd") else 70 * MiB)
        assert used < 24 * MiB or name.endswith(".vhdx")


def test_a_larger_maximum_size_pads_with_zeros_and_a_smaller_one_is_refused(
    tmp_path: Path, raw: Path
) -> None:
    path = tmp_path / "big.vhdx"
    with virtdisk.create(path, 40 * MiB, source=raw) as disk:
        assert disk.info.virtual_size == 40 * MiB
    padded = tmp_path / "padded.raw"
    padded.write_bytes(raw.read_bytes() + bytes(16 * MiB))
    compare(path, padded)
    with pytest.raises(virtdisk.VirtualDiskError) as raised:
        virtdisk.create(tmp_path / "small.vhdx", 16 * MiB, source=raw)
    assert raised.value.winerror == WinError.ERROR_INVALID_PARAMETER
    assert not (tmp_path / "small.vhdx").exists()


def test_a_raw_source_of_odd_length_ends_in_zeros(tmp_path: Path) -> None:
    source = tmp_path / "odd.raw"
    source.write_bytes(os.urandom(3 * MiB + 100))
    path = tmp_path / "odd.vhd"
    with virtdisk.create(path, source=source) as disk:
        assert disk.info.virtual_size == 3 * MiB + 512
    padded = tmp_path / "padded.raw"
    padded.write_bytes(source.read_bytes() + bytes(412))
    compare(path, padded)


def test_unique_id_survives_the_copy(tmp_path: Path, raw: Path) -> None:
    for name in ("u.vhd", "u.vhdx"):
        wanted = uuid.uuid4()
        with virtdisk.create(tmp_path / name, source=raw, unique_id=wanted) as disk:
            assert disk.info.identifier == wanted
        assert str(wanted) in vhdiinfo(tmp_path / name).lower()


def test_a_4k_vhdx_source_makes_a_4k_vhdx(tmp_path: Path, raw: Path) -> None:
    source = tmp_path / "4k.vhdx"
    virtdisk.create(source, 24 * MiB, sector_size=4096, physical_sector_size=4096).close()
    with virtdisk.create(tmp_path / "copy.vhdx", source=source) as disk:
        info = disk.info
    assert info.logical_sector_size == 4096 and info.physical_sector_size == 4096
    assert "Bytes per sector\t: 4096" in vhdiinfo(tmp_path / "copy.vhdx")


def test_an_iso_source_becomes_a_disk_with_the_same_bytes(tmp_path: Path) -> None:
    genisoimage = require_tool("genisoimage")
    (tmp_path / "content").mkdir()
    (tmp_path / "content" / "readme.txt").write_text("hello from an ISO\n")
    iso = tmp_path / "a.iso"
    subprocess.run([genisoimage, "-quiet", "-o", str(iso), str(tmp_path / "content")], check=True)
    path = tmp_path / "from-iso.vhd"
    with virtdisk.create(path, source=iso) as disk:
        assert disk.info.virtual_size == iso.stat().st_size
    compare(path, iso)


def test_block_and_sector_sizes_are_what_qemu_and_vhdiinfo_read(tmp_path: Path) -> None:
    path = tmp_path / "b.vhdx"
    virtdisk.create(path, 64 * MiB, block_size=MiB, sector_size=512, physical_sector_size=4096).close()
    import json

    info = json.loads(qemu_img("info", "-f", "vhdx", "--output=json", str(path)).stdout)
    assert info["cluster-size"] == MiB
    with virtdisk.open(path, read_only=True) as disk:
        assert disk.info.physical_sector_size == 4096
    small = tmp_path / "small-blocks.vhd"
    virtdisk.create(small, 64 * MiB, block_size=512 * 1024).close()
    info = json.loads(qemu_img("info", "-f", "vpc", "--output=json", str(small)).stdout)
    assert info["cluster-size"] == 512 * 1024


def test_sparse_fixed_disk_has_no_data_allocated(tmp_path: Path) -> None:
    for name in ("s.vhd", "s.vhdx"):
        path = tmp_path / name
        with virtdisk.create(path, 256 * MiB, fixed=True, sparse=True) as disk:
            assert disk.info.disk_type == DiskType.FIXED
        assert os.stat(path).st_blocks * 512 < 16 * MiB
        assert "Fixed" in vhdiinfo(path)


def test_parent_and_source_exclude_each_other(tmp_path: Path, raw: Path) -> None:
    parent = tmp_path / "p.vhd"
    virtdisk.create(parent, 24 * MiB).close()
    with pytest.raises(virtdisk.VirtualDiskError) as raised:
        virtdisk.create(tmp_path / "c.vhd", parent=parent, source=raw)
    assert raised.value.winerror == WinError.ERROR_INVALID_PARAMETER


def test_a_missing_source_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(virtdisk.VirtualDiskNotFoundError):
        virtdisk.create(tmp_path / "x.vhd", source=tmp_path / "missing.raw")
    assert not (tmp_path / "x.vhd").exists()


def test_cli_create_from_source_and_parent(tmp_path: Path, raw: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "virtdisk", *args], capture_output=True, text=True)

    made = cli("create", str(tmp_path / "s.vhdx"), "--source", str(raw))
    assert made.returncode == 0, made.stderr
    compare(tmp_path / "s.vhdx", raw)
    child = cli("create", str(tmp_path / "c.vhdx"), "--parent", str(tmp_path / "s.vhdx"))
    assert child.returncode == 0, child.stderr
    assert "differencing" in child.stdout.lower()
    nothing = cli("create", str(tmp_path / "n.vhdx"))
    assert nothing.returncode == 1 and "--size" in nothing.stderr


@pytest.mark.loop
@pytest.mark.parametrize(("fmt", "options", "name"), [QEMU_MADE[1]])
def test_a_flat_qemu_image_attached_read_only_reads_as_its_source(
    images: Path, raw: Path, fmt: str, options: str, name: str
) -> None:
    made = images / name
    qemu_img("convert", "-q", "-f", "raw", "-O", fmt, "-o", options, str(raw), str(made))
    with virtdisk.open(made, read_only=True) as disk:
        disk.attach(read_only=True)
        try:
            with open(disk.physical_path, "rb") as device:
                assert device.read() == raw.read_bytes()
        finally:
            disk.detach()
