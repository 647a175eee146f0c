/*
 * CompactVirtualDisk: the call's parameters and handle rules, run
 * synchronously or as a job for an OVERLAPPED (job.h); the work is the
 * engine's (compact.c).
 *
 * Rules, as Microsoft documents them: dynamic and differencing disks only
 * (ERROR_VHD_INVALID_TYPE), a handle with VIRTUAL_DISK_ACCESS_METAOPS
 * (ERROR_ACCESS_DENIED).  As for the other offline changes (metaops.c),
 * another handle open on the image is ERROR_SHARING_VIOLATION, since it
 * would keep using the old block table.
 *
 * Windows' file-system-aware mode compacts a disk attached read-only; on
 * Linux an attached dynamic or differencing disk is served by a helper
 * process that owns its block table, and this provider does not (yet)
 * compact inside it: an attached disk is refused with ERROR_NOT_SUPPORTED,
 * and a detached one is compacted whatever the handle's other access.
 */
#include <stdlib.h>

#include "compact.h"
#include "errors.h"
#include "handles.h"

/* ---- CompactVirtualDisk ------------------------------------------------- */

struct vd_compact {
    struct vd_handle *handle;
    COMPACT_VIRTUAL_DISK_FLAG flags;
};

static DWORD vd_compact_work(struct vd_job *job, void *context)
{
    struct vd_compact *c = context;
    return vd_compact_image(c->handle->image, c->flags, job);
}

static void vd_compact_free(void *context, DWORD status)
{
    struct vd_compact *c = context;
    vd_handle_release(c->handle);
    free(c);
}

/* Every rule a compaction must pass before it starts. */
static DWORD vd_compact_access(struct vd_handle *handle)
{
    struct vd_image *image = handle->image;
    bool helper;
    if (!(handle->access & VIRTUAL_DISK_ACCESS_METAOPS))
        return vd_fail(ERROR_ACCESS_DENIED, "the handle was opened without VIRTUAL_DISK_ACCESS_METAOPS");
    if ((image->subtype != VD_SUBTYPE_DYNAMIC && image->subtype != VD_SUBTYPE_DIFFERENCING)
        || !image->format->compact_layout)
        return vd_fail(ERROR_VHD_INVALID_TYPE, "%s is a %s%s image: only dynamic and differencing disks compact",
                       image->path, image->subtype == VD_SUBTYPE_FIXED ? "fixed " : "", image->format->name);
    if (vd_handle_attached_loop(handle, &helper) >= 0)
        return vd_fail(ERROR_NOT_SUPPORTED,
                       "%s is attached: compacting an attached disk (file-system-aware mode) is not supported on "
                       "Linux; detach it and compact it detached",
                       image->path);
    if (!image->writable)
        return vd_fail(ERROR_ACCESS_DENIED, "%s is open read-only", image->path);
    if (vd_handle_has_others(handle))
        return vd_fail(ERROR_SHARING_VIOLATION, "other handles to %s are open; close them first", image->path);
    if (vd_job_running(handle))
        return vd_fail(ERROR_BUSY, "an operation is still running on this handle");
    return ERROR_SUCCESS;
}

DWORD WINAPI CompactVirtualDisk(HANDLE VirtualDiskHandle, COMPACT_VIRTUAL_DISK_FLAG Flags,
                                COMPACT_VIRTUAL_DISK_PARAMETERS *Parameters, OVERLAPPED *Overlapped)
{
    vd_clear_detail();
    const COMPACT_VIRTUAL_DISK_FLAG known =
        COMPACT_VIRTUAL_DISK_FLAG_NO_ZERO_SCAN | COMPACT_VIRTUAL_DISK_FLAG_NO_BLOCK_MOVES;
    if (Parameters && Parameters->Version != COMPACT_VIRTUAL_DISK_VERSION_1)
        return vd_fail(ERROR_INVALID_PARAMETER, "COMPACT_VIRTUAL_DISK_PARAMETERS.Version %d is not 1",
                       (int)Parameters->Version);
    if (Flags & ~known)
        return vd_fail(ERROR_INVALID_PARAMETER, "compact flags 0x%08x include unknown bits", (unsigned)Flags);
    struct vd_handle *handle = vd_handle_acquire(VirtualDiskHandle);
    if (!handle)
        return vd_handle_refuse(VirtualDiskHandle, ERROR_INVALID_HANDLE);
    DWORD status = vd_compact_access(handle);
    if (status == ERROR_SUCCESS && Overlapped)
        status = vd_job_check_overlapped(handle, Overlapped);
    struct vd_compact *c = NULL;
    if (status == ERROR_SUCCESS) {
        c = calloc(1, sizeof *c);
        if (!c)
            status = vd_fail(ERROR_OUTOFMEMORY, "compaction state");
    }
    if (status != ERROR_SUCCESS) {
        vd_handle_release(handle);
        return status;
    }
    c->handle = handle; /* the call's reference passes to the compaction */
    c->flags = Flags;
    if (Overlapped)
        return vd_job_start(handle, Overlapped, vd_compact_work, c, vd_compact_free);
    struct vd_job job;
    vd_job_init_sync(&job);
    status = vd_compact_work(&job, c);
    vd_compact_free(c, status);
    return status;
}
