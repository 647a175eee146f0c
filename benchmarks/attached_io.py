"""I/O through /dev/loopN for the same data in three set-ups (not a test):

  (a) a raw file on a plain loop device (losetup) -- the limit;
  (b) a dynamic VHDX attached by virtdisk (FUSE server + loop device);
  (c) the same VHDX through vhdimount (libvhdi's read-only FUSE server) + losetup.

Sequential 1 MiB and random 4 KiB reads and writes with O_DIRECT on the loop
device, page caches dropped before each run.  Run as root:
    python benchmarks/attached_io.py [--size-mib 512] [--random-ops 20000]
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import virtdisk

MiB = 1 << 20


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def sequential(device: str, size: int, write: bool) -> float:
    """MB/s of 1 MiB O_DIRECT transfers over the whole device."""
    buffer = mmap.mmap(-1, MiB)
    buffer.write(os.urandom(MiB))
    fd = os.open(device, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
    try:
        drop_caches()
        start = time.perf_counter()
        for offset in range(0, size, MiB):
            if write:
                os.pwritev(fd, [buffer], offset)
            else:
                os.preadv(fd, [buffer], offset)
        if write:
            os.fsync(fd)
        return size / MiB / (time.perf_counter() - start)
    finally:
        os.close(fd)


def random_4k(device: str, size: int, ops: int, write: bool) -> float:
    """IOPS of 4 KiB O_DIRECT transfers at random aligned offsets."""
    buffer = mmap.mmap(-1, 4096)
    buffer.write(os.urandom(4096))
    rng = random.Random(42)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(ops)]
    fd = os.open(device, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
    try:
        drop_caches()
        start = time.perf_counter()
        for offset in offsets:
            if write:
                os.pwritev(fd, [buffer], offset)
            else:
                os.preadv(fd, [buffer], offset)
        if write:
            os.fsync(fd)
        return ops / (time.perf_counter() - start)
    finally:
        os.close(fd)


@contextlib.contextmanager
def losetup(path: Path, read_only: bool = False) -> Iterator[str]:
    command = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else []) + [str(path)]
    device = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


@contextlib.contextmanager
def attached(path: Path) -> Iterator[str]:
    with virtdisk.open(path) as disk:
        disk.attach()
        try:
            yield disk.physical_path
        finally:
            disk.detach()


@contextlib.contextmanager
def vhdimounted(path: Path, folder: Path) -> Iterator[str]:
    mount_point = folder / "vhdi"
    mount_point.mkdir(exist_ok=True)
    subprocess.run(["vhdimount", str(path), str(mount_point)], check=True, capture_output=True)
    try:
        with losetup(mount_point / "vhdi1", read_only=True) as device:
            yield device
    finally:
        subprocess.run(["fusermount", "-u", str(mount_point)], check=False)
        subprocess.run(["umount", "-q", str(mount_point)], check=False)


def measure(
    name: str, setup: Callable[[], contextlib.AbstractContextManager[str]], size: int, ops: int, writes: bool
) -> dict[str, float]:
    results: dict[str, float] = {}
    with setup() as device:
        results["seq read MB/s"] = sequential(device, size, write=False)
        results["rand 4k read IOPS"] = random_4k(device, size, ops, write=False)
        if writes:
            results["seq write MB/s"] = sequential(device, size, write=True)
            results["rand 4k write IOPS"] = random_4k(device, size, ops, write=True)
    print(f"{name}: " + ", ".join(f"{key} {value:,.0f}" for key, value in results.items()), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--random-ops", type=int, default=20000)
    options = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: loop devices and FUSE mounts need it")
    size = options.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="virtdisk-bench-") as temporary:
        folder = Path(temporary)
        raw, vhdx = folder / "data.raw", folder / "data.vhdx"
        with raw.open("wb") as out:
            for _ in range(size // MiB):
                out.write(os.urandom(MiB))
        virtdisk.create(vhdx, size).close()
        with attached(vhdx) as device, open(device, "r+b") as disk, raw.open("rb") as source:
            shutil.copyfileobj(source, disk, MiB)
        a = measure("(a) raw file + loop", lambda: losetup(raw), size, options.random_ops, writes=True)
        # Writes change the data: measure (c) on the untouched copy first.
        c = (
            measure(
                "(c) vhdimount + loop",
                lambda: vhdimounted(vhdx, folder),
                size,
                options.random_ops,
                writes=False,
            )
            if shutil.which("vhdimount")
            else None
        )
        b = measure(
            "(b) virtdisk dynamic VHDX", lambda: attached(vhdx), size, options.random_ops, writes=True
        )
    print("ratios:")
    for key in b:
        line = f"  {key}: (b)/(a) {b[key] / a[key]:.2f}"
        if c and key in c:
            line += f", (c)/(a) {c[key] / a[key]:.2f}, (b)/(c) {b[key] / c[key]:.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
