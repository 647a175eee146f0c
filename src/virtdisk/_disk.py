"""The virtual disk handle object and the module-level conveniences."""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import re
import stat
import struct
import sys
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, Union

from ._enums import Access, AttachFlag, CreateFlag, DiskType, OpenFlag, StorageType
from ._errors import _TABLE as _ERROR_TABLE
from ._errors import (
    NotAttachedError,
    NotSupportedError,
    VirtualDiskError,
    VirtualDiskNotFoundError,
    VirtualDiskPermissionError,
    WinError,
    check,
    error_for,
)
from ._native import ffi, lib
from ._operation import Operation, ProgressCallback

if sys.platform.startswith("linux") and sys.executable:
    # FUSE-served attachments are served by `python -I -m virtdisk._serve`
    # (src/provider/helper.h), run by this interpreter so that it finds this
    # installation of the package.
    lib.vd_serve_set_program(os.fsencode(sys.executable))

_T = TypeVar("_T")

StrPath = Union[str, "os.PathLike[str]"]

# Answers of an information version that does not apply to the image: not
# supported for it (NotSupportedError's codes), or asked of an image that
# cannot answer it (the minimum size of a differencing disk opened without
# its parent, or a version the running Windows predates).
_NOT_APPLICABLE = frozenset(
    {code for code, (cls, _) in _ERROR_TABLE.items() if issubclass(cls, NotSupportedError)}
    | {WinError.ERROR_VHD_COULD_NOT_COMPUTE_MINIMUM_VIRTUAL_SIZE, WinError.ERROR_INVALID_PARAMETER}
)

# What open() asks for when the caller does not say: everything a disk can
# be used for except creation.  ISO images cannot be opened for writing.
_DEFAULT_ACCESS = Access.ATTACH_RO | Access.ATTACH_RW | Access.DETACH | Access.GET_INFO
_READ_ONLY_ACCESS = Access.ATTACH_RO | Access.DETACH | Access.GET_INFO


# Version 1 attach parameters carry nothing but the version; VirtDisk only
# reads them, so one instance serves every call.
_ATTACH_PARAMETERS = ffi.new(
    "ATTACH_VIRTUAL_DISK_PARAMETERS *", {"Version": lib.ATTACH_VIRTUAL_DISK_VERSION_1}
)


def _guid_to_uuid(guid: Any) -> uuid.UUID:
    # Data1-3 are the UUID's first three fields, Data4 its last eight bytes
    # (the layout uuid calls bytes_le); built as an int, a third cheaper.
    data4 = _from_bytes(ffi.buffer(guid.Data4), "big")
    return uuid.UUID(int=guid.Data1 << 96 | guid.Data2 << 80 | guid.Data3 << 64 | data4)


_from_bytes = int.from_bytes


def _uuid_to_guid(value: uuid.UUID, guid: Any) -> None:
    guid.Data1, guid.Data2, guid.Data3 = value.fields[0], value.fields[1], value.fields[2]
    guid.Data4 = list(value.bytes[8:])


def _storage_type(kind: StorageType) -> Any:
    storage = ffi.new("VIRTUAL_STORAGE_TYPE *")
    storage.DeviceId = kind
    if kind != StorageType.UNKNOWN:
        storage.VendorId = lib.VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT
    return storage


# OpenVirtualDisk only reads its storage type and version 1 parameters, so
# one instance of each serves every call (an inventory opens many images).
_STORAGE_TYPES = {kind: _storage_type(kind) for kind in StorageType}
_OPEN_PARAMETERS = ffi.new(
    "OPEN_VIRTUAL_DISK_PARAMETERS *",
    {
        "Version": lib.OPEN_VIRTUAL_DISK_VERSION_1,
        "Version1": {"RWDepth": lib.OPEN_VIRTUAL_DISK_RW_DEPTH_DEFAULT},
    },
)


def _storage_type_for(path: Path, storage_type: StorageType | None) -> StorageType:
    if storage_type is None:
        return StorageType.UNKNOWN
    try:
        return StorageType(storage_type)
    except ValueError:
        raise ValueError(
            f"storage_type must be a virtdisk.StorageType or None, not {storage_type!r}"
        ) from None


_ULONG_MAX = (1 << 32) - 1
_PATH_TYPE = type(Path())
_ULONGLONG_MAX = (1 << 64) - 1


def _int_argument(name: str, value: object, maximum: int, minimum: int = 0) -> int:
    """``value`` as an int in [minimum, maximum], else TypeError/ValueError
    naming the parameter (cffi's own errors name neither it nor the range)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if not minimum <= number <= maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}, not {number}")
    return number


def _path_argument(name: str, value: object) -> Path:
    """A str, bytes or os.PathLike path as a Path, else TypeError/ValueError naming the parameter."""
    if type(value) is _PATH_TYPE:
        # Already one (an inventory's paths from glob or iterdir): Paths are
        # immutable, and making another costs more than the rest of open().
        text = str(value)
        if text and "\0" not in text:
            return value
    try:
        text = os.fsdecode(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a str or os.PathLike path, not {type(value).__name__}") from None
    if not text or "\0" in text:
        raise ValueError(f"{name} must be a non-empty path without NUL characters, not {text!r}")
    return Path(text)


def _access_argument(access: object) -> Access:
    if isinstance(access, bool) or not isinstance(access, int):
        raise TypeError(f"access must be a virtdisk.Access, not {type(access).__name__}")
    if int(access) & ~int(Access.ALL):
        raise ValueError(f"access has bits no virtdisk.Access names: 0x{access:08x}")
    return Access(access)


# The provider names the API's fields; a refused argument is named as the
# facade's parameter in the hint (the command line names its option).
_PARAMETERS_IN_DETAIL = (
    ("MaximumSize", "size"),
    ("NewSize", "size"),
    ("physical sector size", "physical_sector_size"),
    ("sector size", "sector_size"),
    ("block size", "block_size"),
    ("ParentPath", "parent"),
    ("SourcePath", "source"),
    ("differencing disk takes its size", "size"),
)


def refused_parameter(error: VirtualDiskError) -> str | None:
    """The create/resize/expand parameter an ERROR_INVALID_PARAMETER refused."""
    if error.winerror != WinError.ERROR_INVALID_PARAMETER:
        return None
    return next((name for phrase, name in _PARAMETERS_IN_DETAIL if phrase in error.detail), None)


def _with_parameter_hint(error: VirtualDiskError) -> VirtualDiskError:
    parameter = refused_parameter(error)
    if parameter is not None and not error.hint:
        error.hint = f"see the {parameter} argument"
    return error


# What a user can do about a refused attach or detach, in the facade's terms.
_PRIVILEGE_HINT = "attaching and detaching need root (Linux) or an elevated process (Windows)"


@dataclasses.dataclass(frozen=True)
class DiskInfo:
    """What GetVirtualDiskInformation says about an image."""

    path: Path
    storage_type: StorageType
    disk_type: DiskType | None  # None for ISO, which has no container
    virtual_size: int
    physical_size: int
    block_size: int
    logical_sector_size: int
    physical_sector_size: int
    identifier: uuid.UUID | None  # None for ISO, which has none
    virtual_disk_id: uuid.UUID | None  # VHDX only
    parent_paths: tuple[str, ...]  # differencing: the resolved parent, else the candidates
    parent_resolved: bool | None
    parent_identifier: uuid.UUID | None
    attached: bool
    # VHD differencing: the parent's modification time the child recorded,
    # seconds since 2000-01-01 UTC (GET_VIRTUAL_DISK_INFO_PARENT_TIMESTAMP).
    parent_timestamp: int | None = None
    # The smallest size ResizeVirtualDisk can shrink to without cutting a
    # partition; None for ISO or when the disk cannot be read.
    smallest_safe_size: int | None = None
    # How scattered the image file is on the host (0-100); None where the
    # host file system cannot tell.
    fragmentation: int | None = None
    is_4k_aligned: bool | None = None
    # The host disk holding the image (GET_VIRTUAL_DISK_INFO_PHYSICAL_DISK).
    host_logical_sector_size: int | None = None
    host_physical_sector_size: int | None = None
    host_is_remote: bool | None = None
    # Resilient change tracking (VHDX only): enabled, and the newest change id.
    change_tracking_enabled: bool | None = None
    change_tracking_id: str | None = None

    @property
    def parent_path(self) -> str | None:
        """The parent's path when it was found (differencing disks only)."""
        return self.parent_paths[0] if self.parent_resolved and self.parent_paths else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (UUIDs and paths as strings, enums by name)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, (uuid.UUID, Path)):
                value = str(value)
            elif isinstance(value, (StorageType, DiskType)):
                value = value.name.lower()
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        out["parent_path"] = self.parent_path
        return out


_DISK_INFO_DEFAULTS = {
    field.name: field.default
    for field in dataclasses.fields(DiskInfo)
    if field.default is not dataclasses.MISSING
}


