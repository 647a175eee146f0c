"""Attaching where containers put us: no /dev/loop-control (only pre-created
/dev/loopN nodes), and no /dev/fuse, or one that may not be opened.

Each test runs its attach in a private mount namespace (`unshare -m`) whose
/dev is a fresh tmpfs holding copies of the chosen device nodes, as a
container runtime makes it; nothing outside that process sees the change."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import virtdisk
from virtdisk import WinError

from .conftest import RUN_DIR, loops_backed_under, require_tool
from .conftest import make_image as make

pytestmark = pytest.mark.loop

MiB = 1 << 20
ERROR_NO_SYSTEM_RESOURCES = 0x5AA
LOOP_CTL_GET_FREE = 0x4C82

# Runs as root in a new mount namespace: covers /dev with a tmpfs holding
# copies of the nodes asked for, then runs the test's script.
CONTAINER = textwrap.dedent(
    """
    import json, os, subprocess, sys
    spec = json.loads(sys.argv[1])
    nodes = {name: os.stat("/dev/" + name) for name in spec["nodes"] + ["fuse"]}
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "test-dev", "/dev"], check=True)
    for name in spec["nodes"]:
        os.mknod("/dev/" + name, nodes[name].st_mode, nodes[name].st_rdev)
    if spec["fuse"] == "denied":
        # The node is there, but on a nodev mount: opening it is refused, as
        # a device cgroup refuses it.
        os.mkdir("/dev/.nodev")
        subprocess.run(["mount", "-t", "tmpfs", "-o", "nodev", "test-nodev", "/dev/.nodev"], check=True)
        os.mknod("/dev/.nodev/fuse", nodes["fuse"].st_mode, nodes["fuse"].st_rdev)
        os.symlink(".nodev/fuse", "/dev/fuse")
    elif spec["fuse"] == "present":
        os.mknod("/dev/fuse", nodes["fuse"].st_mode, nodes["fuse"].st_rdev)
    sys.argv = ["container"] + spec["argv"]
    exec(compile(spec["script"], "<container script>", "exec"), {"__name__": "__main__"})
    """
)

# Attaches each image named in argv[1] as told, writes and reads back a
# pattern through a writable device, and prints one JSON line per image.
ATTACH = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import virtdisk

    requests = json.loads(sys.argv[1])
    for request in requests:
        mounts = Path("/proc/self/mountinfo").read_text()
        answer = {"loop_control": os.path.exists("/dev/loop-control")}
        try:
            with virtdisk.open(request["path"], read_only=request["read_only"]) as disk:
                disk.attach(read_only=request["read_only"], permanent=request["permanent"])
                device = answer["device"] = disk.physical_path
                loop = Path("/sys/block", Path(device).name, "loop")
                answer["backing"] = (loop / "backing_file").read_text().strip()
                if not request["read_only"]:
                    pattern = (request["path"] * 20000).encode()[: 1 << 20]
                    with open(device, "r+b", buffering=0) as block:
                        block.write(pattern)
                        os.fsync(block.fileno())
                        block.seek(0)
                        answer["read_back"] = block.read(len(pattern)) == pattern
        except OSError as error:
            answer.update(winerror=error.winerror, message=str(error))
        answer["mounts_unchanged"] = Path("/proc/self/mountinfo").read_text() == mounts
        print(json.dumps(answer), flush=True)
    """
)


def loop_nodes() -> list[str]:
    return sorted(p.name for p in Path("/dev").iterdir() if re.fullmatch(r"loop\d+", p.name))


def ensure_a_free_loop_device() -> None:
    """LOOP_CTL_GET_FREE makes a device when none is free (and binds nothing),
    so that the copied nodes include one that is free now."""
    fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_CTL_GET_FREE)
    finally:
        os.close(fd)


def in_container(requests: list[dict], *, nodes: list[str], fuse: str) -> list[dict]:
    unshare = require_tool("unshare")
    require_tool("mount")
    spec = {"nodes": ["null", *nodes], "fuse": fuse, "script": ATTACH, "argv": [json.dumps(requests)]}
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", sys.executable, "-c", CONTAINER, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(answers) == len(requests), result.stdout
    return answers


def request(path: Path, *, read_only: bool = False, permanent: bool = False) -> dict:
    return {"path": str(path), "read_only": read_only, "permanent": permanent}


