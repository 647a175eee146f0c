"""The command line as a user meets it: the main jobs, and one clear line on errors."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

import virtdisk
from virtdisk import _disk
from virtdisk._cli import parse_size

from .conftest import loops_backed_under, require_tool

MiB = 1 << 20


def virtdisk_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtdisk", *args], capture_output=True, text=True, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Status 1, nothing on stdout, one line on stderr naming each needle."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    assert result.stderr.startswith("virtdisk")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64M", 64 * MiB),
        ("1G", 1 << 30),
        ("4096", 4096),
        ("1.5M", 3 * MiB // 2),
        ("2GiB", 2 << 30),
        ("64T", 64 << 40),
    ],
)
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "0M", "99999999T", "65T", "1.3", "abc", "-1M"])
def test_sizes_out_of_range_or_malformed_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["create", "x", "--format", "foo", "--size", "8M"], ["--format", "invalid choice: 'foo'", "'vhdx'"]),
        (["create", "x", "--format", "iso", "--size", "8M"], ["invalid choice: 'iso'"]),
        (["create", "x.vhd", "--size", "99999999T"], ["--size", "99999999T", "64T"]),
        (["create", "x.vhd", "--size", "0"], ["--size", "more than 0"]),
        (["create", "x.vhd"], ["needs --size"]),
        (["create", "u.img", "--size", "8M"], ["u.img", "--format vhd"]),
        (["create", "x.vhd", "--size", "8M", "--type", "sparse"], ["--type", "invalid choice"]),
        (["create", "x.vhd", "--size", "8M", "--sector-size", "1000"], ["--sector-size"]),
        (["create", "x.vhd", "--size", "1M"], ["3 MiB minimum", "ERROR_INVALID_PARAMETER", "see --size"]),
        (
            ["create", "x.vhd", "--size", "8M", "--block-size", "3M"],
            ["block size", "ERROR_INVALID_PARAMETER", "see --block-size"],
        ),
        (["create", "x.vhd", "--size", "8M", "--parent", "p.vhd"], ["--parent"]),
        (["bogus"], ["invalid choice: 'bogus'"]),
        ([], ["required: COMMAND"]),
        (["info"], ["required: path"]),
        (["info", "missing.vhd"], ["missing.vhd", "ERROR_FILE_NOT_FOUND"]),
        (["attach", "missing.vhd"], ["missing.vhd", "ERROR_FILE_NOT_FOUND"]),
        (["detach", "missing.vhd"], ["missing.vhd", "ERROR_FILE_NOT_FOUND"]),
        (["list", "--verbose"], ["unrecognized arguments: --verbose"]),
    ],
)
def test_errors_are_one_line_status_1_and_create_nothing(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    result = virtdisk_cli(*args, cwd=tmp_path)
    assert_one_line_error(result, *needles)
    assert "StorageType" not in result.stderr  # no enum reprs
    assert list(tmp_path.iterdir()) == []


def test_version() -> None:
    result = virtdisk_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"virtdisk {virtdisk.__version__}"


@pytest.mark.parametrize("command", [[], ["create"], ["info"], ["attach"], ["detach"], ["list"]])
def test_help_is_plain_text_and_documents_every_option(command: list[str]) -> None:
    result = virtdisk_cli(*command, "--help")
    assert result.returncode == 0
    assert "``" not in result.stdout
    if command in (["info"], ["list"]):
        assert "--json" in result.stdout and "JSON" in result.stdout
    if command == ["create"]:
        assert "fixed: allocate the whole size now" in result.stdout
        assert "image format" in result.stdout


def test_create_then_info_json(tmp_path: Path) -> None:
    created = virtdisk_cli("create", "disk.vhdx", "--size", "32M", "--type", "fixed", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    info = virtdisk_cli("info", "disk.vhdx", "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["version"] == 1
    assert data["path"] == str(tmp_path / "disk.vhdx")  # absolute, though given relative
    assert data["storage_type"] == "vhdx"
    assert data["disk_type"] == "fixed"
    assert data["virtual_size"] == 32 * MiB
    assert data["attached"] is False and data["physical_path"] is None


def test_info_json_keys_are_the_documented_ones(tmp_path: Path) -> None:
    """The README lists every key of `info --json`: the two must not drift."""
    path = tmp_path / "disk.vhd"
    virtdisk.create(path, 8 * MiB).close()
    data = json.loads(virtdisk_cli("info", str(path), "--json").stdout)
    documented = _documented_keys(_readme(), "`info --json` prints")
    assert documented == set(data)


def _readme() -> str:
    """The README of the tree under test: the checkout, or the unpacked sdist
    named by VIRTDISK_SOURCE_DIR (.ci/check-wheel)."""
    root = Path(os.environ.get("VIRTDISK_SOURCE_DIR", Path(__file__).resolve().parents[1]))
    return (root / "README.md").read_text(encoding="utf-8")


def _documented_keys(readme: str, heading: str) -> set[str]:
    """The keys in the first column of the table after heading."""
    section = readme[readme.index(heading) :]
    table = section[section.index("| key |") :].split("\n\n")[0]
    return {key for line in table.splitlines()[2:] for key in re.findall(r"`(\w+)`", line.split("|")[1])}


def test_create_without_a_known_suffix_is_refused_alike_in_python(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="storage_type"):
        virtdisk.create(tmp_path / "u.img", 8 * MiB)
    assert not (tmp_path / "u.img").exists()
    created = virtdisk_cli("create", "u.img", "--size", "8M", "--format", "vhd", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    with virtdisk.open(tmp_path / "u.img", storage_type=virtdisk.StorageType.VHD, read_only=True) as disk:
        assert disk.info.storage_type == virtdisk.StorageType.VHD


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`virtdisk info --json x | head -1`: the reader goes away; no "Broken pipe"."""
    path = tmp_path / "disk.vhd"
    virtdisk.create(path, 8 * MiB).close()
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        result = subprocess.run(
            [sys.executable, "-m", "virtdisk", "info", "--json", str(path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 1


def test_detach_of_a_disk_that_is_not_attached_says_so(tmp_path: Path) -> None:
    path = tmp_path / "disk.vhd"
    assert virtdisk_cli("create", str(path), "--size", "8M").returncode == 0
    assert_one_line_error(virtdisk_cli("detach", str(path)), "ERROR_NOT_READY", "not attached")


# ---- arguments of the Python facade ---------------------------------------


@pytest.mark.parametrize(
    ("keywords", "error", "parameter"),
    [
        ({"size": "8M"}, TypeError, "size"),
        ({"size": -5}, ValueError, "size"),
        ({"size": 1 << 64}, ValueError, "size"),
        ({"size": True}, TypeError, "size"),
        ({"size": 8 * MiB, "block_size": 1 << 40}, ValueError, "block_size"),
        ({"size": 8 * MiB, "sector_size": 512.0}, TypeError, "sector_size"),
        ({"size": 8 * MiB, "physical_sector_size": -1}, ValueError, "physical_sector_size"),
        ({"size": 8 * MiB, "unique_id": "not a uuid"}, TypeError, "unique_id"),
        ({"size": 8 * MiB, "storage_type": 99}, ValueError, "storage_type"),
        ({"parent": 5}, TypeError, "parent"),
        ({"size": 8 * MiB, "source": ""}, ValueError, "source"),
    ],
)
def test_create_arguments_of_the_wrong_type_or_range_name_the_parameter(
    tmp_path: Path, keywords: dict[str, object], error: type[Exception], parameter: str
) -> None:
    with pytest.raises(error, match=rf"\b{parameter}\b"):
        virtdisk.create(tmp_path / "disk.vhd", **keywords)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_a_refused_create_names_the_parameter_not_the_api_field(tmp_path: Path) -> None:
    with pytest.raises(virtdisk.VirtualDiskError) as raised:
        virtdisk.create(tmp_path / "disk.vhd", 1 * MiB)
    assert raised.value.hint == "see the size argument"
    assert not (tmp_path / "disk.vhd").exists()


def test_open_arguments_of_the_wrong_type_name_the_parameter(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"\bpath\b"):
        virtdisk.open(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"\baccess\b"):
        virtdisk.open(tmp_path / "disk.vhd", "rw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\baccess\b"):
        virtdisk.open(tmp_path / "disk.vhd", 1 << 40)  # type: ignore[arg-type]


def test_resize_on_a_default_handle_says_which_access_to_open_with(tmp_path: Path) -> None:
    path = tmp_path / "disk.vhdx"
    virtdisk.create(path, 8 * MiB).close()
    with virtdisk.open(path) as disk:
        with pytest.raises(TypeError, match=r"\bsize\b"):
            disk.resize("16M")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"\bsize\b"):
            disk.expand(-1)
        for change in (disk.resize, disk.expand):
            with pytest.raises(PermissionError, match=r"access=virtdisk\.Access\.METAOPS"):
                change(16 * MiB)
    with virtdisk.open(path, access=virtdisk.Access.METAOPS | virtdisk.Access.GET_INFO) as disk:
        disk.resize(16 * MiB)
        assert disk.info.virtual_size == 16 * MiB


# ---- attached disks ----------------------------------------------------------


def _iso(folder: Path) -> Path:
    genisoimage = require_tool("genisoimage")
    (folder / "tree").mkdir()
    (folder / "tree" / "hello.txt").write_text("hello\n")
    path = folder / "disc.iso"
    subprocess.run([genisoimage, "-quiet", "-o", str(path), str(folder / "tree")], check=True)
    return path


def _listed(device: str) -> dict[str, object]:
    listed = virtdisk_cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["version"] == 1
    return next(d for d in data["disks"] if d["physical_path"] == device)


def _backing(device: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file device shows, from LOOP_GET_STATUS64, or
    None when it shows none."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        status = fcntl.ioctl(fd, 0x4C05, bytes(232))  # LOOP_GET_STATUS64, struct loop_info64
    except OSError:
        return None
    finally:
        os.close(fd)
    dev, ino = struct.unpack_from("=QQ", status)
    return dev, ino


Mine = tuple[Optional[tuple[int, int]], Optional[int]]


def _mine(device: str) -> Mine:
    """What tells this test's attachment from the next one on the same device
    (other tests attach on this machine meanwhile): a direct one by its
    image's identity, a served one by its server (every served file is inode
    2 of a FUSE mount whose device number the next mount may reuse)."""
    record = _disk._served_record(device)
    return _backing(device), record[0] if record else None


def _gone(device: str, mine: Mine) -> bool:
    """Whether device no longer shows this test's attachment."""
    backing, server = mine
    if server is not None:
        return not _disk._holds_device(server, device)
    assert backing is not None
    return _backing(device) != backing


@pytest.mark.loop
def test_attach_list_detach(images: Path) -> None:
    path = images / "disk.vhd"
    assert virtdisk_cli("create", str(path), "--size", "8M", "--type", "fixed").returncode == 0
    attached = virtdisk_cli("attach", str(path))
    assert attached.returncode == 0, attached.stderr
    device = attached.stdout.strip()
    mine = _mine(device)
    assert device.startswith("/dev/loop")
    try:
        entry = _listed(device)
        assert entry == {
            "physical_path": device,
            "image_path": str(path.resolve()),
            "read_only": False,
            "permanent": True,
            "served": False,
        }
        assert json.loads(virtdisk_cli("info", str(path), "--json").stdout)["physical_path"] == device
        assert _documented_keys(_readme(), "`list --json` prints") == set(entry)
        table = virtdisk_cli("list").stdout.splitlines()
        assert table[0].split() == ["DEVICE", "READ-ONLY", "PERMANENT", "SERVED", "IMAGE"]
        assert [device, "no", "yes", "no", str(path.resolve())] in [row.split() for row in table]
    finally:
        detached = virtdisk_cli("detach", str(path))
    assert detached.returncode == 0, detached.stderr
    assert _gone(device, mine)


@pytest.mark.loop
def test_an_iso_attaches_read_only_without_being_told(images: Path) -> None:
    iso = _iso(images)
    attached = virtdisk_cli("attach", str(iso))
    assert attached.returncode == 0, attached.stderr
    device = attached.stdout.strip()
    mine = _mine(device)
    try:
        assert _listed(device)["read_only"] is True
    finally:
        assert virtdisk_cli("detach", device).returncode == 0
    assert _gone(device, mine)
    with virtdisk.open(iso) as disk:
        disk.attach()
        assert Path("/sys/block", Path(disk.physical_path).name, "ro").read_text().strip() == "1"


@pytest.mark.loop
def test_a_read_only_handle_attaches_read_only_by_default(images: Path) -> None:
    path = images / "disk.vhd"
    virtdisk.create(path, 8 * MiB, fixed=True).close()
    with virtdisk.open(path, read_only=True) as disk:
        disk.attach()
        assert Path("/sys/block", Path(disk.physical_path).name, "ro").read_text().strip() == "1"


@pytest.mark.loop
def test_an_image_not_writable_says_to_attach_it_read_only(images: Path) -> None:
    chattr = require_tool("chattr")
    path = images / "disk.vhd"
    virtdisk.create(path, 8 * MiB, fixed=True).close()
    subprocess.run([chattr, "+i", str(path)], check=True)  # not writable, even for root
    try:
        assert_one_line_error(virtdisk_cli("attach", str(path)), "attach it with --read-only")
        assert loops_backed_under(images) == []
        attached = virtdisk_cli("attach", "--read-only", str(path))
        assert attached.returncode == 0, attached.stderr
        assert virtdisk_cli("detach", attached.stdout.strip()).returncode == 0
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


@pytest.mark.loop
def test_a_failed_attach_attaches_nothing(images: Path) -> None:
    path = images / "junk.vhd"
    path.write_bytes(b"not a disk" * 1000)
    assert_one_line_error(virtdisk_cli("attach", str(path)), "ERROR_VIRTDISK_PROVIDER_NOT_FOUND")
    assert loops_backed_under(images) == []


@pytest.mark.loop
@pytest.mark.parametrize("fixed", [True, False], ids=["direct", "served"])
def test_detach_by_device_also_after_a_rename(images: Path, fixed: bool) -> None:
    path = images / "disk.vhdx"
    virtdisk.create(path, 16 * MiB, fixed=fixed).close()
    attached = virtdisk_cli("attach", str(path))
    assert attached.returncode == 0, attached.stderr
    device = attached.stdout.strip()
    mine = _mine(device)
    try:
        renamed = path.rename(images / "renamed.vhdx")
        entry = _listed(device)
        assert entry["served"] is (not fixed) and entry["permanent"] is True
        assert entry["image_path"] == str(renamed)
        detached = virtdisk_cli("detach", device)
        assert detached.returncode == 0, detached.stderr
        assert _gone(device, mine)
    finally:
        _detach_by_python(device, mine)


@pytest.mark.loop
def test_a_served_disk_detaches_by_device_after_its_image_is_deleted(images: Path) -> None:
    path = images / "disk.vhdx"
    virtdisk.create(path, 16 * MiB).close()
    attached = virtdisk_cli("attach", str(path))
    assert attached.returncode == 0, attached.stderr
    device = attached.stdout.strip()
    mine = _mine(device)
    try:
        path.unlink()
        assert _listed(device)["image_path"] == f"{path} (deleted)"
        detached = virtdisk_cli("detach", device)
        assert detached.returncode == 0, detached.stderr
        assert _gone(device, mine)
    finally:
        _detach_by_python(device, mine)


def _detach_by_python(device: str, mine: Mine) -> None:
    """After a failed test: the images fixture detaches by the image's
    recorded name, which a renamed or deleted image no longer has."""
    if not _gone(device, mine):
        virtdisk.detach(device)


@pytest.mark.loop
def test_a_direct_disk_whose_image_is_deleted_is_refused_by_name(images: Path) -> None:
    """Its image is gone and nothing holds a descriptor of it: the provider
    cannot open it, and says so (and how else to detach)."""
    path = images / "disk.vhd"
    virtdisk.create(path, 8 * MiB, fixed=True).close()
    attached = virtdisk_cli("attach", str(path))
    assert attached.returncode == 0, attached.stderr
    device = attached.stdout.strip()
    mine = _mine(device)
    path.unlink()
    try:
        assert_one_line_error(virtdisk_cli("detach", device), "deleted", f"losetup -d {device}")
        assert not _gone(device, mine)  # refused: nothing was half done
    finally:
        if not _gone(device, mine):
            subprocess.run(["losetup", "-d", device], check=True)


@pytest.mark.loop
def test_detach_by_device_in_python(images: Path) -> None:
    path = images / "disk.vhd"
    virtdisk.create(path, 8 * MiB, fixed=True).close()
    with virtdisk.open(path) as disk:
        disk.attach(permanent=True)
        device = disk.physical_path
        mine = _mine(device)
    virtdisk.detach(device)
    assert _gone(device, mine)
    with pytest.raises(virtdisk.NotAttachedError):
        virtdisk.detach(path)


@pytest.mark.loop
def test_demo_runs_the_whole_job() -> None:
    result = virtdisk_cli("demo")
    assert result.returncode == 0, result.stderr
    assert "attached  /dev/loop" in result.stdout
    assert "detached  attached=False" in result.stdout
