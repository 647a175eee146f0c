"""Benchmark: merge of a differencing chain and convert (create with a source), against qemu-img.

In one run, on the same data:
  - MergeVirtualDisk of a 1 GiB VHDX chain (child: 384 MiB written over a
    base holding 256 MiB) into its base, against ``qemu-img commit`` of the
    same chain as qcow2 (qemu-img does not write differencing VHD or VHDX);
  - the same for a VHD chain;
  - create with a source (Convert-VHD) of the dynamic VHDX into a new VHDX and
    into a new VHD, against ``qemu-img convert`` to the same formats.

Each round starts from fresh copies of the images (untimed; the copies sit in
the page cache for both tools alike).  Both sides end with their data flushed:
ours fsyncs, qemu-img commit flushes its images when it closes them, and
qemu-img convert, which by default does not (cache=unsafe), is followed by an
fsync of its output; its time without that is shown as well.  Not a test:
timings vary by machine; the ratios are what to compare.  Needs root (the
child's data goes in through an attached disk) and qemu-img.

    python benchmarks/merge_convert.py [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import virtdisk

MiB = 1 << 20
GiB = 1 << 30
SIZE = GiB
# (offset, length) in MiB: the base's data, then the child's (overlapping in part).
BASE_DATA = [(0, 128), (512, 128)]
CHILD_DATA = [(64, 128), (300, 128), (700, 128)]


def run(*command: str) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def best(action: Callable[[], object], prepare: Callable[[], object], rounds: int) -> float:
    """The fastest of a few timed runs, each after an untimed prepare()."""
    times = []
    for _ in range(rounds):
        prepare()
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def fill_raw(path: Path, extents: list[tuple[int, int]], seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as raw:
        raw.truncate(SIZE)
        for offset, length in extents:
            raw.seek(offset * MiB)
            for _ in range(length):
                raw.write(rng.randbytes(MiB))


def write_extents(image: Path, data: Path, extents: list[tuple[int, int]]) -> None:
    """Copies the extents of a raw file into an image through its attached disk."""
    with virtdisk.open(image) as disk:
        disk.attach()
        try:
            with open(data, "rb") as source, open(disk.physical_path, "r+b", buffering=0) as device:
                for offset, length in extents:
                    source.seek(offset * MiB)
                    device.seek(offset * MiB)
                    for _ in range(length):
                        device.write(source.read(MiB))
                os.fsync(device.fileno())
        finally:
            disk.detach()


def qemu_write(image: Path, fmt: str, data: Path, extents: list[tuple[int, int]]) -> None:
    """The same extents into a qcow2 image: qemu-io's write -s takes its data from a file."""
    chunk = data.parent / "chunk.raw"
    for offset, length in extents:
        with open(data, "rb") as source:
            source.seek(offset * MiB)
            chunk.write_bytes(source.read(length * MiB))
        run("qemu-io", "-f", fmt, "-c", f"write -s {chunk} {offset * MiB} {length * MiB}", str(image))
    chunk.unlink()


def make_chains(folder: Path) -> dict[str, Path]:
    base_raw, child_raw = folder / "base.raw", folder / "child.raw"
    fill_raw(base_raw, BASE_DATA, 1)
    fill_raw(child_raw, CHILD_DATA, 2)
    made: dict[str, Path] = {}
    for suffix in ("vhdx", "vhd"):
        chain = folder / f"chain-{suffix}"
        chain.mkdir()
        base, child = chain / f"base.{suffix}", chain / f"child.{suffix}"
        virtdisk.create(base, SIZE).close()
        write_extents(base, base_raw, BASE_DATA)
        virtdisk.create(child, parent=base).close()
        write_extents(child, child_raw, CHILD_DATA)
        made[suffix] = chain
    chain = folder / "chain-qcow2"
    chain.mkdir()
    base, child = chain / "base.qcow2", chain / "child.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(base), str(SIZE))
    qemu_write(base, "qcow2", base_raw, BASE_DATA)
    run("qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", str(child))
    qemu_write(child, "qcow2", child_raw, CHILD_DATA)
    made["qcow2"] = chain
    return made


def convert_durably(command: list[str], target: Path) -> None:
    """qemu-img convert leaves its output unflushed by default (cache=unsafe:
    strace shows no fdatasync of the data); ours is durable when create
    returns.  The fair peer flushes the output too."""
    run(*command)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh(chain: Path, work: Path) -> Callable[[], None]:
    def prepare() -> None:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(chain, work, copy_function=lambda s, d: run("cp", "--sparse=always", s, d))

    return prepare


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", help="where to put the images (default: a temporary folder)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("qemu-img"):
        print("needs root and qemu-img", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="vd-merge-bench-", dir=args.dir))
    try:
        chains = make_chains(folder)
        work = folder / "work"
        results = []
        qemu_commit = best(
            lambda: run("qemu-img", "commit", "-q", str(work / "child.qcow2")),
            fresh(chains["qcow2"], work),
            args.rounds,
        )
        for suffix in ("vhdx", "vhd"):
            ours = best(
                lambda suffix=suffix: virtdisk.merge(work / f"child.{suffix}", 1),
                fresh(chains[suffix], work),
                args.rounds,
            )
            results.append((f"merge 1 GiB {suffix} chain vs qemu-img commit (qcow2)", ours, qemu_commit))
        source = chains["vhdx"] / "base.vhdx"  # dynamic, 256 MiB of data
        out = folder / "out"
        out.mkdir()

        def clean() -> None:
            for entry in out.iterdir():
                entry.unlink()

        for suffix, qemu_format in (("vhdx", "vhdx"), ("vhd", "vpc")):
            target = out / f"converted.{suffix}"
            ours = best(
                lambda target=target: virtdisk.create(target, source=source).close(), clean, args.rounds
            )
            command = ["qemu-img", "convert", "-f", "vhdx", "-O", qemu_format, str(source), str(target)]
            bare = best(lambda command=command: run(*command), clean, args.rounds)
            durable = best(
                lambda command=command, target=target: convert_durably(command, target), clean, args.rounds
            )
            results.append((f"convert dynamic vhdx -> {suffix} vs qemu-img convert + fsync", ours, durable))
            results.append((f"convert dynamic vhdx -> {suffix} vs qemu-img convert (no flush)", ours, bare))
        print(f"{'operation':70} {'virtdisk':>10} {'qemu-img':>10} {'ratio':>7}")
        for name, ours, theirs in results:
            print(f"{name:70} {ours:9.3f}s {theirs:9.3f}s {theirs / ours:6.2f}x")
        print("ratio > 1: virtdisk is faster")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
