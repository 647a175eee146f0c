"""virtdisk: attach, detach, create and inspect virtual disks (VHD, VHDX, ISO).

The Windows VirtDisk API from Python: on Windows the real VirtDisk.dll, on
Linux the project's own provider (image formats in C, attach through loop
devices).  The raw API is ``virtdisk._native.ffi`` / ``.lib``.
"""

from ._disk import (
    AttachedDisk,
    DiskInfo,
    VirtualDisk,
    attached_disks,
    compact,
    create,
    detach,
    merge,
    open,
)
from ._enums import Access, AttachFlag, CreateFlag, DiskType, OpenFlag, StorageType
from ._errors import (
    DiskInUseError,
    InvalidImageError,
    InvalidStateError,
    NotAttachedError,
    NotSupportedError,
    OperationCancelledError,
    ParentNotFoundError,
    VirtualDiskError,
    VirtualDiskExistsError,
    VirtualDiskNotFoundError,
    VirtualDiskPermissionError,
    WinError,
)
from ._operation import Operation

__version__ = "0.1.0"

__all__ = [
    "Access",
    "AttachFlag",
    "AttachedDisk",
    "CreateFlag",
    "DiskInUseError",
    "DiskInfo",
    "DiskType",
    "InvalidImageError",
    "InvalidStateError",
    "NotAttachedError",
    "NotSupportedError",
    "OpenFlag",
    "Operation",
    "OperationCancelledError",
    "ParentNotFoundError",
    "StorageType",
    "VirtualDisk",
    "VirtualDiskError",
    "VirtualDiskExistsError",
    "VirtualDiskNotFoundError",
    "VirtualDiskPermissionError",
    "WinError",
    "attached_disks",
    "compact",
    "create",
    "detach",
    "merge",
    "open",
]
