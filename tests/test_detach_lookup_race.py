"""A detach that finds its disk by lookup (a permanent disk, detached by a
later process) learns a device number, and a number names a binding only
until it ends: between the lookup and the detach, the disk can be detached
by someone else (an administrator's ``losetup -d``) and another attacher
can bind the same /dev/loopN to its own file.  The detach must then leave
that attacher's device alone: it acts only through a descriptor that still
shows the binding its lookup found.

The window is microseconds wide, so the test holds it open: the detacher
runs under strace, which delays its first open of the device (after the
lookup) until the test has ended the disk and a racer process has bound the
number; then the test lets it go (a barrier, not a timing).  Everything
touched here is the test's own: its disk, its racer's device and file."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

import virtdisk

from .conftest import diskseq, require_tool, still_bound

pytestmark = pytest.mark.loop

MiB = 1 << 20
LOOP_CLR_FD = 0x4C01
# openat(2)'s number, as /proc/PID/syscall shows it.
OPENAT = {"x86_64": 257, "aarch64": 56}.get(platform.machine())

# The racer: binds exactly /dev/loopN to its own file the moment the number
# is free (LOOP_CONFIGURE answers EBUSY while it is not), permanent as plain
# losetup makes it, and holds no descriptor afterwards, so that a detach
# that took its device for ours would tear it down (or, on request,
# read-only and autoclear, held open: other flags for a lister to confuse).  Real ioctls on a real
# device, in a process of its own; it frees only what it bound (by seq).
RACER = textwrap.dedent("""
    import errno, fcntl, os, struct, sys, time
    LOOP_CONFIGURE, LOOP_CLR_FD = 0x4C0A, 0x4C01
    device, backing = sys.argv[1], sys.argv[2]
    name = os.path.basename(device)
    def seq():
        return open(f"/sys/block/{name}/diskseq").read().strip()
    mine = held = None
    for line in sys.stdin:
        if line.split()[:1] == ["bind"]:
            # "bind": writable and permanent; "bind held": read-only and
            # autoclear, held open by the racer until "free".
            hold = line.split()[1:] == ["held"]
            file_fd = os.open(backing, os.O_RDONLY if hold else os.O_RDWR)
            config = struct.pack("=II5Q4I64s64s32s2Q8Q", file_fd, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                 5 if hold else 0, b"lookup-race-test", b"", b"", 0, 0, *[0] * 8)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    fd = os.open(device, os.O_RDWR)
                except OSError as error:
                    if error.errno != errno.ENXIO:  # in rundown: gone in a moment
                        raise
                    continue
                try:
                    fcntl.ioctl(fd, LOOP_CONFIGURE, config)
                    mine = seq()
                except OSError as error:
                    if error.errno != errno.EBUSY:
                        raise
                if mine and hold:
                    held = fd
                    break
                os.close(fd)
                if mine:
                    break
            os.close(file_fd)
            print("took", mine or "nothing", flush=True)
        elif line.strip() == "free":
            if held is not None:
                os.close(held)  # autoclear: the device goes with it
                held = mine = None
            if mine is not None and os.path.exists(f"/sys/block/{name}/loop") and seq() == mine:
                fd = os.open(device, os.O_RDONLY)
                fcntl.ioctl(fd, LOOP_CLR_FD)
                os.close(fd)
            mine = None
            print("freed", flush=True)
""")

# The detacher: the ordinary way to detach a permanent disk from another
# process, by its image; prints the outcome.
DETACHER = textwrap.dedent("""
    import json, sys, virtdisk
    try:
        virtdisk.detach(sys.argv[1])
        print(json.dumps({"detached": True}), flush=True)
    except virtdisk.VirtualDiskError as error:
        print(json.dumps({"detached": False, "winerror": error.winerror, "message": str(error)}), flush=True)
