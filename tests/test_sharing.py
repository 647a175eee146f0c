"""Sharing rules across processes (src/provider/share.h, README "Sharing"):
one writer per image, read-only attachments and differencing parents kept
read-only, claims nobody without the privilege can take or fake, and
short-lived openers of the loop device tolerated.

The races use real processes released together by a barrier, many rounds,
and read every winner's checksummed data back after it detached."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import virtdisk
from virtdisk import Access

from .conftest import RUN_DIR, diskseq, require_tool, server_of, still_bound

pytestmark = pytest.mark.loop

MiB = 1 << 20
SHARING = virtdisk.WinError.ERROR_SHARING_VIOLATION
ROUNDS = 50
WORKERS = 4


def _stamp(worker: int, round_: int, length: int) -> bytes:
    """Data only this worker writes in this round: a checksum chain."""
    seed = f"{worker}:{round_}".encode()
    out = bytearray()
    while len(out) < length:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:length])


# ---- the racing harness ----------------------------------------------------

# contend(index, round, settled) tries once; a winner calls settled() while
# it still holds what it won, and lets go only after it returns: settled()
# returns when every contender has tried, so a winner cannot be done before
# another one starts.
Contender = Callable[[int, int, Callable[[], None]], "tuple[bool, int]"]


def _race_worker(contend: Contender, index: int, rounds: int, barrier, results) -> None:
    for round_ in range(rounds):
        barrier.wait(timeout=60)
        waited: list[bool] = []

        def settled(waited: list[bool] = waited) -> None:
            if not waited:
                waited.append(True)
                barrier.wait(timeout=60)

        try:
            won, code = contend(index, round_, settled)
        except Exception as error:  # reported, never swallowed
            won, code = False, repr(error)
        settled()
        results.put((round_, index, won, code))
        barrier.wait(timeout=60)


def race(contenders: list[Contender], rounds: int = ROUNDS) -> list[list[tuple[int, bool, object]]]:
    """Runs each contender in its own process, all released together each
    round; returns, per round, (index, won, code) of every contender."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(contenders))
    results = context.Queue()
    processes = [
        context.Process(target=_race_worker, args=(contend, index, rounds, barrier, results))
        for index, contend in enumerate(contenders)
    ]
    for process in processes:
        process.start()
    table: list[list[tuple[int, bool, object]]] = [[] for _ in range(rounds)]
    try:
        for _ in range(rounds * len(contenders)):
            round_, index, won, code = results.get(timeout=120)
            table[round_].append((index, won, code))
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return table


def assert_exactly_one_winner(table: list[list[tuple[int, bool, object]]]) -> None:
    for round_, outcomes in enumerate(table):
        winners = [index for index, won, _ in outcomes if won]
        losers = {code for _, won, code in outcomes if not won}
        assert len(winners) == 1, f"round {round_}: winners {winners}, outcomes {outcomes}"
        assert losers <= {SHARING}, f"round {round_}: losers answered {losers}"


# ---- one writer per image ------------------------------------------------------


def _writer(path: Path, block: int, read_only: bool = False) -> Contender:
    """Opens for writing (or read-only), attaches, writes its stamp at its own
    block (read-only: reads), closes: the attachment ends with the handle."""

    def contend(index: int, round_: int, settled: Callable[[], None]) -> tuple[bool, int]:
        try:
            disk = virtdisk.open(path, read_only=read_only)
        except virtdisk.VirtualDiskError as error:
            return False, error.winerror
        with disk:
            try:
                disk.attach(read_only=read_only)
            except virtdisk.VirtualDiskError as error:
                return False, error.winerror
            settled()
            if not read_only:
                offset = (round_ * WORKERS + index) * block
                fd = os.open(disk.physical_path, os.O_RDWR)
                try:
                    os.pwrite(fd, _stamp(index, round_, 64 * 1024), offset)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return True, 0

    return contend


def _check_stamps(path: Path, table, block: int) -> None:
    """Every winner's stamp is where it wrote it, and nothing else was
    written: read back through a fresh read-only attachment."""
    with virtdisk.open(path, read_only=True) as disk:
        disk.attach(read_only=True)
        fd = os.open(disk.physical_path, os.O_RDONLY)
        try:
            for round_, outcomes in enumerate(table):
                for index, won, _ in outcomes:
                    offset = (round_ * WORKERS + index) * block
                    expected = _stamp(index, round_, 64 * 1024) if won else bytes(64 * 1024)
                    got = os.pread(fd, 64 * 1024, offset)
                    assert got == expected, (
                        f"round {round_} worker {index} (won: {won}): data lost or cross-written"
                    )
        finally:
            os.close(fd)
        disk.detach()


