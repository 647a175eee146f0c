/*
 * Attaching a file to a free loop device (vd_loop_attach(), see loopdev.h):
 * finding the device, then binding it, on every kernel the provider runs on.
 *
 * Kernel facts this relies on (shared/linux-provider-notes.md §1; tested on
 * 6.18, the pre-5.8 path forced there with VIRTDISK_TEST_NO_LOOP_CONFIGURE):
 *   - LOOP_CTL_GET_FREE reserves nothing: two attachers can be handed the
 *     same N, and the loser's LOOP_CONFIGURE or LOOP_SET_FD answers EBUSY.
 *   - Kernels before 5.8 answer LOOP_CONFIGURE with EINVAL or ENOTTY.  There
 *     LOOP_SET_FD binds the file with no offset, size limit, autoclear or
 *     name until LOOP_SET_STATUS64 sets them.  That call cannot set
 *     READ_ONLY (the kernel takes it from the modes the file and the device
 *     were opened with) nor DIRECT_IO (LOOP_SET_DIRECT_IO, 4.4); the
 *     logical block size has LOOP_SET_BLOCK_SIZE (4.14).
 *   - Until about 5.x, LOOP_SET_STATUS64 and LOOP_SET_BLOCK_SIZE answer
 *     EAGAIN while the device's page cache (a udev probe's reads) is still
 *     being dropped: a short wait and another try get through.
 *   - A device is free when LOOP_GET_STATUS64 answers ENXIO: the way to find
 *     one among pre-created /dev/loopN nodes when there is no
 *     /dev/loop-control (containers), or when it cannot be used.
 *   - LOOP_CLR_FD undoes a LOOP_SET_FD at once for the only opener, and at
 *     the last close when others (a udev probe) have the device open.
 */
#define _GNU_SOURCE
#include "loopdev.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <linux/major.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "errors.h"

/* Built against older kernel headers (the manylinux images carry 3.10 and
   4.18 ones): these numbers and this layout are the kernel's ABI. */
#ifndef LOOP_SET_DIRECT_IO
#define LOOP_SET_DIRECT_IO 0x4C08
#define LO_FLAGS_DIRECT_IO 16
#endif
#ifndef LOOP_SET_BLOCK_SIZE
#define LOOP_SET_BLOCK_SIZE 0x4C09
#endif
#ifndef LOOP_CONFIGURE
#define LOOP_CONFIGURE 0x4C0A
struct loop_config {
    __u32 fd;
    __u32 block_size;
    struct loop_info64 info;
    __u64 __reserved[8];
};
#endif

enum {
    /* Devices tried before giving up: each failure is another attacher that
       bound the device between our finding and our binding it, which a
       handful of concurrent attaches cause a few times at most. */
    VD_LOOP_ATTEMPTS = 64,
    /* EAGAIN (see top) lasts as long as a probe's reads: up to 2 s here. */
    VD_LOOP_EAGAIN_TRIES = 20,
    VD_LOOP_EAGAIN_WAIT_MS = 100,
};

/* vd_loop_next(): no device this time, ask again. */
#define VD_LOOP_AGAIN (-2)

static bool vd_loop_no_configure;
static pthread_once_t vd_loop_switch_once = PTHREAD_ONCE_INIT;

static void vd_loop_read_switch(void)
{
    const char *value = getenv(VD_LOOP_TEST_NO_CONFIGURE);
    vd_loop_no_configure = value && strcmp(value, "1") == 0;
}

/* ioctl() again while it answers EAGAIN, a bounded number of times. */
static int vd_loop_ioctl(int fd, unsigned long request, unsigned long argument)
{
    for (int tries = 1;; tries++) {
        if (ioctl(fd, request, argument) == 0)
            return 0;
        if (errno != EAGAIN || tries >= VD_LOOP_EAGAIN_TRIES)
            return -1;
        struct timespec wait = {0, VD_LOOP_EAGAIN_WAIT_MS * 1000000L};
        nanosleep(&wait, NULL);
    }
}

