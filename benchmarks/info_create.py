"""Benchmark: reading information and creating images, against qemu-img and vhdiinfo.

In one run on the same images:
  - the cost of opening, against a bare open + two 4 KiB header reads +
    close of the same file (os calls): the raw OpenVirtualDisk+CloseHandle,
    ``open()``+close and ``open()``+``info``+close, each as the median over
    rounds of its ratio to the bare read measured in the same round (target
    for open+info+close: within 4x of it), and the system calls each makes
    (strace);
  - the floor under those ratios: the system calls a dynamic VHDX's open
    for information must make (the format's reads, the sharing claim, what
    the information asks of the kernel), timed in C by open_floor.c, each
    level against the C bare read and the Python one above;
  - an inventory: ``open()``+``info``+close of N images (half VHD, half
    VHDX, each its own file), reading what an inventory lists (path, format,
    type, virtual and physical size, identifier, parent), against the bare
    read of the same files (target for 10,000: well under a second);
  - ``disk.info`` (open to close) against ``qemu-img info --output=json`` and
    ``vhdiinfo``, per image (target: at least 50x faster than qemu-img info);
  - create of a 64 GiB dynamic VHDX and of a 1 GiB fixed VHD against
    ``qemu-img create`` with the same format and subformat;
  - create of a 1 GiB fixed VHD against writing its 1 GiB of zeros through the
    page cache, dd-like (target: at least 10x faster), and whether the fixed
    VHD really got its space from fallocate (strace, allocated blocks).

Not a test: timings vary by machine; the ratios are what to compare.

    python benchmarks/info_create.py [--iterations 200] [--inventory 10000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import virtdisk

MiB = 1 << 20
GiB = 1 << 30


def per_call(function: Callable[[], object], iterations: int, rounds: int = 3) -> float:
    """The best of a few rounds' mean: the least disturbed measurement."""
    results = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iterations):
            function()
        results.append((time.perf_counter() - start) / iterations)
    return min(results)


def once(function: Callable[[], object], cleanup: Callable[[], object], rounds: int = 3) -> float:
    """The best of a few timed runs of a one-shot action (cleanup between, untimed)."""
    results = []
    for _ in range(rounds):
        cleanup()
        start = time.perf_counter()
        function()
        results.append(time.perf_counter() - start)
    cleanup()
    return min(results)


def run(*command: str) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def facade_info(path: Path) -> None:
    with virtdisk.open(path, read_only=True) as disk:
        disk.info  # noqa: B018 - the property is the work being timed


def cpu_per_call(function: Callable[[], object], iterations: int) -> float:
    """Processor time per call: unlike the wall clock, it does not count the
    time other processes on a busy machine take the processor away."""
    start = time.process_time()
    for _ in range(iterations):
        function()
    return (time.process_time() - start) / iterations


def bench_open(images: dict[str, tuple[Path, str]], iterations: int, rounds: int = 15) -> dict[str, float]:
    """Each round times every contender once, interleaved, in processor
    time, and divides by the bare read of the same round; the median of those
    ratios is reported: on a busy machine a round's contenders share its
    conditions, and the median ignores the rounds another process spoiled."""
    from virtdisk._native import ffi, lib

    handle = ffi.new("HANDLE *")
    storage = ffi.new("VIRTUAL_STORAGE_TYPE *")
    parameters = ffi.new("OPEN_VIRTUAL_DISK_PARAMETERS *", {"Version": lib.OPEN_VIRTUAL_DISK_VERSION_1})
    access = (
        lib.VIRTUAL_DISK_ACCESS_ATTACH_RO | lib.VIRTUAL_DISK_ACCESS_GET_INFO | lib.VIRTUAL_DISK_ACCESS_DETACH
    )

    print(
        f"\n== open, against a bare open + two header reads + close "
        f"(x{iterations}, median of {rounds} rounds' ratios, processor time)"
    )
    print(f"{'image':18} {'bare':>8} {'raw API':>16} {'open+close':>16} {'open+info+close':>16}")
    bares: dict[str, float] = {}
    for name, (path, _) in images.items():
        text = str(path)

        def bare(text: str = text) -> None:
            fd = os.open(text, os.O_RDONLY)
            os.pread(fd, 4096, 0)
            os.pread(fd, 4096, 64 * 1024)
            os.close(fd)

        def raw(text: str = text) -> None:
            lib.OpenVirtualDisk(storage, text, access, 0, parameters, handle)
            lib.CloseHandle(handle[0])

        def open_close(path: Path = path) -> None:
            virtdisk.open(path, read_only=True).close()

        contenders = {
            "bare": bare,
            "raw": raw,
            "open": open_close,
            "info": lambda path=path: facade_info(path),
        }
        times: dict[str, list[float]] = {key: [] for key in contenders}
        for _ in range(rounds):
            for key, function in contenders.items():
                times[key].append(cpu_per_call(function, iterations))
        bare_median = statistics.median(times["bare"])
        bares[name] = bare_median
        row = f"{name:18} {bare_median * 1e6:6.1f}us"
        for key in ("raw", "open", "info"):
            ratio = statistics.median(t / b for t, b in zip(times[key], times["bare"]))
            row += f" {statistics.median(times[key]) * 1e6:6.1f}us {ratio:5.1f}x"
        print(row)
    return bares


