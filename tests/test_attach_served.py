"""Attaching images that need block translation (dynamic and differencing VHD,
VHDX): served through FUSE onto a loop device, with the lifetime and detach
rules of a fixed VHD, data that lands in the image as the formats require, and
nothing left behind when a process is killed."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import virtdisk
from virtdisk import Access, WinError

from .conftest import RUN_DIR, diskseq, require_tool, still_bound, unmount

pytestmark = pytest.mark.loop

MiB = 1 << 20


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def virtdisk_mounts(images: Path) -> set[str]:
    """Mount points of the provider's FUSE servers of images in this folder
    in this process's namespace.  A server mounts in a namespace of its own
    and detaches there (tests/test_mount_namespace.py), so one here is a
    mount that leaked out, or one of a server that died half-way where it
    could make no namespace; other programs' FUSE mounts, and other tests'
    disks, are not ours to count."""
    files = [path.stat() for path in images.rglob("*") if path.is_file()]
    ours = {f"virtdisk:{st.st_dev:x}-{st.st_ino:x}" for st in files}
    mounts = set()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, target, fstype = line.split()[:3]
        if source in ours and fstype == "fuse.virtdisk":
            mounts.add(target)
    return mounts


@pytest.fixture
def no_new_mounts(images: Path) -> Iterator[None]:
    """Fails the test if it leaves a server mount of one of its images."""
    yield
    left = virtdisk_mounts(images)
    assert not left, f"the test left FUSE mounts behind: {sorted(left)}"


def helper_pids() -> list[int]:
    """Running helpers (an exited one may stay a zombie until init reaps it)."""
    return [
        int(p.parent.name)
        for p in Path("/proc").glob("[0-9]*/comm")
        if _read(p) == "virtdisk-serve" and _read(p.parent / "stat").rpartition(")")[2].split()[:1] != ["Z"]
    ]


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def sockets_of(image: Path) -> list[Path]:
    """A permanent helper's control sockets (<base>.<pid>.sock)."""
    return list(RUN_DIR.glob(record_path(image, "").name + ".*.sock"))


def server_of(helper: int) -> int | None:
    """The FUSE server process (virtdisk-fuse) that helper supervises."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _read(stat).rpartition(")")[2].split()
        if fields[1:2] == [str(helper)] and _read(stat.parent / "comm") == "virtdisk-fuse":
            return int(stat.parent.name)
    return None


def record_path(image: Path, suffix: str = ".json") -> Path:
    st = image.stat()
    return RUN_DIR / f"{st.st_dev:x}-{st.st_ino:x}{suffix}"


def record_of(image: Path) -> dict:
    return json.loads(record_path(image).read_text())


# ---- images of every kind ------------------------------------------------------


def _qemu_fixed_vhdx(folder: Path, size: int) -> tuple[Path, list[Path]]:
    qemu_img = require_tool("qemu-img")
    path = folder / "qemu-fixed.vhdx"
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "vhdx", "-o", "subformat=fixed", str(path), str(size)], check=True
    )
    return path, []


def _made(name: str, **options) -> Callable[[Path, int], tuple[Path, list[Path]]]:
    def make(folder: Path, size: int) -> tuple[Path, list[Path]]:
        path = folder / name
        virtdisk.create(path, size, **options).close()
        return path, []

    return make


def _chain(suffix: str, levels: int, **options) -> Callable[[Path, int], tuple[Path, list[Path]]]:
    """A differencing chain: base <- child1 <- ... ; the base holds data, so
    reads through the chain must compose it."""

    def make(folder: Path, size: int) -> tuple[Path, list[Path]]:
        base = folder / f"base.{suffix}"
        virtdisk.create(base, size, **options).close()
        with virtdisk.open(base) as disk:
            disk.attach()
            with open(disk.physical_path, "r+b") as device:
                device.seek(size - MiB)
                device.write(b"from the base" + bytes(MiB - 13))
            disk.detach()
        parents = [base]
        for level in range(1, levels + 1):
            child = folder / f"child{level}.{suffix}"
            virtdisk.create(child, 0, parent=parents[-1]).close()
            parents.append(child)
        return parents[-1], parents[:-1]

    return make


KINDS = {
    "dynamic-vhd": (_made("dynamic.vhd"), True),
    "differencing-vhd-2-levels": (_chain("vhd", 2), False),
    "dynamic-vhdx-512": (_made("dynamic.vhdx"), True),
    "dynamic-vhdx-4096": (_made("dynamic4k.vhdx", sector_size=4096), False),
    "fixed-vhdx-512": (_made("fixed.vhdx", fixed=True), True),
    "fixed-vhdx-4096": (_made("fixed4k.vhdx", fixed=True, sector_size=4096), False),
    "qemu-fixed-vhdx-zero-blocks": (_qemu_fixed_vhdx, True),
    "differencing-vhdx": (_chain("vhdx", 1), False),
}
QEMU_FORMAT = {".vhd": "vpc", ".vhdx": "vhdx"}


def read_device(device: str) -> bytes:
    with open(device, "rb") as block:
        return block.read()


def dump_read_only(image: Path, out: Path) -> bytes:
    """The disk's bytes as the provider shows them, attached read-only."""
    with virtdisk.open(image, read_only=True) as disk:
        disk.attach(read_only=True)
        data = read_device(disk.physical_path)
    out.write_bytes(data)
    return data


