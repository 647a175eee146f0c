/*
 * Offline changes to an image: SetVirtualDiskInformation, ResizeVirtualDisk
 * and ExpandVirtualDisk.  Argument validation and the handle rules are here;
 * the writing is the format's (image.h: set_identifier ... resize).
 *
 * Rules common to all three, as Microsoft documents them: the handle needs
 * VIRTUAL_DISK_ACCESS_METAOPS (else ERROR_ACCESS_DENIED) and the disk must
 * not be attached (ERROR_VHD_INVALID_STATE).  A METAOPS open is exclusive on
 * Windows; here the exclusion is checked when the change is made: another
 * handle open on the image (in any process) is ERROR_SHARING_VIOLATION,
 * because it would keep using the image's old layout.
 *
 * Resize and expand also run asynchronously for an OVERLAPPED (job.h): the
 * checks are made before the call returns ERROR_IO_PENDING, the change runs
 * on the job's thread.  Progress counts the bytes a fixed disk reserves for
 * its new size (the part that takes time); a change with nothing to reserve
 * reports one unit, done at the end.  A cancel is honoured before the size
 * changes, never after: it leaves the old size.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bytes.h"
#include "errors.h"
#include "handles.h"
#include "image.h"
#include "job.h"
#include "partition.h"
#include "utf16.h"

typedef unsigned long long ull;

/* The handle for an offline change, acquired; NULL with *status set when
   it may not make one. */
static struct vd_handle *vd_metaops_handle(HANDLE value, DWORD *status)
{
    struct vd_handle *handle = vd_handle_acquire(value);
    if (!handle) {
        *status = vd_handle_refuse(value, ERROR_INVALID_HANDLE);
        return NULL;
    }
    struct vd_image *image = handle->image;
    bool helper;
    if (!(handle->access & VIRTUAL_DISK_ACCESS_METAOPS))
        *status = vd_fail(ERROR_ACCESS_DENIED, "the handle was opened without VIRTUAL_DISK_ACCESS_METAOPS");
    else if (image->subtype == VD_SUBTYPE_NONE)
        *status = vd_fail(ERROR_VHD_INVALID_TYPE, "%s images cannot be changed", image->format->name);
    else if (vd_handle_attached_loop(handle, &helper) >= 0)
        *status = vd_fail(ERROR_VHD_INVALID_STATE, "%s is attached; detach it before changing it", image->path);
    else if (!image->writable)
        /* A METAOPS handle opened while the disk was attached read-only
           (api.c) holds it read-only. */
        *status = vd_fail(ERROR_VHD_INVALID_STATE, "%s was attached read-only when this handle was opened; open it "
                                                   "again, now that it is detached, to change it", image->path);
    else if (vd_handle_has_others(handle))
        *status = vd_fail(ERROR_SHARING_VIOLATION, "other handles to %s are open; close them first", image->path);
    else if (vd_job_running(handle))
        *status = vd_fail(ERROR_BUSY, "an operation is still running on this handle");
    else
        return handle;
    vd_handle_release(handle);
    return NULL;
}

static DWORD vd_not_for(const struct vd_image *image, const char *what)
{
    return vd_fail(ERROR_VHD_INVALID_TYPE, "%s does not apply to this %s image", what, image->format->name);
}

/* ---- SetVirtualDiskInformation ------------------------------------------ */

/* Whether the file (dev, ino) is candidate or one of its ancestors. */
static bool vd_in_chain(const struct vd_image *candidate, dev_t dev, ino_t ino)
{
    for (const struct vd_image *link = candidate; link; link = link->parent)
        if (link->file_dev == dev && link->file_ino == ino)
            return true;
    return false;
}

/* Points image (a differencing disk) at the parent at path: it must open and
   be the disk the child names, with the child's size. */