def _new_disk_info(values: dict[str, Any]) -> DiskInfo:
    """``DiskInfo(**values)``, made as its generated ``__init__`` would make
    it (the same ``__dict__``; it has no ``__post_init__``) in a tenth of the
    time: a frozen dataclass's ``__init__`` sets each of its 21 fields
    through ``object.__setattr__``, a cost an inventory pays per image.
    ``values`` must name every field without a default."""
    info = object.__new__(DiskInfo)
    info.__dict__.update(_DISK_INFO_DEFAULTS, **values)
    return info


@dataclasses.dataclass(frozen=True)
class AttachedDisk:
    """A virtual disk the system has attached."""

    physical_path: str  # \\.\PhysicalDriveN (\\.\CdRomN) on Windows, /dev/loopN on Linux
    # The backing image where the platform tells: on Linux always, on Windows
    # where GetAllAttachedVirtualDiskPhysicalPaths answers with image paths.
    image_path: Path | None
    # Where the platform tells (None where it does not): attached read-only;
    # attached until an explicit detach (ATTACH_VIRTUAL_DISK_FLAG_PERMANENT_LIFETIME);
    # served through the Linux provider's FUSE server (dynamic, differencing).
    read_only: bool | None = None
    permanent: bool | None = None
    served: bool | None = None


