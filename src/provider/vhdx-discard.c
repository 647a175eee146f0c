/*
 * VHDX discard (TRIM through the FUSE server's fallocate) and the reuse of
 * the file space it frees.
 *
 * A whole payload block leaves the file: its BAT entry becomes
 * PAYLOAD_BLOCK_UNMAPPED (what [MS-VHDX] §2.5.1.1 names the state of a
 * trimmed block), or PAYLOAD_BLOCK_ZERO in a differencing disk, where
 * UNMAPPED has no defined content and NOT_PRESENT would show the parent
 * again.  The entry goes through the log first; only then is the old data
 * punched out of the file and its range offered to the next allocation.  A
 * crash before the log entry leaves the old data, after it zeros: the block
 * is never both referenced and reused.  A fixed disk (LeaveBlockAllocated)
 * keeps its blocks and punches their data in place, as the flag asks.
 *
 * Part of a block: a present block has the range punched in place (the file
 * system zeroes partial file-system blocks), or written with zeros where it
 * cannot punch; where the parent shows through (not present, or partly
 * present in a differencing disk) zeros are written like any data, so the
 * sector bitmap marks them as this file's.
 */
#define _GNU_SOURCE
#include "vhdx.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>

#include "bytes.h"
#include "errors.h"

enum {
    ZERO_CHUNK = 1 << 20,
    /* Whole blocks per log entry batch: bounds the memory of one step. */
    BATCH_BLOCKS = 1024,
};

/* [at, at + length) of the file reads as zeros: punched where the file
   system can (also giving the space back), else written. */
static DWORD punch_or_zero(struct vd_image *image, uint64_t at, uint64_t length)
{
    if (vd_fallocate(image->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, at, length) == 0)
        return ERROR_SUCCESS;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return vd_fail_errno(errno, "%s: punching %llu bytes at file offset %llu", image->path, ull(length),
                             ull(at));
    uint8_t *zeros = calloc(1, ZERO_CHUNK);
    if (!zeros)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a buffer of zeros");
    DWORD status = ERROR_SUCCESS;
    for (uint64_t done = 0; done < length && status == ERROR_SUCCESS;) {
        size_t n = length - done < ZERO_CHUNK ? (size_t)(length - done) : ZERO_CHUNK;
        status = vhdx_write_file(image, zeros, n, at + done);
        done += n;
    }
    free(zeros);
    return status;
}

/* ---- freed file space ---- */

static DWORD add_freed(struct vhdx_state *s, uint64_t start, uint64_t end)
{
    start = vhdx_round_up(start, VHDX_ALIGN);
    end = end / VHDX_ALIGN * VHDX_ALIGN;
    if (end <= start)
        return ERROR_SUCCESS;
    if (s->freed_count == s->freed_capacity) {
        size_t capacity = s->freed_capacity ? s->freed_capacity * 2 : 64;
        struct vd_extent *grown = realloc(s->freed, capacity * sizeof *grown);
        if (!grown)
            return vd_fail(ERROR_OUTOFMEMORY, "allocating the list of freed VHDX blocks");
        s->freed = grown;
        s->freed_capacity = capacity;
    }
    s->freed[s->freed_count++] = (struct vd_extent){start, end - start};
    return ERROR_SUCCESS;
}