FLOOR_IMAGE = "dynamic VHDX 64M"


def bench_floor(images: dict[str, tuple[Path, str]], folder: Path, iterations: int, bare: float) -> None:
    """The system calls an open for information cannot do without, in C
    (open_floor.c says which): how close the ratios above can come to 1x."""
    compiler = shutil.which("cc")
    print(
        f"\n== the floor: {FLOOR_IMAGE}'s system calls alone, in C (open_floor.c, x{iterations}, best of 15)"
    )
    if compiler is None:
        print("no C compiler: not measured")
        return
    binary, locks = folder / "open_floor", folder / "floor-locks"
    locks.mkdir()
    subprocess.run(
        [compiler, "-O2", "-o", str(binary), str(Path(__file__).with_name("open_floor.c"))], check=True
    )
    result = subprocess.run(
        [str(binary), str(images[FLOOR_IMAGE][0]), str(locks), str(iterations)],
        capture_output=True,
        text=True,
        check=True,
    )
    print(f"{'level':8} {'C':>8} {'vs C bare':>9} {'vs Python bare':>15}")
    for line in result.stdout.splitlines():
        level, micros, ratio = line.split()
        seconds = float(micros.rstrip("us")) / 1e6
        print(f"{level:8} {micros:>8} {ratio:>9} {seconds / bare:14.1f}x")


SYSCALL_PROBE = """
import os, sys, virtdisk
from virtdisk._native import ffi, lib
path, what = sys.argv[1], sys.argv[2]
handle = ffi.new("HANDLE *")
storage = ffi.new("VIRTUAL_STORAGE_TYPE *")
parameters = ffi.new("OPEN_VIRTUAL_DISK_PARAMETERS *", {"Version": lib.OPEN_VIRTUAL_DISK_VERSION_1})
access = lib.VIRTUAL_DISK_ACCESS_ATTACH_RO | lib.VIRTUAL_DISK_ACCESS_GET_INFO | lib.VIRTUAL_DISK_ACCESS_DETACH
def once():
    if what == "raw":
        lib.OpenVirtualDisk(storage, path, access, 0, parameters, handle)
        lib.CloseHandle(handle[0])
    else:
        with virtdisk.open(path, read_only=True) as disk:
            disk.info
once()  # first-use costs (run directory, caches) are not what is counted
os.write(2, b"@@start\\n")
once()
os.write(2, b"@@end\\n")
"""


def count_syscalls(images: dict[str, tuple[Path, str]]) -> None:
    """System calls of one open+close (raw API) and one open+info+close, by strace."""
    strace = shutil.which("strace")
    print("\n== system calls per open (strace; the bare read makes 4)")
    if strace is None:
        print("strace not installed: not counted")
        return
    print(f"{'image':18} {'raw API':>8} {'open+info+close':>16}")
    for name, (path, _) in images.items():
        counts = []
        for what in ("raw", "info"):
            result = subprocess.run(
                [strace, "-f", sys.executable, "-c", SYSCALL_PROBE, str(path), what],
                capture_output=True,
                text=True,
                check=True,
            )
            lines = result.stderr.splitlines()
            start = next(i for i, line in enumerate(lines) if "@@start" in line)
            end = next(i for i, line in enumerate(lines) if "@@end" in line)
            # The marker writes themselves are not counted.
            calls = [line for line in lines[start + 1 : end] if "(" in line and not line.startswith(")")]
            counts.append(len(calls))
        print(f"{name:18} {counts[0]:8d} {counts[1]:16d}")


def sparse_copy(source: Path, target: Path) -> None:
    """A copy that writes only the source's data extents (SEEK_DATA/SEEK_HOLE)."""
    size = source.stat().st_size
    with source.open("rb") as src, target.open("wb") as out:
        offset = 0
        while offset < size:
            try:
                data = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(src.fileno(), data, os.SEEK_HOLE)
            out.seek(data)
            out.write(os.pread(src.fileno(), hole - data, data))
            offset = hole
        out.truncate(size)


