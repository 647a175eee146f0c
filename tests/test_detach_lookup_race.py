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
OPENAT = 257  # x86_64

# The racer: binds exactly /dev/loopN to its own file the moment the number
# is free (LOOP_CONFIGURE answers EBUSY while it is not), permanent as plain
# losetup makes it, and holds no descriptor afterwards, so that a detach
# that took its device for ours would tear it down.  Real ioctls on a real
# device, in a process of its own; it frees only what it bound (by seq).
RACER = textwrap.dedent("""
    import errno, fcntl, os, struct, sys, time
    LOOP_CONFIGURE, LOOP_CLR_FD = 0x4C0A, 0x4C01
    device, backing = sys.argv[1], sys.argv[2]
    name = os.path.basename(device)
    def seq():
        return open(f"/sys/block/{name}/diskseq").read().strip()
    mine = None
    for line in sys.stdin:
        if line.strip() == "bind":
            file_fd = os.open(backing, os.O_RDWR)
            config = struct.pack("=II5Q4I64s64s32s2Q8Q", file_fd, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                 0, b"lookup-race-test", b"", b"", 0, 0, *[0] * 8)
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
                    break
                except OSError as error:
                    if error.errno != errno.EBUSY:
                        raise
                finally:
                    os.close(fd)
            os.close(file_fd)
            print("took", mine or "nothing", flush=True)
        elif line.strip() == "free":
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


@contextmanager
def racer(device: str, backing: Path) -> Iterator[subprocess.Popen]:
    child = subprocess.Popen(
        [sys.executable, "-c", RACER, device, str(backing)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
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
        if len(fields) < 3 or int(fields[0]) != OPENAT:
            return False
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
            memory.seek(int(fields[2], 16))
            name = memory.read(64).split(b"\0", 1)[0]
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


def test_a_detach_by_lookup_never_touches_a_binding_made_after_its_lookup(images: Path) -> None:
    strace = require_tool("strace")
    path = images / "disk.vhd"
    virtdisk.create(path, 8 * MiB, fixed=True).close()
    backing = images / "racer.img"
    content = os.urandom(MiB)
    backing.write_bytes(content)
    checksum = hashlib.sha256(content).hexdigest()
    rounds = raced = 0
    deadline = time.monotonic() + 90
    while rounds < 6 and time.monotonic() < deadline:
        rounds += 1
        with virtdisk.open(path) as disk:
            disk.attach(permanent=True)
            device = disk.physical_path
        seq = diskseq(device)
        detacher = subprocess.Popen(
            [strace, "-o", "/dev/null", "-P", device, "-e", "trace=openat",
             "-e", "inject=openat:delay_enter=60000000:when=1",
             sys.executable, "-c", DETACHER, str(path)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            with racer(device, backing) as other:
                # Barrier: the detacher has looked its disk up and is about
                # to open the device it found.
                child = None
                wait_until = time.monotonic() + 30
                while time.monotonic() < wait_until:
                    children = Path(f"/proc/{detacher.pid}/task/{detacher.pid}/children").read_text().split()
                    child = int(children[0]) if children else None
                    if child is not None and parked_at_open(child, device):
                        break
                    assert detacher.poll() is None, "the detacher ended before opening the device"
                    time.sleep(0.005)
                else:
                    pytest.fail("the detacher never reached its open of the device")
                end_binding(device, seq)
                answer = ask(other, "bind")
                their_seq = int(answer[1]) if answer[:1] == ["took"] and answer[1].isdigit() else None
                assert parked_at_open(child, device), "the detacher went on before the test let it"
                # Let it go: the tracer's death resumes the parked open.
                os.kill(detacher.pid, signal.SIGKILL)
                detacher.wait(timeout=30)
                outcome = json.loads(child_output(detacher))
                if their_seq is not None:
                    raced += 1
                    assert still_bound(device, their_seq), f"the detach tore down the racer's device: {outcome}"
                    autoclear = Path("/sys/block", Path(device).name, "loop", "autoclear").read_text().strip()
                    assert autoclear == "0", "the detach changed the racer's device"
                    got = read_device(device, MiB)
                    assert hashlib.sha256(got).hexdigest() == checksum, "the racer's device shows other data"
                    # Our disk was gone before the detach acted: a clear refusal.
                    assert not outcome["detached"], outcome
                    assert outcome["winerror"] == virtdisk.WinError.ERROR_NOT_READY, outcome
                    assert device in outcome["message"], outcome
                assert ask(other, "free") == ["freed"]
        finally:
            if detacher.poll() is None:
                detacher.kill()
                detacher.wait()
        # Nothing of ours is left: the image opens for writing again.
        virtdisk.open(path).close()
    assert raced, f"the racer never got the number ({rounds} rounds)"


def child_output(detacher: subprocess.Popen) -> str:
    """The detacher's one line of outcome (it inherited the pipe from
    strace), waited for a bounded time."""
    ready, _, _ = select.select([detacher.stdout], [], [], 60)
    assert ready, "the detacher hangs"
    return detacher.stdout.readline()