static DWORD vd_set_parent_path(struct vd_image *image, const WCHAR *parent_path)
{
    if (image->subtype != VD_SUBTYPE_DIFFERENCING)
        return vd_not_for(image, "a parent path");
    if (!image->format->set_parent)
        return vd_not_for(image, "a parent path");
    if (!parent_path || !parent_path[0])
        return vd_fail(ERROR_INVALID_PARAMETER, "ParentFilePath is empty");
    char *path = vd_utf16_to_utf8(parent_path);
    if (!path)
        return vd_fail(ERROR_INVALID_NAME, "ParentFilePath is not valid UTF-16");
    struct vd_image *parent = NULL;
    DWORD status = vd_image_open(path, VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, false, 0, &parent);
    if (status == ERROR_FILE_NOT_FOUND || status == ERROR_PATH_NOT_FOUND)
        status = vd_fail(ERROR_VHD_PARENT_VHD_NOT_FOUND, "%s: the new parent %s does not exist", image->path, path);
    else if (status == ERROR_ACCESS_DENIED)
        status = vd_fail(ERROR_VHD_PARENT_VHD_ACCESS_DENIED, "%s: no access to the new parent %s", image->path, path);
    else if (status != ERROR_SUCCESS && status != ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED) {
        char detail[400];
        snprintf(detail, sizeof detail, "%s", vd_last_error_detail());
        status = vd_fail(ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT, "%s: the new parent %s: 0x%08x: %s",
                         image->path, path, (unsigned)status, detail);
    }
    free(path);
    if (status != ERROR_SUCCESS)
        return status;
    if (vd_in_chain(parent, image->file_dev, image->file_ino))
        status = vd_fail(ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED, "%s: the new parent %s has the child in its chain",
                         image->path, parent->path);
    else if (parent->format != image->format)
        status = vd_fail(ERROR_VHD_INVALID_TYPE, "%s: the new parent %s is a %s, the child a %s", image->path,
                         parent->path, parent->format->name, image->format->name);
    else if (!vd_guid_equal(&parent->identifier, &image->parent_identifier))
        status = vd_fail(ERROR_VHD_CHILD_PARENT_ID_MISMATCH,
                         "%s: the new parent %s is not the disk the child names (identifiers differ)", image->path,
                         parent->path);
    else if (parent->virtual_size != image->virtual_size ||
             parent->logical_sector_size != image->logical_sector_size)
        status = vd_fail(ERROR_VHD_CHILD_PARENT_SIZE_MISMATCH, "%s: %llu bytes, the new parent %s has %llu",
                         image->path, (ull)image->virtual_size, parent->path, (ull)parent->virtual_size);
    if (status != ERROR_SUCCESS) {
        vd_image_close(parent);
        return status;
    }
    return image->format->set_parent(image, parent);
}

/* ParentPathWithDepthInfo: ChildDepth 1 is the disk itself, 2 its parent
   (which must be a differencing disk too), and so on.  An ancestor is
   changed through a writable open of its own; then the handle's view of the
   chain below the leaf is opened afresh. */
static DWORD vd_set_parent_at_depth(struct vd_image *image, ULONG depth, const WCHAR *parent_path)
{
    if (depth == 0)
        return vd_fail(ERROR_INVALID_PARAMETER, "ChildDepth 0: the leaf is depth 1");
    if (depth == 1)
        return vd_set_parent_path(image, parent_path);
    const struct vd_image *child = image;
    for (ULONG level = 1; level < depth; level++) {
        child = child->parent;
        if (!child)
            return vd_fail(ERROR_INVALID_PARAMETER, "%s: the chain (as opened) has no disk at depth %u", image->path,
                           (unsigned)depth);
    }
    struct vd_image *ancestor = NULL;
    DWORD status = vd_image_open(child->path, child->format->device_id, true, OPEN_VIRTUAL_DISK_FLAG_NO_PARENTS,
                                 &ancestor);
    if (status == ERROR_SUCCESS)
        status = vd_set_parent_path(ancestor, parent_path);
    vd_image_close(ancestor);
    if (status != ERROR_SUCCESS)
        return status;
    struct vd_image *reopened = NULL;
    status = vd_image_open(image->parent->path, image->parent->format->device_id, false, 0, &reopened);
    if (status != ERROR_SUCCESS)
        return status;
    vd_image_close(image->parent);
    image->parent = reopened;
    return ERROR_SUCCESS;
}

