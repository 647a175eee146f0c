/*
 * Loop devices: lookups and detach (see loopdev.h; attaching is
 * loopattach.c).  Kernel facts this relies on, tested on 6.18
 * (shared/linux-provider-notes.md §1): the capacity is
 * min(file - offset, sizelimit); LOOP_CLR_FD returns 0 even when another
 * opener keeps the device bound (it only sets autoclear), so "detached" has
 * to be checked, and "in use" has to be checked before.
 */
#define _GNU_SOURCE
#include "loopdev.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/loop.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "errors.h"

#ifndef BLKGETDISKSEQ
#define BLKGETDISKSEQ _IOR(0x12, 128, uint64_t) /* <linux/fs.h>, Linux 5.15 */
#endif

DWORD vd_loop_fail_errno(int error, const char *what, int number)
{
    if (error == EACCES || error == EPERM)
        return vd_fail(ERROR_PRIVILEGE_NOT_HELD,
                       "%s /dev/loop%d: managing loop devices needs root (CAP_SYS_ADMIN): %s",
                       what, number, strerror(error));
    return vd_fail_errno(error, "%s /dev/loop%d", what, number);
}

DWORD vd_loop_require_privilege(const char *what)
{
    int state = VD_PRIVILEGE_ABSENT;
    if (vd_manage_volume_privilege_state(&state) == ERROR_SUCCESS && state == VD_PRIVILEGE_ENABLED)
        return ERROR_SUCCESS;
    return vd_fail(ERROR_PRIVILEGE_NOT_HELD, "%s needs CAP_SYS_ADMIN (run as root), the "
                   "counterpart of Windows' SeManageVolumePrivilege", what);
}

static void vd_loop_path(int number, char *path, size_t size)
{
    snprintf(path, size, "/dev/loop%d", number);
}

static bool vd_read_sysfs(const char *path, char *buffer, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    ssize_t n = read(fd, buffer, size - 1);
    close(fd);
    if (n < 0)
        return false;
    buffer[n] = '\0';
    while (n > 0 && buffer[n - 1] == '\n')
        buffer[--n] = '\0';
    return true;
}

bool vd_loop_is_bound(int number)
{
    char path[64];
    struct stat st;
    snprintf(path, sizeof path, "/sys/block/loop%d/loop", number);
    return stat(path, &st) == 0;
}

uint64_t vd_loop_binding_seq(int fd)
{
    uint64_t seq = 0;
    if (ioctl(fd, BLKGETDISKSEQ, &seq) < 0)
        return 0;
    return seq;
}

uint64_t vd_loop_current_seq(int number)
{
    char path[64], text[32];
    snprintf(path, sizeof path, "/sys/block/loop%d/diskseq", number);
    if (!vd_read_sysfs(path, text, sizeof text))
        return 0;
    return strtoull(text, NULL, 10);
}

bool vd_loop_still_bound(int number, uint64_t seq)
{
    if (!vd_loop_is_bound(number))
        return false;
    /* Bound, but maybe by someone else already: the unbind took a new
       sequence number, and so did the next bind.  An unreadable one says
       nothing either way. */
    uint64_t now = seq ? vd_loop_current_seq(number) : 0;
    return now == 0 || now == seq;
}

bool vd_loop_wait_unbound(int number, uint64_t seq, int ms)
{
    /* sysfs, not the device node: opening /dev/loopN would itself be one of
       the openers being waited for. */
    long waited_us = 0, step_us = 1000;
    while (vd_loop_still_bound(number, seq)) {
        if (waited_us >= ms * 1000L)
            return false;
        struct timespec pause = {0, step_us * 1000};
        nanosleep(&pause, NULL);
        waited_us += step_us;
        if (step_us < 20000)
            step_us *= 2;
    }
    return true;
}

/* Calls visit for each /sys/block/loopN that is bound; stops when visit
   returns true.  Returns the number visit stopped at, or -1. */
static int vd_loop_scan(bool (*visit)(int number, void *context), void *context)
{
    DIR *dir = opendir("/sys/block");
    if (!dir)
        return -1;
    int found = -1;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        int number;
        char tail;
        if (sscanf(entry->d_name, "loop%d%c", &number, &tail) != 1)
            continue;
        if (vd_loop_is_bound(number) && visit(number, context)) {
            found = number;
            break;
        }
    }
    closedir(dir);
    return found;
}