static int vd_loop_open(int number, bool read_only)
{
    char path[32];
    snprintf(path, sizeof path, "/dev/loop%d", number);
    /* The device node must be opened read-write for a writable disk: the
       kernel makes the device read-only when it is opened O_RDONLY. */
    return open(path, (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
}

/* ---- finding a free device ---------------------------------------------- */

struct vd_loop_finder {
    bool read_only;
    int control;             /* /dev/loop-control; -1 once scanning /dev */
    char why_scan[160];      /* why /dev/loop-control is not used, for errors */
    int *numbers;            /* the scan's candidates, in increasing order */
    size_t count, next;
    bool scanned;
};

static void vd_loop_stop_control(struct vd_loop_finder *finder, const char *why, int error)
{
    snprintf(finder->why_scan, sizeof finder->why_scan, "%s: %s", why, strerror(error));
    if (finder->control >= 0)
        close(finder->control);
    finder->control = -1;
}

static void vd_loop_finder_init(struct vd_loop_finder *finder, bool read_only)
{
    memset(finder, 0, sizeof *finder);
    finder->read_only = read_only;
    finder->control = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (finder->control < 0)
        vd_loop_stop_control(finder, "/dev/loop-control cannot be opened", errno);
}

static void vd_loop_finder_close(struct vd_loop_finder *finder)
{
    if (finder->control >= 0)
        close(finder->control);
    free(finder->numbers);
}

static int vd_compare_number(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* The N of every /dev/loopN node, in increasing order. */
static void vd_loop_scan_dev(struct vd_loop_finder *finder)
{
    finder->scanned = true;
    DIR *dir = opendir("/dev");
    if (!dir)
        return;
    size_t capacity = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        int number;
        char tail;
        if (sscanf(entry->d_name, "loop%d%c", &number, &tail) != 1 || number < 0)
            continue; /* loop-control, partitions (loopNpM) */
        if (finder->count == capacity) {
            size_t grown = capacity ? 2 * capacity : 16;
            int *numbers = realloc(finder->numbers, grown * sizeof *numbers);
            if (!numbers)
                break;
            finder->numbers = numbers;
            capacity = grown;
        }
        finder->numbers[finder->count++] = number;
    }
    closedir(dir);
    qsort(finder->numbers, finder->count, sizeof *finder->numbers, vd_compare_number);
}

/* The next pre-created device that is free, opened; -1 when none is left. */
static int vd_loop_next_scanned(struct vd_loop_finder *finder, int *number)
{
    if (!finder->scanned)
        vd_loop_scan_dev(finder);
    while (finder->next < finder->count) {
        int candidate = finder->numbers[finder->next++];
        int fd = vd_loop_open(candidate, finder->read_only);
        if (fd < 0)
            continue; /* gone, in rundown, or not ours to open (device cgroup) */
        struct stat st;
        struct loop_info64 info;
        if (fstat(fd, &st) == 0 && S_ISBLK(st.st_mode) && major(st.st_rdev) == LOOP_MAJOR &&
            ioctl(fd, LOOP_GET_STATUS64, &info) < 0 && errno == ENXIO) {
            *number = candidate;
            return fd;
        }
        close(fd);
    }
    return -1;
}

/* A free device, opened in the request's mode (*number is its N); or
   VD_LOOP_AGAIN; or -1 with the failure in *status. */
static int vd_loop_next(struct vd_loop_finder *finder, int *number, DWORD *status)
{
    if (finder->control >= 0) {
        int candidate = ioctl(finder->control, LOOP_CTL_GET_FREE);
        if (candidate < 0) {
            vd_loop_stop_control(finder, "/dev/loop-control has no free device", errno);
        } else {
            int fd = vd_loop_open(candidate, finder->read_only);
            if (fd >= 0) {
                *number = candidate;
                return fd;
            }
            if (errno == ENXIO)
                return VD_LOOP_AGAIN; /* taken and already being torn down */
            if (errno != ENOENT) {
                *status = vd_loop_fail_errno(errno, "opening", candidate);
                return -1;
            }
            /* The kernel made loopN, but this /dev is not the kernel's
               (a container's): only the nodes it has can be used. */
            char why[64];
            snprintf(why, sizeof why, "/dev/loop-control handed out loop%d, which has no node", candidate);
            vd_loop_stop_control(finder, why, ENOENT);
        }
    }
    int fd = vd_loop_next_scanned(finder, number);
    if (fd < 0)
        *status = vd_fail(ERROR_NO_SYSTEM_RESOURCES,
                          "no free loop device: %s, and none of the %zu /dev/loopN nodes here is free "
                          "(in a container, pass --device /dev/loop-control, or more --device /dev/loopN)",
                          finder->why_scan, finder->count);
    return fd;
}

/* ---- binding it --------------------------------------------------------- */

enum vd_loop_bound { VD_LOOP_BOUND, VD_LOOP_TAKEN, VD_LOOP_FAILED };

static DWORD vd_loop_set_block_size(int fd, int number, uint32_t block_size)
{
    if (vd_loop_ioctl(fd, LOOP_SET_BLOCK_SIZE, block_size) == 0)
        return ERROR_SUCCESS;
    int error = errno;
    if (error != EINVAL && error != ENOTTY)
        return vd_loop_fail_errno(error, "setting the sector size of", number);
    /* Before 4.14 there is no such call, and every loop device has 512-byte
       sectors: enough for a disk with 512-byte sectors. */
    int current = 0;
    if (block_size == 512 && ioctl(fd, BLKSSZGET, &current) == 0 && current == 512)
        return ERROR_SUCCESS;
    return vd_fail(ERROR_NOT_SUPPORTED,
                   "/dev/loop%d cannot take %u-byte sectors (LOOP_SET_BLOCK_SIZE needs Linux 4.14): %s", number,
                   (unsigned)block_size, strerror(error));
}

/* LOOP_CONFIGURE's promises, checked after the steps that replace it. */
static DWORD vd_loop_check(int fd, int number, const struct vd_loop_request *request)
{
    struct loop_info64 info;
    if (ioctl(fd, LOOP_GET_STATUS64, &info) < 0)
        return vd_loop_fail_errno(errno, "reading back the state of", number);
    bool read_only = info.lo_flags & LO_FLAGS_READ_ONLY;
    bool autoclear = info.lo_flags & LO_FLAGS_AUTOCLEAR;
    if ((request->read_only && !read_only) || autoclear != request->autoclear || info.lo_offset != request->offset ||
        info.lo_sizelimit != request->size)
        return vd_fail(ERROR_GEN_FAILURE,
                       "/dev/loop%d came out %s, %s, at offset %llu with size limit %llu instead of %s, %s, "
                       "at offset %llu with size limit %llu",
                       number, read_only ? "read-only" : "writable", autoclear ? "autoclear" : "permanent",
                       (unsigned long long)info.lo_offset, (unsigned long long)info.lo_sizelimit,
                       request->read_only ? "read-only" : "writable", request->autoclear ? "autoclear" : "permanent",
                       (unsigned long long)request->offset, (unsigned long long)request->size);
    return ERROR_SUCCESS;
}

/* After LOOP_SET_FD: everything LOOP_CONFIGURE would have set with it. */
static DWORD vd_loop_set_up(int fd, int number, const struct vd_loop_request *request,
                            const struct loop_info64 *wanted)
{
    /* The sector size first: the partition scan that PARTSCAN starts with the
       status must read the table with the disk's own sector size. */
    DWORD status = vd_loop_set_block_size(fd, number, request->block_size ? request->block_size : 512);
    if (status != ERROR_SUCCESS)
        return status;
    struct loop_info64 info = *wanted;
    info.lo_flags &= LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN; /* the only flags it sets */
    if (vd_loop_ioctl(fd, LOOP_SET_STATUS64, (unsigned long)(uintptr_t)&info) < 0)
        return vd_loop_fail_errno(errno, "setting the size limit, flags and name of", number);
    /* As LOOP_CONFIGURE treats the flag: a file or kernel that cannot do
       direct I/O keeps buffered I/O. */
    if (request->direct_io)
        (void)vd_loop_ioctl(fd, LOOP_SET_DIRECT_IO, 1);
    return vd_loop_check(fd, number, request);
}

/* The way before LOOP_CONFIGURE (kernels before 5.8). */
static enum vd_loop_bound vd_loop_bind_in_steps(int fd, int number, const struct vd_loop_request *request,
                                                const struct loop_info64 *info, DWORD *status)
{
    if (ioctl(fd, LOOP_SET_FD, (unsigned long)request->backing_fd) < 0) {
        if (errno == EBUSY)
            return VD_LOOP_TAKEN;
        *status = vd_loop_fail_errno(errno, "binding", number);
        return VD_LOOP_FAILED;
    }
    /* Bound, and showing the whole file: from here every failure unbinds
       it again, so no device stays with the wrong size or lifetime. */
    *status = vd_loop_set_up(fd, number, request, info);
    if (*status == ERROR_SUCCESS)
        return VD_LOOP_BOUND;
    (void)vd_loop_ioctl(fd, LOOP_CLR_FD, 0);
    return VD_LOOP_FAILED;
}

static enum vd_loop_bound vd_loop_bind(int fd, int number, const struct vd_loop_request *request, DWORD *status)
{
    struct loop_config config;
    memset(&config, 0, sizeof config);
    config.fd = (uint32_t)request->backing_fd;
    config.block_size = request->block_size;
    config.info.lo_offset = request->offset;
    config.info.lo_sizelimit = request->size;
    config.info.lo_flags = LO_FLAGS_PARTSCAN;
    if (request->read_only)
        config.info.lo_flags |= LO_FLAGS_READ_ONLY;
    if (request->autoclear)
        config.info.lo_flags |= LO_FLAGS_AUTOCLEAR;
    if (request->direct_io)
        config.info.lo_flags |= LO_FLAGS_DIRECT_IO;
    snprintf((char *)config.info.lo_file_name, LO_NAME_SIZE, "%s%s", VD_LOOP_NAME_PREFIX,
             request->name ? request->name : "");

    pthread_once(&vd_loop_switch_once, vd_loop_read_switch);
    int error = ENOTTY;
    if (!vd_loop_no_configure) {
        if (vd_loop_ioctl(fd, LOOP_CONFIGURE, (unsigned long)(uintptr_t)&config) == 0)
            return VD_LOOP_BOUND;
        error = errno;
    }
    if (error == EINVAL || error == ENOTTY)
        return vd_loop_bind_in_steps(fd, number, request, &config.info, status);
    if (error == EBUSY)
        return VD_LOOP_TAKEN;
    *status = vd_loop_fail_errno(error, "configuring", number);
    return VD_LOOP_FAILED;
}

DWORD vd_loop_attach(const struct vd_loop_request *request, struct vd_loop *out)
{
    /* The kernel lets anyone who can open /dev/loop-control attach; the
       provider asks for the capability Windows' rule corresponds to, so that
       the answer does not depend on device node permissions. */
    DWORD status = vd_loop_require_privilege("attaching a virtual disk");
    if (status != ERROR_SUCCESS)
        return status;
    struct vd_loop_finder finder;
    vd_loop_finder_init(&finder, request->read_only);
    for (int attempt = 0; attempt < VD_LOOP_ATTEMPTS; attempt++) {
        int number;
        int fd = vd_loop_next(&finder, &number, &status);
        if (fd == VD_LOOP_AGAIN)
            continue;
        if (fd < 0)
            goto done;
        switch (vd_loop_bind(fd, number, request, &status)) {
        case VD_LOOP_BOUND:
            out->number = number;
            out->fd = fd;
            out->seq = vd_loop_binding_seq(fd);
            vd_loop_finder_close(&finder);
            return ERROR_SUCCESS;
        case VD_LOOP_TAKEN:
            close(fd); /* another attacher bound it first: on to the next */
            continue;
        case VD_LOOP_FAILED:
            close(fd);
            goto done;
        }
    }
    status = vd_fail(ERROR_NO_SYSTEM_RESOURCES,
                     "no free loop device after %d attempts (other attachers took each one first)",
                     VD_LOOP_ATTEMPTS);
done:
    vd_loop_finder_close(&finder);
    return status;
}
