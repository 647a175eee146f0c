"""Damaged images, field by field: an error that names what is wrong, or sane information.

Each test takes a valid image (fixed, dynamic and differencing VHD and VHDX,
ISO), changes one structure field (every footer and header field, region and
metadata table entries, metadata items, BAT entries, locators) or overwrites
part of a structure with random bytes, and opens the result read-only.
Checksums are recomputed unless the example says not to, so that the check
behind the checksum is reached too.  The open must either succeed with sane
information or raise InvalidImageError (or, for the two codes the facade maps
there, NotSupportedError) whose detail names the structure and an offset.

The opens run in a helper process with a timeout, so a crash or a hang is a
failed example rather than a dead test run; the fuzz targets (fuzz/) look for
crashes in far more inputs than these.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import virtdisk
from virtdisk import WinError

from .conftest import require_tool
from .vhdxlog import crc32c as _crc32c

MiB = 1 << 20
SETTINGS = settings(
    max_examples=int(os.environ.get("CORRUPTION_EXAMPLES", "100")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
OPEN_TIMEOUT = 20.0

# ---- checksums ----------------------------------------------------------------


def _vhd_checksum(structure: bytes | bytearray, at: int) -> int:
    return ~(sum(structure) - sum(structure[at : at + 4])) & 0xFFFFFFFF


# ---- structures: where each field is, and how its checksum is resealed ---------


@dataclass(frozen=True)
class Structure:
    """One on-disk structure: name, copies (file offsets), size, and checksum."""

    name: str
    copies: tuple[int, ...]
    size: int
    checksum: str | None = None  # "vhd" (byte sum, big-endian) or "crc32c" (little-endian)
    checksum_at: int = 0
    big_endian: bool = False  # VHD's integers; VHDX's and ISO's are little-endian

    def reseal(self, image: bytearray, at: int) -> None:
        body = image[at : at + self.size]
        if self.checksum == "vhd":
            struct.pack_into(">I", image, at + self.checksum_at, _vhd_checksum(body, self.checksum_at))
        elif self.checksum == "crc32c":
            body[self.checksum_at : self.checksum_at + 4] = bytes(4)
            struct.pack_into("<I", image, at + self.checksum_at, _crc32c(body))


@dataclass(frozen=True)
class Field:
    structure: Structure
    name: str
    offset: int  # within the structure
    size: int


def _fields(structure: Structure, layout: list[tuple[str, int, int]]) -> list[Field]:
    return [Field(structure, name, offset, size) for name, offset, size in layout]


VHD_FOOTER_LAYOUT = [
    ("cookie", 0, 8),
    ("features", 8, 4),
    ("file_format_version", 12, 4),
    ("data_offset", 16, 8),
    ("time_stamp", 24, 4),
    ("creator_application", 28, 4),
    ("creator_version", 32, 4),
    ("creator_host_os", 36, 4),
    ("original_size", 40, 8),
    ("current_size", 48, 8),
    ("disk_geometry", 56, 4),
    ("disk_type", 60, 4),
    ("checksum", 64, 4),
    ("unique_id", 68, 16),
    ("saved_state", 84, 1),
    ("reserved", 85, 427),
]
VHD_HEADER_LAYOUT = [
    ("cookie", 0, 8),
    ("data_offset", 8, 8),
    ("table_offset", 16, 8),
    ("header_version", 24, 4),
    ("max_table_entries", 28, 4),
    ("block_size", 32, 4),
    ("checksum", 36, 4),
    ("parent_unique_id", 40, 16),
    ("parent_time_stamp", 56, 4),
    ("reserved1", 60, 4),
    ("parent_unicode_name", 64, 512),
    ("reserved2", 768, 256),
]
for _i in range(8):
    VHD_HEADER_LAYOUT += [
        (f"locator{_i}.platform_code", 576 + 24 * _i, 4),
        (f"locator{_i}.platform_data_space", 580 + 24 * _i, 4),
        (f"locator{_i}.platform_data_length", 584 + 24 * _i, 4),
        (f"locator{_i}.reserved", 588 + 24 * _i, 4),
        (f"locator{_i}.platform_data_offset", 592 + 24 * _i, 8),
    ]
VHDX_HEADER_LAYOUT = [
    ("Signature", 0, 4),
    ("Checksum", 4, 4),
    ("SequenceNumber", 8, 8),
    ("FileWriteGuid", 16, 16),
    ("DataWriteGuid", 32, 16),
    ("LogGuid", 48, 16),
    ("LogVersion", 64, 2),
    ("Version", 66, 2),
    ("LogLength", 68, 4),
    ("LogOffset", 72, 8),
    ("Reserved", 80, 4016),
]
VHDX_REGION_LAYOUT = [("Signature", 0, 4), ("Checksum", 4, 4), ("EntryCount", 8, 4), ("Reserved", 12, 4)]
for _i in range(3):
    VHDX_REGION_LAYOUT += [
        (f"entry{_i}.Guid", 16 + 32 * _i, 16),
        (f"entry{_i}.FileOffset", 32 + 32 * _i, 8),
        (f"entry{_i}.Length", 40 + 32 * _i, 4),
        (f"entry{_i}.Required", 44 + 32 * _i, 4),
    ]
VHDX_METADATA_LAYOUT = [("Signature", 0, 8), ("Reserved", 8, 2), ("EntryCount", 10, 2), ("Reserved2", 12, 20)]
for _i in range(7):
    VHDX_METADATA_LAYOUT += [
        (f"entry{_i}.ItemId", 32 + 32 * _i, 16),
        (f"entry{_i}.Offset", 48 + 32 * _i, 4),
        (f"entry{_i}.Length", 52 + 32 * _i, 4),
        (f"entry{_i}.Flags", 56 + 32 * _i, 4),
        (f"entry{_i}.Reserved2", 60 + 32 * _i, 4),
    ]


# ---- the valid images and their structures ---------------------------------------


@dataclass
class Sample:
    """A valid image, the files it needs beside it, and its corruptible fields."""

    kind: str
    name: str  # file name (the suffix picks the format)
    data: bytes = dataclasses.field(repr=False)
    fields: list[Field] = dataclasses.field(repr=False)
    structures: list[Structure] = dataclasses.field(repr=False)
    disk_types: frozenset[int | None] = dataclasses.field(repr=False)
    siblings: dict[str, bytes] = dataclasses.field(repr=False)  # parents, by file name


def _vhd_fields(data: bytes) -> tuple[list[Field], list[Structure]]:
    size = len(data)
    footer = Structure("footer", (size - 512,), 512, "vhd", 64, big_endian=True)
    fields = _fields(footer, VHD_FOOTER_LAYOUT)
    structures = [footer]
    if struct.unpack_from(">I", data, size - 512 + 60)[0] != 2:
        header_at = struct.unpack_from(">Q", data, size - 512 + 16)[0]
        header = Structure("dynamic header", (header_at,), 1024, "vhd", 36, big_endian=True)
        table_at = struct.unpack_from(">Q", data, header_at + 16)[0]
        entries = struct.unpack_from(">I", data, header_at + 28)[0]
        bat = Structure("BAT", (table_at,), 4 * entries, big_endian=True)
        fields += _fields(header, VHD_HEADER_LAYOUT)
        fields += _fields(bat, [(f"entry{i}", 4 * i, 4) for i in range(min(entries, 8))])
        structures += [header, bat]
        for i in range(8):
            locator = header_at + 576 + 24 * i
            length = struct.unpack_from(">I", data, locator + 8)[0]
            if length:
                where = struct.unpack_from(">Q", data, locator + 16)[0]
                text = Structure(f"parent locator {i} data", (where,), length)
                fields += _fields(text, [("text", 0, length)])
                structures.append(text)
    return fields, structures


def _vhdx_regions(data: bytes) -> dict[str, tuple[int, int]]:
    count = struct.unpack_from("<I", data, 192 * 1024 + 8)[0]
    names = {
        "2dc27766-f623-4200-9d64-115e9bfd4a08": "BAT",
        "8b7ca206-4790-4b9a-b8fe-575f050f886e": "metadata",
    }
    found = {}
    for i in range(count):
        at = 192 * 1024 + 16 + 32 * i
        guid = str(uuid.UUID(bytes_le=bytes(data[at : at + 16])))
        found[names.get(guid, guid)] = struct.unpack_from("<QI", data, at + 16)
    return found


def _vhdx_fields(data: bytes) -> tuple[list[Field], list[Structure]]:
    headers = Structure("headers", (64 * 1024, 128 * 1024), 4096, "crc32c", 4)
    regions = Structure("region tables", (192 * 1024, 256 * 1024), 64 * 1024, "crc32c", 4)
    file_id = Structure("file identifier", (0,), 8)
    fields = _fields(headers, VHDX_HEADER_LAYOUT) + _fields(regions, VHDX_REGION_LAYOUT)
    fields += _fields(file_id, [("Signature", 0, 8)])
    located = _vhdx_regions(data)
    metadata_at, _ = located["metadata"]
    bat_at, _ = located["BAT"]
    table = Structure("metadata table", (metadata_at,), 64 * 1024)
    fields += _fields(table, VHDX_METADATA_LAYOUT)
    structures = [file_id, headers, regions, table]
    for i in range(struct.unpack_from("<H", data, metadata_at + 10)[0]):
        entry = metadata_at + 32 + 32 * i
        item_id = str(uuid.UUID(bytes_le=data[entry : entry + 16]))
        offset, length = struct.unpack_from("<II", data, entry + 16)
        item = Structure(f"metadata item {item_id}", (metadata_at + offset,), length)
        layout = [("value", 0, min(length, 8))] + [(f"byte{j}", j, 1) for j in range(0, min(length, 64), 7)]
        fields += _fields(item, layout)
        structures.append(item)
    bat = Structure("BAT", (bat_at,), 8 * 2049)
    fields += _fields(bat, [(f"entry{i}", 8 * i, 8) for i in (0, 1, 2, 3, 2047, 2048)])
    structures.append(bat)
    return fields, structures


def _iso_fields(data: bytes) -> tuple[list[Field], list[Structure]]:
    fields: list[Field] = []
    structures = []
    for n in range(4):
        descriptor = Structure(f"volume descriptor {n}", (32 * 1024 + 2048 * n,), 2048)
        fields += _fields(
            descriptor, [("type", 0, 1), ("identifier", 1, 5), ("version", 6, 1), ("body", 7, 32)]
        )
        structures.append(descriptor)
    return fields, structures


def _add_vhd_block(data: bytes, sectors: tuple[int, ...] = (0, 2, 3)) -> bytes:
    """A dynamic/differencing VHD with block 0 allocated and some sectors marked present."""
    image = bytearray(data)
    footer = image[-512:]
    header_at = struct.unpack_from(">Q", footer, 16)[0]
    table_at = struct.unpack_from(">Q", image, header_at + 16)[0]
    block_size = struct.unpack_from(">I", image, header_at + 32)[0]
    bitmap_size = -(-block_size // 512 // 8 // 512) * 512
    at = len(image) - 512
    bitmap = bytearray(bitmap_size)
    block = bytearray(block_size)
    for sector in sectors:
        bitmap[sector // 8] |= 0x80 >> (sector % 8)
        block[512 * sector : 512 * sector + 512] = bytes([0xA0 + sector]) * 512
    image[at:] = bitmap + block + footer
    struct.pack_into(">I", image, table_at, at // 512)
    return bytes(image)


FILE_PARAMETERS = "caa16737-fa36-4d43-b3b6-33f0aa44e76b"


def _add_vhdx_block(data: bytes, partial: bool) -> bytes:
    """A VHDX with payload block 0 present (partially, through a sector bitmap, for a child)."""
    image = bytearray(data)
    located = _vhdx_regions(image)
    bat_at, _ = located["BAT"]
    metadata_at, _ = located["metadata"]
    params = None
    for i in range(struct.unpack_from("<H", image, metadata_at + 10)[0]):
        entry = metadata_at + 32 + 32 * i
        if (
            str(uuid.UUID(bytes_le=bytes(image[entry : entry + 16])))
            == "caa16737-fa36-4d43-b3b6-33f0aa44e76b"
        ):
            params = metadata_at + struct.unpack_from("<I", image, entry + 16)[0]
    assert params is not None
    block_size = struct.unpack_from("<I", image, params)[0]
    end = -(-len(image) // MiB) * MiB
    image.extend(bytes(end - len(image)))
    block = bytearray(block_size)
    block[:512] = b"\xb0" * 512
    if partial:
        chunk_ratio = (1 << 23) * 512 // block_size
        bitmap = bytearray(MiB)
        bitmap[0] = 0b101
        image += bitmap
        struct.pack_into("<Q", image, bat_at + 8 * chunk_ratio, end | 6)
        end += MiB
    image += block
    struct.pack_into("<Q", image, bat_at, end | (7 if partial else 6))
    return bytes(image)


def _sample(kind: str, name: str, data: bytes, disk_types, siblings=None) -> Sample:
    parse = {"vhd": _vhd_fields, "vhdx": _vhdx_fields, "iso": _iso_fields}[kind]
    fields, structures = parse(data)
    return Sample(kind, name, data, fields, structures, frozenset(disk_types), siblings or {})


class Samples:
    """The valid images by kind; a short repr keeps hypothesis' reports readable."""

    def __init__(self, samples: dict[str, Sample]) -> None:
        self._samples = samples

    def __getitem__(self, kind: str) -> Sample:
        return self._samples[kind]

    def __repr__(self) -> str:
        return f"Samples({', '.join(self._samples)})"


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Samples:
    folder = tmp_path_factory.mktemp("valid")

    def made(name: str, *args, **kwargs) -> bytes:
        virtdisk.create(folder / name, *args, **kwargs).close()
        return (folder / name).read_bytes()

    fixed_vhd = made("fixed.vhd", 4 * MiB, fixed=True)
    dynamic_vhd = _add_vhd_block(made("dynamic.vhd", 6 * MiB))
    parent_vhd = made("parent.vhd", 4 * MiB)
    diff_vhd = _add_vhd_block(made("child.vhd", parent=folder / "parent.vhd"))
    fixed_vhdx = made("fixed.vhdx", 4 * MiB, fixed=True, block_size=MiB)
    dynamic_vhdx = _add_vhdx_block(made("dynamic.vhdx", 6 * MiB, block_size=MiB), partial=False)
    parent_vhdx = made("parent.vhdx", 4 * MiB, block_size=MiB)
    diff_vhdx = _add_vhdx_block(made("child.vhdx", parent=folder / "parent.vhdx"), partial=True)

    genisoimage = require_tool("genisoimage")
    tree = folder / "tree"
    tree.mkdir()
    (tree / "file.txt").write_text("contents\n")
    subprocess.run(
        [genisoimage, "-quiet", "-R", "-o", str(folder / "disc.iso"), str(tree)],
        check=True,
        capture_output=True,
    )
    iso = (folder / "disc.iso").read_bytes()
    return Samples(
        {
            "fixed-vhd": _sample("vhd", "fixed.vhd", fixed_vhd, {2}),
            "dynamic-vhd": _sample("vhd", "dynamic.vhd", dynamic_vhd, {3}),
            "differencing-vhd": _sample("vhd", "child.vhd", diff_vhd, {4}, {"parent.vhd": parent_vhd}),
            "fixed-vhdx": _sample("vhdx", "fixed.vhdx", fixed_vhdx, {2}),
            "dynamic-vhdx": _sample("vhdx", "dynamic.vhdx", dynamic_vhdx, {3}),
            "differencing-vhdx": _sample("vhdx", "child.vhdx", diff_vhdx, {4}, {"parent.vhdx": parent_vhdx}),
            "iso": _sample("iso", "disc.iso", iso, {None}),
        }
    )


