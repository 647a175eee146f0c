/*
 * Attaching images that cannot be loop-mapped directly (dynamic,
 * differencing, non-contiguous VHDX): a serving helper (helper.h) shows the
 * virtual disk as one file through FUSE (fuseserve.h) and attaches a loop
 * device on that file, so the physical path is still /dev/loopN.  This is
 * the attacher's side.
 *
 * Promises:
 *   - No FUSE server runs in the calling process: every served attachment,
 *     permanent or not, is served by a helper started with fork and exec.
 *   - Same lifetime as a direct attachment.  Without PERMANENT_LIFETIME the
 *     caller holds the helper's control channel (struct vd_served): the
 *     attachment ends when it closes (vd_served_end(), or the process dying),
 *     leaving no loop device and no mount.  With it, the helper holds the
 *     device until a DetachVirtualDisk from any privileged process asks it to
 *     (vd_served_detach()), or until it is killed.
 *   - The helper opens the image anew (its own open file descriptions) and
 *     that descriptor carries the "attached" marker (handles.h), so IS_LOADED
 *     and "already attached" answer as for a direct attachment; differencing
 *     parents are opened read-only; a read-only attachment never writes the
 *     image.
 *   - Every attachment is recorded in the run directory (servrecord.h), so
 *     that any process finds the loop device of an image (vd_served_find()).
 *   - A detach reports success only once the loop device is gone, the image
 *     is flushed and closed, and the server has ended.
 */
#ifndef VD_PROVIDER_FUSEATTACH_H
#define VD_PROVIDER_FUSEATTACH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "image.h"
#include "loopdev.h"
#include "virtdisk.h"

struct vd_served;

/* Attaches image (a handle's) through a helper; *number is the loop
   device.  Non-permanent: *out is the control channel to hold.  Permanent:
   *out is NULL. */
DWORD vd_served_attach(const struct vd_image *image, bool read_only, bool permanent, int attach_claim,
                       int *number,
                       struct vd_served **out);

/* The disk's last handle closed: lets go of a non-permanent attachment as
   closing an autoclear device would, and frees served.  Returns the final
   flush's status when the device is gone; success when something else still
   holds it (the helper then serves until it lets go). */
DWORD vd_served_end(struct vd_served *served);

/* Detaches this process's non-permanent attachment with vd_loop_detach()'s
   rules: on success served is freed; on refusal it stays as it was. */
DWORD vd_served_detach_own(struct vd_served *served);

/* In a forked child: drops the inherited channel without a word, so that
   the child neither keeps nor ends the parent's attachment.  Only
   async-signal-safe calls; served is not freed. */
void vd_served_forget(struct vd_served *served);

/* The loop device of a FUSE attachment of image made by any process, or -1.
   *helper tells whether the helper takes detach requests (a permanent one).
   *found (when not NULL) gets the binding seen: the device maps the
   server's FUSE file, not the image. */
int vd_served_find(const struct vd_image *image, bool *helper, struct vd_loop_binding *found);

/* Detaches the image's permanent attachment through its helper's socket. */
DWORD vd_served_detach(const struct vd_image *image);

/* Sends one request about an operation in the disk's server (serveproto.h:
   OPERATION_*, BREAK_MIRROR) and receives the answer: over served's
   channel when this process holds one (not NULL; the caller serialises
   its use, as for every request on it), else over the socket of the
   permanent helper serving image.  ERROR_SUCCESS: an answer came
   (*reply_type and the payload say what); else why none did. */
DWORD vd_served_request(struct vd_served *served, const struct vd_image *image, uint16_t type, const void *payload,
                        size_t length, uint16_t *reply_type, void *reply, size_t capacity, size_t *reply_length);

#endif
