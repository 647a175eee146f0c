"""Benchmark: MirrorVirtualDisk of an attached 1 GiB dynamic VHDX, half of it
data, against copying the same disk with other tools, and what a mirror costs
a writer using the disk meanwhile.

In one run, on the same image (every other 32 MiB block written with random
data through the attached device, the rest never written):

- the mirror, from its start until the target is in sync and flushed (the
  operation's end), against two peers: ``qemu-img convert`` of the detached
  image to a new VHDX, followed by an fsync of its output (it does not flush
  by default), and ``dd`` of the attached device to a raw file with
  ``conv=fsync`` (it reads the whole disk, zeros too).  Before every timed
  run the image's pages are dropped from the page cache (posix_fadvise on
  that file only), so that each side reads it from the disk alike.
- a writer in another process (64 KiB random writes at random places of the
  blocks that hold data, through O_DIRECT, an fsync every 16) during the mirror, against the same writer
  for as long without one: its rate during / its rate without.

Not a test: timings vary by machine; the ratios are what to compare.  Needs
qemu-img and dd; run as root (attaching needs it).

    python benchmarks/mirror.py [--rounds 3] [--dir DIR]
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

MiB = 1 << 20
GiB = 1 << 30
SIZE = GiB
BLOCK = 32 * MiB

# Writes until stdin closes; then prints how many bytes and seconds.
_WRITER = textwrap.dedent(
    """
    import mmap, os, random, select, sys, time
    device, size, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    buffer = mmap.mmap(-1, 65536)
    buffer[:] = os.urandom(65536)
    rng = random.Random(1)
    written, start = 0, time.perf_counter()
    print("started", flush=True)
    while not select.select([sys.stdin], [], [], 0)[0]:
        for _ in range(16):
            # Into the blocks that hold data: allocating others would make
            # the runs unequal (each finds fewer left to allocate).
            offset = rng.randrange(size // block // 2) * 2 * block + rng.randrange(block // 65536) * 65536
            os.pwrite(fd, buffer, offset)
            written += 65536
        os.fsync(fd)
    print(written, time.perf_counter() - start, flush=True)
    """
)


def run(*command: str) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def uncache(path: Path) -> None:
    """Flushes path and drops its pages from the page cache (this file only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fill(source: Path) -> None:
    virtdisk.create(source, SIZE, block_size=BLOCK).close()
    with virtdisk.open(source) as disk:
        disk.attach(read_only=False)
        fd = os.open(disk.physical_path, os.O_RDWR)
        try:
            for offset in range(0, SIZE, 2 * BLOCK):
                for piece in range(offset, offset + BLOCK, 4 * MiB):
                    os.pwrite(fd, os.urandom(4 * MiB), piece)
            os.fsync(fd)
        finally:
            os.close(fd)


def mirror_once(source: Path, target: Path, with_writer: bool) -> tuple[float, float | None]:
    """(seconds of the mirror, the writer's rate during it or None)."""
    target.unlink(missing_ok=True)
    uncache(source)
    with virtdisk.open(source) as disk:
        disk.attach(read_only=False)
        writer = Load(_WRITER, disk.physical_path, str(SIZE), str(BLOCK)) if with_writer else None
        try:
            start = time.perf_counter()
            disk.mirror(target)
            seconds = time.perf_counter() - start
            rate = writer.stop() if writer else None
            # Broken with nothing written since: the target, now the disk,
            # equals the source, now let go.  (Closing the handle in sync
            # would cancel the mirror, as on Windows, and remove the target.)
            disk.break_mirror()
        finally:
            if writer:
                writer.kill()
    return seconds, rate


def writer_alone(source: Path, seconds: float) -> float:
    with virtdisk.open(source) as disk:
        disk.attach(read_only=False)
        writer = Load(_WRITER, disk.physical_path, str(SIZE), str(BLOCK))
        try:
            time.sleep(seconds)
            return writer.stop()
        finally:
            writer.kill()


def convert_once(source: Path, peer: Path) -> float:
    peer.unlink(missing_ok=True)
    uncache(source)
    start = time.perf_counter()
    run("qemu-img", "convert", "-f", "vhdx", "-O", "vhdx", str(source), str(peer))
    fd = os.open(peer, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - start


def dd_once(source: Path, raw: Path) -> float:
    raw.unlink(missing_ok=True)
    uncache(source)
    with virtdisk.open(source, read_only=True) as disk:
        disk.attach()
        start = time.perf_counter()
        run("dd", f"if={disk.physical_path}", f"of={raw}", "bs=4M", "conv=fsync", "status=none")
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", help="where to put the images (default: a temporary folder)")
    args = parser.parse_args()
    if not shutil.which("qemu-img") or not shutil.which("dd"):
        print("needs qemu-img and dd", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(dir=args.dir) as name:
        folder = Path(name)
        source, target = folder / "source.vhdx", folder / "target.vhdx"
        peer, raw = folder / "peer.vhdx", folder / "peer.raw"
        fill(source)
        mirrors, converts, dds = [], [], []
        # The contenders take turns within each round, so that a busy moment
        # of the machine does not fall on one side only.
        for _ in range(args.rounds):
            mirrors.append(mirror_once(source, target, with_writer=False)[0])
            converts.append(convert_once(source, peer))
            dds.append(dd_once(source, raw))
        run("qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", str(source), str(target))
        ours, convert, dd = min(mirrors), min(converts), min(dds)
        print(
            f"1 GiB VHDX, 512 MiB data: mirror {ours:6.3f} s; qemu-img convert + fsync {convert:6.3f} s "
            f"(qemu-img / mirror = {convert / ours:5.2f}); dd of the device {dd:6.3f} s "
            f"(dd / mirror = {dd / ours:5.2f})"
        )
        during, alone, busy_mirrors = [], [], []
        for _ in range(args.rounds):
            seconds, rate = mirror_once(source, target, with_writer=True)
            assert rate is not None
            busy_mirrors.append(seconds)
            during.append(rate)
            alone.append(writer_alone(source, seconds))
        ratios = [d / a for d, a in zip(during, alone)]
        print(
            f"writer during the mirror: {max(during) / MiB:7.1f} MiB/s, alone {max(alone) / MiB:7.1f} MiB/s "
            f"(during / alone = {max(ratios):5.2f}, median {sorted(ratios)[len(ratios) // 2]:5.2f}); "
            f"the mirror with the writer {min(busy_mirrors):6.3f} s ({min(busy_mirrors) / ours:5.2f} x alone)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