# ---- data round trip -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_files_written_through_the_mounted_disk_land_in_the_image(
    kind: str, images: Path, mount_point: Path
) -> None:
    mkfs, debugfs = require_tool("mkfs.ext4"), require_tool("debugfs")
    make, qemu_reads_it = KINDS[kind]
    image, parents = make(images, 64 * MiB)
    parent_hashes = {p: sha256(p) for p in parents}
    payload = os.urandom(3 * MiB + 512)

    with virtdisk.open(image) as disk:
        disk.attach()
        device = disk.physical_path
        seq = diskseq(device)
        sector = disk.info.logical_sector_size
        queue = Path("/sys/block", Path(device).name, "queue")
        assert int((queue / "logical_block_size").read_text()) == sector
        assert int(Path("/sys/block", Path(device).name, "size").read_text()) * 512 == 64 * MiB
        if parents:
            assert read_device(device)[63 * MiB : 63 * MiB + 13] == b"from the base"
        subprocess.run([mkfs, "-q", "-F", device], check=True)
        subprocess.run(["mount", device, str(mount_point)], check=True)
        (mount_point / "hello.txt").write_text(f"hello from {kind}\n")
        (mount_point / "random.bin").write_bytes(payload)
        unmount(mount_point, device)
        disk.detach()
        assert not still_bound(device, seq)

    # Differencing writes go to the child only.
    assert {p: sha256(p) for p in parents} == parent_hashes

    ours = dump_read_only(image, images / "ours.raw")
    if qemu_reads_it:
        qemu_img = require_tool("qemu-img")
        fmt = QEMU_FORMAT[image.suffix]
        reference = images / "qemu.raw"
        subprocess.run([qemu_img, "convert", "-f", fmt, "-O", "raw", str(image), str(reference)], check=True)
        subprocess.run(
            [qemu_img, "compare", "-f", "raw", "-F", "raw", str(reference), str(images / "ours.raw")],
            check=True,
        )
        if fmt == "vhdx":
            subprocess.run([qemu_img, "check", "-q", "-f", fmt, str(image)], check=True)
    else:
        reference = images / "ours.raw"
    assert len(ours) == 64 * MiB
    hello = subprocess.run([debugfs, "-R", "cat /hello.txt", str(reference)], capture_output=True, check=True)
    assert hello.stdout == f"hello from {kind}\n".encode()
    dumped = images / "random.out"
    subprocess.run(
        [debugfs, "-R", f"dump /random.bin {dumped}", str(reference)], capture_output=True, check=True
    )
    assert dumped.read_bytes() == payload


@pytest.mark.parametrize(
    "kind", ["dynamic-vhd", "differencing-vhd-2-levels", "dynamic-vhdx-4096", "differencing-vhdx"]
)
def test_read_only_attach_refuses_writes_and_leaves_the_image_unchanged(kind: str, images: Path) -> None:
    make, _ = KINDS[kind]
    image, parents = make(images, 16 * MiB)
    before = {p: sha256(p) for p in [image, *parents]}
    with virtdisk.open(image, read_only=True) as disk:
        disk.attach(read_only=True)
        device = disk.physical_path
        assert Path("/sys/block", Path(device).name, "ro").read_text().strip() == "1"
        with pytest.raises(OSError):
            fd = os.open(device, os.O_WRONLY)
            try:
                os.write(fd, b"x" * 4096)
            finally:
                os.close(fd)
        read_device(device)
        disk.detach()
    assert {p: sha256(p) for p in [image, *parents]} == before


