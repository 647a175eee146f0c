/*
 * Attaching images that cannot be loop-mapped directly (dynamic,
 * differencing, non-contiguous VHDX): a FUSE server (fuseserve.h) shows the
 * virtual disk as one file, and a loop device is attached on that file, so
 * the physical path is still /dev/loopN.
 *
 * Promises:
 *   - Same lifetime as a direct attachment.  Without PERMANENT_LIFETIME the
 *     server runs in threads of the attaching process and the loop device
 *     is autoclear and held by that process: the attachment ends when the
 *     caller closes the loop descriptor (then vd_served_end()), or when the
 *     process dies, leaving no loop device and no mount.  With it, a helper
 *     process (forked, C only, never returning into the caller's runtime)
 *     serves and holds the loop device, logs to <run dir>/<id>.log (rundir.h), and
 *     ends only when a DetachVirtualDisk asks it to (vd_served_detach()) or
 *     when it is killed, again leaving no loop device and no mount.
 *   - The server opens the image anew (its own open file descriptions), and
 *     that descriptor carries the "attached" marker (share.h), so
 *     IS_LOADED and "already attached" answer as for a direct attachment;
 *     differencing parents are opened read-only; a read-only attachment
 *     never writes the image.  The server's image and parents carry its
 *     sharing claims (share.h) for as long as it serves, in a helper too.
 *   - Every attachment is recorded in <run dir>/<dev>-<ino>.json (image
 *     identity, loop device, serving process), so that any process finds the
 *     loop device of an image (vd_served_find()); a record is trusted only
 *     while its loop device is still bound to its FUSE file.
 *   - A detach reports success only once the loop device is gone, the image
 *     is flushed and closed, and the server has ended.
 */
#ifndef VD_PROVIDER_FUSEATTACH_H
#define VD_PROVIDER_FUSEATTACH_H

#include <stdbool.h>

#include "image.h"
#include "loopdev.h"
#include "virtdisk.h"

struct vd_served;

/* Attaches image (a handle's) through FUSE.  Non-permanent: *out is the
   in-process server and *loop the held autoclear device.  Permanent: the
   helper holds the device, *out is NULL and loop->fd is -1. */
DWORD vd_served_attach(const struct vd_image *image, bool read_only, bool permanent, struct vd_loop *loop,
                       struct vd_served **out);

/* Ends an in-process attachment whose loop descriptor the caller has just
   closed (a detach or the last handle closing): when the device is gone,
   waits for the server to flush and end, and returns that flush's status;
   when something else still holds the device, the server keeps serving
   until it lets go, and ends by itself. */
DWORD vd_served_end(struct vd_served *served, int number);

/* The loop device of a FUSE attachment of image made by any process, or -1.
   *helper tells whether a helper process serves it (a permanent one). */
int vd_served_find(const struct vd_image *image, bool *helper);

/* Detaches the image's permanent attachment: the helper detaches its loop
   device with vd_loop_detach()'s rules (refusal while in use), flushes and
   closes the image, and exits; returns once it has exited. */
DWORD vd_served_detach(const struct vd_image *image);

#endif
