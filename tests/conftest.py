"""Shared fixtures: real loop devices where the machine allows, and no leftovers."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The provider's run directory (src/provider/rundir.h), as the tests' processes see it.
RUN_DIR = Path(os.environ.get("VIRTDISK_RUN_DIR") or "/run/virtdisk")

IN_CI = os.environ.get("CI", "").lower() == "true"


def pytest_configure(config: pytest.Config) -> None:
    # Here rather than in pyproject.toml: .ci/check-wheel runs a copy of the
    # tests outside the source tree.
    config.addinivalue_line("markers", "loop: attaches real loop devices (needs root and /dev/loop-control)")


def loop_devices_unavailable() -> str | None:
    """Why this machine cannot attach loop devices, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "loop devices are Linux's"  # (under Wine, /dev/loop-control is the host's)
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control (loop driver missing)"
    if os.geteuid() != 0:
        return "attaching loop devices needs root"
    return None


def require_tool(name: str) -> str:
    """The path of an external tool; a skip without it, a failure in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if IN_CI:
            pytest.fail(message + " (CI must install it: see .ci/run)")
        pytest.skip(message)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = loop_devices_unavailable()
    if reason is None:
        return
    for item in items:
        if "loop" in item.keywords:
            if IN_CI:
                # In CI a missing loop device is a broken runner, not a reason
                # to pass: make every such test fail loudly.
                item.add_marker(pytest.mark.usefixtures("_fail_without_loop"))
            else:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def _fail_without_loop() -> None:
    pytest.fail(f"loop devices are required in CI: {loop_devices_unavailable()}")


def served_under(folder: Path) -> dict[str, Path]:
    """Live FUSE-served attachments of images under folder (device: image), from
    the provider's records: their loop devices' backing file is the FUSE file."""
    found = {}
    for record in RUN_DIR.glob("*.json"):
        try:
            entry = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        image, device = Path(entry.get("image", "/")), entry.get("device", "")
        bound = Path("/sys/block", device.removeprefix("/dev/"), "loop").exists()
        alive = Path("/proc", str(entry.get("pid"))).exists()
        if image.is_relative_to(folder) and bound and alive:
            found[device] = image
    return found


_IMAGE_KINDS = {
    "fixed-vhd": ("fixed.vhd", {"fixed": True}),
    "fixed-vhdx": ("fixed.vhdx", {"fixed": True}),
    "fixed-vhdx-4096": ("fixed4k.vhdx", {"fixed": True, "sector_size": 4096}),
    "dynamic-vhd": ("dynamic.vhd", {}),
    "dynamic-vhdx": ("dynamic.vhdx", {}),
    "dynamic-vhdx-4096": ("dynamic4k.vhdx", {"sector_size": 4096}),
}


def make_image(kind: str, folder: Path) -> Path:
    """A 16 MiB image of the kind ("iso", "differencing-vhdx", or a key of
    _IMAGE_KINDS) in folder."""
    import virtdisk  # here, not at the top: the Wine runs load this conftest too

    if kind == "iso":
        genisoimage = require_tool("genisoimage")
        content = folder / "content"
        content.mkdir(exist_ok=True)
        (content / "readme.txt").write_text("hello\n")
        path = folder / "test.iso"
        subprocess.run([genisoimage, "-quiet", "-J", "-r", "-o", str(path), str(content)], check=True)
        return path
    if kind == "differencing-vhdx":
        base = folder / "base.vhdx"
        virtdisk.create(base, 16 << 20).close()
        child = folder / "child.vhdx"
        virtdisk.create(child, 0, parent=base).close()
        return child
    name, options = _IMAGE_KINDS[kind]
    path = folder / name
    virtdisk.create(path, 16 << 20, **options).close()
    return path


def backing_file(device: str) -> str | None:
    """The file a loop device is bound to, or None when it is free."""
    try:
        text = Path("/sys/block", Path(device).name, "loop", "backing_file").read_text().strip()
    except OSError:
        return None
    return text.removesuffix(" (deleted)")


def diskseq(device: str) -> int | None:
    """The kernel's number for the device's current binding (Linux 5.15),
    None where it has none."""
    try:
        return int(Path("/sys/block", Path(device).name, "diskseq").read_text())
    except (OSError, ValueError):
        return None


def still_bound(device: str, seq: int | None) -> bool:
    """Whether device still holds the binding it had when diskseq() read seq.
    A freed loop device goes to the machine's next attacher at once (another
    test, another program), and asking only "is it bound" would count that
    one; the kernel gives every bind and every unbind a new diskseq, so only
    the same one is still ours.  Without diskseq, any binding counts."""
    if not Path("/sys/block", Path(device).name, "loop").exists():
        return False
    now = diskseq(device)
    return seq is None or now is None or now == seq


def read_text_or_empty(path: Path) -> str:
    """A /proc file's text, or "" once its process is gone."""
    try:
        return path.read_text()
    except OSError:
        return ""


