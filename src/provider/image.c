/*
 * Opening an image file and handing it to the format that recognises it.
 */
#define _GNU_SOURCE /* FALLOC_FL_PUNCH_HOLE, statx */
#include "image.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "bytes.h"
#include "errors.h"

/* Probe order: the formats with a signature at a fixed place first; ISO's
   "CD001" at 32 KiB could in principle also sit inside a VHD's data. */
static const struct vd_format *const vd_formats[] = {&vd_format_vhdx, &vd_format_vhd, &vd_format_iso};

/* VHDX and VHD are told by their first and last sectors; only ISO needs the
   volume descriptors from 32 KiB on.  So a short head is read first, and the
   long one only when no format recognised it: opening a VHD or VHDX then
   copies 4 KiB instead of 64 KiB (a fifth of the cost of an open). */
enum { VD_PROBE_SHORT_HEAD = 4096, VD_PROBE_HEAD = 64 * 1024, VD_PROBE_TAIL = 512 };

const struct vd_format *vd_format_for_device(ULONG device_id)
{
    for (size_t i = 0; i < sizeof vd_formats / sizeof vd_formats[0]; i++)
        if (vd_formats[i]->device_id == device_id)
            return vd_formats[i];
    return NULL;
}

static bool vd_probe_formats(const uint8_t *head, size_t head_length, const uint8_t *tail, size_t tail_length,
                             uint64_t file_size, const struct vd_format **format)
{
    for (size_t i = 0; i < sizeof vd_formats / sizeof vd_formats[0]; i++) {
        if (vd_formats[i]->probe(head, head_length, tail, tail_length, file_size)) {
            *format = vd_formats[i];
            return true;
        }
    }
    return false;
}

/* The head read is kept in image->probe_head for the format's open(), which
   reads the same bytes first. */
static DWORD vd_probe(struct vd_image *image, const struct vd_format **format)
{
    static _Thread_local uint8_t head[VD_PROBE_HEAD];
    uint8_t tail[VD_PROBE_TAIL];
    size_t head_length = image->file_size < VD_PROBE_SHORT_HEAD ? (size_t)image->file_size : VD_PROBE_SHORT_HEAD;
    int error = vd_pread_full(image->fd, head, head_length, 0);
    if (error)
        return vd_fail_errno(error, "reading %s to recognise its format", image->path);
    image->probe_head = head;
    image->probe_head_length = head_length;
    /* A VHDX (or a dynamic VHD's copy of its footer) is told by its head
       alone, without reading the tail; the order of the formats is kept, as
       only the head decides for any format ahead of the one found. */
    if (vd_probe_formats(head, head_length, NULL, 0, image->file_size, format))
        return ERROR_SUCCESS;
    size_t tail_length = image->file_size < VD_PROBE_TAIL ? (size_t)image->file_size : VD_PROBE_TAIL;
    error = vd_pread_full(image->fd, tail, tail_length, image->file_size - tail_length);
    if (!error && vd_probe_formats(head, head_length, tail, tail_length, image->file_size, format))
        return ERROR_SUCCESS;
    if (!error && head_length < image->file_size) {
        size_t length = image->file_size < VD_PROBE_HEAD ? (size_t)image->file_size : VD_PROBE_HEAD;
        error = vd_pread_full(image->fd, head + head_length, length - head_length, head_length);
        head_length = length;
        image->probe_head_length = head_length;
        if (!error && vd_probe_formats(head, head_length, tail, tail_length, image->file_size, format))
            return ERROR_SUCCESS;
    }
    if (error)
        return vd_fail_errno(error, "reading %s to recognise its format", image->path);
    return vd_fail(ERROR_VIRTDISK_PROVIDER_NOT_FOUND,
                   "%s is not a VHD, VHDX or ISO image (no known signature)", image->path);
}

/* The opened file's absolute, resolved name: the kernel's, in one readlink
   of /proc/self/fd (realpath() costs a readlink per path component, a tenth
   of an open), else realpath()'s.  A file opened through a descriptor link
   after it was deleted keeps the kernel's name ("... (deleted)"): that is
   how a served disk whose image was deleted can still be detached. */
