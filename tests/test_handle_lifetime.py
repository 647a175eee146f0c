"""VirtualDisk handles behave like io objects: close, with, leaks, threads."""

from __future__ import annotations

import gc
import threading
import warnings
from pathlib import Path

import pytest

import virtdisk
from virtdisk._native import lib

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.vhd"
    virtdisk.create(path, 4 * MiB).close()
    return path


def test_close_is_idempotent(image: Path) -> None:
    disk = virtdisk.open(image)
    assert not disk.closed
    disk.close()
    disk.close()
    assert disk.closed


def test_use_after_close_raises_value_error(image: Path) -> None:
    disk = virtdisk.open(image)
    disk.close()
    with pytest.raises(ValueError, match="closed"):
        disk.info  # noqa: B018
    with pytest.raises(ValueError, match="closed"):
        disk.attach()
    with pytest.raises(ValueError, match="closed"), disk:
        pass


def test_with_closes_and_the_native_handle_is_gone(image: Path) -> None:
    with virtdisk.open(image) as disk:
        handle = disk._handle
        assert disk.info.virtual_size == 4 * MiB
    assert disk.closed
    assert lib.CloseHandle(handle) == 0, "the native handle must already be closed"


def test_a_leaked_handle_is_closed_with_a_resource_warning(image: Path) -> None:
    disk = virtdisk.open(image)
    handle = disk._handle
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del disk
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) and "disk.vhd" in str(w.message) for w in caught)
    assert lib.CloseHandle(handle) == 0


def test_paths_may_be_str_or_pathlike(image: Path) -> None:
    with virtdisk.open(str(image)) as by_str, virtdisk.open(image, read_only=True) as by_path:
        assert by_str.path == by_path.path == image
        assert by_str.info.identifier == by_path.info.identifier


def test_close_racing_calls_in_other_threads_never_crashes(image: Path) -> None:
    """Many threads query while one closes: each call either completes or
    raises ValueError; the native handle is closed exactly once, at the end."""
    for _ in range(20):
        disk = virtdisk.open(image)
        outcomes: list[str] = []
        start = threading.Barrier(5)
        threads = [threading.Thread(target=_query, args=(disk, start, outcomes)) for _ in range(4)]
        for thread in threads:
            thread.start()
        start.wait()
        disk.close()
        for thread in threads:
            thread.join()
        assert disk.closed and disk._handle is None
        assert set(outcomes) <= {"ok", "closed"}


def _query(disk: virtdisk.VirtualDisk, start: threading.Barrier, outcomes: list[str]) -> None:
    start.wait()
    for _ in range(50):
        try:
            assert disk.info.virtual_size == 4 * MiB
            outcomes.append("ok")
        except ValueError:
            outcomes.append("closed")
