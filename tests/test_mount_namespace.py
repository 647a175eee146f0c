"""The FUSE mount of a served disk is seen by no other process: its server
mounts it in a mount namespace of its own and detaches it at once
(src/provider/fuseserve.h).  A process that copies the host's mount namespace
(root's `unshare -m`, a user's `unshare -Urm`) at the very moment the file
system is mounted gets no copy of it, so it can neither see nor pin it: a
root process that binds whatever it finds there elsewhere would otherwise
keep the session alive after the detach, and the detach would wait for it
in vain (ERROR_BUSY after 60 s when the server mounted where it lived).  A
copy that only holds the mount did not pin it even then: removing the mount
folder removes the mounts on it in every namespace (Linux 3.18); the copies
are checked all the same, each round, to see nothing and keep nothing.

The moment is made exact, not raced for: VIRTDISK_TEST_STOP_MOUNTED=1 makes
the server stop itself (SIGSTOP) while mounted and not yet detached; the
namespaces are copied then, and the server goes on once every copier says it
is ready (the barrier).  Each test uses a run directory of its own
(VIRTDISK_RUN_DIR), made a shared mount so that a mount leaking out of the
server's namespace by propagation would show in it too."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtdisk

from .conftest import IN_CI, diskseq, helpers_of, read_text_or_empty, require_tool, state_of, still_bound

pytestmark = pytest.mark.loop

MiB = 1 << 20
ROUNDS = 4
WAIT = 30.0  # for a process to stop, to be ready, or to be gone: a hang otherwise
STOP = "VIRTDISK_TEST_STOP_MOUNTED"

# Binds every mount it finds under the run directory onto $PIN in its own
# namespace (what root can do to hold a copy), says how many, and holds its
# namespace until its standard input ends.
ROOT_HOLDER = r"""
found=0
for m in $(awk -v r="$RUN/" 'index($2, r) == 1 {print $2}' /proc/self/mounts); do
    mount --bind "$m" "$PIN" && found=$((found + 1))
