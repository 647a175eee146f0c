/*
 * VHDX offline changes: identifier, parent, sector size, disk id, resize.
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
#include "reserve.h"
#include "shim.h"
#include "utf16.h"

/* ---- offline changes ----

   Without a log of our own, every change below is ordered so that each
   single write switches from the old state to the new: new structures are
   written where nothing points yet and flushed before the one small write
   (a metadata item of at most 16 bytes, a metadata table entry, a BAT
   range, a region table copy) that makes them current.  Writes of up to 16
   bytes that do not cross a sector boundary are what storage writes
   atomically; [MS-VHDX] would have the log carry larger metadata changes.
   Before the first change of a session the headers get a new FileWriteGuid
   as §2.2.2 requires (the DataWriteGuid changes only with the disk's
   contents: a resize, or when the caller sets the identifier). */

/* The metadata table entry of item `id`: its file offset, and the item's
   file offset and length. */
static DWORD find_item(struct vd_image *image, const GUID *id, struct vhdx_regions *regions,
                       uint64_t *entry_offset, uint64_t *item_offset, uint32_t *item_length,
                       uint32_t *used_end)
{
    DWORD status = vhdx_read_region_table(image, regions);
    if (status != ERROR_SUCCESS)
        return status;
    uint8_t *table = malloc(VHDX_METADATA_TABLE_SIZE);
    if (!table)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX metadata table");
    status = vhdx_read_at(image, table, VHDX_METADATA_TABLE_SIZE, regions->metadata_offset, "VHDX metadata table");
    const struct vhdx_metadata_table_header *mh = (const void *)table;
    uint16_t count = status == ERROR_SUCCESS ? vd_le16(mh->EntryCount) : 0;
    bool found = false;
    *used_end = VHDX_METADATA_TABLE_SIZE;
    for (uint16_t i = 0; i < count && i < VHDX_MAX_TABLE_ENTRIES; i++) {
        const struct vhdx_metadata_table_entry *e = (const void *)(table + sizeof *mh + (size_t)i * sizeof *e);
        GUID item = vd_guid_from_le_bytes(e->ItemId);
        uint32_t offset = vd_le32(e->Offset), length = vd_le32(e->Length);
        /* open() checked every entry to lie inside the region. */
        if (length && offset + length > *used_end)
            *used_end = offset + length;
        if (!found && !(vd_le32(e->Flags) & VHDX_META_IS_USER) && vd_guid_equal(&item, id)) {
            found = true;
            *entry_offset = regions->metadata_offset + sizeof *mh + (uint64_t)i * sizeof *e;
            *item_offset = regions->metadata_offset + offset;
            *item_length = length;
        }
    }
    free(table);
    if (status == ERROR_SUCCESS && !found)
        status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT, "VHDX metadata table at offset %llu has no item %s",
                         ull(regions->metadata_offset), vhdx_guid_text(id, false).s);
    return status;
}

static DWORD begin_change(struct vd_image *image, struct vhdx_state *s, bool data_changes)
{
    /* Every change here goes through the log: the header that starts the
       session names it too. */
    DWORD status = vhdx_log_start(s);
    if (status != ERROR_SUCCESS)
        return status;
    const struct vhdx_header *current = (const void *)s->header;
    GUID named = vd_guid_from_le_bytes(current->LogGuid);
    if (s->session_guids_written && !data_changes && vd_guid_equal(&named, &s->log_guid))
        return ERROR_SUCCESS;
    const struct vhdx_header *h = (const void *)s->header;
    GUID data_write = vd_guid_from_le_bytes(h->DataWriteGuid);
    if (data_changes) {
        int error = vd_guid_generate(&data_write);
        if (error)
            return vd_fail_errno(error, "generating a VHDX DataWriteGuid");
    }
    return vhdx_write_headers(image, s, &data_write);
}

/* A fixed-size item (at most 16 bytes) rewritten through the log. */
static DWORD write_item(struct vd_image *image, const GUID *id, const char *name, const void *data,
                        uint32_t length)
{
    struct vhdx_regions regions;
    uint64_t entry_offset, item_offset;
    uint32_t item_length, used_end;
    DWORD status = find_item(image, id, &regions, &entry_offset, &item_offset, &item_length, &used_end);
    if (status == ERROR_SUCCESS && item_length < length)
        status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT, "VHDX %s at offset %llu is %u bytes, needs %u", name,
                         ull(item_offset), item_length, length);
    if (status == ERROR_SUCCESS)
        status = begin_change(image, image->state, false);
    struct vhdx_meta_change change = {item_offset, data, length};
    if (status == ERROR_SUCCESS)
        status = vhdx_meta_write(image, image->state, &change, 1);
    return status;
}