class VirtualDisk:
    """An open virtual disk handle (from :func:`open` or :func:`create`).

    Closing follows :mod:`io`: :meth:`close` is idempotent, any other use after
    it raises ``ValueError``, ``with`` closes, and a handle left for the garbage
    collector is closed with a ``ResourceWarning``.  A disk attached without
    ``permanent=True`` is detached when its last handle closes.
    """

    def __init__(self, handle: Any, path: Path, access: Access) -> None:
        self._handle = handle
        self._path = path
        self._access = access
        self._lock = threading.Lock()
        # _users reached 0, or the handle closed: made (under _lock) by the
        # first thread that has to wait, as most handles never need one.
        self._changed: threading.Condition | None = None
        self._users = 0  # calls in progress: close waits for them to finish
        self._closing = False  # no new call may start
        self._closed = False  # CloseHandle has returned

    @property
    def path(self) -> Path:
        return self._path

    @property
    def access(self) -> Access:
        return self._access

    @property
    def closed(self) -> bool:
        return self._closing

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<virtdisk.VirtualDisk {str(self._path)!r} {state}>"

    def __enter__(self) -> VirtualDisk:
        with self._lock:
            if self._closing:
                raise ValueError("I/O operation on closed virtual disk")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is None or getattr(self, "_closing", True):
            return
        # Close first: with ResourceWarning turned into an error (-W error),
        # warning first would leak the handle, and its attachment, until exit.
        self.close()
        warnings.warn(
            f"unclosed virtual disk {str(self._path)!r}", ResourceWarning, stacklevel=2, source=self
        )

    def close(self) -> None:
        """Close the handle (idempotent).  Calls in progress on other threads finish first."""
        with self._lock:
            if self._closing:
                # Closed, or being closed by another thread: return when it is.
                if not self._closed:
                    self._condition().wait_for(lambda: self._closed)
                return
            self._closing = True
            if self._users:
                self._condition().wait_for(lambda: self._users == 0)
            handle, self._handle = self._handle, None
        try:
            if handle is not None:
                lib.CloseHandle(handle)
        finally:
            with self._lock:
                self._closed = True
                if self._changed is not None:
                    self._changed.notify_all()

    def _condition(self) -> threading.Condition:
        """The condition to wait on; called with _lock held."""
        if self._changed is None:
            self._changed = threading.Condition(self._lock)
        return self._changed

    def _acquire(self) -> Any:
        """The handle, counted as in use until _release(); ValueError when closed."""
        with self._lock:
            if self._closing:
                raise ValueError("I/O operation on closed virtual disk")
            self._users += 1
            return self._handle

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._changed is not None:
                self._changed.notify_all()

    @contextmanager
    def _using(self) -> Iterator[Any]:
        handle = self._acquire()
        try:
            yield handle
        finally:
            self._release()

    # ---- attach and detach ----------------------------------------------

    def attach(
        self, *, read_only: bool | None = None, permanent: bool = False, no_drive_letter: bool = False
    ) -> None:
        """Attach the disk (AttachVirtualDisk).

        ``read_only`` None attaches read-write when the handle allows it and
        read-only when it was opened read-only (``open(..., read_only=True)``,
        and every ISO image, which is read-only by nature).  Without
        ``permanent`` the disk stays attached while a handle to it is open and
        detaches when the last one closes (on Linux also when the process
        dies).  With it, the disk stays attached until :meth:`detach` or
        :func:`detach`, even after this process exits.
        """
        if read_only is None:
            read_only = not self._access & Access.ATTACH_RW
        flags = AttachFlag.NONE
        if read_only:
            flags |= AttachFlag.READ_ONLY
        if permanent:
            flags |= AttachFlag.PERMANENT_LIFETIME
        if no_drive_letter:
            flags |= AttachFlag.NO_DRIVE_LETTER
        _ensure_volume_privilege("AttachVirtualDisk", str(self._path))
        handle = self._acquire()
        try:
            code = lib.AttachVirtualDisk(handle, ffi.NULL, flags, 0, _ATTACH_PARAMETERS, ffi.NULL)
        finally:
            self._release()
        check(
            code,
            "AttachVirtualDisk",
            str(self._path),
            {
                WinError.ERROR_ACCESS_DENIED: "the handle was opened read-only: attach(read_only=True), "
                "or open the disk without read_only=True",
                WinError.ERROR_PRIVILEGE_NOT_HELD: _PRIVILEGE_HINT,
            },
        )

    def detach(self) -> None:
        """Detach the disk (DetachVirtualDisk).

        Needs a handle opened with DETACH access and no other handle open on
        the disk; refuses (:class:`DiskInUseError`) while the disk is mounted
        or in use, and raises :class:`NotAttachedError` when it is not attached.
        """
        with self._using() as handle:
            code = lib.DetachVirtualDisk(handle, lib.DETACH_VIRTUAL_DISK_FLAG_NONE, 0)
            # Detaching needs the volume-management privilege only "on a
            # Windows Server operating system" (Microsoft Learn,
            # DetachVirtualDisk, Remarks): asked for where refused for want of it.
            if code == WinError.ERROR_PRIVILEGE_NOT_HELD:
                _ensure_volume_privilege("DetachVirtualDisk", str(self._path))
                code = lib.DetachVirtualDisk(handle, lib.DETACH_VIRTUAL_DISK_FLAG_NONE, 0)
        check(
            code,
            "DetachVirtualDisk",
            str(self._path),
            {
                WinError.ERROR_PRIVILEGE_NOT_HELD: _PRIVILEGE_HINT,
                WinError.ERROR_ACCESS_DENIED: "open the disk with Access.DETACH (as open() does "
                "by default), or use virtdisk.detach(path)",
                WinError.ERROR_SHARING_VIOLATION: "close the disk's other handles first",
                WinError.ERROR_DEVICE_IN_USE: "unmount it and close what has it open first",
            },
        )

    @property
    def physical_path(self) -> str:
        """The attached disk's device path (``\\\\.\\PhysicalDriveN``, ``/dev/loopN``)."""
        with self._using() as handle:
            code, path = _physical_path(handle)
        check(code, "GetVirtualDiskPhysicalPath", str(self._path))
        return path

    @property
    def disk_number(self) -> int:
        """N of ``\\\\.\\PhysicalDriveN`` (Windows) or of ``/dev/loopN`` (Linux)."""
        match = re.search(r"(?:PhysicalDrive|/dev/loop)(\d+)$", self.physical_path)
        if match is None:  # a CD-ROM device on Windows: \\.\CdRomN has its own numbering
            raise NotSupportedError(WinError.ERROR_NOT_SUPPORTED, "disk_number", str(self._path))
        return int(match.group(1))

    @property
    def attached(self) -> bool:
        """Whether the disk is attached: whether it has a physical path."""
        with self._using() as handle:
            return _is_attached(handle, self._path)

    # ---- size ------------------------------------------------------------

    def _check_metaops(self, function: str) -> None:
        """Resizing and expanding need METAOPS access, which open() leaves out
        by default: say how to get it rather than a bare "access denied"."""
        if not self._access & Access.METAOPS:
            raise VirtualDiskPermissionError(
                WinError.ERROR_ACCESS_DENIED,
                function,
                str(self._path),
                detail="the handle was opened without METAOPS access",
                hint="open the disk with virtdisk.open(path, access=virtdisk.Access.METAOPS)",
            )

    def begin_resize(self, size: int, *, allow_unsafe: bool = False) -> Operation:
        """Start changing the virtual size (ResizeVirtualDisk, asynchronous); the disk must be detached.

        Needs a handle opened with METAOPS access, which :func:`open` leaves
        out unless asked: ``virtdisk.open(path, access=virtdisk.Access.METAOPS)``.
        Both formats grow; VHDX also shrinks, but not below the end of its last
        partition (:attr:`DiskInfo.smallest_safe_size`) unless ``allow_unsafe``,
        which may cut off data.  ``size`` 0 shrinks to the smallest safe size.
        Returns the running :class:`Operation`; its progress counts the bytes
        a fixed disk reserves for its new size (1 of 1 when there are none).
        A cancelled resize leaves the old size.
        """
        size = _int_argument("size", size, _ULONGLONG_MAX)
        self._check_metaops("ResizeVirtualDisk")
        flags = lib.RESIZE_VIRTUAL_DISK_FLAG_NONE
        if allow_unsafe:
            flags |= lib.RESIZE_VIRTUAL_DISK_FLAG_ALLOW_UNSAFE_VIRTUAL_SIZE
        if size == 0:
            flags |= lib.RESIZE_VIRTUAL_DISK_FLAG_RESIZE_TO_SMALLEST_SAFE_VIRTUAL_SIZE
        parameters = ffi.new(
            "RESIZE_VIRTUAL_DISK_PARAMETERS *", {"Version": lib.RESIZE_VIRTUAL_DISK_VERSION_1}
        )
        parameters.Version1.NewSize = size
        return self._begin(
            "ResizeVirtualDisk",
            lambda handle, overlapped: lib.ResizeVirtualDisk(handle, flags, parameters, overlapped),
        )

    def resize(
        self, size: int, *, allow_unsafe: bool = False, progress: ProgressCallback | None = None
    ) -> None:
        """Resize and wait (:meth:`begin_resize`); ``progress(current, total)`` is
        called along the way.  An exception raised by ``progress`` (or Ctrl-C)
        cancels the resize and propagates; the disk keeps its old size."""
        self._wait(self.begin_resize(size, allow_unsafe=allow_unsafe), progress)

    def begin_expand(self, size: int) -> Operation:
        """Start growing a fixed or dynamic disk to ``size`` bytes (ExpandVirtualDisk,
        asynchronous); detached only, METAOPS access as :meth:`begin_resize`."""
        size = _int_argument("size", size, _ULONGLONG_MAX)
        self._check_metaops("ExpandVirtualDisk")
        parameters = ffi.new(
            "EXPAND_VIRTUAL_DISK_PARAMETERS *", {"Version": lib.EXPAND_VIRTUAL_DISK_VERSION_1}
        )
        parameters.Version1.NewSize = size
        flags = lib.EXPAND_VIRTUAL_DISK_FLAG_NONE
        return self._begin(
            "ExpandVirtualDisk",
            lambda handle, overlapped: lib.ExpandVirtualDisk(handle, flags, parameters, overlapped),
        )

    def expand(self, size: int, *, progress: ProgressCallback | None = None) -> None:
        """Expand and wait (:meth:`begin_expand`), as :meth:`resize` does."""
        self._wait(self.begin_expand(size), progress)

    # ---- offline changes: SetVirtualDiskInformation (Set-VHD) ----------

    def set_parent_path(self, parent: StrPath, *, depth: int = 1) -> None:
        """Point a differencing disk at its moved or renamed parent (Set-VHD -ParentPath).

        The parent must be the disk the child names (same identifier and
        size).  ``depth`` 2 re-points this disk's parent at its own parent,
        and so on (SET_VIRTUAL_DISK_INFO_PARENT_PATH_WITH_DEPTH).  Needs METAOPS
        access (see :meth:`begin_resize`); the disk must be detached.
        """
        path = _path_argument("parent", parent)
        depth = _int_argument("depth", depth, _ULONG_MAX, minimum=1)
        text = ffi.new("WCHAR[]", _absolute(path))
        info = ffi.new("SET_VIRTUAL_DISK_INFO *")
        if depth == 1:
            info.Version = lib.SET_VIRTUAL_DISK_INFO_PARENT_PATH
            info.ParentFilePath = text
        else:
            info.Version = lib.SET_VIRTUAL_DISK_INFO_PARENT_PATH_WITH_DEPTH
            info.ParentPathWithDepthInfo.ChildDepth = depth
            info.ParentPathWithDepthInfo.ParentFilePath = text
        self._set_information(info)

    def set_identifier(self, identifier: uuid.UUID) -> None:
        """Give the disk a new unique identifier (SET_VIRTUAL_DISK_INFO_IDENTIFIER).
        Its differencing children then no longer match it."""
        if not isinstance(identifier, uuid.UUID):
            raise TypeError(f"identifier must be a uuid.UUID, not {type(identifier).__name__}")
        info = ffi.new("SET_VIRTUAL_DISK_INFO *", {"Version": lib.SET_VIRTUAL_DISK_INFO_IDENTIFIER})
        _uuid_to_guid(identifier, info.UniqueIdentifier)
        self._set_information(info)

    def set_physical_sector_size(self, size: int) -> None:
        """Report 512 or 4096-byte physical sectors (Set-VHD -PhysicalSectorSizeBytes)."""
        size = _int_argument("size", size, _ULONG_MAX)
        info = ffi.new("SET_VIRTUAL_DISK_INFO *", {"Version": lib.SET_VIRTUAL_DISK_INFO_PHYSICAL_SECTOR_SIZE})
        info.VhdPhysicalSectorSize = size
        self._set_information(info)

    def _set_information(self, info: Any) -> None:
        self._check_metaops("SetVirtualDiskInformation")
        with self._using() as handle:
            code = lib.SetVirtualDiskInformation(handle, info)
        if code:
            raise error_for(code, "SetVirtualDiskInformation", str(self._path))

    def _begin(self, function: str, call: Callable[[Any, Any], int]) -> Operation:
        """An :class:`Operation` running ``call(handle, overlapped)`` on this handle,
        which stays in use (close waits) until it ends."""
        handle = self._acquire()
        try:
            return Operation(
                lambda: handle,
                lambda overlapped: int(call(handle, overlapped)),
                function,
                str(self._path),
                release=self._release,
            )
        except VirtualDiskError as error:
            _with_parameter_hint(error)
            raise

    @staticmethod
    def _wait(operation: Operation, progress: ProgressCallback | None) -> None:
        try:
            operation.wait(progress)
        except VirtualDiskError as error:
            _with_parameter_hint(error)
            raise

    # ---- long operations: merge (see _operation.py) ---------------------

    def begin_merge(self, depth: int = 1, *, source_depth: int | None = None) -> Operation:
        """Start merging this differencing disk into an ancestor (MergeVirtualDisk, asynchronous).

        ``depth`` counts the disks merged: 1 merges this disk into its parent,
        2 this disk and its parent into the grandparent.  ``source_depth``
        (version 2 parameters; the leaf is 1) merges the disks from that depth
        down instead, and re-points the disk above them at the target.  The
        handle needs METAOPS access and an ``rw_depth`` (see :func:`open`)
        reaching the target.  Returns the running :class:`Operation`.
        """
        parameters = ffi.new("MERGE_VIRTUAL_DISK_PARAMETERS *")
        if source_depth is None:
            parameters.Version = lib.MERGE_VIRTUAL_DISK_VERSION_1
            parameters.Version1.MergeDepth = depth
        else:
            parameters.Version = lib.MERGE_VIRTUAL_DISK_VERSION_2
            parameters.Version2.MergeSourceDepth = source_depth
            parameters.Version2.MergeTargetDepth = source_depth + depth
        handle = self._acquire()

        def start(overlapped: Any) -> int:
            return int(lib.MergeVirtualDisk(handle, lib.MERGE_VIRTUAL_DISK_FLAG_NONE, parameters, overlapped))

        return Operation(lambda: handle, start, "MergeVirtualDisk", str(self._path), release=self._release)

    def merge(
        self, depth: int = 1, *, source_depth: int | None = None, progress: ProgressCallback | None = None
    ) -> None:
        """Merge and wait (:meth:`begin_merge`); ``progress(current, total)`` is
        called along the way (bytes).  An exception raised by ``progress`` (or
        Ctrl-C) cancels the merge and propagates; the chain stays consistent."""
        self.begin_merge(depth, source_depth=source_depth).wait(progress)

    # ---- mirroring (see _operation.py) ----------------------------------

    def begin_mirror(self, target: StrPath, *, existing: bool = False) -> Operation:
        """Start mirroring the attached disk onto ``target`` (MirrorVirtualDisk, asynchronous).

        The disk stays in use: its contents are copied to ``target`` (a new
        image of the same format, type and size; with ``existing`` an existing
        image of the same size, which is overwritten) while its writes go to
        both.  The returned :class:`Operation` ends once the copy is done; the
        mirror then stays in sync until :meth:`break_mirror` switches the disk
        to ``target``.  Cancelling it, closing this handle or the process
        ending (as on Windows, where the mirror stays the handle's pending
        operation) leaves the source the disk and removes a target the
        mirror created: break the mirror first to keep the target.  On
        Linux the disk must be served (dynamic or differencing), attached by
        any process.  After the break the attachment is ``target``'s: it is
        found, listed and detached under that name, and the source is free
        once no handle holds it.
        """
        path = _absolute(_path_argument("target", target))
        parameters = ffi.new(
            "MIRROR_VIRTUAL_DISK_PARAMETERS *", {"Version": lib.MIRROR_VIRTUAL_DISK_VERSION_1}
        )
        target_text = ffi.new("WCHAR[]", path)
        parameters.Version1.MirrorVirtualDiskPath = target_text
        flags = lib.MIRROR_VIRTUAL_DISK_FLAG_EXISTING_FILE if existing else lib.MIRROR_VIRTUAL_DISK_FLAG_NONE
        handle = self._acquire()

        def start(overlapped: Any) -> int:
            # Called before begin_mirror returns, while target_text lives; the
            # provider copies the path.
            return int(lib.MirrorVirtualDisk(handle, flags, parameters, overlapped))

        return Operation(lambda: handle, start, "MirrorVirtualDisk", str(self._path), release=self._release)

    def mirror(
        self, target: StrPath, *, existing: bool = False, progress: ProgressCallback | None = None
    ) -> None:
        """Mirror and wait until the copy is in sync (:meth:`begin_mirror`);
        ``progress(current, total)`` is called along the way (bytes).  An
        exception raised by ``progress`` (or Ctrl-C) cancels the mirror."""
        self.begin_mirror(target, existing=existing).wait(progress)

    def break_mirror(self) -> None:
        """End a mirror in sync and make its target the disk (BreakMirrorVirtualDisk).

        From then on the attached disk reads and writes the target, and the
        attachment is the target's (found, listed and detached under its
        name); the source image no longer changes and is no longer attached.
        """
        with self._using() as handle:
            code = lib.BreakMirrorVirtualDisk(handle)
        check(code, "BreakMirrorVirtualDisk", str(self._path))

    # ---- long operations: compact ---------------------------------------

    def begin_compact(self, *, zero_scan: bool = True, block_moves: bool = True) -> Operation:
        """Start compacting this dynamic or differencing disk (CompactVirtualDisk,
        asynchronous; Optimize-VHD).

        Blocks that read as all zeros are dropped (not with ``zero_scan=False``:
        then only blocks already marked unmapped or zero), and the file shrinks
        as the last blocks move into the holes (not with ``block_moves=False``:
        then only free space at the end of the file is cut off).  In a
        differencing disk a zero block is dropped only where the parent's data
        stays hidden.  The handle needs METAOPS access; the disk must be
        detached, or attached read-only (the file-system-aware mode: it stays
        attached and readable while its file shrinks, and what the guest
        discarded before is returned too).  Returns the running
        :class:`Operation`.
        """
        flags = 0
        if not zero_scan:
            flags |= lib.COMPACT_VIRTUAL_DISK_FLAG_NO_ZERO_SCAN
        if not block_moves:
            flags |= lib.COMPACT_VIRTUAL_DISK_FLAG_NO_BLOCK_MOVES
        parameters = ffi.new("COMPACT_VIRTUAL_DISK_PARAMETERS *")
        parameters.Version = lib.COMPACT_VIRTUAL_DISK_VERSION_1
        handle = self._acquire()

        def start(overlapped: Any) -> int:
            return int(lib.CompactVirtualDisk(handle, flags, parameters, overlapped))

        return Operation(lambda: handle, start, "CompactVirtualDisk", str(self._path), release=self._release)

    def compact(
        self, *, zero_scan: bool = True, block_moves: bool = True, progress: ProgressCallback | None = None
    ) -> None:
        """Compact and wait (:meth:`begin_compact`); ``progress(current, total)``
        is called along the way.  An exception raised by ``progress`` (or
        Ctrl-C) cancels the compaction and propagates; the image stays
        consistent, with whatever space was already returned."""
        self.begin_compact(zero_scan=zero_scan, block_moves=block_moves).wait(progress)

    # ---- information ----------------------------------------------------

    def _query(self, version: int, read: Callable[[Any], _T], size: int = 0) -> _T:
        """GetVirtualDiskInformation for one version, and ``read`` applied to the
        answer while its buffer is alive (a view must never outlive it)."""
        handle = self._acquire()
        try:
            return _Query(handle, self._path)(version, read, size)
        finally:
            self._release()

    @property
    def info(self) -> DiskInfo:
        """Everything GetVirtualDiskInformation tells about the image."""
        handle = self._acquire()
        try:
            query = _new_query(handle, self._path)
            if query.__class__ is _BatchQuery:
                info = query.disk_info()
                if info is not None:
                    return info
            return self._info(query)
        finally:
            self._release()

    def _info(self, query: _Query) -> DiskInfo:
        virtual_size, physical_size, block_size, sector_size = query(
            lib.GET_VIRTUAL_DISK_INFO_SIZE,
            lambda i: (i.Size.VirtualSize, i.Size.PhysicalSize, i.Size.BlockSize, i.Size.SectorSize),
        )
        storage = _enum(
            StorageType,
            query(lib.GET_VIRTUAL_DISK_INFO_VIRTUAL_STORAGE_TYPE, lambda i: i.VirtualStorageType.DeviceId),
        )
        subtype = query.optional(lib.GET_VIRTUAL_DISK_INFO_PROVIDER_SUBTYPE, lambda i: i.ProviderSubtype)
        disk_type = _enum(DiskType, subtype) if subtype is not None else None
        identifier = query.optional(
            lib.GET_VIRTUAL_DISK_INFO_IDENTIFIER, lambda i: _guid_to_uuid(i.Identifier)
        )
        physical_sector = query.optional(
            lib.GET_VIRTUAL_DISK_INFO_VHD_PHYSICAL_SECTOR_SIZE, lambda i: i.VhdPhysicalSectorSize
        )
        disk_id = query.optional(
            lib.GET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID, lambda i: _guid_to_uuid(i.VirtualDiskId)
        )
        parent_paths: tuple[str, ...] = ()
        parent_resolved = parent_identifier = None
        parent_timestamp = None
        if disk_type == DiskType.DIFFERENCING:
            parent_timestamp = query.optional(
                lib.GET_VIRTUAL_DISK_INFO_PARENT_TIMESTAMP, lambda i: i.ParentTimestamp
            )
            parent_resolved, parent_paths = query(
                lib.GET_VIRTUAL_DISK_INFO_PARENT_LOCATION,
                lambda i: (
                    bool(i.ParentLocation.ParentResolved),
                    _multi_sz(ffi.cast("WCHAR *", i.ParentLocation.ParentLocationBuffer)),
                ),
                4096,
            )
            parent_identifier = query(
                lib.GET_VIRTUAL_DISK_INFO_PARENT_IDENTIFIER, lambda i: _guid_to_uuid(i.ParentIdentifier)
            )
        return _new_disk_info(
            dict(
                path=self._path,
                storage_type=storage,
                disk_type=disk_type,
                virtual_size=virtual_size,
                physical_size=physical_size,
                block_size=block_size,
                logical_sector_size=sector_size,
                physical_sector_size=physical_sector if physical_sector is not None else sector_size,
                identifier=identifier,
                virtual_disk_id=disk_id,
                parent_paths=parent_paths,
                parent_resolved=parent_resolved,
                parent_identifier=parent_identifier,
                attached=_is_attached(query.handle, self._path),
                parent_timestamp=parent_timestamp,
                **_extra_info(query),
            )
        )


