"""Benchmark: CompactVirtualDisk of a 1 GiB VHDX with half its blocks zeroed,
against ``qemu-img convert`` of the same image to a fresh VHDX (the way to
shrink an image with qemu-img: it skips zero blocks while copying).

In one run, on the same images: every block of a 1 GiB dynamic VHDX written
with data (qemu-io), then every other block written with zeros, for two block
sizes (32 MiB, Windows' default, and 1 MiB).  Each round starts from a fresh
copy of the image (untimed; the copy sits in the page cache for both tools
alike).  Both sides end with their data flushed: the compaction is durable
when it returns, and qemu-img convert, which by default does not flush
(cache=unsafe), is followed by an fsync of its output; its time without that
is shown as well.  Both results are checked once with ``qemu-img compare``
against the image before.  Not a test: timings vary by machine; the ratios
are what to compare.  Needs qemu-img and qemu-io.

    python benchmarks/compact.py [--rounds 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
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


def run(*command: str) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def best(contenders: list[tuple[Callable[[], object], Callable[[], object]]], rounds: int) -> list[float]:
    """The fastest of a few timed runs of each (action, prepare), each after
    an untimed prepare(); the contenders take turns within each round, so a
    busy moment of the machine does not fall on one side only."""
    times: list[list[float]] = [[] for _ in contenders]
    for _ in range(rounds):
        for (action, prepare), kept in zip(contenders, times):
            prepare()
            start = time.perf_counter()
            action()
            kept.append(time.perf_counter() - start)
    return [min(kept) for kept in times]


def make_image(path: Path, block: int) -> None:
    """Every block written with a pattern, then every other one with zeros."""
    virtdisk.create(path, SIZE, block_size=block).close()
    blocks = SIZE // block
    commands: list[str] = []
    for b in range(blocks):
        commands += ["-c", f"write -P {b % 255 + 1} {b * block} {block}"]
    for b in range(0, blocks, 2):
        commands += ["-c", f"write -P 0 {b * block} {block}"]
    run("qemu-io", "-f", "vhdx", *commands, str(path))


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def same(first: Path, second: Path) -> None:
    run("qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", str(first), str(second))


def bench(folder: Path, block: int, rounds: int) -> None:
    source = folder / f"source-{block // MiB}m.vhdx"
    make_image(source, block)
    fsync(source)
    work, converted = folder / "work.vhdx", folder / "converted.vhdx"

    def copy() -> None:
        # Flushed, untimed: the compaction's flushes must not pay for the copy.
        work.unlink(missing_ok=True)
        # Zeros and all, as the image is: a host file holds a guest's zero
        # blocks allocated (cp --sparse=always would make them holes).
        run("cp", "--sparse=never", str(source), str(work))
        fsync(work)

    def clear() -> None:
        converted.unlink(missing_ok=True)

    # The same block size: qemu-img's default (32 MiB) would fill each block
    # that holds any data, and shrink nothing where the zeros are 1 MiB apart.
    convert = ["qemu-img", "convert", "-f", "vhdx", "-O", "vhdx", "-o", f"block_size={block}", str(source),
               str(converted)]  # fmt: skip
    ours, theirs, theirs_unflushed = best(
        [
            (lambda: virtdisk.compact(work), copy),
            (lambda: (run(*convert), fsync(converted)), clear),
            (lambda: run(*convert), clear),
        ],
        rounds,
    )
    copy()
    virtdisk.compact(work)
    same(source, work)
    compacted = work.stat().st_size
    same(source, converted)
    print(
        f"{block // MiB:>3} MiB blocks: {source.stat().st_size / MiB:7.0f} MiB -> "
        f"compact {compacted / MiB:5.0f} MiB "
        f"in {ours:6.3f} s; qemu-img convert {converted.stat().st_size / MiB:5.0f} MiB in {theirs:6.3f} s "
        f"({theirs_unflushed:6.3f} s without fsync); qemu-img / ours = {theirs / ours:5.2f}"
    )
    for path in (source, work, converted):
        path.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", help="where to put the images (default: a temporary folder)")
    args = parser.parse_args()
    if not shutil.which("qemu-img") or not shutil.which("qemu-io"):
        print("needs qemu-img and qemu-io", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for block in (32 * MiB, 1 * MiB):
            bench(Path(folder), block, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
