"""A detached disk's device number is free for the next attacher on the
machine at once.  Detach and close must judge their own disk by its binding,
not by the number: another process that binds the same /dev/loopN while a
detach waits out the teardown must neither make the detach fail nor have its
own device touched."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import virtdisk

from .conftest import diskseq, still_bound

pytestmark = pytest.mark.loop

MiB = 1 << 20

# A second attacher that wants exactly /dev/loopN: it opens the device and
# tries LOOP_CONFIGURE (autoclear, so that its device goes when it closes)
# until the disk there is gone and the number is its own, as losetup
# /dev/loopN in a retry loop would.  Real ioctls on a real device, in a
# process of its own.
THIEF = textwrap.dedent("""
    import errno, fcntl, os, struct, sys, time
    LOOP_CONFIGURE, LO_FLAGS_AUTOCLEAR = 0x4C0A, 4
    device, backing = sys.argv[1], sys.argv[2]
    file_fd = os.open(backing, os.O_RDWR)
    name = b"device-reuse-test"
    # struct loop_config: fd, block_size, loop_info64 (lo_flags at 60), reserved
    config = struct.pack("=II5Q4I64s64s32s2Q8Q", file_fd, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                         LO_FLAGS_AUTOCLEAR, name, b"", b"", 0, 0, *[0] * 8)
    print("ready", flush=True)
    deadline = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < deadline:
        fd = os.open(device, os.O_RDWR)
        try:
            fcntl.ioctl(fd, LOOP_CONFIGURE, config)
        except OSError as error:
            os.close(fd)
            if error.errno != errno.EBUSY:
                raise
            continue
        seq = open(f"/sys/block/{os.path.basename(device)}/diskseq").read().strip()
        print("took", seq, flush=True)
        sys.stdin.read()  # holds the device until the test lets go
        os.close(fd)
        sys.exit(0)
    print("missed", flush=True)
""")


@contextmanager
def thief(device: str, backing: Path, seconds: float = 20.0) -> Iterator[subprocess.Popen]:
    child = subprocess.Popen(
        [sys.executable, "-c", THIEF, device, str(backing), str(seconds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        yield child
    finally:
        child.stdin.close()  # its device (autoclear) goes with its descriptor
        child.wait(timeout=30)


def attach(path: Path, permanent: bool) -> tuple[virtdisk.VirtualDisk, str, int | None]:
    disk = virtdisk.open(path)
    disk.attach(permanent=permanent)
    return disk, disk.physical_path, diskseq(disk.physical_path)


KINDS = {
    "direct-permanent": ("disk.vhd", {"fixed": True}, True),
    "direct": ("disk.vhd", {"fixed": True}, False),
    "served-permanent": ("disk.vhdx", {}, True),
    "served": ("disk.vhdx", {}, False),
}


@pytest.mark.parametrize("kind", KINDS)
def test_detach_succeeds_and_spares_the_next_attacher_of_the_same_number(kind: str, images: Path) -> None:
    name, options, permanent = KINDS[kind]
    path = images / name
    virtdisk.create(path, 8 * MiB, **options).close()
    backing = images / "thief.img"
    backing.write_bytes(bytes(MiB))
    taken = 0
    deadline = time.monotonic() + 60
    for _ in range(8):
        if time.monotonic() > deadline:
            break
        disk, device, seq = attach(path, permanent)
        try:
            with thief(device, backing) as other:
                if permanent:
                    disk.close()
                    virtdisk.detach(path)  # refused with ERROR_DEVICE_IN_USE before
                else:
                    disk.detach()
                assert not still_bound(device, seq), "the detach reported success with the disk still there"
                answer = other.stdout.readline().split()
                if answer[:1] == ["took"]:
                    taken += 1
                    their_seq = int(answer[1])
                    assert still_bound(device, their_seq), "the other attacher's device was detached"
                    autoclear = Path("/sys/block", Path(device).name, "loop", "autoclear").read_text()
                    assert autoclear.strip() == "1", "the detach changed the other attacher's device"
            if answer[:1] == ["took"]:
                # It let go: a device nobody (not our helper) holds any more goes.
                deadline_gone = time.monotonic() + 10
                while still_bound(device, their_seq) and time.monotonic() < deadline_gone:
                    time.sleep(0.02)
                assert not still_bound(device, their_seq), "something of ours still holds its device"
        finally:
            disk.close()
        with virtdisk.open(path) as again:
            again.attach()
            again.detach()
    assert taken, "the other attacher never got the number (8 rounds)"
