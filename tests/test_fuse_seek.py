"""SEEK_DATA and SEEK_HOLE on the FUSE server's file: holes exactly where no
layer of the chain holds data, so that cp --sparse, qemu-img map and the like
skip what surely reads zeros.  The file is served by tests/tools/vdserve.c
(the provider's server with no loop device on top); the images are written
through the provider's own format code (tests/tools/vdwork.c)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtdisk

from .conftest import require_tool
from .vhdxlog import PROVIDER, READER_SOURCES, build_tool

MiB = 1 << 20
BLOCK = 2 * MiB
SIZE = 64 * MiB


def build_vdserve(out: Path) -> Path:
    """tests/tools/vdserve.c linked with the whole provider (the server, its
    compaction and what they use)."""
    fuse3 = subprocess.run(
        [require_tool("pkg-config"), "--cflags", "fuse3"], capture_output=True, text=True, check=True
    ).stdout.split()
    own = {*READER_SOURCES, *(path.name for path in PROVIDER.glob("vhdx*.c"))}
    rest = [str(path) for path in sorted(PROVIDER.glob("*.c")) if path.name not in own]
    return build_tool(out, "vdserve", *fuse3, *rest, "-ldl")


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("tools")
    return build_tool(out, "vdwork"), build_vdserve(out)


def _work(tools, image: Path, steps: list[str]) -> None:
    trace = image.with_suffix(".trace")
    run = subprocess.run([str(tools[0]), str(trace), str(image), *steps], capture_output=True, text=True)
    trace.unlink(missing_ok=True)
    assert run.returncode == 0, run.stderr


def _write_blocks(tools, image: Path, blocks: list[int], seed: int) -> None:
    _work(tools, image, [*(f"w:{b * BLOCK}:{BLOCK}:{seed + b}" for b in blocks), "f"])


class Served:
    """vdserve of one image, its mount in a run directory of the test's own:
    in the shared one, any attach or list elsewhere would take a mount whose
    server is not named like the provider's helpers for a dead one's."""

    def __init__(self, tool: Path, image: Path, writable: bool = False) -> None:
        run_dir = image.parent / f"run.{image.name}"
        run_dir.mkdir(mode=0o700, exist_ok=True)
        run_dir.chmod(0o700)
        self.process = subprocess.Popen(
            [str(tool), *(["-w"] if writable else []), str(image)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "VIRTDISK_RUN_DIR": str(run_dir)},
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=30)
            pytest.fail(f"vdserve failed: {self.process.stderr.read() if self.process.stderr else ''}")
        self.path = Path(line.rstrip("\n"))

    def command(self, line: str) -> None:
        """One of vdserve's commands, which must succeed."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer == "ok\n", f"vdserve {line}: {answer!r}"

    def end(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0, self.process.stderr.read() if self.process.stderr else ""


@pytest.fixture
def served(tools) -> Iterator:
    """Starts vdserve servers (Served) for the test and ends them after it."""
    servers: list[Served] = []

    def start(image: Path, writable: bool = False) -> Served:
        servers.append(Served(tools[1], image, writable))
        return servers[-1]

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.end()


@pytest.fixture
def serve(served) -> Iterator:
    yield lambda image: served(image).path


def _extents(path: Path) -> list[tuple[int, int]]:
    """The data extents SEEK_DATA and SEEK_HOLE describe, merged."""
    found: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, at = os.fstat(fd).st_size, 0
        while at < size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError as error:
                assert error.errno == 6, error  # ENXIO: no data after at
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            assert start < end <= size
            found.append((start, end))
            at = end
    finally:
        os.close(fd)
    return found


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for b in sorted(blocks):
        if runs and runs[-1][1] == b * BLOCK:
            runs[-1] = (runs[-1][0], (b + 1) * BLOCK)
        else:
            runs.append((b * BLOCK, (b + 1) * BLOCK))
    return runs


def _qemu_map(path: Path) -> list[tuple[int, int]]:
    run = subprocess.run(
        [require_tool("qemu-img"), "map", "-f", "raw", "--output=json", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = run.stdout
    runs: list[tuple[int, int]] = []
    for entry in json.loads(out):
        if not entry["data"]:
            continue
        start, end = entry["start"], entry["start"] + entry["length"]
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_holes_of_a_dynamic_disk_are_exactly_its_unallocated_blocks(
    images: Path, tools, serve, suffix: str
) -> None:
    image = images / f"disk.{suffix}"
    virtdisk.create(image, SIZE, block_size=BLOCK).close()
    written = [1, 2, 5, 17, 31]  # the last block too: data up to the end
    _write_blocks(tools, image, written, seed=3)
    served = serve(image)

    assert _extents(served) == _runs(written)
    fd = os.open(served, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 2 * BLOCK + 4096, os.SEEK_DATA) == 2 * BLOCK + 4096  # inside data: where it is
        assert os.lseek(fd, 3 * BLOCK + 1, os.SEEK_DATA) == 5 * BLOCK
        assert os.lseek(fd, SIZE - 1, os.SEEK_HOLE) == SIZE  # the end is a hole
    finally:
        os.close(fd)
    assert _qemu_map(served) == _runs(written)


def test_an_empty_disk_has_no_data_at_all(images: Path, tools, serve) -> None:
    image = images / "empty.vhdx"
    virtdisk.create(image, SIZE, block_size=BLOCK).close()
    served = serve(image)
    fd = os.open(served, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as raised:
            os.lseek(fd, 0, os.SEEK_DATA)
        assert raised.value.errno == 6  # ENXIO
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_a_differencing_disk_shows_its_parents_data_as_data_and_its_own_zeros_as_holes(
    images: Path, tools, serve, suffix: str
) -> None:
    parent = images / f"base.{suffix}"
    virtdisk.create(parent, SIZE, block_size=BLOCK).close()
    _write_blocks(tools, parent, [0, 3, 4, 9], seed=5)
    child = images / f"child.{suffix}"
    virtdisk.create(child, 0, parent=parent).close()
    _write_blocks(tools, child, [4, 12], seed=7)
    expected = [0, 3, 4, 9, 12]
    if suffix == "vhdx":
        # A discarded block of a differencing VHDX states zeros (ZERO), hiding
        # the parent's data: a hole again.
        _work(tools, child, [f"d:{9 * BLOCK}:{BLOCK}", "f"])
        expected.remove(9)
    served = serve(child)
    assert _extents(served) == _runs(expected)
    assert _qemu_map(served) == _runs(expected)
    # What the holes hide reads as zeros, what the data covers as the chain.
    data = served.read_bytes()
    holes = [b for b in range(SIZE // BLOCK) if b not in expected]
    assert all(data[b * BLOCK : (b + 1) * BLOCK] == bytes(BLOCK) for b in holes)