# ---- opening in a helper process ---------------------------------------------------

_WORKER = r"""
import json, sys, virtdisk
for line in sys.stdin:
    path = line.rstrip("\n")
    try:
        with virtdisk.open(path, read_only=True) as disk:
            info = disk.info
        answer = {"ok": True, "virtual_size": info.virtual_size, "block_size": info.block_size,
                  "sector": info.logical_sector_size,
                  "disk_type": None if info.disk_type is None else int(info.disk_type),
                  "parent_resolved": info.parent_resolved}
    except virtdisk.VirtualDiskError as error:
        answer = {"ok": False, "class": type(error).__name__,
                  "invalid": isinstance(error, virtdisk.InvalidImageError),
                  "winerror": error.winerror, "name": error.name, "detail": error.detail}
    print(json.dumps(answer), flush=True)
"""


class Opener:
    """A helper process that opens images read-only and answers in JSON, one per line."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        return self.process

    def open(self, path: Path) -> dict:
        process = self._start()
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(f"{path}\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], OPEN_TIMEOUT)
        if not ready:
            self.close()
            pytest.fail(f"opening {path} did not finish in {OPEN_TIMEOUT} s (hang)")
        line = process.stdout.readline()
        if not line:
            code = process.wait()
            self.process = None
            pytest.fail(f"opening {path} killed the process (exit status {code}): a crash")
        return json.loads(line)

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture(scope="module")
def opener() -> Iterator[Opener]:
    helper = Opener()
    yield helper
    helper.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Iterator[Path]:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = shm / f"virtdisk-corruption-{os.getpid()}"
        folder.mkdir(exist_ok=True)
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("corrupt")


# ---- what an answer must look like ----------------------------------------------

# Codes about the chain rather than a structure of this file: the detail names
# the parent (its path or the identifiers) instead of an offset.
PARENT_CODES = {
    WinError.ERROR_VHD_PARENT_VHD_NOT_FOUND,
    WinError.ERROR_VHD_CHILD_PARENT_ID_MISMATCH,
    WinError.ERROR_VHD_CHILD_PARENT_SIZE_MISMATCH,
    WinError.ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED,
    WinError.ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT,
}
# Codes the facade raises as NotSupportedError that a damaged file can earn:
# nothing recognises it any more, or a child's parent is of another format.
NOT_SUPPORTED_CODES = {WinError.ERROR_VIRTDISK_PROVIDER_NOT_FOUND, WinError.ERROR_VHD_INVALID_TYPE}
STRUCTURE_WORDS = re.compile(
    r"footer|header|BAT|locator|region|metadata|log|descriptor|identifier|File Parameters|"
    r"Virtual Disk Size|Sector Size|Page 83|sectors",
)
OFFSET = re.compile(r"offsets? \d+|at \d+")
# A file too short or of a size no image can have: the detail gives the size.
FILE_SIZE_CODES = {WinError.ERROR_VHD_INVALID_FILE_SIZE, WinError.ERROR_FILE_CORRUPT}
FILE_SIZE = re.compile(r"\d+ bytes")


def check_answer(sample: Sample, answer: dict, what: str) -> None:
    if answer["ok"]:
        assert 0 < answer["virtual_size"] <= 64 << 40, what
        assert answer["sector"] in (512, 4096, 2048), what
        assert answer["disk_type"] in {2, 3, 4, None}, what
        if answer["disk_type"] in (3, 4):
            assert answer["block_size"] >= 512, what
        return
    code = answer["winerror"]
    assert answer["invalid"] or code in NOT_SUPPORTED_CODES, f"{what}: {answer}"
    detail = answer["detail"]
    if code in PARENT_CODES:
        assert "parent" in detail, f"{what}: {answer}"
    elif code in FILE_SIZE_CODES and FILE_SIZE.search(detail):
        pass
    elif code != WinError.ERROR_VIRTDISK_PROVIDER_NOT_FOUND:
        assert STRUCTURE_WORDS.search(detail), f"{what}: the detail names no structure: {answer}"
        assert OFFSET.search(detail), f"{what}: the detail names no offset: {answer}"


def _write(workdir: Path, sample: Sample, image: bytes | bytearray) -> Path:
    for name, data in sample.siblings.items():
        sibling = workdir / name
        if not sibling.exists() or sibling.stat().st_size != len(data):
            sibling.write_bytes(data)
    path = workdir / sample.name
    path.write_bytes(image)
    return path


# ---- strategies -------------------------------------------------------------------


@dataclass(frozen=True)
class Damaged:
    """A damaged image; its repr (in hypothesis' reports) is the description only."""

    what: str
    image: bytes = dataclasses.field(repr=False)


def _value(draw: Callable, field: Field, original: bytes, file_size: int) -> bytes:
    if field.size not in (1, 2, 4, 8) or draw(st.booleans()):
        return draw(st.binary(min_size=field.size, max_size=field.size))
    bits = 8 * field.size
    fmt = (">" if field.structure.big_endian else "<") + {1: "B", 2: "H", 4: "I", 8: "Q"}[field.size]
    current = struct.unpack(fmt, original)[0]
    top = (1 << bits) - 1
    interesting = [0, 1, top, top - 1, top & ~511, 1 << (bits - 1), current + 1, current - 1, current * 2]
    interesting += [file_size, file_size - 512, file_size + 512, 512, 4096, MiB, 1 << 20 | 6, 7]
    value = draw(st.one_of(st.sampled_from(interesting), st.integers(0, top)))
    return struct.pack(fmt, value & top)


@st.composite
def field_damage(draw, sample: Sample):
    """One field changed, checksums resealed or not."""
    field = draw(st.sampled_from(sample.fields))
    image = bytearray(sample.data)
    copies = field.structure.copies
    # Both copies of a VHDX header or region table, or the reader just uses the other one.
    targets = copies if len(copies) == 1 or draw(st.booleans()) else (draw(st.sampled_from(copies)),)
    start = targets[0] + field.offset
    original = bytes(image[start : start + field.size])
    new = _value(draw, field, original, len(image))
    reseal = (field.structure.checksum is not None and draw(st.booleans())) or field.name == "checksum"
    for at in targets:
        image[at + field.offset : at + field.offset + field.size] = new
        if reseal and field.name.lower() != "checksum":
            field.structure.reseal(image, at)
    what = f"{sample.name}: {field.structure.name}.{field.name} = {new[:16].hex()} (resealed: {reseal})"
    return Damaged(what, bytes(image))


@st.composite
def random_damage(draw, sample: Sample):
    """Random bytes over part of a structure, resealed or not."""
    structure = draw(st.sampled_from(sample.structures))
    at = structure.copies[0]
    size = max(1, min(structure.size, len(sample.data) - at))
    start = draw(st.integers(0, size - 1))
    junk = draw(st.binary(min_size=1, max_size=min(64, size - start)))
    image = bytearray(sample.data)
    image[at + start : at + start + len(junk)] = junk
    reseal = structure.checksum is not None and draw(st.booleans())
    if reseal:
        structure.reseal(image, at)
    what = f"{sample.name}: {structure.name}+{start}: {len(junk)} random bytes (resealed: {reseal})"
    return Damaged(what, bytes(image))


@st.composite
def truncation(draw, sample: Sample):
    """The file cut short or extended."""
    size = len(sample.data)
    new_size = draw(
        st.one_of(
            st.integers(0, size + 4096),
            st.sampled_from([size - 1, size - 511, size - 512, size + 1, 511, 512, 34815, 34816]),
        )
    )
    new_size = max(0, new_size)
    image = sample.data[:new_size] + bytes(max(0, new_size - size))
    return Damaged(f"{sample.name}: {size} bytes cut or grown to {new_size}", image)


KINDS = [
    "fixed-vhd",
    "dynamic-vhd",
    "differencing-vhd",
    "fixed-vhdx",
    "dynamic-vhdx",
    "differencing-vhdx",
    "iso",
]


def test_every_sample_opens_undamaged(samples, opener, workdir) -> None:
    for kind in KINDS:
        sample = samples[kind]
        answer = opener.open(_write(workdir, sample, sample.data))
        assert answer["ok"], (kind, answer)
        assert answer["disk_type"] in sample.disk_types
        if answer["disk_type"] == 4:
            assert answer["parent_resolved"] is True


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_a_damaged_field_is_named_or_harmless(samples, opener, workdir, kind, data) -> None:
    sample = samples[kind]
    damaged = data.draw(field_damage(sample))
    check_answer(sample, opener.open(_write(workdir, sample, damaged.image)), damaged.what)


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_random_bytes_in_a_structure_are_named_or_harmless(samples, opener, workdir, kind, data) -> None:
    sample = samples[kind]
    damaged = data.draw(random_damage(sample))
    check_answer(sample, opener.open(_write(workdir, sample, damaged.image)), damaged.what)


@pytest.mark.parametrize("kind", KINDS)
@settings(SETTINGS, max_examples=max(10, SETTINGS.max_examples // 3))
@given(data=st.data())
def test_a_truncated_or_extended_file_is_named_or_harmless(samples, opener, workdir, kind, data) -> None:
    sample = samples[kind]
    damaged = data.draw(truncation(sample))
    check_answer(sample, opener.open(_write(workdir, sample, damaged.image)), damaged.what)


# ---- regressions: what the fuzz targets found (fuzz/regressions/) -------------------


def _resealed_vhd(data: bytes, change: Callable[[bytearray], None]) -> bytes:
    image = bytearray(data)
    footer = bytearray(image[-512:])
    change(footer)
    struct.pack_into(">I", footer, 64, _vhd_checksum(footer, 64))
    image[-512:] = footer
    return bytes(image)


@pytest.mark.parametrize("kind", ["fixed-vhd", "dynamic-vhd", "differencing-vhd"])
def test_a_vhd_size_near_2_to_the_64_is_refused_not_wrapped(samples, opener, workdir, kind) -> None:
    """Rounded up to whole blocks, such a size wrapped to 0 blocks and reads ran off the BAT."""
    sample = samples[kind]
    image = _resealed_vhd(sample.data, lambda footer: struct.pack_into(">Q", footer, 48, (1 << 64) - 512))
    answer = opener.open(_write(workdir, sample, image))
    assert answer["name"] == "ERROR_VHD_INVALID_SIZE", answer
    check_answer(sample, answer, "current size 2^64 - 512")


def test_crc32c_helper_matches_the_known_check_value() -> None:
    assert _crc32c(b"123456789") == 0xE3069283


def test_the_providers_crc32c_equals_the_definition(tmp_path: Path) -> None:
    """crc32c.c skips zero tails by arithmetic and joins lanes: the checks
    that guard every VHDX structure rest on it giving the defined value."""
    from .vhdxlog import build_tool

    tool = build_tool(tmp_path, "crccheck")
    result = subprocess.run([str(tool)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok ")