@pytest.mark.parametrize(("name", "block"), [("race.vhdx", 1 * MiB), ("race.vhd", 2 * MiB), ("fixed.vhd", 0)])
def test_of_processes_racing_to_write_one_image_exactly_one_wins_and_no_data_is_lost(
    images: Path, name: str, block: int
) -> None:
    path = images / name
    fixed = block == 0
    step = block or 64 * 1024
    size = ROUNDS * WORKERS * step
    virtdisk.create(path, max(size, 3 * MiB), fixed=fixed, block_size=block).close()
    table = race([_writer(path, step) for _ in range(WORKERS)])
    # Each round's winner allocated a new block; two writers at once would
    # have placed theirs at the same file offset.
    _check_stamps(path, table, step)
    assert_exactly_one_winner(table)
    if name.endswith(".vhdx"):
        check = subprocess.run([require_tool("qemu-img"), "check", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_read_only_attaches_and_writers_exclude_each_other(images: Path) -> None:
    """Two processes attach read-only and two open for writing, all at once:
    one attachment per image, and an image attached read-only is not opened
    for writing elsewhere (nor the reverse)."""
    path = images / "mixed.vhdx"
    block = 1 * MiB
    virtdisk.create(path, ROUNDS * WORKERS * block, block_size=block).close()
    contenders = [
        _writer(path, block),
        _writer(path, block),
        _writer(path, block, True),
        _writer(path, block, True),
    ]
    table = race(contenders)
    assert_exactly_one_winner(table)
    # Only the writers (0 and 1) wrote; the readers' blocks stay empty.
    _check_stamps(path, [[(i, won and i < 2, code) for i, won, code in r] for r in table], block)


# ---- differencing chains -----------------------------------------------------------


def _parent_writer(parent: Path) -> Contender:
    """Opens the parent for changes (a writer) and holds it a moment."""

    def contend(index: int, round_: int, settled: Callable[[], None]) -> tuple[bool, int]:
        try:
            disk = virtdisk.open(parent, Access.METAOPS | Access.GET_INFO)
        except virtdisk.VirtualDiskError as error:
            return False, error.winerror
        with disk:
            settled()
        return True, 0

    return contend


def _child_user(child: Path, block: int, attach: bool) -> Contender:
    """Uses the child, so its parent must stay read-only: opens it (any access
    holds the chain), or attaches it and writes its stamp into it."""

    def contend(index: int, round_: int, settled: Callable[[], None]) -> tuple[bool, int]:
        try:
            disk = virtdisk.open(child, None if attach else Access.GET_INFO)
        except virtdisk.VirtualDiskError as error:
            return False, error.winerror
        with disk:
            if not attach:
                settled()
                return True, 0
            try:
                disk.attach()
            except virtdisk.VirtualDiskError as error:
                return False, error.winerror
            settled()
            fd = os.open(disk.physical_path, os.O_RDWR)
            try:
                os.pwrite(fd, _stamp(index, round_, 64 * 1024), (round_ * WORKERS + index) * block)
                os.fsync(fd)
            finally:
                os.close(fd)
        return True, 0

    return contend


@pytest.mark.parametrize("suffix", [".vhdx", ".vhd"])
@pytest.mark.parametrize("attach", [False, True], ids=["open", "attach"])
def test_a_used_child_and_a_writer_of_its_parent_exclude_each_other(
    images: Path, suffix: str, attach: bool
) -> None:
    parent = images / f"parent{suffix}"
    block = 2 * MiB
    virtdisk.create(parent, ROUNDS * WORKERS * block, block_size=block).close()
    child = images / f"child{suffix}"
    virtdisk.create(child, parent=parent).close()
    before = hashlib.sha256(parent.read_bytes()).hexdigest()
    # Worker 0 opens the parent for changes, worker 1 uses the child.
    table = race([_parent_writer(parent), _child_user(child, block, attach)])
    assert_exactly_one_winner(table)
    assert hashlib.sha256(parent.read_bytes()).hexdigest() == before
    if attach:
        # The child is intact (its parent unchanged) and holds every stamp.
        _check_stamps(child, [[(i, won and i == 1, code) for i, won, code in r] for r in table], block)


@pytest.mark.parametrize("suffix", [".vhdx", ".vhd"])
def test_a_parent_cannot_be_written_while_a_child_is_open(images: Path, suffix: str) -> None:
    parent = images / f"parent{suffix}"
    virtdisk.create(parent, 8 * MiB).close()
    child = images / f"child{suffix}"
    grandchild = images / f"grandchild{suffix}"
    virtdisk.create(child, parent=parent).close()
    with virtdisk.create(grandchild, parent=child):
        for ancestor in (parent, child):
            with pytest.raises(virtdisk.VirtualDiskError) as refused:
                virtdisk.open(ancestor)
            assert refused.value.winerror == SHARING
            assert "parent" in refused.value.detail
            # Reading it is fine, as on Windows.
            with virtdisk.open(ancestor, Access.GET_INFO) as reader:
                assert reader.info.virtual_size == 8 * MiB
    with virtdisk.open(parent):
        # ... and the reverse: no child over a parent being written, and
        # no child opened while its parent is.
        with pytest.raises(virtdisk.VirtualDiskError) as refused:
            virtdisk.create(images / f"other{suffix}", parent=parent)
        assert refused.value.winerror == SHARING
        assert not (images / f"other{suffix}").exists()
        with pytest.raises(virtdisk.VirtualDiskError) as refused:
            virtdisk.open(child, Access.GET_INFO)
        assert refused.value.winerror == SHARING


def test_a_parent_cannot_be_changed_while_a_child_is_attached_permanently(images: Path) -> None:
    parent = images / "parent.vhdx"
    virtdisk.create(parent, 8 * MiB).close()
    child = images / "child.vhdx"
    virtdisk.create(child, parent=parent).close()
    with virtdisk.open(child) as disk:
        disk.attach(permanent=True)
    try:
        for access in (Access.METAOPS, Access.ATTACH_RW):
            with pytest.raises(virtdisk.VirtualDiskError) as refused:
                virtdisk.open(parent, access | Access.GET_INFO)
            assert refused.value.winerror == SHARING
    finally:
        virtdisk.detach(child)
    with virtdisk.open(parent, Access.METAOPS | Access.GET_INFO) as disk:
        disk.resize(16 * MiB)


# ---- a user without the privilege cannot take, fake or block claims ---------------

NOBODY = 65534


def _block_as_nobody(image: str, ready, release) -> None:
    """In a forked child that has become `nobody` (no exec: the interpreter
    and the provider are already loaded): takes every lock an ordinary
    reader can, and holds a handle, then reports what it was refused."""
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    refused = []
    fd = os.open(image, os.O_RDONLY)
    # The old markers' bytes (the largest offsets) and qemu's, read-locked.
    for offset in (2**63 - 2, 2**63 - 3, 100, 101, 200, 201):
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, offset, 1, 0))
    held = virtdisk.open(image, Access.GET_INFO)
    try:
        os.listdir("/run/virtdisk")
    except PermissionError:
        refused.append("run-dir")
    try:
        with virtdisk.open(image, read_only=True) as disk:
            disk.attach(read_only=True)
    except virtdisk.VirtualDiskError as error:
        refused.append(f"attach {error.winerror}")
    ready.put(refused)
    release.wait(60)
    held.close()
    os.close(fd)


