"""Win32 error codes as Python exceptions: the one table, and the exception classes.

Every failing VirtDisk call becomes a :class:`VirtualDiskError` (an ``OSError``)
carrying the Win32 code (``winerror``), a fitting ``errno``, the API function,
the path, and the system's message.  Where Python users expect a builtin
(``FileNotFoundError``, ``PermissionError``, ``FileExistsError``) the class
derives from it too, so ``except FileNotFoundError`` works.
"""

from __future__ import annotations

import builtins
import enum
import errno
from collections.abc import Mapping

from ._native import ffi, lib


class WinError(enum.IntEnum):
    """The Win32 and VirtDisk codes the facade maps (values from the SDK)."""

    ERROR_SUCCESS = 0
    ERROR_FILE_NOT_FOUND = 2
    ERROR_PATH_NOT_FOUND = 3
    ERROR_ACCESS_DENIED = 5
    ERROR_INVALID_HANDLE = 6
    ERROR_OUTOFMEMORY = 14
    ERROR_WRITE_PROTECT = 19
    ERROR_NOT_READY = 21
    ERROR_SHARING_VIOLATION = 32
    ERROR_NOT_SUPPORTED = 50
    ERROR_DEV_NOT_EXIST = 55
    ERROR_FILE_EXISTS = 80
    ERROR_INVALID_PARAMETER = 87
    ERROR_DISK_FULL = 112
    ERROR_CALL_NOT_IMPLEMENTED = 120
    ERROR_INSUFFICIENT_BUFFER = 122
    ERROR_INVALID_NAME = 123
    ERROR_BUSY = 170
    ERROR_ALREADY_EXISTS = 183
    ERROR_FILE_SYSTEM_LIMITATION = 665
    ERROR_ELEVATION_REQUIRED = 740
    ERROR_OPERATION_ABORTED = 995
    ERROR_IO_PENDING = 997
    ERROR_NOT_FOUND = 1168
    ERROR_PRIVILEGE_NOT_HELD = 1314
    ERROR_FILE_CORRUPT = 1392
    ERROR_DEVICE_IN_USE = 2404
    ERROR_VHD_DRIVE_FOOTER_MISSING = 0xC03A0001
    ERROR_VHD_DRIVE_FOOTER_CHECKSUM_MISMATCH = 0xC03A0002
    ERROR_VHD_DRIVE_FOOTER_CORRUPT = 0xC03A0003
    ERROR_VHD_FORMAT_UNKNOWN = 0xC03A0004
    ERROR_VHD_FORMAT_UNSUPPORTED_VERSION = 0xC03A0005
    ERROR_VHD_SPARSE_HEADER_CHECKSUM_MISMATCH = 0xC03A0006
    ERROR_VHD_SPARSE_HEADER_UNSUPPORTED_VERSION = 0xC03A0007
    ERROR_VHD_SPARSE_HEADER_CORRUPT = 0xC03A0008
    ERROR_VHD_BLOCK_ALLOCATION_FAILURE = 0xC03A0009
    ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT = 0xC03A000A
    ERROR_VHD_INVALID_BLOCK_SIZE = 0xC03A000B
    ERROR_VHD_BITMAP_MISMATCH = 0xC03A000C
    ERROR_VHD_PARENT_VHD_NOT_FOUND = 0xC03A000D
    ERROR_VHD_CHILD_PARENT_ID_MISMATCH = 0xC03A000E
    ERROR_VHD_CHILD_PARENT_TIMESTAMP_MISMATCH = 0xC03A000F
    ERROR_VHD_METADATA_READ_FAILURE = 0xC03A0010
    ERROR_VHD_METADATA_WRITE_FAILURE = 0xC03A0011
    ERROR_VHD_INVALID_SIZE = 0xC03A0012
    ERROR_VHD_INVALID_FILE_SIZE = 0xC03A0013
    ERROR_VIRTDISK_PROVIDER_NOT_FOUND = 0xC03A0014
    ERROR_VIRTDISK_NOT_VIRTUAL_DISK = 0xC03A0015
    ERROR_VHD_PARENT_VHD_ACCESS_DENIED = 0xC03A0016
    ERROR_VHD_CHILD_PARENT_SIZE_MISMATCH = 0xC03A0017
    ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED = 0xC03A0018
    ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT = 0xC03A0019
    ERROR_VHD_INVALID_TYPE = 0xC03A001B
    ERROR_VHD_INVALID_STATE = 0xC03A001C
    ERROR_VHD_RESIZE_WOULD_TRUNCATE_DATA = 0xC03A0025
    ERROR_VHD_COULD_NOT_COMPUTE_MINIMUM_VIRTUAL_SIZE = 0xC03A0026
    ERROR_VHD_ALREADY_AT_OR_BELOW_MINIMUM_VIRTUAL_SIZE = 0xC03A0027


