"""Attach and detach for real on loop devices: every DetachVirtualDisk rule,
on success and on its error code, and the lifetime rules of AttachVirtualDisk."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import virtdisk
from virtdisk import Access, WinError
from virtdisk._native import ffi, lib

from .conftest import bound_to, diskseq, require_tool, still_bound, unmount

pytestmark = pytest.mark.loop

MiB = 1 << 20


def make_fixed_vhd(folder: Path, name: str = "disk.vhd", size: int = 16 * MiB) -> Path:
    path = folder / name
    virtdisk.create(path, size, fixed=True).close()
    return path


def sysfs_loop(device: str) -> Path:
    return Path("/sys/block", Path(device).name)


def run_python(code: str, *, preexec_fn=None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=check,
        preexec_fn=preexec_fn,
    )


# ---- attach -------------------------------------------------------------


def test_attach_fixed_vhd_shows_exactly_the_virtual_size(images: Path) -> None:
    path = make_fixed_vhd(images, size=16 * MiB)
    with virtdisk.open(path) as disk:
        disk.attach()
        device = disk.physical_path
        assert device.startswith("/dev/loop")
        assert int((sysfs_loop(device) / "size").read_text()) * 512 == 16 * MiB  # footer hidden
        assert (sysfs_loop(device) / "ro").read_text().strip() == "0"
        assert disk.attached and disk.info.attached
    assert not bound_to(device, path)


def test_attach_read_only_makes_a_read_only_device(images: Path) -> None:
    path = make_fixed_vhd(images)
    with virtdisk.open(path, read_only=True) as disk:
        disk.attach(read_only=True)
        device = disk.physical_path
        assert (sysfs_loop(device) / "ro").read_text().strip() == "1"
        with pytest.raises(OSError):
            fd = os.open(device, os.O_WRONLY)
            try:
                os.write(fd, b"x" * 512)
            finally:
                os.close(fd)


def test_read_write_attach_needs_attach_rw_access(images: Path) -> None:
    path = make_fixed_vhd(images)
    with virtdisk.open(path, read_only=True) as disk:
        with pytest.raises(virtdisk.VirtualDiskPermissionError) as raised:
            disk.attach(read_only=False)
        assert raised.value.winerror == WinError.ERROR_ACCESS_DENIED
        assert "attach(read_only=True)" in str(raised.value)  # what to do, in the facade's terms
        assert not disk.attached


def test_attaching_an_attached_image_is_a_sharing_violation(images: Path) -> None:
    path = make_fixed_vhd(images)
    with virtdisk.open(path) as disk:
        disk.attach()
        with pytest.raises(virtdisk.DiskInUseError) as raised:
            disk.attach()
        assert raised.value.winerror == WinError.ERROR_SHARING_VIOLATION


def test_qemu_made_fixed_vhd_attaches_with_its_size(images: Path) -> None:
    qemu_img = require_tool("qemu-img")
    path = images / "qemu.vhd"
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", str(path), "64M"],
        check=True,
    )
    with virtdisk.open(path) as disk:
        disk.attach()
        device = disk.physical_path
        assert int((sysfs_loop(device) / "size").read_text()) * 512 == 64 * MiB


def test_dynamic_vhd_attaches_with_its_size(images: Path) -> None:
    # Served through FUSE (tests/test_attach_served.py has the details).
    path = images / "dynamic.vhd"
    virtdisk.create(path, 16 * MiB).close()
    with virtdisk.open(path) as disk:
        disk.attach()
        device = disk.physical_path
        seq = diskseq(device)
        assert int((sysfs_loop(device) / "size").read_text()) * 512 == 16 * MiB
        assert disk.attached
    assert not still_bound(device, seq)


# ---- ISO ----------------------------------------------------------------


@pytest.fixture
def iso(images: Path) -> Path:
    genisoimage = require_tool("genisoimage")
    content = images / "content"
    content.mkdir()
    (content / "readme.txt").write_text("hello from an ISO\n")
    path = images / "test.iso"
    subprocess.run(
        [genisoimage, "-quiet", "-J", "-r", "-V", "TESTISO", "-o", str(path), str(content)], check=True
    )
    return path


def test_iso_attaches_read_only_with_2048_byte_sectors(iso: Path) -> None:
    with virtdisk.open(iso) as disk:
        assert disk.info.storage_type == virtdisk.StorageType.ISO
        disk.attach(read_only=True)
        device = disk.physical_path
        queue = sysfs_loop(device) / "queue"
        assert (queue / "logical_block_size").read_text().strip() == "2048"
        assert (sysfs_loop(device) / "ro").read_text().strip() == "1"
        with open(device, "rb") as block:
            block.seek(16 * 2048)
            assert block.read(6) == b"\x01CD001"


def test_iso_refuses_a_read_write_attach(iso: Path) -> None:
    with virtdisk.open(iso) as disk:
        with pytest.raises(virtdisk.VirtualDiskError) as raised:
            disk.attach(read_only=False)
        assert raised.value.winerror in (WinError.ERROR_INVALID_PARAMETER, WinError.ERROR_ACCESS_DENIED)
        assert not disk.attached


# ---- lifetime -----------------------------------------------------------


def test_non_permanent_disk_detaches_when_the_last_handle_closes(images: Path) -> None:
    path = make_fixed_vhd(images)
    first = virtdisk.open(path)
    second = virtdisk.open(path, Access.GET_INFO)
    first.attach()
    device = first.physical_path
    first.close()
    assert bound_to(device, path), "another handle is still open: the disk must stay"
    assert second.physical_path == device
    second.close()
    assert not bound_to(device, path)


def test_non_permanent_disk_detaches_when_the_process_dies(images: Path) -> None:
    path = make_fixed_vhd(images)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time, virtdisk
            disk = virtdisk.open({str(path)!r})
            disk.attach()
            print(disk.physical_path, flush=True)
            time.sleep(60)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        device = child.stdout.readline().strip()
        assert device.startswith("/dev/loop") and bound_to(device, path)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert not bound_to(device, path)


def test_permanent_disk_outlives_its_process_and_a_later_process_detaches_it(images: Path) -> None:
    path = make_fixed_vhd(images)
    result = run_python(f"""
        import virtdisk
        with virtdisk.open({str(path)!r}) as disk:
            disk.attach(permanent=True)
            print(disk.physical_path)
    """)
    device = result.stdout.strip()
    assert bound_to(device, path)
    with virtdisk.open(path, Access.GET_INFO) as disk:
        assert disk.physical_path == device
    run_python(f"import virtdisk; virtdisk.detach({str(path)!r})")
    assert not bound_to(device, path)


def test_permanent_disk_stays_after_its_handles_close(images: Path) -> None:
    path = make_fixed_vhd(images)
    with virtdisk.open(path) as disk:
        disk.attach(permanent=True)
        device = disk.physical_path
    assert bound_to(device, path)
    virtdisk.detach(path)
    assert not bound_to(device, path)


# ---- detach: success and every documented refusal ------------------------


def test_detach_detaches_and_the_handle_stays_usable(images: Path) -> None:
    path = make_fixed_vhd(images)
    with virtdisk.open(path) as disk:
        disk.attach()
        device = disk.physical_path
        disk.detach()
        assert not bound_to(device, path)
        assert not disk.attached
        with pytest.raises(virtdisk.NotAttachedError):
            disk.physical_path  # noqa: B018


def test_detach_of_an_image_that_is_not_attached_is_error_not_ready(images: Path) -> None:
    path = make_fixed_vhd(images)
    with virtdisk.open(path) as disk, pytest.raises(virtdisk.NotAttachedError) as raised:
        disk.detach()
    assert raised.value.winerror == WinError.ERROR_NOT_READY
    assert raised.value.function == "DetachVirtualDisk"
    assert raised.value.filename == str(path)


def test_detach_needs_a_handle_opened_with_detach_access(images: Path) -> None:
    path = make_fixed_vhd(images)
    with virtdisk.open(path) as attacher:
        attacher.attach(permanent=True)
        device = attacher.physical_path
    with virtdisk.open(path, Access.GET_INFO | Access.ATTACH_RO) as disk:
        with pytest.raises(virtdisk.VirtualDiskPermissionError) as raised:
            disk.detach()
        assert raised.value.winerror == WinError.ERROR_ACCESS_DENIED
    assert bound_to(device, path)
    virtdisk.detach(path)
    assert not bound_to(device, path)


def test_detach_flags_other_than_none_are_invalid(images: Path) -> None:
    path = make_fixed_vhd(images)
    with virtdisk.open(path) as disk:
        disk.attach()
        device = disk.physical_path
        with disk._using() as handle:
            for flags in (1, 2, 0x80000000):
                assert lib.DetachVirtualDisk(handle, flags, 0) == WinError.ERROR_INVALID_PARAMETER
        assert bound_to(device, path)
        disk.detach()
        assert not bound_to(device, path)


def test_detach_of_a_handle_openvirtualdisk_did_not_make_is_invalid() -> None:
    for value in (0, 1, 0x1234, 0xFFFFFFFF):
        assert lib.DetachVirtualDisk(ffi.cast("HANDLE", value), 0, 0) == WinError.ERROR_INVALID_PARAMETER
    assert lib.CloseHandle(ffi.cast("HANDLE", 0x1234)) == 0
    assert lib.GetLastError() == WinError.ERROR_INVALID_HANDLE


def test_detach_is_refused_while_other_handles_are_open(images: Path) -> None:
    path = make_fixed_vhd(images)
    with virtdisk.open(path) as disk:
        disk.attach(permanent=True)
        device = disk.physical_path
        other = virtdisk.open(path, Access.GET_INFO)
        with pytest.raises(virtdisk.DiskInUseError) as raised:
            disk.detach()
        assert raised.value.winerror == WinError.ERROR_SHARING_VIOLATION
        assert bound_to(device, path)
        other.close()
        disk.detach()
    assert not bound_to(device, path)


def test_detach_is_refused_while_another_process_holds_a_handle(images: Path) -> None:
    path = make_fixed_vhd(images)
    with virtdisk.open(path) as disk:
        disk.attach(permanent=True)
        device = disk.physical_path
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, virtdisk; d = virtdisk.open({str(path)!r}, virtdisk.Access.GET_INFO); "
            "print('open', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(virtdisk.DiskInUseError):
            virtdisk.detach(path)
        assert bound_to(device, path)
    finally:
        holder.stdin.close()
        holder.wait()
    virtdisk.detach(path)
    assert not bound_to(device, path)


def test_detach_is_refused_while_the_device_is_open_elsewhere(images: Path) -> None:
    path = make_fixed_vhd(images)
    with virtdisk.open(path) as disk:
        disk.attach()
        device = disk.physical_path
        fd = os.open(device, os.O_RDONLY)
        try:
            with pytest.raises(virtdisk.DiskInUseError) as raised:
                disk.detach()
            assert raised.value.winerror == WinError.ERROR_DEVICE_IN_USE
            assert bound_to(device, path), "a refused detach must not detach lazily"
        finally:
            os.close(fd)
        disk.detach()
        assert not bound_to(device, path)


def test_detach_is_refused_while_mounted_and_succeeds_after_unmount(images: Path, mount_point: Path) -> None:
    mkfs = require_tool("mkfs.ext4")
    path = make_fixed_vhd(images, size=32 * MiB)
    with virtdisk.open(path) as disk:
        disk.attach()
        device = disk.physical_path
        subprocess.run([mkfs, "-q", "-F", device], check=True)
        subprocess.run(["mount", device, str(mount_point)], check=True)
        with pytest.raises(virtdisk.DiskInUseError) as raised:
            disk.detach()
        assert raised.value.winerror == WinError.ERROR_DEVICE_IN_USE
        assert bound_to(device, path)
        unmount(mount_point, device)
        disk.detach()
        assert not bound_to(device, path)


def _drop_cap_sys_admin() -> None:
    """preexec_fn: remove CAP_SYS_ADMIN from the bounding set, so the child runs
    as root without the privilege that loop devices need."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP, CAP_SYS_ADMIN = 24, 21
    if libc.prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_attach_without_the_privilege_fails_and_leaves_nothing(images: Path) -> None:
    path = make_fixed_vhd(images)
    result = run_python(
        f"""
        import virtdisk
        with virtdisk.open({str(path)!r}) as disk:
            try:
                disk.attach()
            except virtdisk.VirtualDiskPermissionError as error:
                print(error.winerror)
    """,
        preexec_fn=_drop_cap_sys_admin,
    )
    assert int(result.stdout) == WinError.ERROR_PRIVILEGE_NOT_HELD
    with virtdisk.open(path, Access.GET_INFO) as disk:
        assert not disk.attached