@contextlib.contextmanager
def nobody_blocking(image: Path) -> Iterator[list[str]]:
    context = multiprocessing.get_context("fork")
    ready, release = context.Queue(), context.Event()
    blocker = context.Process(target=_block_as_nobody, args=(str(image), ready, release))
    blocker.start()
    try:
        yield ready.get(timeout=60)
    finally:
        release.set()
        blocker.join(30)
        if blocker.is_alive():
            blocker.kill()


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder `nobody` can reach (pytest's own are root's, mode 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="virtdisk-share-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_user_without_the_privilege_cannot_block_root(shared_folder: Path) -> None:
    image = shared_folder / "disk.vhdx"
    virtdisk.create(image, 8 * MiB).close()
    image.chmod(0o644)
    with nobody_blocking(image) as refused:
        assert "run-dir" in refused, "the run directory must be closed to other users"
        assert f"attach {virtdisk.WinError.ERROR_PRIVILEGE_NOT_HELD}" in refused
        # Its handle and locks hold nothing against root: attach, detach a
        # permanent disk, open for changes.
        with virtdisk.open(image) as disk:
            disk.attach(permanent=True)
            device = disk.physical_path
            seq = diskseq(device)
        virtdisk.detach(image)
        assert not still_bound(device, seq)
        with virtdisk.open(image, Access.METAOPS | Access.GET_INFO) as disk:
            disk.resize(16 * MiB)
        # Nor can it see root's handles as its own claims would: root's
        # writer is still alone.
        with virtdisk.open(image):
            with pytest.raises(virtdisk.VirtualDiskError) as second:
                virtdisk.open(image)
            assert second.value.winerror == SHARING


def test_racing_root_writers_stay_exclusive_while_nobody_holds_locks(shared_folder: Path) -> None:
    """The rule still holds with an unprivileged user's locks in place."""
    image = shared_folder / "race.vhdx"
    block = 1 * MiB
    virtdisk.create(image, ROUNDS * WORKERS * block, block_size=block).close()
    image.chmod(0o644)
    with nobody_blocking(image):
        table = race([_writer(image, block) for _ in range(WORKERS)])
    assert_exactly_one_winner(table)
    _check_stamps(image, table, block)


# ---- transient openers of the loop device -----------------------------------------


def _flicker(device: str, stop: threading.Event, hold: float) -> None:
    """Opens and closes the device over and over, as blkid or udev would."""
    while not stop.is_set():
        try:
            fd = os.open(device, os.O_RDONLY)
        except OSError:
            time.sleep(0.001)
            continue
        time.sleep(hold)
        os.close(fd)
        time.sleep(0.002)


@pytest.mark.parametrize("name", ["disk.vhd", "disk.vhdx"])
def test_detach_and_close_wait_out_short_lived_openers(images: Path, name: str) -> None:
    path = images / name
    virtdisk.create(path, 8 * MiB, fixed=name.endswith(".vhd")).close()
    for round_ in range(10):
        disk = virtdisk.open(path)
        disk.attach(permanent=round_ % 2 == 0)
        device = disk.physical_path
        seq = diskseq(device)
        stop = threading.Event()
        # A thread, not a forked process: a fork would inherit the handle.
        flicker = threading.Thread(target=_flicker, args=(device, stop, 0.02))
        flicker.start()
        try:
            time.sleep(0.05)
            if round_ % 2 == 0:
                disk.close()
                virtdisk.detach(path)  # refused before: ERROR_DEVICE_IN_USE
            else:
                disk.close()  # before: left attached until the opener closed
            assert not still_bound(device, seq)
        finally:
            stop.set()
            flicker.join()
        # ... and so attaching it again is not refused as "already attached".
        with virtdisk.open(path) as again:
            again.attach()


def test_detach_still_refuses_a_disk_that_stays_open(images: Path) -> None:
    path = images / "disk.vhd"
    virtdisk.create(path, 8 * MiB, fixed=True).close()
    with virtdisk.open(path) as disk:
        disk.attach(permanent=True)
        device = disk.physical_path
    seq = diskseq(device)
    holder = os.open(device, os.O_RDONLY)
    try:
        with pytest.raises(virtdisk.DiskInUseError):
            virtdisk.detach(path)
        assert still_bound(device, seq)
        assert Path("/sys/block", Path(device).name, "loop", "autoclear").read_text().strip() == "0"
    finally:
        os.close(holder)
    virtdisk.detach(path)
    assert not still_bound(device, seq)


# ---- differencing children take their parent's geometry --------------------------


@pytest.mark.parametrize(
    ("suffix", "options"),
    [
        (".vhdx", {"block_size": 8 * MiB}),
        (".vhdx", {"block_size": 1 * MiB, "sector_size": 4096, "physical_sector_size": 4096}),
        (".vhd", {"block_size": 512 * 1024}),
    ],
)
def test_a_differencing_child_takes_its_parents_block_and_sector_sizes(
    images: Path, suffix: str, options: dict
) -> None:
    parent = images / f"parent{suffix}"
    virtdisk.create(parent, 16 * MiB, **options).close()
    child = images / f"child{suffix}"
    with virtdisk.create(child, parent=parent) as disk:
        info = disk.info
    with virtdisk.open(parent, Access.GET_INFO) as disk:
        expected = disk.info
    assert info.block_size == expected.block_size == options["block_size"]
    assert (info.logical_sector_size, info.physical_sector_size) == (
        expected.logical_sector_size,
        expected.physical_sector_size,
    )


def test_attach_refusal_names_the_device_or_none(images: Path) -> None:
    path = images / "disk.vhd"
    virtdisk.create(path, 8 * MiB, fixed=True).close()
    with virtdisk.open(path, read_only=True) as first, virtdisk.open(path, read_only=True) as second:
        first.attach(read_only=True)
        with pytest.raises(virtdisk.VirtualDiskError) as refused:
            second.attach(read_only=True)
        assert refused.value.winerror == SHARING
        assert "/dev/loop-1" not in str(refused.value)
        assert first.physical_path in refused.value.detail


@pytest.mark.parametrize("name", ["disk.vhd", "disk.vhdx"])
def test_the_next_open_waits_for_a_closed_attachment_still_being_held(images: Path, name: str) -> None:
    """An opener that outlasts close()'s wait delays the teardown; the next
    writer waits for it rather than finding the image still attached."""
    path = images / name
    virtdisk.create(path, 8 * MiB, fixed=name.endswith(".vhd")).close()
    for _ in range(2):
        disk = virtdisk.open(path)
        disk.attach()
        device = disk.physical_path
        fd = os.open(device, os.O_RDONLY)
        release = threading.Timer(1.2, os.close, (fd,))
        release.start()
        try:
            disk.close()  # waits a second, then returns with the device still held
            with virtdisk.open(path) as again:
                again.attach()
                assert again.physical_path
        finally:
            release.join()


def test_a_merge_does_not_write_into_a_parent_another_child_uses(images: Path) -> None:
    base = images / "base.vhdx"
    virtdisk.create(base, 8 * MiB).close()
    leaf, sibling = images / "leaf.vhdx", images / "sibling.vhdx"
    virtdisk.create(leaf, parent=base).close()
    virtdisk.create(sibling, parent=base).close()
    with virtdisk.open(sibling, Access.GET_INFO):
        with pytest.raises(virtdisk.VirtualDiskError) as refused:
            virtdisk.merge(leaf, 1)
        assert refused.value.winerror == SHARING
        assert "parent of another open or attached disk" in refused.value.detail
    virtdisk.merge(leaf, 1)


# ---- lock files ----------------------------------------------------------


def _lock_file(image: Path) -> Path:
    """The lock file of image (there must be exactly one)."""
    st = image.stat()
    found = list(RUN_DIR.glob(f"{st.st_dev:x}-{st.st_ino:x}-*.lock"))
    assert len(found) == 1, found
    return found[0]


def _lock_files(image: Path) -> list[Path]:
    st = image.stat()
    return list(RUN_DIR.glob(f"{st.st_dev:x}-{st.st_ino:x}-*.lock"))


def _birth_time(path: Path) -> tuple[int, int]:
    """(seconds, nanoseconds) of path's birth time, by stat(1); (0, 0) where
    the file system keeps none."""
    seconds = int(
        subprocess.run(["stat", "-c", "%W", str(path)], capture_output=True, text=True, check=True).stdout
    )
    if seconds <= 0:
        return 0, 0
    human = subprocess.run(["stat", "-c", "%w", str(path)], capture_output=True, text=True, check=True).stdout
    fraction = human.split()[1].partition(".")[2]
    return seconds, int(fraction.ljust(9, "0")[:9]) if fraction else 0


def _claims_on(lock: Path, offset: int) -> bool:
    """Whether some open file description read-locks byte offset of lock."""
    fd = os.open(lock, os.O_RDONLY)
    try:
        asked = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, offset, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, asked)
        return struct.unpack("hhqqi4x", answer)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_a_lock_file_is_named_after_the_image_files_device_inode_and_birth_time(images: Path) -> None:
    path = images / "disk.vhdx"
    virtdisk.create(path, 8 * MiB).close()
    st = path.stat()
    seconds, nanoseconds = _birth_time(path)
    with virtdisk.open(path):
        assert _lock_file(path).name == f"{st.st_dev:x}-{st.st_ino:x}-{seconds:x}-{nanoseconds:x}.lock"


