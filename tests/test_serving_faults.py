"""Serving that cannot hang (issue 11): kill the attacher, the helper's
supervisor, its FUSE server, or both at random moments, many times, and find
no hung process, no mount, no loop device and no stray file; forked children
that neither keep nor end their parent's attachment; a helper socket that
only privileged peers command, that no silent client holds up, and that never
runs a request its caller was told had failed.

Each test uses a private run directory (VIRTDISK_RUN_DIR), so everything in
it, and every helper process that names it in its environment, is the test's
own.  The provider reads the variable once per process: the work happens in
child processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtdisk

from .conftest import diskseq, helpers_of, read_text_or_empty, require_tool, state_of, still_bound

pytestmark = pytest.mark.loop

MiB = 1 << 20
# Rounds of each kill loop (the issue asks for 100); bounded in time by the
# per-round limits below, and by VIRTDISK_KILL_ROUNDS for a quick local run.
ROUNDS = int(os.environ.get("VIRTDISK_KILL_ROUNDS", "100"))
# How long a killed process or its helper may take to be gone before the
# round counts as a hang (D state is reported as such).
GONE_WITHIN = 30.0


# ---- processes of this test ---------------------------------------------------


def wait_gone(pids: list[int], what: str) -> None:
    """Waits until every pid has ended; a survivor is a hang (D state named)."""
    deadline = time.monotonic() + GONE_WITHIN
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if state_of(pid) not in ("", "Z")]
        if not alive:
            return
        time.sleep(0.02)
    states = {pid: state_of(pid) for pid in pids if state_of(pid) not in ("", "Z")}
    pytest.fail(f"{what} still there after {GONE_WITHIN} s (pid: state {states}): hung")


def mounts_under(run_dir: Path) -> list[str]:
    return [
        line for line in read_text_or_empty(Path("/proc/self/mounts")).splitlines() if f" {run_dir}/" in line
    ]


def env_for(run_dir: Path) -> dict[str, str]:
    return {**os.environ, "VIRTDISK_RUN_DIR": str(run_dir)}


def run_python(
    code: str, run_dir: Path, *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env_for(run_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


LIST = "import virtdisk; virtdisk.attached_disks()"


def assert_nothing_left(run_dir: Path, images: Path, bindings: dict[str, int | None]) -> None:
    """After a list (which collects what dead helpers left): no helper, no
    mount, no file but bounded logs, and none of the bindings (device: its
    diskseq, taken while it was surely ours) still in place: a device bound
    to a dead server's file serves nothing, and nobody else would let it go."""
    run_python(LIST, run_dir)
    assert not helpers_of(run_dir)
    assert not mounts_under(run_dir)
    left = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    # Lock files outlive their claims by design, bounded by sweeps (share.h,
    # tests/test_sharing.py), which keep a count and a mark; nothing may
    # still be claimed in them.
    bookkeeping = {"lock-files.count", "lock-files.swept"}
    assert [name for name in left if not name.endswith((".log", ".lock")) and name not in bookkeeping] == []
    assert len([name for name in left if name.endswith(".log")]) <= 32  # VD_RUN_MAX_LOGS
    for name in left:
        if name.endswith(".lock"):
            fd = os.open(run_dir / name, os.O_RDONLY)
            try:
                asked = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 100, 103, 0)
                answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, asked)
                assert struct.unpack("hhqqi4x", answer)[0] == fcntl.F_UNLCK, f"{name} is still claimed"
            finally:
                os.close(fd)
    for device, seq in bindings.items():
        assert not still_bound(device, seq), f"{device} is still bound to a dead helper's served file"


# ---- the kill loops -------------------------------------------------------------------

ATTACHER = """
import os, sys, virtdisk
disk = virtdisk.open(sys.argv[1])
disk.attach()
print(disk.physical_path, flush=True)
fd = os.open(disk.physical_path, os.O_RDWR)
block = os.urandom(1 << 16)
i = 0
while True:
    os.pwrite(fd, block, (i % 128) << 16)
    if i % 16 == 0:
        os.fsync(fd)  # through the loop device into the server: where kills hung
    i += 1
"""


