"""Opening an image read-only, or only for its information, never writes a byte to it.

Checked on every kind of image (fixed, dynamic and differencing VHD and VHDX,
4 KiB-sector VHDX, images qemu-img made, ISO), for the image and for a
differencing disk's parent: same contents (SHA-256), same size, same
modification time (set to a known past value first, so a write in the same
second would still show).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest

import virtdisk
from virtdisk import Access

from .conftest import require_tool

MiB = 1 << 20
PAST_NS = 1_500_000_000_123_456_789  # 2017-07-14, with nanoseconds


def _state(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_size, stat.st_mtime_ns


def _qemu(folder: Path, name: str, fmt: str, options: str) -> Path:
    qemu = require_tool("qemu-img")
    raw = folder / f"{name}.raw"
    raw.write_bytes(b"\x5a" * MiB + bytes(3 * MiB))
    subprocess.run(
        [qemu, "convert", "-f", "raw", "-O", fmt, "-o", options, str(raw), str(folder / name)],
        check=True,
        capture_output=True,
    )
    return folder / name


def _iso(folder: Path) -> Path:
    genisoimage = require_tool("genisoimage")
    (folder / "tree").mkdir()
    (folder / "tree" / "file.txt").write_text("contents\n")
    path = folder / "disc.iso"
    subprocess.run(
        [genisoimage, "-quiet", "-R", "-o", str(path), str(folder / "tree")], check=True, capture_output=True
    )
    return path


def _made(folder: Path, name: str, *args, **kwargs) -> Path:
    virtdisk.create(folder / name, *args, **kwargs).close()
    return folder / name


# name -> builder(folder) -> (image, files that must stay untouched)
BUILDERS: dict[str, Callable[[Path], tuple[Path, list[Path]]]] = {
    "fixed-vhd": lambda f: (p := _made(f, "fixed.vhd", 4 * MiB, fixed=True), [p]),
    "dynamic-vhd": lambda f: (p := _made(f, "dynamic.vhd", 4 * MiB), [p]),
    "differencing-vhd": lambda f: (
        p := _made(f, "child.vhd", parent=_made(f, "parent.vhd", 4 * MiB)),
        [p, f / "parent.vhd"],
    ),
    "fixed-vhdx": lambda f: (p := _made(f, "fixed.vhdx", 4 * MiB, fixed=True, block_size=MiB), [p]),
    "dynamic-vhdx": lambda f: (p := _made(f, "dynamic.vhdx", 4 * MiB), [p]),
    "dynamic-vhdx-4k": lambda f: (p := _made(f, "4k.vhdx", 4 * MiB, sector_size=4096), [p]),
    "differencing-vhdx": lambda f: (
        p := _made(f, "child.vhdx", parent=_made(f, "parent.vhdx", 4 * MiB)),
        [p, f / "parent.vhdx"],
    ),
    "qemu-dynamic-vhd": lambda f: (p := _qemu(f, "q.vhd", "vpc", "subformat=dynamic"), [p]),
    "qemu-fixed-vhd": lambda f: (p := _qemu(f, "qf.vhd", "vpc", "subformat=fixed"), [p]),
    "qemu-dynamic-vhdx": lambda f: (p := _qemu(f, "q.vhdx", "vhdx", "subformat=dynamic"), [p]),
    "iso": lambda f: (p := _iso(f), [p]),
}

OPENS: dict[str, Callable[[Path], virtdisk.VirtualDisk]] = {
    "read_only": lambda path: virtdisk.open(path, read_only=True),
    "get_info_only": lambda path: virtdisk.open(path, Access.GET_INFO),
    "no_parents": lambda path: virtdisk.open(path, read_only=True, no_parents=True),
    # Writable, but nothing written: the header update waits for the first write.
    "writable_unused": lambda path: virtdisk.open(path, read_only=path.suffix == ".iso"),
}


@pytest.mark.parametrize("how", list(OPENS))
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_opening_without_write_access_writes_nothing(tmp_path: Path, kind: str, how: str) -> None:
    image, files = BUILDERS[kind](tmp_path)
    for path in files:
        os.utime(path, ns=(PAST_NS, PAST_NS))
    before = {path: _state(path) for path in files}

    for _ in range(2):  # a second open must not find something the first one left
        with OPENS[how](image) as disk:
            info = disk.info
            assert info.virtual_size > 0

    assert {path: _state(path) for path in files} == before


def test_the_iso_suffix_alone_makes_the_default_access_read_only(tmp_path: Path) -> None:
    """open() without access or read_only asks read-only access of an image
    whose suffix is .iso in any case, and only then: not of a file named
    ".iso" (a suffix-less hidden file) nor of "x.iso.vhdx"."""
    iso = _iso(tmp_path)
    read_write = Access.ATTACH_RO | Access.ATTACH_RW | Access.DETACH | Access.GET_INFO
    for name in ("DISC.ISO", "disc.Iso"):
        with virtdisk.open(iso.rename(tmp_path / name)) as disk:
            assert disk.access == Access.ATTACH_RO | Access.DETACH | Access.GET_INFO, name
        iso = tmp_path / name
    for name in (".iso", "disc.iso.vhdx"):
        virtdisk.create(tmp_path / name, 8 << 20, storage_type=virtdisk.StorageType.VHDX).close()
        with virtdisk.open(tmp_path / name) as disk:
            assert disk.access == read_write, name