static char *vd_resolved_path(int fd, const char *path)
{
    char link[64], name[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t length = readlink(link, name, sizeof name - 1);
    if (length <= 0 || name[0] != '/' || (size_t)length >= sizeof name - 1)
        return realpath(path, NULL);
    name[length] = '\0';
    return strdup(name);
}

DWORD vd_image_open(const char *path, ULONG device_id, bool writable,
                    OPEN_VIRTUAL_DISK_FLAG open_flags, struct vd_image **out)
{
    const struct vd_format *format = NULL;
    if (device_id != VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN) {
        format = vd_format_for_device(device_id);
        if (!format)
            return vd_fail(ERROR_VIRTDISK_PROVIDER_NOT_FOUND,
                           "no provider for virtual storage device type %u", (unsigned)device_id);
    }

    struct vd_image *image = calloc(1, sizeof *image);
    if (!image)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating an image");
    image->fd = -1;
    image->share_fd = -1;
    image->writable = writable;
    image->open_flags = open_flags;

    DWORD status;
    /* O_NONBLOCK: a FIFO (or a device) named as an image, or planted as a
       parent, must not hang the open; only a regular file is read. */
    image->fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (image->fd < 0) {
        status = vd_fail_errno(errno, "opening %s", path);
        goto fail;
    }
    /* statx rather than fstat, at the same cost: the birth time names the
       file's lock file (share.h). */
    struct statx st;
    if (statx(image->fd, "", AT_EMPTY_PATH | AT_STATX_SYNC_AS_STAT, STATX_BASIC_STATS | STATX_BTIME, &st) < 0) {
        status = vd_fail_errno(errno, "examining %s", path);
        goto fail;
    }
    if (!S_ISREG(st.stx_mode)) {
        status = vd_fail(ERROR_VIRTDISK_NOT_VIRTUAL_DISK, "%s is not a regular file", path);
        goto fail;
    }
    /* F_SETFL changes only the status flags (O_APPEND, O_NONBLOCK, ...), of
       which the open above set none but O_NONBLOCK: no F_GETFL needed. */
    fcntl(image->fd, F_SETFL, 0);
    image->file_size = st.stx_size;
    image->file_dev = makedev(st.stx_dev_major, st.stx_dev_minor);
    image->file_ino = st.stx_ino;
    if (st.stx_mask & STATX_BTIME) {
        image->file_btime_sec = st.stx_btime.tv_sec;
        image->file_btime_nsec = st.stx_btime.tv_nsec;
    }
    image->file_block_size = st.stx_blksize;
    image->path = vd_resolved_path(image->fd, path);
    if (!image->path) {
        status = vd_fail_errno(errno, "resolving %s", path);
        goto fail;
    }

    if (!format) {
        status = vd_probe(image, &format);
        if (status != ERROR_SUCCESS)
            goto fail;
    }
    image->format = format;
    status = format->open(image);
    image->probe_head = NULL; /* the probe's buffer is reused by the next open */
    image->probe_head_length = 0;
    if (status != ERROR_SUCCESS) {
        /* The format may have set state before failing; its close() frees it. */
        goto fail;
    }
    *out = image;
    return ERROR_SUCCESS;

fail:
    vd_image_close(image);
    return status;
}

void vd_image_close(struct vd_image *image)
{
    if (!image)
        return;
    if (image->format && image->state && image->format->close)
        image->format->close(image);
    /* Claims end before the file closes, and with it an attachment's
       marker: whoever sees the marker gone finds the claims gone too. */
    if (image->share_fd >= 0)
        close(image->share_fd);
    vd_image_close(image->parent);
    if (image->fd >= 0)
        close(image->fd);
    free(image->parent_locations);
    free(image->path);
    free(image);
}

DWORD vd_image_block_status(struct vd_image *image, uint64_t offset, uint64_t length,
                            enum vd_block_state *state, uint64_t *run)
{
    if (image->format->block_status)
        return image->format->block_status(image, offset, length, state, run);
    *state = VD_BLOCK_DATA;
    *run = length;
    return ERROR_SUCCESS;
}

DWORD vd_image_chain_zeros(struct vd_image *image, uint64_t offset, uint64_t length, bool *zeros, uint64_t *run)
{
    *zeros = false;
    *run = length;
    for (struct vd_image *layer = image; layer; layer = layer->parent) {
        enum vd_block_state state;
        uint64_t n;
        DWORD status = vd_image_block_status(layer, offset, *run, &state, &n);
        if (status != ERROR_SUCCESS)
            return status;
        *run = n;
        if (state == VD_BLOCK_DATA)
            return ERROR_SUCCESS;
        if (state == VD_BLOCK_ZERO)
            break; /* this layer hides everything below */
        /* Absent: the parent decides, and an unopened one is unknown. */
        if (layer->subtype == VD_SUBTYPE_DIFFERENCING && !layer->parent)
            return ERROR_SUCCESS;
    }
    *zeros = true;
    return ERROR_SUCCESS;
}

DWORD vd_image_reads_zeros(struct vd_image *image, uint64_t offset, uint64_t length, bool *zeros)
{
    *zeros = false;
    if (!image)
        return ERROR_SUCCESS; /* a parent not opened: unknown */
    for (uint64_t done = 0; done < length;) {
        bool run_zeros;
        uint64_t run;
        DWORD status = vd_image_chain_zeros(image, offset + done, length - done, &run_zeros, &run);
        if (status != ERROR_SUCCESS || !run_zeros)
            return status;
        done += run;
    }
    *zeros = true;
    return ERROR_SUCCESS;
}

DWORD vd_image_zero_range(struct vd_image *image, uint64_t offset, uint64_t length, bool *done)
{
    *done = length == 0 || vd_fallocate(image->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length) == 0;
    if (*done || errno == EOPNOTSUPP || errno == ENOSYS)
        return ERROR_SUCCESS;
    return vd_fail_errno(errno, "%s: zeroing %llu bytes at file offset %llu", image->path,
                         (unsigned long long)length, (unsigned long long)offset);
}

DWORD vd_image_punch_unused(struct vd_image *image, uint64_t offset, uint64_t length)
{
    if (length == 0 || vd_fallocate(image->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0)
        return ERROR_SUCCESS;
    if (errno == EOPNOTSUPP || errno == ENOSYS)
        return ERROR_SUCCESS;
    return vd_fail_errno(errno, "%s: giving %llu bytes at file offset %llu back to the host", image->path,
                         (unsigned long long)length, (unsigned long long)offset);
}
