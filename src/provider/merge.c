/*
 * MergeVirtualDisk: offline merge of a differencing chain, as Microsoft
 * documents it.
 *
 * Depths count from the leaf (the handle's disk) at 1.  Version 1's
 * MergeDepth n merges disks 1..n into disk n + 1; version 2 merges disks
 * MergeSourceDepth..MergeTargetDepth - 1 into MergeTargetDepth.  The target
 * is changed to read exactly as the source disk did; nothing is deleted.
 *
 * How: for each place where some disk from the source down to (not
 * including) the target holds data (the formats' block_status()), the
 * source's view is read and written to the target through the target
 * format's own write path, which orders data before the metadata that
 * points at it.  The format is told the whole list first
 * (prepare_bulk_write: a VHD reserves its new blocks at once and writes
 * their BAT entries at the flush that ends the copy, after the data).  The chain's view never changes on
 * the way (the target only ever receives what the source disk shows
 * there), so an interrupted merge leaves every disk readable and the merge
 * can simply run again.
 *
 * Children are invalidated as the formats link them: a VHDX target gets a
 * new DataWriteGuid once the copy is complete (vd_merge_work), which every
 * child names in its parent_linkage, so the merged disks (and any other
 * child of the target) no longer open against it; a merge that fails, is
 * cancelled or killed leaves it as it was, so the chain still opens and the
 * merge can be run again.  A VHD
 * child names its parent's unique id, which a merge leaves alone: such
 * children still open (the merged ones still read the same data, any other
 * child of the target reads changed data).  With version 2 and a source
 * below the leaf, the disk just above the source is re-pointed at the
 * target, so the leaf's chain stays whole.
 *
 * Access (vd_merge_access, the one place to wire sharing rules to): a handle
 * with VIRTUAL_DISK_ACCESS_METAOPS whose RWDepth reaches the target, no disk
 * of the chain down to the target attached, no other handle on the leaf or
 * the target.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bytes.h"
#include "errors.h"
#include "handles.h"
#include "image.h"
#include "job.h"
#include "share.h"

typedef unsigned long long ull;

enum { VD_MERGE_CHUNK = 1 << 20, VD_MERGE_MAX_DEPTH = 256 };

struct vd_merge {
    struct vd_handle *handle;
    ULONG source_depth, target_depth;
    struct vd_image *source;       /* the handle's chain, at source_depth */
    struct vd_image *target;       /* opened writable for the merge */
    struct vd_image *relink;       /* version 2, source below the leaf: the
                                      disk above the source, writable */
};

/* The disk at depth (1: the leaf) of the handle's chain, or NULL. */
static struct vd_image *vd_chain_at(struct vd_image *leaf, ULONG depth)
{
    struct vd_image *image = leaf;
    for (ULONG level = 1; image && level < depth; level++)
        image = image->parent;
    return image;
}

