"""Benchmark: CompactVirtualDisk while the disk stays attached read-only (the
file-system-aware mode: the compaction runs inside the disk's FUSE server),
against the same image compacted detached and against ``qemu-img convert``
to a fresh image, and what the compaction costs a reader using the disk.

In one run, on the same images: a 1 GiB dynamic image (VHDX with 32 MiB
blocks, VHD with 2 MiB blocks) with every block written (qemu-io), then a
quarter of the blocks written with zeros and another quarter discarded by
the guest (blkdiscard through a read-write attach), two never written, so
that a compaction drops half the blocks.  Each round starts from a fresh, flushed copy of the
image (untimed).

- The attached compaction, timed from the call to its end (the attach and
  detach around it are not), against ``virtdisk.compact()`` of the detached
  copy and ``qemu-img convert`` to a fresh image of the same block size
  followed by an fsync of its output (qemu-img does not flush by default).
  All three results are checked once with ``qemu-img compare`` against the
  image before.
- A reader in another process (random O_DIRECT reads of 64 KiB to 1 MiB of
  the attached device) during the attached compaction, against the same
  reader on the same attached disk for as long without one: its rate during
  / its rate without; and the compaction's time with the reader against
  without.

The contenders take turns within each round, so that a busy moment of the
machine does not fall on one side only.  Not a test: timings vary by
machine; the ratios are what to compare.  Needs qemu-img, qemu-io and
blkdiscard; run as root (attaching needs it).

    python benchmarks/compact_attached.py [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _load import Load

import virtdisk
from virtdisk import Access

MiB = 1 << 20
GiB = 1 << 30
SIZE = GiB
QEMU_FORMAT = {"vhd": "vpc", "vhdx": "vhdx"}
BLOCK = {"vhdx": 32 * MiB, "vhd": 2 * MiB}
FS_AWARE = Access.METAOPS | Access.ATTACH_RO | Access.DETACH | Access.GET_INFO

# Reads until stdin closes; then prints how many bytes and seconds.
_READER = textwrap.dedent(
    """
    import mmap, os, random, select, sys, time
    device, size = sys.argv[1], int(sys.argv[2])
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, 1 << 20)
    rng = random.Random(1)
    step = 65536
    read, start = 0, time.perf_counter()
    print("started", flush=True)
    while not select.select([sys.stdin], [], [], 0)[0]:
        for _ in range(16):
            length = rng.randrange(1, 17) * step
            offset = rng.randrange((size - length) // step + 1) * step
            read += os.preadv(fd, [memoryview(buffer)[:length]], offset)
    print(read, time.perf_counter() - start, flush=True)
    """
)


def run(*command: str) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_image(path: Path, suffix: str) -> None:
    """Every block data but two never written (so that the disk is served,
    not loop-mapped as one stretch of the file), then every fourth one
    zeros and the one after it discarded by the guest."""
    block = BLOCK[suffix]
    virtdisk.create(path, SIZE, block_size=block).close()
    blocks = SIZE // block
    commands: list[str] = []
    for b in range(blocks):
        if b not in (2, blocks // 2 + 2):
            commands += ["-c", f"write -P {b % 255 + 1} {b * block} {block}"]
    for b in range(0, blocks, 4):
        commands += ["-c", f"write -P 0 {b * block} {block}"]
    run("qemu-io", "-f", QEMU_FORMAT[suffix], *commands, str(path))
    with virtdisk.open(path) as disk:
        disk.attach(read_only=False)
        for b in range(1, blocks, 4):
            run("blkdiscard", "-o", str(b * block), "-l", str(block), disk.physical_path)
        disk.detach()


def attached_once(work: Path, with_reader: bool) -> tuple[float, float | None]:
    """(seconds of the compaction while attached, the reader's rate during
    it or None)."""
    with virtdisk.open(work, FS_AWARE) as disk:
        disk.attach(read_only=True)
        reader = Load(_READER, disk.physical_path, str(SIZE)) if with_reader else None
        try:
            start = time.perf_counter()
            disk.compact()
            seconds = time.perf_counter() - start
            rate = reader.stop() if reader else None
        finally:
            if reader:
                reader.kill()
        disk.detach()
    return seconds, rate


def reader_alone(work: Path, seconds: float) -> float:
    with virtdisk.open(work, FS_AWARE) as disk:
        disk.attach(read_only=True)
        reader = Load(_READER, disk.physical_path, str(SIZE))
        try:
            time.sleep(seconds)
            return reader.stop()
        finally:
            reader.kill()
            disk.detach()


def bench(folder: Path, suffix: str, rounds: int) -> None:
    block = BLOCK[suffix]
    source = folder / f"source.{suffix}"
    make_image(source, suffix)
    fsync(source)
    work, converted = folder / f"work.{suffix}", folder / f"converted.{suffix}"

    def copy() -> None:
        # Flushed, untimed: the compaction's flushes must not pay for the copy.
        work.unlink(missing_ok=True)
        run("cp", "--sparse=never", str(source), str(work))
        fsync(work)

    def convert() -> float:
        converted.unlink(missing_ok=True)
        start = time.perf_counter()
        options = f"block_size={block}" if suffix == "vhdx" else "subformat=dynamic"
        run("qemu-img", "convert", "-f", QEMU_FORMAT[suffix], "-O", QEMU_FORMAT[suffix], "-o", options,
            str(source), str(converted))  # fmt: skip
        fsync(converted)
        return time.perf_counter() - start

    def detached() -> float:
        copy()
        start = time.perf_counter()
        virtdisk.compact(work)
        return time.perf_counter() - start

    attached: list[float] = []
    alone: list[float] = []
    converts: list[float] = []
    for _ in range(rounds):
        copy()
        attached.append(attached_once(work, with_reader=False)[0])
        alone.append(detached())
        converts.append(convert())
    fmt = QEMU_FORMAT[suffix]
    run("qemu-img", "compare", "-f", fmt, "-F", fmt, str(source), str(converted))
    copy()
    attached_once(work, with_reader=False)
    run("qemu-img", "compare", "-f", fmt, "-F", fmt, str(source), str(work))
    compacted = work.stat().st_size
    ours, det, qemu = min(attached), min(alone), min(converts)
    print(
        f"{suffix.upper():4} 1 GiB, {block // MiB} MiB blocks, half dropped: "
        f"{source.stat().st_size / MiB:5.0f} MiB -> {compacted / MiB:5.0f} MiB; "
        f"attached {ours:6.3f} s, detached {det:6.3f} s "
        f"(detached / attached = {det / ours:5.2f}); qemu-img convert + fsync {qemu:6.3f} s "
        f"({converted.stat().st_size / MiB:5.0f} MiB; qemu-img / attached = {qemu / ours:5.2f})"
    )

    during: list[float] = []
    without: list[float] = []
    busy: list[float] = []
    for _ in range(rounds):
        copy()
        seconds, rate = attached_once(work, with_reader=True)
        assert rate is not None
        busy.append(seconds)
        during.append(rate)
        # The same image as before the compaction: as many blocks to read.
        copy()
        without.append(reader_alone(work, seconds))
    ratios = sorted(d / w for d, w in zip(during, without))
    print(
        f"     reader during the compaction: {max(during) / MiB:7.1f} MiB/s, "
        f"without {max(without) / MiB:7.1f} MiB/s (during / without = {max(during) / max(without):5.2f}, "
        f"median of rounds {ratios[len(ratios) // 2]:5.2f}); "
        f"the compaction with the reader {min(busy):6.3f} s ({min(busy) / ours:5.2f} x without)"
    )
    for path in (source, work, converted):
        path.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", help="where to put the images (default: a temporary folder)")
    parser.add_argument("--format", choices=["vhdx", "vhd"], action="append", help="default: both")
    args = parser.parse_args()
    for tool in ("qemu-img", "qemu-io", "blkdiscard"):
        if not shutil.which(tool):
            print(f"needs {tool}", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for suffix in args.format or ["vhdx", "vhd"]:
            bench(Path(folder), suffix, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