class VirtualDiskError(OSError):
    """A VirtDisk call failed.

    Attributes: ``winerror`` (the Win32 code), ``errno``, ``function`` (the
    VirtDisk function), ``filename`` (the image path, when there is one),
    ``strerror`` (the system message) and ``detail`` (what the provider knew
    beyond the code: the structure and offset that is wrong, the device in use).
    """

    def __init__(
        self,
        winerror: int,
        function: str,
        filename: str | None = None,
        message: str | None = None,
        detail: str = "",
        hint: str = "",
    ) -> None:
        code = winerror & 0xFFFFFFFF
        _, mapped_errno = _TABLE.get(code, (VirtualDiskError, errno.EIO))
        text = message if message is not None else system_message(code)
        super().__init__(mapped_errno, text, filename)
        self.winerror = code
        self.function = function
        self.detail = detail
        # What the caller can do about it, in the caller's terms (a keyword
        # argument, a command-line option) rather than the API's constants.
        self.hint = hint

    @property
    def name(self) -> str:
        """The SDK name of the code, e.g. ``ERROR_NOT_READY``."""
        native = lib.vd_error_name(self.winerror)
        if native == ffi.NULL:
            return f"0x{self.winerror:08X}"
        return str(ffi.string(native).decode())

    def __str__(self) -> str:
        where = f" {self.filename}" if self.filename else ""
        detail = f" ({self.detail})" if self.detail else ""
        hint = f"; {self.hint}" if self.hint else ""
        return f"{self.function}{where}: {self.strerror}{detail} [{self.name}]{hint}"

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (
            type(self),
            (self.winerror, self.function, self.filename, self.strerror, self.detail, self.hint),
        )


class VirtualDiskNotFoundError(VirtualDiskError, builtins.FileNotFoundError):
    """The image (or a directory on its path) does not exist."""


class VirtualDiskPermissionError(VirtualDiskError, builtins.PermissionError):
    """Access denied: file permissions, handle access, or the privilege to attach."""


class VirtualDiskExistsError(VirtualDiskError, builtins.FileExistsError):
    """Creating an image over an existing file."""


class NotAttachedError(VirtualDiskError):
    """The operation needs an attached disk and this one is not attached."""


class DiskInUseError(VirtualDiskError):
    """Other handles, mounts or openers hold the disk: close or unmount them first."""


class InvalidImageError(VirtualDiskError):
    """The file is not a valid image of its format (corrupt, truncated, or foreign)."""


class ParentNotFoundError(InvalidImageError, builtins.FileNotFoundError):
    """A differencing disk's parent cannot be found."""


class InvalidStateError(VirtualDiskError):
    """Not possible in the disk's current state: attached (detach first), or a
    VHDX whose log must be replayed first."""


class OperationCancelledError(VirtualDiskError):
    """A long operation was cancelled (ERROR_OPERATION_ABORTED); its images are consistent."""


class NotSupportedError(VirtualDiskError):
    """The operation or option is not supported by this platform's provider."""