static DWORD vd_set_info(struct vd_image *image, const SET_VIRTUAL_DISK_INFO *info)
{
    const struct vd_format *format = image->format;
    switch (info->Version) {
    case SET_VIRTUAL_DISK_INFO_PARENT_PATH:
        return vd_set_parent_path(image, info->ParentFilePath);
    case SET_VIRTUAL_DISK_INFO_PARENT_PATH_WITH_DEPTH:
        return vd_set_parent_at_depth(image, info->ParentPathWithDepthInfo.ChildDepth,
                                      info->ParentPathWithDepthInfo.ParentFilePath);
    case SET_VIRTUAL_DISK_INFO_IDENTIFIER:
        if (!format->set_identifier)
            return vd_not_for(image, "an identifier");
        if (vd_guid_is_zero(&info->UniqueIdentifier))
            return vd_fail(ERROR_INVALID_PARAMETER, "UniqueIdentifier is GUID_NULL");
        return format->set_identifier(image, &info->UniqueIdentifier);
    case SET_VIRTUAL_DISK_INFO_PHYSICAL_SECTOR_SIZE:
        if (info->VhdPhysicalSectorSize != 512 && info->VhdPhysicalSectorSize != 4096)
            return vd_fail(ERROR_INVALID_PARAMETER, "physical sector size %u is not 512 or 4096",
                           (unsigned)info->VhdPhysicalSectorSize);
        if (!format->set_physical_sector_size)
            return vd_not_for(image, "a physical sector size");
        return format->set_physical_sector_size(image, info->VhdPhysicalSectorSize);
    case SET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID:
        if (!format->set_virtual_disk_id)
            return vd_not_for(image, "a virtual disk id");
        return format->set_virtual_disk_id(image, &info->VirtualDiskId);
    case SET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE:
        if (format->device_id != VIRTUAL_STORAGE_TYPE_DEVICE_VHDX)
            return vd_not_for(image, "change tracking");
        /* Off is what it is; this provider keeps no change tracking log. */
        if (info->ChangeTrackingEnabled)
            return vd_fail(ERROR_NOT_SUPPORTED, "resilient change tracking is not supported on Linux");
        return ERROR_SUCCESS;
    case SET_VIRTUAL_DISK_INFO_PARENT_LOCATOR:
        return vd_fail(ERROR_NOT_SUPPORTED, "SET_VIRTUAL_DISK_INFO_PARENT_LOCATOR (a parent of another linkage) "
                                            "is not supported on Linux");
    default:
        return vd_fail(ERROR_INVALID_PARAMETER, "SET_VIRTUAL_DISK_INFO.Version %d is unknown", (int)info->Version);
    }
}

DWORD WINAPI SetVirtualDiskInformation(HANDLE VirtualDiskHandle, SET_VIRTUAL_DISK_INFO *VirtualDiskInfo)
{
    vd_clear_detail();
    if (!VirtualDiskInfo)
        return vd_fail(ERROR_INVALID_PARAMETER, "VirtualDiskInfo is required");
    DWORD status;
    struct vd_handle *handle = vd_metaops_handle(VirtualDiskHandle, &status);
    if (!handle)
        return status;
    status = vd_set_info(handle->image, VirtualDiskInfo);
    vd_handle_release(handle);
    return status;
}

/* ---- ResizeVirtualDisk and ExpandVirtualDisk ---------------------------- */

static DWORD vd_check_new_size(const struct vd_image *image, uint64_t size)
{
    if (size == 0 || size % image->logical_sector_size)
        return vd_fail(ERROR_INVALID_PARAMETER, "NewSize %llu is not a positive multiple of the %u-byte sector",
                       (ull)size, (unsigned)image->logical_sector_size);
    if (image->subtype == VD_SUBTYPE_DIFFERENCING)
        return vd_fail(ERROR_VHD_INVALID_TYPE, "%s: a differencing disk has its parent's size", image->path);
    if (!image->format->resize)
        return vd_not_for(image, "a new size");
    return ERROR_SUCCESS;
}