DWORD vhdx_set_identifier(struct vd_image *image, const GUID *identifier)
{
    struct vhdx_state *s = image->state;
    pthread_mutex_lock(&s->lock);
    DWORD status = vhdx_write_headers(image, s, identifier);
    pthread_mutex_unlock(&s->lock);
    return status;
}

DWORD vhdx_set_physical_sector_size(struct vd_image *image, ULONG size)
{
    uint8_t raw[4];
    vd_put_le32(raw, size);
    DWORD status = write_item(image, &vhdx_item_physical_sector_size, "Physical Sector Size", raw, 4);
    if (status == ERROR_SUCCESS)
        image->physical_sector_size = size;
    return status;
}

DWORD vhdx_set_virtual_disk_id(struct vd_image *image, const GUID *id)
{
    uint8_t raw[16];
    vd_guid_to_le_bytes(id, raw);
    DWORD status = write_item(image, &vhdx_item_page83, "Page 83 Data", raw, 16);
    if (status == ERROR_SUCCESS)
        image->virtual_disk_id = *id;
    return status;
}

/* A new Parent Locator item is written into free space of the metadata
   region and flushed; then its table entry is pointed at it in one 8-byte
   write.  The old item's space is left unused. */
DWORD vhdx_set_parent(struct vd_image *image, struct vd_image *parent)
{
    struct vhdx_state *s = image->state;
    struct vhdx_regions regions;
    uint64_t entry_offset, item_offset;
    uint32_t item_length = 0, used_end = 0, length = 0;
    uint8_t *item = calloc(1, VHDX_MAX_METADATA_ITEM);
    if (!item) {
        vd_image_close(parent);
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a VHDX parent locator");
    }
    struct vd_create_request request = {.path = image->path, .parent = parent};
    DWORD status = find_item(image, &vhdx_item_parent_locator, &regions, &entry_offset, &item_offset,
                             &item_length, &used_end);
    if (status == ERROR_SUCCESS)
        status = vhdx_build_locator(&request, item, VHDX_MAX_METADATA_ITEM, &length);
    uint32_t at = (uint32_t)vhdx_round_up(used_end, 8);
    if (status == ERROR_SUCCESS && (at > regions.metadata_length || length > regions.metadata_length - at))
        status = vd_fail(ERROR_VHD_METADATA_FULL,
                         "%s: the VHDX metadata region at offset %llu (%u bytes) has no room for a %u-byte "
                         "parent locator", image->path, ull(regions.metadata_offset), regions.metadata_length,
                         length);
    /* The new item in free space and the table entry pointing at it, in
       one log entry: the old locator stays in charge until both are there. */
    uint8_t entry[8];
    vd_put_le32(entry, at);
    vd_put_le32(entry + 4, length);
    struct vhdx_meta_change changes[2] = {
        {regions.metadata_offset + at, item, length},
        {entry_offset + offsetof(struct vhdx_metadata_table_entry, Offset), entry, sizeof entry},
    };
    pthread_mutex_lock(&s->lock);
    if (status == ERROR_SUCCESS)
        status = begin_change(image, s, false);
    if (status == ERROR_SUCCESS)
        status = vhdx_meta_write(image, s, changes, 2);
    pthread_mutex_unlock(&s->lock);
    free(item);
    if (status != ERROR_SUCCESS) {
        vd_image_close(parent);
        return status;
    }
    vd_image_close(image->parent);
    image->parent = parent;
    image->parent_resolved = true;
    struct vhdx_metadata md = {.parent_locator_offset = regions.metadata_offset + at,
                               .parent_locator_length = length};
    struct vhdx_locator loc = {0};
    status = vhdx_parse_parent_locator(image, &md, &loc);
    if (status == ERROR_SUCCESS) {
        free(image->parent_locations);
        image->parent_locations = NULL;
        status = vhdx_build_parent_locations(image, &loc);
    }
    vhdx_locator_free(&loc);
    return status;
}