/* Every rule a merge must pass before it starts. */
static DWORD vd_merge_access(struct vd_handle *handle, ULONG source_depth, ULONG target_depth)
{
    struct vd_image *leaf = handle->image;
    if (!(handle->access & VIRTUAL_DISK_ACCESS_METAOPS))
        return vd_fail(ERROR_ACCESS_DENIED, "the handle was opened without VIRTUAL_DISK_ACCESS_METAOPS");
    if (leaf->subtype != VD_SUBTYPE_DIFFERENCING)
        return vd_fail(ERROR_VHD_INVALID_TYPE, "%s is not a differencing disk: there is nothing to merge",
                       leaf->path);
    if (handle->rw_depth < target_depth)
        return vd_fail(ERROR_INVALID_PARAMETER,
                       "the handle was opened with RWDepth %u; merging into the disk at depth %u needs an RWDepth "
                       "of at least %u (RWDepth must exceed MergeDepth)",
                       (unsigned)handle->rw_depth, (unsigned)target_depth, (unsigned)target_depth);
    ULONG depth = 1;
    for (struct vd_image *image = leaf; image && depth <= target_depth; image = image->parent, depth++) {
        if (depth < target_depth && !image->parent)
            return vd_fail(image->parent_resolved || image->subtype != VD_SUBTYPE_DIFFERENCING
                               ? ERROR_INVALID_PARAMETER
                               : ERROR_VHD_PARENT_VHD_NOT_FOUND,
                           "the chain of %s ends at depth %u (%s), above the merge target at depth %u%s", leaf->path,
                           (unsigned)depth, image->path, (unsigned)target_depth,
                           image->subtype == VD_SUBTYPE_DIFFERENCING ? " (opened without its parents)" : "");
        bool helper;
        if ((image == leaf && handle->disk->loop_number >= 0) || vd_share_attached_loop(image, &helper) >= 0)
            return vd_fail(ERROR_VHD_INVALID_STATE, "%s is attached; detach it before merging", image->path);
    }
    if (vd_handle_has_others(handle))
        return vd_fail(ERROR_SHARING_VIOLATION, "other handles to %s are open; close them first", leaf->path);
    struct vd_image *target = vd_chain_at(leaf, target_depth);
    if (vd_image_has_handles(target))
        return vd_fail(ERROR_SHARING_VIOLATION,
                       "the merge target %s is open elsewhere, or the parent of another open or attached disk; "
                       "close those first",
                       target->path);
    if (vd_job_running(handle))
        return vd_fail(ERROR_BUSY, "an operation is still running on this handle");
    return ERROR_SUCCESS;
}

static DWORD vd_merge_depths(const MERGE_VIRTUAL_DISK_PARAMETERS *p, ULONG *source, ULONG *target)
{
    switch (p->Version) {
    case MERGE_VIRTUAL_DISK_VERSION_1:
        if (p->Version1.MergeDepth == 0 || p->Version1.MergeDepth >= VD_MERGE_MAX_DEPTH)
            return vd_fail(ERROR_INVALID_PARAMETER, "MergeDepth %u is not from 1 to %u",
                           (unsigned)p->Version1.MergeDepth, VD_MERGE_MAX_DEPTH - 1);
        *source = 1;
        *target = p->Version1.MergeDepth + 1;
        return ERROR_SUCCESS;
    case MERGE_VIRTUAL_DISK_VERSION_2:
        *source = p->Version2.MergeSourceDepth;
        *target = p->Version2.MergeTargetDepth;
        if (*source == 0 || *target <= *source || *target > VD_MERGE_MAX_DEPTH)
            return vd_fail(ERROR_INVALID_PARAMETER,
                           "MergeSourceDepth %u and MergeTargetDepth %u: the leaf is depth 1 and the target must lie "
                           "below the source", (unsigned)*source, (unsigned)*target);
        return ERROR_SUCCESS;
    default:
        return vd_fail(ERROR_INVALID_PARAMETER, "MERGE_VIRTUAL_DISK_PARAMETERS.Version %d is not 1 or 2",
                       (int)p->Version);
    }
}

