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
#include "loopdev.h"
#include "servedop.h"
#include "share.h"

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

int vd_handle_attached_loop(const struct vd_handle *handle, bool *helper)
{
    struct vd_loop_binding found;
    return vd_handle_attached_binding(handle, helper, &found);
}

int vd_handle_attached_binding(const struct vd_handle *handle, bool *helper, struct vd_loop_binding *found)
{
    *helper = false;
    if (handle->disk->loop_number >= 0) {
        *found = (struct vd_loop_binding){.number = handle->disk->loop_number, .seq = handle->disk->loop_seq};
        return handle->disk->loop_number;
    }
    return vd_share_attached_binding(handle->image, helper, found);
}

struct vd_disk *vd_disk_attached_as(int number)
{
    struct vd_disk *found = NULL;
    pthread_mutex_lock(&vd_registry_mutex); /* after the disks lock, as vd_handle_free() takes them */
    for (struct vd_disk *disk = vd_disks; number >= 0 && disk && !found; disk = disk->next)
        if (disk->loop_number == number)
            found = disk;
    pthread_mutex_unlock(&vd_registry_mutex);
    return found;
}

bool vd_handle_has_others(const struct vd_handle *handle)
{
    return vd_share_held_elsewhere(handle->image->share_fd, VD_SHARE_HANDLE);
}

bool vd_image_has_handles(const struct vd_image *image)
{
    /* image->share_fd is this process's claim on it as a parent, which is
       not counted; another handle, or another child holding it as parent,
       is. */
    if (image->share_fd < 0)
        return false;
    return vd_share_held_elsewhere(image->share_fd, VD_SHARE_HANDLE) ||
           vd_share_denied_elsewhere(image->share_fd, VD_SHARE_WRITE);
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
    disk->attach_claim = -1;
    disk->next = vd_disks;
    vd_disks = disk;
    return disk;
}