def state_of(pid: int) -> str:
    """The process's state letter (R, S, D, Z, ...), or "" once it is gone."""
    fields = read_text_or_empty(Path(f"/proc/{pid}/stat")).rpartition(")")[2].split()
    return fields[0] if fields else ""


def helpers_of(run_dir: Path) -> dict[int, str]:
    """Live helper processes (pid: comm) whose environment names run_dir."""
    marker = f"VIRTDISK_RUN_DIR={run_dir}".encode()
    found = {}
    for comm_path in Path("/proc").glob("[0-9]*/comm"):
        comm = read_text_or_empty(comm_path).strip()
        if comm not in ("virtdisk-serve", "virtdisk-fuse"):
            continue
        try:
            environ = (comm_path.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and state_of(int(comm_path.parent.name)) not in ("", "Z"):
            found[int(comm_path.parent.name)] = comm
    return found


def unmount(mount_point: Path, device: str, seconds: float = 30.0) -> None:
    """Unmounts mount_point, then waits until nothing holds device claimed.
    A mount namespace another process made while the file system was mounted
    (unshare -m, as the container tests on this machine do) keeps a copy of
    the mount, and with it the device, until that namespace ends: the
    disk is rightly refused a detach until then."""
    subprocess.run(["umount", str(mount_point)], check=True)
    deadline = time.monotonic() + seconds
    while True:
        try:
            os.close(os.open(device, os.O_RDONLY | os.O_EXCL))
            return
        except OSError as error:
            if error.errno != errno.EBUSY or time.monotonic() > deadline:
                raise


def bound_to(device: str, image: Path) -> bool:
    """Whether device is still bound to image itself (a direct attachment).
    Asking only "is it bound" would count another process that got the
    same, freed, device number a moment later."""
    return backing_file(device) == str(image.resolve())


def loops_backed_under(folder: Path) -> list[str]:
    """Loop devices whose backing file lies under folder, directly or served."""
    found = []
    for loop_dir in Path("/sys/block").glob("loop*/loop"):
        device = "/dev/" + loop_dir.parent.name
        backing = backing_file(device)
        if backing is not None and Path(backing).is_relative_to(folder):
            found.append(device)
    return found + [device for device in served_under(folder) if device not in found]


@pytest.fixture
def images(tmp_path: Path):
    """A folder for the test's images; whatever a test leaves attached there is
    detached afterwards, and the test fails for having left it."""
    yield tmp_path
    leaked = loops_backed_under(tmp_path)
    served = served_under(tmp_path)
    for device in leaked:
        subprocess.run(["umount", "-q", device], check=False)
        if device in served:
            # A helper holds a permanent served disk: only a detach ends it,
            # by device, since the test may have renamed or deleted the image.
            subprocess.run([sys.executable, "-m", "virtdisk", "detach", device], check=False)
        else:
            subprocess.run(["losetup", "-d", device], check=False)
    assert not leaked, f"test left loop devices attached: {leaked}"


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind(tmp_path_factory: pytest.TempPathFactory):
    """The final check: no loop device still points into this run's temporary folders."""
    base = tmp_path_factory.getbasetemp()
    yield
    leaked = loops_backed_under(base)
    assert not leaked, f"loop devices still attached to test images: {leaked}"


@pytest.fixture(scope="session")
def ioctl_fault_double(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/doubles/ioctl_fault_double.c built as a library for LD_PRELOAD in a
    test's subprocess (its top comment says how to choose the failures)."""
    compiler = require_tool("gcc")
    library = tmp_path_factory.mktemp("doubles") / "ioctl_fault_double.so"
    source = Path(__file__).parent / "doubles" / "ioctl_fault_double.c"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-Wall", "-o", str(library), str(source), "-ldl", "-lpthread"],
        check=True,
    )
    return library


@pytest.fixture
def mount_point(images: Path):
    """An empty folder to mount on, unmounted (if still mounted) afterwards."""
    folder = images / "mnt"
    folder.mkdir()
    yield folder
    subprocess.run(["umount", "-q", str(folder)], check=False)


def server_of(device: str) -> int:
    """The pid of the FUSE server behind a served device: the child of the
    helper its record names."""
    for record in RUN_DIR.glob("*.json"):
        entry = json.loads(record.read_text())
        if entry.get("device") == device:
            helper = int(entry["pid"])
            children = Path(f"/proc/{helper}/task/{helper}/children").read_text().split()
            return int(children[0])
    raise AssertionError(f"no record for {device}")
