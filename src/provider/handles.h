/*
 * Virtual disk handles (what OpenVirtualDisk and CreateVirtualDisk return)
 * and the per-process state of each disk they refer to.
 *
 * Promises:
 *   - Only values this module handed out are accepted as handles; anything
 *     else is refused without being dereferenced.
 *   - A handle stays valid for a call that acquired it even if another thread
 *     closes it meanwhile (the last release frees it).
 *   - Every open handle holds a HANDLE claim (share.h), so any privileged
 *     process can ask "are there other handles to this image?"; a handle
 *     opened for writing also holds its image's WRITE claim (in the same
 *     claim: one lock-file open and one mutex round per open), and every
 *     handle holds its parents read-only, for as long as it is open.
 *   - A disk attached without PERMANENT_LIFETIME by this process is detached
 *     when its last handle in this process closes, and by the kernel when the
 *     process dies (the attachment is an autoclear loop device held open, or
 *     a serving helper's channel: fuseattach.h).
 *   - Handles are per process, as on Windows: in a forked child every
 *     inherited handle is refused with ERROR_INVALID_HANDLE and a detail that
 *     says so, and the child holds none of the parent's attachments or claims
 *     (their descriptors are closed at fork), so it neither keeps them alive nor
 *     ends them.  CloseHandle of an inherited handle frees the child's copy
 *     and touches nothing else.
 */
#ifndef VD_PROVIDER_HANDLES_H
#define VD_PROVIDER_HANDLES_H

#include <stdbool.h>
#include <stdint.h>
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
    int loop_fd;            /* held open to keep a direct attachment alive, else -1 */
    uint64_t loop_seq;      /* that device's binding (loopdev.h), 0 when unknown */
    struct vd_served *served; /* the helper's channel when the image is served */
    int attach_claim;       /* that attachment's ATTACH claim (share.h), else -1 */
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
    bool inherited;         /* copied into a forked child: the parent's, unusable here */
    pid_t owner;            /* when inherited: the process that opened it */
    uint32_t served_serial; /* the last operation it started in a disk's
                               server (servedop.h), which its close cancels;
                               0: none */
    struct vd_handle *next;
};

/* Registers an opened image as a new handle (taking ownership of image,
   also on failure): claims its handle and the image's chain (share.h), and
   refuses write access to an attached image (ERROR_SHARING_VIOLATION). */
DWORD vd_handle_create(struct vd_image *image, VIRTUAL_DISK_ACCESS_MASK access, HANDLE *out);

/* Looks up handle for the duration of a call: NULL when it is not a live
   handle of this provider.  Pair with vd_handle_release(). */
struct vd_handle *vd_handle_acquire(HANDLE handle);
void vd_handle_release(struct vd_handle *handle);

/* One more reference to a handle the caller already holds one to (an
   operation outliving the call that started it), even if it has been
   closed meanwhile.  Pair with vd_handle_release(). */
void vd_handle_retain(struct vd_handle *handle);
/* Records why vd_handle_acquire(value) found nothing: the handle belongs to
   the parent of this forked process (ERROR_INVALID_HANDLE), or it is no
   handle at all (code).  Returns the code recorded. */
DWORD vd_handle_refuse(HANDLE value, DWORD code);

/* Serialises attach/detach decisions about disks within this process. */
void vd_disks_lock(void);
void vd_disks_unlock(void);

/* The loop device showing this handle's disk: this process's own
   non-permanent attachment, or one made by any process (share.h), else -1;
   *helper tells whether a helper process serves it. */
int vd_handle_attached_loop(const struct vd_handle *handle, bool *helper);

/* vd_handle_attached_loop(), and *found gets the binding seen
   (vd_share_attached_binding); for this process's own attachment only its
   number and seq: its held descriptor is what pins it. */
int vd_handle_attached_binding(const struct vd_handle *handle, bool *helper, struct vd_loop_binding *found);

/* This process's disk whose own non-permanent attachment is /dev/loop
   number (a break may have moved it to another image file: servemirror.h),
   else NULL.  Called under vd_disks_lock(). */
struct vd_disk *vd_disk_attached_as(int number);

/* Whether a handle other than this one (in any process) is open on the same
   image file. */
bool vd_handle_has_others(const struct vd_handle *handle);

/* Whether image, a parent in this process's chain of a handle, is used
   elsewhere: open as a handle, or held as a parent by another chain or
   attachment (share.h), in any process. */
bool vd_image_has_handles(const struct vd_image *image);

#endif