/* Where disks source..target-1 hold anything, as sorted, disjoint extents. */
static DWORD vd_merge_extents(struct vd_merge *m, struct vd_extent **out, size_t *count, uint64_t *total)
{
    struct vd_image *layers[VD_MERGE_MAX_DEPTH];
    size_t n = 0;
    for (struct vd_image *image = m->source; image != vd_chain_at(m->source, m->target_depth - m->source_depth + 1);
         image = image->parent)
        layers[n++] = image;
    struct vd_extent *extents = NULL;
    size_t used = 0, capacity = 0;
    uint64_t size = m->source->virtual_size, sum = 0;
    DWORD status = ERROR_SUCCESS;
    for (uint64_t offset = 0; offset < size && status == ERROR_SUCCESS;) {
        uint64_t step = size - offset;
        bool held = false;
        for (size_t i = 0; i < n && status == ERROR_SUCCESS; i++) {
            enum vd_block_state state;
            uint64_t run;
            status = vd_image_block_status(layers[i], offset, step, &state, &run);
            if (status == ERROR_SUCCESS) {
                held |= state != VD_BLOCK_ABSENT;
                step = run < step ? run : step;
            }
        }
        if (status != ERROR_SUCCESS)
            break;
        if (held) {
            if (used && extents[used - 1].offset + extents[used - 1].length == offset) {
                extents[used - 1].length += step;
            } else {
                if (used == capacity) {
                    capacity = capacity ? capacity * 2 : 64;
                    struct vd_extent *grown = realloc(extents, capacity * sizeof *grown);
                    if (!grown) {
                        status = vd_fail(ERROR_OUTOFMEMORY, "the list of blocks to merge");
                        break;
                    }
                    extents = grown;
                }
                extents[used++] = (struct vd_extent){offset, step};
            }
            sum += step;
        }
        offset += step;
    }
    if (status != ERROR_SUCCESS) {
        free(extents);
        return status;
    }
    *out = extents;
    *count = used;
    *total = sum;
    return ERROR_SUCCESS;
}

static DWORD vd_merge_flush(struct vd_image *image)
{
    if (image->format->flush)
        return image->format->flush(image);
    return fdatasync(image->fd) == 0 ? ERROR_SUCCESS : vd_fail_errno(errno, "flushing %s", image->path);
}

static DWORD vd_merge_copy(struct vd_job *job, struct vd_merge *m)
{
    struct vd_extent *extents;
    size_t count;
    uint64_t total;
    DWORD status = vd_merge_extents(m, &extents, &count, &total);
    if (status != ERROR_SUCCESS)
        return status;
    vd_job_set_total(job, total);
    if (m->target->format->prepare_bulk_write)
        status = m->target->format->prepare_bulk_write(m->target, extents, count);
    uint8_t *buffer = malloc(VD_MERGE_CHUNK);
    if (!buffer && status == ERROR_SUCCESS)
        status = vd_fail(ERROR_OUTOFMEMORY, "merge buffer");
    for (size_t i = 0; i < count && status == ERROR_SUCCESS; i++) {
        for (uint64_t done = 0; done < extents[i].length && status == ERROR_SUCCESS;) {
            if (vd_job_cancelled(job)) {
                status = vd_fail(ERROR_OPERATION_ABORTED, "the merge of %s was cancelled", m->source->path);
                break;
            }
            uint64_t offset = extents[i].offset + done;
            size_t n = extents[i].length - done < VD_MERGE_CHUNK ? (size_t)(extents[i].length - done)
                                                                  : VD_MERGE_CHUNK;
            status = m->source->format->read(m->source, buffer, offset, n);
            if (status == ERROR_SUCCESS)
                status = m->target->format->write(m->target, buffer, offset, n);
            done += n;
            vd_job_advance(job, n);
        }
    }
    free(buffer);
    free(extents);
    /* Even a cancelled merge makes what it wrote durable before the target's
       identity is put back. */
    DWORD flushed = vd_merge_flush(m->target);
    return status != ERROR_SUCCESS ? status : flushed;
}

/* A VHDX target keeps the DataWriteGuid its children name until the copy is
   complete: its write path would change it before the first write (the
   spec's rule, so children notice a changed parent), which would cut the
   merged children off from a merge that stops half way.  The merge pins it
   (set_identifier with the same value starts the session) and changes it at
   the end, which invalidates the children then, as Windows documents. */