def _extra_info(query: _Query) -> dict[str, Any]:
    """The information versions added after Windows 7, each None where it does not apply."""
    out: dict[str, Any] = {
        "smallest_safe_size": query.optional(
            lib.GET_VIRTUAL_DISK_INFO_SMALLEST_SAFE_VIRTUAL_SIZE, lambda i: i.SmallestSafeVirtualSize
        ),
        "fragmentation": query.optional(
            lib.GET_VIRTUAL_DISK_INFO_FRAGMENTATION, lambda i: i.FragmentationPercentage
        ),
        "is_4k_aligned": query.optional(
            lib.GET_VIRTUAL_DISK_INFO_IS_4K_ALIGNED, lambda i: bool(i.Is4kAligned)
        ),
    }
    host = query.optional(
        lib.GET_VIRTUAL_DISK_INFO_PHYSICAL_DISK,
        lambda i: (
            i.PhysicalDisk.LogicalSectorSize,
            i.PhysicalDisk.PhysicalSectorSize,
            bool(i.PhysicalDisk.IsRemote),
        ),
    )
    if host is not None:
        out["host_logical_sector_size"], out["host_physical_sector_size"], out["host_is_remote"] = host
    tracking = query.optional(
        lib.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE,
        lambda i: (
            bool(i.ChangeTrackingState.Enabled),
            str(ffi.string(ffi.cast("WCHAR *", i.ChangeTrackingState.MostRecentId))),
        ),
        1024,
    )
    if tracking is not None:
        out["change_tracking_enabled"], out["change_tracking_id"] = tracking
    return out