def provider_files_of(image: Path) -> list[Path]:
    """The records, sockets and logs the provider keeps for the image."""
    st = image.stat()
    return sorted(RUN_DIR.glob(f"{st.st_dev:x}-{st.st_ino:x}.*")) if RUN_DIR.exists() else []


# ---- without /dev/loop-control -----------------------------------------------------


@pytest.mark.parametrize("permanent", [False, True])
@pytest.mark.parametrize("kind", ["fixed-vhd", "dynamic-vhdx"])
def test_without_loop_control_a_free_pre_created_device_is_taken(
    kind: str, permanent: bool, images: Path
) -> None:
    path = make(kind, images)
    ensure_a_free_loop_device()
    nodes = loop_nodes()
    (answer,) = in_container([request(path, permanent=permanent)], nodes=nodes, fuse="present")
    try:
        assert answer["loop_control"] is False
        assert "device" in answer, answer
        assert Path(answer["device"]).name in nodes
        assert answer["read_back"] is True
        if permanent:
            assert Path("/sys/block", Path(answer["device"]).name, "loop").exists()
    finally:
        if permanent and "device" in answer:
            virtdisk.detach(path)  # from outside the container, as any process may
    assert not loops_backed_under(images)
    if kind == "fixed-vhd":
        with open(path, "rb") as image:
            assert image.read(1 << 20) == (str(path) * 20000).encode()[: 1 << 20]


def test_without_loop_control_and_no_free_node_the_error_says_what_to_pass(images: Path) -> None:
    held = make("fixed-vhd", images)
    other = images / "other.vhd"
    virtdisk.create(other, 16 * MiB, fixed=True).close()
    with virtdisk.open(held) as disk:
        disk.attach()
        busy = Path(disk.physical_path).name
        (answer,) = in_container([request(other)], nodes=[busy], fuse="present")
    assert answer.get("winerror") == ERROR_NO_SYSTEM_RESOURCES, answer
    assert "/dev/loop-control cannot be opened" in answer["message"]
    assert "--device /dev/loop-control" in answer["message"]
    assert not loops_backed_under(images)


# ---- without /dev/fuse ------------------------------------------------------------


@pytest.mark.parametrize("fuse", ["missing", "denied"])
def test_without_fuse_flat_images_still_attach(fuse: str, images: Path) -> None:
    paths = {kind: make(kind, images) for kind in ("fixed-vhd", "fixed-vhdx", "iso")}
    answers = in_container(
        [request(path, read_only=kind == "iso") for kind, path in paths.items()],
        nodes=loop_nodes(),
        fuse=fuse,
    )
    for (kind, path), answer in zip(paths.items(), answers):
        assert "device" in answer, (kind, answer)
        assert answer["backing"] == str(path)  # the image itself: not served
        assert answer.get("read_back", True) is True
    assert not loops_backed_under(images)


@pytest.mark.parametrize("permanent", [False, True])
@pytest.mark.parametrize(
    ("fuse", "words"), [("missing", "/dev/fuse is missing"), ("denied", "/dev/fuse cannot be opened")]
)
def test_without_fuse_other_images_fail_before_anything_is_made(
    fuse: str, words: str, permanent: bool, images: Path
) -> None:
    kinds = {
        "dynamic-vhd": "dynamic VHD",
        "dynamic-vhdx": "dynamic VHDX",
        "differencing-vhdx": "differencing VHDX",
    }
    paths = {kind: make(kind, images) for kind in kinds}
    # Files named after a reused inode may be left from before: only new ones count.
    before = {kind: provider_files_of(path) for kind, path in paths.items()}
    answers = in_container(
        [request(path, permanent=permanent) for path in paths.values()], nodes=loop_nodes(), fuse=fuse
    )
    for (kind, path), answer in zip(paths.items(), answers):
        assert answer.get("winerror") == WinError.ERROR_NOT_SUPPORTED, (kind, answer)
        message = answer["message"]
        assert words in message and kinds[kind] in message and str(path) in message
        assert "--device /dev/fuse --cap-add SYS_ADMIN" in message
        assert answer["mounts_unchanged"], kind
        assert provider_files_of(path) == before[kind], kind  # no record, socket or helper log
    assert not loops_backed_under(images)
