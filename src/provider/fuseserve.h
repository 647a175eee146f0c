/*
 * Serving a virtual disk's flat bytes as one file on a private FUSE mount
 * (libfuse3, low-level API), so that a loop device can be attached on it: the
 * way to a block device for images the kernel cannot map directly (dynamic,
 * differencing, non-contiguous VHDX), on a kernel with loop and FUSE only.
 *
 * Promises:
 *   - The file is [0, virtual_size) of the disk, read and written through
 *     image->format->read()/write() only; a read-only server refuses every
 *     open for writing (EROFS) and never calls write().
 *   - The server runs in threads of the calling process, with every signal
 *     blocked, and never takes a lock of the handle registry (handles.c), so
 *     a caller holding one may do I/O on the disk.
 *   - fsync() of the file, and the end of the session, flush the image
 *     (format->flush, else fdatasync); vd_fuse_wait() reports that flush.
 *   - The mount lives in a fresh directory in the run directory (rundir.h).  After
 *     vd_fuse_hide() it is gone from the mount namespace, yet lives on as
 *     long as something (the loop device) holds the file; the kernel ends
 *     the session when the last holder lets go, and the server then ends by
 *     itself.  Nothing is left behind however the process ends: /dev/fuse
 *     closing aborts the session, and a hidden mount has no name to leak.
 *   - One /dev/fuse descriptor per server (no clone_fd), so that a process
 *     can arrange when it is released at exit (vd_fuse_device_fd()).
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

/* The server's /dev/fuse descriptor. */
int vd_fuse_device_fd(const struct vd_fuse_server *server);

/* Opens the served file for the loop device (O_CLOEXEC; O_RDWR when writable,
   else O_RDONLY): a new descriptor, or -1 with the failure recorded in
   *status. */
int vd_fuse_open_disk(struct vd_fuse_server *server, bool writable, DWORD *status);

/* Detaches the mount from the namespace (MNT_DETACH) and removes its
   directory: from now on the session ends when the last open file of it is
   released.  Idempotent. */
DWORD vd_fuse_hide(struct vd_fuse_server *server);

/* Waits up to timeout_ms for the session to end, then frees the server and
   returns the final flush's status.  ERROR_BUSY: still serving (the
   server stays valid: wait again, or abandon it). */
DWORD vd_fuse_wait(struct vd_fuse_server *server, int timeout_ms);

/* Waits for the session to end, however long, then frees the server and
   returns the final flush's status. */
DWORD vd_fuse_wait_end(struct vd_fuse_server *server);

/* The mount folder (valid while the server is). */
const char *vd_fuse_mount_dir(const struct vd_fuse_server *server);

/* Leaves a hidden server to end by itself when the kernel ends its session;
   it frees itself then.  The caller must not use it any more. */
void vd_fuse_abandon(struct vd_fuse_server *server);

#endif