def test_a_writable_direct_vhdx_gets_a_new_data_write_guid(images: Path) -> None:
    # A VHDX mapped straight onto the loop device never calls write(): the
    # header update a first write makes must happen at attach.
    path = images / "flat.vhdx"
    virtdisk.create(path, 16 * MiB, fixed=True).close()
    with virtdisk.open(path, Access.GET_INFO) as disk:
        before = disk.info.identifier
    with virtdisk.open(path) as disk:
        disk.attach()
        assert not list(RUN_DIR.glob("*.json")) or path.resolve() not in {
            Path(json.loads(r.read_text())["image"]) for r in RUN_DIR.glob("*.json")
        }, "a contiguous VHDX maps directly, without FUSE"
        disk.detach()
    with virtdisk.open(path, Access.GET_INFO) as disk:
        assert disk.info.identifier != before


# ---- lifetime and detach rules -----------------------------------------------------


def make_dynamic(images: Path, name: str = "disk.vhdx", size: int = 32 * MiB) -> Path:
    path = images / name
    virtdisk.create(path, size).close()
    return path


def test_served_disk_detaches_and_its_server_ends_when_the_last_handle_closes(
    images: Path, no_new_mounts: None
) -> None:
    path = make_dynamic(images)
    first = virtdisk.open(path)
    second = virtdisk.open(path, Access.GET_INFO)
    first.attach()
    device = first.physical_path
    seq = diskseq(device)
    first.close()
    assert still_bound(device, seq), "another handle is still open: the disk must stay"
    assert second.physical_path == device and second.attached
    second.close()
    assert not still_bound(device, seq)
    assert not record_path(path).exists()


def test_served_disk_is_found_by_other_processes(images: Path) -> None:
    path = make_dynamic(images)
    with virtdisk.open(path) as disk:
        disk.attach()
        device = disk.physical_path
        result = run_python(f"""
            import virtdisk
            disk = virtdisk.open({str(path)!r}, virtdisk.Access.GET_INFO)
            print(disk.physical_path, disk.attached)
        """)
        assert result.split() == [device, "True"]
        listed = {d.physical_path: d.image_path for d in virtdisk.attached_disks()}
        assert listed[device] == path.resolve()
        with pytest.raises(virtdisk.DiskInUseError) as raised:
            disk.attach()
        assert raised.value.winerror == WinError.ERROR_SHARING_VIOLATION


def test_detach_of_a_served_disk_is_refused_while_mounted(images: Path, mount_point: Path) -> None:
    mkfs = require_tool("mkfs.ext4")
    path = make_dynamic(images)
    with virtdisk.open(path) as disk:
        disk.attach()
        device = disk.physical_path
        seq = diskseq(device)
        subprocess.run([mkfs, "-q", "-F", device], check=True)
        subprocess.run(["mount", device, str(mount_point)], check=True)
        with pytest.raises(virtdisk.DiskInUseError) as raised:
            disk.detach()
        assert raised.value.winerror == WinError.ERROR_DEVICE_IN_USE
        assert still_bound(device, seq)
        (mount_point / "still.txt").write_text("still served\n")
        unmount(mount_point, device)
        disk.detach()
        assert not still_bound(device, seq)


def test_detach_of_a_served_disk_that_is_not_attached_is_error_not_ready(images: Path) -> None:
    path = make_dynamic(images)
    with virtdisk.open(path) as disk:
        with pytest.raises(virtdisk.NotAttachedError) as raised:
            disk.detach()
        assert raised.value.winerror == WinError.ERROR_NOT_READY
        disk.attach()
        disk.detach()
        with pytest.raises(virtdisk.NotAttachedError):
            disk.detach()