_INSUFFICIENT_BUFFER = int(WinError.ERROR_INSUFFICIENT_BUFFER)
_E = TypeVar("_E", StorageType, DiskType)
# Calling an enum class costs more than the rest of reading its value.
_MEMBERS: dict[type, dict[int, Any]] = {kind: {int(m): m for m in kind} for kind in (StorageType, DiskType)}


def _enum(kind: type[_E], value: int) -> _E:
    member = _MEMBERS[kind].get(value)
    return member if member is not None else kind(value)


class _Query:
    """GetVirtualDiskInformation on one handle, reusing one buffer: each call
    applies ``read`` to the answer while the buffer holds it (a view into the
    buffer must never outlive the call).

    An inventory asks a dozen of these per image, so the common path makes no
    cffi object and no exception: a version that does not apply to the image
    answers None from :meth:`optional` by its code alone."""

    _SIZE = 4096

    def __init__(self, handle: Any, path: Path) -> None:
        self.handle = handle
        self._path = path
        self._buffer = ffi.new("char[]", self._SIZE)
        self._info = ffi.cast("GET_VIRTUAL_DISK_INFO *", self._buffer)
        self._size = ffi.new("ULONG *")

    def _ask(self, version: int, size: int) -> tuple[int, Any, Any]:
        """(code, answer, the buffer holding it)."""
        if size <= self._SIZE:
            info, size_in_out = self._info, self._size
            info.Version = version
            size_in_out[0] = self._SIZE
            code = lib.GetVirtualDiskInformation(self.handle, size_in_out, info, ffi.NULL)
            if code != _INSUFFICIENT_BUFFER or size_in_out[0] <= self._SIZE:
                return code, info, self._buffer
            size = size_in_out[0]
        while True:
            buffer = ffi.new("char[]", size)
            info = ffi.cast("GET_VIRTUAL_DISK_INFO *", buffer)
            info.Version = version
            self._size[0] = size
            code = lib.GetVirtualDiskInformation(self.handle, self._size, info, ffi.NULL)
            # A size that does not grow would loop for ever: the error is raised.
            if code != WinError.ERROR_INSUFFICIENT_BUFFER or self._size[0] <= size:
                return code, info, buffer
            size = self._size[0]

    def __call__(self, version: int, read: Callable[[Any], _T], size: int = 0) -> _T:
        code, info, _buffer = self._ask(version, size)
        if code:
            raise error_for(code, "GetVirtualDiskInformation", str(self._path))
        return read(info)

    def optional(self, version: int, read: Callable[[Any], _T], size: int = 0) -> _T | None:
        """The information, or None where it does not apply to this image."""
        code, info, _buffer = self._ask(version, size)
        if not code:
            return read(info)
        if code & 0xFFFFFFFF in _NOT_APPLICABLE:
            return None
        raise error_for(code, "GetVirtualDiskInformation", str(self._path))


class _BatchQuery(_Query):
    """A _Query whose answers to DiskInfo's versions come from one native
    call (the Linux provider's vd_get_information_batch, info_linux.h).  An
    answer is used only when it succeeded or says "does not apply"; any
    other (a failure to report with its detail, a buffer too small, a
    version not in the batch) is asked again on its own."""

    def __init__(self, handle: Any, path: Path) -> None:
        self.handle = handle
        self._path = path
        self._answers = ffi.new("GET_VIRTUAL_DISK_INFO[]", _BATCH_COUNT)
        self._codes = ffi.new("DWORD[]", _BATCH_COUNT)
        lib.vd_get_information_batch(handle, _BATCH_COUNT, _BATCH_VERSIONS, self._answers, self._codes)
        self._single: _Query | None = None

    def _ask(self, version: int, size: int) -> tuple[int, Any, Any]:
        index = _BATCH_INDEX.get(version)
        if index is not None:
            code = self._codes[index]
            if not code or code in _NOT_APPLICABLE:
                return code, self._answers[index], self._answers
        if self._single is None:
            self._single = _Query(self.handle, self._path)
        return self._single._ask(version, size)

    # The common answers straight from the batch, without _ask's tuple: an
    # inventory asks a dozen per image.
    def __call__(self, version: int, read: Callable[[Any], _T], size: int = 0) -> _T:
        index = _BATCH_INDEX.get(version)
        if index is not None and not self._codes[index]:
            return read(self._answers[index])
        return super().__call__(version, read, size)

    def optional(self, version: int, read: Callable[[Any], _T], size: int = 0) -> _T | None:
        index = _BATCH_INDEX.get(version)
        if index is not None:
            code = self._codes[index]
            if not code:
                return read(self._answers[index])
            if code in _NOT_APPLICABLE:
                return None
        return super().optional(version, read, size)

    def disk_info(self) -> DiskInfo | None:
        """DiskInfo read from the batch in one ``struct.unpack_from`` of the
        answers (a cffi field access costs as much as reading ten fields
        this way), or None where :meth:`VirtualDisk._info` must read it
        version by version: a differencing disk (its parent location is
        asked on its own), or an answer that is neither success nor "does
        not apply" (a failure raised with its detail, a buffer too small)."""
        codes = ffi.unpack(self._codes, _BATCH_COUNT)
        # Any answer other than success or "does not apply" (a version read
        # only for a differencing disk included) is left to _info; so are the
        # two versions every image must answer, when they fail.
        for code in codes:
            if code and code not in _NOT_APPLICABLE:
                return None
        size_code, storage_code, subtype_code, id_code, sector_code, disk_id_code = codes[:6]
        safe_code, frag_code, aligned_code, host_code, tracking_code = codes[8:]
        if size_code or storage_code:
            return None
        (
            virtual_size,
            physical_size,
            block_size,
            sector_size,
            device_id,
            subtype,
            id1,
            id2,
            id3,
            id4,
            physical_sector,
            disk1,
            disk2,
            disk3,
            disk4,
            smallest_safe,
            fragmentation,
            aligned,
            host_logical,
            host_physical,
            host_remote,
            tracking,
        ) = _BATCH_LAYOUT.unpack_from(ffi.buffer(self._answers))
        disk_type = None
        if not subtype_code:
            disk_type = _enum(DiskType, subtype)
            if disk_type is DiskType.DIFFERENCING:
                return None
        info = object.__new__(DiskInfo)
        info.__dict__.update(
            path=self._path,
            storage_type=_enum(StorageType, device_id),
            disk_type=disk_type,
            virtual_size=virtual_size,
            physical_size=physical_size,
            block_size=block_size,
            logical_sector_size=sector_size,
            physical_sector_size=physical_sector if not sector_code else sector_size,
            identifier=uuid.UUID(int=id1 << 96 | id2 << 80 | id3 << 64 | _from_bytes(id4, "big"))
            if not id_code
            else None,
            virtual_disk_id=(
                uuid.UUID(int=disk1 << 96 | disk2 << 80 | disk3 << 64 | _from_bytes(disk4, "big"))
                if not disk_id_code
                else None
            ),
            parent_paths=(),
            parent_resolved=None,
            parent_identifier=None,
            attached=_is_attached(self.handle, self._path),
            parent_timestamp=None,
            smallest_safe_size=smallest_safe if not safe_code else None,
            fragmentation=fragmentation if not frag_code else None,
            is_4k_aligned=bool(aligned) if not aligned_code else None,
            host_logical_sector_size=host_logical if not host_code else None,
            host_physical_sector_size=host_physical if not host_code else None,
            host_is_remote=bool(host_remote) if not host_code else None,
            change_tracking_enabled=bool(tracking) if not tracking_code else None,
            change_tracking_id=self._change_tracking_id() if not tracking_code else None,
        )
        return info

    def _change_tracking_id(self) -> str:
        state = self._answers[
            _BATCH_INDEX[lib.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE]
        ].ChangeTrackingState
        return str(ffi.string(ffi.cast("WCHAR *", state.MostRecentId)))


