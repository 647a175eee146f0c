/*
 * Kernel loop devices: the Linux provider's attached disks.
 *
 * Promises:
 *   - vd_loop_attach() never shows a half-configured device: one
 *     LOOP_CONFIGURE call sets file, offset, size limit, block size and flags,
 *     and a lost allocation race (EBUSY) is retried with a new device.
 *   - vd_loop_detach() either detaches synchronously or refuses: it never
 *     leaves the kernel's lazy "detach on last close" behind.
 *   - Lookups go through sysfs and need no privilege; attach and detach need
 *     CAP_SYS_ADMIN and answer ERROR_PRIVILEGE_NOT_HELD without it, before
 *     touching any device.
 */
#ifndef VD_PROVIDER_LOOPDEV_H
#define VD_PROVIDER_LOOPDEV_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "virtdisk.h"

/* Written into lo_file_name so that the provider's own attachments can be
   told apart from other loop devices (GetAllAttachedVirtualDiskPhysicalPaths). */
#define VD_LOOP_NAME_PREFIX "virtdisk:"

struct vd_loop_request {
    int backing_fd;          /* the file to map; O_RDONLY forces a read-only device */
    uint64_t offset;         /* first byte of the disk in the file */
    uint64_t size;           /* bytes of the disk */
    uint32_t block_size;     /* logical sector size: 512, 2048 or 4096 */
    bool read_only;
    bool autoclear;          /* detach when the last opener closes */
    bool direct_io;          /* the device reads and writes the file with O_DIRECT */
    const char *name;        /* the image path, for lo_file_name (cosmetic) */
};

struct vd_loop {
    int number;              /* N of /dev/loopN */
    int fd;                  /* /dev/loopN, open O_RDWR or O_RDONLY */
};

/* ERROR_SUCCESS when this process may attach and detach (CAP_SYS_ADMIN),
   else ERROR_PRIVILEGE_NOT_HELD with the detail naming what needed it. */
DWORD vd_loop_require_privilege(const char *what);

DWORD vd_loop_attach(const struct vd_loop_request *request, struct vd_loop *out);

/* Detaches /dev/loopN.  held_fd points to a descriptor of the device that
   the caller holds (a non-permanent attachment's), or is NULL.  On success
   it is closed and set to -1; on refusal it is (or is replaced by) an open
   descriptor again, so a refusal leaves the attachment as it was.
   Refuses with ERROR_DEVICE_IN_USE while the device is mounted, claimed or
   open anywhere else. */
DWORD vd_loop_detach(int number, int *held_fd);

/* The loop device whose backing file is (dev, ino), or -1 when none. */
int vd_loop_find(dev_t dev, ino_t ino);

/* Whether /dev/loopN is bound to a file. */
bool vd_loop_is_bound(int number);

/* Whether /dev/loopN is bound to the file (dev, ino), asked of the device
   itself (LOOP_GET_STATUS64): exact also for a backing file that has no name
   any more, such as the file of a detached FUSE mount. */
bool vd_loop_is_backed_by(int number, dev_t dev, ino_t ino);

/* Calls visit(number, context) for every bound loop device that this provider
   attached (by its lo_file_name marker), in increasing order. */
void vd_loop_for_each_virtual_disk(void (*visit)(int number, void *context), void *context);

#endif
