"""Build ``virtdisk._native``: the VirtDisk API through cffi (out-of-line, API mode).

The declarations are one file for every platform (src/_cffi_src/virtdisk_api.h,
spelled like the SDK's virtdisk.h) plus the shim's prototypes (shim.h).  On
Windows they are compiled against the system <virtdisk.h> and VirtDisk.lib
(shim_windows.h says how), and cffi checks the declared constants against
them, and the layouts as far as it checks any (virtdisk_api.h says how far).
On Linux the project's own provider (src/provider/) implements the same
declarations.

VIRTDISK_TARGET=windows or linux picks the branch; by default the platform
running the build.  .ci/windows-wheel sets it to cross-compile the Windows
module on Linux through this very branch.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cffi import FFI

# setuptools wants source paths relative to the project root, where it runs us.
ROOT = Path(__file__).parent
CFFI_SRC = Path("src", "_cffi_src")
PROVIDER = Path("src", "provider")
TARGET = os.environ.get("VIRTDISK_TARGET") or ("windows" if sys.platform == "win32" else "linux")
if TARGET not in ("windows", "linux"):
    raise SystemExit(f"VIRTDISK_TARGET must be windows or linux, not {TARGET!r}")


def _cdef(name: str) -> str:
    text = (ROOT / CFFI_SRC / name).read_text(encoding="utf-8")
    # The C spells the SDK's flexible arrays [0] (virtdisk_api.h says why);
    # cffi gets them as flexible again.
    return re.sub(r"\[0\];", "[];", text)


def _pkg_config_cflags(package: str, apt_name: str) -> dict[str, list[str]]:
    """Compiler flags of a pkg-config package, or a build error that says what
    to install."""
    pkg_config = shutil.which("pkg-config")
    result = (
        subprocess.run([pkg_config, "--cflags", package], capture_output=True, text=True)
        if pkg_config
        else None
    )
    if result is None or result.returncode != 0:
        raise SystemExit(
            f"virtdisk needs {package} to build on Linux (the FUSE server that attaches dynamic and "
            f"differencing images): install pkg-config and {apt_name} (Debian/Ubuntu: "
            f"apt-get install pkg-config {apt_name} fuse3)"
        )
    flags: dict[str, list[str]] = {"include_dirs": [], "extra": []}
    for flag in result.stdout.split():
        if flag.startswith("-I"):
            flags["include_dirs"].append(flag[2:])
        else:
            flags["extra"].append(flag)
    return flags


ffi = FFI()
ffi.cdef(_cdef("virtdisk_api.h"))
ffi.cdef(_cdef("shim.h"))

if TARGET == "windows":
    ffi.set_source(
        "virtdisk._native",
        '#include "shim_windows.h"',
        sources=[str(CFFI_SRC / "shim_windows.c"), str(CFFI_SRC / "messages.c")],
        include_dirs=[str(CFFI_SRC)],
        libraries=["virtdisk", "advapi32", "kernel32"],
    )
else:
    # libfuse3's headers only: the provider loads the library at run time
    # (src/provider/fuse3dl.h says why), so the module links nothing but libc
    # and a manylinux wheel needs no copy of it.
    fuse3 = _pkg_config_cflags("fuse3", "libfuse3-dev")
    # The serving helper's entry points (python -I -m virtdisk._serve).
    ffi.cdef(_cdef("serve_linux.h"))
    # DiskInfo's questions in one call (info_linux.h).
    ffi.cdef(_cdef("info_linux.h"))
    ffi.set_source(
        "virtdisk._native",
        '#include "virtdisk.h"\n#include "serve_linux.h"\n#include "info_linux.h"',
        sources=[
            str(CFFI_SRC / "messages.c"),
            *sorted(str(path.relative_to(ROOT)) for path in (ROOT / PROVIDER).glob("*.c")),
        ],
        include_dirs=[str(PROVIDER), str(CFFI_SRC), *fuse3["include_dirs"]],
        extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", *fuse3["extra"]],
        # dl and pthread: part of libc from glibc 2.34, separate before it.
        libraries=["dl", "pthread"],
    )