# The versions DiskInfo reads on every image (PARENT_LOCATION, sized by its
# paths, is asked on its own), in the order _BatchQuery.disk_info unpacks
# their codes.
_BATCH_VERSIONS_LIST = [
    lib.GET_VIRTUAL_DISK_INFO_SIZE,
    lib.GET_VIRTUAL_DISK_INFO_VIRTUAL_STORAGE_TYPE,
    lib.GET_VIRTUAL_DISK_INFO_PROVIDER_SUBTYPE,
    lib.GET_VIRTUAL_DISK_INFO_IDENTIFIER,
    lib.GET_VIRTUAL_DISK_INFO_VHD_PHYSICAL_SECTOR_SIZE,
    lib.GET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID,
    lib.GET_VIRTUAL_DISK_INFO_PARENT_TIMESTAMP,
    lib.GET_VIRTUAL_DISK_INFO_PARENT_IDENTIFIER,
    lib.GET_VIRTUAL_DISK_INFO_SMALLEST_SAFE_VIRTUAL_SIZE,
    lib.GET_VIRTUAL_DISK_INFO_FRAGMENTATION,
    lib.GET_VIRTUAL_DISK_INFO_IS_4K_ALIGNED,
    lib.GET_VIRTUAL_DISK_INFO_PHYSICAL_DISK,
    lib.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE,
]
_BATCH_COUNT = len(_BATCH_VERSIONS_LIST)
_BATCH_INDEX = {version: index for index, version in enumerate(_BATCH_VERSIONS_LIST)}
_BATCH_VERSIONS = ffi.new("GET_VIRTUAL_DISK_INFO_VERSION[]", _BATCH_VERSIONS_LIST)


def _batch_layout() -> struct.Struct:
    """The struct format reading, from the batch's answers, the fields
    _BatchQuery.disk_info uses, in its order, at the offsets cffi gives (each
    field's size checked against the format's)."""
    size = ffi.sizeof("GET_VIRTUAL_DISK_INFO")
    fields = [  # (version, field path, struct code)
        (lib.GET_VIRTUAL_DISK_INFO_SIZE, ("Size", "VirtualSize"), "Q"),
        (lib.GET_VIRTUAL_DISK_INFO_SIZE, ("Size", "PhysicalSize"), "Q"),
        (lib.GET_VIRTUAL_DISK_INFO_SIZE, ("Size", "BlockSize"), "I"),
        (lib.GET_VIRTUAL_DISK_INFO_SIZE, ("Size", "SectorSize"), "I"),
        (lib.GET_VIRTUAL_DISK_INFO_VIRTUAL_STORAGE_TYPE, ("VirtualStorageType", "DeviceId"), "I"),
        (lib.GET_VIRTUAL_DISK_INFO_PROVIDER_SUBTYPE, ("ProviderSubtype",), "I"),
        (lib.GET_VIRTUAL_DISK_INFO_IDENTIFIER, ("Identifier",), "IHH8s"),
        (lib.GET_VIRTUAL_DISK_INFO_VHD_PHYSICAL_SECTOR_SIZE, ("VhdPhysicalSectorSize",), "I"),
        (lib.GET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID, ("VirtualDiskId",), "IHH8s"),
        (lib.GET_VIRTUAL_DISK_INFO_SMALLEST_SAFE_VIRTUAL_SIZE, ("SmallestSafeVirtualSize",), "Q"),
        (lib.GET_VIRTUAL_DISK_INFO_FRAGMENTATION, ("FragmentationPercentage",), "I"),
        (lib.GET_VIRTUAL_DISK_INFO_IS_4K_ALIGNED, ("Is4kAligned",), "i"),
        (lib.GET_VIRTUAL_DISK_INFO_PHYSICAL_DISK, ("PhysicalDisk", "LogicalSectorSize"), "I"),
        (lib.GET_VIRTUAL_DISK_INFO_PHYSICAL_DISK, ("PhysicalDisk", "PhysicalSectorSize"), "I"),
        (lib.GET_VIRTUAL_DISK_INFO_PHYSICAL_DISK, ("PhysicalDisk", "IsRemote"), "i"),
        (lib.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE, ("ChangeTrackingState", "Enabled"), "i"),
    ]
    layout = "="
    position = 0
    for version, path, code in fields:
        index = _BATCH_INDEX[version]
        offset = index * size + ffi.offsetof("GET_VIRTUAL_DISK_INFO", *path)
        field_type = ffi.typeof("GET_VIRTUAL_DISK_INFO")
        for name in path:
            field_type = dict(field_type.fields)[name].type
        if ffi.sizeof(field_type) != struct.calcsize("=" + code) or offset < position:
            raise ImportError(f"GET_VIRTUAL_DISK_INFO.{'.'.join(path)} is not the {code!r} expected")
        layout += f"{offset - position}x{code}" if offset > position else code
        position = offset + struct.calcsize("=" + code)
    return struct.Struct(layout)


_BATCH_LAYOUT = _batch_layout()


# Windows has no batched call: one GetVirtualDiskInformation per version.
_new_query: Callable[[Any, Path], _Query] = (
    _BatchQuery if hasattr(lib, "vd_get_information_batch") else _Query
)


def _multi_sz(pointer: Any) -> tuple[str, ...]:
    items: list[str] = []
    while True:
        item = str(ffi.string(pointer))
        if not item:
            return tuple(items)
        items.append(item)
        pointer += len(item) + 1