DWORD vd_handle_create(struct vd_image *image, VIRTUAL_DISK_ACCESS_MASK access, HANDLE *out)
{
    /* The handle's HANDLE and the image's WRITE in one claim: one lock file
       opened, one mutex round. */
    DWORD status = vd_share_open_chain(image, VD_SHARE_HANDLE, -1);
    if (image->writable) {
        /* After the WRITE claim, no attach can start; one that finished
           before has its marker in place (share.h).  Usually nothing is
           attached: the claim and one look at the marker are all.  An
           attachment on its way out may still hold its claims (its server's
           WRITE) or its device: then the claims are given back, its end
           waited for (vd_share_settle()), and both made again. */
        bool helper;
        int number = status == ERROR_SUCCESS ? vd_share_attached_loop(image, &helper) : -1;
        if (status == ERROR_SHARING_VIOLATION || number >= 0) {
            vd_share_end_chain(image);
            vd_share_settle(image);
            status = vd_share_open_chain(image, VD_SHARE_HANDLE, -1);
            number = status == ERROR_SUCCESS ? vd_share_attached_loop(image, &helper) : -1;
        }
        if (number >= 0)
            status = vd_fail(ERROR_SHARING_VIOLATION,
                             "%s is attached as /dev/loop%d: it cannot be opened for writing as well (open it "
                             "with DETACH and GET_INFO access to detach it)",
                             image->path, number);
    }
    struct vd_handle *handle = NULL;
    if (status == ERROR_SUCCESS) {
        handle = calloc(1, sizeof *handle);
        if (!handle)
            status = vd_fail(ERROR_OUTOFMEMORY, "allocating a handle");
    }
    if (status != ERROR_SUCCESS) {
        vd_image_close(image);
        return status;
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
    /* Every call looks its handle up: the fork handler marks the copies a
       child inherits, so the lookup needs no getpid() system call. */
    for (struct vd_handle *handle = vd_handles; handle; handle = handle->next) {
        if ((HANDLE)handle == value && !handle->inherited) {
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

DWORD vd_handle_refuse(HANDLE value, DWORD code)
{
    pid_t owner = 0;
    pthread_mutex_lock(&vd_registry_mutex);
    for (struct vd_handle *handle = vd_handles; handle; handle = handle->next)
        if ((HANDLE)handle == value && handle->inherited)
            owner = handle->owner;
    pthread_mutex_unlock(&vd_registry_mutex);
    if (owner)
        return vd_fail(ERROR_INVALID_HANDLE,
                       "the handle belongs to process %ld, the parent of this forked process; "
                       "open the virtual disk again in this process",
                       (long)owner);
    return vd_fail(code, "not a handle from OpenVirtualDisk or CreateVirtualDisk");
}

/* Fork: the registry is copied as it was at the fork (both locks are taken
   around it, so it is consistent), and the child lets go of every
   attachment's descriptor without a word: a direct attachment's autoclear
   loop descriptor, a served one's helper channel.  The parent's copies keep
   them; the child's disks start afresh. */
static void vd_fork_prepare(void)
{
    pthread_mutex_lock(&vd_disk_mutex);
    pthread_mutex_lock(&vd_registry_mutex);
}

static void vd_fork_parent(void)
{
    pthread_mutex_unlock(&vd_registry_mutex);
    pthread_mutex_unlock(&vd_disk_mutex);
}

static void vd_fork_child(void)
{
    for (struct vd_disk *disk = vd_disks; disk; disk = disk->next) {
        if (disk->loop_fd >= 0)
            close(disk->loop_fd);
        disk->loop_fd = -1;
        if (disk->served)
            vd_served_forget(disk->served);
        disk->served = NULL; /* the parent's: not freed here, never used */
        if (disk->attach_claim >= 0)
            close(disk->attach_claim);
        disk->attach_claim = -1;
        disk->loop_number = -1;
        /* A handle the child opens must not share the parent's disk. */
        disk->dev = (dev_t)-1;
        disk->ino = (ino_t)-1;
    }
    /* Nor do an inherited handle's claims (its own, its image's and its
       parents') outlive the parent's handle. */
    for (struct vd_handle *handle = vd_handles; handle; handle = handle->next) {
        if (!handle->inherited)
            handle->owner = getppid(); /* the process that forked this one */
        handle->inherited = true;
        vd_share_end_chain(handle->image);
    }
    pthread_mutex_unlock(&vd_registry_mutex);
    pthread_mutex_unlock(&vd_disk_mutex);
}

__attribute__((constructor)) static void vd_handles_init(void)
{
    pthread_atfork(vd_fork_prepare, vd_fork_parent, vd_fork_child);
}

/* Frees a handle nobody uses any more.  When it was the disk's last handle,
   a non-permanent attachment ends here: closing the autoclear loop device's
   last descriptor detaches it, as Windows does when the last handle closes. */
static void vd_handle_free(struct vd_handle *handle)
{
    /* Its jobs have ended (each held a reference); a mirror it started
       may still be in sync, which on Windows is still the handle's pending
       operation: closing the handle cancels it. */
    if (handle->served_serial && !handle->inherited)
        vd_served_op_end(handle);
    struct vd_disk *disk = handle->disk;
    int loop_fd = -1, loop_number = -1, attach_claim = -1;
    uint64_t loop_seq = 0;
    struct vd_served *served = NULL;
    vd_disks_lock();
    pthread_mutex_lock(&vd_registry_mutex);
    if (--disk->handle_count == 0) {
        loop_fd = disk->loop_fd;
        loop_number = disk->loop_number;
        loop_seq = disk->loop_seq;
        attach_claim = disk->attach_claim;
        served = disk->served;
        vd_disk_forget(disk);
    }
    pthread_mutex_unlock(&vd_registry_mutex);
    if (loop_fd >= 0) {
        close(loop_fd);
        /* A short-lived opener elsewhere (blkid, a lookup, an attach racing
           for a free device) delays the kernel's autoclear until it closes:
           wait for that, so that the disk is gone when CloseHandle returns
           and attaching the image again does not find it still attached.
           A disk held open for longer detaches when that holder lets go. */
        vd_loop_wait_unbound(loop_number, loop_seq, VD_LOOP_TRANSIENT_MS);
    }
    if (served)
        vd_served_end(served);
    if (attach_claim >= 0)
        close(attach_claim);
    vd_disks_unlock();
    /* The handle's claims end with its image; their lock files stay for
       the next open (share.h). */
    vd_image_close(handle->image);
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
