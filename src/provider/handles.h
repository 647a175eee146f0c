/*
 * Virtual disk handles (what OpenVirtualDisk and CreateVirtualDisk return)
 * and the per-process state of each disk they refer to.
 *
 * Promises:
 *   - Only values this module handed out are accepted as handles; anything
 *     else is refused without being dereferenced.
 *   - A handle stays valid for a call that acquired it even if another thread
 *     closes it meanwhile (the last release frees it).
 *   - Every open handle holds an open-file-description read lock on a byte
 *     far beyond any image's end, so any process can ask "are there other
 *     handles to this image?" with F_OFD_GETLK.
 *   - A disk attached without PERMANENT_LIFETIME by this process is detached
 *     when its last handle in this process closes, and by the kernel when the
 *     process dies (the attachment is an autoclear loop device held open);
 *     a FUSE server of such a disk then ends with it (fuseattach.h).
 */
#ifndef VD_PROVIDER_HANDLES_H
#define VD_PROVIDER_HANDLES_H

#include <stdbool.h>
#include <sys/types.h>

#include "fuseattach.h"
#include "image.h"
#include "job.h"
#include "virtdisk.h"

/* One per image file (device, inode) with open handles in this process. */
struct vd_disk {
    dev_t dev;
    ino_t ino;
    unsigned handle_count;
    int loop_number;        /* a non-permanent attachment made here, else -1 */
    int loop_fd;            /* held open to keep that attachment alive, else -1 */
    struct vd_served *served; /* its FUSE server when the image is not flat */
    struct vd_disk *next;
};

struct vd_handle {
    VIRTUAL_DISK_ACCESS_MASK access;
    struct vd_image *image;
    struct vd_disk *disk;
    unsigned users;         /* calls in progress plus one while open */
    struct vd_job *jobs;    /* asynchronous operations started on it (job.h) */
    ULONG rw_depth;         /* OPEN_VIRTUAL_DISK_PARAMETERS' RWDepth: how many
                               disks of the chain, from the leaf, the handle
                               may change (1 unless OpenVirtualDisk said) */
    struct vd_handle *next;
};

/* Registers an opened image as a new handle (taking ownership of image). */
DWORD vd_handle_create(struct vd_image *image, VIRTUAL_DISK_ACCESS_MASK access, HANDLE *out);

/* Looks up handle for the duration of a call: NULL when it is not a live
   handle of this provider.  Pair with vd_handle_release(). */
struct vd_handle *vd_handle_acquire(HANDLE handle);
void vd_handle_release(struct vd_handle *handle);

/* One more reference to a handle the caller already holds one to (an
   operation outliving the call that started it), even if it has been
   closed meanwhile.  Pair with vd_handle_release(). */
void vd_handle_retain(struct vd_handle *handle);

/* Serialises attach/detach decisions about disks within this process. */
void vd_disks_lock(void);
void vd_disks_unlock(void);

/* Attachments are marked the same way: the loop device's own open file
   description of the image carries a lock on a second byte, which lives
   exactly as long as the kernel holds the file, in whatever process
   attached it.  vd_mark_attached() sets it on the descriptor about to be
   given to the loop device; vd_image_is_attached() asks, in O(1). */
DWORD vd_mark_attached(int backing_fd);
bool vd_image_is_attached(const struct vd_image *image);

/* Whether a handle other than this one (in any process) is open on the same
   image file. */
bool vd_handle_has_others(const struct vd_handle *handle);

/* Whether any handle (in any process) is open on the image file, which is
   not itself opened as a handle (a parent in a chain). */
bool vd_image_has_handles(const struct vd_image *image);

#endif