def test_a_lock_file_outlives_its_claims_and_the_next_open_reuses_it(images: Path) -> None:
    """Creating and removing a lock file for every open cost a quarter of an
    open; the run directory stays bounded by sweeps instead (share.h)."""
    path = images / "disk.vhdx"
    virtdisk.create(path, 8 * MiB).close()
    first = virtdisk.open(path)
    second = virtdisk.open(path, Access.GET_INFO)
    lock = _lock_file(path)
    inode = lock.stat().st_ino
    assert _claims_on(lock, 100) and _claims_on(lock, 101), "the handles' HANDLE and WRITE claims"
    first.close()
    assert _claims_on(lock, 100) and not _claims_on(lock, 101), "the read-only handle's HANDLE only"
    second.close()
    # At once: another process's list or attach may sweep it from now on.
    assert lock.stat().st_ino == inode, "kept after the last claim ended"
    assert not _claims_on(lock, 100)
    with virtdisk.open(path):
        assert _lock_file(path).stat().st_ino == inode, "the next open uses the same file"
        assert _claims_on(lock, 101)


def test_a_claim_on_a_deleted_image_does_not_hold_a_new_file_with_its_inode(images: Path) -> None:
    """A claim can outlive its image file (a helper serving a deleted image);
    a new file that gets the freed inode is another image, unclaimed.  The
    stray claim here is the test's own lock on the old lock file, standing
    in for such a claimant (a test double)."""
    old = images / "old.vhdx"
    virtdisk.create(old, 8 * MiB).close()
    virtdisk.open(old).close()
    old_inode = old.stat().st_ino
    stray = os.open(_lock_file(old), os.O_RDONLY)
    try:
        for offset in (101, 201):  # WRITE held and denied, as a writer's claim
            fcntl.fcntl(stray, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, offset, 1, 0))
        old.unlink()
        # The file system hands a freed inode out again, soon if not at once.
        for attempt in range(200):
            new = images / f"new{attempt}.vhdx"
            new.write_bytes(b"")
            if new.stat().st_ino == old_inode:
                break
            new.unlink()
        else:
            pytest.skip("the file system did not reuse the inode in 200 files")
        new.unlink()
        virtdisk.create(new, 8 * MiB).close()
        if new.stat().st_ino != old_inode:
            pytest.skip("the inode was not reused by the image itself")
        with virtdisk.open(new):  # for writing: refused if the stray claim applied
            pass
    finally:
        os.close(stray)


