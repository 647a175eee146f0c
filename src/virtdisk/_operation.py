"""Long operations (merge, create with a source) run asynchronously, with progress.

Both platforms run the same code: the call gets an ``OVERLAPPED`` whose event
comes from ``CreateEventW``; :meth:`Operation.wait` waits on it in short
slices, reading ``GetVirtualDiskOperationProgress`` between them, and
:meth:`Operation.cancel` is ``CancelIoEx``.  On Windows those are kernel32's;
on Linux the provider implements them (the event is an eventfd).

Cancelling: call :meth:`Operation.cancel`, or raise from the ``progress``
callback (a ``KeyboardInterrupt`` works the same way): the operation is
cancelled, waited for, and the exception propagates.  A cancelled operation
leaves its images consistent; one cancelled through :meth:`cancel` raises
:class:`virtdisk.OperationCancelledError` from :meth:`wait`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ._errors import WinError, check, error_for
from ._native import ffi, lib

#: ``progress(current, total)``: called with the operation's CurrentValue and
#: CompletionValue (bytes) while it runs, and once more when it has finished.
ProgressCallback = Callable[[int, int], object]

_WAIT_SLICE_MS = 100


def _last_error() -> int:
    """GetLastError of the call just made: on Windows cffi saves it for us
    (the interpreter may make calls of its own in between)."""
    if sys.platform == "win32":
        return int(ffi.getwinerror()[0])
    return int(lib.GetLastError())


class Operation:
    """An asynchronous VirtDisk call in progress.

    ``start(overlapped)`` makes the call and returns its code; ``handle()``
    is the virtual disk handle it runs on (asked after the call, which may
    be what made it); ``release`` is called once the operation has ended.
    """

    def __init__(
        self,
        handle: Callable[[], Any],
        start: Callable[[Any], int],
        function: str,
        filename: str | None,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        self._handle = handle
        self._function = function
        self._filename = filename
        self._release = release
        self._overlapped = ffi.new("OVERLAPPED *")
        self._progress = ffi.new("VIRTUAL_DISK_PROGRESS *")
        self._status: int | None = None
        self._error: Exception | None = None
        self._event = lib.CreateEventW(ffi.NULL, 1, 0, ffi.NULL)
        if self._event == ffi.NULL:
            code = _last_error()
            release()
            check(code, "CreateEventW")
        self._overlapped.hEvent = self._event
        try:
            code = start(self._overlapped)
        except BaseException:
            self._close()
            raise
        if code == WinError.ERROR_SUCCESS:
            self._status = code  # finished at once (Windows may do that)
        elif code != WinError.ERROR_IO_PENDING:
            error = error_for(code, function, filename)  # before CloseHandle clears the detail
            self._close()
            raise error

    def __del__(self) -> None:
        # The provider writes into the OVERLAPPED until the operation ends:
        # it must not be freed before.  Cancel, and wait for the end.
        if getattr(self, "_event", None) is not None and self._status is None:
            try:
                self.cancel()
                while not self._poll():
                    lib.WaitForSingleObject(self._event, _WAIT_SLICE_MS)
            except Exception:  # nothing to report to in a finalizer
                pass

    def _close(self) -> None:
        if self._event is not None:
            lib.CloseHandle(self._event)
            self._event = None
            self._release()

    @property
    def done(self) -> bool:
        return self._poll()

    def progress(self) -> tuple[int, int]:
        """(CurrentValue, CompletionValue) now."""
        self._poll()
        return self._progress.CurrentValue, self._progress.CompletionValue

    def _poll(self) -> bool:
        if self._status is not None:
            return True
        code = lib.GetVirtualDiskOperationProgress(self._handle(), self._overlapped, self._progress)
        check(code, "GetVirtualDiskOperationProgress", self._filename)
        if self._progress.OperationStatus != WinError.ERROR_IO_PENDING:
            self._status = self._progress.OperationStatus
            if self._status != WinError.ERROR_SUCCESS:
                self._error = error_for(self._status, self._function, self._filename)
            self._close()
            return True
        return False

    def cancel(self) -> bool:
        """Ask the operation to stop (CancelIoEx); False when it had already ended."""
        if self._poll():
            return False
        if lib.CancelIoEx(self._handle(), self._overlapped):
            return True
        code = _last_error()
        if code == WinError.ERROR_NOT_FOUND:
            return False
        raise error_for(code, "CancelIoEx", self._filename)

    def wait(self, progress: ProgressCallback | None = None) -> None:
        """Wait for the end, calling ``progress`` along the way; raise if it failed."""
        try:
            while not self._poll():
                if progress is not None:
                    progress(self._progress.CurrentValue, self._progress.CompletionValue)
                lib.WaitForSingleObject(self._event, _WAIT_SLICE_MS)
        except BaseException:
            # Never leave an operation running behind an exception: it
            # would go on writing after the caller thinks it has stopped.
            self.cancel()
            while not self._poll():
                lib.WaitForSingleObject(self._event, _WAIT_SLICE_MS)
            raise
        if progress is not None:
            progress(self._progress.CurrentValue, self._progress.CompletionValue)
        if self._error is not None:
            raise self._error
