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
 * Windows' file-system-aware mode compacts a disk attached read-only (the
 * handle opened with METAOPS and ATTACH_RO, attached read-only, then
 * compacted).  On Linux an attached dynamic or differencing disk is served
 * by a helper process that owns its block table, so the compaction runs
 * there (servecompact.h), followed through the served-operation job
 * (servedop.h): the disk stays attached and readable, and what the guest
 * discarded (fstrim before the read-only attach) is returned with the zero
 * blocks.  The server refuses a read-write attachment (ERROR_NOT_SUPPORTED:
 * a guest writing would race every move).  A disk loop-mapped directly (a
 * fixed image, or a VHDX whose blocks lie in order) is the file itself and
 * cannot move its blocks while attached: ERROR_NOT_SUPPORTED too.  Other
 * handles do not matter there: the server alone reads the block table.
 */
#include <stdlib.h>
#include <string.h>

#include "compact.h"
#include "errors.h"
#include "handles.h"
#include "job.h"
#include "servedop.h"
#include "serveproto.h"

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

/* What a compaction of an attached disk needs, for the refusals of
   vd_served_op_route(). */
#define VD_COMPACT_NEEDS                                                                                  \
    "an attached disk compacts inside its server (a dynamic or differencing image attached read-only); "  \
    "detach it to compact it"

/* Every rule a compaction must pass before it starts; *attached: the disk
   is attached (then it is compacted in its server). */
static DWORD vd_compact_access(struct vd_handle *handle, bool *attached)
{
    struct vd_image *image = handle->image;
    bool helper;
    if (!(handle->access & VIRTUAL_DISK_ACCESS_METAOPS))
        return vd_fail(ERROR_ACCESS_DENIED, "the handle was opened without VIRTUAL_DISK_ACCESS_METAOPS");
    if ((image->subtype != VD_SUBTYPE_DYNAMIC && image->subtype != VD_SUBTYPE_DIFFERENCING)
        || !image->format->compact_layout)
        return vd_fail(ERROR_VHD_INVALID_TYPE, "%s is a %s%s image: only dynamic and differencing disks compact",
                       image->path, image->subtype == VD_SUBTYPE_FIXED ? "fixed " : "", image->format->name);
    if (vd_job_running(handle))
        return vd_fail(ERROR_BUSY, "an operation is still running on this handle");
    vd_disks_lock();
    *attached = vd_handle_attached_loop(handle, &helper) >= 0;
    vd_disks_unlock();
    if (*attached)
        return ERROR_SUCCESS;
    if (!image->writable)
        return vd_fail(ERROR_VHD_INVALID_STATE, "%s was attached read-only when this handle was opened; open it "
                                                "again, now that it is detached, to compact it", image->path);
    if (vd_handle_has_others(handle))
        return vd_fail(ERROR_SHARING_VIOLATION, "other handles to %s are open; close them first", image->path);
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
    bool attached = false;
    DWORD status = vd_compact_access(handle, &attached);
    if (status == ERROR_SUCCESS && Overlapped)
        status = vd_job_check_overlapped(handle, Overlapped);
    if (status == ERROR_SUCCESS && attached) {
        /* The file-system-aware mode: in the server, which owns the BAT. */
        char payload[sizeof(struct vd_msg_operation_start) + 1] = {0};
        struct vd_msg_operation_start request = {.kind = VD_OPERATION_COMPACT, .flags = Flags};
        memcpy(payload, &request, sizeof request);
        status = vd_served_op_run(handle, Overlapped, VD_OPERATION_COMPACT, payload, sizeof payload,
                                  VD_COMPACT_NEEDS, "the compaction");
        vd_handle_release(handle);
        return status;
    }
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
