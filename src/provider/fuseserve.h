/*
 * Serving a virtual disk's flat bytes as one file on a FUSE mount that no
 * process sees (libfuse3, low-level API), so that a loop device can be attached on it: the
 * way to a block device for images the kernel cannot map directly (dynamic,
 * differencing, non-contiguous VHDX), on a kernel with loop and FUSE only.
 *
 * Promises:
 *   - The file is [0, virtual_size) of the disk, read and written through
 *     image->format->read()/write() only; a read-only server refuses every
 *     open for writing (EROFS) and never calls write().
 *   - The server runs in threads of the calling process, with every signal
 *     blocked.  That process must never open the mount itself: a process
 *     waiting on its own FUSE mount cannot die once its server threads are
 *     gone.  The serving helper (helper.h) is the only caller.
 *   - The file's st_blocks counts the bytes where some layer of the chain
 *     holds data (servealloc.h): the data extents lseek(SEEK_DATA/SEEK_HOLE)
 *     shows, kept as requests change them.
 *   - fsync() of the file, and the end of the session, flush the image
 *     (format->flush, else fdatasync); vd_fuse_wait_end() reports that flush.
 *   - The mount is made in a mount namespace of the calling process's own,
 *     private, on a fresh folder mnt.<pid>.<random> of the run directory
 *     (rundir.h), and detached (MNT_DETACH) before the process returns to
 *     its own namespace: no other process can see, copy or bind it, and
 *     nothing of it propagates.  What is left is a descriptor of its root
 *     (vd_fuse_root()); files are opened relative to it.  The kernel ends
 *     the session when that descriptor is let go of (vd_fuse_let_go()) and
 *     the last file opened through it (the loop device's) is released; the
 *     server then ends by itself.  Where no namespace can be made (unshare
 *     refused), the mount is made in the caller's namespace and detached as
 *     quickly, and libfuse's log says so.
 *   - The caller has one thread when it calls vd_fuse_serve() (setns()
 *     needs it); the server's threads start afterwards.
 *   - One /dev/fuse descriptor per server (no clone_fd), opened close-on-exec
 *     and never duplicated: when the serving process dies, the connection is
 *     aborted, and I/O on the file fails with EIO instead of waiting.
 */
#ifndef VD_PROVIDER_FUSESERVE_H
#define VD_PROVIDER_FUSESERVE_H

#include <stdbool.h>

#include "image.h"
#include "virtdisk.h"

/* The file that shows the disk, in the mount folder. */
#define VD_FUSE_DISK_NAME "disk"

struct vd_fuse_server;

/* Mounts a server for image and starts serving.  The server owns image from
   here on, also when this fails.  writable: whether the file may be opened
   for writing (image must then be writable). */
DWORD vd_fuse_serve(struct vd_image *image, bool writable, struct vd_fuse_server **out);

/* The image being served (to mark it attached, to name it). */
struct vd_image *vd_fuse_image(const struct vd_fuse_server *server);

/* Whether the file may be opened for writing (a read-write attachment):
   fixed for the server's life, whatever image it serves. */
bool vd_fuse_writable(const struct vd_fuse_server *server);

/* The mount's root directory (an O_PATH descriptor, in no namespace), to
   open VD_FUSE_DISK_NAME relative to, or to pass to the process that does;
   -1 once let go of. */
int vd_fuse_root(const struct vd_fuse_server *server);

/* Closes the root's descriptor: from now on the session ends when the last
   file opened through it is released.  Idempotent. */
void vd_fuse_let_go(struct vd_fuse_server *server);

/* Waits for the session to end, however long, then frees the server and
   returns the final flush's status. */
DWORD vd_fuse_wait_end(struct vd_fuse_server *server);

/* A second destination for the disk's writes (a mirror, servemirror.h).
   While a tap is set, every write and flush goes through it instead of to
   the served image alone; the tap writes the served image itself, so that
   it can order each write's two halves against its own copying. */
struct vd_fuse_tap {
    DWORD (*write)(struct vd_fuse_tap *tap, struct vd_image *image, const void *buffer, uint64_t offset,
                   size_t length);
    /* after the served image's own flush */
    DWORD (*flush)(struct vd_fuse_tap *tap);
};

/* Sets (or with NULL clears) the tap.  Returns once no write or flush that
   started before is still running, so that from then on every write goes
   through the new tap (or none). */
void vd_fuse_set_tap(struct vd_fuse_server *server, struct vd_fuse_tap *tap);

/* Serves image instead of the present one (of the same size and sector
   size) from the next request on, clearing the tap, and returns the image
   it replaced, for the caller to close.  As vd_fuse_set_tap(), it waits
   for the requests in flight. */
struct vd_image *vd_fuse_replace_image(struct vd_fuse_server *server, struct vd_image *image);

/* Counts anew what the file reports as allocated (st_blocks: servealloc.h)
   and has the kernel forget its copy: after a change of the image's block
   table that went around the server's requests (a compaction). */
void vd_fuse_recount(struct vd_fuse_server *server);

/* Called once when the session has ended, before the final flush and the
   served image's close: whatever uses the image from outside the server's
   requests (an operation's thread) must stop using it then. */
void vd_fuse_set_end_hook(struct vd_fuse_server *server, void (*hook)(void *context), void *context);

#endif