/* A copy of the region table with the BAT region moved, both copies in one
   log entry. */
static DWORD move_bat_region(struct vd_image *image, uint64_t offset, uint64_t length)
{
    static const uint64_t copies[2] = {VHDX_REGION_TABLE1_OFFSET, VHDX_REGION_TABLE2_OFFSET};
    uint8_t *table = malloc(VHDX_REGION_TABLE_SIZE);
    if (!table)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX region table");
    DWORD status = ERROR_SUCCESS;
    for (int i = 0; i < 2; i++) {
        status = vhdx_read_at(image, table, VHDX_REGION_TABLE_SIZE, copies[i], "VHDX region table");
        if (status == ERROR_SUCCESS)
            status = vhdx_check_region_table(table, copies[i]);
        if (status == ERROR_SUCCESS)
            break;
    }
    const struct vhdx_region_table_header *rh = (const void *)table;
    uint32_t count = status == ERROR_SUCCESS ? vd_le32(rh->EntryCount) : 0;
    bool moved = false;
    for (uint32_t i = 0; i < count; i++) {
        struct vhdx_region_table_entry *e = (void *)(table + sizeof *rh + (size_t)i * sizeof *e);
        GUID guid = vd_guid_from_le_bytes(e->Guid);
        if (vd_guid_equal(&guid, &vhdx_region_bat)) {
            vd_put_le64(e->FileOffset, offset);
            vd_put_le32(e->Length, (uint32_t)length);
            moved = true;
        }
    }
    if (status == ERROR_SUCCESS && !moved)
        status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT, "VHDX region table has no BAT region");
    vhdx_set_crc(table, VHDX_REGION_TABLE_SIZE, offsetof(struct vhdx_region_table_header, Checksum));
    struct vhdx_meta_change changes[2] = {
        {copies[0], table, VHDX_REGION_TABLE_SIZE},
        {copies[1], table, VHDX_REGION_TABLE_SIZE},
    };
    if (status == ERROR_SUCCESS)
        status = vhdx_meta_write(image, image->state, changes, 2);
    free(table);
    return status;
}

/* BAT entries [first, first + count), from entries[0 .. count). */
static DWORD write_bat_range(struct vd_image *image, uint64_t bat_offset, const uint64_t *entries,
                             uint64_t first, uint64_t count)
{
    if (count == 0)
        return ERROR_SUCCESS;
    uint8_t *raw = malloc(count * 8);
    if (!raw)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating %llu BAT entries", ull(count));
    for (uint64_t i = 0; i < count; i++)
        vd_put_le64(raw + i * 8, entries[i]);
    struct vhdx_meta_change change = {bat_offset + first * 8, raw, count * 8};
    DWORD status = vhdx_meta_write(image, image->state, &change, 1);
    free(raw);
    return status;
}

/* Growing: the new BAT entries (NOT_PRESENT, or for a fixed disk blocks
   allocated now) are written, in a larger BAT region past the end of the
   file when the old one is too small, before the size item changes.
   Shrinking: the size item changes first, then the entries past the new end
   are cleared, so that no later growth brings their blocks back.  The space
   they held is not given back to the file system.  A fixed disk's new
   payload is reserved past the end of the file before anything else, in
   steps reported to job: a cancel there leaves the disk as it was. */
