/*
 * Kernel loop devices: the Linux provider's attached disks.
 *
 * Promises:
 *   - vd_loop_attach() gives a device exactly as requested (file, offset,
 *     size limit, block size, read-only, autoclear, name) or none at all: on
 *     kernels with LOOP_CONFIGURE (5.8) one call sets everything; before
 *     that LOOP_SET_FD is followed by LOOP_SET_BLOCK_SIZE and
 *     LOOP_SET_STATUS64, the result is read back, and any failure unbinds
 *     the device again.  A lost allocation race (EBUSY: another attacher
 *     bound the device first) is retried with another device.  Direct I/O
 *     is a wish on both paths: where the kernel cannot do it, buffered I/O.
 *   - Without /dev/loop-control (a container given only /dev/loopN nodes),
 *     vd_loop_attach() takes a free pre-created /dev/loopN, with the same
 *     race handling.
 *   - Only on kernels before 5.8, and only if the process is killed between
 *     LOOP_SET_FD and LOOP_SET_STATUS64 (two ioctls apart), a device can stay
 *     bound without its size limit and autoclear: the kernel offers no way
 *     to close that window.
 *   - vd_loop_detach() either detaches synchronously or refuses: it never
 *     leaves the kernel's lazy "detach on last close" behind.
 *   - Nothing acts on a device by its number alone: a detach acts through a
 *     descriptor that this process held since the attach, or one that it
 *     checked shows the binding its lookup found (vd_loop_open_binding), so
 *     it never touches a binding another attacher made in between.
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
    uint64_t seq;            /* the binding's sequence number (see vd_loop_binding_seq) */
};

/* ERROR_SUCCESS when this process may attach and detach (CAP_SYS_ADMIN),
   else ERROR_PRIVILEGE_NOT_HELD with the detail naming what needed it. */
DWORD vd_loop_require_privilege(const char *what);

/* Test-only: with VIRTDISK_TEST_NO_LOOP_CONFIGURE=1 in the environment (read
   once per process) vd_loop_attach() acts as if LOOP_CONFIGURE answered
   ENOTTY, as kernels before 5.8 do, so the tests can run that path here. */
#define VD_LOOP_TEST_NO_CONFIGURE "VIRTDISK_TEST_NO_LOOP_CONFIGURE"

DWORD vd_loop_attach(const struct vd_loop_request *request, struct vd_loop *out);

/* The failure of a loop-device call on /dev/loopN ("<what> /dev/loopN: ..."),
   as ERROR_PRIVILEGE_NOT_HELD for EACCES and EPERM. */
DWORD vd_loop_fail_errno(int error, const char *what, int number);

/* What a lookup found: /dev/loopN mapping the file (dev, ino), which is the
   image for a disk mapped directly and the FUSE file for a served one, in
   the binding numbered seq (0: the kernel does not number bindings).  The
   number alone names nothing for long: the moment that binding ends, any
   attacher on the machine may bind /dev/loopN to its own file. */
struct vd_loop_binding {
    int number;
    uint64_t dev, ino;
    uint64_t seq;
};

/* Opens /dev/loopN (flags as for open(), O_CLOEXEC added) and checks on
   that descriptor that it shows the binding found: the same backing file
   and, when both are known, the same seq.  An open descriptor pins the
   binding it shows (another LOOP_CLR_FD then only sets autoclear), so
   whatever is done through it is done to that binding.  -1 with errno
   ESTALE when the device shows another binding, ENXIO when none. */
int vd_loop_open_binding(const struct vd_loop_binding *binding, int flags);

/* Detaches this process's own attachment on /dev/loopN, whose descriptor
   it holds in *held_fd (which pins it).  On success *held_fd is closed and
   set to -1; on refusal it is (or is replaced by) an open descriptor of the
   same binding again, so a refusal leaves the attachment as it was.
   Refuses with ERROR_DEVICE_IN_USE while the device is mounted or claimed,
   or stays open elsewhere for VD_LOOP_TRANSIENT_MS.  Success means the
   binding is gone, even when another attacher has bound the same number
   since; nothing ever touches another attacher's binding. */
DWORD vd_loop_detach(int number, int *held_fd);

/* Detaches the binding a lookup found (nobody in this process holds it),
   with vd_loop_detach()'s rules; acts only through a descriptor opened
   with vd_loop_open_binding(), so when that binding has ended since the
   lookup it answers ERROR_NOT_READY and touches nothing. */
DWORD vd_loop_detach_found(const struct vd_loop_binding *found);

/* The loop device whose backing file is (dev, ino), or -1 when none;
   *found (when not NULL) gets the binding it saw, read from sysfs without
   opening the device (an opener delays a detach). */
int vd_loop_find(dev_t dev, ino_t ino, struct vd_loop_binding *found);

/* Whether /dev/loopN is bound to a file (to any: see vd_loop_still_bound). */
bool vd_loop_is_bound(int number);

/* A device number names a binding only until it ends: the moment it does,
   any attacher on the machine may bind the same /dev/loopN to its own file.
   The kernel numbers bindings (diskseq, Linux 5.15: every bind and every
   unbind takes a new number), so "is my disk still there" asks for the
   number seen while it was ours.  vd_loop_binding_seq() reads it through a
   descriptor of the device (which pins the binding while it is read); 0
   means the kernel does not say, and then only the device number is
   compared, as before 5.15 nothing else can be. */
uint64_t vd_loop_binding_seq(int fd);

/* The binding seq of /dev/loopN as sysfs shows it now, without opening the
   device (an opener delays a detach); 0 when unknown. */
uint64_t vd_loop_current_seq(int number);

/* Whether /dev/loopN is still bound with binding seq (0: bound at all). */
bool vd_loop_still_bound(int number, uint64_t seq);

/* How long a detach, or the close of a non-permanent attachment, waits for
   other openers of the device that are only passing through (blkid, udev,
   lookups, attaches probing for a free device). */
enum { VD_LOOP_TRANSIENT_MS = 1000 };

/* Waits up to ms for the binding seq of /dev/loopN to end (0: for the
   device to be unbound); whether it did. */
bool vd_loop_wait_unbound(int number, uint64_t seq, int ms);

/* Whether /dev/loopN is bound to the file (dev, ino), asked of the device
   itself (LOOP_GET_STATUS64): exact also for a backing file that has no name
   any more, such as the file of a detached FUSE mount.  *seq (when not
   NULL) gets that binding's seq, read through the same descriptor. */
bool vd_loop_is_backed_by(int number, dev_t dev, ino_t ino, uint64_t *seq);

/* Calls visit(number, context) for every bound loop device that this provider
   attached (by its lo_file_name marker), in increasing order. */
void vd_loop_for_each_virtual_disk(void (*visit)(int number, void *context), void *context);

#endif
