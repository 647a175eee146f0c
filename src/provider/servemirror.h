/*
 * Mirroring a served disk (MirrorVirtualDisk / BreakMirrorVirtualDisk),
 * inside the server process, which owns the image and its BAT: the disk
 * stays in use while its contents are copied to a second image, and its
 * writes go to both.
 *
 * Promises:
 *   - The target is a new image of the source's format, size, sector sizes
 *     and block size (fixed when the source is fixed, else dynamic: a
 *     differencing source's whole disk is copied), with the source's
 *     identity (VHD unique id, VHDX Page 83 data; VHDX's DataWriteGuid is
 *     its own, see servemirror.c); or with MIRROR_VIRTUAL_DISK_FLAG_EXISTING_FILE an existing VHD or
 *     VHDX of the same virtual size and logical sector size.  Refusals:
 *     ERROR_FILE_EXISTS (a new target's path exists), ERROR_INVALID_PARAMETER
 *     (size, sector size, the source itself), the open's own codes.
 *   - The target holds a writer claim (share.h) for as long as it is open
 *     here: no one else opens it for writing while it is mirrored.
 *   - The copy reads only what the source's chain holds: stretches no layer
 *     holds are left unallocated in a new target (and zeroed in an existing
 *     one only where it does not read as zeros already).
 *   - No write is lost: every guest write while the mirror is set writes the
 *     source and then, for the part the copy has passed, the target, under
 *     one mutex; a write touching the chunk being copied waits until it is
 *     (others do not wait for the copy's I/O); a chunk copied later reads
 *     the source after any write that touched it.
 *     Guest flushes flush both once in sync (before, the copy flushes the
 *     target once, when it reaches sync).
 *   - When the copy is done the operation's status becomes ERROR_SUCCESS
 *     and the mirror stays in sync (Windows' "mirror" state) until
 *     vd_mirror_break(), a cancel or the session's end.  A failed write to
 *     the target fails the mirror (its status), never the guest's write.
 *   - vd_mirror_break(): only in sync (else ERROR_VHD_INVALID_STATE).  From
 *     the next request on the server serves the target ("sets the mirror to
 *     be the active virtual disk"); the source is flushed and closed.  The
 *     attachment's marker (share.h) moves with it: the target's descriptor
 *     is marked before the source's is closed, and *handover is a new open
 *     file description of the target, read-only, for the helper to take
 *     the attachment's record, claims and marker over (helper.h).
 *   - Cancel, at any time before a break: the copy stops, the target is no
 *     longer written, and a target this module created is removed (an
 *     EXISTING_FILE target is left a valid image with partial contents).
 *     The source is only read by the copy, so a cancel at any moment leaves
 *     the disk as the guest wrote it.  The requester's handle closing or
 *     its process dying is such a cancel (servedop.h, helper.h).
 *     The session ending first: a target in sync is flushed and kept (it
 *     equals the source), an unfinished one is handled as by a cancel.  (A
 *     killed server removes nothing: its helper removes a created target
 *     no break made the disk, helper.h.)
 */
#ifndef VD_PROVIDER_SERVEMIRROR_H
#define VD_PROVIDER_SERVEMIRROR_H

#include <stdbool.h>
#include <stddef.h>

#include "fuseserve.h"
#include "serveproto.h"
#include "virtdisk.h"

struct vd_mirror;

/* Starts mirroring the server's image onto target_path (absolute) with
   MIRROR_VIRTUAL_DISK_FLAG flags (a new target gets permissions mode); the
   copy runs on a thread of its own. */
DWORD vd_mirror_start(struct vd_fuse_server *server, uint32_t flags, uint32_t mode, const char *target_path,
                      struct vd_mirror **out);

/* Progress and status (ERROR_IO_PENDING while copying). */
void vd_mirror_state(struct vd_mirror *mirror, struct vd_msg_operation_state *state, char *detail,
                     size_t size);

/* Whether the mirror still copies or mirrors (a new operation must wait). */
bool vd_mirror_active(struct vd_mirror *mirror);

DWORD vd_mirror_cancel(struct vd_mirror *mirror);
DWORD vd_mirror_break(struct vd_mirror *mirror, int *handover);

/* Ends whatever is left (as the session's end does, see above) and frees. */
void vd_mirror_free(struct vd_mirror *mirror);

#endif