static int compare_extents(const void *a, const void *b)
{
    const struct vd_extent *x = a, *y = b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* The holes below the end of the file that no structure owns: what earlier
   sessions discarded (or a crash left allocated but unreferenced).  Done at
   the first allocation of a session rather than at open, where most opens
   never allocate.  Every region the region table names counts as owned,
   known or not. */
static DWORD scan_holes(struct vd_image *image, struct vhdx_state *s)
{
    const struct vhdx_header *h = (const void *)s->header;
    uint8_t *table = malloc(VHDX_REGION_TABLE_SIZE);
    struct vd_extent *x = malloc((s->bat_entries + VHDX_MAX_TABLE_ENTRIES + 2) * sizeof *x);
    if (!table || !x) {
        free(table);
        free(x);
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX extent list");
    }
    size_t n = 0;
    x[n++] = (struct vd_extent){0, VHDX_REGION_TABLE2_OFFSET + VHDX_REGION_TABLE_SIZE};
    x[n++] = (struct vd_extent){vd_le64(h->LogOffset), vd_le32(h->LogLength)};
    DWORD status = vhdx_read_file(image, table, VHDX_REGION_TABLE_SIZE, VHDX_REGION_TABLE1_OFFSET);
    if (status == ERROR_SUCCESS) {
        const struct vhdx_region_table_header *rh = (const void *)table;
        uint32_t count = vd_le32(rh->EntryCount);
        for (uint32_t i = 0; i < count && i < VHDX_MAX_TABLE_ENTRIES; i++) {
            const struct vhdx_region_table_entry *e = (const void *)(table + sizeof *rh + i * sizeof *e);
            x[n++] = (struct vd_extent){vd_le64(e->FileOffset), vd_le32(e->Length)};
        }
        for (uint64_t i = 0; i < s->bat_entries; i++) {
            uint64_t entry = vhdx_bat_load(s, i);
            if (vhdx_bat_state(entry) <= PAYLOAD_BLOCK_UNMAPPED)
                continue;
            bool is_bitmap = i % (s->chunk_ratio + 1ull) == s->chunk_ratio;
            uint64_t block = i - i / (s->chunk_ratio + 1ull);
            x[n++] = (struct vd_extent){vhdx_bat_file_offset(entry),
                                        is_bitmap ? MiB : vhdx_block_bytes_used(image, s, block)};
        }
        qsort(x, n, sizeof *x, compare_extents);
        uint64_t cursor = 0;
        for (size_t i = 0; i < n && status == ERROR_SUCCESS; i++) {
            if (x[i].offset > cursor)
                status = add_freed(s, cursor, x[i].offset < s->file_end ? x[i].offset : s->file_end);
            if (x[i].offset + x[i].length > cursor)
                cursor = x[i].offset + x[i].length;
        }
        if (status == ERROR_SUCCESS && cursor < s->file_end)
            status = add_freed(s, cursor, s->file_end);
    }
    free(table);
    free(x);
    return status;
}

DWORD vhdx_take_freed(struct vd_image *image, struct vhdx_state *s, uint64_t size, uint64_t *offset, bool *found)
{
    *found = false;
    /* A fixed disk frees nothing, and its blocks stay in order for direct
       mapping (a grow appends); a region bigger than a block (a grown BAT)
       goes to the end too, where it cannot split a hole in odd sizes. */
    if (image->subtype == VD_SUBTYPE_FIXED || size > s->block_size)
        return ERROR_SUCCESS;
    if (!s->freed_scanned) {
        DWORD status = scan_holes(image, s);
        if (status != ERROR_SUCCESS)
            return status;
        s->freed_scanned = true;
    }
    for (size_t i = 0; i < s->freed_count; i++) {
        struct vd_extent *f = &s->freed[i];
        if (f->length < size)
            continue;
        uint64_t at = f->offset;
        /* The new block relies on reading zeros where it is not written
           (vhdx_allocate's promise); a hole may still hold old data. */
        DWORD status = punch_or_zero(image, at, size);
        if (status == ERROR_SUCCESS && vd_fallocate(image->fd, 0, at, size) < 0 && errno != EOPNOTSUPP
            && errno != ENOSYS)
            status = vd_fail_errno(errno, "%s: allocating %llu bytes at %llu", image->path, ull(size), ull(at));
        if (status != ERROR_SUCCESS)
            return status;
        f->offset += size;
        f->length -= size;
        if (f->length == 0)
            s->freed[i] = s->freed[--s->freed_count];
        if (image->file_size < at + size)
            image->file_size = at + size;
        *offset = at;
        *found = true;
        return ERROR_SUCCESS;
    }
    return ERROR_SUCCESS;
}

/* ---- discard ---- */

/* Whole payload blocks [first, first + count): one log entry for all of
   their BAT entries, then their data out of the file. */
static DWORD discard_blocks(struct vd_image *image, struct vhdx_state *s, uint64_t first, uint64_t count)
{
    bool keep_allocated = image->subtype == VD_SUBTYPE_FIXED;
    uint8_t *raw = malloc(count * 8);
    struct vhdx_meta_change *changes = malloc(count * sizeof *changes);
    uint64_t *old = malloc(count * sizeof *old), *blocks = malloc(count * sizeof *blocks);
    if (!raw || !changes || !old || !blocks) {
        free(raw);
        free(changes);
        free(old);
        free(blocks);
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a VHDX discard batch");
    }
    uint64_t replacement = s->has_parent ? PAYLOAD_BLOCK_ZERO : PAYLOAD_BLOCK_UNMAPPED;
    DWORD status = ERROR_SUCCESS;
    size_t n = 0;
    pthread_mutex_lock(&s->lock);
    for (uint64_t block = first; block < first + count && status == ERROR_SUCCESS; block++) {
        uint64_t index = vhdx_payload_entry(s, block), entry = vhdx_bat_load(s, index);
        uint32_t state = vhdx_bat_state(entry);
        bool present = state == PAYLOAD_BLOCK_FULLY_PRESENT || state == PAYLOAD_BLOCK_PARTIALLY_PRESENT;
        if (keep_allocated && !s->has_parent) {
            if (present)
                status = punch_or_zero(image, vhdx_bat_file_offset(entry), vhdx_block_bytes_used(image, s, block));
            continue;
        }
        /* Already reading zeros without the parent: nothing to change. */
        if (!present && (state != PAYLOAD_BLOCK_NOT_PRESENT || !s->has_parent))
            continue;
        if (!present) {
            /* The parent's: a ZERO entry only where the parent has data,
               so that trimming a disk's free space does not touch every
               block the chain never wrote. */
            bool zeros = false;
            status = vd_image_reads_zeros(image->parent, block * s->block_size,
                                          vhdx_block_bytes_used(image, s, block), &zeros);
            if (zeros || status != ERROR_SUCCESS)
                continue;
        }
        vd_put_le64(raw + n * 8, replacement);
        changes[n] = (struct vhdx_meta_change){s->bat_offset + index * 8, raw + n * 8, 8};
        old[n] = entry;
        blocks[n] = block;
        n++;
    }
    if (status == ERROR_SUCCESS && n > 0)
        status = vhdx_meta_write(image, s, changes, n);
    if (status == ERROR_SUCCESS && n > 0) {
        /* Waits for reads and writes still aimed at the old offsets. */
        pthread_rwlock_wrlock(&s->map_lock);
        for (size_t i = 0; i < n; i++)
            __atomic_store_n(&s->bat[vhdx_payload_entry(s, blocks[i])], replacement, __ATOMIC_RELEASE);
        pthread_rwlock_unlock(&s->map_lock);
        for (size_t i = 0; i < n && status == ERROR_SUCCESS; i++) {
            uint32_t state = vhdx_bat_state(old[i]);
            if (state != PAYLOAD_BLOCK_FULLY_PRESENT && state != PAYLOAD_BLOCK_PARTIALLY_PRESENT)
                continue;
            uint64_t at = vhdx_bat_file_offset(old[i]);
            uint64_t end = at + vhdx_round_up(vhdx_block_bytes_used(image, s, blocks[i]), VHDX_ALIGN);
            /* The block is out of the map already: a failed punch only
               leaves the space in use until vhdx_take_freed zeroes it. */
            (void)punch_or_zero(image, at, end - at);
            status = add_freed(s, at, end);
        }
    }
    pthread_mutex_unlock(&s->lock);
    free(raw);
    free(changes);
    free(old);
    free(blocks);
    return status;
}

/* Part of one block, [offset, offset + length). */
static DWORD discard_part(struct vd_image *image, struct vhdx_state *s, uint64_t block, uint64_t offset,
                          uint64_t length)
{
    pthread_rwlock_rdlock(&s->map_lock);
    uint64_t entry = vhdx_bat_load(s, vhdx_payload_entry(s, block));
    uint32_t state = vhdx_bat_state(entry);
    if (state == PAYLOAD_BLOCK_FULLY_PRESENT) {
        /* Shared: the block cannot leave the file while it is punched. */
        DWORD status = punch_or_zero(image, vhdx_bat_file_offset(entry) + (offset - block * s->block_size), length);
        pthread_rwlock_unlock(&s->map_lock);
        return status;
    }
    pthread_rwlock_unlock(&s->map_lock);
    if (state != PAYLOAD_BLOCK_PARTIALLY_PRESENT && (state != PAYLOAD_BLOCK_NOT_PRESENT || !s->has_parent))
        return ERROR_SUCCESS; /* reads as zeros already */
    bool already = false;
    DWORD status = vd_image_reads_zeros(image, offset, length, &already);
    if (status != ERROR_SUCCESS || already)
        return status;

    /* The parent shows through here: zeros become this file's data. */
    size_t chunk = length < ZERO_CHUNK ? (size_t)length : ZERO_CHUNK;
    uint8_t *zeros = calloc(1, chunk);
    if (!zeros)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a buffer of zeros");
    for (uint64_t done = 0; done < length && status == ERROR_SUCCESS;) {
        size_t n = length - done < chunk ? (size_t)(length - done) : chunk;
        status = vhdx_write_block(image, s, block, zeros, offset + done, n);
        done += n;
    }
    free(zeros);
    return status;
}

DWORD vhdx_discard(struct vd_image *image, uint64_t offset, uint64_t length)
{
    struct vhdx_state *s = image->state;
    DWORD status = vhdx_begin_range_change(image, offset, length, "discarding");

    uint64_t end = offset + length;
    while (offset < end && status == ERROR_SUCCESS) {
        uint64_t block = offset / s->block_size, in_block = offset % s->block_size;
        uint64_t n = s->block_size - in_block < end - offset ? s->block_size - in_block : end - offset;
        if (in_block != 0 || n < vhdx_block_bytes_used(image, s, block)) {
            status = discard_part(image, s, block, offset, n);
            offset += n;
            continue;
        }
        uint64_t count = 1;
        while (count < BATCH_BLOCKS && (block + count + 1) * s->block_size <= end)
            count++;
        /* The disk's last block may be cut short: whole when its used part is. */
        if (count < BATCH_BLOCKS && block + count + 1 == s->payload_blocks && end == image->virtual_size
            && (block + count) * s->block_size < end)
            count++;
        status = discard_blocks(image, s, block, count);
        offset = (block + count) * s->block_size < end ? (block + count) * s->block_size : end;
    }
    return status;
}
