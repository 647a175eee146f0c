"""Attaching on kernels before 5.8, which answer LOOP_CONFIGURE with EINVAL or
ENOTTY: LOOP_SET_FD, LOOP_SET_BLOCK_SIZE and LOOP_SET_STATUS64 must give the
same device, the same lifetime and the same lost-race handling, and a step that
fails must leave no device bound.

The kernel's answers are made to fail at one chosen step by a test double
(tests/doubles/ioctl_fault_double.c, preloaded into a subprocess) that also logs
every loop ioctl; everything else is the real kernel.  The whole attach suite
runs through this path too: `.ci/run` runs `pytest -m loop` a second time with
VIRTDISK_TEST_NO_LOOP_CONFIGURE=1."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import virtdisk
from virtdisk import WinError

from .conftest import loops_backed_under
from .conftest import make_image as make

pytestmark = pytest.mark.loop

MiB = 1 << 20
NO_CONFIGURE = "VIRTDISK_TEST_NO_LOOP_CONFIGURE"

# Runs in a subprocess: attaches argv[1] as told by argv[2], prints what the
# device shows as JSON (or the error), and lets go (a permanent disk stays).
ATTACH = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import virtdisk

    path, options = sys.argv[1], json.loads(sys.argv[2])

    def shown(device):
        block = Path("/sys/block", Path(device).name)
        state = {name: (block / "loop" / name).read_text().strip()
                 for name in ("offset", "sizelimit", "autoclear", "partscan", "dio")}
        state["bytes"] = int((block / "size").read_text()) * 512
        state["ro"] = (block / "ro").read_text().strip()
        state["logical_block_size"] = (block / "queue" / "logical_block_size").read_text().strip()
        state["listed"] = any(d.physical_path == device for d in virtdisk.attached_disks())
        return state

    try:
        with virtdisk.open(path, read_only=options["read_only"]) as disk:
            disk.attach(read_only=options["read_only"], permanent=options["permanent"])
            device = disk.physical_path
            print(json.dumps({"device": device, "shown": shown(device)}))
    except OSError as error:
        print(json.dumps({"winerror": error.winerror, "message": str(error)}))
    """
)


