/*
 * Reading a creation source and copying it into a new image (source.h).
 */
#define _GNU_SOURCE
#include "source.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bytes.h"
#include "errors.h"
#include "utf16.h"

typedef unsigned long long ull;

enum { VD_COPY_CHUNK = 1 << 20 };

static DWORD vd_source_open_raw(struct vd_source *source)
{
    /* O_NONBLOCK until the type is known: a FIFO must not hang the open. */
    source->fd = open(source->path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (source->fd < 0)
        return vd_fail_errno(errno, "opening the source %s", source->path);
    struct stat st;
    if (fstat(source->fd, &st) < 0)
        return vd_fail_errno(errno, "examining the source %s", source->path);
    if (S_ISREG(st.st_mode)) {
        source->size = (uint64_t)st.st_size;
    } else if (S_ISBLK(st.st_mode)) {
        uint64_t size;
        if (ioctl(source->fd, BLKGETSIZE64, &size) < 0)
            return vd_fail_errno(errno, "reading the size of the source device %s", source->path);
        source->size = size;
    } else {
        return vd_fail(ERROR_VIRTDISK_NOT_VIRTUAL_DISK, "the source %s is neither a file nor a block device",
                       source->path);
    }
    fcntl(source->fd, F_SETFL, fcntl(source->fd, F_GETFL) & ~O_NONBLOCK);
    if (source->size == 0)
        return vd_fail(ERROR_INVALID_PARAMETER, "the source %s is empty", source->path);
    source->logical_sector_size = 512;
    source->physical_sector_size = 512;
    return ERROR_SUCCESS;
}

DWORD vd_source_open(const WCHAR *path, ULONG device_id, struct vd_source *source)
{
    memset(source, 0, sizeof *source);
    source->fd = -1;
    if (!path[0])
        return vd_fail(ERROR_INVALID_PARAMETER, "SourcePath is empty");
    source->path = vd_utf16_to_utf8(path);
    if (!source->path)
        return vd_fail(ERROR_INVALID_NAME, "SourcePath is not valid UTF-16");
    DWORD status = vd_image_open(source->path, device_id, false, 0, &source->image);
    bool unrecognised = status == ERROR_VIRTDISK_PROVIDER_NOT_FOUND || status == ERROR_VIRTDISK_NOT_VIRTUAL_DISK;
    if (unrecognised && device_id == VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN) {
        source->image = NULL;
        return vd_source_open_raw(source);
    }
    if (status != ERROR_SUCCESS)
        return status;
    source->size = source->image->virtual_size;
    source->logical_sector_size = source->image->logical_sector_size;
    source->physical_sector_size = source->image->physical_sector_size;
    return ERROR_SUCCESS;
}

void vd_source_close(struct vd_source *source)
{
    vd_image_close(source->image);
    if (source->fd >= 0)
        close(source->fd);
    free(source->path);
    memset(source, 0, sizeof *source);
    source->fd = -1;
}

static DWORD vd_source_read(const struct vd_source *source, uint8_t *buffer, uint64_t offset, size_t length)
{
    if (source->image)
        return source->image->format->read(source->image, buffer, offset, length);
    int error = vd_pread_full(source->fd, buffer, length, offset);
    return error ? vd_fail_errno(error, "reading %zu bytes at offset %llu of the source %s", length, (ull)offset,
                                 source->path)
                 : ERROR_SUCCESS;
}

/* A raw file's holes read as zeros (SEEK_DATA/SEEK_HOLE; a file system or
   device without them answers "all data", which is always right). */
static DWORD vd_raw_zeros(const struct vd_source *source, uint64_t offset, uint64_t length, bool *zeros,
                          uint64_t *run)
{
    off_t data = lseek(source->fd, (off_t)offset, SEEK_DATA);
    if (data < 0) {
        *zeros = errno == ENXIO; /* no data from here to the end */
        return ERROR_SUCCESS;
    }
    if ((uint64_t)data > offset) {
        *zeros = true;
        *run = (uint64_t)data - offset < length ? (uint64_t)data - offset : length;
        return ERROR_SUCCESS;
    }
    off_t hole = lseek(source->fd, (off_t)offset, SEEK_HOLE);
    if (hole > (off_t)offset && (uint64_t)hole - offset < length)
        *run = (uint64_t)hole - offset;
    return ERROR_SUCCESS;
}

/* Whether [offset, offset + *run) of the source surely reads as zeros
   without reading it: no layer of its chain holds data there. */
static DWORD vd_source_zeros(const struct vd_source *source, uint64_t offset, uint64_t length, bool *zeros,
                             uint64_t *run)
{
    *zeros = false;
    *run = length;
    if (!source->image)
        return vd_raw_zeros(source, offset, length, zeros, run);
    return vd_image_chain_zeros(source->image, offset, length, zeros, run);
}

DWORD vd_source_copy_into(const struct vd_source *source, struct vd_image *target, const GUID *unique_id,
                          struct vd_job *job)
{
    uint8_t *buffer = malloc(VD_COPY_CHUNK);
    if (!buffer)
        return vd_fail(ERROR_OUTOFMEMORY, "copy buffer");
    /* The file is new and is removed if anything fails, so the write
       ordering that protects an existing image is not needed here; one
       fsync at the end makes it durable. */
    OPEN_VIRTUAL_DISK_FLAG flags = target->open_flags;
    target->open_flags |= OPEN_VIRTUAL_DISK_FLAG_NO_WRITE_HARDENING;
    DWORD status = ERROR_SUCCESS;
    bool wrote = false;
    for (uint64_t offset = 0; offset < source->size && status == ERROR_SUCCESS;) {
        if (vd_job_cancelled(job)) {
            status = vd_fail(ERROR_OPERATION_ABORTED, "the copy of %s was cancelled", source->path);
            break;
        }
        size_t n = source->size - offset < VD_COPY_CHUNK ? (size_t)(source->size - offset) : VD_COPY_CHUNK;
        bool zeros;
        uint64_t run;
        status = vd_source_zeros(source, offset, n, &zeros, &run);
        if (status != ERROR_SUCCESS)
            break;
        n = (size_t)run;
        if (!zeros)
            status = vd_source_read(source, buffer, offset, n);
        if (status == ERROR_SUCCESS && !zeros && !vd_all_zero(buffer, n)) {
            /* A raw source's last sector may be partial: the rest reads as zero. */
            size_t whole = (n + target->logical_sector_size - 1) / target->logical_sector_size *
                           target->logical_sector_size;
            if (whole > n) {
                if (whole > VD_COPY_CHUNK || offset + whole > target->virtual_size) {
                    status = vd_fail(ERROR_INVALID_PARAMETER, "the source %s does not fit the new disk",
                                     source->path);
                    break;
                }
                memset(buffer + n, 0, whole - n);
            }
            status = target->format->write(target, buffer, offset, whole);
            wrote = true;
        }
        offset += n;
        vd_job_advance(job, n);
    }
    free(buffer);
    if (status == ERROR_SUCCESS && wrote && target->format->set_identifier &&
        !vd_guid_equal(&target->identifier, unique_id))
        status = target->format->set_identifier(target, unique_id);
    if (status == ERROR_SUCCESS && fsync(target->fd) < 0)
        status = vd_fail_errno(errno, "flushing %s", target->path);
    target->open_flags = flags;
    return status;
}

DWORD vd_source_copy(const struct vd_source *source, const char *target_path, ULONG device_id,
                     const GUID *unique_id, struct vd_job *job)
{
    struct vd_image *target;
    DWORD status = vd_image_open(target_path, device_id, true, OPEN_VIRTUAL_DISK_FLAG_NO_WRITE_HARDENING, &target);
    if (status != ERROR_SUCCESS)
        return status;
    vd_job_set_total(job, source->size);
    status = vd_source_copy_into(source, target, unique_id, job);
    vd_image_close(target);
    return status;
}