def test_detach_without_the_privilege_fails_and_leaves_the_disk(images: Path) -> None:
    path = make_fixed_vhd(images)
    with virtdisk.open(path) as disk:
        disk.attach(permanent=True)
        device = disk.physical_path
    result = run_python(
        f"""
        import virtdisk
        try:
            virtdisk.detach({str(path)!r})
        except virtdisk.VirtualDiskPermissionError as error:
            print(error.winerror)
    """,
        preexec_fn=_drop_cap_sys_admin,
    )
    assert int(result.stdout) == WinError.ERROR_PRIVILEGE_NOT_HELD
    assert bound_to(device, path)
    virtdisk.detach(path)
    assert not bound_to(device, path)


# ---- data ---------------------------------------------------------------


def test_data_written_through_the_disk_lands_in_the_image(images: Path, mount_point: Path) -> None:
    mkfs = require_tool("mkfs.ext4")
    qemu_img = require_tool("qemu-img")
    debugfs = require_tool("debugfs")
    path = make_fixed_vhd(images, size=32 * MiB)
    payload = os.urandom(3 * MiB)
    with virtdisk.open(path) as disk:
        disk.attach()
        device = disk.physical_path
        subprocess.run([mkfs, "-q", "-F", device], check=True)
        subprocess.run(["mount", device, str(mount_point)], check=True)
        (mount_point / "hello.txt").write_text("hello from virtdisk\n")
        (mount_point / "random.bin").write_bytes(payload)
        unmount(mount_point, device)
        disk.detach()
    raw = images / "disk.raw"
    subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw", str(path), str(raw)], check=True)
    hello = subprocess.run([debugfs, "-R", "cat /hello.txt", str(raw)], capture_output=True, check=True)
    assert hello.stdout == b"hello from virtdisk\n"
    dumped = images / "random.out"
    subprocess.run([debugfs, "-R", f"dump /random.bin {dumped}", str(raw)], capture_output=True, check=True)
    assert dumped.read_bytes() == payload
    # And the image is still a valid VHD of the same size to qemu.
    info = subprocess.run(
        [qemu_img, "info", "-f", "vpc", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"virtual-size": 33554432' in info.stdout


def test_attached_disks_lists_the_disk_and_its_image(images: Path) -> None:
    path = make_fixed_vhd(images)
    with virtdisk.open(path) as disk:
        disk.attach()
        device = disk.physical_path
        listed = {d.physical_path: d.image_path for d in virtdisk.attached_disks()}
        assert listed[device] == path.resolve()
    assert device not in {d.physical_path for d in virtdisk.attached_disks()}