def run_python(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_permanent_served_disk_outlives_its_process_until_a_later_detach(images: Path) -> None:
    path = make_dynamic(images)
    device = run_python(f"""
        import virtdisk
        with virtdisk.open({str(path)!r}) as disk:
            disk.attach(permanent=True)
            print(disk.physical_path)
    """)
    seq = diskseq(device)
    assert still_bound(device, seq)
    helper = record_of(path)["pid"]
    assert helper in helper_pids()
    with virtdisk.open(path, Access.GET_INFO) as disk:
        assert disk.physical_path == device and disk.attached
    # Data written now must be in the image when the detach returns.
    with open(device, "r+b") as block:
        block.seek(5 * MiB)
        block.write(b"permanent" * 1000)
    run_python(f"import virtdisk; virtdisk.detach({str(path)!r})")
    assert not still_bound(device, seq)
    assert not attachment_marked(path)
    wait_ended(helper)  # it answers, then exits
    assert not record_path(path).exists() and not sockets_of(path)
    assert not record_path(path, ".log").exists(), "a clean detach removes the helper's log"
    data = dump_read_only(path, images / "after.raw")
    assert data[5 * MiB : 5 * MiB + 9000] == b"permanent" * 1000


def attachment_marked(image: Path) -> bool:
    """Whether some process holds the image's attachment marker (share.h:
    a read lock on its byte 2**63 - 3), as the provider's own look-ups see it."""
    fd = os.open(image, os.O_RDONLY)
    try:
        probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 2**63 - 3, 1, 0)
        return struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["detach-permanent", "detach-own", "close-last-handle"])
def test_a_served_disk_leaves_no_marker_once_detach_or_close_returns(how: str, images: Path) -> None:
    """The helper answers, then ends; whatever it still holds when the
    caller hears the answer outlives the call.  Its end races the caller
    (which often runs first), so rounds: before, 4 in 10 rounds found the
    marker still held."""
    path = make_dynamic(images, size=8 * MiB)
    deadline = time.monotonic() + 60
    for _ in range(20):
        if time.monotonic() > deadline:
            break
        disk = virtdisk.open(path)
        disk.attach(permanent=how == "detach-permanent")
        helper = record_of(path)["pid"]
        if how == "detach-permanent":
            disk.close()
            virtdisk.detach(path)
        elif how == "detach-own":
            disk.detach()
        disk.close()
        assert not attachment_marked(path), "the image still shows an attachment after the call returned"
        wait_ended(helper)


def test_permanent_served_disk_detach_rules(images: Path) -> None:
    path = make_dynamic(images)
    with virtdisk.open(path) as disk:
        disk.attach(permanent=True, read_only=True)
        device = disk.physical_path
        seq = diskseq(device)
        other = virtdisk.open(path, Access.GET_INFO)
        with pytest.raises(virtdisk.DiskInUseError) as raised:
            disk.detach()
        assert raised.value.winerror == WinError.ERROR_SHARING_VIOLATION
        other.close()
        fd = os.open(device, os.O_RDONLY)
        try:
            with pytest.raises(virtdisk.DiskInUseError) as raised:
                disk.detach()
            assert raised.value.winerror == WinError.ERROR_DEVICE_IN_USE
            assert still_bound(device, seq), "a refused detach must not detach lazily"
        finally:
            os.close(fd)
    with (
        virtdisk.open(path, Access.GET_INFO | Access.ATTACH_RO) as disk,
        pytest.raises(virtdisk.VirtualDiskPermissionError),
    ):
        disk.detach()
    virtdisk.detach(path)
    assert not still_bound(device, seq)
    with pytest.raises(virtdisk.NotAttachedError):
        virtdisk.detach(path)


# ---- faults ----------------------------------------------------------------------


WRITER = """
import os, sys, virtdisk
disk = virtdisk.open({path!r})
disk.attach(permanent={permanent})
print(disk.physical_path, flush=True)
fd = os.open(disk.physical_path, os.O_RDWR)
block = os.urandom(1 << 20)
i = 0
while True:
    os.pwrite(fd, block, (i % 24) << 20)
    i += 1
    if i == 8:
        print("writing", flush=True)
"""


