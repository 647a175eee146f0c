/*
 * VHDX virtual-disk I/O: reads through the BAT and sector bitmaps, writes
 * that allocate blocks, and the header update before a session's first write.
 */
#define _GNU_SOURCE
#include "vhdx.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bytes.h"
#include "crc32c.h"
#include "errors.h"
#include "shim.h"
#include "utf16.h"

/* ---- read ---- */

static DWORD read_parent(struct vd_image *image, uint8_t *buffer, uint64_t offset, size_t length)
{
    if (!image->parent)
        return vd_fail(ERROR_VHD_PARENT_VHD_NOT_FOUND,
                       "%s: reading %zu bytes at %llu needs the parent, which was not opened "
                       "(OPEN_VIRTUAL_DISK_FLAG_NO_PARENTS)", image->path, length, ull(offset));
    return image->parent->format->read(image->parent, buffer, offset, length);
}

DWORD vhdx_read_file(struct vd_image *image, void *buffer, size_t length, uint64_t file_offset)
{
    const struct vhdx_state *s = image->state;
    int error = s->log ? vhdx_log_pread(s->log, image->fd, buffer, length, file_offset)
                       : vd_pread_full(image->fd, buffer, length, file_offset);
    if (error)
        return vd_fail_errno(error, "%s: reading %zu bytes at file offset %llu", image->path,
                             length, ull(file_offset));
    return ERROR_SUCCESS;
}

/* A partially present block: each sector comes from this file when its bit in
   the chunk's sector bitmap is set, else from the parent. */
static DWORD read_partial(struct vd_image *image, const struct vhdx_state *s, uint64_t block,
                          uint64_t data_offset, uint8_t *buffer, uint64_t offset, size_t length)
{
    uint64_t ss = s->logical_sector_size;
    uint64_t sb_entry = vhdx_bat_load(s, vhdx_bitmap_entry(s, block / s->chunk_ratio));
    uint64_t first = offset / ss, last = (offset + length - 1) / ss; /* virtual sectors */
    uint64_t chunk_first = block / s->chunk_ratio * s->chunk_ratio * (s->block_size / ss);
    uint64_t bit0 = first - chunk_first;
    uint64_t nbytes = (last - chunk_first) / 8 - bit0 / 8 + 1; /* ≤ block_size/ss/8 + 1 */
    uint8_t *bits = malloc(nbytes);
    if (!bits)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a sector bitmap buffer");
    DWORD status = vhdx_read_file(image, bits, nbytes, vhdx_bat_file_offset(sb_entry) + bit0 / 8);

    uint64_t block_start = block * s->block_size;
    for (uint64_t sector = first; sector <= last && status == ERROR_SUCCESS;) {
        uint64_t b = sector - chunk_first - bit0 / 8 * 8;
        bool present = bits[b / 8] >> (b % 8) & 1;
        uint64_t run_end = sector + 1;
        while (run_end <= last) {
            uint64_t rb = run_end - chunk_first - bit0 / 8 * 8;
            if ((bool)(bits[rb / 8] >> (rb % 8) & 1) != present)
                break;
            run_end++;
        }
        uint64_t from = sector * ss > offset ? sector * ss : offset;
        uint64_t to = run_end * ss < offset + length ? run_end * ss : offset + length;
        uint8_t *out = buffer + (from - offset);
        if (present)
            status = vhdx_read_file(image, out, to - from, data_offset + (from - block_start));
        else
            status = read_parent(image, out, from, to - from);
        sector = run_end;
    }
    free(bits);
    return status;
}

