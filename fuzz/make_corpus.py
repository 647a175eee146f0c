"""Seed corpora for the fuzz targets: valid images of every kind, packed (pack.py).

    python fuzz/make_corpus.py [OUT]        # default: fuzz/corpus

Writes OUT/{vhd,vhdx,iso,probe}/ (probe gets every seed) and OUT/parents/
(parent.vhd, parent.vhdx: the parents the differencing seeds name by a
relative locator; the harness copies them next to each input).  Images are
small (4-8 MiB virtual, sparse) and only their non-zero bytes are kept, so
nothing here is worth committing: CI regenerates it.  Needs the virtdisk
module; qemu-img, genisoimage and xorriso add seeds when installed.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import virtdisk

sys.path.insert(0, str(Path(__file__).parent))
from pack import pack

MiB = 1 << 20
PARENT_VHD_ID = uuid.UUID("5eed0000-0000-4000-8000-00000000d15c")
PARENT_VHDX_ID = uuid.UUID("5eed0000-0000-4000-8000-0000000d15c2")


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _run(*command: str) -> bool:
    if shutil.which(command[0]) is None:
        print(f"make_corpus: {command[0]} not installed, skipping its seeds", file=sys.stderr)
        return False
    subprocess.run(command, check=True, capture_output=True)
    return True


def _raw_with_data(path: Path, size: int) -> Path:
    """A raw disk with a recognisable pattern in a few sectors (first, a block boundary, last)."""
    data = bytearray(size)
    for offset in (0, 2 * MiB - 512, 2 * MiB, size - 512):
        data[offset : offset + 512] = bytes((offset >> 9) + i & 0xFF or 1 for i in range(512))
    path.write_bytes(data)
    return path


def _vhd_diff_with_block(child: Path) -> None:
    """Give a differencing VHD one allocated block whose bitmap marks some sectors present."""
    data = bytearray(child.read_bytes())
    footer = data[-512:]
    table_offset = struct.unpack_from(">Q", data, 512 + 16)[0]
    block_at = len(data) - 512
    bitmap = bytearray(512)
    bitmap[0] = 0b1010_0000  # sectors 0 and 2 of block 0 from the child
    bitmap[1] = 0xFF
    block = bytearray(2 * MiB)
    for sector in (0, 2, *range(8, 16)):
        block[sector * 512 : sector * 512 + 512] = bytes([0xC0 | sector]) * 512
    data[block_at:] = bitmap + block + footer
    struct.pack_into(">I", data, table_offset, block_at // 512)
    child.write_bytes(data)


def _vhdx_bat_offset(data: bytes) -> tuple[int, int]:
    """(BAT offset, metadata offset) from the first region table."""
    count = struct.unpack_from("<I", data, 192 * 1024 + 8)[0]
    found = {}
    for i in range(count):
        entry = 192 * 1024 + 16 + 32 * i
        guid = uuid.UUID(bytes_le=bytes(data[entry : entry + 16]))
        found[str(guid)] = struct.unpack_from("<Q", data, entry + 16)[0]
    return found["2dc27766-f623-4200-9d64-115e9bfd4a08"], found["8b7ca206-4790-4b9a-b8fe-575f050f886e"]


def _vhdx_diff_with_partial_block(child: Path) -> None:
    """Give a differencing VHDX (2 MiB blocks, 512-byte sectors) a partially present block 0."""
    data = bytearray(child.read_bytes())
    bat, _ = _vhdx_bat_offset(data)
    end = -(-len(data) // MiB) * MiB
    data.extend(bytes(end - len(data)))
    bitmap_at, block_at = end, end + MiB
    bitmap = bytearray(MiB)
    bitmap[0] = 0b0000_0101  # sectors 0 and 2 (bit 0 = first sector)
    bitmap[1] = 0xFF
    block = bytearray(2 * MiB)
    for sector in (0, 2, *range(8, 16)):
        block[sector * 512 : sector * 512 + 512] = bytes([0xD0 | sector]) * 512
    data += bitmap + block
    chunk_ratio = (1 << 23) * 512 // (2 * MiB)
    struct.pack_into("<Q", data, bat, block_at | 7)  # PAYLOAD_BLOCK_PARTIALLY_PRESENT
    struct.pack_into("<Q", data, bat + 8 * chunk_ratio, bitmap_at | 6)  # SB_BLOCK_PRESENT
    child.write_bytes(data)


def _vhdx_with_log_entry(path: Path) -> None:
    """A VHDX whose current header names a log with one valid entry (to be refused, not read)."""
    data = bytearray(path.read_bytes())
    headers = [64 * 1024, 128 * 1024]
    current = max(headers, key=lambda at: struct.unpack_from("<Q", data, at + 8)[0])
    log_guid = uuid.uuid4().bytes_le
    log_offset = struct.unpack_from("<Q", data, current + 72)[0]
    entry = bytearray(4096)
    entry[0:4] = b"loge"
    struct.pack_into("<II", entry, 8, 4096, 0)  # EntryLength, Tail
    struct.pack_into("<QI", entry, 16, 1, 0)  # SequenceNumber, DescriptorCount
    entry[32:48] = log_guid
    struct.pack_into("<QQ", entry, 48, len(data), len(data))
    struct.pack_into("<I", entry, 4, _crc32c(bytes(entry)))
    data[log_offset : log_offset + 4096] = entry
    header = bytearray(data[current : current + 4096])
    header[48:64] = log_guid
    header[4:8] = bytes(4)
    struct.pack_into("<I", header, 4, _crc32c(bytes(header)))
    data[current : current + 4096] = header
    path.write_bytes(data)


def _vhdx_with_dirty_log(path: Path) -> None:
    """A VHDX whose log holds two entries to replay (§2.3): the first zeroes a new
    block past the end of the file and points BAT entry 0 at it, the second writes
    a data sector into it.  Seeds the log parser, the replay and its target checks."""
    data = bytearray(path.read_bytes())
    headers = [64 * 1024, 128 * 1024]
    current = max(headers, key=lambda at: struct.unpack_from("<Q", data, at + 8)[0])
    log_guid = uuid.UUID(int=0x1D1).bytes_le
    log_offset = struct.unpack_from("<Q", data, current + 72)[0]
    bat, _ = _vhdx_bat_offset(data)
    end = len(data)
    bat_sector = bytearray(data[bat : bat + 4096])
    struct.pack_into("<Q", bat_sector, 0, end | 6)  # PAYLOAD_BLOCK_FULLY_PRESENT
    payload = bytes(range(256)) * 16

    Zero = list[tuple[int, int]]
    Sectors = list[tuple[int, bytes]]

    def entry(sequence: int, position: int, zero: Zero, sectors: Sectors) -> bytes:
        count = len(zero) + len(sectors)
        raw = bytearray(4096 * (1 + len(sectors)))
        struct.pack_into("<4sIIIQII16sQQ", raw, 0, b"loge", 0, len(raw), 0, sequence, count, 0, log_guid,
                         end, end + MiB)  # fmt: skip
        at = 64
        for offset, length in zero:
            struct.pack_into("<4sIQQQ", raw, at, b"zero", 0, length, offset, sequence)
            at += 32
        for i, (offset, sector) in enumerate(sectors):
            struct.pack_into("<4s4s8sQQ", raw, at, b"desc", sector[4092:], sector[:8], offset, sequence)
            data_at = 4096 * (1 + i)
            struct.pack_into("<4sI", raw, data_at, b"data", sequence >> 32)
            raw[data_at + 8 : data_at + 4092] = sector[8:4092]
            struct.pack_into("<I", raw, data_at + 4092, sequence & 0xFFFFFFFF)
            at += 32
        struct.pack_into("<I", raw, 4, _crc32c(bytes(raw)))
        data[log_offset + position : log_offset + position + len(raw)] = raw
        return raw

    first = entry(1, 0, [(end, MiB)], [(bat, bytes(bat_sector))])
    entry(2, len(first), [], [(end + 4096, payload)])
    header = bytearray(data[current : current + 4096])
    header[48:64] = log_guid
    header[4:8] = bytes(4)
    struct.pack_into("<I", header, 4, _crc32c(bytes(header)))
    data[current : current + 4096] = header
    path.write_bytes(data)


def make(out: Path) -> dict[str, list[Path]]:
    parents = out / "parents"
    for sub in ("vhd", "vhdx", "iso", "probe", "parents"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    seeds: dict[str, list[Path]] = {"vhd": [], "vhdx": [], "iso": []}

    # The parents, and their children made beside them (so the relative locator
    # is ".\parent.vhd" / "./parent.vhdx", which the harness reproduces).
    # Fixed identifiers: children in a corpus grown from older seeds still
    # match regenerated parents.
    virtdisk.create(parents / "parent.vhd", 8 * MiB, unique_id=PARENT_VHD_ID).close()
    virtdisk.create(parents / "parent.vhdx", 8 * MiB, block_size=MiB, unique_id=PARENT_VHDX_ID).close()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        children = {
            "vhd": [scratch / "diff.vhd", scratch / "diff-block.vhd"],
            "vhdx": [scratch / "diff.vhdx", scratch / "diff-partial.vhdx"],
        }
        for kind, paths in children.items():
            for path in paths:
                child = parents / path.name
                virtdisk.create(child, parent=parents / f"parent.{kind}").close()
                shutil.move(child, path)
        _vhd_diff_with_block(scratch / "diff-block.vhd")
        _vhdx_diff_with_partial_block(scratch / "diff-partial.vhdx")
        seeds["vhd"] += children["vhd"]
        seeds["vhdx"] += children["vhdx"]

        virtdisk.create(scratch / "fixed.vhd", 4 * MiB, fixed=True).close()
        virtdisk.create(scratch / "dynamic.vhd", 8 * MiB).close()
        virtdisk.create(scratch / "dynamic-512k.vhd", 4 * MiB, block_size=512 * 1024).close()
        seeds["vhd"] += [scratch / n for n in ("fixed.vhd", "dynamic.vhd", "dynamic-512k.vhd")]
        virtdisk.create(scratch / "fixed.vhdx", 4 * MiB, fixed=True, block_size=MiB).close()
        virtdisk.create(scratch / "dynamic.vhdx", 8 * MiB, block_size=MiB).close()
        virtdisk.create(scratch / "dynamic-4k.vhdx", 8 * MiB, block_size=MiB, sector_size=4096).close()
        virtdisk.create(scratch / "log.vhdx", 4 * MiB, block_size=MiB).close()
        _vhdx_with_log_entry(scratch / "log.vhdx")
        virtdisk.create(scratch / "dirty-log.vhdx", 4 * MiB, block_size=MiB).close()
        _vhdx_with_dirty_log(scratch / "dirty-log.vhdx")
        names = ("fixed.vhdx", "dynamic.vhdx", "dynamic-4k.vhdx", "log.vhdx", "dirty-log.vhdx")
        seeds["vhdx"] += [scratch / n for n in names]

        raw = _raw_with_data(scratch / "data.raw", 6 * MiB)
        qemu = [
            ("qemu-fixed.vhd", "vpc", "subformat=fixed"),
            ("qemu-dynamic.vhd", "vpc", "subformat=dynamic"),
            ("qemu-force.vhd", "vpc", "subformat=dynamic,force_size=on"),
            ("qemu-dynamic.vhdx", "vhdx", "subformat=dynamic,block_size=1M"),
            ("qemu-fixed.vhdx", "vhdx", "subformat=fixed,block_size=1M"),
        ]
        for name, fmt, options in qemu:
            target = scratch / name
            if _run("qemu-img", "convert", "-f", "raw", "-O", fmt, "-o", options, str(raw), str(target)):
                seeds["vhd" if fmt == "vpc" else "vhdx"].append(scratch / name)

        tree = scratch / "tree"
        tree.mkdir()
        (tree / "hello.txt").write_text("hello\n")
        isos = [
            ("genisoimage.iso", ["genisoimage", "-quiet", "-R", "-J", "-o"]),
            ("udf.iso", ["genisoimage", "-quiet", "-udf", "-o"]),
            ("xorriso.iso", ["xorriso", "-as", "mkisofs", "-quiet", "-o"]),
        ]
        for name, command in isos:
            if _run(*command, str(scratch / name), str(tree)):
                seeds["iso"].append(scratch / name)

        for kind, paths in seeds.items():
            for path in paths:
                packed = pack(path.read_bytes())
                name = path.name.replace(".", "-") + ".bin"
                (out / kind / name).write_bytes(packed)
                (out / "probe" / name).write_bytes(packed)
    return seeds


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent / "corpus"
    seeds = make(out)
    for kind, paths in seeds.items():
        sizes = [(out / kind / (p.name.replace(".", "-") + ".bin")).stat().st_size for p in paths]
        print(f"{kind}: {len(paths)} seeds, {sum(sizes)} bytes packed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