def bench_inventory(folder: Path, count: int, rounds: int = 3) -> None:
    """open()+info+close of count images, each its own file (its own lock
    file), keeping what an inventory lists; against the bare read of the
    same files, interleaved, best of rounds (wall clock)."""
    templates = [folder / "template.vhd", folder / "template.vhdx"]
    virtdisk.create(templates[0], 64 * MiB).close()
    virtdisk.create(templates[1], 64 * MiB).close()
    store = folder / "inventory"
    store.mkdir()
    paths = []
    for i in range(count):
        template = templates[i % 2]
        path = store / f"{i:05d}{template.suffix}"
        sparse_copy(template, path)
        paths.append(path)

    def inventory() -> list[tuple[object, ...]]:
        rows = []
        for path in paths:
            with virtdisk.open(path, read_only=True) as disk:
                info = disk.info
            rows.append(
                (
                    info.path,
                    info.storage_type,
                    info.disk_type,
                    info.virtual_size,
                    info.physical_size,
                    info.identifier,
                    info.parent_path,
                )
            )
        return rows

    def bare() -> None:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            os.pread(fd, 4096, 0)
            os.pread(fd, 4096, 64 * 1024)
            os.close(fd)

    best = {"inventory": float("inf"), "bare": float("inf")}
    for _ in range(rounds):
        for key, function in (("inventory", inventory), ("bare", bare)):
            start = time.perf_counter()
            function()
            best[key] = min(best[key], time.perf_counter() - start)
    rows = inventory()
    assert len(rows) == count and all(row[3] == 64 * MiB for row in rows)
    print(f"\n== inventory of {count} images (half VHD, half VHDX; best of {rounds}, wall clock)")
    per_image = best["inventory"] / count * 1e6
    print(
        f"open+info+close {best['inventory'] * 1e3:8.1f}ms   bare read {best['bare'] * 1e3:8.1f}ms   "
        f"ratio {best['inventory'] / best['bare']:5.1f}x   ({per_image:.1f}us per image)"
    )
    shutil.rmtree(store)