DWORD vhdx_read(struct vd_image *image, void *buffer, uint64_t offset, size_t length)
{
    struct vhdx_state *s = image->state;
    uint8_t *out = buffer;
    if (offset > image->virtual_size || length > image->virtual_size - offset)
        return vd_fail(ERROR_INVALID_PARAMETER,
                       "reading %zu bytes at %llu: beyond the %llu-byte virtual disk", length,
                       ull(offset), ull(image->virtual_size));

    while (length > 0) {
        uint64_t block = offset / s->block_size, in_block = offset % s->block_size;
        size_t n = s->block_size - in_block < length ? (size_t)(s->block_size - in_block) : length;
        pthread_rwlock_rdlock(&s->map_lock);
        uint64_t entry = vhdx_bat_load(s, vhdx_payload_entry(s, block));
        DWORD status = ERROR_SUCCESS;
        switch (vhdx_bat_state(entry)) {
        case PAYLOAD_BLOCK_FULLY_PRESENT:
            status = vhdx_read_file(image, out, n, vhdx_bat_file_offset(entry) + in_block);
            break;
        case PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            status = read_partial(image, s, block, vhdx_bat_file_offset(entry), out, offset, n);
            break;
        case PAYLOAD_BLOCK_NOT_PRESENT:
            /* A dynamic disk's unallocated block reads as zeros. */
            if (s->has_parent)
                status = read_parent(image, out, offset, n);
            else
                memset(out, 0, n);
            break;
        default:
            /* UNDEFINED and UNMAPPED may return anything (§2.5.1.1); zeros
               never leak stale data. */
            memset(out, 0, n);
            break;
        }
        pthread_rwlock_unlock(&s->map_lock);
        if (status != ERROR_SUCCESS)
            return status;
        out += n;
        offset += n;
        length -= n;
    }
    return ERROR_SUCCESS;
}

/* Per block: a partly present block counts as data (its sector bitmap is
   not read; copying the parent's sectors along is harmless). */
DWORD vhdx_block_status(struct vd_image *image, uint64_t offset, uint64_t length, enum vd_block_state *state,
                        uint64_t *run)
{
    struct vhdx_state *s = image->state;
    if (length == 0 || offset > image->virtual_size || length > image->virtual_size - offset)
        return vd_fail(ERROR_INVALID_PARAMETER, "block status of %llu bytes at %llu", ull(length), ull(offset));
    uint64_t block = offset / s->block_size, in_block = offset % s->block_size;
    *run = s->block_size - in_block < length ? s->block_size - in_block : length;
    switch (vhdx_bat_state(vhdx_bat_load(s, vhdx_payload_entry(s, block)))) {
    case PAYLOAD_BLOCK_FULLY_PRESENT:
    case PAYLOAD_BLOCK_PARTIALLY_PRESENT:
        *state = VD_BLOCK_DATA;
        break;
    case PAYLOAD_BLOCK_NOT_PRESENT:
        *state = VD_BLOCK_ABSENT;
        break;
    default: /* ZERO, UNMAPPED, UNDEFINED read as zeros (vhdx_read) */
        *state = s->has_parent ? VD_BLOCK_ZERO : VD_BLOCK_ABSENT;
        break;
    }
    return ERROR_SUCCESS;
}

/* ---- write ---- */

DWORD vhdx_write_file(struct vd_image *image, const void *buffer, size_t length, uint64_t file_offset)
{
    int error = vd_pwrite_full(image->fd, buffer, length, file_offset);
    if (error)
        return vd_fail_errno(error, "%s: writing %zu bytes at file offset %llu", image->path,
                             length, ull(file_offset));
    return ERROR_SUCCESS;
}

/* The barrier of the write ordering described at the top of this file. */
DWORD vhdx_sync_file(struct vd_image *image, const char *before)
{
    if (vd_fdatasync(image->fd) < 0)
        return vd_fail_errno(errno, "%s: flushing before %s", image->path, before);
    return ERROR_SUCCESS;
}

/* One BAT entry, through the log; the in-memory copy follows once it is
   certain to survive. */