/* Shrinking keeps every partition whole unless the caller allows otherwise;
   without a partition table nothing is known to be unused, so only
   ALLOW_UNSAFE_VIRTUAL_SIZE shrinks such a disk. */
static DWORD vd_resize_size(struct vd_image *image, RESIZE_VIRTUAL_DISK_FLAG flags, uint64_t size, uint64_t *out)
{
    bool to_smallest = flags & RESIZE_VIRTUAL_DISK_FLAG_RESIZE_TO_SMALLEST_SAFE_VIRTUAL_SIZE;
    bool unsafe = flags & RESIZE_VIRTUAL_DISK_FLAG_ALLOW_UNSAFE_VIRTUAL_SIZE;
    if (image->subtype == VD_SUBTYPE_DIFFERENCING)
        return vd_fail(ERROR_VHD_INVALID_TYPE, "%s: a differencing disk has its parent's size", image->path);
    if (to_smallest || (!unsafe && size < image->virtual_size)) {
        uint64_t smallest;
        bool from_table;
        DWORD status = vd_smallest_safe_size(image, &smallest, &from_table);
        if (status != ERROR_SUCCESS)
            return status;
        if (to_smallest) {
            if (!from_table)
                return vd_fail(ERROR_VHD_COULD_NOT_COMPUTE_MINIMUM_VIRTUAL_SIZE,
                               "%s: no MBR or GPT partition table tells which part of the disk is in use", image->path);
            if (smallest >= image->virtual_size)
                return vd_fail(ERROR_VHD_ALREADY_AT_OR_BELOW_MINIMUM_VIRTUAL_SIZE,
                               "%s: %llu bytes is already the smallest safe size", image->path,
                               (ull)image->virtual_size);
            size = smallest;
        } else if (size < smallest) {
            return vd_fail(ERROR_VHD_RESIZE_WOULD_TRUNCATE_DATA,
                           "%s: %llu bytes would cut the partitions, which need %llu%s", image->path, (ull)size,
                           (ull)smallest, from_table ? "" : " (no partition table: nothing is known to be unused)");
        }
    }
    *out = size;
    return vd_check_new_size(image, size);
}

static DWORD vd_expand_size(const struct vd_image *image, uint64_t size)
{
    DWORD status = vd_check_new_size(image, size);
    if (status == ERROR_SUCCESS && size <= image->virtual_size)
        status = vd_fail(ERROR_INVALID_PARAMETER, "NewSize %llu does not exceed the current %llu bytes", (ull)size,
                         (ull)image->virtual_size);
    return status;
}

/* A resize or expand to a size already checked, as the job runs it. */
struct vd_resize_job {
    struct vd_handle *handle; /* the call's reference */
    uint64_t size;
};

static DWORD vd_resize_work(struct vd_job *job, void *context)
{
    struct vd_resize_job *r = context;
    struct vd_image *image = r->handle->image;
    if (vd_job_cancelled(job))
        return vd_fail(ERROR_OPERATION_ABORTED, "the resize of %s was cancelled", image->path);
    DWORD status = image->format->resize(image, r->size, job);
    if (status == ERROR_SUCCESS && __atomic_load_n(&job->total, __ATOMIC_RELAXED) == 0) {
        /* Nothing was reserved: one unit, so that progress still ends at its
           completion value. */
        vd_job_set_total(job, 1);
        vd_job_advance(job, 1);
    }
    return status;
}

static void vd_resize_free(void *context, DWORD status)
{
    struct vd_resize_job *r = context;
    vd_handle_release(r->handle);
    free(r);
}

