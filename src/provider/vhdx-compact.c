/*
 * VHDX compaction (compact.h): what the file holds, dropping blocks to the
 * states that read the same without space, moving blocks, and cutting the
 * file.  Every BAT change goes through the log (vhdx_meta_write), so a crash
 * replays to all of a change or none of it.
 */
#define _GNU_SOURCE
#include "vhdx.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bytes.h"
#include "errors.h"

enum { VHDX_COMPACT_COPY = 4 << 20 };

DWORD vhdx_compact_layout(struct vd_image *image, struct vd_compact_layout *layout)
{
    struct vhdx_state *s = image->state;
    struct vhdx_regions r = {0};
    DWORD status = vhdx_read_region_table(image, &r);
    if (status != ERROR_SUCCESS)
        return status;
    layout->fixed = malloc(6 * sizeof *layout->fixed);
    layout->units = malloc(((size_t)s->bat_entries + 1) * sizeof *layout->units);
    if (!layout->fixed || !layout->units)
        return vd_fail(ERROR_OUTOFMEMORY, "%s: the compaction's layout", image->path);
    const struct vhdx_header *h = (const void *)s->header;
    uint64_t log_offset = vd_le64(h->LogOffset), log_length = vd_le32(h->LogLength);
    size_t n = 0;
    layout->fixed[n++] = (struct vd_extent){0, VHDX_REGION_TABLE2_OFFSET + VHDX_REGION_TABLE_SIZE};
    if (log_length && log_offset < image->file_size)
        layout->fixed[n++] = (struct vd_extent){log_offset, log_length};
    layout->fixed[n++] = (struct vd_extent){r.metadata_offset, r.metadata_length};
    layout->fixed[n++] = (struct vd_extent){r.bat_offset, r.bat_length};
    if (r.others_end)
        layout->fixed[n++] = (struct vd_extent){r.others_start, r.others_end - r.others_start};
    layout->fixed_count = n;

    size_t units = 0;
    for (uint64_t i = 0; i < s->bat_entries; i++) {
        uint64_t entry = vhdx_bat_load(s, i), offset = vhdx_bat_file_offset(entry);
        uint32_t state = vhdx_bat_state(entry);
        struct vd_compact_unit *u = &layout->units[units];
        /* A chunk's sector bitmap is read for its partly present blocks
           only (§2.5.1.2).  It goes only once no block of the chunk is in
           the file at all, fully present ones included: the one state in
           which every reader and writer surely needs none. */
        uint64_t chunk = i / (s->chunk_ratio + 1ull) + 1;
        if (i % (s->chunk_ratio + 1ull) == s->chunk_ratio) {
            if (state == SB_BLOCK_PRESENT) {
                *u = (struct vd_compact_unit){.id = i, .file_offset = offset, .length = MiB,
                                              .kind = VD_UNIT_METADATA, .group = chunk};
                units++;
            }
            continue;
        }
        uint64_t block = i - i / (s->chunk_ratio + 1ull);
        if (block >= s->payload_blocks)
            continue;
        uint64_t used = vhdx_block_bytes_used(image, s, block);
        *u = (struct vd_compact_unit){.id = i, .file_offset = offset, .length = used,
                                      .virtual_offset = block * s->block_size, .virtual_length = used,
                                      .group = chunk};
        if (state == PAYLOAD_BLOCK_FULLY_PRESENT || state == PAYLOAD_BLOCK_PARTIALLY_PRESENT) {
            u->kind = VD_UNIT_DATA;
            units++;
        } else if (state != PAYLOAD_BLOCK_NOT_PRESENT && offset) {
            /* ZERO, UNMAPPED, UNDEFINED read as zeros whatever the offset
               names (vhdx_read), and own no space (open's overlap check). */
            u->kind = VD_UNIT_STALE;
            u->length = 0;
            units++;
        }
    }
    layout->unit_count = units;
    layout->alignment = VHDX_ALIGN;
    layout->drop_shows_parent = false; /* the ZERO state hides the parent */
    return ERROR_SUCCESS;
}

/* New BAT entries through the log, then in memory. */
static DWORD vhdx_compact_set_entries(struct vd_image *image, struct vhdx_state *s, const struct vd_compact_unit *units,
                                      const uint64_t *entries, size_t count)
{
    struct vhdx_meta_change *changes = calloc(count + 1, sizeof *changes);
    uint8_t *raw = malloc((count + 1) * 8);
    if (!changes || !raw) {
        free(changes);
        free(raw);
        return vd_fail(ERROR_OUTOFMEMORY, "%s: BAT changes", image->path);
    }
    for (size_t i = 0; i < count; i++) {
        vd_put_le64(raw + 8 * i, entries[i]);
        changes[i] = (struct vhdx_meta_change){s->bat_offset + units[i].id * 8, raw + 8 * i, 8};
    }
    DWORD status = vhdx_meta_write(image, s, changes, count);
    if (status == ERROR_SUCCESS) {
        /* Waits for reads still aimed at the old offsets, as a discard does
           (vhdx-discard.c): once the entries change, the old places are free. */
        pthread_rwlock_wrlock(&s->map_lock);
        for (size_t i = 0; i < count; i++)
            __atomic_store_n(&s->bat[units[i].id], entries[i], __ATOMIC_RELEASE);
        pthread_rwlock_unlock(&s->map_lock);
    }
    free(changes);
    free(raw);
    return status;
}