_E = WinError
# The one place where codes meet classes and errno values.
_TABLE: dict[int, tuple[type[VirtualDiskError], int]] = {
    _E.ERROR_FILE_NOT_FOUND: (VirtualDiskNotFoundError, errno.ENOENT),
    _E.ERROR_PATH_NOT_FOUND: (VirtualDiskNotFoundError, errno.ENOENT),
    _E.ERROR_ACCESS_DENIED: (VirtualDiskPermissionError, errno.EACCES),
    _E.ERROR_PRIVILEGE_NOT_HELD: (VirtualDiskPermissionError, errno.EPERM),
    _E.ERROR_ELEVATION_REQUIRED: (VirtualDiskPermissionError, errno.EPERM),
    _E.ERROR_WRITE_PROTECT: (VirtualDiskPermissionError, errno.EROFS),
    _E.ERROR_FILE_EXISTS: (VirtualDiskExistsError, errno.EEXIST),
    _E.ERROR_ALREADY_EXISTS: (VirtualDiskExistsError, errno.EEXIST),
    _E.ERROR_NOT_READY: (NotAttachedError, errno.ENXIO),
    _E.ERROR_DEV_NOT_EXIST: (NotAttachedError, errno.ENXIO),
    _E.ERROR_SHARING_VIOLATION: (DiskInUseError, errno.EBUSY),
    _E.ERROR_BUSY: (DiskInUseError, errno.EBUSY),
    _E.ERROR_DEVICE_IN_USE: (DiskInUseError, errno.EBUSY),
    _E.ERROR_NOT_SUPPORTED: (NotSupportedError, errno.EOPNOTSUPP),
    _E.ERROR_CALL_NOT_IMPLEMENTED: (NotSupportedError, errno.ENOSYS),
    _E.ERROR_VIRTDISK_PROVIDER_NOT_FOUND: (NotSupportedError, errno.EOPNOTSUPP),
    _E.ERROR_INVALID_PARAMETER: (VirtualDiskError, errno.EINVAL),
    _E.ERROR_OPERATION_ABORTED: (OperationCancelledError, errno.ECANCELED),
    _E.ERROR_INVALID_HANDLE: (VirtualDiskError, errno.EBADF),
    _E.ERROR_INVALID_NAME: (VirtualDiskError, errno.EINVAL),
    _E.ERROR_OUTOFMEMORY: (VirtualDiskError, errno.ENOMEM),
    _E.ERROR_DISK_FULL: (VirtualDiskError, errno.ENOSPC),
    _E.ERROR_FILE_SYSTEM_LIMITATION: (VirtualDiskError, errno.EFBIG),
    _E.ERROR_INSUFFICIENT_BUFFER: (VirtualDiskError, errno.ENOBUFS),
    _E.ERROR_FILE_CORRUPT: (InvalidImageError, errno.EINVAL),
    _E.ERROR_VHD_PARENT_VHD_NOT_FOUND: (ParentNotFoundError, errno.ENOENT),
    _E.ERROR_VHD_PARENT_VHD_ACCESS_DENIED: (VirtualDiskPermissionError, errno.EACCES),
    _E.ERROR_VHD_INVALID_TYPE: (NotSupportedError, errno.EOPNOTSUPP),
    _E.ERROR_VHD_INVALID_STATE: (InvalidStateError, errno.EBUSY),
    # Refusals to resize: the image is fine, the request is not.
    _E.ERROR_VHD_RESIZE_WOULD_TRUNCATE_DATA: (VirtualDiskError, errno.EINVAL),
    _E.ERROR_VHD_COULD_NOT_COMPUTE_MINIMUM_VIRTUAL_SIZE: (VirtualDiskError, errno.EINVAL),
    _E.ERROR_VHD_ALREADY_AT_OR_BELOW_MINIMUM_VIRTUAL_SIZE: (VirtualDiskError, errno.EINVAL),
}
# Every other code of facility 0x3A (the VHD codes) describes a bad image.
for _code in _E:
    if _code >> 16 == 0xC03A and _code not in _TABLE:
        _TABLE[_code] = (InvalidImageError, errno.EINVAL)


def system_message(code: int) -> str:
    """The system's (or, where it has none, the project's) text for a code."""
    size = lib.vd_error_message(code, ffi.NULL, 0)
    if size == 0:
        return f"Unknown error 0x{code & 0xFFFFFFFF:08X}"
    buffer = ffi.new("char[]", size + 1)
    lib.vd_error_message(code, buffer, size + 1)
    return str(ffi.string(buffer).decode("utf-8", "replace"))


def error_for(
    code: int, function: str, filename: str | None = None, hints: Mapping[int, str] | None = None
) -> VirtualDiskError:
    """The exception for a failed call, carrying the provider's detail and,
    from ``hints`` (code -> text), what the caller can do about it."""
    code &= 0xFFFFFFFF
    cls, _ = _TABLE.get(code, (VirtualDiskError, errno.EIO))
    detail = ffi.string(lib.vd_last_error_detail()).decode("utf-8", "replace")
    return cls(code, function, filename, detail=detail, hint=(hints or {}).get(code, ""))


def check(
    code: int, function: str, filename: str | None = None, hints: Mapping[int, str] | None = None
) -> None:
    """Raise the mapped exception unless ``code`` is ERROR_SUCCESS."""
    if code != WinError.ERROR_SUCCESS:
        raise error_for(code, function, filename, hints)