done
echo "ready $found"
exec cat >/dev/null
"""
# A user's copy (its own user namespace): it cannot enter the run directory,
# it only holds what it copied.
USER_HOLDER = r"""
echo "ready $(awk -v r="$RUN/" 'index($2, r) == 1' /proc/self/mounts | wc -l)"
exec cat >/dev/null
"""


def mounts_seen_by(pid: int | str, run_dir: Path) -> list[str]:
    """The mounts under run_dir (the test's own) in pid's mount namespace;
    a root holder's bind of one shows as its pin folder, under tmp_path."""
    lines = read_text_or_empty(Path(f"/proc/{pid}/mountinfo")).splitlines()
    return [line for line in lines if f" {run_dir}/" in line or f" {run_dir.parent}/pin." in line]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {WAIT} s")
        time.sleep(0.005)


def env_for(run_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "VIRTDISK_RUN_DIR": str(run_dir), **extra}


def run_python(code: str, run_dir: Path, *args: str, **extra: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env_for(run_dir, **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def user_namespaces_work() -> bool:
    """Whether an unprivileged user may make a user and mount namespace here."""
    probe = subprocess.run(
        [require_tool("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups",
         require_tool("unshare"), "-Urm", "true"],
        cwd="/", capture_output=True,
    )  # fmt: skip
    return probe.returncode == 0


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """The test's own run directory, a shared mount (bound on itself)."""
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(path)], check=True)
        yield path
    finally:
        for pid in helpers_of(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", "-R", "-l", str(path)], check=False)


class Holder:
    """A process holding a copy of the host's mount namespace, made while
    the server is stopped with its file system mounted."""

    def __init__(self, kind: str, run_dir: Path, pin: Path) -> None:
        unshare = require_tool("unshare")
        if kind == "root":
            command = [unshare, "-m", "sh", "-c", ROOT_HOLDER]
        else:
            command = [require_tool("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups",
                       unshare, "-Urm", "sh", "-c", USER_HOLDER]  # fmt: skip
        self.kind = kind
        self.process = subprocess.Popen(
            command, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUN": str(run_dir), "PIN": str(pin)},
        )  # fmt: skip

    def ready(self) -> int:
        """Waits for the copy (the barrier) and returns how many mounts under
        the run directory it saw in it."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        assert line[:1] == ["ready"], f"the {self.kind} holder failed"
        return int(line[1])

    def end(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=WAIT)
        if self.process.stdout:
            self.process.stdout.close()


ATTACH = """
import sys, virtdisk
with virtdisk.open(sys.argv[1]) as disk:
    disk.attach(permanent=True)
    print(disk.physical_path)
"""

WRITE = """
import hashlib, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
data = os.urandom(1 << 20)
os.pwrite(fd, data, int(sys.argv[2]))
os.fsync(fd)
os.close(fd)
print(hashlib.sha256(data).hexdigest())
"""

# Holds the device open (so it stays bound to the dead server's file), reads
# once the test has killed the server, and prints the errno.
READ_AFTER_KILL = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buffer = mmap.mmap(-1, 1 << 16)
os.preadv(fd, [buffer], 0)
print("ready", flush=True)
sys.stdin.readline()
try:
    for i in range(1, 256):  # O_DIRECT, new offsets: nothing cached answers
        os.preadv(fd, [buffer], i << 16)
    print("read on")
except OSError as error:
    print(error.errno)
"""

READ_BACK = """
import hashlib, os, sys, virtdisk
with virtdisk.open(sys.argv[1]) as disk:
    disk.attach(read_only=True)
    fd = os.open(disk.physical_path, os.O_RDONLY)
    for pair in sys.argv[2:]:
        offset, digest = pair.split("=")
        assert hashlib.sha256(os.pread(fd, 1 << 20, int(offset))).hexdigest() == digest, offset
    os.close(fd)
    disk.detach()
"""


class StoppedAttach:
    """A permanent attach of image whose server has stopped itself while
    its file system is mounted and not yet detached."""

    def __init__(self, image: Path, run_dir: Path, **extra: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", ATTACH, str(image)],
            env=env_for(run_dir, **{STOP: "1"}, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        servers: list[int] = []

        def stopped() -> bool:
            assert self.process.poll() is None, f"the attacher ended early: {self.process.communicate()[1]}"
            servers[:] = [pid for pid, comm in helpers_of(run_dir).items() if comm == "virtdisk-fuse"]
            return len(servers) == 1 and state_of(servers[0]) == "T"

        try:
            wait_for(stopped, "the server stopping while mounted")
        except BaseException:
            self.close()
            raise
        self.server = servers[0]

    def go_on(self) -> str:
        """Lets the server go on; the attach's device."""
        os.kill(self.server, signal.SIGCONT)
        out, err = self.process.communicate(timeout=120)
        assert self.process.returncode == 0, err
        return out.strip()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def read_after_kill(device: str, server: int, run_dir: Path) -> str:
    """What a reader of device that holds it open meets once server is
    killed: the errno, or "read on"."""
    reader = subprocess.Popen(
        [sys.executable, "-c", READ_AFTER_KILL, device],
        env=env_for(run_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert reader.stdin and reader.stdout
    try:
        assert reader.stdout.readline().strip() == "ready"
        os.kill(server, signal.SIGKILL)
        reader.stdin.write("go\n")
        reader.stdin.flush()
        return reader.stdout.readline().strip()
    finally:
        reader.stdin.close()
        reader.wait(timeout=WAIT)
        reader.stdout.close()


def detach(image: Path, run_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "virtdisk", "detach", str(image)],
        env=env_for(run_dir), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_a_copied_namespace_neither_sees_nor_holds_the_mount(tmp_path: Path, run_dir: Path) -> None:
    kinds = ["root"] + (["user"] if user_namespaces_work() else [])
    if IN_CI:
        assert "user" in kinds, "unprivileged user namespaces must work in CI (unshare -Urm as nobody)"
    image = tmp_path / "disk.vhdx"
    virtdisk.create(image, 64 * MiB).close()
    written: dict[int, str] = {}
    for round_number in range(ROUNDS):
        holders: list[Holder] = []
        attach = StoppedAttach(image, run_dir)
        try:
            # The stop is inside the window: the server's own namespace holds the mount ...
            assert [line for line in mounts_seen_by(attach.server, run_dir) if " fuse.virtdisk " in line]
            # ... and the host's does not, not even by propagation into the shared run directory.
            assert mounts_seen_by("self", run_dir) == [], (
                "the server's mount is visible in the host's namespace"
            )
            for kind in kinds:
                pin = tmp_path / f"pin.{round_number}.{kind}"
                pin.mkdir()
                holders.append(Holder(kind, run_dir, pin))
            seen = {holder.kind: holder.ready() for holder in holders}  # the barrier: every copy made
            assert seen == {kind: 0 for kind in kinds}, "a copied namespace saw the server's mount"
            device = attach.go_on()
            seq = diskseq(device)
            offset = (round_number * 3 + 1) * MiB
            written[offset] = run_python(WRITE, run_dir, device, str(offset)).strip()
            if round_number == ROUNDS - 1:
                # A server that dies ends all the same: its device fails
                # reads at once, and the helper lets go of it.
                assert read_after_kill(device, attach.server, run_dir) == str(errno.EIO)
                wait_for(lambda: not helpers_of(run_dir), "the helper of a killed server ending")
            else:
                detach(image, run_dir)
            assert not still_bound(device, seq), f"round {round_number}: {device} still bound"
            wait_for(lambda: not helpers_of(run_dir), f"round {round_number}: the helper ending")
            for holder in holders:
                assert mounts_seen_by(holder.process.pid, run_dir) == [], f"{holder.kind} holder sees a mount"
            run_python(READ_BACK, run_dir, str(image), *(f"{o}={d}" for o, d in written.items()))
        finally:
            attach.close()
            for holder in holders:
                holder.end()
    assert not helpers_of(run_dir)
    assert mounts_seen_by("self", run_dir) == []
    print(f"{ROUNDS} rounds, namespaces copied by {kinds} while mounted, {len(written)} MiB read back")


@pytest.fixture(scope="module")
def unshare_refusing_double(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/doubles/unshare_refusing_double.c built for LD_PRELOAD."""
    library = tmp_path_factory.mktemp("doubles") / "unshare_refusing_double.so"
    source = Path(__file__).parent / "doubles" / "unshare_refusing_double.c"
    subprocess.run(
        [require_tool("gcc"), "-shared", "-fPIC", "-O1", "-Wall", "-o", str(library), str(source)], check=True
    )
    return library


def test_without_a_namespace_the_mount_shows_only_until_it_is_detached(
    tmp_path: Path, run_dir: Path, unshare_refusing_double: Path
) -> None:
    # unshare refused (a seccomp filter, RestrictNamespaces=): the server
    # mounts where it lives, detaches at once, and serves all the same.
    image = tmp_path / "disk.vhdx"
    virtdisk.create(image, 64 * MiB).close()
    attach = StoppedAttach(image, run_dir, LD_PRELOAD=str(unshare_refusing_double))
    try:
        # The fallback was taken: the mount is in the host's namespace.
        assert [line for line in mounts_seen_by("self", run_dir) if " fuse.virtdisk " in line]
        device = attach.go_on()
    finally:
        attach.close()
    assert mounts_seen_by("self", run_dir) == []
    assert not [name for name in os.listdir(run_dir) if name.startswith("mnt.")]
    assert any("no mount namespace" in log.read_text() for log in run_dir.glob("*.log"))
    digest = run_python(WRITE, run_dir, device, str(MiB)).strip()
    detach(image, run_dir)
    wait_for(lambda: not helpers_of(run_dir), "the helper ending")
    run_python(READ_BACK, run_dir, str(image), f"{MiB}={digest}")