# Every entry of the run directory examined: a dead server's mount that the
# next attach or list has not collected yet answers ENOTCONN; none may block.
STAT_ALL = """
import os, sys
for name in os.listdir(sys.argv[1]):
    try:
        os.lstat(os.path.join(sys.argv[1], name))
        os.listdir(os.path.join(sys.argv[1], name)) if name.startswith("mnt.") else None
    except OSError:
        pass
"""


def make_dynamic(folder: Path, name: str) -> Path:
    """A dynamic image that stays one to serve: the writers below touch only
    its first 8 MiB, so its last block is never allocated and it never
    becomes a contiguous VHDX, which would be attached directly."""
    path = folder / name
    virtdisk.create(path, 128 * MiB).close()
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run"
    yield path
    # A failed test may leave its helpers and a dead server's mount: they are
    # this test's own, and must not outlive it.
    for pid in helpers_of(path):
        os.kill(pid, signal.SIGKILL)
    for mount in mounts_under(path):
        subprocess.run(["umount", "-l", mount.split()[1]], check=False)


@pytest.mark.parametrize("victim", ["attacher", "supervisor", "server", "helper", "all"])
def test_killing_at_any_moment_leaves_nothing_hung_or_behind(
    victim: str, tmp_path: Path, run_dir: Path
) -> None:
    rng = random.Random(f"{victim}-{ROUNDS}")
    images = tmp_path / "images"
    images.mkdir()
    paths = [make_dynamic(images, "disk.vhdx"), make_dynamic(images, "disk.vhd")]
    bindings: dict[str, int | None] = {}
    hits = 0
    for round_number in range(ROUNDS):
        path = paths[round_number % 2]
        attacher = subprocess.Popen(
            [sys.executable, "-c", ATTACHER, str(path)],
            env=env_for(run_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        if victim in ("attacher", "all"):
            # Anywhere from interpreter start-up through attach to steady I/O.
            time.sleep(rng.uniform(0.0, 0.8))
        else:
            # Anywhere in the victim's life: from the moment it has its name
            # (before the mount, the loop device, the record) to steady I/O.
            wanted = {"supervisor": "virtdisk-serve", "server": "virtdisk-fuse"}.get(victim, "virtdisk-serve")
            deadline = time.monotonic() + GONE_WITHIN
            while wanted not in helpers_of(run_dir).values() and time.monotonic() < deadline:
                assert attacher.poll() is None, f"round {round_number}: the attacher failed before serving"
                time.sleep(0.002)
            assert wanted in helpers_of(run_dir).values(), f"round {round_number}: no {wanted} appeared"
            time.sleep(rng.uniform(0.0, 0.5))
        # The device, if the attach has said it: while the attacher lives
        # it holds the disk, so the binding seen now is surely ours.
        assert attacher.stdout is not None
        if select.select([attacher.stdout], [], [], 0)[0]:
            first = attacher.stdout.readline().strip()
            if first.startswith("/dev/loop") and attacher.poll() is None:
                bindings[first] = diskseq(first)
        helpers = helpers_of(run_dir)
        targets = {
            "attacher": [attacher.pid],
            "supervisor": [pid for pid, comm in helpers.items() if comm == "virtdisk-serve"],
            "server": [pid for pid, comm in helpers.items() if comm == "virtdisk-fuse"],
            "helper": list(helpers),
            "all": [attacher.pid, *helpers],
        }[victim]
        hits += bool(targets) and all(state_of(pid) not in ("", "Z") for pid in targets)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):  # it may just have ended by itself
                os.kill(pid, signal.SIGKILL)
        if victim != "attacher":
            # With its server gone the attacher's I/O fails at once; with only
            # the supervisor gone it may go on: either way it must be killable.
            time.sleep(0.05)
            attacher.kill()
        wait_gone([attacher.pid, *helpers, *helpers_of(run_dir)], f"round {round_number}: {victim} killed")
        attacher.wait(timeout=GONE_WITHIN)
        attacher.stdout.close()
        # Nothing may hang on the run directory, dead mount or not.
        if run_dir.exists():
            run_python(STAT_ALL, run_dir, str(run_dir))
    assert_nothing_left(run_dir, images, bindings)
    # Each image is still sound and attaches again.
    for path in paths:
        run_python(
            """
            import sys, virtdisk
            with virtdisk.open(sys.argv[1]) as disk:
                assert not disk.attached
                disk.attach(read_only=True)
                with open(disk.physical_path, "rb") as block:
                    assert len(block.read(1 << 20)) == 1 << 20
                disk.detach()
            """,
            run_dir,
            str(path),
        )
    assert_nothing_left(run_dir, images, bindings)
    print(f"{victim}: {ROUNDS} rounds, {hits} kills hit a live process, {len(bindings)} devices checked")
    assert hits >= ROUNDS * 9 // 10, "the kills must find their victims alive"


def test_io_fails_promptly_with_eio_when_the_server_dies(tmp_path: Path, run_dir: Path) -> None:
    path = make_dynamic(tmp_path, "disk.vhdx")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import mmap, os, sys, virtdisk
                with virtdisk.open(sys.argv[1]) as disk:
                    disk.attach()
                    fd = os.open(disk.physical_path, os.O_RDWR | os.O_DIRECT)
                    buffer = mmap.mmap(-1, 1 << 16)
                    os.preadv(fd, [buffer], 0)
                    print("ready", flush=True)
                    sys.stdin.readline()  # the test kills the server now
                    try:
                        for i in range(1, 256):  # not cached: O_DIRECT, new offsets
                            os.preadv(fd, [buffer], i << 16)
                        print("read on", flush=True)
                    except OSError as error:
                        print("errno", error.errno, flush=True)
                    os.close(fd)
                """
            ),
            str(path),
        ],
        env=env_for(run_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout and child.stdin
    assert child.stdout.readline().strip() == "ready"
    servers = [pid for pid, comm in helpers_of(run_dir).items() if comm == "virtdisk-fuse"]
    assert len(servers) == 1
    os.kill(servers[0], signal.SIGKILL)
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline().split() == ["errno", "5"]  # EIO, not a hang
    child.stdin.close()
    child.stdout.close()
    wait_gone([child.pid], "the process whose server died")
    child.wait()
    assert_nothing_left(run_dir, tmp_path, {})


# ---- fork ----------------------------------------------------------------------------

FORK = """
import os, sys, time, virtdisk
disk = virtdisk.open(sys.argv[1])
disk.attach()
device = disk.physical_path
mode = sys.argv[2]
pid = os.fork()
if pid == 0:
    if mode == "use":
        try:
            disk.physical_path
            print("child used it", flush=True)
        except virtdisk.VirtualDiskError as error:
            print("child refused", error.winerror, error.detail, flush=True)
        os._exit(0)
    if mode == "close":
        disk.close()  # the child's copy only
        os._exit(0)
    if mode == "exit":
        sys.exit(0)  # normal interpreter exit, finalizers and all
    if mode == "daemon":
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # so that the test's pipe ends with the parent
        os.dup2(null, 2)
        time.sleep(60)
        os._exit(0)
if mode == "daemon":
    seq = open(f"/sys/block/{os.path.basename(device)}/diskseq").read().strip()
    print(device, pid, seq, flush=True)
    os._exit(0)  # the daemon pattern: the parent goes, handles and all, the child stays
os.waitpid(pid, 0)
if True:
    # The parent's attachment is intact: found by others, readable.
    other = virtdisk.open(sys.argv[1], virtdisk.Access.GET_INFO)
    assert other.physical_path == device and other.attached, "the child touched the parent's attachment"
    other.close()
    with open(device, "rb") as block:
        assert len(block.read(1 << 20)) == 1 << 20
    disk.detach()
    print("detached", flush=True)
"""


@pytest.mark.parametrize("mode", ["close", "exit", "use"])
def test_a_forked_child_does_not_touch_the_parents_attachment(
    mode: str, tmp_path: Path, run_dir: Path
) -> None:
    path = make_dynamic(tmp_path, "disk.vhdx")
    out = run_python(FORK, run_dir, str(path), mode).stdout.splitlines()
    if mode == "use":
        refused = out.pop(0)
        assert refused.startswith("child refused 6 ")  # ERROR_INVALID_HANDLE
        assert "forked" in refused and "open the virtual disk again" in refused
    assert out[-1] == "detached"
    assert_nothing_left(run_dir, tmp_path, {})


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_a_forked_child_does_not_keep_a_non_permanent_disk_alive(
    kind: str, tmp_path: Path, run_dir: Path
) -> None:
    path = tmp_path / "disk.vhd"
    virtdisk.create(path, 16 * MiB, fixed=kind == "fixed").close()
    out = run_python(FORK, run_dir, str(path), "daemon").stdout.split()
    device, child, seq = out[0], int(out[1]), int(out[2])
    try:
        # The parent is gone; its child, which inherited everything, lives on.
        deadline = time.monotonic() + GONE_WITHIN
        while still_bound(device, seq) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state_of(child) not in ("", "Z")
        assert not still_bound(device, seq), "the forked child keeps the disk attached"
    finally:
        os.kill(child, signal.SIGKILL)
    assert_nothing_left(run_dir, tmp_path, {})


# ---- the helper's socket ----------------------------------------------------------------

HEADER = struct.Struct("=IHHI")  # serveproto.h: magic, version, type, length
MAGIC, VERSION, DETACH, RESULT = 0x50534456, 1, 4, 2


def attach_permanent(path: Path, run_dir: Path) -> tuple[str, Path, int | None]:
    """The device, the helper's socket and the binding's diskseq."""
    device = run_python(
        "import sys, virtdisk\n"
        "with virtdisk.open(sys.argv[1]) as d:\n d.attach(permanent=True)\n print(d.physical_path)",
        run_dir,
        str(path),
    ).stdout.strip()
    sockets = list(run_dir.glob("*.sock"))
    assert len(sockets) == 1
    return device, sockets[0], diskseq(device)


def detach_request(deadline_ms: int) -> bytes:
    payload = struct.pack("=Q", deadline_ms)
    return HEADER.pack(MAGIC, VERSION, DETACH, len(payload)) + payload


def boottime_ms() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000


def result_of(answer: bytes) -> int:
    magic, version, kind, length = HEADER.unpack_from(answer)
    assert (magic, version, kind, length) == (MAGIC, VERSION, RESULT, len(answer) - HEADER.size)
    return struct.unpack_from("=I", answer, HEADER.size)[0]


def unprivileged_detach(sock: Path, answered: bool) -> list[str]:
    """A command that sends sock a DETACH as root without CAP_SYS_ADMIN (what
    the API itself refuses), and prints the answer's status if answered,
    else exits without waiting for it."""
    client = f"""
import socket, struct, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
payload = struct.pack("=Q", time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000000 + 600000)
s.send(struct.pack("=IHHI", {MAGIC}, {VERSION}, {DETACH}, len(payload)) + payload)
if {answered}:
    print(struct.unpack_from("=I", s.recv(4096), 12)[0])
"""
    setpriv = require_tool("setpriv")
    return [
        setpriv,
        "--bounding-set=-sys_admin",
        "--inh-caps=-sys_admin",
        sys.executable,
        "-c",
        client,
        str(sock),
    ]


def test_the_socket_obeys_only_peers_with_cap_sys_admin(tmp_path: Path, run_dir: Path) -> None:
    path = make_dynamic(tmp_path, "disk.vhdx")
    device, sock, seq = attach_permanent(path, run_dir)
    result = subprocess.run(
        unprivileged_detach(sock, answered=True),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == str(virtdisk.WinError.ERROR_PRIVILEGE_NOT_HELD), result.stderr
    assert Path("/sys/block", Path(device).name, "loop").exists(), "an unprivileged peer detached the disk"
    # The old text command is refused too.
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(sock))
        s.send(b"detach\n")
        assert result_of(s.recv(4096)) == virtdisk.WinError.ERROR_INVALID_PARAMETER
    assert Path("/sys/block", Path(device).name, "loop").exists()
    run_python("import sys, virtdisk; virtdisk.detach(sys.argv[1])", run_dir, str(path))
    assert_nothing_left(run_dir, tmp_path, {device: seq})


def client_sockets(pid: int) -> int:
    """How many sockets the process holds (its listener and its clients)."""
    count = 0
    for fd in Path("/proc", str(pid), "fd").glob("*"):
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


def test_a_peer_that_exited_cannot_borrow_a_privileged_process_number(tmp_path: Path, run_dir: Path) -> None:
    """A peer without CAP_SYS_ADMIN queues a detach and exits while the
    helper is stopped; a privileged process is then given its process number
    (through ns_last_pid).  The helper reads capabilities by number, so it
    must also know the number still names its peer."""
    path = make_dynamic(tmp_path, "disk.vhdx")
    device, sock, seq = attach_permanent(path, run_dir)
    (supervisor,) = [pid for pid, comm in helpers_of(run_dir).items() if comm == "virtdisk-serve"]
    idle_sockets = client_sockets(supervisor)
    last_pid = Path("/proc/sys/kernel/ns_last_pid")
    impostor = None
    try:
        for _ in range(30):  # other processes on the machine may take the number first
            os.kill(supervisor, signal.SIGSTOP)
            try:
                peer = subprocess.Popen(unprivileged_detach(sock, answered=False))
                assert peer.wait(timeout=60) == 0
                last_pid.write_text(str(peer.pid - 1))
                impostor = subprocess.Popen(["sleep", "600"])  # root, with every capability
                if impostor.pid != peer.pid:
                    impostor.kill()
                    impostor.wait()
                    impostor = None
            finally:
                os.kill(supervisor, signal.SIGCONT)
            # The helper answers the queued request and drops the client, or,
            # fooled, detaches.
            deadline = time.monotonic() + GONE_WITHIN
            while (
                client_sockets(supervisor) > idle_sockets
                and Path("/sys/block", Path(device).name, "loop").exists()
                and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            assert Path("/sys/block", Path(device).name, "loop").exists(), (
                "a dead peer's number borrowed root's rights"
            )
            if impostor:
                break
        assert impostor, "no round gave the impostor the peer's number"
    finally:
        if impostor:
            impostor.kill()
            impostor.wait()
    run_python("import sys, virtdisk; virtdisk.detach(sys.argv[1])", run_dir, str(path))
    assert_nothing_left(run_dir, tmp_path, {device: seq})


def test_a_process_held_disk_refuses_detach_on_its_socket(tmp_path: Path, run_dir: Path) -> None:
    """Its socket is there for other processes' operations (a mirror); the
    disk itself belongs to its attacher's handles."""
    path = make_dynamic(tmp_path, "disk.vhdx")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, virtdisk\n"
            "with virtdisk.open(sys.argv[1]) as d:\n"
            " d.attach()\n print(d.physical_path, flush=True)\n sys.stdin.readline()",
            str(path),
        ],
        env=env_for(run_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        device = holder.stdout.readline().strip()
        seq = diskseq(device)  # the holder holds it: ours
        sockets = list(run_dir.glob("*.sock"))
        assert len(sockets) == 1
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(str(sockets[0]))
            s.send(detach_request(boottime_ms() + 10_000))
            assert result_of(s.recv(4096)) == virtdisk.WinError.ERROR_DEVICE_IN_USE
        assert Path("/sys/block", Path(device).name, "loop").exists(), "a socket client detached the disk"
        holder.stdin.write("go\n")
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert_nothing_left(run_dir, tmp_path, {device: seq})


def test_a_silent_client_holds_up_no_detach(tmp_path: Path, run_dir: Path) -> None:
    path = make_dynamic(tmp_path, "disk.vhdx")
    device, sock, seq = attach_permanent(path, run_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as silent:
        silent.connect(str(sock))  # and says nothing
        run_python("import sys, virtdisk; virtdisk.detach(sys.argv[1])", run_dir, str(path))
        assert not Path("/sys/block", Path(device).name, "loop").exists() or not helpers_of(run_dir)
    assert_nothing_left(run_dir, tmp_path, {device: seq})


def test_a_request_past_its_deadline_is_not_run(tmp_path: Path, run_dir: Path) -> None:
    path = make_dynamic(tmp_path, "disk.vhdx")
    device, sock, seq = attach_permanent(path, run_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(sock))
        # A requester that already told its caller "failed" at this deadline.
        s.send(detach_request(boottime_ms() - 1))
        assert result_of(s.recv(4096)) == virtdisk.WinError.ERROR_BUSY
    time.sleep(0.2)
    assert Path("/sys/block", Path(device).name, "loop").exists(), "a request past its deadline ran"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(sock))
        s.send(detach_request(boottime_ms() + 10_000))
        assert result_of(s.recv(4096)) == 0
    assert_nothing_left(run_dir, tmp_path, {device: seq})


# ---- never block on a path ------------------------------------------------------------------


def test_a_fifo_as_image_or_parent_is_refused_without_blocking(tmp_path: Path, run_dir: Path) -> None:
    fifo = tmp_path / "fifo.vhd"
    os.mkfifo(fifo)
    parent = tmp_path / "parent.vhd"
    virtdisk.create(parent, 8 * MiB).close()
    child = tmp_path / "child.vhd"
    virtdisk.create(child, parent=parent).close()
    parent.unlink()
    os.mkfifo(parent)  # the child's parent locator now names a FIFO
    result = run_python(
        """
        import sys, virtdisk
        for path in sys.argv[1:]:
            try:
                virtdisk.open(path).close()
                print("opened")
            except virtdisk.VirtualDiskError as error:
                print(type(error).__name__, error.winerror)
        """,
        run_dir,
        str(fifo),
        str(child),
        timeout=30,  # a blocking open() would wait forever for a writer
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("InvalidImageError"), lines
    assert lines[1].startswith("ParentNotFoundError") or "opened" not in lines[1], lines


# ---- hygiene -------------------------------------------------------------------------------


def test_what_a_killed_helper_left_goes_at_the_next_list(tmp_path: Path, run_dir: Path) -> None:
    path = make_dynamic(tmp_path, "disk.vhdx")
    device, sock, seq = attach_permanent(path, run_dir)
    helpers = helpers_of(run_dir)
    for pid in helpers:
        os.kill(pid, signal.SIGKILL)
    wait_gone(list(helpers), "the killed helper")
    # Leftovers of other dead processes, as a kill at the wrong moment leaves.
    (run_dir / "fe00-1.json.999999999").write_text("{}")
    (run_dir / "mnt.999999999.abcdefgh").mkdir()
    assert sock.exists() and list(run_dir.glob("*.json"))
    assert_nothing_left(run_dir, tmp_path, {device: seq})


def test_a_clean_detach_removes_the_log_and_a_failure_keeps_it(tmp_path: Path, run_dir: Path) -> None:
    path = make_dynamic(tmp_path, "disk.vhdx")
    run_python(
        "import sys, virtdisk\nwith virtdisk.open(sys.argv[1]) as d:\n d.attach()\n d.detach()",
        run_dir,
        str(path),
    )
    assert not list(run_dir.glob("*.log"))
    device, _, seq = attach_permanent(path, run_dir)
    server = [pid for pid, comm in helpers_of(run_dir).items() if comm == "virtdisk-fuse"]
    os.kill(server[0], signal.SIGKILL)
    wait_gone(list(helpers_of(run_dir)), "the helper of a killed server")
    logs = list(run_dir.glob("*.log"))
    assert len(logs) == 1 and "died" in logs[0].read_text()
    assert_nothing_left(run_dir, tmp_path, {device: seq})
