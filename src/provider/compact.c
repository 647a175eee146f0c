/*
 * The compaction engine (compact.h) behind CompactVirtualDisk's
 * file-system-agnostic mode.
 *
 * Three passes over what the format's compact_layout() lists:
 *   1. zero scan (unless NO_ZERO_SCAN): each data block is read as the disk
 *      shows it; an all-zero block is dropped where dropping keeps it
 *      reading zeros - always where the format states zeros (VHDX), and
 *      in a VHD differencing disk only where its parent reads zeros there
 *      too, since an unallocated block shows the parent.  Entries that
 *      still name space their block does not need (stale) go as well, and
 *      then the format's metadata that only dropped blocks needed (a VHDX
 *      chunk's sector bitmap once no block of the chunk is in the file).
 *   2. block moves (unless NO_BLOCK_MOVES): the last unit of the file is
 *      moved into the lowest hole below it that fits, then the next, until
 *      one does not fit.  The format copies, makes the copies durable and
 *      only then points its table at them (compact_move).
 *   3. the file is cut after the last thing still in use (compact_truncate).
 * Between the batches of each pass the image reads exactly as before, so a
 * cancellation (checked between batches) or a crash leaves a consistent
 * image, with whatever was already reclaimed.
 *
 * This file knows images only (the crash harness's tools link it); the
 * VirtDisk call with its handle rules is compact-api.c.
 */
#include "compact.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bytes.h"
#include "errors.h"

typedef unsigned long long ull;

enum {
    VD_COMPACT_CHUNK = 4 << 20,        /* zero scan reads */
    VD_COMPACT_DROP_BATCH = 4096,      /* units per compact_drop */
    VD_COMPACT_MOVE_BATCH = 64 << 20,  /* bytes per compact_move */
    VD_COMPACT_MOVE_UNITS = 256,
};

/* Whether image (or, parent: its parent) reads zeros over the unit's bytes. */
static DWORD vd_reads_zeros(struct vd_image *image, const struct vd_compact_unit *unit, uint8_t *buffer, bool *zero)
{
    *zero = true;
    for (uint64_t done = 0; done < unit->virtual_length && *zero;) {
        size_t n = unit->virtual_length - done < VD_COMPACT_CHUNK ? (size_t)(unit->virtual_length - done)
                                                                  : VD_COMPACT_CHUNK;
        DWORD status = image->format->read(image, buffer, unit->virtual_offset + done, n);
        if (status != ERROR_SUCCESS)
            return status;
        *zero = vd_all_zero(buffer, n);
        done += n;
    }
    return ERROR_SUCCESS;
}

static int vd_by_virtual_offset(const void *a, const void *b)
{
    const struct vd_compact_unit *x = a, *y = b;
    return x->virtual_offset < y->virtual_offset ? -1 : x->virtual_offset > y->virtual_offset;
}

static int vd_by_number(const void *a, const void *b)
{
    const uint64_t *x = a, *y = b;
    return *x < *y ? -1 : *x > *y;
}

static int vd_by_file_offset(const void *a, const void *b)
{
    const struct vd_compact_unit *x = a, *y = b;
    return x->file_offset < y->file_offset ? -1 : x->file_offset > y->file_offset;
}