""")


# The reporter: GetStorageDependencyInformation of the disk (version 2,
# the leaf's entry): its device and what the flags say of it.
REPORTER = textwrap.dedent("""
    import json, sys, virtdisk
    from virtdisk._native import ffi, lib
    disk = virtdisk.open(sys.argv[1], virtdisk.Access.GET_INFO)
    buffer = ffi.new("char[]", 4096)
    info = ffi.cast("STORAGE_DEPENDENCY_INFO *", buffer)
    info.Version = 2
    used = ffi.new("ULONG *")
    code = lib.GetStorageDependencyInformation(disk._handle, lib.GET_STORAGE_DEPENDENCY_FLAG_DISK_HANDLE,
                                               4096, info, used)
    entry = ffi.cast("STORAGE_DEPENDENCY_INFO_TYPE_2 *", info.Version2Entries)[0]
    name, flags = entry.DependencyDeviceName, entry.DependencyTypeFlags
    print(json.dumps({"code": int(code),
                      "device": "" if name == ffi.NULL else ffi.string(name),
                      "read_only": bool(flags & lib.DEPENDENT_DISK_FLAG_READ_ONLY),
                      "permanent": bool(flags & lib.DEPENDENT_DISK_FLAG_PERMANENT_LIFETIME)}),
          flush=True)
""")


# The lister: what attached_disks() says of one device.
LISTER = textwrap.dedent("""
    import json, sys, virtdisk
    found = [
        {"image": str(disk.image_path), "read_only": disk.read_only, "permanent": disk.permanent}
        for disk in virtdisk.attached_disks()
        if disk.physical_path == sys.argv[1]
    ]
    print(json.dumps(found), flush=True)
""")


@contextmanager
def racer(device: str, backing: Path) -> Iterator[subprocess.Popen]:
    child = subprocess.Popen(
        [sys.executable, "-c", RACER, device, str(backing)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield child
    finally:
        with suppress(OSError, ValueError):
            child.stdin.write("free\n")
            child.stdin.flush()
        with suppress(OSError, ValueError):
            child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def ask(child: subprocess.Popen, line: str) -> list[str]:
    child.stdin.write(line + "\n")
    child.stdin.flush()
    return child.stdout.readline().split()


def parked_at_open(pid: int, device: str) -> bool:
    """Whether process pid is stopped in an openat() of device: strace holds
    it there, after its lookup and before it acts on the device."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
        if OPENAT is None or len(fields) < 3 or int(fields[0]) != OPENAT:
            return False
        address, name = int(fields[2], 16), b""
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
            # Up to each page's end: the next page may not be mapped.
            while b"\0" not in name and len(name) < 4096:
                memory.seek(address + len(name))
                name += memory.read(4096 - (address + len(name)) % 4096)
        name = name.split(b"\0", 1)[0]
    except (OSError, ValueError):
        return False
    return name == os.fsencode(device)