DWORD vhdx_resize(struct vd_image *image, uint64_t size, struct vd_job *job)
{
    struct vhdx_state *s = image->state;
    if (s->has_parent)
        return vd_fail(ERROR_VHD_INVALID_TYPE, "%s: a differencing VHDX has its parent's size", image->path);
    if (size == 0 || size > VHDX_MAX_VIRTUAL_SIZE || size % s->logical_sector_size)
        return vd_fail(ERROR_VHD_INVALID_SIZE, "%s: %llu bytes is not a multiple of the %u-byte sector up to 64 TiB",
                       image->path, ull(size), s->logical_sector_size);
    if (size == image->virtual_size)
        return ERROR_SUCCESS;
    uint64_t blocks = (size + s->block_size - 1) / s->block_size;
    uint64_t entries = blocks + (blocks - 1) / s->chunk_ratio;
    uint64_t old_entries = s->bat_entries, keep = entries < old_entries ? entries : old_entries;
    uint64_t *bat = calloc(entries, sizeof *bat);
    if (!bat)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a BAT of %llu entries", ull(entries));
    memcpy(bat, s->bat, keep * sizeof *bat);
    bool fixed = image->subtype == VD_SUBTYPE_FIXED;
    bool grow = size > image->virtual_size;
    uint64_t bat_offset = s->bat_offset;
    uint8_t raw_size[8];
    vd_put_le64(raw_size, size);

    if (fixed && grow && blocks > s->payload_blocks) {
        uint64_t length = (blocks - s->payload_blocks) * s->block_size;
        vd_job_set_total(job, length);
        DWORD reserved = vd_job_fallocate(job, image->fd, FALLOC_FL_KEEP_SIZE, s->file_end, length, image->path);
        if (reserved != ERROR_SUCCESS) {
            free(bat);
            return reserved;
        }
    }

    pthread_mutex_lock(&s->lock);
    DWORD status = begin_change(image, s, true);
    if (status == ERROR_SUCCESS && grow) {
        struct vhdx_regions regions;
        status = vhdx_read_region_table(image, &regions);
        uint64_t old_blocks = s->payload_blocks;
        uint64_t payload = 0;
        /* The payload first, so that it follows the old blocks in the file. */
        /* A grow within the last block allocates nothing (and fallocate
           refuses a length of 0). */
        if (status == ERROR_SUCCESS && fixed && blocks > old_blocks)
            status = vhdx_allocate(image, s, (blocks - old_blocks) * s->block_size, &payload);
        for (uint64_t b = old_blocks; b < blocks && fixed && status == ERROR_SUCCESS; b++)
            bat[vhdx_payload_entry(s, b)] = (payload + (b - old_blocks) * s->block_size) | PAYLOAD_BLOCK_FULLY_PRESENT;
        if (status == ERROR_SUCCESS && entries * 8 > regions.bat_length) {
            uint64_t length = vhdx_round_up(entries * 8, VHDX_ALIGN);
            if (length > UINT32_MAX)
                status = vd_fail(ERROR_VHD_INVALID_SIZE, "%s: a BAT of %llu entries exceeds a region's limit",
                                 image->path, ull(entries));
            if (status == ERROR_SUCCESS)
                status = vhdx_allocate(image, s, length, &bat_offset);
            if (status == ERROR_SUCCESS)
                status = write_bat_range(image, bat_offset, bat, 0, entries);
            if (status == ERROR_SUCCESS)
                status = move_bat_region(image, bat_offset, length);
        } else if (status == ERROR_SUCCESS) {
            status = write_bat_range(image, bat_offset, bat + keep, keep, entries - keep);
        }
        /* The old last block's bytes past the old end become part of the disk:
           they must read as zeros, whatever a writer left there. */
        uint64_t tail = image->virtual_size % s->block_size;
        uint64_t last = bat[vhdx_payload_entry(s, old_blocks - 1)];
        if (status == ERROR_SUCCESS && tail && vhdx_bat_state(last) == PAYLOAD_BLOCK_FULLY_PRESENT) {
            uint8_t *zeros = calloc(1, s->block_size - tail);
            status = zeros ? vhdx_write_file(image, zeros, s->block_size - tail, vhdx_bat_file_offset(last) + tail)
                           : vd_fail(ERROR_OUTOFMEMORY, "allocating a zero buffer");
            free(zeros);
            if (status == ERROR_SUCCESS)
                status = vhdx_sync_file(image, "making the old last block's tail visible");
        }
    }
    if (status == ERROR_SUCCESS)
        status = write_item(image, &vhdx_item_virtual_disk_size, "Virtual Disk Size", raw_size, 8);
    if (status == ERROR_SUCCESS && !grow) {
        uint64_t *cleared = calloc(old_entries - entries, sizeof *cleared);
        status = cleared ? write_bat_range(image, bat_offset, cleared, entries, old_entries - entries)
                         : vd_fail(ERROR_OUTOFMEMORY, "allocating %llu BAT entries", ull(old_entries - entries));
        free(cleared);
    }
    if (status == ERROR_SUCCESS) {
        free(s->bat);
        s->bat = bat;
        s->bat_entries = entries;
        s->bat_offset = bat_offset;
        s->payload_blocks = blocks;
        image->virtual_size = size;
        vhdx_find_flat_mapping(image, s);
    } else {
        free(bat);
    }
    pthread_mutex_unlock(&s->lock);
    return status;
}
