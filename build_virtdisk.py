"""Build ``virtdisk._native``: the VirtDisk API through cffi (out-of-line, API mode).

The declarations are one file for every platform (src/_cffi_src/virtdisk_api.h,
spelled like the SDK's virtdisk.h) plus the shim's prototypes (shim.h).  On
Windows they are compiled against the system <virtdisk.h> and VirtDisk.lib,
and cffi checks every declared layout and constant against the SDK.  On Linux
the project's own provider (src/provider/) implements the same declarations.
"""

import sys
from pathlib import Path

from cffi import FFI

# setuptools wants source paths relative to the project root, where it runs us.
ROOT = Path(__file__).parent
CFFI_SRC = Path("src", "_cffi_src")
PROVIDER = Path("src", "provider")


def _cdef(name: str) -> str:
    return (ROOT / CFFI_SRC / name).read_text(encoding="utf-8")


ffi = FFI()
ffi.cdef(_cdef("virtdisk_api.h"))
ffi.cdef(_cdef("shim.h"))

if sys.platform == "win32":
    ffi.set_source(
        "virtdisk._native",
        '#include "shim_windows.h"',
        sources=[str(CFFI_SRC / "shim_windows.c"), str(CFFI_SRC / "messages.c")],
        include_dirs=[str(CFFI_SRC)],
        libraries=["virtdisk", "advapi32", "kernel32"],
    )
else:
    ffi.set_source(
        "virtdisk._native",
        '#include "virtdisk.h"',
        sources=[str(CFFI_SRC / "messages.c")]
        + sorted(str(path.relative_to(ROOT)) for path in (ROOT / PROVIDER).glob("*.c")),
        include_dirs=[str(PROVIDER), str(CFFI_SRC)],
        extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        libraries=["pthread"],
    )