/* A data block of a differencing disk becomes ZERO (zeros, hiding the
   parent), of any other NOT_PRESENT (zeros); a stale entry keeps its state
   and loses its offset; a sector bitmap no block needs becomes
   SB_BLOCK_NOT_PRESENT (a bitmap allocated later again starts all clear).  Durable once vhdx_meta_write has logged it; only
   then is a dropped block's space punched out of the file, so that the host
   gets it back also where no block moves into it (NO_BLOCK_MOVES, or a
   hole no later block fits).  A stale entry's offset is not punched: the
   space it names may be another block's. */
DWORD vhdx_compact_drop(struct vd_image *image, const struct vd_compact_unit *units, size_t count)
{
    struct vhdx_state *s = image->state;
    uint64_t *entries = calloc(count + 1, sizeof *entries);
    if (!entries)
        return vd_fail(ERROR_OUTOFMEMORY, "%s: BAT changes", image->path);
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < count; i++) {
        uint32_t state = vhdx_bat_state(vhdx_bat_load(s, units[i].id));
        entries[i] = units[i].kind == VD_UNIT_STALE      ? state
                     : units[i].kind == VD_UNIT_METADATA ? SB_BLOCK_NOT_PRESENT
                     : s->has_parent                     ? PAYLOAD_BLOCK_ZERO
                                                         : PAYLOAD_BLOCK_NOT_PRESENT;
    }
    DWORD status = vhdx_compact_set_entries(image, s, units, entries, count);
    for (size_t i = 0; i < count && status == ERROR_SUCCESS; i++)
        if (units[i].kind != VD_UNIT_STALE)
            status = vd_image_punch_unused(image, units[i].file_offset, units[i].length);
    pthread_mutex_unlock(&s->lock);
    free(entries);
    return status;
}

/* The copies first, flushed, then the BAT entries through the log. */
DWORD vhdx_compact_move(struct vd_image *image, const struct vd_compact_unit *units, const uint64_t *targets,
                        size_t count)
{
    struct vhdx_state *s = image->state;
    uint8_t *buffer = malloc(VHDX_COMPACT_COPY);
    uint64_t *entries = malloc((count + 1) * sizeof *entries);
    DWORD status = !buffer || !entries ? vd_fail(ERROR_OUTOFMEMORY, "%s: moving blocks", image->path)
                                       : ERROR_SUCCESS;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < count && status == ERROR_SUCCESS; i++) {
        if (targets[i] % VHDX_ALIGN || targets[i] < VHDX_ALIGN) {
            status = vd_fail(ERROR_INVALID_PARAMETER, "%s: a block cannot start at offset %llu", image->path,
                             ull(targets[i]));
            break;
        }
        for (uint64_t done = 0; done < units[i].length && status == ERROR_SUCCESS;) {
            size_t n = units[i].length - done < VHDX_COMPACT_COPY ? (size_t)(units[i].length - done)
                                                                  : VHDX_COMPACT_COPY;
            status = vhdx_read_file(image, buffer, n, units[i].file_offset + done);
            if (status == ERROR_SUCCESS)
                status = vhdx_write_file(image, buffer, n, targets[i] + done);
            done += n;
        }
        entries[i] = (vhdx_bat_load(s, units[i].id) & ~VHDX_BAT_OFFSET_MASK) | targets[i];
    }
    /* vhdx_meta_write flushes before its entry too, but not when the file
       has no usable log: this one orders the copies before the BAT always. */
    if (status == ERROR_SUCCESS)
        status = vhdx_sync_file(image, "pointing the BAT at moved blocks");
    if (status == ERROR_SUCCESS)
        status = vhdx_compact_set_entries(image, s, units, entries, count);
    pthread_mutex_unlock(&s->lock);
    free(buffer);
    free(entries);
    return status;
}

/* The log is closed first (every entry applied and flushed, headers without
   LogGuid): an active entry records the file's size as it was, and a file
   cut below that reads as a torn one at replay. */
DWORD vhdx_compact_truncate(struct vd_image *image, uint64_t end)
{
    struct vhdx_state *s = image->state;
    uint64_t size = vhdx_round_up(end, VHDX_ALIGN);
    pthread_mutex_lock(&s->lock);
    DWORD status = ERROR_SUCCESS;
    if (size < image->file_size) {
        status = vhdx_log_finish(image, s);
        if (status == ERROR_SUCCESS && vd_ftruncate(image->fd, size) < 0)
            status = vd_fail_errno(errno, "%s: cutting the file to %llu bytes", image->path, ull(size));
        if (status == ERROR_SUCCESS)
            status = vhdx_sync_file(image, "reporting the compaction done");
        if (status == ERROR_SUCCESS) {
            image->file_size = size;
            s->file_end = size;
        }
    }
    /* Moved blocks may now lie in order, back to back; the holes known to
       the allocator (vhdx-discard.c) moved, or went with the cut: found
       afresh at the next allocation. */
    if (status == ERROR_SUCCESS) {
        vhdx_find_flat_mapping(image, s);
        s->freed_count = 0;
        s->freed_scanned = false;
    }
    pthread_mutex_unlock(&s->lock);
    return status;
}