static DWORD write_bat_entry(struct vd_image *image, struct vhdx_state *s, uint64_t index, uint64_t entry)
{
    uint8_t raw[8];
    vd_put_le64(raw, entry);
    struct vhdx_meta_change change = {s->bat_offset + index * 8, raw, 8};
    DWORD status = vhdx_meta_write(image, s, &change, 1);
    if (status == ERROR_SUCCESS)
        __atomic_store_n(&s->bat[index], entry, __ATOMIC_RELEASE);
    return status;
}

/* Both header copies with a new FileWriteGuid, the given DataWriteGuid and
   the session's LogGuid (zero when no log is in use): the non-current copy
   first, each with the next sequence number and flushed, so a torn write
   leaves the old current header in charge.  Headers are never logged
   (§2.2.2: the two copies are their own protection). */
DWORD vhdx_write_headers(struct vd_image *image, struct vhdx_state *s, const GUID *data_write)
{
    uint8_t h[VHDX_HEADER_SIZE];
    struct vhdx_header *header = (void *)h;
    GUID file_write;
    int error = vd_guid_generate(&file_write);
    if (error)
        return vd_fail_errno(error, "generating a VHDX FileWriteGuid");

    memcpy(h, s->header, sizeof h);
    vd_guid_to_le_bytes(&file_write, header->FileWriteGuid);
    vd_guid_to_le_bytes(data_write, header->DataWriteGuid);
    vd_guid_to_le_bytes(&s->log_guid, header->LogGuid);
    for (int i = 1; i <= 2; i++) {
        int slot = (s->current_header + i) % 2;
        uint64_t offset = slot ? VHDX_HEADER2_OFFSET : VHDX_HEADER1_OFFSET;
        vd_put_le64(header->SequenceNumber, s->sequence_number + 1);
        vhdx_set_crc(h, sizeof h, offsetof(struct vhdx_header, Checksum));
        DWORD status = vhdx_write_file(image, h, sizeof h, offset);
        if (status == ERROR_SUCCESS)
            status = vhdx_sync_file(image, "writing data after the header update");
        if (status != ERROR_SUCCESS)
            return vd_fail(ERROR_VHD_METADATA_WRITE_FAILURE,
                           "%s: updating the VHDX header at offset %llu failed (0x%08X)",
                           image->path, ull(offset), (unsigned)status);
        s->sequence_number++;
    }
    memcpy(s->header, h, sizeof h);
    image->identifier = *data_write;
    s->session_guids_written = true;
    return ERROR_SUCCESS;
}

/* New FileWriteGuid and DataWriteGuid before the session's first change to
   the disk (§2.2.2): differencing children linked to the old DataWriteGuid
   then notice that their parent changed, as the spec requires. */
DWORD vhdx_begin_changes(struct vd_image *image, struct vhdx_state *s)
{
    GUID data_write;
    int error = vd_guid_generate(&data_write);
    if (error)
        return vd_fail_errno(error, "generating a VHDX DataWriteGuid");
    /* A disk served through write() changes metadata as it allocates: the
       same header write names the session's log.  A directly mapped (flat)
       disk never does, and keeps LogGuid clear. */
    DWORD status = image->flat ? ERROR_SUCCESS : vhdx_log_start(s);
    return status == ERROR_SUCCESS ? vhdx_write_headers(image, s, &data_write) : status;
}

DWORD vhdx_begin_range_change(struct vd_image *image, uint64_t offset, uint64_t length, const char *doing)
{
    struct vhdx_state *s = image->state;
    if (!image->writable)
        return vd_fail(ERROR_ACCESS_DENIED, "%s is open read-only", image->path);
    if (offset > image->virtual_size || length > image->virtual_size - offset)
        return vd_fail(ERROR_INVALID_PARAMETER, "%s %llu bytes at %llu: beyond the %llu-byte virtual disk", doing,
                       ull(length), ull(offset), ull(image->virtual_size));
    if (length == 0)
        return ERROR_SUCCESS;
    pthread_mutex_lock(&s->lock);
    DWORD status = s->session_guids_written ? ERROR_SUCCESS : vhdx_begin_changes(image, s);
    pthread_mutex_unlock(&s->lock);
    return status;
}

