"""The command line: the main jobs, and one clear line on errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from virtdisk._cli import parse_size

MiB = 1 << 20


def virtdisk_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtdisk", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("text", "size"),
    [("64M", 64 * MiB), ("1G", 1 << 30), ("4096", 4096), ("1.5M", 3 * MiB // 2), ("2GiB", 2 << 30)],
)
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_create_then_info_json(tmp_path: Path) -> None:
    path = tmp_path / "disk.vhdx"
    created = virtdisk_cli("create", str(path), "--size", "32M", "--type", "fixed")
    assert created.returncode == 0, created.stderr
    info = virtdisk_cli("info", str(path), "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["storage_type"] == "vhdx"
    assert data["disk_type"] == "fixed"
    assert data["virtual_size"] == 32 * MiB
    assert data["attached"] is False and data["physical_path"] is None


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    result = virtdisk_cli("info", str(tmp_path / "missing.vhd"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert "missing.vhd" in result.stderr and "ERROR_FILE_NOT_FOUND" in result.stderr


def test_detach_of_a_disk_that_is_not_attached_says_so(tmp_path: Path) -> None:
    path = tmp_path / "disk.vhd"
    assert virtdisk_cli("create", str(path), "--size", "8M").returncode == 0
    result = virtdisk_cli("detach", str(path))
    assert result.returncode == 1
    assert "ERROR_NOT_READY" in result.stderr and "not attached" in result.stderr


@pytest.mark.loop
def test_attach_list_detach(images: Path) -> None:
    path = images / "disk.vhd"
    assert virtdisk_cli("create", str(path), "--size", "8M", "--type", "fixed").returncode == 0
    attached = virtdisk_cli("attach", str(path))
    assert attached.returncode == 0, attached.stderr
    device = attached.stdout.strip()
    assert device.startswith("/dev/loop")
    try:
        listed = json.loads(virtdisk_cli("list", "--json").stdout)
        assert {"physical_path": device, "image_path": str(path.resolve())} in listed
        assert json.loads(virtdisk_cli("info", str(path), "--json").stdout)["physical_path"] == device
    finally:
        detached = virtdisk_cli("detach", str(path))
    assert detached.returncode == 0, detached.stderr
    assert not Path("/sys/block", Path(device).name, "loop").exists()


@pytest.mark.loop
def test_demo_runs_the_whole_job() -> None:
    result = virtdisk_cli("demo")
    assert result.returncode == 0, result.stderr
    assert "attached  /dev/loop" in result.stdout
    assert "detached  attached=False" in result.stdout
