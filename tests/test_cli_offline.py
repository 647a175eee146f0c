"""The command line's Hyper-V jobs on detached images: resize (Resize-VHD),
set (Set-VHD), convert (Convert-VHD), and the progress bar of long commands.

Contents are checked with qemu-img against a raw file of what went in; a
refused command must leave the image's bytes as they were."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import random
import select
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .conftest import require_tool
from .test_cli import assert_one_line_error, virtdisk_cli

MiB = 1 << 20
QEMU_FORMAT = {".vhd": "vpc", ".vhdx": "vhdx", ".raw": "raw"}


def _data(size: int) -> bytes:
    data = bytearray(size)
    data[:MiB] = random.Random(1).randbytes(MiB)
    data[size - 2 * MiB + 512 : size - MiB] = random.Random(2).randbytes(MiB - 512)
    return bytes(data)


def _raw(folder: Path, size: int = 8 * MiB) -> tuple[Path, bytes]:
    data = _data(size)
    raw = folder / "data.raw"
    raw.write_bytes(data)
    return raw, data


def _compare(expected: Path, image: Path) -> None:
    result = subprocess.run(
        [
            require_tool("qemu-img"),
            "compare",
            "-f",
            QEMU_FORMAT[expected.suffix],
            "-F",
            QEMU_FORMAT[image.suffix],
            str(expected),
            str(image),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _info(image: Path) -> dict:
    result = virtdisk_cli("info", str(image), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".vhd", ".vhdx"])
def test_resize_grows_keeping_the_data_and_prints_json(tmp_path: Path, suffix: str) -> None:
    raw, data = _raw(tmp_path)
    image = tmp_path / f"disk{suffix}"
    assert virtdisk_cli("convert", str(raw), str(image)).returncode == 0
    result = virtdisk_cli("resize", str(image), "--size", "24M", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    answer = json.loads(result.stdout)
    assert answer == {"path": str(image), "old_size": 8 * MiB, "virtual_size": 24 * MiB}
    grown = tmp_path / "grown.raw"
    grown.write_bytes(data + bytes(16 * MiB))
    _compare(grown, image)
    result = virtdisk_cli("resize", str(image), "--size", "32M")
    assert result.returncode == 0 and result.stdout == f"resized {image} from 24 MiB to 32 MiB\n"
    assert _info(image)["virtual_size"] == 32 * MiB


def test_resize_refusals_are_one_line_and_change_nothing(tmp_path: Path) -> None:
    raw, data = _raw(tmp_path)
    vhdx, vhd = tmp_path / "disk.vhdx", tmp_path / "disk.vhd"
    for image in (vhdx, vhd):
        assert virtdisk_cli("convert", str(raw), str(image)).returncode == 0
    before = {image: _digest(image) for image in (vhdx, vhd)}
    # No partition table: nothing is known to be unused, so no shrinking ...
    assert_one_line_error(
        virtdisk_cli("resize", str(vhdx), "--size", "4M"), "ERROR_VHD_RESIZE_WOULD_TRUNCATE_DATA"
    )
    assert_one_line_error(
        virtdisk_cli("resize", str(vhdx), "--to-minimum-size"),
        "ERROR_VHD_COULD_NOT_COMPUTE_MINIMUM_VIRTUAL_SIZE",
    )
    # ... a VHD never shrinks, and a size is needed.
    assert_one_line_error(
        virtdisk_cli("resize", str(vhd), "--size", "4M", "--allow-unsafe"), "VHD cannot shrink"
    )
    assert_one_line_error(virtdisk_cli("resize", str(vhd)), "--size", "virtdisk resize --help")
    assert_one_line_error(virtdisk_cli("resize", str(vhd), "--size", str(8 * MiB + 100)), "see --size")
    assert_one_line_error(virtdisk_cli("resize", str(tmp_path / "none.vhd"), "--size", "9M"), "none.vhd")
    assert {image: _digest(image) for image in (vhdx, vhd)} == before
    assert not (tmp_path / "none.vhd").exists()
    # --allow-unsafe cuts what lies past the new end.
    result = virtdisk_cli("resize", str(vhdx), "--size", "4M", "--allow-unsafe")
    assert result.returncode == 0, result.stderr
    cut = tmp_path / "cut.raw"
    cut.write_bytes(data[: 4 * MiB])
    _compare(cut, vhdx)


@pytest.mark.parametrize("suffix", [".vhd", ".vhdx"])
def test_set_follows_a_moved_parent_and_changes_the_identifier(tmp_path: Path, suffix: str) -> None:
    parent, child = tmp_path / f"parent{suffix}", tmp_path / f"child{suffix}"
    assert virtdisk_cli("create", str(parent), "--size", "8M").returncode == 0
    assert virtdisk_cli("create", str(child), "--parent", str(parent)).returncode == 0
    moved = tmp_path / f"moved{suffix}"
    parent.rename(moved)
    assert_one_line_error(virtdisk_cli("info", str(child)), "ERROR_VHD_PARENT_VHD_NOT_FOUND")
    before = _digest(child)
    assert_one_line_error(
        virtdisk_cli("set", str(child), "--parent", str(tmp_path / "nope.vhd")),
        "ERROR_VHD_PARENT_VHD_NOT_FOUND",
    )
    assert _digest(child) == before
    result = virtdisk_cli("set", str(child), "--parent", str(moved))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"set {child}: parent {moved}\n"
    info = _info(child)
    assert info["parent_resolved"] and Path(info["parent_paths"][0]) == moved
    identifier = uuid.uuid4()
    result = virtdisk_cli("set", str(moved), "--identifier", str(identifier), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["identifier"] == str(identifier) == _info(moved)["identifier"]
    # The child names the old identifier: it no longer opens against it.
    assert_one_line_error(virtdisk_cli("info", str(child)), "ERROR_VHD_CHILD_PARENT_ID_MISMATCH")


def test_set_physical_sector_size_and_its_refusals(tmp_path: Path) -> None:
    vhdx, vhd = tmp_path / "disk.vhdx", tmp_path / "disk.vhd"
    for image in (vhdx, vhd):
        assert virtdisk_cli("create", str(image), "--size", "8M").returncode == 0
    result = virtdisk_cli("set", str(vhdx), "--physical-sector-size", "4096")
    assert result.returncode == 0, result.stderr
    assert _info(vhdx)["physical_sector_size"] == 4096
    before = _digest(vhd)
    assert_one_line_error(
        virtdisk_cli("set", str(vhd), "--physical-sector-size", "4096"), "ERROR_VHD_INVALID_TYPE"
    )
    assert_one_line_error(
        virtdisk_cli("set", str(vhd), "--physical-sector-size", "1024"), "--physical-sector-size"
    )
    assert_one_line_error(virtdisk_cli("set", str(vhd), "--identifier", "zz"), "--identifier", "UUID")
    assert_one_line_error(virtdisk_cli("set", str(vhd)), "set needs")
    assert _digest(vhd) == before


def _sources(folder: Path) -> list[Path]:
    """The same contents as a raw file and as each format and type."""
    raw, _data = _raw(folder)
    sources = [raw]
    for suffix in (".vhd", ".vhdx"):
        for kind in ("fixed", "dynamic"):
            image = folder / f"source-{kind}{suffix}"
            result = virtdisk_cli("convert", str(raw), str(image), "--type", kind)
            assert result.returncode == 0, result.stderr
            sources.append(image)
    return sources


def test_convert_from_any_image_to_any_format_and_type(tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    raw = sources[0]
    for number, source in enumerate(sources):
        source_type = _info(source)["disk_type"] if source.suffix != ".raw" else "dynamic"
        for suffix in (".vhd", ".vhdx"):
            for kind in (None, "fixed", "dynamic"):
                target = tmp_path / f"out-{number}-{kind}{suffix}"
                result = virtdisk_cli(
                    "convert", str(source), str(target), *(["--type", kind] if kind else [])
                )
                assert result.returncode == 0, result.stderr
                # Convert-VHD keeps the source's type unless told otherwise.
                expected = kind or source_type
                info = _info(target)
                assert (info["storage_type"], info["disk_type"]) == (suffix[1:], expected), (source, target)
                assert (
                    result.stdout
                    == f"converted {source} to {target} ({suffix[1:].upper()} {expected}, 8 MiB)\n"
                )
                _compare(raw, target)


def test_a_failed_convert_or_create_leaves_no_file_and_overwrites_nothing(tmp_path: Path) -> None:
    raw, _data = _raw(tmp_path)
    existing = tmp_path / "existing.vhdx"
    assert virtdisk_cli("convert", str(raw), str(existing)).returncode == 0
    before = _digest(existing)
    assert_one_line_error(virtdisk_cli("convert", str(raw), str(existing)), "existing.vhdx")
    assert _digest(existing) == before
    missing = tmp_path / "out.vhd"
    assert_one_line_error(virtdisk_cli("convert", str(tmp_path / "nothing.raw"), str(missing)), "nothing.raw")
    assert not missing.exists()
    too_big = tmp_path / "big.vhd"  # a VHD holds 2040 GiB at most
    assert_one_line_error(virtdisk_cli("create", str(too_big), "--size", "3T", "--type", "fixed"), "2040 GiB")
    assert not too_big.exists()


def _on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Runs the command with stderr on a pseudo-terminal: status, stdout, what the terminal got."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "virtdisk", *args], stdout=subprocess.PIPE, stderr=terminal, text=True
        )
        os.close(terminal)
        terminal = -1
        shown = b""
        while True:
            ready, _, _ = select.select([controller], [], [], 60)
            assert ready, "no output and no end within 60 s"
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the command ended and closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        stdout = process.stdout.read() if process.stdout else ""
        return process.wait(timeout=60), stdout, shown.decode()
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)


def test_long_commands_draw_a_bar_on_a_terminal_only_and_not_with_quiet(tmp_path: Path) -> None:
    raw, _data = _raw(tmp_path, 64 * MiB)
    fixed = tmp_path / "fixed.vhdx"
    commands = [
        ("creating", ["create", str(fixed), "--size", "256M", "--type", "fixed"]),
        ("converting", ["convert", str(raw), str(tmp_path / "copy.vhd")]),
        ("resizing", ["resize", str(fixed), "--size", "512M"]),
    ]
    for label, command in commands:
        status, stdout, shown = _on_a_terminal(*command)
        assert status == 0, shown
        assert stdout.startswith(("created", "converted", "resized")), stdout
        # One line redrawn in place that ends at 100% and then ends.
        assert shown.startswith(f"\r{label} "), shown
        assert "100.0%" in shown and shown.endswith("\r\n") and shown.count("\n") == 1, shown
    for suffix, quiet in ((".vhd", True), (".vhdx", False)):
        target = tmp_path / f"again-{quiet}{suffix}"
        if quiet:
            status, stdout, shown = _on_a_terminal("convert", str(raw), str(target), "--quiet")
            assert status == 0 and shown == "", shown
        else:
            result = virtdisk_cli("convert", str(raw), str(target))  # stderr is a pipe
            assert result.returncode == 0 and result.stderr == ""
            stdout = result.stdout
        assert stdout.startswith("converted")
        _compare(raw, target)


def test_resize_to_the_minimum_size_ends_at_the_last_partition(tmp_path: Path) -> None:
    raw = tmp_path / "table.raw"
    with raw.open("wb") as file:
        file.truncate(64 * MiB)
    subprocess.run(
        [require_tool("sfdisk"), "-q", "--no-reread", "--no-tell-kernel", str(raw)],
        input="label: dos\nstart=2048, size=20480\n",
        text=True,
        check=True,
        capture_output=True,
    )
    end = (2048 + 20480) * 512
    with raw.open("r+b") as file:
        file.seek(end - MiB)
        file.write(random.Random(3).randbytes(MiB))
    image = tmp_path / "disk.vhdx"
    assert virtdisk_cli("convert", str(raw), str(image)).returncode == 0
    assert _info(image)["smallest_safe_size"] == end
    assert_one_line_error(
        virtdisk_cli("resize", str(image), "--size", str(end - MiB)), "ERROR_VHD_RESIZE_WOULD_TRUNCATE_DATA"
    )
    result = virtdisk_cli("resize", str(image), "--to-minimum-size", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["virtual_size"] == end
    kept = tmp_path / "kept.raw"
    kept.write_bytes(raw.read_bytes()[:end])
    _compare(kept, image)
    assert_one_line_error(
        virtdisk_cli("resize", str(image), "--to-minimum-size"),
        "ERROR_VHD_ALREADY_AT_OR_BELOW_MINIMUM_VIRTUAL_SIZE",
    )


def test_create_json_is_the_new_images_info(tmp_path: Path) -> None:
    image = tmp_path / "fixed.vhdx"
    result = virtdisk_cli("create", str(image), "--size", "16M", "--type", "fixed", "--json")
    assert result.returncode == 0 and result.stderr == ""
    created = json.loads(result.stdout)
    assert created == _info(image)
    assert (created["storage_type"], created["disk_type"], created["virtual_size"]) == (
        "vhdx",
        "fixed",
        16 * MiB,
    )