/* size bytes of zeros past the end of the file, 1 MiB aligned.  fallocate
   makes ENOSPC show up here rather than at some later write. */
DWORD vhdx_allocate(struct vd_image *image, struct vhdx_state *s, uint64_t size, uint64_t *offset)
{
    bool found;
    DWORD status = vhdx_take_freed(image, s, size, offset, &found);
    if (status != ERROR_SUCCESS || found)
        return status;
    uint64_t at = s->file_end;
    if (vd_fallocate(image->fd, 0, (uint64_t)at, (uint64_t)size) < 0) {
        if (errno != EOPNOTSUPP && errno != ENOSYS)
            return vd_fail_errno(errno, "%s: allocating a %llu-byte VHDX block at %llu",
                                 image->path, ull(size), ull(at));
        if (vd_ftruncate(image->fd, (uint64_t)(at + size)) < 0)
            return vd_fail_errno(errno, "%s: extending the file to %llu bytes", image->path,
                                 ull(at + size));
    }
    s->file_end = vhdx_round_up(at + size, VHDX_ALIGN);
    if (image->file_size < at + size)
        image->file_size = at + size;
    *offset = at;
    return ERROR_SUCCESS;
}

/* The write widened to whole logical sectors, the widening filled with the
   disk's current content, because a sector bitmap bit covers a whole sector.
   *owned is the buffer to free (NULL when data could be used as it was). */
static DWORD align_to_sectors(struct vd_image *image, const struct vhdx_state *s,
                              const uint8_t *data, uint64_t offset, size_t length,
                              const uint8_t **aligned, uint64_t *aligned_offset,
                              size_t *aligned_length, uint8_t **owned)
{
    uint64_t ss = s->logical_sector_size;
    uint64_t start = offset / ss * ss, end = vhdx_round_up(offset + length, ss);
    *owned = NULL;
    *aligned = data;
    *aligned_offset = offset;
    *aligned_length = length;
    if (start == offset && end == offset + length)
        return ERROR_SUCCESS;
    uint8_t *buffer = malloc(end - start);
    if (!buffer)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a sector buffer");
    DWORD status = vhdx_read(image, buffer, start, ss);
    if (status == ERROR_SUCCESS && end - ss > start)
        status = vhdx_read(image, buffer + (end - ss - start), end - ss, ss);
    if (status != ERROR_SUCCESS) {
        free(buffer);
        return status;
    }
    memcpy(buffer + (offset - start), data, length);
    *owned = buffer;
    *aligned = buffer;
    *aligned_offset = start;
    *aligned_length = end - start;
    return ERROR_SUCCESS;
}

/* The block's slice of its chunk's sector bitmap (at sb, the bitmap block)
   with the bits of the sectors [offset, offset + length) set.  fresh: from
   all clear, for a new block, which also clears bits a crashed earlier
   allocation of the same block may have left.  *full: every sector of the
   block inside the disk is now present. */
static DWORD bitmap_slice(struct vd_image *image, const struct vhdx_state *s, uint64_t block, uint64_t sb,
                          uint64_t offset, uint64_t length, bool fresh, uint8_t **bits_out,
                          struct vhdx_meta_change *change, bool *full)
{
    uint64_t ss = s->logical_sector_size;
    uint64_t sectors_per_block = s->block_size / ss; /* ≥ 256: whole bytes */
    uint64_t slice = sb + (block % s->chunk_ratio) * sectors_per_block / 8;
    uint64_t first = offset / ss - block * sectors_per_block, count = length / ss;
    uint8_t *bits = calloc(1, sectors_per_block / 8);
    if (!bits)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a sector bitmap buffer");
    DWORD status = fresh ? ERROR_SUCCESS : vhdx_read_file(image, bits, sectors_per_block / 8, slice);
    for (uint64_t i = first; i < first + count; i++)
        bits[i / 8] |= (uint8_t)(1u << (i % 8));
    uint64_t used = vhdx_block_bytes_used(image, s, block) / ss;
    *full = true;
    for (uint64_t i = 0; i < used && *full; i++)
        *full = bits[i / 8] >> (i % 8) & 1;
    if (status != ERROR_SUCCESS) {
        free(bits);
        return status;
    }
    *bits_out = bits;
    *change = (struct vhdx_meta_change){slice, bits, sectors_per_block / 8};
    return ERROR_SUCCESS;
}

