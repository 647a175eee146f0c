"""The volume-management privilege that attaching and detaching need.

Windows grants ``SeManageVolumePrivilege`` to elevated administrators but
leaves it *disabled* in their token; AttachVirtualDisk then fails with
ERROR_PRIVILEGE_NOT_HELD.  Elevated tools enable it once for the process, and
so does :func:`ensure_manage_volume_privilege`.  A token without it cannot be
helped from inside the process: that is a :class:`VirtualDiskPermissionError`
(a ``PermissionError`` and a ``VirtualDiskError``, winerror 1314) telling the
user to run elevated.

The operating system is reached through a :class:`PrivilegeToken`, so the
decision can be tested with a fake token; the default is the process token,
through ``virtdisk._native`` (on Linux the counterpart is CAP_SYS_ADMIN).
"""

from __future__ import annotations

import enum
import threading
import weakref
from typing import Protocol

ERROR_PRIVILEGE_NOT_HELD = 1314

RUN_ELEVATED = (
    "attaching and detaching virtual disks needs the volume-management privilege "
    "(SeManageVolumePrivilege), which this process's token does not hold: "
    "run elevated (as administrator; on Linux, as root)"
)


class PrivilegeState(enum.IntEnum):
    """Where the privilege stands in a token (shim.h's VD_PRIVILEGE_*)."""

    ABSENT = 0
    DISABLED = 1
    ENABLED = 2


class PrivilegeToken(Protocol):
    """The process token, as far as this privilege goes."""

    def state(self) -> PrivilegeState:
        """Where the privilege stands; raises OSError when the token cannot be read."""
        ...

    def enable(self) -> None:
        """Enables the privilege; raises OSError (winerror 1314 when it is absent)."""
        ...


def _os_error(code: int, function: str) -> OSError:
    from ._native import ffi, lib

    buffer = ffi.new("char[512]")
    lib.vd_error_message(code, buffer, len(buffer))
    message = ffi.string(buffer).decode("utf-8", "replace") or f"error {code}"
    # OSError(errno, strerror, filename, winerror): on Windows the winerror
    # argument picks the subclass (1314 -> PermissionError).
    error = OSError(None, f"{function}: {message}", None, code)
    # Off Windows OSError ignores the winerror argument; the caller reads it.
    error.winerror = code  # type: ignore[attr-defined,unused-ignore]
    return error


class NativeToken:
    """This process's token, through ``virtdisk._native``."""

    def state(self) -> PrivilegeState:
        from ._native import ffi, lib

        state = ffi.new("int *")
        code = lib.vd_manage_volume_privilege_state(state)
        if code != 0:
            raise _os_error(code, "vd_manage_volume_privilege_state")
        return PrivilegeState(state[0])

    def enable(self) -> None:
        from ._native import lib

        code = lib.vd_enable_manage_volume_privilege()
        if code != 0:
            raise _os_error(code, "vd_enable_manage_volume_privilege")


# Tokens known to hold the privilege enabled, because this module saw it or
# enabled it: the next attach skips the system calls.  Weak, so a fake token
# in a test does not outlive the test.
_enabled: weakref.WeakSet[object] = weakref.WeakSet()
_lock = threading.Lock()
_native_token: NativeToken | None = None


def _run_elevated(function: str, path: str | None) -> OSError:
    from ._errors import VirtualDiskPermissionError

    return VirtualDiskPermissionError(ERROR_PRIVILEGE_NOT_HELD, function, path, RUN_ELEVATED)


def ensure_manage_volume_privilege(
    token: PrivilegeToken | None = None,
    *,
    function: str = "ensure_manage_volume_privilege",
    path: str | None = None,
) -> None:
    """Makes sure the privilege is enabled in ``token`` (default: this process's).

    Enabled: nothing to do.  Held but disabled: enables it, once.  Absent:
    raises VirtualDiskPermissionError (winerror 1314) naming ``function`` and
    ``path`` (what needed the privilege), saying to run elevated.
    """
    global _native_token
    with _lock:
        if token is None:
            if _native_token is None:
                _native_token = NativeToken()
            token = _native_token
        if token in _enabled:
            return
        state = token.state()
        if state is PrivilegeState.ABSENT:
            raise _run_elevated(function, path)
        if state is PrivilegeState.DISABLED:
            try:
                token.enable()
            except OSError as error:
                # The token changed under us, or enabling was refused: the
                # user's remedy is the same.
                if getattr(error, "winerror", None) == ERROR_PRIVILEGE_NOT_HELD:
                    raise _run_elevated(function, path) from error
                raise
        _enabled.add(token)
