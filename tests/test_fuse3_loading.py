"""libfuse3 is loaded when a disk is first served, not linked: without it
everything but serving works, and serving says what to install."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import virtdisk

from .conftest import loops_backed_under, require_tool

MiB = 1 << 20


def _libfuse3() -> Path:
    """The file the dynamic loader would load for libfuse3.so.3."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        if line.strip().startswith("libfuse3.so.3 "):
            return Path(line.rsplit("=>", 1)[1].strip()).resolve()
    pytest.fail("libfuse3.so.3 is not installed (fuse3: see .ci/apt-packages)")


def test_importing_the_module_loads_no_libfuse3() -> None:
    maps = subprocess.run(
        [sys.executable, "-c", "import virtdisk._native; print(open('/proc/self/maps').read())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "_native" in maps
    assert "libfuse3" not in maps


@pytest.mark.loop
def test_serving_without_libfuse3_says_what_to_install(images: Path) -> None:
    """The library made unloadable in a private mount namespace (a bind mount
    of an empty file over it): a dynamic disk's attach fails with a message
    naming the package, attaches nothing; a fixed one still attaches."""
    unshare = require_tool("unshare")
    library = _libfuse3()
    dynamic, fixed = images / "dynamic.vhdx", images / "fixed.vhdx"
    virtdisk.create(dynamic, 16 * MiB).close()
    virtdisk.create(fixed, 16 * MiB, fixed=True).close()
    script = (
        "import sys, virtdisk\n"
        "with virtdisk.open(sys.argv[2]) as disk:\n"
        "    disk.attach()\n"
        "    print('fixed attached', disk.physical_path)\n"
        "try:\n"
        "    with virtdisk.open(sys.argv[1]) as disk:\n"
        "        disk.attach()\n"
        "except virtdisk.NotSupportedError as error:\n"
        "    print('refused:', error)\n"
    )
    empty = images / "empty"
    empty.write_bytes(b"")
    result = subprocess.run(
        [
            unshare,
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount --bind "$1" "$2" && exec "$3" -c "$4" "$5" "$6"',
            "sh",
            str(empty),
            str(library),
            sys.executable,
            script,
            str(dynamic),
            str(fixed),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "fixed attached /dev/loop" in result.stdout
    refusal = next(line for line in result.stdout.splitlines() if line.startswith("refused:"))
    assert "libfuse3" in refusal and "apt-get install fuse3" in refusal, refusal
    assert "ERROR_NOT_SUPPORTED" in refusal
    assert loops_backed_under(images) == []