/* A differencing block that is not yet in the file receives less than a
   whole block: only the written sectors go into it, the rest stays with the
   parent through the sector bitmap (copying the parent's whole block would
   cost up to 256 MiB per small write).  The data first, then one log entry
   with the bitmap block's BAT entry (when it is new), the bits and the
   block's BAT entry: a crash leaves all of them or none. */
static DWORD write_new_partial(struct vd_image *image, struct vhdx_state *s, uint64_t block,
                               const uint8_t *data, uint64_t offset, size_t length)
{
    const uint8_t *aligned;
    uint64_t aoff;
    size_t alen;
    uint8_t *owned;
    DWORD status = align_to_sectors(image, s, data, offset, length, &aligned, &aoff, &alen, &owned);
    if (status != ERROR_SUCCESS)
        return status;

    struct vhdx_meta_change changes[3];
    size_t n = 0;
    uint8_t sb_raw[8], block_raw[8], *bits = NULL;
    bool full = false;
    uint64_t sb_index = vhdx_bitmap_entry(s, block / s->chunk_ratio), at = 0;
    uint64_t sb_entry = vhdx_bat_load(s, sb_index);
    if (vhdx_bat_state(sb_entry) != SB_BLOCK_PRESENT) {
        uint64_t sb;
        status = vhdx_allocate(image, s, MiB, &sb); /* zeros: every sector with the parent */
        sb_entry = sb | SB_BLOCK_PRESENT;
        vd_put_le64(sb_raw, sb_entry);
        changes[n++] = (struct vhdx_meta_change){s->bat_offset + sb_index * 8, sb_raw, 8};
    }
    if (status == ERROR_SUCCESS)
        status = vhdx_allocate(image, s, s->block_size, &at);
    if (status == ERROR_SUCCESS)
        status = vhdx_write_file(image, aligned, alen, at + (aoff - block * s->block_size));
    if (status == ERROR_SUCCESS)
        status = bitmap_slice(image, s, block, vhdx_bat_file_offset(sb_entry), aoff, alen, true, &bits,
                              &changes[n++], &full);
    uint64_t entry = at | (full ? PAYLOAD_BLOCK_FULLY_PRESENT : PAYLOAD_BLOCK_PARTIALLY_PRESENT);
    vd_put_le64(block_raw, entry);
    changes[n++] = (struct vhdx_meta_change){s->bat_offset + vhdx_payload_entry(s, block) * 8, block_raw, 8};
    if (status == ERROR_SUCCESS)
        status = vhdx_meta_write(image, s, changes, n);
    if (status == ERROR_SUCCESS) {
        __atomic_store_n(&s->bat[sb_index], sb_entry, __ATOMIC_RELEASE);
        __atomic_store_n(&s->bat[vhdx_payload_entry(s, block)], entry, __ATOMIC_RELEASE);
    }
    free(bits);
    free(owned);
    return status;
}

/* The data in place, then its bits through the log; once every sector of
   the block is in this file the block becomes fully present, in the same
   entry, and reads stop consulting the bitmap and the parent. */