static DWORD vd_merge_work(struct vd_job *job, void *context)
{
    struct vd_merge *m = context;
    struct vd_image *target = m->target;
    bool pin = target->format->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_VHDX && target->format->set_identifier;
    DWORD status = pin ? target->format->set_identifier(target, &target->identifier) : ERROR_SUCCESS;
    if (status == ERROR_SUCCESS)
        status = vd_merge_copy(job, m);
    if (status == ERROR_SUCCESS && pin) {
        GUID changed;
        int error = vd_guid_generate(&changed);
        status = error ? vd_fail_errno(error, "generating a DataWriteGuid")
                       : target->format->set_identifier(target, &changed);
    }
    if (status == ERROR_SUCCESS && m->relink) {
        /* set_parent takes the parent it is given. */
        struct vd_image *parent = NULL;
        status = vd_image_open(target->path, target->format->device_id, false, 0, &parent);
        if (status == ERROR_SUCCESS)
            status = m->relink->format->set_parent(m->relink, parent);
    }
    return status;
}

static void vd_merge_free(void *context, DWORD status)
{
    struct vd_merge *m = context;
    vd_image_close(m->target);
    vd_image_close(m->relink);
    vd_handle_release(m->handle);
    free(m);
}

/* Opens what the merge writes: the target, and for a source below the
   leaf, the disk above it. */
static DWORD vd_merge_open(struct vd_merge *m)
{
    struct vd_image *leaf = m->handle->image;
    struct vd_image *target = vd_chain_at(leaf, m->target_depth);
    m->source = vd_chain_at(leaf, m->source_depth);
    DWORD status = vd_image_open(target->path, target->format->device_id, true, 0, &m->target);
    if (status == ERROR_SUCCESS && m->source_depth > 1) {
        struct vd_image *above = vd_chain_at(leaf, m->source_depth - 1);
        if (!above->format->set_parent)
            return vd_fail(ERROR_VHD_INVALID_TYPE, "%s cannot be re-pointed at the merge target", above->path);
        status = vd_image_open(above->path, above->format->device_id, true, OPEN_VIRTUAL_DISK_FLAG_NO_PARENTS,
                               &m->relink);
    }
    return status;
}

DWORD WINAPI MergeVirtualDisk(HANDLE VirtualDiskHandle, MERGE_VIRTUAL_DISK_FLAG Flags,
                              MERGE_VIRTUAL_DISK_PARAMETERS *Parameters, OVERLAPPED *Overlapped)
{
    vd_clear_detail();
    if (!Parameters)
        return vd_fail(ERROR_INVALID_PARAMETER, "Parameters is required");
    if (Flags != MERGE_VIRTUAL_DISK_FLAG_NONE)
        return vd_fail(ERROR_INVALID_PARAMETER, "merge flags must be MERGE_VIRTUAL_DISK_FLAG_NONE, not 0x%08x",
                       (unsigned)Flags);
    ULONG source_depth = 0, target_depth = 0; /* set by vd_merge_depths() on success */
    DWORD status = vd_merge_depths(Parameters, &source_depth, &target_depth);
    if (status != ERROR_SUCCESS)
        return status;
    struct vd_handle *handle = vd_handle_acquire(VirtualDiskHandle);
    if (!handle)
        return vd_fail(ERROR_INVALID_HANDLE, "not a handle from OpenVirtualDisk or CreateVirtualDisk");
    status = vd_merge_access(handle, source_depth, target_depth);
    if (status == ERROR_SUCCESS && Overlapped)
        status = vd_job_check_overlapped(handle, Overlapped);
    struct vd_merge *m = NULL;
    if (status == ERROR_SUCCESS) {
        m = calloc(1, sizeof *m);
        if (!m)
            status = vd_fail(ERROR_OUTOFMEMORY, "merge state");
    }
    if (status != ERROR_SUCCESS) {
        vd_handle_release(handle);
        return status;
    }
    m->handle = handle; /* the call's reference passes to the merge */
    m->source_depth = source_depth;
    m->target_depth = target_depth;
    status = vd_merge_open(m);
    if (status != ERROR_SUCCESS) {
        vd_merge_free(m, status);
        return status;
    }
    if (Overlapped)
        return vd_job_start(handle, Overlapped, vd_merge_work, m, vd_merge_free);
    struct vd_job job;
    vd_job_init_sync(&job);
    status = vd_merge_work(&job, m);
    vd_merge_free(m, status);
    return status;
}