def make_images(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, qemu format)."""
    images = {
        "fixed VHD 64M": (folder / "fixed.vhd", "vpc"),
        "dynamic VHD 64M": (folder / "dynamic.vhd", "vpc"),
        "fixed VHDX 64M": (folder / "fixed.vhdx", "vhdx"),
        "dynamic VHDX 64M": (folder / "dynamic.vhdx", "vhdx"),
        "dynamic VHDX 64G": (folder / "big.vhdx", "vhdx"),
    }
    virtdisk.create(images["fixed VHD 64M"][0], 64 * MiB, fixed=True).close()
    virtdisk.create(images["dynamic VHD 64M"][0], 64 * MiB).close()
    virtdisk.create(images["fixed VHDX 64M"][0], 64 * MiB, fixed=True).close()
    virtdisk.create(images["dynamic VHDX 64M"][0], 64 * MiB).close()
    virtdisk.create(images["dynamic VHDX 64G"][0], 64 * GiB).close()
    return images


def bench_info(images: dict[str, tuple[Path, str]], iterations: int) -> None:
    qemu, vhdiinfo = shutil.which("qemu-img"), shutil.which("vhdiinfo")
    tool_iterations = max(5, iterations // 10)
    print(f"\n== info, open to close (virtdisk x{iterations}, tools x{tool_iterations})")
    print(f"{'image':18} {'virtdisk':>10} {'qemu-img':>10} {'vhdiinfo':>10} {'vs qemu':>9} {'vs vhdi':>9}")
    for name, (path, fmt) in images.items():
        ours = per_call(lambda path=path: facade_info(path), iterations)
        row = f"{name:18} {ours * 1e6:8.0f}us"
        ratios = ""
        for tool, command in (
            (qemu, [qemu, "info", "-f", fmt, "--output=json", str(path)]),
            (vhdiinfo, [vhdiinfo, str(path)]),
        ):
            if tool is None:
                row += f" {'-':>10}"
                ratios += f" {'-':>9}"
                continue
            theirs = per_call(lambda command=command: run(*command), tool_iterations)
            row += f" {theirs * 1e3:8.2f}ms"
            ratios += f" {theirs / ours:8.0f}x"
        print(row + ratios)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def bench_create(folder: Path) -> None:
    qemu = shutil.which("qemu-img")
    target = folder / "created"

    def remove() -> None:
        target.unlink(missing_ok=True)

    print("\n== create (best of 3)")
    cases = [
        (
            "dynamic VHDX 64G",
            lambda: virtdisk.create(target, 64 * GiB, storage_type=virtdisk.StorageType.VHDX).close(),
            ["-f", "vhdx", "-o", "subformat=dynamic,block_size=32M", "64G"],
        ),
        (
            "fixed VHD 1G",
            lambda: virtdisk.create(target, GiB, fixed=True, storage_type=virtdisk.StorageType.VHD).close(),
            ["-f", "vpc", "-o", "subformat=fixed,force_size=on", "1G"],
        ),
    ]
    print(f"{'image':18} {'virtdisk':>10} {'alloc':>9} {'qemu-img':>10} {'alloc':>9} {'ratio':>7}")
    for name, ours_create, qemu_args in cases:
        ours = once(ours_create, remove)
        ours_create()
        ours_alloc = allocated(target)
        remove()
        row = f"{name:18} {ours * 1e3:8.1f}ms {ours_alloc // MiB:7d}Mi"
        if qemu:
            command = [qemu, "create", "-q", *qemu_args[:-1], str(target), qemu_args[-1]]
            theirs = once(lambda command=command: run(*command), remove)
            run(*command)
            theirs_alloc = allocated(target)
            remove()
            row += f" {theirs * 1e3:8.1f}ms {theirs_alloc // MiB:7d}Mi {theirs / ours:6.1f}x"
        print(row)
    print("(alloc: bytes the file system allocated; qemu-img leaves a fixed VHD sparse)")

    zeros = folder / "zeros"

    def write_zeros(sync: bool) -> None:
        chunk = bytes(MiB)
        with open(zeros, "wb") as out:
            for _ in range(GiB // MiB):
                out.write(chunk)
            out.write(bytes(512))
            if sync:
                out.flush()
                os.fsync(out.fileno())

    def remove_zeros() -> None:
        zeros.unlink(missing_ok=True)

    def create_fixed() -> None:
        virtdisk.create(target, GiB, fixed=True, storage_type=virtdisk.StorageType.VHD).close()

    ours = once(create_fixed, remove)
    unsynced = once(lambda: write_zeros(False), remove_zeros)
    synced = once(lambda: write_zeros(True), remove_zeros)
    print("\n== 1 GiB fixed VHD: create vs writing its zeros through the page cache")
    print(f"virtdisk create          {ours * 1e3:8.1f}ms")
    print(f"write zeros              {unsynced * 1e3:8.1f}ms  ratio {unsynced / ours:6.1f}x")
    print(f"write zeros + fsync      {synced * 1e3:8.1f}ms  ratio {synced / ours:6.1f}x")
    check_fallocate(target)


def check_fallocate(target: Path) -> None:
    """Does the fixed VHD's space come from fallocate?  strace says which calls ran."""
    create = (
        "import sys, virtdisk; "
        "virtdisk.create(sys.argv[1], 1 << 30, fixed=True, storage_type=virtdisk.StorageType.VHD).close()"
    )
    target.unlink(missing_ok=True)
    strace = shutil.which("strace")
    if strace is None:
        print("strace not installed: fallocate not checked")
        return
    result = subprocess.run(
        [strace, "-f", "-e", "trace=fallocate,pwrite64,write", sys.executable, "-c", create, str(target)],
        capture_output=True,
        text=True,
        check=True,
    )
    calls = [line for line in result.stderr.splitlines() if "fallocate(" in line]
    big_writes = [line for line in result.stderr.splitlines() if "write" in line and "= 1048576" in line]
    print(f"strace: {len(calls)} fallocate call(s): {calls[0].strip() if calls else '-'}")
    print(f"strace: {len(big_writes)} 1 MiB writes (zero-filling); allocated {allocated(target) // MiB} MiB")
    target.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--inventory", type=int, default=10000, help="images in the inventory (0: none)")
    parser.add_argument("--dir", type=Path, help="where to put the images (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as name:
        folder = Path(name)
        print(f"images in {folder} ({os.statvfs(folder).f_bsize}-byte blocks)")
        images = make_images(folder)
        bares = bench_open(images, args.iterations * 5)
        bench_floor(images, folder, args.iterations * 5, bares[FLOOR_IMAGE])
        count_syscalls(images)
        if args.inventory:
            bench_inventory(folder, args.inventory)
        bench_info(images, args.iterations)
        bench_create(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
