"""The facade's handle lifetime (issue 11, case 8): a handle left to the
garbage collector is closed before the ResourceWarning (so -W error leaks
nothing), and close() returns only once calls in progress on other threads
have finished and the handle is closed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import virtdisk

pytestmark = pytest.mark.loop

MiB = 1 << 20


def test_a_collected_handle_is_closed_even_when_its_warning_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "disk.vhdx"
    virtdisk.create(path, 16 * MiB).close()
    code = textwrap.dedent(
        """
        import gc, os, sys, virtdisk
        disk = virtdisk.open(sys.argv[1])
        disk.attach()
        device = disk.physical_path
        del disk
        gc.collect()
        # Still running: the attachment must have ended with the handle.
        print(os.path.exists(f"/sys/block/{device[5:]}/loop"), flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "the handle leaked with its attachment"
    assert "ResourceWarning: unclosed virtual disk" in result.stderr  # still warned


def test_close_waits_for_a_call_in_progress_on_another_thread(tmp_path: Path) -> None:
    path = tmp_path / "disk.vhdx"
    virtdisk.create(path, 16 * MiB).close()
    for _ in range(5):
        disk = virtdisk.open(path)
        errors: list[BaseException] = []

        def attach(disk: virtdisk.VirtualDisk = disk, errors: list[BaseException] = errors) -> None:
            try:
                disk.attach()  # starts a serving helper: a call that takes a while
            except BaseException as error:
                errors.append(error)

        worker = threading.Thread(target=attach)
        worker.start()
        while disk._users == 0 and worker.is_alive():
            pass  # until the attach is inside the native call
        disk.close()
        assert not worker.is_alive(), "close() returned while a call was still in progress"
        worker.join()
        assert not errors
        with virtdisk.open(path, virtdisk.Access.GET_INFO) as other:
            assert not other.attached, "the handle must be closed (and its attachment ended) by then"