def _list_disks() -> None:
    """Lists attached disks: the run directory's clean-up sweeps lock files
    (those there at the previous sweep, no claim on them)."""
    virtdisk.attached_disks()


def _sweep_all() -> None:
    """Two sweeps: the second removes every unclaimed lock file made before
    the first."""
    for _ in range(2):
        _tick()
        _list_disks()


def _tick() -> None:
    """Waits out the file system clock's grain (a few milliseconds: its
    timestamps come from a coarse clock), so that what comes next is
    stamped later than what came before."""
    time.sleep(0.05)


def _claimant_checking_its_lock_file(path: Path) -> Contender:
    """Opens for writing; while holding, its claim must be on the file the
    lock file's name leads to, whatever the sweeper did meanwhile."""

    def contend(index: int, round_: int, settled: Callable[[], None]) -> tuple[bool, object]:
        try:
            disk = virtdisk.open(path)
        except virtdisk.VirtualDiskError as error:
            return False, error.winerror
        with disk:
            visible = all(_claims_on(lock, 101) for lock in _lock_files(path)) and len(_lock_files(path)) == 1
            settled()
            if not visible:
                return True, "the claim is not on the named lock file"
        return True, 0

    return contend


def _sweeper(index: int, round_: int, settled: Callable[[], None]) -> tuple[bool, object]:
    """Sweeps the run directory a few times while the claimants race."""
    for _ in range(3):
        _list_disks()
    settled()
    return False, SHARING


