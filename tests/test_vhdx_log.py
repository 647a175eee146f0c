"""VHDX log replay ([MS-VHDX] §2.3): dirty logs left by QEMU, and logs built by
the spec, read as QEMU reads them after its own replay - in memory for a
read-only open (without writing a byte), on disk for a writable one.  Corrupt
or hostile logs are refused, naming what is wrong, and change nothing.  Also:
regions and blocks that overlap are refused at open."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

import virtdisk
from tests.conftest import require_tool
from tests.vhdxlog import (
    KiB,
    MiB,
    Write,
    bat_offset,
    build_vdread,
    log_entry,
    log_guid,
    log_region,
    put_in_log,
    qemu_check,
    qemu_io,
    qemu_replayed_raw,
    set_log_guid,
    vdread,
)
from virtdisk import WinError

FULLY_PRESENT = 6


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vdread(tmp_path_factory.mktemp("vdread"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- dirty logs from QEMU -----------------------------------------------------------

# (qemu-img create options, size, clean writes before, the write whose BAT update
# QEMU leaves in its log).  The dirty write allocates block 0: the injected
# failure hits QEMU's in-place write of the first BAT sector, after its log
# entry is on disk.
QEMU_CASES = {
    "first-block": ("block_size=1M", "8M", [], "write -P 0xab 0 64k"),
    "after-clean-writes": ("block_size=1M", "16M", ["write -P 0x11 2M 3M", "write -P 0x22 9M 1M"],
                           "write -P 0x5c 512k 1M"),
    "two-blocks": ("block_size=2M", "64M", ["write -P 0x11 8M 1M"], "write -P 0x5c 0 3M"),
    "32M-blocks": ("block_size=32M", "256M", [], "write -P 0x99 16M 96k"),
    "no-zero-state-2M-log": ("block_size=1M,block_state_zero=off,log_size=2M", "8M", [],
                             "write -P 0x66 4k 4k"),
}  # fmt: skip


def _qemu_dirty(tmp_path: Path, case: str) -> Path:
    options, size, clean, dirty = QEMU_CASES[case]
    image = tmp_path / f"{case}.vhdx"
    qemu_img = require_tool("qemu-img")
    create = [qemu_img, "create", "-q", "-f", "vhdx", "-o", f"subformat=dynamic,{options}", str(image), size]
    subprocess.run(create, check=True)
    for command in clean:
        assert qemu_io(image, command).returncode == 0
    failed = qemu_io(image, dirty, fail_bat_write_at=bat_offset(image.read_bytes()))
    assert failed.returncode != 0, failed.stdout
    data = image.read_bytes()
    guid = log_guid(data)
    offset, length = log_region(data)
    entries = [at for at in range(offset, offset + length, 4 * KiB) if data[at : at + 4] == b"loge"]
    assert any(data[at + 32 : at + 48] == guid for at in entries), "QEMU left no dirty log"
    return image


@pytest.mark.parametrize("case", sorted(QEMU_CASES))
def test_a_qemu_dirty_log_reads_like_qemus_replay_without_writing(
    tmp_path: Path, reader: Path, case: str
) -> None:
    image = _qemu_dirty(tmp_path, case)
    before = _digest(image)
    expected = qemu_replayed_raw(image, tmp_path)
    ours = vdread(reader, image)
    assert ours.ok, ours.error
    assert ours.data == expected
    assert _digest(image) == before  # read-only: not a byte written
    clean = bytearray(image.read_bytes())
    set_log_guid(clean, bytes(16))
    (tmp_path / "ignored.vhdx").write_bytes(clean)
    assert vdread(reader, tmp_path / "ignored.vhdx").data != expected  # the log mattered
    # The same through the public API: opens, and still writes nothing.
    with virtdisk.open(image, read_only=True) as disk:
        assert disk.info.virtual_size == len(expected)
    assert _digest(image) == before


@pytest.mark.parametrize("case", sorted(QEMU_CASES))
def test_a_writable_open_replays_a_qemu_dirty_log_on_disk(tmp_path: Path, reader: Path, case: str) -> None:
    image = _qemu_dirty(tmp_path, case)
    expected = qemu_replayed_raw(image, tmp_path)
    ours = vdread(reader, image, writable=True)
    assert ours.ok, ours.error
    assert ours.data == expected
    assert log_guid(image.read_bytes()) == bytes(16)
    check = qemu_check(image)
    assert check.returncode == 0, check.stdout + check.stderr
    assert qemu_replayed_raw(image, tmp_path) == expected
    assert vdread(reader, image).data == expected


def test_a_dirty_image_attached_read_only_shows_the_replayed_disk(images: Path) -> None:
    """Served from the in-memory replay (a loop device on the file itself would
    show the unreplayed bytes), and the file stays as it was."""
    image = _qemu_dirty(images, "after-clean-writes")
    expected = qemu_replayed_raw(image, images)
    before = _digest(image)
    with virtdisk.open(image, read_only=True) as disk:
        disk.attach(read_only=True)
        with open(disk.physical_path, "rb") as device:
            assert device.read() == expected
        disk.detach()
    assert _digest(image) == before


def test_the_public_writable_open_replays_too(tmp_path: Path) -> None:
    image = _qemu_dirty(tmp_path, "first-block")
    expected = qemu_replayed_raw(image, tmp_path)
    with virtdisk.open(image):
        pass
    assert log_guid(image.read_bytes()) == bytes(16)
    assert qemu_replayed_raw(image, tmp_path) == expected


# ---- logs built by the spec, replayed by QEMU and by us -----------------------------


def _pattern(seed: int) -> bytes:
    return hashlib.sha256(bytes([seed])).digest() * (4 * KiB // 32)


def _base(tmp_path: Path, name: str = "base.vhdx") -> tuple[Path, bytearray]:
    image = tmp_path / name
    virtdisk.create(image, 8 * MiB, block_size=MiB).close()
    return image, bytearray(image.read_bytes())


def _allocating_log(data: bytearray, *, guid: bytes, first_position: int) -> list[bytearray]:
    """Two entries allocating block 2 at the end of the file: zero the block, point
    the BAT at it, write data; the second entry overwrites part of the first and
    zeroes a range the first had written.  first_position lets them wrap the log."""
    end = len(data)
    bat = bat_offset(data)
    bat_sector = bytearray(data[bat : bat + 4 * KiB])
    struct.pack_into("<Q", bat_sector, 2 * 8, end | FULLY_PRESENT)
    first = log_entry(7, first_position, guid, [
        Write(end, zero_length=MiB),
        Write(bat, bytes(bat_sector)),
        Write(end + 4 * KiB, _pattern(1)),
        Write(end + 8 * KiB, _pattern(2)),
        Write(end + 16 * KiB, _pattern(3)),
    ], flushed=end, last=end + MiB)  # fmt: skip
    second = log_entry(8, first_position, guid, [
        Write(end + 8 * KiB, _pattern(4)),
        Write(end + 12 * KiB, zero_length=8 * KiB),  # later, lower: still wins over the first entry
        Write(end + 12 * KiB, _pattern(5)),
    ], flushed=end, last=end + MiB)  # fmt: skip
    return [first, second]


def _spec_built(tmp_path: Path, name: str, first_position: int) -> Path:
    image, data = _base(tmp_path, name)
    guid = uuid.uuid4().bytes_le
    first, second = _allocating_log(data, guid=guid, first_position=first_position)
    put_in_log(data, first_position, first)
    put_in_log(data, first_position + len(first), second)
    # A stale entry of an older log (another GUID) must not be replayed.
    stale = log_entry(99, first_position + len(first) + len(second), uuid.uuid4().bytes_le,
                      [Write(bat_offset(data), bytes(4 * KiB))], flushed=0, last=0)  # fmt: skip
    put_in_log(data, first_position + len(first) + len(second), stale)
    set_log_guid(data, guid)
    image.write_bytes(data)
    return image


def test_spec_built_logs_replay_as_qemu_replays_them(tmp_path: Path, reader: Path) -> None:
    image = _spec_built(tmp_path, "in-order.vhdx", 0)
    expected = qemu_replayed_raw(image, tmp_path)
    block = expected[2 * MiB : 3 * MiB]
    assert block[4 * KiB : 8 * KiB] == _pattern(1)
    assert block[8 * KiB : 12 * KiB] == _pattern(4)  # the later entry wins
    assert block[12 * KiB : 16 * KiB] == _pattern(5)
    assert block[16 * KiB : 20 * KiB] == bytes(4 * KiB)  # zeroed by the later entry
    before = _digest(image)
    ours = vdread(reader, image)
    assert ours.ok, ours.error
    assert ours.data == expected
    assert _digest(image) == before
    ours = vdread(reader, image, writable=True)
    assert ours.ok, ours.error
    assert ours.data == expected
    assert qemu_check(image).returncode == 0
    assert qemu_replayed_raw(image, tmp_path) == expected


def test_a_sequence_that_wraps_the_log_replays_whole(tmp_path: Path, reader: Path) -> None:
    """The same two entries, the first starting 8 KiB before the end of the log.
    (QEMU 7.2 replays only the second entry here: it does not follow the head's
    Tail back to the first.  §2.3.3 replays from the Tail: both.)"""
    expected = qemu_replayed_raw(_spec_built(tmp_path, "in-order.vhdx", 0), tmp_path)
    image = _spec_built(tmp_path, "wrapping.vhdx", 1 * MiB - 8 * KiB)
    ours = vdread(reader, image)
    assert ours.ok, ours.error
    assert ours.data == expected
    ours = vdread(reader, image, writable=True)
    assert ours.ok, ours.error
    assert ours.data == expected
    assert qemu_check(image).returncode == 0
    assert qemu_replayed_raw(image, tmp_path) == expected


def test_a_torn_entry_is_no_entry_as_for_qemu(tmp_path: Path, reader: Path) -> None:
    image, data = _base(tmp_path)
    guid = uuid.uuid4().bytes_le
    first, _ = _allocating_log(data, guid=guid, first_position=0)
    first[-100] ^= 0xFF  # a data sector not fully written: the checksum fails
    put_in_log(data, 0, first)
    set_log_guid(data, guid)
    image.write_bytes(data)
    expected = qemu_replayed_raw(image, tmp_path)
    assert expected == bytes(8 * MiB)
    ours = vdread(reader, image)
    assert ours.ok, ours.error
    assert ours.data == expected


# ---- corrupt and hostile logs: refused, nothing written -----------------------------


def _one_entry(data: bytearray, writes: list[Write], **fields: int) -> bytearray:
    guid = uuid.uuid4().bytes_le
    end = len(data)
    entry = log_entry(3, 0, guid, writes, flushed=fields.get("flushed", end), last=fields.get("last", end))
    put_in_log(data, 0, entry)
    set_log_guid(data, guid)
    return entry


def _refused(tmp_path: Path, reader: Path, data: bytearray, code: int, *words: str) -> None:
    image = tmp_path / "bad.vhdx"
    image.write_bytes(data)
    before = _digest(image)
    for writable in (False, True):
        result = vdread(reader, image, writable=writable)
        assert not result.ok
        assert result.error.startswith(f"0x{code:08X}"), result.error
        for word in words:
            assert word in result.error, result.error
        assert _digest(image) == before  # never half-applied
    with pytest.raises(virtdisk.VirtualDiskError) as caught:
        virtdisk.open(image)
    assert caught.value.winerror == code
    assert _digest(image) == before


def test_a_checksummed_entry_with_a_broken_data_sector_is_refused(tmp_path: Path, reader: Path) -> None:
    _, data = _base(tmp_path)
    bat = bat_offset(data)
    entry = log_entry(3, 0, b"\x01" * 16, [Write(bat, bytes(data[bat : bat + 4 * KiB]))], flushed=0, last=0)
    entry[4 * KiB : 4 * KiB + 4] = b"DATA"
    entry[4:8] = bytes(4)
    from tests.vhdxlog import crc32c

    struct.pack_into("<I", entry, 4, crc32c(entry))
    put_in_log(data, 0, entry)
    set_log_guid(data, b"\x01" * 16)
    _refused(
        tmp_path, reader, data, WinError.ERROR_VHD_SPARSE_HEADER_CORRUPT, "descriptor 0", '"data" signature'
    )


@pytest.mark.parametrize(
    ("target", "words"),
    [
        (64 * KiB, ["header section"]),  # header 1
        (512 * KiB, ["belongs to no region"]),  # reserved space after the region tables
        (1 * MiB, ["the log"]),  # the log itself
        (7 * MiB, ["belongs to no region"]),  # past every block: unallocated space
    ],
    ids=["header", "reserved", "log", "unallocated"],
)
def test_a_log_cannot_write_outside_metadata_and_payload(tmp_path: Path, reader: Path, target, words) -> None:
    _, data = _base(tmp_path)
    data += bytes(8 * MiB - len(data))  # room for the unallocated target
    _one_entry(data, [Write(target, _pattern(9))])
    _refused(
        tmp_path, reader, data, WinError.ERROR_VHD_SPARSE_HEADER_CORRUPT, f"file offset {target}", *words
    )


def test_a_log_written_for_a_longer_file_is_refused(tmp_path: Path, reader: Path) -> None:
    _, data = _base(tmp_path)
    bat = bat_offset(data)
    _one_entry(data, [Write(bat, bytes(data[bat : bat + 4 * KiB]))], flushed=len(data) + MiB)
    _refused(tmp_path, reader, data, WinError.ERROR_VHD_INVALID_FILE_SIZE, "FlushedFileOffset", "truncated")


def test_a_log_may_not_write_past_its_last_file_offset(tmp_path: Path, reader: Path) -> None:
    _, data = _base(tmp_path)
    end = len(data)
    _one_entry(data, [Write(end + MiB, _pattern(3))], last=end)
    _refused(tmp_path, reader, data, WinError.ERROR_VHD_SPARSE_HEADER_CORRUPT, "LastFileOffset")


# ---- overlapping extents ------------------------------------------------------------


def _with_bat(data: bytearray, entries: dict[int, int]) -> bytearray:
    bat = bat_offset(data)
    for index, value in entries.items():
        struct.pack_into("<Q", data, bat + 8 * index, value)
    return data


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ({0: 2 * MiB | FULLY_PRESENT}, ["the metadata region", "payload block of BAT entry 0"]),
        ({1: 3 * MiB | FULLY_PRESENT}, ["the BAT", "payload block of BAT entry 1"]),
        ({0: 1 * MiB | FULLY_PRESENT}, ["the log", "payload block of BAT entry 0"]),
        ({2: 4 * MiB | FULLY_PRESENT, 5: 4 * MiB | FULLY_PRESENT}, ["BAT entry 2", "BAT entry 5"]),
    ],
    ids=["into-metadata", "into-bat", "into-log", "two-blocks"],
)
def test_overlapping_blocks_are_refused_naming_both(tmp_path: Path, entries: dict[int, int], words) -> None:
    image, data = _base(tmp_path)
    data += bytes(8 * MiB)
    image.write_bytes(_with_bat(data, entries))
    with pytest.raises(virtdisk.VirtualDiskError) as caught:
        virtdisk.open(image, read_only=True)
    assert caught.value.winerror == WinError.ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT
    for word in words:
        assert word in caught.value.detail, caught.value.detail


def test_disjoint_blocks_in_any_order_open(tmp_path: Path, reader: Path) -> None:
    image, data = _base(tmp_path)
    data += bytes(8 * MiB)
    end = len(data) - 8 * MiB
    # Allocated out of BAT order: the check sorts, it does not assume order.
    image.write_bytes(_with_bat(data, {0: (end + 3 * MiB) | FULLY_PRESENT, 3: end | FULLY_PRESENT,
                                        5: (end + MiB) | FULLY_PRESENT}))  # fmt: skip
    result = vdread(reader, image)
    assert result.ok, result.error
    assert result.data == qemu_replayed_raw(image, tmp_path)


# ---- our own metadata changes go through the log ------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.vhdxlog import build_tool

    return build_tool(tmp_path_factory.mktemp("vdwork"), "vdwork")


def _work(worker: Path, image: Path, *steps: str) -> list:
    from tests.crashsim import read_trace

    trace = image.with_suffix(".trace")
    run = subprocess.run(
        [str(worker), str(trace), str(image), *steps], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    return read_trace(trace)


def test_allocations_go_through_the_log_and_close_leaves_it_clear(
    tmp_path: Path, reader: Path, worker
) -> None:
    image, data = _base(tmp_path)
    log_offset, log_length = log_region(data)
    bat = bat_offset(data)
    ops = _work(worker, image, "w:0:4096:1", "w:3145728:65536:2", "f")
    writes = [op for op in ops if op.kind == "W"]
    entries = [op for op in writes if log_offset <= op.offset < log_offset + log_length]
    assert len(entries) == 2 and all(op.data[:4] == b"loge" for op in entries)
    # Each BAT change reaches the BAT only after its entry (and a flush) is on disk.
    for entry in entries:
        later = writes[writes.index(entry) + 1 :]
        assert any(op.offset // (4 * KiB) == bat // (4 * KiB) for op in later)
        assert ops[ops.index(entry) + 1].kind == "S"
    final = image.read_bytes()
    assert log_guid(final) == bytes(16)
    assert qemu_check(image).returncode == 0
    raw = qemu_replayed_raw(image, tmp_path)
    assert vdread(reader, image).data == raw
    assert raw[3 * MiB : 3 * MiB + 4] != bytes(4)


def test_a_partially_present_block_becomes_fully_present_when_completely_written(
    tmp_path: Path, reader: Path, worker
) -> None:
    parent = tmp_path / "parent.vhdx"
    virtdisk.create(parent, 8 * MiB, block_size=MiB).close()
    _work(worker, parent, f"w:0:{8 * MiB}:7")
    child = tmp_path / "child.vhdx"
    virtdisk.create(child, parent=parent, block_size=MiB).close()
    pieces = [f"w:{2 * MiB + i * 128 * KiB}:{128 * KiB}:{20 + i}" for i in range(8)]
    _work(worker, child, *pieces[:7], "f")
    bat = bat_offset(child.read_bytes())
    assert struct.unpack_from("<Q", child.read_bytes(), bat + 2 * 8)[0] & 7 == 7  # PARTIALLY_PRESENT
    _work(worker, child, pieces[7], "f")
    assert struct.unpack_from("<Q", child.read_bytes(), bat + 2 * 8)[0] & 7 == FULLY_PRESENT
    disk = vdread(reader, child)
    assert disk.ok, disk.error
    from tests.crashsim import sector_pattern

    for i in range(8):
        at = 2 * MiB + i * 128 * KiB
        assert disk.data[at : at + 512] == sector_pattern(at // 512, 20 + i)
    assert disk.data[MiB : MiB + 512] == sector_pattern(MiB // 512, 7)  # still the parent's
