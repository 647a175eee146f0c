/*
 * The compaction engine behind CompactVirtualDisk, for an image opened
 * writable, not attached, and used by nobody else.
 *
 * Promises:
 *   - The disk reads exactly as before, at the end and after a crash or a
 *     cancellation at any point: a block is only dropped where nothing
 *     changes (all zeros where the format can say zeros, or where the
 *     parent reads zeros too), and a block only moves into free space, is
 *     made durable there, and only then does the format point its table at
 *     the copy; the old place is reused or cut off only after that.
 *   - The file shrinks by the space dropped blocks and stale entries held,
 *     as far as moving the last blocks into the holes allows (unless
 *     NO_BLOCK_MOVES: then only free space at the end is cut off).  Either
 *     way a dropped block's space is punched out of the file (where its
 *     file system can), so the host has it back also where it stays a hole.
 *   - Progress: job->total is set once, before any work, and job->done
 *     rises to it on success.
 */
#ifndef VD_PROVIDER_COMPACT_H
#define VD_PROVIDER_COMPACT_H

#include "image.h"
#include "job.h"
#include "virtdisk.h"

/* flags: COMPACT_VIRTUAL_DISK_FLAG_NO_ZERO_SCAN, _NO_BLOCK_MOVES (checked by
   the caller).  image must be a dynamic or differencing disk whose format
   has the compact_* functions. */
DWORD vd_compact_image(struct vd_image *image, COMPACT_VIRTUAL_DISK_FLAG flags, struct vd_job *job);

#endif
