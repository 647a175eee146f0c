/*
 * Sharing: which handles, attachments and differencing chains may use an
 * image at the same time, across processes.  Windows enforces this with the
 * sharing modes of the image files it opens; here every user of an image
 * publishes what it holds and what it denies others, on the model of QEMU's
 * file-posix permission bytes, and checks for conflicts in the same step.
 *
 * Promises:
 *   - A claim is a set of held and a set of denied permissions on one image
 *     file, published as open-file-description read locks on bytes of a lock
 *     file.  It lives exactly as long as its descriptor's open file
 *     description: closing the last copy, or the process dying, ends it; an
 *     inherited or duplicated copy keeps it.
 *   - vd_share_claim() checks and publishes under the image's claim mutex, so
 *     of N processes making conflicting claims at once exactly one succeeds;
 *     the others get ERROR_SHARING_VIOLATION, with a detail naming the
 *     conflict, and publish nothing.  The mutex is held only for that step,
 *     and waited for a bounded time.
 *   - Lock files live in the run directory (rundir.h: root's, mode 0700),
 *     named after the image file's device, inode and birth time (statx; 0
 *     where the file system keeps none), so they follow the file whatever
 *     path opens it, and a claim that outlives its image file (a helper's,
 *     after the image was deleted) is not taken for one on a new file that
 *     got the same inode.  A user who cannot manage loop devices cannot
 *     open them: such a process makes no claims and cannot take, fake or
 *     block anyone's, and sees none (its opens are checked only by file
 *     permissions; it cannot attach or detach anyway).
 *   - A lock file outlives its claims, so that opening an image again costs
 *     one open of it, not a create and an unlink.  The run directory stays
 *     bounded all the same: every process that creates a lock file counts
 *     it in the directory's shared count (VD_SHARE_COUNTER), and whichever
 *     brings the count to VD_SHARE_SWEEP_EVERY resets it and sweeps; so
 *     does the run directory's clean-up (servrecord.h) on every list and
 *     attach.  A sweep removes the lock files no claim is on that were
 *     there at the previous sweep (one created since may be about to be
 *     used again).  So the directory holds the lock files of live claims
 *     plus fewer than 2 * VD_SHARE_SWEEP_EVERY others (give or take those
 *     created during a sweep).  A lock file is removed only under its
 *     mutex with no claim on it; a claimant that opened it just before sees
 *     it unlinked once it holds the mutex, and opens the name anew.
 *   - "Attached" is the kernel's fact, not a claim: the open file
 *     description a loop device (or its FUSE server) holds on the image
 *     carries a marker lock, which lives exactly as long as the attachment;
 *     since any reader of the image could lock the same byte, a marker only
 *     says "look": vd_share_attached_loop() believes it only when a loop
 *     device (or a root-owned serving record) confirms it.
 */
#ifndef VD_PROVIDER_SHARE_H
#define VD_PROVIDER_SHARE_H

#include <stdbool.h>
#include <sys/types.h>

#include "image.h"
#include "loopdev.h"
#include "virtdisk.h"

/* Permissions, as bits of a claim's hold and deny sets. */
enum {
    VD_SHARE_HANDLE = 1u << 0, /* an open handle (held by every handle, denied by nobody) */
    VD_SHARE_WRITE = 1u << 1,  /* the image open for writing */
    VD_SHARE_ATTACH = 1u << 2, /* attaching, or attached and held by a process */
};

/* Claims hold and deny on image's file, checked against every other claim
   except the one published on except_fd (the claim of the handle acting,
   -1 for none).  what names the claimant in a conflict's detail ("a
   handle with write access").  *fd is the claim's descriptor (the caller
   closes it to end the claim), or -1 when this process cannot make claims
   (see above). */
DWORD vd_share_claim(const struct vd_image *image, unsigned hold, unsigned deny, int except_fd, const char *what,
                     int *fd);

/* Lock files created, by all processes together, between two sweeps. */
enum { VD_SHARE_SWEEP_EVERY = 1024 };

/* Removes from the run directory dir the lock files no claim is on that
   were already there at the previous sweep; for the run directory's
   clean-up, and the creator of every VD_SHARE_SWEEP_EVERY-th lock file. */
void vd_share_sweep(int dir);

/* Whether a claim other than the one on fd holds (denies) perm; false for
   fd -1. */
bool vd_share_held_elsewhere(int fd, unsigned perm);
bool vd_share_denied_elsewhere(int fd, unsigned perm);

/* The claims an opened image and its differencing chain make for as long
   as they are open: the image holds hold (a handle's HANDLE) and, when
   writable, holds and denies WRITE (one writer), all in one claim; every
   parent denies WRITE (it is read through the child).  The descriptors go
   to image->share_fd (-1 when the image claims nothing) and each parent's,
   closed by vd_image_close().  except_fd as for vd_share_claim(); on
   failure nothing is claimed. */
DWORD vd_share_open_chain(struct vd_image *image, unsigned hold, int except_fd);

/* Ends the claims vd_share_open_chain() made (each closed, set to -1). */
void vd_share_end_chain(struct vd_image *image);

/* A claim of its own for what an opened writable image's claim holds
   besides its handle (WRITE, held and denied), for a process that keeps
   an attachment's claims after the handle has closed; *fd -1 when the
   image is not writable or claims nothing. */
DWORD vd_share_claim_writer(const struct vd_image *image, int *fd);

/* Marks an open file description of the image, about to be held by a loop
   device or a FUSE server, as that attachment's. */
DWORD vd_share_mark_attached(int image_fd);

/* The loop device showing image when some process or the kernel attached
   it (a verified marker), else -1; *helper tells whether a helper process
   serves it (a permanent FUSE attachment). */
int vd_share_attached_loop(const struct vd_image *image, bool *helper);

/* vd_share_attached_loop(), and *found gets the binding seen: what a
   caller that acts on the device must check it still shows
   (vd_loop_open_binding), since the number may be another attacher's by
   then.  Only a lookup's answer: nothing here pins the binding. */
int vd_share_attached_binding(const struct vd_image *image, bool *helper, struct vd_loop_binding *found);

/* For a caller about to claim the image: a non-permanent attachment that no
   process holds any more (its last handle has closed, but a passing opener
   of the device delays the kernel's teardown, and with it the end of its
   server's claims) is waited for, up to two seconds; so is a marker with no
   device behind it (a served attachment's helper, whose device is gone,
   lets go of its claims before its marker). */
void vd_share_settle(const struct vd_image *image);

#endif