def attach_in_subprocess(
    path: Path,
    *,
    read_only: bool = False,
    permanent: bool = False,
    faults: str = "",
    no_configure: bool = False,
    double: Path | None = None,
    log: Path | None = None,
) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (NO_CONFIGURE, "LD_PRELOAD")}
    if no_configure:
        env[NO_CONFIGURE] = "1"
    if double is not None:
        env["LD_PRELOAD"] = str(double)
        env["VD_TEST_IOCTL_FAULTS"] = faults
        if log is not None:
            env["VD_TEST_IOCTL_LOG"] = str(log)
    options = json.dumps({"read_only": read_only, "permanent": permanent})
    result = subprocess.run(
        [sys.executable, "-c", ATTACH, str(path), options],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answer: dict = json.loads(result.stdout.splitlines()[-1])
    if log is not None:
        answer["calls"] = calls(log)  # the attach's, before a detach adds its own
    if permanent and "device" in answer:
        virtdisk.detach(path)
    return answer


def ioctl_log(log: Path) -> list[list[str]]:
    """The double's log: [name, device, result, errno] per loop ioctl."""
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def calls(log: Path) -> list[str]:
    return [entry[0] for entry in ioctl_log(log)]


# ---- the same device either way --------------------------------------------------

DIRECT = {"fixed-vhd", "iso", "fixed-vhdx-4096"}
EQUIVALENCE = [
    ("fixed-vhd", False, False),
    ("fixed-vhd", True, False),
    ("fixed-vhd", False, True),
    ("iso", True, False),
    ("fixed-vhdx-4096", False, False),
    ("dynamic-vhdx", False, False),
    ("dynamic-vhdx", True, True),
    ("dynamic-vhdx-4096", False, True),
    ("dynamic-vhd", False, False),
]


@pytest.mark.parametrize("error", ["ENOTTY", "EINVAL"])
@pytest.mark.parametrize(("kind", "read_only", "permanent"), EQUIVALENCE)
def test_an_old_kernel_gets_the_device_loop_configure_gives(
    kind: str, read_only: bool, permanent: bool, error: str, images: Path, ioctl_fault_double: Path
) -> None:
    path = make(kind, images)
    configured = attach_in_subprocess(path, read_only=read_only, permanent=permanent)
    log = images / "ioctl.log"
    in_steps = attach_in_subprocess(
        path,
        read_only=read_only,
        permanent=permanent,
        faults=f"LOOP_CONFIGURE={error}",
        double=ioctl_fault_double,
        log=log,
    )
    assert "shown" in configured, configured
    assert "shown" in in_steps, in_steps
    assert in_steps["shown"] == configured["shown"]
    # A permanent direct disk is held by nothing; a served one by its helper.
    assert in_steps["shown"]["autoclear"] == ("0" if permanent and kind in DIRECT else "1")
    assert in_steps["shown"]["ro"] == ("1" if read_only else "0")
    made = in_steps["calls"]
    assert made.index("LOOP_SET_FD") < made.index("LOOP_SET_BLOCK_SIZE") < made.index("LOOP_SET_STATUS64")
    assert "LOOP_CLR_FD" not in made


@pytest.mark.parametrize("switch", [True, False])
def test_the_test_switch_takes_the_old_path_without_asking_for_loop_configure(
    switch: bool, images: Path, ioctl_fault_double: Path
) -> None:
    path = make("dynamic-vhdx", images)
    log = images / "ioctl.log"
    answer = attach_in_subprocess(path, no_configure=switch, double=ioctl_fault_double, log=log)
    assert "device" in answer, answer
    made = calls(log)
    if switch:
        assert "LOOP_CONFIGURE" not in made
        assert {"LOOP_SET_FD", "LOOP_SET_BLOCK_SIZE", "LOOP_SET_STATUS64", "LOOP_SET_DIRECT_IO"} <= set(made)
    else:
        assert "LOOP_CONFIGURE" in made and "LOOP_SET_FD" not in made


def test_other_loop_configure_errors_fail_without_trying_the_old_way(
    images: Path, ioctl_fault_double: Path
) -> None:
    path = make("fixed-vhd", images)
    log = images / "ioctl.log"
    answer = attach_in_subprocess(path, faults="LOOP_CONFIGURE=EIO", double=ioctl_fault_double, log=log)
    assert answer.get("winerror") is not None, answer
    assert "configuring /dev/loop" in answer["message"]
    assert "LOOP_SET_FD" not in calls(log)
    assert not loops_backed_under(images)


# ---- nothing left half-configured -------------------------------------------------


@pytest.mark.parametrize("permanent", [False, True])
@pytest.mark.parametrize("kind", ["fixed-vhd", "dynamic-vhdx"])
@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("LOOP_SET_STATUS64=EINVAL", "setting the size limit, flags and name of /dev/loop"),
        ("LOOP_SET_BLOCK_SIZE=EIO", "setting the sector size of /dev/loop"),
    ],
)
def test_a_step_failing_after_set_fd_unbinds_the_device(
    fault: str, words: str, kind: str, permanent: bool, images: Path, ioctl_fault_double: Path
) -> None:
    path = make(kind, images)
    log = images / "ioctl.log"
    answer = attach_in_subprocess(
        path, permanent=permanent, faults=fault, no_configure=True, double=ioctl_fault_double, log=log
    )
    assert answer.get("winerror") is not None, answer
    assert words in answer["message"]
    bound = [entry[1] for entry in ioctl_log(log) if entry[0] == "LOOP_SET_FD" and entry[2] == "0"]
    cleared = [entry[1] for entry in ioctl_log(log) if entry[0] == "LOOP_CLR_FD"]
    assert bound and cleared == bound  # exactly the device it bound, once
    assert not loops_backed_under(images)
    with virtdisk.open(path) as disk:
        assert not disk.attached
        disk.attach()  # and the image attaches normally afterwards
        assert disk.attached


def test_eagain_that_does_not_pass_fails_and_unbinds(images: Path, ioctl_fault_double: Path) -> None:
    path = make("fixed-vhd", images)
    log = images / "ioctl.log"
    answer = attach_in_subprocess(
        path,
        permanent=True,
        faults="LOOP_SET_STATUS64=EAGAIN",
        no_configure=True,
        double=ioctl_fault_double,
        log=log,
    )
    assert answer.get("winerror") is not None, answer
    assert calls(log).count("LOOP_SET_STATUS64") > 1  # tried again before giving up
    assert calls(log).count("LOOP_CLR_FD") == 1
    assert not loops_backed_under(images)


def test_eagain_from_the_status_and_block_size_calls_is_waited_out(
    images: Path, ioctl_fault_double: Path
) -> None:
    path = make("fixed-vhd", images)
    log = images / "ioctl.log"
    answer = attach_in_subprocess(
        path,
        faults="LOOP_SET_STATUS64=EAGAIN*2,LOOP_SET_BLOCK_SIZE=EAGAIN*1",
        no_configure=True,
        double=ioctl_fault_double,
        log=log,
    )
    assert answer.get("shown", {}).get("sizelimit") == str(16 * MiB), answer
    assert calls(log).count("LOOP_SET_STATUS64") == 3
    assert calls(log).count("LOOP_SET_BLOCK_SIZE") == 2