def test_sweeps_racing_claimants_never_remove_a_claimed_lock_file(images: Path) -> None:
    """Between rounds every claim has ended, so each round's sweeps may remove
    the lock file while the claimants open it: one of them still wins, and
    its claim is on the file the name leads to (a claim published on a
    removed file would be seen by nobody, and two writers would both win)."""
    path = images / "disk.vhdx"
    virtdisk.create(path, 8 * MiB).close()
    table = race([_claimant_checking_its_lock_file(path) for _ in range(WORKERS - 1)] + [_sweeper])
    assert_exactly_one_winner(table)
    for round_, outcomes in enumerate(table):
        codes = [code for _, won, code in outcomes if won]
        assert codes == [0], f"round {round_}: {outcomes}"


def _open_close_loop(path: str, iterations: int, barrier, writers, faults) -> None:
    barrier.wait(timeout=60)
    for _ in range(iterations):
        try:
            disk = virtdisk.open(path)
        except virtdisk.VirtualDiskError as error:
            if error.winerror != SHARING:
                faults.put(repr(error))
            continue
        with disk:
            with writers.get_lock():
                writers.value += 1
                alone = writers.value == 1
            visible = [_claims_on(lock, 101) for lock in _lock_files(Path(path))]
            with writers.get_lock():
                writers.value -= 1
            if not alone:
                faults.put("two writers at once")
            if visible != [True]:
                faults.put(f"the claim is not on the named lock file: {visible}")