/* LOOP_GET_STATUS64 of /dev/loopN; false when it is not there or not bound.
   *seq (when not NULL) gets the seq of the binding that answered. */
static bool vd_loop_status(int number, struct loop_info64 *info, uint64_t *seq)
{
    char path[32];
    vd_loop_path(number, path, sizeof path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    bool bound = ioctl(fd, LOOP_GET_STATUS64, info) == 0;
    if (bound && seq)
        *seq = vd_loop_binding_seq(fd);
    close(fd);
    return bound;
}

bool vd_loop_is_backed_by(int number, dev_t dev, ino_t ino, uint64_t *seq)
{
    struct loop_info64 info;
    return vd_loop_status(number, &info, seq) && info.lo_device == (uint64_t)dev && info.lo_inode == (uint64_t)ino;
}

/* Whether the descriptor fd of a loop device shows binding: the same
   backing file, and the same seq when both sides know one.  errno is
   ESTALE (another binding) or ENXIO (none) when not. */
static bool vd_loop_fd_shows(int fd, const struct vd_loop_binding *binding)
{
    struct loop_info64 info;
    if (ioctl(fd, LOOP_GET_STATUS64, &info) < 0) {
        errno = ENXIO;
        return false;
    }
    uint64_t seq = vd_loop_binding_seq(fd);
    bool same_file = info.lo_device == binding->dev && info.lo_inode == binding->ino;
    if (!same_file || (binding->seq && seq && seq != binding->seq)) {
        errno = ESTALE;
        return false;
    }
    return true;
}

int vd_loop_open_binding(const struct vd_loop_binding *binding, int flags)
{
    char path[32];
    vd_loop_path(binding->number, path, sizeof path);
    int fd = open(path, flags | O_CLOEXEC);
    if (fd < 0)
        return -1;
    /* Checked after the open, not before: from the open on, fd pins
       whatever binding it shows, so a binding that passes here is the one
       every later call through fd reaches. */
    if (!vd_loop_fd_shows(fd, binding)) {
        int error = errno;
        close(fd);
        errno = error;
        return -1;
    }
    return fd;
}

struct vd_file_search {
    dev_t dev;
    ino_t ino;
    uint64_t seq; /* the seq of the binding that matched */
};

/* Whether /dev/loopN's backing file, as sysfs names it, is the file
   sought; *seq gets the binding that showed it. */
static bool vd_loop_backs_once(int number, const struct vd_file_search *file, uint64_t *seq, bool *steady)
{
    char path[64], backing[PATH_MAX + 16];
    *seq = vd_loop_current_seq(number);
    snprintf(path, sizeof path, "/sys/block/loop%d/loop/backing_file", number);
    if (!vd_read_sysfs(path, backing, sizeof backing))
        return false;
    /* The kernel's d_path follows renames; a deleted backing file can no
       longer be the image anyone opens by name, so it never matches. */
    struct stat st;
    bool matches = stat(backing, &st) == 0 && st.st_dev == file->dev && st.st_ino == file->ino;
    /* The name and the seq are two reads: they belong together only when
       no unbind or bind came between them. */
    *steady = vd_loop_current_seq(number) == *seq;
    return matches;
}

static bool vd_loop_backs(int number, void *context)
{
    struct vd_file_search *file = context;
    for (int tries = 0; tries < 3; tries++) {
        uint64_t seq;
        bool steady;
        bool matches = vd_loop_backs_once(number, file, &seq, &steady);
        if (steady) {
            file->seq = seq;
            return matches;
        }
    }
    return false; /* rebound again and again: not a binding to report */
}

int vd_loop_find(dev_t dev, ino_t ino, struct vd_loop_binding *found)
{
    struct vd_file_search file = {dev, ino, 0};
    int number = vd_loop_scan(vd_loop_backs, &file);
    if (found && number >= 0)
        *found = (struct vd_loop_binding){number, (uint64_t)dev, (uint64_t)ino, file.seq};
    return number;
}

struct vd_loop_visitor {
    void (*visit)(int number, void *context);
    void *context;
    int numbers[256];
    size_t count;
};

static bool vd_loop_collect(int number, void *context)
{
    struct vd_loop_visitor *visitor = context;
    if (visitor->count < sizeof visitor->numbers / sizeof visitor->numbers[0])
        visitor->numbers[visitor->count++] = number;
    return false;
}

static int vd_compare_int(const void *a, const void *b)
{
    return *(const int *)a - *(const int *)b;
}

static bool vd_loop_is_ours(int number)
{
    struct loop_info64 info;
    return vd_loop_status(number, &info, NULL) &&
           strncmp((const char *)info.lo_file_name, VD_LOOP_NAME_PREFIX, strlen(VD_LOOP_NAME_PREFIX)) == 0;
}

void vd_loop_for_each_virtual_disk(void (*visit)(int number, void *context), void *context)
{
    struct vd_loop_visitor visitor = {visit, context, {0}, 0};
    vd_loop_scan(vd_loop_collect, &visitor);
    qsort(visitor.numbers, visitor.count, sizeof visitor.numbers[0], vd_compare_int);
    for (size_t i = 0; i < visitor.count; i++)
        if (vd_loop_is_ours(visitor.numbers[i]))
            visit(visitor.numbers[i], context);
}

/* Whether a filesystem or another exclusive user (mount, mkfs, a holder
   such as device-mapper) has claimed the disk or one of its partitions. */
static bool vd_loop_partition_claimed(int number)
{
    char dir_path[64];
    snprintf(dir_path, sizeof dir_path, "/sys/block/loop%d", number);
    DIR *dir = opendir(dir_path);
    if (!dir)
        return false;
    char prefix[32];
    snprintf(prefix, sizeof prefix, "loop%dp", number);
    bool claimed = false;
    struct dirent *entry;
    while (!claimed && (entry = readdir(dir)) != NULL) {
        if (strncmp(entry->d_name, prefix, strlen(prefix)) != 0)
            continue;
        char device[sizeof entry->d_name + 8];
        snprintf(device, sizeof device, "/dev/%s", entry->d_name);
        int fd = open(device, O_RDONLY | O_EXCL | O_CLOEXEC);
        if (fd < 0)
            claimed = errno == EBUSY;
        else
            close(fd);
    }
    closedir(dir);
    return claimed;
}

/* Undoes what a LOOP_CLR_FD that found other openers did: the kernel set
   autoclear instead of detaching.  A permanent disk gets its flags back. */
static void vd_loop_restore_autoclear(int fd, bool autoclear)
{
    struct loop_info64 info;
    if (autoclear || ioctl(fd, LOOP_GET_STATUS64, &info) < 0)
        return;
    info.lo_flags &= ~(uint32_t)LO_FLAGS_AUTOCLEAR;
    ioctl(fd, LOOP_SET_STATUS64, &info);
}

/* Detaches binding, reached through pin: a descriptor that shows it (the
   caller's own holder, or one vd_loop_open_binding() checked).  pin is
   consumed.  held_fd as for vd_loop_detach(), or NULL. */
static DWORD vd_loop_detach_pinned(const struct vd_loop_binding *binding, int pin, int *held_fd)
{
    int number = binding->number;
    char path[32];
    vd_loop_path(number, path, sizeof path);

    /* O_EXCL on a block device fails with EBUSY while it is mounted or
       otherwise claimed; holding it also keeps a new mount from starting
       while we decide.  It is opened only now, while pin keeps the device
       on this binding: an exclusive open of a device that turned out to be
       someone else's would make their mount fail meanwhile. */
    int probe = open(path, O_RDONLY | O_EXCL | O_CLOEXEC);
    int error = errno;
    if (pin != (held_fd ? *held_fd : -1))
        close(pin);
    if (probe < 0) {
        if (error == EBUSY)
            return vd_fail(ERROR_DEVICE_IN_USE,
                           "%s is in use (mounted or opened exclusively); unmount it first", path);
        return vd_loop_fail_errno(error, "opening", number);
    }
    if (vd_loop_partition_claimed(number)) {
        close(probe);
        return vd_fail(ERROR_DEVICE_IN_USE, "a partition of %s is mounted or in use; unmount it first", path);
    }
    struct loop_info64 info;
    if (ioctl(probe, LOOP_GET_STATUS64, &info) < 0) {
        DWORD status = vd_loop_fail_errno(errno, "reading the state of", number);
        close(probe);
        return status;
    }
    bool autoclear = info.lo_flags & LO_FLAGS_AUTOCLEAR;
    /* The binding being detached, read while the probe pins it: once it
       ends, /dev/loopN may be someone else's within microseconds. */
    struct vd_loop_binding ours = *binding;
    ours.seq = vd_loop_binding_seq(probe);

    /* A device in rundown fails every request, including the writeback of
       its dirty pages at the last close: written but unsynced data would be
       lost.  So it is written back now, while the device is still bound, and
       made durable in the image as Windows' write-through disks are.  That
       flush reaches the host disk and costs more than the rest of a detach;
       a read-only device has nothing to write and skips it. */
    if (!(info.lo_flags & LO_FLAGS_READ_ONLY) && fsync(probe) < 0) {
        DWORD status = vd_loop_fail_errno(errno, "flushing", number);
        close(probe);
        return status;
    }

    /* The kernel itself counts the device's openers: LOOP_CLR_FD from the
       only opener puts the device in rundown (new opens fail with ENXIO and
       the last close tears it down); with other openers it merely sets
       autoclear.  So our own holder goes first, then LOOP_CLR_FD, then a
       second open tells which of the two happened. */
    int own_fd = held_fd ? *held_fd : -1;
    if (own_fd >= 0) {
        close(own_fd);
        *held_fd = -1;
    }
    if (ioctl(probe, LOOP_CLR_FD) < 0) {
        DWORD status = vd_loop_fail_errno(errno, "detaching", number);
        if (held_fd)
            *held_fd = probe; /* still attached: the probe becomes the holder */
        else
            close(probe);
        return status;
    }
    /* Either the device is in rundown and this close tears it down, or
       others hold it and LOOP_CLR_FD set autoclear: then it goes when they
       close.  Short-lived openers (blkid, udev, a lookup, another attach
       trying this device) close within moments, so wait for them; only a
       disk that stays open is refused. */
    close(probe);
    if (vd_loop_wait_unbound(number, ours.seq, VD_LOOP_TRANSIENT_MS))
        return ERROR_SUCCESS;
    /* What check holds is ours only while it shows our binding: a new
       binding there is another attacher's, to be left alone, and means
       ours is gone. */
    int check = vd_loop_open_binding(&ours, O_RDONLY);
    if (check < 0) {
        if (errno == ESTALE || !vd_loop_still_bound(number, ours.seq))
            return ERROR_SUCCESS; /* the last holder let go just now */
        return vd_fail(ERROR_DEVICE_IN_USE, "%s is still attached after detaching", path);
    }
    /* Held open: refuse, and put everything back. */
    vd_loop_restore_autoclear(check, autoclear);
    if (held_fd)
        *held_fd = check;
    else
        close(check);
    return vd_fail(ERROR_DEVICE_IN_USE, "%s is open elsewhere; close it first (fuser -v %s shows who)", path,
                   path);
}

DWORD vd_loop_detach(int number, int *held_fd)
{
    DWORD privilege = vd_loop_require_privilege("detaching a virtual disk");
    if (privilege != ERROR_SUCCESS)
        return privilege;
    /* The holder pins the binding: what it shows is ours by definition. */
    struct vd_loop_binding ours = {.number = number};
    struct loop_info64 info;
    if (!held_fd || *held_fd < 0)
        return vd_fail(ERROR_INVALID_HANDLE, "/dev/loop%d is not held by this process", number);
    if (ioctl(*held_fd, LOOP_GET_STATUS64, &info) < 0)
        return vd_loop_fail_errno(errno, "reading the state of", number);
    ours.dev = info.lo_device;
    ours.ino = info.lo_inode;
    ours.seq = vd_loop_binding_seq(*held_fd);
    return vd_loop_detach_pinned(&ours, *held_fd, held_fd);
}

DWORD vd_loop_detach_found(const struct vd_loop_binding *found)
{
    DWORD privilege = vd_loop_require_privilege("detaching a virtual disk");
    if (privilege != ERROR_SUCCESS)
        return privilege;
    int pin = vd_loop_open_binding(found, O_RDONLY);
    if (pin < 0) {
        int error = errno;
        if (error == ESTALE || error == ENXIO || error == ENOENT)
            return vd_fail(ERROR_NOT_READY, "/dev/loop%d is no longer attached%s", found->number,
                           error == ESTALE ? " (it now holds another attachment, left alone)" : "");
        return vd_loop_fail_errno(error, "opening", found->number);
    }
    return vd_loop_detach_pinned(found, pin, NULL);
}