static DWORD write_existing_partial(struct vd_image *image, struct vhdx_state *s, uint64_t block,
                                    uint64_t data_offset, const uint8_t *data, uint64_t offset,
                                    size_t length)
{
    const uint8_t *aligned;
    uint64_t aoff;
    size_t alen;
    uint8_t *owned, *bits = NULL, raw[8];
    bool full = false;
    struct vhdx_meta_change changes[2];
    uint64_t sb = vhdx_bat_file_offset(vhdx_bat_load(s, vhdx_bitmap_entry(s, block / s->chunk_ratio)));
    uint64_t index = vhdx_payload_entry(s, block), entry = data_offset | PAYLOAD_BLOCK_FULLY_PRESENT;
    DWORD status = align_to_sectors(image, s, data, offset, length, &aligned, &aoff, &alen, &owned);
    if (status == ERROR_SUCCESS)
        status = vhdx_write_file(image, aligned, alen, data_offset + (aoff - block * s->block_size));
    if (status == ERROR_SUCCESS)
        status = bitmap_slice(image, s, block, sb, aoff, alen, false, &bits, &changes[0], &full);
    vd_put_le64(raw, entry);
    changes[1] = (struct vhdx_meta_change){s->bat_offset + index * 8, raw, 8};
    if (status == ERROR_SUCCESS)
        status = vhdx_meta_write(image, s, changes, full ? 2 : 1);
    if (status == ERROR_SUCCESS && full)
        __atomic_store_n(&s->bat[index], entry, __ATOMIC_RELEASE);
    free(bits);
    free(owned);
    return status;
}

/* Everything but a present block: a new block that is complete by itself,
   because what it replaces reads as zeros (or the write covers all of it).
   The log's leading flush puts the data on disk before the BAT entry. */
static DWORD write_new_full(struct vd_image *image, struct vhdx_state *s, uint64_t block,
                            const uint8_t *data, uint64_t in_block, size_t length)
{
    uint64_t at;
    DWORD status = vhdx_allocate(image, s, s->block_size, &at);
    if (status == ERROR_SUCCESS)
        status = vhdx_write_file(image, data, length, at + in_block);
    if (status == ERROR_SUCCESS)
        status = write_bat_entry(image, s, vhdx_payload_entry(s, block), at | PAYLOAD_BLOCK_FULLY_PRESENT);
    return status;
}

DWORD vhdx_write_block(struct vd_image *image, struct vhdx_state *s, uint64_t block,
                         const uint8_t *data, uint64_t offset, size_t length)
{
    uint64_t in_block = offset - block * s->block_size;
    pthread_rwlock_rdlock(&s->map_lock);
    uint64_t entry = vhdx_bat_load(s, vhdx_payload_entry(s, block));
    if (vhdx_bat_state(entry) == PAYLOAD_BLOCK_FULLY_PRESENT) {
        DWORD status = vhdx_write_file(image, data, length, vhdx_bat_file_offset(entry) + in_block);
        pthread_rwlock_unlock(&s->map_lock);
        return status;
    }
    pthread_rwlock_unlock(&s->map_lock);

    /* Block state changes are serialised; re-read the entry under the lock
       since another writer may just have allocated this block. */
    pthread_mutex_lock(&s->lock);
    DWORD status;
    entry = vhdx_bat_load(s, vhdx_payload_entry(s, block));
    switch (vhdx_bat_state(entry)) {
    case PAYLOAD_BLOCK_FULLY_PRESENT:
        status = vhdx_write_file(image, data, length, vhdx_bat_file_offset(entry) + in_block);
        break;
    case PAYLOAD_BLOCK_PARTIALLY_PRESENT:
        status = write_existing_partial(image, s, block, vhdx_bat_file_offset(entry), data, offset, length);
        break;
    case PAYLOAD_BLOCK_NOT_PRESENT:
        if (s->has_parent && length < vhdx_block_bytes_used(image, s, block)) {
            status = image->parent ? write_new_partial(image, s, block, data, offset, length)
                                   : vd_fail(ERROR_VHD_PARENT_VHD_NOT_FOUND,
                                             "%s: writing part of block %llu needs the parent, "
                                             "which was not opened", image->path, ull(block));
            break;
        }
        /* fall through */
    default:
        status = write_new_full(image, s, block, data, in_block, length);
        break;
    }
    pthread_mutex_unlock(&s->lock);
    return status;
}