/* Runs the change now, or for an OVERLAPPED as a job; releases handle. */
static DWORD vd_resize_run(struct vd_handle *handle, uint64_t size, OVERLAPPED *overlapped)
{
    struct vd_resize_job *r = calloc(1, sizeof *r);
    if (!r) {
        vd_handle_release(handle);
        return vd_fail(ERROR_OUTOFMEMORY, "resize job");
    }
    *r = (struct vd_resize_job){handle, size};
    if (overlapped)
        return vd_job_start(handle, overlapped, vd_resize_work, r, vd_resize_free);
    struct vd_job job;
    vd_job_init_sync(&job);
    DWORD status = vd_resize_work(&job, r);
    vd_resize_free(r, status);
    return status;
}

DWORD WINAPI ResizeVirtualDisk(HANDLE VirtualDiskHandle, RESIZE_VIRTUAL_DISK_FLAG Flags,
                               RESIZE_VIRTUAL_DISK_PARAMETERS *Parameters, OVERLAPPED *Overlapped)
{
    vd_clear_detail();
    const RESIZE_VIRTUAL_DISK_FLAG known = RESIZE_VIRTUAL_DISK_FLAG_ALLOW_UNSAFE_VIRTUAL_SIZE |
                                           RESIZE_VIRTUAL_DISK_FLAG_RESIZE_TO_SMALLEST_SAFE_VIRTUAL_SIZE;
    if (!Parameters || Parameters->Version != RESIZE_VIRTUAL_DISK_VERSION_1)
        return vd_fail(ERROR_INVALID_PARAMETER, "RESIZE_VIRTUAL_DISK_PARAMETERS version 1 is required");
    if (Flags & ~known)
        return vd_fail(ERROR_INVALID_PARAMETER, "resize flags 0x%08x include unknown bits", (unsigned)Flags);
    bool to_smallest = Flags & RESIZE_VIRTUAL_DISK_FLAG_RESIZE_TO_SMALLEST_SAFE_VIRTUAL_SIZE;
    if (to_smallest != (Parameters->Version1.NewSize == 0))
        return vd_fail(ERROR_INVALID_PARAMETER, "NewSize must be 0 exactly when RESIZE_TO_SMALLEST_SAFE_VIRTUAL_SIZE "
                                                "is set");
    DWORD status;
    struct vd_handle *handle = vd_metaops_handle(VirtualDiskHandle, &status);
    if (!handle)
        return status;
    uint64_t size = 0;
    status = vd_resize_size(handle->image, Flags, Parameters->Version1.NewSize, &size);
    if (status != ERROR_SUCCESS) {
        vd_handle_release(handle);
        return status;
    }
    return vd_resize_run(handle, size, Overlapped);
}

DWORD WINAPI ExpandVirtualDisk(HANDLE VirtualDiskHandle, EXPAND_VIRTUAL_DISK_FLAG Flags,
                               EXPAND_VIRTUAL_DISK_PARAMETERS *Parameters, OVERLAPPED *Overlapped)
{
    vd_clear_detail();
    if (!Parameters || Parameters->Version != EXPAND_VIRTUAL_DISK_VERSION_1)
        return vd_fail(ERROR_INVALID_PARAMETER, "EXPAND_VIRTUAL_DISK_PARAMETERS version 1 is required");
    /* NOTIFY_CHANGE asks Windows to tell the attached disk's stack; a disk
       must be detached here, so there is no one to tell. */
    if (Flags & ~(EXPAND_VIRTUAL_DISK_FLAG)EXPAND_VIRTUAL_DISK_FLAG_NOTIFY_CHANGE)
        return vd_fail(ERROR_INVALID_PARAMETER, "expand flags 0x%08x include unknown bits", (unsigned)Flags);
    DWORD status;
    struct vd_handle *handle = vd_metaops_handle(VirtualDiskHandle, &status);
    if (!handle)
        return status;
    status = vd_expand_size(handle->image, Parameters->Version1.NewSize);
    if (status != ERROR_SUCCESS) {
        vd_handle_release(handle);
        return status;
    }
    return vd_resize_run(handle, Parameters->Version1.NewSize, Overlapped);
}
