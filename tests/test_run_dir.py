"""The provider's run directory (src/provider/rundir.h): created 0700 by root
when absent, refused unless a real root-owned 0700 directory when present, and
a clear error naming the path when it cannot be made."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import virtdisk

pytestmark = pytest.mark.loop

# A dynamic VHD needs the FUSE server, which needs the run directory for its
# mount and record; the child prints the record names it saw, or the error.
# Opening for writing needs it too (the sharing claims live there), so the
# image is made beforehand, with the default run directory.
CHILD = textwrap.dedent(
    """
    import os, sys, virtdisk
    image, run_dir = sys.argv[1], sys.argv[2]
    try:
        with virtdisk.open(image) as disk:
            disk.attach()
            print("records", sorted(n for n in os.listdir(run_dir) if n.endswith(".json")))
            disk.detach()
    except virtdisk.VirtualDiskError as error:
        print("error", error.winerror, error.detail)
    """
)


def run_with(run_dir: Path, tmp_path: Path) -> str:
    virtdisk.create(tmp_path / "disk.vhd", 8 << 20).close()
    env = {**os.environ, "VIRTDISK_RUN_DIR": str(run_dir)}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "disk.vhd"), str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_absent_run_dir_is_created_private(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = run_with(run_dir, tmp_path)
    assert out.startswith("records ['"), out
    st = run_dir.lstat()
    assert (st.st_mode & 0o7777, st.st_uid) == (0o700, 0)
    assert not [p for p in run_dir.iterdir() if p.suffix == ".json"]


@pytest.mark.parametrize(
    ("prepare", "complaint"),
    [
        (lambda p: p.mkdir(mode=0o755) or p.chmod(0o755), "has mode 0755, not 0700"),
        (lambda p: p.mkdir(mode=0o700) or os.chown(p, 1000, 1000), "is owned by uid 1000, not root"),
        (lambda p: p.write_bytes(b""), "a symbolic link or not a directory"),
    ],
    ids=["mode", "owner", "file"],
)
def test_untrusted_run_dir_is_refused(tmp_path: Path, prepare, complaint: str) -> None:
    run_dir = tmp_path / "run"
    prepare(run_dir)
    out = run_with(run_dir, tmp_path)
    assert out.startswith("error 5 "), out  # ERROR_ACCESS_DENIED
    assert str(run_dir) in out and complaint in out


def test_symlinked_run_dir_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(target)
    out = run_with(tmp_path / "run", tmp_path)
    assert out.startswith("error 5 ") and "symbolic link" in out, out
    assert list(target.iterdir()) == []


def test_run_dir_that_cannot_be_made_names_the_path(tmp_path: Path) -> None:
    readonly = tmp_path / "ro"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "virtdisk-test", str(readonly)], check=True)
    try:
        out = run_with(readonly / "virtdisk", tmp_path)
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
    assert out.startswith("error 5 ") and "Read-only file system" in out, out  # EROFS
    assert f"cannot create the run directory {readonly / 'virtdisk'}" in out and "VIRTDISK_RUN_DIR" in out


def test_relative_run_dir_is_refused(tmp_path: Path) -> None:
    out = run_with(Path("relative/run"), tmp_path)
    assert out.startswith("error 87 ") and "absolute path" in out, out
