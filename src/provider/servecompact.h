/*
 * Compacting a served disk attached read-only (CompactVirtualDisk's
 * file-system-aware mode), inside the server process, which owns the image
 * and its BAT: the disk stays attached and readable while its file shrinks.
 *
 * Promises:
 *   - Only a read-only attachment is compacted (a read-write one answers
 *     ERROR_NOT_SUPPORTED, naming the fix); its file stays read-only to the
 *     guest whatever the server does (fuseserve.h refuses writes).
 *   - The server reopens the image writable through its own descriptor (the
 *     same file, also after a rename) and serves that open from then on;
 *     the read-only open it replaced stays open until the session ends, as
 *     it carries the attachment's marker (share.h).
 *   - The compaction is compact.h's engine on the served image itself, so
 *     guest reads and block moves share one block table and its locks
 *     (VHDX: map_lock, VHD: the state lock): a block is copied and made
 *     durable, then the table points at the copy, and only then is its old
 *     place reused or cut off; a read that raced a move read the old place
 *     before it changed.  A server killed at any point leaves an image that
 *     reads as before (VHDX through its log).
 *   - Progress and status as the engine reports them (bytes); a cancel
 *     stops between batches and answers once the work has stopped, the
 *     image consistent with whatever was returned.
 */
#ifndef VD_PROVIDER_SERVECOMPACT_H
#define VD_PROVIDER_SERVECOMPACT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fuseserve.h"
#include "image.h"
#include "serveproto.h"
#include "virtdisk.h"

struct vd_serve_compact;

/* Starts compacting the server's image with COMPACT_VIRTUAL_DISK_FLAG flags
   on a thread of its own.  A read-only image is first replaced by a
   writable open of the same file, which takes the attachment's marker; the
   read-only open is closed. */
DWORD vd_serve_compact_start(struct vd_fuse_server *server, uint32_t flags, struct vd_serve_compact **out);

/* Progress and status (ERROR_IO_PENDING while running). */
void vd_serve_compact_state(struct vd_serve_compact *compact, struct vd_msg_operation_state *state, char *detail,
                            size_t size);

/* Whether the compaction still runs. */
bool vd_serve_compact_active(struct vd_serve_compact *compact);

/* Stops a running compaction and waits for it (ERROR_NOT_FOUND when it has
   ended already). */
DWORD vd_serve_compact_cancel(struct vd_serve_compact *compact);

/* Stops whatever still runs and frees. */
void vd_serve_compact_free(struct vd_serve_compact *compact);

#endif
