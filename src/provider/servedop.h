/*
 * The caller's side of an operation that runs inside a served disk's
 * server (serveops.h: mirror, compact): finding the way to the server,
 * starting the operation there, and following it as a job (job.h) that asks
 * the server how far it is and cancels it when the caller does.
 *
 * Promises:
 *   - Which disks: an attached, served one (dynamic, differencing,
 *     non-contiguous VHDX), through this process's own channel to its helper
 *     (attached here without PERMANENT_LIFETIME) or its helper's socket
 *     (attached permanently, or by another process).  Not attached:
 *     ERROR_NOT_READY; loop-mapped directly: ERROR_NOT_SUPPORTED, the detail
 *     saying what the operation needs.
 *   - vd_served_op_run() either fails having left nothing running in the
 *     server, or the operation runs: with an OVERLAPPED it returns
 *     ERROR_IO_PENDING and the job follows it (GetVirtualDiskOperationProgress
 *     shows the server's CurrentValue/CompletionValue); without one it
 *     follows it on the calling thread and returns its outcome.
 *   - An own attachment detached meanwhile ends the job with
 *     ERROR_OPERATION_ABORTED (its server went with it).
 *   - The operation ends with the handle that started it, as on Windows
 *     (job.h): closing it cancels a running job, and with it the operation;
 *     a mirror in sync (its job over, but on Windows still the handle's
 *     pending operation until a break) is cancelled when the handle is
 *     freed (vd_served_op_end).  A process that dies says nothing: its
 *     helper watches the requester and cancels for it (helper.h).  Either
 *     way the mirror ends as a cancel ends it: the source stays the disk,
 *     a target it created is removed (servemirror.h).
 */
#ifndef VD_PROVIDER_SERVEDOP_H
#define VD_PROVIDER_SERVEDOP_H

#include <stddef.h>
#include <stdint.h>

#include "handles.h"
#include "serveproto.h"
#include "virtdisk.h"

/* Finds the way to the disk's server: *served is this process's channel, or
   NULL for a permanent helper's socket.  needs: what the operation needs,
   for the refusal's detail ("mirroring copies an attached disk").  Called
   under vd_disks_lock(). */
DWORD vd_served_op_route(struct vd_handle *handle, const char *needs, struct vd_served **served);

/* One request and its RESULT (or, for STATUS, its state, whose failure is
   recorded as the detail).  Called under vd_disks_lock(). */
DWORD vd_served_op_call(struct vd_handle *handle, struct vd_served *served, uint16_t type, const void *payload,
                        size_t length, struct vd_msg_operation_state *state);

/* Starts operation kind in the server with payload (a struct
   vd_msg_operation_start and its path) and follows it, as promised above.
   name names it in details ("the mirror", "the compaction"). */
DWORD vd_served_op_run(struct vd_handle *handle, OVERLAPPED *overlapped, enum vd_operation_kind kind,
                       const void *payload, size_t length, const char *needs, const char *name);

/* Cancels the last operation handle started in its disk's server, if that
   one still runs (by its number: never a later one); for the handle's
   final close.  The thread's error detail stays as it was. */
void vd_served_op_end(struct vd_handle *handle);

#endif
