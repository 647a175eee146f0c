"""The volume-management privilege decision, with a fake token (any OS)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from virtdisk import VirtualDiskError, VirtualDiskPermissionError
from virtdisk._privilege import (
    ERROR_PRIVILEGE_NOT_HELD,
    NativeToken,
    PrivilegeState,
    ensure_manage_volume_privilege,
)


class FakeToken:
    def __init__(self, state: PrivilegeState, enable_error: int | None = None) -> None:
        self._state = state
        self._enable_error = enable_error
        self.queries = 0
        self.enables = 0
        self.raised: OSError | None = None

    def state(self) -> PrivilegeState:
        self.queries += 1
        return self._state

    def enable(self) -> None:
        self.enables += 1
        if self._enable_error is not None:
            # As the native token builds it: on Windows the winerror argument
            # picks the subclass (5 -> PermissionError), elsewhere it is ignored.
            error = OSError(None, "AdjustTokenPrivileges", None, self._enable_error)
            error.winerror = self._enable_error  # type: ignore[attr-defined,unused-ignore]
            self.raised = error
            raise error
        self._state = PrivilegeState.ENABLED


def test_an_enabled_privilege_is_left_alone() -> None:
    token = FakeToken(PrivilegeState.ENABLED)
    ensure_manage_volume_privilege(token)
    assert (token.queries, token.enables) == (1, 0)


def test_a_disabled_privilege_is_enabled_once() -> None:
    token = FakeToken(PrivilegeState.DISABLED)
    ensure_manage_volume_privilege(token)
    ensure_manage_volume_privilege(token)
    # the second call trusts the first: no query, no enable
    assert (token.queries, token.enables) == (1, 1)


def test_an_absent_privilege_asks_to_run_elevated() -> None:
    token = FakeToken(PrivilegeState.ABSENT)
    with pytest.raises(VirtualDiskError, match="run elevated") as raised:
        ensure_manage_volume_privilege(token, function="AttachVirtualDisk", path="disk.vhdx")
    # caught as the package's error and as the builtin one, on every platform
    assert isinstance(raised.value, VirtualDiskPermissionError)
    assert isinstance(raised.value, PermissionError)
    assert raised.value.winerror == ERROR_PRIVILEGE_NOT_HELD
    assert (raised.value.function, raised.value.filename) == ("AttachVirtualDisk", "disk.vhdx")
    assert token.enables == 0


def test_an_absent_privilege_is_asked_about_again_next_time() -> None:
    """The user may have fixed it meanwhile (only success is remembered)."""
    token = FakeToken(PrivilegeState.ABSENT)
    for _ in range(2):
        with pytest.raises(PermissionError):
            ensure_manage_volume_privilege(token)
    assert token.queries == 2


def test_enabling_refused_for_lack_of_the_privilege_asks_to_run_elevated() -> None:
    token = FakeToken(PrivilegeState.DISABLED, enable_error=ERROR_PRIVILEGE_NOT_HELD)
    with pytest.raises(VirtualDiskPermissionError, match="run elevated") as raised:
        ensure_manage_volume_privilege(token)
    assert raised.value.winerror == ERROR_PRIVILEGE_NOT_HELD
    assert raised.value.__cause__ is token.raised


def test_other_failures_to_enable_pass_through() -> None:
    """Passed on as they came: the very exception (on Windows CPython makes
    winerror 5 a PermissionError, elsewhere a plain OSError)."""
    access_denied = 5
    token = FakeToken(PrivilegeState.DISABLED, enable_error=access_denied)
    with pytest.raises(OSError) as raised:
        ensure_manage_volume_privilege(token)
    assert raised.value is token.raised
    assert raised.value.winerror == access_denied  # type: ignore[attr-defined,unused-ignore]
    assert not isinstance(raised.value, VirtualDiskError)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_native_token_reports_cap_sys_admin_on_linux() -> None:
    """Enabled when CAP_SYS_ADMIN (bit 21) is effective, else absent: as
    /proc/self/status, a second source, tells it."""
    cap_eff = next(
        int(line.split()[1], 16)
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("CapEff:")
    )
    effective = bool(cap_eff & (1 << 21))
    token = NativeToken()
    assert token.state() is (PrivilegeState.ENABLED if effective else PrivilegeState.ABSENT)
    if effective:
        token.enable()
    else:
        with pytest.raises(OSError) as raised:
            token.enable()
        assert raised.value.winerror == ERROR_PRIVILEGE_NOT_HELD  # type: ignore[attr-defined,unused-ignore]
