"""A served disk's operation (a mirror, an attached compaction) ends with the
handle that started it, as on Windows: the handle closing cancels it, and a
process that dies closes its handles.

The operation runs in the disk's server process, not in the requester: a
requester killed with SIGKILL says nothing, so its helper must learn of the
death itself (it watches the requester's pidfd) and cancel.  Each round a
child process starts the operation through the helper's socket on a disk
this test attached and says so (the barrier, its stdout); the test follows
the server until the operation is under way (0 < done < total) or, for a
mirror, in sync, and kills the child (or has it close its handle).  The
server must then report the operation cancelled within a bounded wait, a
target the mirror created must be gone, and the disk must read back its
checksummed data.  The server's state is asked over the helper's socket
directly (serveproto.h), not through the requester's handle.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import virtdisk
from virtdisk import Access, WinError

from .conftest import RUN_DIR, loops_backed_under
from .test_compact import tools  # noqa: F401
from .test_compact_attached import _prepared
from .test_mirror import SIZE, _check_sums, _fill, _qemu, _raw, _read_device

pytestmark = pytest.mark.loop

MiB = 1 << 20

HEADER = struct.Struct("=IHHI")  # serveproto.h: magic, version, type, length
STATE = struct.Struct("=IIQQ")  # struct vd_msg_operation_state: kind, status, done, total
MAGIC, VERSION, OPERATION_STATUS, OPERATION_STATE = 0x50534456, 1, 8, 9
KIND = {"mirror": 1, "compact": 2}
WAIT_S = 60  # for the server to report the cancel: bounded, never a timing assertion

# Starts kind ("mirror" or "compact") on image through the raw API, says
# "started", and then waits; told "close" on stdin, closes the handle, says
# "closed" and waits on (alive); "close-ended": the same once its own job has
# ended (a mirror's does in sync).  The handle is taken from the wrapper, whose
# close would wait for the operation to end.
_REQUESTER = textwrap.dedent(
    """
    import sys, time
    import virtdisk
    from virtdisk import Access
    from virtdisk._native import ffi, lib
    kind, image, target = sys.argv[1:4]
    if kind == "mirror":
        disk = virtdisk.open(image, read_only=True)
    else:
        disk = virtdisk.open(image, Access.METAOPS | Access.GET_INFO)
    handle = disk._handle
    disk._handle, disk._closing, disk._closed = None, True, True  # the raw handle is this script's
    overlapped = ffi.new("OVERLAPPED *")
    progress = ffi.new("VIRTUAL_DISK_PROGRESS *")
    if kind == "mirror":
        version = {"Version": lib.MIRROR_VIRTUAL_DISK_VERSION_1}
        parameters = ffi.new("MIRROR_VIRTUAL_DISK_PARAMETERS *", version)
        path = ffi.new("WCHAR[]", target)
        parameters.Version1.MirrorVirtualDiskPath = path
        code = lib.MirrorVirtualDisk(handle, 0, parameters, overlapped)
    else:
        version = {"Version": lib.COMPACT_VIRTUAL_DISK_VERSION_1}
        parameters = ffi.new("COMPACT_VIRTUAL_DISK_PARAMETERS *", version)
        code = lib.CompactVirtualDisk(handle, 0, parameters, overlapped)
    print("started" if code == 997 else f"refused {code}", flush=True)
    command = sys.stdin.readline().strip()
    if command == "close-ended":
        # Its own job over first (a mirror's ends in sync): a running job's
        # cancel is not what this close tests.
        while lib.GetVirtualDiskOperationProgress(handle, overlapped, progress) == 0:
            if progress.OperationStatus != 997:
                break
            time.sleep(0.01)
        assert progress.OperationStatus == 0, progress.OperationStatus
    if command.startswith("close"):
        lib.CloseHandle(handle)
        print("closed", flush=True)
    sys.stdin.read()
    """
)


def _socket_of(image: Path) -> Path:
    """The helper's socket (<base>.<pid>.sock): every attachment listens."""
    st = image.stat()
    sockets = list(RUN_DIR.glob(f"{st.st_dev:x}-{st.st_ino:x}.*.sock"))
    assert len(sockets) == 1, sockets
    return sockets[0]