def end_binding(device: str, seq: int | None) -> None:
    """Detaches the test's own disk behind the detacher's back, as
    ``losetup -d`` would, and waits until that binding is gone."""
    fd = os.open(device, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while still_bound(device, seq) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not still_bound(device, seq), f"{device} stayed bound after LOOP_CLR_FD"


def read_device(device: str, size: int) -> bytes:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


class Parked:
    """A process that runs script (DETACHER, REPORTER) on target under
    strace, which stops its first openat() of park_at until the test lets
    it go."""

    def __init__(self, strace: str, park_at: str, target: str, script: str = DETACHER) -> None:
        self.park_at = park_at
        self.process = subprocess.Popen(
            [strace, "-o", "/dev/null", "-P", park_at, "-e", "trace=openat",
             "-e", "inject=openat:delay_enter=60000000:when=1",
             sys.executable, "-c", script, target],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.child: int | None = None

    def wait_parked(self) -> None:
        """The barrier: the detacher has done its lookups and is about to
        open what it found."""
        assert OPENAT is not None, f"openat's system call number on {platform.machine()} is not known here"
        pid = self.process.pid
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            self.child = int(children[0]) if children else None
            if self.child is not None and parked_at_open(self.child, self.park_at):
                return
            assert self.process.poll() is None, "the detacher ended before its open"
            time.sleep(0.005)
        pytest.fail(f"the detacher never reached its open of {self.park_at}")

    def release(self) -> dict:
        """Lets it go on (the tracer's death resumes the parked open) and
        returns what it printed."""
        assert self.child is not None and parked_at_open(self.child, self.park_at), "it went on too early"
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        assert ready, "the detacher hangs"
        return json.loads(self.process.stdout.readline())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def check_racer(device: str, their_seq: int, checksum: str, outcome: dict, autoclear: str = "0") -> None:
    """The racer's device is as it made it: its binding, its flags, its data."""
    assert still_bound(device, their_seq), f"the detach tore down the racer's device: {outcome}"
    now = Path("/sys/block", Path(device).name, "loop", "autoclear").read_text().strip()
    assert now == autoclear, "the detach changed the racer's device"
    assert hashlib.sha256(read_device(device, MiB)).hexdigest() == checksum, (
        "the racer's device shows other data"
    )


def racer_file(folder: Path) -> tuple[Path, str]:
    backing = folder / "racer.img"
    content = os.urandom(MiB)
    backing.write_bytes(content)
    return backing, hashlib.sha256(content).hexdigest()


def attach_permanent(path: Path) -> tuple[str, int | None]:
    with virtdisk.open(path) as disk:
        disk.attach(permanent=True)
        device = disk.physical_path
    return device, diskseq(device)


class Rounds:
    """Up to count rounds, within 90 s, on a fixed VHD of the test's own,
    attached permanently at the start of each; the test counts in raced the
    rounds in which the racer got the number, and the rounds fail if it
    never did."""

    def __init__(self, images: Path, count: int) -> None:
        self.path = images / "disk.vhd"
        virtdisk.create(self.path, 8 * MiB, fixed=True).close()
        self.backing, self.checksum = racer_file(images)
        self.count = count
        self.raced = 0

    def __iter__(self) -> Iterator[tuple[str, int | None]]:
        rounds = 0
        deadline = time.monotonic() + 90
        while rounds < self.count and time.monotonic() < deadline:
            rounds += 1
            yield attach_permanent(self.path)
            # Nothing of ours is left: the image opens for writing again.
            virtdisk.open(self.path).close()
        assert self.raced, f"the racer never got the number ({rounds} rounds)"


def their_seq(answer: list[str]) -> int | None:
    """The racer's diskseq from its answer "took SEQ", or None when it did
    not get the number."""
    return int(answer[1]) if answer[:1] == ["took"] and answer[1].isdigit() else None


def test_a_detach_by_lookup_never_touches_a_binding_made_after_its_lookup(images: Path) -> None:
    strace = require_tool("strace")
    rounds = Rounds(images, 6)
    path = rounds.path
    for device, seq in rounds:
        detacher = Parked(strace, device, str(path))
        try:
            with racer(device, rounds.backing) as other:
                detacher.wait_parked()
                end_binding(device, seq)
                their = their_seq(ask(other, "bind"))
                outcome = detacher.release()
                if their is not None:
                    rounds.raced += 1
                    check_racer(device, their, rounds.checksum, outcome)
                    # Our disk was gone before the detach acted: a clear refusal.
                    assert not outcome["detached"], outcome
                    assert outcome["winerror"] == virtdisk.WinError.ERROR_NOT_READY, outcome
                    assert device in outcome["message"], outcome
                assert ask(other, "free") == ["freed"]
        finally:
            detacher.stop()


def test_a_detach_by_device_detaches_nothing_once_the_device_holds_another_binding(images: Path) -> None:
    """``virtdisk detach /dev/loopN`` finds the image on the device, then
    detaches that image.  If meanwhile the image was detached, the number
    bound by someone else and the image attached again as another device,
    the image is not what /dev/loopN holds any more: nothing is detached."""
    strace = require_tool("strace")
    rounds = Rounds(images, 4)
    path = rounds.path
    for device, seq in rounds:
        # Parked at its open of the image: after reading what the device holds.
        detacher = Parked(strace, str(path), device)
        moved = None
        try:
            with racer(device, rounds.backing) as other:
                detacher.wait_parked()
                virtdisk.detach(path)
                assert not still_bound(device, seq)
                their = their_seq(ask(other, "bind"))
                moved, moved_seq = attach_permanent(path)
                outcome = detacher.release()
                if their is not None:
                    rounds.raced += 1
                    assert moved != device
                    check_racer(device, their, rounds.checksum, outcome)
                    assert still_bound(moved, moved_seq), f"the image was detached from {moved}: {outcome}"
                    assert not outcome["detached"], outcome
                    assert outcome["winerror"] == virtdisk.WinError.ERROR_NOT_READY, outcome
                    assert device in outcome["message"], outcome
                assert ask(other, "free") == ["freed"]
        finally:
            detacher.stop()
            if moved is not None:
                with suppress(virtdisk.NotAttachedError):
                    virtdisk.detach(path)


def test_the_dependency_information_of_a_disk_never_shows_a_later_binding_of_its_number(images: Path) -> None:
    """GetStorageDependencyInformation finds the disk's device, then reads
    its flags (read-only, permanent) by number.  A disk detached in between,
    its number bound by another attacher with other flags: the answer is the
    disk detached, never attached with the other binding's flags."""
    strace = require_tool("strace")
    rounds = Rounds(images, 4)
    path = rounds.path
    for device, seq in rounds:
        # Parked at its first read of the flags: after finding the device.
        reporter = Parked(strace, f"/sys/block/{Path(device).name}/ro", str(path), REPORTER)
        try:
            with racer(device, rounds.backing) as other:
                reporter.wait_parked()
                end_binding(device, seq)
                their = their_seq(ask(other, "bind held"))
                outcome = reporter.release()
                assert outcome["code"] == 0, outcome
                if their is not None:
                    rounds.raced += 1
                    check_racer(device, their, rounds.checksum, outcome, autoclear="1")
                    # Our disk as it was (read-write, permanent) or detached.
                    assert outcome["device"] == "" or (
                        outcome["device"] == device and not outcome["read_only"] and outcome["permanent"]
                    ), f"the disk was described with another binding's flags: {outcome}"
                assert ask(other, "free") == ["freed"]
        finally:
            reporter.stop()


def test_the_list_never_mixes_a_disk_with_a_later_binding_of_its_number(images: Path) -> None:
    """attached_disks() lists the provider's devices, then reads what each
    holds (image, read-only, permanent) by number.  The disk detached in
    between and its number bound by another attacher with other flags: the
    list shows the disk as it was, or not at all, never the other binding's
    flags or file."""
    strace = require_tool("strace")
    rounds = Rounds(images, 4)
    path = rounds.path
    for device, seq in rounds:
        # Parked at its read of the read-only flag: after the list, after
        # reading the disk's image and lifetime.
        lister = Parked(strace, f"/sys/block/{Path(device).name}/ro", device, LISTER)
        try:
            with racer(device, rounds.backing) as other:
                lister.wait_parked()
                # Ended as losetup -d would; not waited for, since a lister
                # that holds the device open keeps it until it lets go.
                fd = os.open(device, os.O_RDONLY)
                try:
                    fcntl.ioctl(fd, LOOP_CLR_FD)
                finally:
                    os.close(fd)
                other.stdin.write("bind held\n")
                other.stdin.flush()
                outcome = lister.release()
                answer = other.stdout.readline().split()
                their = their_seq(answer)
                assert outcome in ([], [{"image": str(path), "read_only": False, "permanent": True}]), (
                    f"the list described the disk with another binding's file or flags: {outcome}"
                )
                assert not still_bound(device, seq), "the disk outlived its LOOP_CLR_FD"
                if their is not None:
                    rounds.raced += 1
                    check_racer(device, their, rounds.checksum, outcome, autoclear="1")
                assert ask(other, "free") == ["freed"]
        finally:
            lister.stop()