DWORD vhdx_write(struct vd_image *image, const void *buffer, uint64_t offset, size_t length)
{
    struct vhdx_state *s = image->state;
    const uint8_t *data = buffer;
    if (!image->writable)
        return vd_fail(ERROR_ACCESS_DENIED, "%s is open read-only", image->path);
    if (offset > image->virtual_size || length > image->virtual_size - offset)
        return vd_fail(ERROR_INVALID_PARAMETER,
                       "writing %zu bytes at %llu: beyond the %llu-byte virtual disk", length,
                       ull(offset), ull(image->virtual_size));
    if (length == 0)
        return ERROR_SUCCESS;

    pthread_mutex_lock(&s->lock);
    DWORD status = s->session_guids_written ? ERROR_SUCCESS : vhdx_begin_changes(image, s);
    pthread_mutex_unlock(&s->lock);

    while (length > 0 && status == ERROR_SUCCESS) {
        uint64_t block = offset / s->block_size, in_block = offset % s->block_size;
        size_t n = s->block_size - in_block < length ? (size_t)(s->block_size - in_block) : length;
        status = vhdx_write_block(image, s, block, data, offset, n);
        data += n;
        offset += n;
        length -= n;
    }
    return status;
}

/* Fully present blocks are zeroed in the file (vd_image_zero_range), under
   map_lock as a write into them is: a discard or a move cannot take the
   block's place meanwhile.  The rest is written as zeros, one block piece
   at a time. */
DWORD vhdx_write_zeroes(struct vd_image *image, uint64_t offset, uint64_t length)
{
    enum { CHUNK = 1 << 20 };
    struct vhdx_state *s = image->state;
    DWORD status = vhdx_begin_range_change(image, offset, length, "zeroing");

    uint8_t *zeros = NULL;
    while (length > 0 && status == ERROR_SUCCESS) {
        uint64_t block = offset / s->block_size, in_block = offset % s->block_size;
        uint64_t n = s->block_size - in_block < length ? s->block_size - in_block : length;
        bool done = false;
        pthread_rwlock_rdlock(&s->map_lock);
        uint64_t entry = vhdx_bat_load(s, vhdx_payload_entry(s, block));
        if (vhdx_bat_state(entry) == PAYLOAD_BLOCK_FULLY_PRESENT)
            status = vd_image_zero_range(image, vhdx_bat_file_offset(entry) + in_block, n, &done);
        pthread_rwlock_unlock(&s->map_lock);
        if (!done && status == ERROR_SUCCESS && !zeros && !(zeros = calloc(1, CHUNK)))
            status = vd_fail(ERROR_OUTOFMEMORY, "allocating a buffer of zeros");
        for (uint64_t k = 0; !done && k < n && status == ERROR_SUCCESS;) {
            size_t m = n - k < CHUNK ? (size_t)(n - k) : CHUNK;
            status = vhdx_write_block(image, s, block, zeros, offset + k, m);
            k += m;
        }
        offset += n;
        length -= n;
    }
    free(zeros);
    return status;
}

DWORD vhdx_prepare_direct_write(struct vd_image *image)
{
    struct vhdx_state *s = image->state;
    if (!image->writable)
        return vd_fail(ERROR_ACCESS_DENIED, "%s is open read-only", image->path);
    pthread_mutex_lock(&s->lock);
    DWORD status = s->session_guids_written ? ERROR_SUCCESS : vhdx_begin_changes(image, s);
    pthread_mutex_unlock(&s->lock);
    return status;
}

/* Every write above orders its metadata with its own barriers; what is left
   is the data of writes into blocks that were already present. */
DWORD vhdx_flush(struct vd_image *image)
{
    return vhdx_sync_file(image, "reporting the disk flushed");
}