def _sized_call(call: Callable[[Any, Any], int], size: int) -> tuple[int, Any]:
    """A call answering ERROR_INSUFFICIENT_BUFFER with the byte size it needs,
    retried with that size while the size grows (a size that does not grow
    would loop for ever: that answer is returned).  Returns (code, WCHAR buffer)."""
    needed = ffi.new("ULONG *", size)
    while True:
        size = needed[0]
        buffer = ffi.new("WCHAR[]", size // 2 + 1)
        code = call(needed, buffer)
        if code != WinError.ERROR_INSUFFICIENT_BUFFER or needed[0] <= size:
            return code, buffer


def _physical_path(handle: Any) -> tuple[int, str]:
    """GetVirtualDiskPhysicalPath: (code, path); the path is "" on failure."""
    code, buffer = _sized_call(lambda size, buffer: lib.GetVirtualDiskPhysicalPath(handle, size, buffer), 520)
    return code, str(ffi.string(buffer)) if code == WinError.ERROR_SUCCESS else ""


# The failures that leave the question unanswered (a handle without GET_INFO
# access, or no handle at all) rather than answer "not attached".
_NOT_ASKED = frozenset(
    {WinError.ERROR_ACCESS_DENIED, WinError.ERROR_INVALID_HANDLE, WinError.ERROR_INVALID_PARAMETER}
)


def _is_attached(handle: Any, path: Path) -> bool:
    """Whether the disk is attached, on both platforms alike: GetVirtualDiskPhysicalPath
    succeeds only when the disk "must be attached" and its physical disk is found
    (Microsoft Learn, GetVirtualDiskPhysicalPath, Remarks); the code for "not
    attached" is undocumented.  GET_VIRTUAL_DISK_INFO_IS_LOADED is not this
    question: it says whether the disk is "mounted and in use"."""
    # _physical_path's first try, without its closures (an inventory asks
    # this of every image); a longer path is asked again at its size.
    code: int = lib.GetVirtualDiskPhysicalPath(handle, ffi.new("ULONG *", 520), ffi.new("WCHAR[]", 261))
    if code == WinError.ERROR_INSUFFICIENT_BUFFER:
        code, _ = _physical_path(handle)
    if code in _NOT_ASKED or code == WinError.ERROR_INSUFFICIENT_BUFFER:
        check(code, "GetVirtualDiskPhysicalPath", str(path))
    return code == WinError.ERROR_SUCCESS


def _ensure_volume_privilege(function: str, path: str | None) -> None:
    """Windows: attaching needs SeManageVolumePrivilege enabled (Microsoft Learn,
    AttachVirtualDisk); a token without it is a VirtualDiskPermissionError
    (ERROR_PRIVILEGE_NOT_HELD), as the Linux provider answers without CAP_SYS_ADMIN."""
    if sys.platform == "win32":
        from ._privilege import ensure_manage_volume_privilege

        ensure_manage_volume_privilege(function=function, path=path)


def _absolute(path: StrPath) -> str:
    """Parent and source paths must be "fully qualified" (Microsoft Learn,
    CREATE_VIRTUAL_DISK_PARAMETERS): relative ones are made absolute here, as
    a relative path means the working directory to Python users."""
    return os.path.abspath(os.fspath(path))


def open(
    path: StrPath,
    access: Access | None = None,
    *,
    read_only: bool = False,
    storage_type: StorageType | None = None,
    no_parents: bool = False,
    rw_depth: int = 1,
) -> VirtualDisk:
    """Open an image (OpenVirtualDisk, version 1 parameters).

    ``rw_depth`` is how many disks of a differencing chain, from this one
    down, the handle may change: a merge of ``depth`` disks needs
    ``depth + 1`` (and ``Access.METAOPS``).

    ``access`` (a :class:`virtdisk.Access`) defaults to attach (read-only or
    read-write), detach and information access; ``read_only=True`` (the
    default for ``.iso`` files) leaves out read-write attach, so a read-only
    file can be opened.  Resizing and expanding need ``Access.METAOPS``, which
    the default leaves out: ``open(path, access=Access.METAOPS)``.
    ``storage_type`` None lets the image's contents decide its format.
    """
    image = _path_argument("path", path)
    text = str(image)
    if access is not None:
        access = _access_argument(access)
    else:
        # The text's end first: Path.suffix costs more than the rest of this
        # argument handling, and a suffix ".iso" is always the text's end.
        is_iso = text[-4:].lower() == ".iso" and image.suffix.lower() == ".iso"
        read_only = read_only or is_iso or storage_type == StorageType.ISO
        access = _READ_ONLY_ACCESS if read_only else _DEFAULT_ACCESS
    flags = OpenFlag.NO_PARENTS if no_parents else OpenFlag.NONE
    # The shared constant for the common depth; a merge asks for more.
    parameters = _OPEN_PARAMETERS
    if rw_depth != lib.OPEN_VIRTUAL_DISK_RW_DEPTH_DEFAULT:
        parameters = ffi.new(
            "OPEN_VIRTUAL_DISK_PARAMETERS *",
            {
                "Version": lib.OPEN_VIRTUAL_DISK_VERSION_1,
                "Version1": {"RWDepth": _int_argument("rw_depth", rw_depth, _ULONG_MAX)},
            },
        )
    handle = ffi.new("HANDLE *")
    code = lib.OpenVirtualDisk(
        _STORAGE_TYPES[_storage_type_for(image, storage_type)], text, access, flags, parameters, handle
    )
    if code:
        raise error_for(code, "OpenVirtualDisk", text)
    return VirtualDisk(handle[0], image, access)


def create(
    path: StrPath,
    size: int = 0,
    *,
    storage_type: StorageType | None = None,
    fixed: bool = False,
    block_size: int = 0,
    sector_size: int = 0,
    physical_sector_size: int = 0,
    unique_id: uuid.UUID | None = None,
    parent: StrPath | None = None,
    source: StrPath | None = None,
    sparse: bool = False,
    progress: ProgressCallback | None = None,
) -> VirtualDisk:
    """Create an image (CreateVirtualDisk, version 2 parameters) and return its handle.

    The format is ``storage_type`` or, when None, the path's suffix (.vhd,
    .vhdx; any other suffix needs ``storage_type``).  ``fixed`` allocates the
    whole size now; otherwise the image grows as data is written.  ``parent``
    makes a differencing disk (``size`` 0).
    ``source`` copies the contents of another disk: a VHD, VHDX or ISO image
    (its virtual disk) or anything else byte for byte (a raw image, a block
    device); ``size`` 0 then means the source's size.  ``sparse`` leaves a
    fixed disk's data area unallocated in the file (CREATE_VIRTUAL_DISK_FLAG_SPARSE_FILE).
    Never overwrites: an existing file raises :class:`VirtualDiskExistsError`.

    A copy from ``source``, and the allocation of a ``fixed`` disk, run as an
    asynchronous operation (_operation.py): ``progress(current, total)`` is
    called along the way (bytes of the source, or of the fixed file); an
    exception raised by it (or Ctrl-C) cancels the operation, removes the new
    file and propagates.
    """
    image = _path_argument("path", path)
    kind = _storage_type_for(image, storage_type)
    if kind == StorageType.UNKNOWN and image.suffix.lower() not in (".vhd", ".vhdx"):
        raise ValueError(
            f"storage_type: cannot tell the format of {str(image)!r} from its suffix; "
            "pass storage_type=StorageType.VHD or StorageType.VHDX"
        )
    size = _int_argument("size", size, _ULONGLONG_MAX)
    block_size = _int_argument("block_size", block_size, _ULONG_MAX)
    sector_size = _int_argument("sector_size", sector_size, _ULONG_MAX)
    physical_sector_size = _int_argument("physical_sector_size", physical_sector_size, _ULONG_MAX)
    if unique_id is not None and not isinstance(unique_id, uuid.UUID):
        raise TypeError(f"unique_id must be a uuid.UUID or None, not {type(unique_id).__name__}")
    parent_path = _path_argument("parent", parent) if parent is not None else None
    source_path = _path_argument("source", source) if source is not None else None
    parameters = ffi.new("CREATE_VIRTUAL_DISK_PARAMETERS *")
    parameters.Version = lib.CREATE_VIRTUAL_DISK_VERSION_2
    v2 = parameters.Version2
    if unique_id is not None:
        _uuid_to_guid(unique_id, v2.UniqueId)
    v2.MaximumSize = size
    v2.BlockSizeInBytes = block_size
    v2.SectorSizeInBytes = sector_size
    v2.PhysicalSectorSizeInBytes = physical_sector_size
    keep_alive = []
    if parent_path is not None:
        parent_text = ffi.new("WCHAR[]", _absolute(parent_path))
        keep_alive.append(parent_text)
        v2.ParentPath = parent_text
    if source_path is not None:
        source_text = ffi.new("WCHAR[]", _absolute(source_path))
        keep_alive.append(source_text)
        v2.SourcePath = source_text
    flags = CreateFlag.FULL_PHYSICAL_ALLOCATION if fixed else CreateFlag.NONE
    if sparse:
        flags |= CreateFlag.SPARSE_FILE
    handle = ffi.new("HANDLE *")
    if source is not None or (fixed and not sparse):
        return _create_copying(image, kind, flags, parameters, handle, progress)
    code = lib.CreateVirtualDisk(
        _storage_type(kind), str(image), Access.NONE, ffi.NULL, flags, 0, parameters, ffi.NULL, handle
    )
    if code:
        raise _with_parameter_hint(error_for(code, "CreateVirtualDisk", str(image)))
    return VirtualDisk(handle[0], image, Access.ALL & ~Access.CREATE)


def _create_copying(
    image: Path,
    kind: StorageType,
    flags: int,
    parameters: Any,
    handle: Any,
    progress: ProgressCallback | None,
) -> VirtualDisk:
    """CreateVirtualDisk asynchronously (a SourcePath, or a fixed disk), waiting for its end."""

    def start(overlapped: Any) -> int:
        return int(
            lib.CreateVirtualDisk(
                _storage_type(kind),
                str(image),
                Access.NONE,
                ffi.NULL,
                flags,
                0,
                parameters,
                overlapped,
                handle,
            )
        )

    operation = Operation(lambda: handle[0], start, "CreateVirtualDisk", str(image))
    disk = VirtualDisk(handle[0], image, Access.ALL & ~Access.CREATE)
    try:
        operation.wait(progress)
    except BaseException:
        disk.close()
        raise
    return disk


def merge(path: StrPath, depth: int = 1, *, progress: ProgressCallback | None = None) -> None:
    """Merge the differencing disk at ``path`` into its ancestor ``depth`` levels
    up (Merge-VHD): opens it with METAOPS access and the RWDepth that needs,
    merges (:meth:`VirtualDisk.merge`) and closes.  The merged disks are left in
    place, no longer valid; nothing is deleted."""
    with open(path, Access.METAOPS | Access.GET_INFO, rw_depth=depth + 1) as disk:
        disk.merge(depth, progress=progress)


def compact(
    path: StrPath,
    *,
    zero_scan: bool = True,
    block_moves: bool = True,
    progress: ProgressCallback | None = None,
) -> None:
    """Compact the dynamic or differencing disk at ``path`` (Optimize-VHD):
    opens it with METAOPS access, compacts (:meth:`VirtualDisk.compact`) and
    closes.  The disk may be detached or attached read-only (then it stays
    attached while its file shrinks)."""
    with open(path, Access.METAOPS | Access.GET_INFO) as disk:
        disk.compact(zero_scan=zero_scan, block_moves=block_moves, progress=progress)


def detach(path: StrPath) -> None:
    """Detach the disk whose image is ``path``, or which is attached as the
    device ``path`` (``/dev/loop3`` on Linux): open with DETACH access,
    detach, close.

    The way to detach a disk attached with ``permanent=True``, from any
    process.  By device it also works after the image was renamed, and (for a
    disk the Linux provider serves) after it was deleted.
    """
    image = _path_argument("path", path)
    device = None
    if sys.platform != "win32" and _is_block_device(image):
        device = str(image)
        image = _image_of_device(device)
    with open(image, Access.DETACH | Access.GET_INFO) as disk:
        if device is not None:
            _check_still_on(disk, device)
        disk.detach()


def _check_still_on(disk: VirtualDisk, device: str) -> None:
    """Named by its device, the disk is the image found on it a moment ago,
    which may have been detached since and attached again as another
    device: detaching it there is not what was asked.  Checked while the
    handle is open, which refuses other processes' detaches of it."""
    with disk._using() as handle:
        code, physical = _physical_path(handle)
    if code != WinError.ERROR_SUCCESS or os.path.realpath(physical) != os.path.realpath(device):
        now = (
            f"is attached as {physical} now" if code == WinError.ERROR_SUCCESS else "is not attached any more"
        )
        raise NotAttachedError(
            WinError.ERROR_NOT_READY,
            "DetachVirtualDisk",
            device,
            detail=f"{device} no longer holds {disk._path}, which {now}; nothing was detached",
        )


def _served_link(device: str) -> Path | None:
    """The served image's descriptor in its server, /proc/PID/fd/N: the
    kernel names the file there as it is now (the record keeps the name it
    was attached by), and opening it reaches the file even once deleted."""
    served = _served_record(device)
    if served is None:
        return None
    pid, dev, ino, _ = served
    # The record names the supervisor; the image is open in its server, a
    # child process of it.
    try:
        children = Path("/proc", str(pid), "task", str(pid), "children").read_text().split()
    except OSError:
        children = []
    for holder in [str(pid), *children]:
        for fd in Path("/proc", holder, "fd").glob("*"):
            try:
                st = os.stat(fd)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (dev, ino):
                return fd
    return None


def _image_named(device: str, name: str) -> Path:
    """The kernel's name of an image file (which follows renames), unless the
    file was deleted: OpenVirtualDisk needs a name to open."""
    if name.endswith(" (deleted)") and not Path(name).exists():
        raise NotSupportedError(
            WinError.ERROR_NOT_SUPPORTED,
            "DetachVirtualDisk",
            device,
            detail=f"its image {name[: -len(' (deleted)')]} was deleted while attached",
            hint=f"a disk attached directly cannot be detached without its image; losetup -d {device} can",
        )
    return Path(name)


def _is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _image_of_device(device: str) -> Path:
    """Linux: a path that opens the image attached as ``device`` now: its
    serving helper's descriptor of it (which outlives a rename or an unlink),
    else the loop device's backing file (the kernel follows renames)."""
    served = _served_link(device)
    if served is not None:
        # The server's descriptor opens the image even after it was deleted.
        name = os.readlink(served)
        return served if name.endswith(" (deleted)") else Path(name)
    name = Path(device).name
    try:
        backing = Path("/sys/block", name, "loop", "backing_file").read_text().rstrip("\n")
    except OSError:
        raise NotAttachedError(
            WinError.ERROR_NOT_READY,
            "DetachVirtualDisk",
            device,
            detail=f"{device} is not an attached loop device",
        ) from None
    if Path(backing).is_file() or backing.endswith(" (deleted)"):
        return _image_named(device, backing)
    raise NotAttachedError(
        WinError.ERROR_NOT_READY,
        "DetachVirtualDisk",
        device,
        detail=f"{device} shows {backing}, not a virtual disk this provider attached",
    )


def attached_disks() -> list[AttachedDisk]:
    """Every attached virtual disk (GetAllAttachedVirtualDiskPhysicalPaths)."""
    code, buffer = _sized_call(lib.GetAllAttachedVirtualDiskPhysicalPaths, 1024)
    check(code, "GetAllAttachedVirtualDiskPhysicalPaths")
    found = []
    for entry in _multi_sz(buffer):
        disk = _attached_disk(entry)
        if disk is not None:
            found.append(disk)
    return found


def _attached_disk(entry: str) -> AttachedDisk | None:
    r"""One entry of GetAllAttachedVirtualDiskPhysicalPaths, which is undocumented:
    Windows builds answer device paths (\\.\PhysicalDriveN) or the images'
    paths.  A device path is the physical path; an image's physical path comes
    from opening it.  None for an image gone or detached in the meantime."""
    if entry.startswith("/dev/"):
        return _attached_loop(entry)
    if entry.startswith("\\\\.\\"):
        return AttachedDisk(entry, None)
    try:
        with open(entry, Access.GET_INFO) as disk, disk._using() as handle:
            code, physical = _physical_path(handle)
    except VirtualDiskNotFoundError:
        return None
    if code != WinError.ERROR_SUCCESS:
        if code in _NOT_ASKED:
            raise error_for(code, "GetVirtualDiskPhysicalPath", entry)
        return None
    return AttachedDisk(physical, Path(entry))


# struct loop_info64 of <linux/loop.h>: 232 bytes, lo_file_name at 56; the
# provider names its devices "virtdisk:<image>" (src/provider/loopdev.h).
_LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64_SIZE = 232
_LOOP_NAME_AT = 56
_LOOP_NAME_PREFIX = b"virtdisk:"


def _attached_loop(device: str) -> AttachedDisk | None:
    """Linux: what sysfs and the provider's records tell about a loop device,
    or None when it no longer holds one of the provider's disks.  All of it
    is read by number, and a number is anyone's again the moment its binding
    ends: so the device is opened first, which pins the binding it shows
    (a detach meanwhile waits for this short-lived opener), checked to be
    the provider's, and read while held."""
    import fcntl

    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # gone, or being torn down
    try:
        try:
            info = fcntl.ioctl(fd, _LOOP_GET_STATUS64, bytes(_LOOP_INFO64_SIZE))
        except OSError:
            return None  # unbound since it was listed
        if not info[_LOOP_NAME_AT:].startswith(_LOOP_NAME_PREFIX):
            return None  # another attacher's binding since
        return _describe_loop(device)
    finally:
        os.close(fd)


def _describe_loop(device: str) -> AttachedDisk:
    sysfs = Path("/sys/block", Path(device).name)

    def flag(relative: str) -> bool | None:
        try:
            return (sysfs / relative).read_text().strip() == "1"
        except OSError:
            return None

    autoclear = flag("loop/autoclear")
    record = _served_record(device)
    # A served disk's loop device always clears itself (its server holds
    # it); the record says whether that server outlives its attacher.
    permanent = record[3] if record else None if autoclear is None else not autoclear
    return AttachedDisk(
        device,
        _backing_image(device),
        read_only=flag("ro"),
        permanent=permanent,
        served=record is not None or _served_in_process(device),
    )


def _served_in_process(device: str) -> bool:
    """A non-permanent served disk has no helper record: its loop device's
    backing file is the provider's FUSE file, under its run directory."""
    try:
        backing = Path("/sys/block", Path(device).name, "loop", "backing_file").read_text().strip()
    except OSError:
        return False
    return backing.startswith(f"{_run_dir()}/")


def _backing_image(device: str) -> Path | None:
    """Linux: the loop device's backing file, from sysfs; for an image served
    through FUSE (whose file has no name), the provider's record of it."""
    if not device.startswith("/dev/loop"):
        return None
    name = device[len("/dev/") :]
    try:
        backing = Path("/sys/block", name, "loop", "backing_file").read_text().strip()
    except OSError:
        return None
    if Path(backing).is_file():
        return Path(backing)
    served = _served_link(device)
    if served is not None:
        try:
            return Path(os.readlink(served))
        except OSError:
            pass
    return _served_image(device)


def _served_record(device: str) -> tuple[int, int, int, bool] | None:
    """(server pid, image st_dev, st_ino, permanent) of a live served
    attachment on device, from the provider's records (named <dev>-<ino>.json
    in hexadecimal: see src/provider/fuseattach.h)."""
    for record in _run_dir().glob("*.json"):
        try:
            entry = json.loads(record.read_text())
            dev, ino = (int(part, 16) for part in record.stem.split("-"))
        except (OSError, ValueError):
            continue
        pid = entry.get("pid")
        if (
            entry.get("device") == device
            and isinstance(pid, int)
            and Path("/proc", str(pid)).exists()
            and _holds_device(pid, device)
        ):
            return pid, dev, ino, entry.get("permanent") is True
    return None


def _run_dir() -> Path:
    """The Linux provider's run directory: $VIRTDISK_RUN_DIR, else /run/virtdisk."""
    return Path(os.environ.get("VIRTDISK_RUN_DIR") or "/run/virtdisk")


def _holds_device(pid: int, device: str) -> bool:
    """Whether the record's server still holds its loop device open (as it
    does while it serves): loop device names are reused, and a record can
    outlive its attachment in a process that lives on.  Asked of the
    process, not of the device: an open of its own would only say that some
    binding has the number, not that this server's still does."""
    for fd in Path("/proc", str(pid), "fd").glob("*"):
        try:
            if os.readlink(fd) == device:
                return True
        except OSError:
            continue
    return False


def _served_image(device: str) -> Path | None:
    """The image of a FUSE-served attachment on device: the provider's record
    of it, trusted only while the device is still bound to the record's FUSE
    file (src/provider/servrecord.h)."""
    number = device[len("/dev/loop") :]
    if not number.isdigit():
        return None
    path = ffi.new("char[]", 4096)
    if lib.vd_served_image_of(int(number), path, len(path)) == 0:
        return None
    return Path(os.fsdecode(ffi.string(path)))
