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
 *     named after the image file's device and inode, so they follow the file
 *     whatever path opens it.  A user who cannot manage loop devices cannot
 *     open them: such a process makes no claims and cannot take, fake or
 *     block anyone's, and sees none (its opens are checked only by file
 *     permissions; it cannot attach or detach anyway).
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

/* Removes the lock file of the image file (dev, ino) when no claim is left
   on it, so that the run directory does not grow by a file for every image
   ever opened; for whoever has just ended the last claims it knows of. */
void vd_share_forget(dev_t dev, ino_t ino);

/* The links of a chain whose lock files a closing handle removes at once
   (deeper ones go at the run directory's next clean-up); formats open at
   most 64. */
enum { VD_SHARE_MAX_CHAIN = 80 };

/* Removes the lock file name in the run directory dir when no claim is on
   it (one a killed process left); for the run directory's clean-up. */
void vd_share_remove_if_unclaimed(int dir, const char *name);

/* Whether a claim other than the one on fd holds (denies) perm; false for
   fd -1. */
bool vd_share_held_elsewhere(int fd, unsigned perm);
bool vd_share_denied_elsewhere(int fd, unsigned perm);

/* The claims an opened image and its differencing chain make for as long
   as they are open: a writable image holds WRITE and denies WRITE (one
   writer); every parent denies WRITE (it is read through the child).  The
   descriptors go to image->share_fd and each parent's, closed by
   vd_image_close().  except_fd as for vd_share_claim(); on failure nothing
   is claimed. */
DWORD vd_share_open_chain(struct vd_image *image, int except_fd);

/* Marks an open file description of the image, about to be held by a loop
   device or a FUSE server, as that attachment's. */
DWORD vd_share_mark_attached(int image_fd);

/* The loop device showing image when some process or the kernel attached
   it (a verified marker), else -1; *helper tells whether a helper process
   serves it (a permanent FUSE attachment). */
int vd_share_attached_loop(const struct vd_image *image, bool *helper);

/* For a caller about to claim the image: a non-permanent attachment that no
   process holds any more (its last handle has closed, but a passing opener
   of the device delays the kernel's teardown, and with it the end of its
   server's claims) is waited for, up to two seconds; so is a marker with no
   device behind it (a served attachment's helper, whose device is gone,
   lets go of its claims before its marker). */
void vd_share_settle(const struct vd_image *image);

#endif
