# The cffi extension built by build_virtdisk.py: the declarations in
# src/_cffi_src/virtdisk_api.h and shim.h, as cffi objects.
from typing import Any

ffi: Any
lib: Any