def test_a_kernel_without_set_block_size_attaches_512_byte_disks_only(
    images: Path, ioctl_fault_double: Path
) -> None:
    vhd = make("fixed-vhd", images)
    answer = attach_in_subprocess(
        vhd, faults="LOOP_SET_BLOCK_SIZE=ENOTTY", no_configure=True, double=ioctl_fault_double
    )
    assert answer.get("shown", {}).get("logical_block_size") == "512", answer
    iso = make("iso", images)
    answer = attach_in_subprocess(
        iso, read_only=True, faults="LOOP_SET_BLOCK_SIZE=ENOTTY", no_configure=True, double=ioctl_fault_double
    )
    assert answer.get("winerror") == WinError.ERROR_NOT_SUPPORTED, answer
    assert "2048-byte sectors" in answer["message"] and "4.14" in answer["message"]
    assert not loops_backed_under(images)


# ---- the lost race --------------------------------------------------------------


@pytest.mark.parametrize(("no_configure", "step"), [(True, "LOOP_SET_FD"), (False, "LOOP_CONFIGURE")])
def test_a_device_taken_first_by_another_attacher_is_left_alone(
    no_configure: bool, step: str, images: Path, ioctl_fault_double: Path
) -> None:
    path = make("fixed-vhd", images)
    log = images / "ioctl.log"
    answer = attach_in_subprocess(
        path, faults=f"{step}=EBUSY*3", no_configure=no_configure, double=ioctl_fault_double, log=log
    )
    assert "device" in answer, answer
    assert [entry[3] for entry in ioctl_log(log) if entry[0] == step] == ["EBUSY"] * 3 + ["-"]
    assert "LOOP_CLR_FD" not in calls(log)  # never the winner's device


WORKERS = 4
ROUNDS = 6
CHUNK = 256 * 1024


def _race_worker(path: str, worker: int, barrier, results) -> None:  # type: ignore[no-untyped-def]
    """Each round: attach at the same moment as the others, write a chunk
    through the device, hold it until all have theirs, read it back."""
    try:
        for round_ in range(ROUNDS):
            data = hashlib.sha256(f"{worker}/{round_}".encode()).digest() * (CHUNK // 32)
            barrier.wait(timeout=60)
            with virtdisk.open(path) as disk:
                disk.attach()
                device = disk.physical_path
                with open(device, "r+b", buffering=0) as block:
                    block.seek(worker * CHUNK)
                    block.write(data)
                    os.fsync(block.fileno())
                    barrier.wait(timeout=60)  # every worker holds its device now
                    block.seek(worker * CHUNK)
                    back = block.read(CHUNK)
            results.put((worker, round_, device, back == data))
    except BaseException as error:
        results.put((worker, -1, repr(error), False))
        barrier.abort()


@pytest.mark.parametrize("way", ["loop-configure", "set-fd", "scan-dev"])
def test_concurrent_attaches_get_distinct_devices_and_keep_their_data(
    way: str, images: Path, ioctl_fault_double: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Spawned workers are new processes that take the environment as it is now.
    monkeypatch.delenv(NO_CONFIGURE, raising=False)
    if way == "set-fd":
        monkeypatch.setenv(NO_CONFIGURE, "1")
    if way == "scan-dev":
        # /dev/loop-control without a free device for us: the scan of /dev.
        monkeypatch.setenv("LD_PRELOAD", str(ioctl_fault_double))
        monkeypatch.setenv("VD_TEST_IOCTL_FAULTS", "LOOP_CTL_GET_FREE=ENOSPC")
    paths = []
    for worker in range(WORKERS):
        path = images / f"worker{worker}.vhd"
        virtdisk.create(path, 4 * MiB, fixed=True).close()
        paths.append(path)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS)
    results = context.Queue()
    processes = [
        context.Process(target=_race_worker, args=(str(paths[worker]), worker, barrier, results))
        for worker in range(WORKERS)
    ]
    for process in processes:
        process.start()
    reports = []
    deadline = time.monotonic() + 300
    while len(reports) < WORKERS * ROUNDS and time.monotonic() < deadline:
        try:
            reports.append(results.get(timeout=1))
        except queue.Empty:
            if not any(process.is_alive() for process in processes):
                break
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    failures = [report for report in reports if report[1] < 0 or not report[3]]
    assert not failures
    assert len(reports) == WORKERS * ROUNDS
    for round_ in range(ROUNDS):
        devices = [report[2] for report in reports if report[1] == round_]
        assert len(set(devices)) == WORKERS, devices
    for worker, path in enumerate(paths):
        data = hashlib.sha256(f"{worker}/{ROUNDS - 1}".encode()).digest() * (CHUNK // 32)
        with open(path, "rb") as image:
            image.seek(worker * CHUNK)
            assert image.read(CHUNK) == data
        virtdisk.open(path, read_only=True).close()  # the footer is intact