def _sweep_loop(path: str, iterations: int, barrier) -> None:
    """The provider's sweep (a list) and, between, a tight one of the
    test's own that follows the same protocol (a test double: under the
    mutex, not waited for, only with no claim on it), to hit the window
    between a claimant's open and its mutex more often."""
    barrier.wait(timeout=60)
    for iteration in range(iterations):
        if iteration % 20 == 0:
            _list_disks()
        for lock in _lock_files(Path(path)):
            with contextlib.suppress(OSError):
                fd = os.open(lock, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    unclaimed = not any(_claims_on(lock, offset) for offset in (100, 101, 102, 200, 201, 202))
                    if unclaimed and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                        os.unlink(lock)
                finally:
                    os.close(fd)


def test_sweeps_never_let_two_writers_in_nor_hide_a_claim(images: Path) -> None:
    """Writers open and close one image over and over while another process
    sweeps: a lock file removed between a claimant's open of it and its
    mutex must send the claimant to a new file, or its claim would sit on a
    removed file where nobody sees it, and a second writer would get in."""
    path = images / "disk.vhdx"
    virtdisk.create(path, 8 * MiB).close()
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(WORKERS)
    writers, faults = context.Value("i", 0), context.Queue()
    processes = [
        context.Process(target=_open_close_loop, args=(str(path), 400, barrier, writers, faults))
        for _ in range(WORKERS - 1)
    ] + [context.Process(target=_sweep_loop, args=(str(path), 4000, barrier))]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        if process.is_alive():
            process.kill()
        assert process.exitcode == 0
    found = []
    while not faults.empty():
        found.append(faults.get(timeout=5))
    assert not found, found[:5]


def _hold_writer(path: str, go, opened, release) -> None:
    go.wait(60)
    try:
        disk = virtdisk.open(path)
    except virtdisk.VirtualDiskError as error:
        opened.put(error.winerror)
        return
    opened.put(0)
    release.wait(60)
    disk.close()


def test_a_claimant_whose_lock_file_is_swept_under_it_claims_on_the_new_one(images: Path) -> None:
    """The window the race above can only hope to hit, made certain: the
    test plays the sweeper (a test double following the sweep's protocol),
    holding the lock file's mutex while a claimant has it open and waits,
    then removing it and letting go.  The claimant must notice and claim on
    a new lock file, where the next writer sees it."""
    path = images / "disk.vhdx"
    virtdisk.create(path, 8 * MiB).close()
    lock = _lock_file(path)
    context = multiprocessing.get_context("fork")
    go, opened, release = context.Event(), context.Queue(), context.Event()
    claimant = context.Process(target=_hold_writer, args=(str(path), go, opened, release))
    claimant.start()  # before the mutex is taken: it must not inherit that
    mutex = os.open(lock, os.O_RDONLY)
    fcntl.flock(mutex, fcntl.LOCK_EX)
    go.set()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                links = [os.readlink(entry) for entry in Path(f"/proc/{claimant.pid}/fd").iterdir()]
                if str(lock) in links:
                    break
            time.sleep(0.001)
        else:
            pytest.fail("the claimant never opened the lock file")
        lock.unlink()
        os.close(mutex)
        mutex = -1
        assert opened.get(timeout=30) == 0
        assert _claims_on(_lock_file(path), 101), "the claim is on the file the name leads to"
        with pytest.raises(virtdisk.VirtualDiskError) as refused:
            virtdisk.open(path).close()
        assert refused.value.winerror == SHARING
    finally:
        if mutex >= 0:
            os.close(mutex)
        release.set()
        claimant.join(30)
        if claimant.is_alive():
            claimant.kill()


def _started_then_wait(started, release) -> None:
    started.set()
    release.wait(60)


def test_a_forked_child_holds_none_of_its_parents_claims(images: Path) -> None:
    """The child's copies of the handles are the parent's, unusable there:
    once the parent closes its handle, the image is free, however long the
    child lives."""
    parent, child = images / "parent.vhdx", images / "child.vhdx"
    virtdisk.create(parent, 8 * MiB).close()
    virtdisk.create(child, parent=parent).close()
    disk = virtdisk.open(child)
    context = multiprocessing.get_context("fork")
    started, release = context.Event(), context.Event()
    forked = context.Process(target=_started_then_wait, args=(started, release))
    forked.start()
    try:
        # Until its fork handler has run, the child's copies hold the claims.
        assert started.wait(60)
        disk.close()
        with virtdisk.open(child):  # the child's WRITE and HANDLE are gone
            pass
        with virtdisk.open(parent):  # and its hold on the parent
            pass
    finally:
        release.set()
        forked.join(30)
        if forked.is_alive():
            forked.kill()


def test_a_sweep_removes_unclaimed_lock_files_only(images: Path) -> None:
    kept, dropped = images / "kept.vhdx", images / "dropped.vhdx"
    for path in (kept, dropped):
        virtdisk.create(path, 8 * MiB).close()
    virtdisk.open(dropped).close()
    with virtdisk.open(kept):
        assert _lock_files(dropped)
        _sweep_all()
        assert _lock_files(kept), "claimed: kept"
        assert not _lock_files(dropped), "unclaimed: removed"


SWEEPS_BY_COUNT = """
import os, shutil, sys, time
from pathlib import Path
import virtdisk

run, images = Path(os.environ["VIRTDISK_RUN_DIR"]), Path(sys.argv[1])
counter = run / "lock-files.count"


def locks(image):
    st = image.stat()
    return list(run.glob(f"{st.st_dev:x}-{st.st_ino:x}-*.lock"))


def fill_count_to_one_short():
    # Lock files counted as created elsewhere (the test plays the other
    # processes: a test double).
    with counter.open("ab") as count:
        count.write(b"+" * max(0, 1023 - count.tell()))


def tick():
    # The file system's timestamps come from a coarse clock.
    time.sleep(0.05)


paths = [images / f"disk{i}.vhdx" for i in range(5)]
for path in paths[:3]:
    virtdisk.create(path, 8 << 20).close()
held = virtdisk.open(paths[1])
virtdisk.open(paths[0]).close()
tick()
fill_count_to_one_short()
shutil.copyfile(paths[2], paths[3])  # a new file: its lock file is new
virtdisk.open(paths[3]).close()  # creates the 1024th: a sweep
assert counter.stat().st_size < 1023, "the count starts again"
assert locks(paths[0]), "made since the previous sweep (none): kept"
tick()
shutil.copyfile(paths[2], paths[4])
fill_count_to_one_short()
virtdisk.open(paths[4]).close()  # another sweep
assert not locks(paths[0]), "there at the previous sweep, unclaimed: swept"
assert locks(paths[1]), "claimed: kept"
held.close()
print("ok")
"""


def test_creating_many_lock_files_sweeps_those_older_than_the_previous_sweep(images: Path) -> None:
    """Without a list or an attach, the run directory stays bounded: the
    process whose creation brings the shared count to its limit sweeps; a
    lock file made since the previous sweep stays for one more (an inventory
    going round its images reuses it), so the bound is twice the limit.  In
    a run directory of its own, where no other process sweeps."""
    run = images / "run"
    run.mkdir(mode=0o700)
    env = dict(os.environ, VIRTDISK_RUN_DIR=str(run))
    result = subprocess.run(
        [sys.executable, "-c", SWEEPS_BY_COUNT, str(images)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@contextlib.contextmanager
def _attached_for_good(path: Path) -> Iterator[str]:
    """Attaches path with PERMANENT_LIFETIME (its handle closed again) and
    yields the device; detaches it afterwards, which the caller's asserts
    on the detach need.  Nothing holds a permanent disk, so a detach that
    fails would leave it, and its serving helper, to outlive the test: a
    refusal that persists ends the disk's server instead (the one serving
    this test's image), whose helper then lets go of the device.  A failure
    in the body is the one reported; a failed detach after a body that
    passed is raised too."""
    with virtdisk.open(path) as disk:
        disk.attach(permanent=True)
        device = disk.physical_path
    seq = diskseq(device)
    try:
        yield device
    except BaseException:
        with contextlib.suppress(Exception):
            _detach_for_good(path, device, seq)
        raise
    _detach_for_good(path, device, seq)


def _detach_for_good(path: Path, device: str, seq: int | None) -> None:
    refusal: virtdisk.VirtualDiskError | None = None
    deadline = time.monotonic() + 20
    while still_bound(device, seq):
        try:
            virtdisk.detach(path)
            return
        except virtdisk.DiskInUseError as error:  # an opener passing by, a handle still closing
            refusal = error
        except virtdisk.VirtualDiskError as error:
            refusal = error
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if still_bound(device, seq):
        with contextlib.suppress(AssertionError, OSError, ValueError, IndexError):
            os.kill(server_of(device), signal.SIGKILL)
        gone_by = time.monotonic() + 20
        while still_bound(device, seq) and time.monotonic() < gone_by:
            time.sleep(0.05)
    if refusal is not None:
        raise refusal


def test_a_permanent_attachment_keeps_its_lock_file_after_its_handles_close(images: Path) -> None:
    path = images / "disk.vhdx"
    virtdisk.create(path, 8 * MiB).close()
    with _attached_for_good(path):
        # The helper serving it holds WRITE, not the closed handle's HANDLE.
        assert _claims_on(_lock_file(path), 101)
        assert not _claims_on(_lock_file(path), 100), "no handle is open"
        with pytest.raises(virtdisk.VirtualDiskError) as refused:
            virtdisk.open(path).close()
        assert refused.value.winerror == SHARING
    assert not _claims_on(_lock_file(path), 101), "the helper let go of its claims"
