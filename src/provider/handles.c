/*
 * The handle registry and per-disk state (see handles.h).
 */
#define _GNU_SOURCE
#include "handles.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#include "errors.h"

/* The lock bytes sit at the largest offsets a lock can name, where no image
   data and no other program's locks (qemu locks bytes 100-299) can be. */
#define VD_HANDLE_LOCK_OFFSET (INT64_MAX - 1)
#define VD_ATTACHED_LOCK_OFFSET (INT64_MAX - 2)

static pthread_mutex_t vd_registry_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t vd_disk_mutex = PTHREAD_MUTEX_INITIALIZER;
static struct vd_handle *vd_handles;
static struct vd_disk *vd_disks;

void vd_disks_lock(void)
{
    pthread_mutex_lock(&vd_disk_mutex);
}

void vd_disks_unlock(void)
{
    pthread_mutex_unlock(&vd_disk_mutex);
}

/* Read-locks one byte for this open file description. */
static int vd_lock_byte(int fd, off_t offset)
{
    struct flock lock = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = offset, .l_len = 1};
    return fcntl(fd, F_OFD_SETLK, &lock);
}

/* Whether another open file description, in any process, holds a lock on the
   byte (F_OFD_GETLK ignores the caller's own). */
static bool vd_byte_locked_elsewhere(int fd, off_t offset)
{
    struct flock lock = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = offset, .l_len = 1};
    return fcntl(fd, F_OFD_GETLK, &lock) == 0 && lock.l_type != F_UNLCK;
}

DWORD vd_mark_attached(int backing_fd)
{
    if (vd_lock_byte(backing_fd, VD_ATTACHED_LOCK_OFFSET) < 0)
        return vd_fail_errno(errno, "marking the image as attached");
    return ERROR_SUCCESS;
}

bool vd_image_is_attached(const struct vd_image *image)
{
    return vd_byte_locked_elsewhere(image->fd, VD_ATTACHED_LOCK_OFFSET);
}

bool vd_handle_has_others(const struct vd_handle *handle)
{
    return vd_byte_locked_elsewhere(handle->image->fd, VD_HANDLE_LOCK_OFFSET);
}

bool vd_image_has_handles(const struct vd_image *image)
{
    return vd_byte_locked_elsewhere(image->fd, VD_HANDLE_LOCK_OFFSET);
}

/* Called with vd_registry_mutex held. */
static struct vd_disk *vd_disk_for(dev_t dev, ino_t ino)
{
    for (struct vd_disk *disk = vd_disks; disk; disk = disk->next)
        if (disk->dev == dev && disk->ino == ino)
            return disk;
    struct vd_disk *disk = calloc(1, sizeof *disk);
    if (!disk)
        return NULL;
    disk->dev = dev;
    disk->ino = ino;
    disk->loop_number = -1;
    disk->loop_fd = -1;
    disk->next = vd_disks;
    vd_disks = disk;
    return disk;
}

DWORD vd_handle_create(struct vd_image *image, VIRTUAL_DISK_ACCESS_MASK access, HANDLE *out)
{
    if (vd_lock_byte(image->fd, VD_HANDLE_LOCK_OFFSET) < 0) {
        DWORD status = vd_fail_errno(errno, "registering a handle lock on %s", image->path);
        vd_image_close(image);
        return status;
    }
    struct vd_handle *handle = calloc(1, sizeof *handle);
    if (!handle) {
        vd_image_close(image);
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a handle");
    }
    handle->access = access;
    handle->image = image;
    handle->users = 1;
    handle->rw_depth = 1;

    pthread_mutex_lock(&vd_registry_mutex);
    handle->disk = vd_disk_for(image->file_dev, image->file_ino);
    if (!handle->disk) {
        pthread_mutex_unlock(&vd_registry_mutex);
        free(handle);
        vd_image_close(image);
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a disk record");
    }
    handle->disk->handle_count++;
    handle->next = vd_handles;
    vd_handles = handle;
    pthread_mutex_unlock(&vd_registry_mutex);
    *out = handle;
    return ERROR_SUCCESS;
}

struct vd_handle *vd_handle_acquire(HANDLE value)
{
    pthread_mutex_lock(&vd_registry_mutex);
    struct vd_handle *found = NULL;
    for (struct vd_handle *handle = vd_handles; handle; handle = handle->next) {
        if ((HANDLE)handle == value) {
            handle->users++;
            found = handle;
            break;
        }
    }
    pthread_mutex_unlock(&vd_registry_mutex);
    return found;
}

void vd_handle_retain(struct vd_handle *handle)
{
    pthread_mutex_lock(&vd_registry_mutex);
    handle->users++;
    pthread_mutex_unlock(&vd_registry_mutex);
}

static void vd_disk_forget(struct vd_disk *disk)
{
    for (struct vd_disk **link = &vd_disks; *link; link = &(*link)->next) {
        if (*link == disk) {
            *link = disk->next;
            break;
        }
    }
    free(disk);
}

/* Frees a handle nobody uses any more.  When it was the disk's last handle,
   a non-permanent attachment ends here: closing the autoclear loop device's
   last descriptor detaches it, as Windows does when the last handle closes. */
static void vd_handle_free(struct vd_handle *handle)
{
    struct vd_disk *disk = handle->disk;
    int loop_fd = -1, loop_number = -1;
    struct vd_served *served = NULL;
    vd_disks_lock();
    pthread_mutex_lock(&vd_registry_mutex);
    if (--disk->handle_count == 0) {
        loop_fd = disk->loop_fd;
        loop_number = disk->loop_number;
        served = disk->served;
        vd_disk_forget(disk);
    }
    pthread_mutex_unlock(&vd_registry_mutex);
    if (loop_fd >= 0)
        close(loop_fd);
    if (served)
        vd_served_end(served, loop_number);
    vd_disks_unlock();
    vd_image_close(handle->image); /* closing the fd drops the handle lock */
    vd_job_free_all(handle);
    free(handle);
}

void vd_handle_release(struct vd_handle *handle)
{
    pthread_mutex_lock(&vd_registry_mutex);
    bool last = --handle->users == 0;
    pthread_mutex_unlock(&vd_registry_mutex);
    if (last)
        vd_handle_free(handle);
}

BOOL WINAPI CloseHandle(HANDLE value)
{
    vd_clear_detail();
    pthread_mutex_lock(&vd_registry_mutex);
    struct vd_handle *handle = NULL;
    for (struct vd_handle **link = &vd_handles; *link; link = &(*link)->next) {
        if ((HANDLE)*link == value) {
            handle = *link;
            *link = handle->next;
            break;
        }
    }
    pthread_mutex_unlock(&vd_registry_mutex);
    if (!handle) {
        if (vd_event_close(value))
            return 1;
        vd_set_last_error(ERROR_INVALID_HANDLE);
        return 0;
    }
    /* Like Windows, closing the handle cancels its operations; each holds
       its own reference, so the handle is freed when the last one ends. */
    vd_job_cancel(handle, NULL);
    vd_handle_release(handle); /* drops the "open" reference */
    return 1;
}