@contextmanager
def writer(path: Path, permanent: bool) -> Iterator[tuple[subprocess.Popen, str, int | None]]:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(path=str(path), permanent=permanent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        device = child.stdout.readline().strip()
        assert child.stdout.readline().strip() == "writing"
        yield child, device, diskseq(device)
    finally:
        child.kill()
        child.wait()


def wait_unbound(device: str, seq: int | None, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while still_bound(device, seq) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not still_bound(device, seq), f"{device} is still attached"


def wait_ended(pid: int, seconds: float = 10.0) -> None:
    """A killed process ends a moment after its signal (its descriptors
    close before it becomes a zombie)."""
    deadline = time.monotonic() + seconds
    while pid in helper_pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pid not in helper_pids(), f"helper {pid} is still running"


def assert_image_sound(path: Path) -> None:
    with virtdisk.open(path) as disk:
        # The device is gone; the server may still be closing the image after
        # its final flush, and until then the image counts as attached.
        deadline = time.monotonic() + 10
        while disk.attached and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not disk.attached
        disk.attach(read_only=True)
        read_device(disk.physical_path)
        disk.detach()
    if path.suffix == ".vhdx":
        qemu_img = require_tool("qemu-img")
        subprocess.run([qemu_img, "check", "-q", "-f", "vhdx", str(path)], check=True)


@pytest.mark.parametrize("name", ["disk.vhdx", "disk.vhd"])
def test_killing_the_attaching_process_mid_write_leaves_nothing_attached(
    name: str, images: Path, no_new_mounts: None
) -> None:
    path = make_dynamic(images, name)
    with writer(path, permanent=False) as (child, device, seq):
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    wait_unbound(device, seq)
    assert_image_sound(path)


HOLDER = """
import time, virtdisk
disk = virtdisk.open({path!r})
disk.attach()
print(disk.physical_path, flush=True)
time.sleep(60)
"""


def test_an_attachment_whose_device_is_gone_is_waited_for_not_refused(images: Path) -> None:
    """Between its device going and its own end, a helper still holds the
    claims it took over from the attacher: an open or attach then must wait
    for it (a second or two at most), not answer ERROR_SHARING_VIOLATION.
    The helper is stopped inside that window, which lasts milliseconds, so
    the test tries rounds until it has caught it a few times."""
    caught = 0
    for round_number in range(60):
        if caught == 3:
            break
        path = make_dynamic(images, f"round{round_number}.vhdx")
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER.format(path=str(path))], stdout=subprocess.PIPE, text=True
        )
        try:
            device = holder.stdout.readline().strip()
            seq = diskseq(device)
            helper = record_of(path)["pid"]
        finally:
            holder.kill()
            holder.wait()
        deadline = time.monotonic() + 10
        while still_bound(device, seq) and time.monotonic() < deadline:
            pass  # no sleep: the window to catch lasts milliseconds
        assert not still_bound(device, seq), f"{device} stayed attached after its holder was killed"
        try:
            os.kill(helper, signal.SIGSTOP)
        except ProcessLookupError:
            continue  # already ended: the window was missed
        state = _read(Path(f"/proc/{helper}/stat")).rpartition(")")[2].split()[:1]
        if state not in (["T"], ["t"]):
            os.kill(helper, signal.SIGCONT)  # a zombie, or not stopped yet: missed
            continue
        caught += 1
        resume = threading.Timer(0.3, os.kill, (helper, signal.SIGCONT))
        resume.start()
        try:
            with virtdisk.open(path) as disk:
                disk.attach(read_only=True)
                disk.detach()
        finally:
            resume.cancel()
            with contextlib.suppress(ProcessLookupError):
                os.kill(helper, signal.SIGCONT)
    assert caught, "the helper's last moments were never caught (60 rounds)"


@pytest.mark.parametrize("name", ["disk.vhdx", "disk.vhd"])
def test_killing_the_helper_mid_write_leaves_nothing_attached(
    name: str, images: Path, no_new_mounts: None
) -> None:
    path = make_dynamic(images, name)
    with writer(path, permanent=True) as (child, device, seq):
        helper = record_of(path)["pid"]
        server = server_of(helper)
        assert server is not None
        os.kill(helper, signal.SIGKILL)
        os.kill(server, signal.SIGKILL)
        time.sleep(0.2)  # writes keep coming while the server is gone
        child.kill()
        child.wait(timeout=10)
    wait_unbound(device, seq)
    wait_ended(helper)
    assert_image_sound(path)
    with pytest.raises(virtdisk.NotAttachedError):
        virtdisk.detach(path)