def _server_state(sock: Path) -> tuple[int, int, int, int]:
    """The server's operation: (kind, status, done, total), asked as any
    privileged client may (OPERATION_STATUS)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
        client.settimeout(30)
        client.connect(str(sock))
        client.send(HEADER.pack(MAGIC, VERSION, OPERATION_STATUS, 0))
        answer = client.recv(4096)
    magic, version, kind, length = HEADER.unpack_from(answer)
    assert (magic, version, kind, length) == (MAGIC, VERSION, OPERATION_STATE, len(answer) - HEADER.size)
    return STATE.unpack_from(answer, HEADER.size)


def _wait_cancelled(sock: Path, kind: str) -> tuple[int, int, int, int]:
    """Waits (bounded) until the server's operation is no longer running or
    mirrored: cancelled, or ended by itself.  Returns the final state."""
    deadline = time.monotonic() + WAIT_S
    while True:
        state = _server_state(sock)
        assert state[0] == KIND[kind], state
        if state[1] == WinError.ERROR_OPERATION_ABORTED:
            return state
        # A compaction may end by itself; a mirror ends only when cancelled
        # (in sync it reports ERROR_SUCCESS and stays mirrored).
        if kind == "compact" and state[1] != WinError.ERROR_IO_PENDING:
            return state
        assert time.monotonic() < deadline, f"the server still runs the {kind} after {WAIT_S} s: {state}"
        time.sleep(0.02)


class _Requester:
    """The child process that starts the operation and then waits."""

    def __init__(self, kind: str, image: Path, target: Path | None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _REQUESTER, kind, str(image), str(target or "")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def started(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.strip() == "started", f"the requester did not start the operation: {line!r}"

    def close_handle(self, command: str = "close") -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "closed"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _wait_for(sock: Path, moment: str) -> tuple[int, int, int, int]:
    """Waits until the server's operation is at moment: "running" (0 < done <
    total, still pending) or "in-sync" (a mirror's copy done); the state then."""
    deadline = time.monotonic() + WAIT_S
    while True:
        state = _server_state(sock)
        if moment == "running" and state[1] == WinError.ERROR_IO_PENDING and 0 < state[2] < state[3]:
            return state
        if moment == "in-sync" and state[1] == WinError.ERROR_SUCCESS and state[0] == KIND["mirror"]:
            return state
        assert state[1] in (WinError.ERROR_IO_PENDING, WinError.ERROR_SUCCESS), state
        assert time.monotonic() < deadline, f"the operation never got {moment}: {state}"


def test_a_killed_requesters_mirror_is_cancelled(images: Path) -> None:
    """A kill loop, bounded in rounds and time: the requester dies while the
    mirror copies, or while it is in sync (the operation Windows keeps
    pending until a break or a cancel); either way the mirror is cancelled,
    the disk stays the source, unchanged, and the new target is removed."""
    source, target = images / "source.vhdx", images / "target.vhdx"
    virtdisk.create(source, SIZE).close()
    deadline = time.monotonic() + 240
    rounds = running = 0
    with virtdisk.open(source) as disk:
        disk.attach(read_only=False)
        device = disk.physical_path
        filled = _fill(device, 21)
        sock = _socket_of(source)
        while rounds < 6 and time.monotonic() < deadline:
            moment = "running" if rounds % 2 == 0 else "in-sync"
            requester = _Requester("mirror", source, target)
            try:
                requester.started()
                _wait_for(sock, moment)
            finally:
                requester.kill()
            at_kill = _server_state(sock)
            if moment == "running" and at_kill[1] != WinError.ERROR_SUCCESS:
                running += 1  # not in sync yet when it died
            final = _wait_cancelled(sock, "mirror")
            assert final[1] == WinError.ERROR_OPERATION_ABORTED
            assert not target.exists(), "the cancelled mirror's new target was left behind"
            _check_sums(_read_device(device), filled, MiB)
            rounds += 1
        # Nothing runs: this process's own mirror starts, and gets in sync.
        disk.mirror(target)
        assert _server_state(sock)[1] == WinError.ERROR_SUCCESS
    # Its handle closing (the attacher's last) cancelled that one too.
    assert not target.exists()
    assert not loops_backed_under(images)
    assert rounds >= 3
    print(f"{rounds} rounds, {running} killed while copying")
    assert running, "no kill landed while the mirror copied"
    _qemu("check", "-f", "vhdx", str(source))
    _check_sums(_raw(source, images, "vhdx"), filled, MiB)


def test_a_killed_requesters_compaction_is_cancelled(images: Path, tools) -> None:  # noqa: F811
    """A kill loop over fresh copies of one image, bounded in rounds and
    time: the requester dies while the server compacts the disk attached
    read-only; the compaction stops, the disk reads as before, a new
    compaction runs to its end, and the image equals the original."""
    original, _block, _dropped = _prepared(images, tools, "vhdx", 192)
    reference = images / "reference.vhdx"
    shutil.copyfile(original, reference)
    expected = _raw(reference, images, "vhdx")
    deadline = time.monotonic() + 240
    rounds = landed = 0
    while rounds < 5 and time.monotonic() < deadline:
        shutil.copyfile(reference, original)
        # Without METAOPS: the requester's compaction needs the only one.
        with virtdisk.open(original, Access.ATTACH_RO | Access.DETACH | Access.GET_INFO) as disk:
            disk.attach(read_only=True)
            sock = _socket_of(original)
            requester = _Requester("compact", original, None)
            try:
                requester.started()
                _wait_for(sock, "running")
            finally:
                requester.kill()
            at_kill = _server_state(sock)
            final = _wait_cancelled(sock, "compact")
            if at_kill[1] != WinError.ERROR_SUCCESS:
                # Still running when its requester died: cancelled, not finished.
                landed += 1
                assert final[1] == WinError.ERROR_OPERATION_ABORTED, final
            assert _read_device(disk.physical_path, len(expected)) == expected
            # Nothing runs: a new compaction starts and ends.
            with virtdisk.open(original, Access.METAOPS | Access.GET_INFO) as compacting:
                compacting.compact()
            assert _read_device(disk.physical_path, len(expected)) == expected
            disk.detach()
        _qemu("check", "-f", "vhdx", str(original))
        assert _raw(original, images, "vhdx") == expected
        rounds += 1
    assert rounds >= 3
    print(f"{rounds} rounds, {landed} killed while compacting")
    assert landed, "no kill landed while the compaction ran"


@pytest.mark.parametrize(
    ("kind", "moment"), [("mirror", "running"), ("mirror", "in-sync"), ("compact", "running")]
)
def test_closing_the_requesting_handle_cancels(images: Path, tools, kind: str, moment: str) -> None:  # noqa: F811
    """The requester closes the handle and lives on: the operation is
    cancelled all the same, a mirror in sync too (on Windows still the
    handle's pending operation until a break).  A compaction may end before
    the close reaches it: then the round is tried again, a few times."""
    if kind == "mirror":
        image, target = images / "source.vhdx", images / "target.vhdx"
        virtdisk.create(image, SIZE).close()
    else:
        image, target = _prepared(images, tools, "vhdx", 192)[0], None
        reference = images / "reference.vhdx"
        shutil.copyfile(image, reference)
    landed = False
    for _ in range(1 if kind == "mirror" else 3):
        if kind == "compact":
            shutil.copyfile(reference, image)
        access = Access.ATTACH_RO | Access.DETACH | Access.GET_INFO if kind == "compact" else None
        with virtdisk.open(image, access) as disk:
            disk.attach(read_only=kind == "compact")
            device = disk.physical_path
            if kind == "mirror":
                filled = _fill(device, 22)
            shown = _read_device(device)
            sock = _socket_of(image)
            requester = _Requester(kind, image, target)
            try:
                requester.started()
                _wait_for(sock, moment)
                requester.close_handle("close-ended" if moment == "in-sync" else "close")
                at_close = _server_state(sock)
                final = _wait_cancelled(sock, kind)
                assert requester.process.poll() is None, "the requester died: the close was not tested"
            finally:
                requester.kill()
            landed = at_close[1] != WinError.ERROR_SUCCESS or kind == "mirror"
            if landed:
                assert final[1] == WinError.ERROR_OPERATION_ABORTED, final
            assert target is None or not target.exists(), "the cancelled mirror's new target was left behind"
            assert _read_device(device) == shown
            if kind == "mirror":
                _check_sums(shown, filled, MiB)
            disk.detach()
        if landed:
            break
    assert landed, "every compaction ended before the close reached it"


# Attaches image (not permanently: its handles hold the disk), fills it with
# checksummed data (test_mirror._fill), mirrors it onto target until in
# sync, says the device, and waits to be killed.
_ATTACHER = textwrap.dedent(
    """
    import sys
    import virtdisk
    from tests.test_mirror import _fill
    image, target = sys.argv[1:3]
    disk = virtdisk.open(image)
    disk.attach(read_only=False)
    _fill(disk.physical_path, 23)
    disk.mirror(target)
    print(disk.physical_path, flush=True)
    sys.stdin.read()
    """
)


def test_a_killed_attachers_mirror_in_sync_is_cancelled_not_kept(images: Path) -> None:
    """The attacher itself started the mirror (through its own channel to the
    helper) and dies in sync: its handles are closed, so the mirror is
    cancelled before the attachment ends with them (the session's end alone
    would keep a target in sync)."""
    source, target = images / "source.vhdx", images / "target.vhdx"
    virtdisk.create(source, SIZE).close()
    attacher = subprocess.Popen(
        [sys.executable, "-c", _ATTACHER, str(source), str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert attacher.stdout is not None
        device = attacher.stdout.readline().strip()
        assert device.startswith("/dev/loop"), device
        shown = _read_device(device)
    finally:
        attacher.kill()
        attacher.wait()
    deadline = time.monotonic() + WAIT_S
    while loops_backed_under(images):
        assert time.monotonic() < deadline, "the attachment outlived its attacher"
        time.sleep(0.05)
    assert not target.exists(), "the dead attacher's mirror target was kept"
    _qemu("check", "-f", "vhdx", str(source))
    assert _raw(source, images, "vhdx") == shown