static int vd_by_extent_offset(const void *a, const void *b)
{
    const struct vd_extent *x = a, *y = b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static uint64_t vd_round_up(uint64_t value, uint64_t align)
{
    return (value + align - 1) / align * align;
}

static DWORD vd_compact_cancelled(const struct vd_image *image)
{
    return vd_fail(ERROR_OPERATION_ABORTED, "the compaction of %s was cancelled; the image is consistent",
                   image->path);
}

/* Pass 1: drops what reads the same without its space.  Kept units are
   moved to the front of layout->units; *kept is their number. */
static DWORD vd_compact_drop_pass(struct vd_image *image, struct vd_compact_layout *layout,
                                  COMPACT_VIRTUAL_DISK_FLAG flags, struct vd_job *job, size_t *kept)
{
    bool scan = !(flags & COMPACT_VIRTUAL_DISK_FLAG_NO_ZERO_SCAN);
    if (scan && layout->drop_shows_parent && !image->parent)
        return vd_fail(ERROR_VHD_PARENT_VHD_NOT_FOUND,
                       "%s: the zero scan of a differencing disk needs its parent, which was not opened "
                       "(OPEN_VIRTUAL_DISK_FLAG_NO_PARENTS); use COMPACT_VIRTUAL_DISK_FLAG_NO_ZERO_SCAN",
                       image->path);
    /* In disk order: the scan then reads the disk (and any parent) front to back. */
    qsort(layout->units, layout->unit_count, sizeof *layout->units, vd_by_virtual_offset);
    struct vd_compact_unit *drop = malloc((layout->unit_count + 1) * sizeof *drop);
    struct vd_compact_unit *grouped = malloc((layout->unit_count + 1) * sizeof *grouped);
    uint8_t *buffer = scan ? malloc(VD_COMPACT_CHUNK) : NULL;
    DWORD status = !drop || !grouped || (scan && !buffer) ? vd_fail(ERROR_OUTOFMEMORY, "compaction buffers")
                                                          : ERROR_SUCCESS;
    size_t dropping = 0, keep = 0, group_count = 0;
    for (size_t i = 0; i < layout->unit_count && status == ERROR_SUCCESS; i++) {
        struct vd_compact_unit *unit = &layout->units[i];
        if (unit->kind == VD_UNIT_METADATA && unit->group) {
            grouped[group_count++] = *unit; /* decided once the data is */
            continue;
        }
        bool zero = unit->kind == VD_UNIT_STALE;
        if (unit->kind == VD_UNIT_DATA && scan) {
            if (vd_job_cancelled(job)) {
                status = vd_compact_cancelled(image);
                break;
            }
            status = vd_reads_zeros(image, unit, buffer, &zero);
            /* The parent shows through a dropped block: it must read zeros too. */
            if (status == ERROR_SUCCESS && zero && layout->drop_shows_parent)
                status = vd_reads_zeros(image->parent, unit, buffer, &zero);
            vd_job_advance(job, unit->virtual_length);
        }
        if (zero)
            drop[dropping++] = *unit;
        else
            layout->units[keep++] = *unit;
        if (status == ERROR_SUCCESS && dropping == VD_COMPACT_DROP_BATCH) {
            status = image->format->compact_drop(image, drop, dropping);
            dropping = 0;
        }
    }
    if (status == ERROR_SUCCESS && dropping)
        status = image->format->compact_drop(image, drop, dropping);
    /* After the data they served is durably gone, never before: metadata
       whose group keeps no data unit. */
    uint64_t *kept_groups = NULL;
    size_t kept_group_count = 0;
    if (status == ERROR_SUCCESS && group_count) {
        kept_groups = malloc((keep + 1) * sizeof *kept_groups);
        if (!kept_groups)
            status = vd_fail(ERROR_OUTOFMEMORY, "compaction buffers");
        for (size_t k = 0; k < keep && kept_groups; k++)
            if (layout->units[k].kind == VD_UNIT_DATA && layout->units[k].group)
                kept_groups[kept_group_count++] = layout->units[k].group;
        if (kept_groups)
            qsort(kept_groups, kept_group_count, sizeof *kept_groups, vd_by_number);
    }
    dropping = 0;
    for (size_t g = 0; g < group_count && status == ERROR_SUCCESS; g++) {
        if (bsearch(&grouped[g].group, kept_groups, kept_group_count, sizeof *kept_groups, vd_by_number))
            layout->units[keep++] = grouped[g];
        else
            drop[dropping++] = grouped[g];
    }
    free(kept_groups);
    if (status == ERROR_SUCCESS && dropping)
        status = image->format->compact_drop(image, drop, dropping);
    free(buffer);
    free(drop);
    free(grouped);
    *kept = keep;
    return status;
}

/* The free stretches of the file below its last used byte, lowest first. */
static DWORD vd_compact_holes(const struct vd_compact_layout *layout, size_t kept, struct vd_extent **out,
                              size_t *count)
{
    size_t n = layout->fixed_count + kept;
    struct vd_extent *used = malloc((n + 1) * sizeof *used);
    struct vd_extent *holes = malloc((n + 1) * sizeof *holes);
    if (!used || !holes) {
        free(used);
        free(holes);
        return vd_fail(ERROR_OUTOFMEMORY, "the compaction's list of holes");
    }
    memcpy(used, layout->fixed, layout->fixed_count * sizeof *used);
    for (size_t i = 0; i < kept; i++)
        used[layout->fixed_count + i] = (struct vd_extent){layout->units[i].file_offset, layout->units[i].length};
    qsort(used, n, sizeof *used, vd_by_extent_offset);
    size_t h = 0;
    uint64_t end = 0;
    for (size_t i = 0; i < n; i++) {
        if (used[i].offset > end)
            holes[h++] = (struct vd_extent){end, used[i].offset - end};
        if (used[i].offset + used[i].length > end)
            end = used[i].offset + used[i].length;
    }
    free(used);
    *out = holes;
    *count = h;
    return ERROR_SUCCESS;
}

/* Moves n units (batch[k] to targets[k], layout->units[moved[k]]) in one
   go, unless the job was cancelled; bytes is what they hold. */
static DWORD vd_compact_move_batch(struct vd_image *image, struct vd_compact_layout *layout,
                                   const struct vd_compact_unit *batch, const uint64_t *targets,
                                   const size_t *moved, size_t n, uint64_t bytes, struct vd_job *job)
{
    DWORD status = vd_job_cancelled(job) ? vd_compact_cancelled(image)
                                         : image->format->compact_move(image, batch, targets, n);
    for (size_t k = 0; k < n && status == ERROR_SUCCESS; k++)
        layout->units[moved[k]].file_offset = targets[k];
    vd_job_advance(job, bytes);
    return status;
}

/* Pass 2: the last units into the lowest holes that fit below them. */
static DWORD vd_compact_move_pass(struct vd_image *image, struct vd_compact_layout *layout, size_t kept,
                                  struct vd_job *job)
{
    struct vd_extent *holes = NULL;
    size_t hole_count = 0;
    DWORD status = vd_compact_holes(layout, kept, &holes, &hole_count);
    if (status != ERROR_SUCCESS)
        return status;
    qsort(layout->units, kept, sizeof *layout->units, vd_by_file_offset);
    struct vd_compact_unit *batch = malloc(VD_COMPACT_MOVE_UNITS * sizeof *batch);
    uint64_t *targets = malloc(VD_COMPACT_MOVE_UNITS * sizeof *targets);
    size_t *moved = malloc(VD_COMPACT_MOVE_UNITS * sizeof *moved);
    if (!batch || !targets || !moved)
        status = vd_fail(ERROR_OUTOFMEMORY, "the compaction's list of moves");
    size_t n = 0, first_hole = 0;
    uint64_t bytes = 0;
    for (size_t i = kept; i-- > 0 && status == ERROR_SUCCESS;) {
        struct vd_compact_unit *unit = &layout->units[i];
        uint64_t target = 0;
        bool found = false;
        for (size_t h = first_hole; h < hole_count && !found; h++) {
            uint64_t at = vd_round_up(holes[h].offset, layout->alignment);
            uint64_t hole_end = holes[h].offset + holes[h].length;
            if (at + unit->length > unit->file_offset)
                break; /* holes lie ever higher: none below this unit fits */
            if (at + unit->length <= hole_end) {
                target = at;
                found = true;
                holes[h].length = hole_end - (at + unit->length);
                holes[h].offset = at + unit->length;
            }
        }
        while (first_hole < hole_count && holes[first_hole].length < layout->alignment)
            first_hole++;
        if (!found)
            break; /* nothing above this unit can go below it either */
        batch[n] = *unit;
        targets[n] = target;
        moved[n++] = i;
        bytes += unit->length;
        if (n == VD_COMPACT_MOVE_UNITS || bytes >= VD_COMPACT_MOVE_BATCH) {
            status = vd_compact_move_batch(image, layout, batch, targets, moved, n, bytes, job);
            n = 0;
            bytes = 0;
        }
    }
    if (status == ERROR_SUCCESS && n)
        status = vd_compact_move_batch(image, layout, batch, targets, moved, n, bytes, job);
    free(batch);
    free(targets);
    free(moved);
    free(holes);
    return status;
}

DWORD vd_compact_image(struct vd_image *image, COMPACT_VIRTUAL_DISK_FLAG flags, struct vd_job *job)
{
    struct vd_compact_layout layout = {0};
    DWORD status = image->format->compact_layout(image, &layout);
    if (status != ERROR_SUCCESS) {
        free(layout.fixed);
        free(layout.units);
        return status;
    }
    bool scan = !(flags & COMPACT_VIRTUAL_DISK_FLAG_NO_ZERO_SCAN);
    bool moves = !(flags & COMPACT_VIRTUAL_DISK_FLAG_NO_BLOCK_MOVES);
    uint64_t total = 1; /* the truncation */
    for (size_t i = 0; i < layout.unit_count; i++) {
        if (scan && layout.units[i].kind == VD_UNIT_DATA)
            total += layout.units[i].virtual_length;
        if (moves)
            total += layout.units[i].length;
    }
    vd_job_set_total(job, total);

    size_t kept = 0;
    status = vd_compact_drop_pass(image, &layout, flags, job, &kept);
    if (status == ERROR_SUCCESS && moves)
        status = vd_compact_move_pass(image, &layout, kept, job);
    if (status == ERROR_SUCCESS && vd_job_cancelled(job))
        status = vd_compact_cancelled(image);
    if (status == ERROR_SUCCESS) {
        uint64_t end = 0;
        for (size_t i = 0; i < layout.fixed_count; i++)
            if (layout.fixed[i].offset + layout.fixed[i].length > end)
                end = layout.fixed[i].offset + layout.fixed[i].length;
        for (size_t i = 0; i < kept; i++)
            if (layout.units[i].file_offset + layout.units[i].length > end)
                end = layout.units[i].file_offset + layout.units[i].length;
        status = image->format->compact_truncate(image, end);
    }
    if (status == ERROR_SUCCESS) {
        uint64_t done = __atomic_load_n(&job->done, __ATOMIC_RELAXED);
        vd_job_advance(job, total - done);
    }
    free(layout.fixed);
    free(layout.units);
    return status;
}
