/*
 * VHDX open: headers, region table, metadata, BAT and parent, each verified
 * before it is trusted (see vhdx.h for the error-code mapping).
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

/* ---- open: headers and log ---- */

static bool header_valid(const uint8_t *h)
{
    const struct vhdx_header *header = (const void *)h;
    return memcmp(header->Signature, "head", 4) == 0
           && vhdx_crc_ok(h, VHDX_HEADER_SIZE, offsetof(struct vhdx_header, Checksum));
}

static DWORD read_headers(struct vd_image *image, struct vhdx_state *s)
{
    static const uint64_t offsets[2] = {VHDX_HEADER1_OFFSET, VHDX_HEADER2_OFFSET};
    uint8_t copies[2][VHDX_HEADER_SIZE];
    bool valid[2];

    if (image->file_size < VHDX_ALIGN)
        return vd_fail(ERROR_VHD_INVALID_FILE_SIZE,
                       "VHDX file of %llu bytes is smaller than its 1 MiB header section",
                       ull(image->file_size));
    for (int i = 0; i < 2; i++) {
        DWORD status = vhdx_read_at(image, copies[i], VHDX_HEADER_SIZE, offsets[i], "VHDX header");
        if (status != ERROR_SUCCESS)
            return status;
        valid[i] = header_valid(copies[i]);
    }
    if (!valid[0] && !valid[1])
        return vd_fail(ERROR_VHD_DRIVE_FOOTER_CORRUPT,
                       "neither VHDX header (at offsets %llu and %llu) has a valid signature and "
                       "CRC-32C", ull(offsets[0]), ull(offsets[1]));

    int current;
    if (valid[0] && valid[1]) {
        uint64_t seq0 = vd_le64(((struct vhdx_header *)copies[0])->SequenceNumber);
        uint64_t seq1 = vd_le64(((struct vhdx_header *)copies[1])->SequenceNumber);
        /* Equal sequence numbers with different contents leave no way to tell
           which update came last; qemu refuses too. */
        if (seq0 == seq1 && memcmp(copies[0], copies[1], VHDX_HEADER_SIZE) != 0)
            return vd_fail(ERROR_VHD_DRIVE_FOOTER_CORRUPT,
                           "VHDX headers at offsets %llu and %llu differ but have the same "
                           "sequence number %llu", ull(offsets[0]), ull(offsets[1]), ull(seq0));
        current = seq1 > seq0 ? 1 : 0;
    } else {
        current = valid[0] ? 0 : 1;
    }
    memcpy(s->header, copies[current], VHDX_HEADER_SIZE);
    s->current_header = current;

    const struct vhdx_header *h = (const void *)s->header;
    s->sequence_number = vd_le64(h->SequenceNumber);
    if (vd_le16(h->Version) != 1)
        return vd_fail(ERROR_VHD_FORMAT_UNSUPPORTED_VERSION,
                       "VHDX header at offset %llu has version %u (only 1 is defined)",
                       ull(offsets[current]), vd_le16(h->Version));
    return ERROR_SUCCESS;
}
/* ---- open: region table ---- */


DWORD vhdx_check_region_table(const uint8_t *table, uint64_t table_offset)
{
    const struct vhdx_region_table_header *rh = (const void *)table;
    if (memcmp(rh->Signature, "regi", 4) != 0)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "VHDX region table at offset %llu: bad signature", ull(table_offset));
    if (!vhdx_crc_ok(table, VHDX_REGION_TABLE_SIZE, offsetof(struct vhdx_region_table_header, Checksum)))
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "VHDX region table at offset %llu: CRC-32C mismatch", ull(table_offset));
    if (vd_le32(rh->EntryCount) > VHDX_MAX_TABLE_ENTRIES)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "VHDX region table at offset %llu: %u entries (at most %d)",
                       ull(table_offset), vd_le32(rh->EntryCount), VHDX_MAX_TABLE_ENTRIES);
    return ERROR_SUCCESS;
}

DWORD vhdx_read_region_table(struct vd_image *image, struct vhdx_regions *regions)
{
    static const uint64_t offsets[2] = {VHDX_REGION_TABLE1_OFFSET, VHDX_REGION_TABLE2_OFFSET};
    uint8_t *table = malloc(VHDX_REGION_TABLE_SIZE);
    if (!table)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX region table");

    /* The two copies must be identical (§2.2.3); the second is the fallback
       for a torn or corrupted first copy. */
    DWORD status = ERROR_SUCCESS;
    uint64_t table_offset = 0;
    regions->others_start = regions->others_end = 0;
    for (int i = 0; i < 2; i++) {
        table_offset = offsets[i];
        status = vhdx_read_at(image, table, VHDX_REGION_TABLE_SIZE, table_offset, "VHDX region table");
        if (status == ERROR_SUCCESS)
            status = vhdx_check_region_table(table, table_offset);
        if (status == ERROR_SUCCESS)
            break;
    }
    if (status != ERROR_SUCCESS) {
        free(table);
        return status;
    }

    const struct vhdx_region_table_header *rh = (const void *)table;
    uint32_t count = vd_le32(rh->EntryCount);
    bool have_bat = false, have_metadata = false;
    for (uint32_t i = 0; i < count && status == ERROR_SUCCESS; i++) {
        const struct vhdx_region_table_entry *e =
            (const void *)(table + sizeof *rh + (size_t)i * sizeof *e);
        GUID guid = vd_guid_from_le_bytes(e->Guid);
        uint64_t offset = vd_le64(e->FileOffset);
        uint32_t length = vd_le32(e->Length);
        bool required = vd_le32(e->Required) & VHDX_REGION_REQUIRED;
        uint64_t entry_offset = table_offset + sizeof *rh + (uint64_t)i * sizeof *e;
        bool is_bat = vd_guid_equal(&guid, &vhdx_region_bat);
        bool is_metadata = vd_guid_equal(&guid, &vhdx_region_metadata);

        if (!is_bat && !is_metadata) {
            if (required)
                status = vd_fail(ERROR_VHD_FORMAT_UNKNOWN,
                                 "VHDX region table entry at offset %llu: unknown region %s is "
                                 "marked required", ull(entry_offset), vhdx_guid_text(&guid, false).s);
            /* Optional regions we do not know are ignored (§2.2.3.2), but
               their space is kept clear of moved blocks. */
            if (status == ERROR_SUCCESS && length && offset < image->file_size) {
                uint64_t end = length > image->file_size - offset ? image->file_size : offset + length;
                if (!regions->others_end || offset < regions->others_start)
                    regions->others_start = offset;
                if (end > regions->others_end)
                    regions->others_end = end;
            }
            continue;
        }
        if (offset % VHDX_ALIGN || offset < VHDX_ALIGN || length % VHDX_ALIGN || length == 0) {
            status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                             "VHDX region table entry at offset %llu: region at %llu (%u bytes) "
                             "is not 1 MiB aligned", ull(entry_offset), ull(offset), length);
        } else if (offset > image->file_size || length > image->file_size - offset) {
            status = vd_fail(ERROR_VHD_INVALID_FILE_SIZE,
                             "VHDX region table entry at offset %llu: region at %llu (%u bytes) "
                             "extends past the end of the file (%llu bytes)",
                             ull(entry_offset), ull(offset), length, ull(image->file_size));
        } else if ((is_bat && have_bat) || (is_metadata && have_metadata)) {
            status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                             "VHDX region table at offset %llu: region %s listed twice",
                             ull(table_offset), vhdx_guid_text(&guid, false).s);
        } else if (is_bat) {
            have_bat = true;
            regions->bat_offset = offset;
            regions->bat_length = length;
        } else {
            have_metadata = true;
            regions->metadata_offset = offset;
            regions->metadata_length = length;
        }
    }
    free(table);
    if (status != ERROR_SUCCESS)
        return status;
    if (!have_bat || !have_metadata)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "VHDX region table at offset %llu has no %s region", ull(table_offset),
                       have_bat ? "metadata" : "BAT");
    if (regions->bat_offset < regions->metadata_offset + regions->metadata_length
        && regions->metadata_offset < regions->bat_offset + regions->bat_length)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "VHDX region table at offset %llu: BAT at %llu and metadata at %llu overlap",
                       ull(table_offset), ull(regions->bat_offset), ull(regions->metadata_offset));
    return ERROR_SUCCESS;
}

/* ---- open: metadata ---- */


/* Where a known item is, found while walking the table. */
struct vhdx_item_ref {
    const GUID *id;
    const char *name;
    uint32_t min_length;
    uint64_t offset;   /* file offset */
    uint32_t length;
    bool found;
};

static DWORD read_metadata(struct vd_image *image, const struct vhdx_regions *regions,
                           struct vhdx_metadata *md)
{
    uint64_t region = regions->metadata_offset;
    enum { FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE83, LOGICAL_SECTOR, PHYSICAL_SECTOR, PARENT_LOCATOR, N_ITEMS };
    struct vhdx_item_ref items[N_ITEMS] = {
        [FILE_PARAMETERS] = {&vhdx_item_file_parameters, "File Parameters", 8, 0, 0, false},
        [VIRTUAL_DISK_SIZE] = {&vhdx_item_virtual_disk_size, "Virtual Disk Size", 8, 0, 0, false},
        [PAGE83] = {&vhdx_item_page83, "Page 83 Data", 16, 0, 0, false},
        [LOGICAL_SECTOR] = {&vhdx_item_logical_sector_size, "Logical Sector Size", 4, 0, 0, false},
        [PHYSICAL_SECTOR] = {&vhdx_item_physical_sector_size, "Physical Sector Size", 4, 0, 0, false},
        [PARENT_LOCATOR] = {&vhdx_item_parent_locator, "Parent Locator",
                            sizeof(struct vhdx_parent_locator_header), 0, 0, false},
    };

    if (regions->metadata_length < VHDX_METADATA_TABLE_SIZE)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "VHDX metadata region at offset %llu is only %u bytes", ull(region),
                       regions->metadata_length);
    uint8_t *table = malloc(VHDX_METADATA_TABLE_SIZE);
    if (!table)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX metadata table");
    /* The first 4 KiB hold the header and 127 entries, more than images
       have: the rest of the 64 KiB is read only when the count needs it (a
       64 KiB read was a sixth of the cost of an open). */
    enum { FIRST_READ = 4096 };
    DWORD status = vhdx_read_at(image, table, FIRST_READ, region, "VHDX metadata table");
    const struct vhdx_metadata_table_header *mh = (const void *)table;
    if (status == ERROR_SUCCESS && memcmp(mh->Signature, "metadata", 8) != 0)
        status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                         "VHDX metadata table at offset %llu: bad signature", ull(region));
    if (status == ERROR_SUCCESS && vd_le16(mh->EntryCount) > VHDX_MAX_TABLE_ENTRIES)
        status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                         "VHDX metadata table at offset %llu: %u entries (at most %d)", ull(region),
                         vd_le16(mh->EntryCount), VHDX_MAX_TABLE_ENTRIES);
    size_t used = sizeof *mh + (size_t)vd_le16(mh->EntryCount) * sizeof(struct vhdx_metadata_table_entry);
    if (status == ERROR_SUCCESS && used > FIRST_READ)
        status = vhdx_read_at(image, table + FIRST_READ, used - FIRST_READ, region + FIRST_READ,
                              "VHDX metadata table");

    uint16_t count = status == ERROR_SUCCESS ? vd_le16(mh->EntryCount) : 0;
    for (uint16_t i = 0; i < count && status == ERROR_SUCCESS; i++) {
        const struct vhdx_metadata_table_entry *e =
            (const void *)(table + sizeof *mh + (size_t)i * sizeof *e);
        uint64_t entry_offset = region + sizeof *mh + (uint64_t)i * sizeof *e;
        GUID id = vd_guid_from_le_bytes(e->ItemId);
        uint32_t offset = vd_le32(e->Offset), length = vd_le32(e->Length);
        uint32_t flags = vd_le32(e->Flags);

        /* §2.6.1.2: a zero-length item has offset 0; any other lies past the
           64 KiB table, is at most 1 MiB and stays inside the region. */
        if (length == 0 ? offset != 0
                        : offset < VHDX_METADATA_TABLE_SIZE || length > VHDX_MAX_METADATA_ITEM
                              || offset > regions->metadata_length
                              || length > regions->metadata_length - offset) {
            status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                             "VHDX metadata entry at offset %llu: item %s at %u (%u bytes) lies "
                             "outside the metadata region (%u bytes)", ull(entry_offset),
                             vhdx_guid_text(&id, false).s, offset, length, regions->metadata_length);
            break;
        }
        struct vhdx_item_ref *known = NULL;
        if (!(flags & VHDX_META_IS_USER))
            for (int k = 0; k < N_ITEMS; k++)
                if (vd_guid_equal(&id, items[k].id))
                    known = &items[k];
        if (!known) {
            if (flags & VHDX_META_IS_REQUIRED)
                status = vd_fail(ERROR_VHD_FORMAT_UNKNOWN,
                                 "VHDX metadata entry at offset %llu: unknown item %s is marked "
                                 "required", ull(entry_offset), vhdx_guid_text(&id, false).s);
            continue;
        }
        if (known->found)
            status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                             "VHDX metadata table at offset %llu: item %s (%s) listed twice",
                             ull(region), known->name, vhdx_guid_text(&id, false).s);
        else if (length < known->min_length)
            status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                             "VHDX metadata entry at offset %llu: item %s is %u bytes, needs %u",
                             ull(entry_offset), known->name, length, known->min_length);
        known->found = true;
        known->offset = region + offset;
        known->length = length;
    }
    free(table);
    if (status != ERROR_SUCCESS)
        return status;

    for (int k = 0; k < PARENT_LOCATOR; k++)
        if (!items[k].found)
            return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                           "VHDX metadata table at offset %llu lacks the required %s item %s",
                           ull(region), items[k].name, vhdx_guid_text(items[k].id, false).s);

    struct vhdx_file_parameters fp;
    uint8_t size[8], page83[16], logical[4], physical[4];
    /* The five items usually sit side by side: one read for all of them
       then, instead of five system calls. */
    uint64_t low = UINT64_MAX, high = 0;
    for (int k = 0; k < PARENT_LOCATOR; k++) {
        low = items[k].offset < low ? items[k].offset : low;
        high = items[k].offset + items[k].min_length > high ? items[k].offset + items[k].min_length : high;
    }
    uint8_t span[512];
    if (high - low <= sizeof span &&
        vhdx_read_at(image, span, high - low, low, "VHDX metadata items") == ERROR_SUCCESS) {
        memcpy(&fp, span + (items[FILE_PARAMETERS].offset - low), sizeof fp);
        memcpy(size, span + (items[VIRTUAL_DISK_SIZE].offset - low), sizeof size);
        memcpy(page83, span + (items[PAGE83].offset - low), sizeof page83);
        memcpy(logical, span + (items[LOGICAL_SECTOR].offset - low), sizeof logical);
        memcpy(physical, span + (items[PHYSICAL_SECTOR].offset - low), sizeof physical);
    } else if ((status = vhdx_read_at(image, &fp, sizeof fp, items[FILE_PARAMETERS].offset,
                                      "VHDX File Parameters")) ||
        (status = vhdx_read_at(image, size, 8, items[VIRTUAL_DISK_SIZE].offset, "VHDX Virtual Disk Size")) ||
        (status = vhdx_read_at(image, page83, 16, items[PAGE83].offset, "VHDX Page 83 Data")) ||
        (status = vhdx_read_at(image, logical, 4, items[LOGICAL_SECTOR].offset, "VHDX Logical Sector Size")) ||
        (status = vhdx_read_at(image, physical, 4, items[PHYSICAL_SECTOR].offset, "VHDX Physical Sector Size")))
        return status;

    md->block_size = vd_le32(fp.BlockSize);
    md->file_flags = vd_le32(fp.Flags);
    md->virtual_disk_size = vd_le64(size);
    md->page83 = vd_guid_from_le_bytes(page83);
    md->logical_sector_size = vd_le32(logical);
    md->physical_sector_size = vd_le32(physical);
    md->parent_locator_offset = items[PARENT_LOCATOR].found ? items[PARENT_LOCATOR].offset : 0;
    md->parent_locator_length = items[PARENT_LOCATOR].length;

    if (md->block_size < VHDX_MIN_BLOCK_SIZE || md->block_size > VHDX_MAX_BLOCK_SIZE
        || !vhdx_is_power_of_two(md->block_size))
        return vd_fail(ERROR_VHD_INVALID_BLOCK_SIZE,
                       "VHDX File Parameters at offset %llu: block size %u is not a power of two "
                       "between 1 MiB and 256 MiB", ull(items[FILE_PARAMETERS].offset), md->block_size);
    if (md->logical_sector_size != 512 && md->logical_sector_size != 4096)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "VHDX Logical Sector Size at offset %llu: %u is neither 512 nor 4096",
                       ull(items[LOGICAL_SECTOR].offset), md->logical_sector_size);
    if (md->physical_sector_size != 512 && md->physical_sector_size != 4096)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "VHDX Physical Sector Size at offset %llu: %u is neither 512 nor 4096",
                       ull(items[PHYSICAL_SECTOR].offset), md->physical_sector_size);
    if (md->virtual_disk_size == 0 || md->virtual_disk_size > VHDX_MAX_VIRTUAL_SIZE
        || md->virtual_disk_size % md->logical_sector_size)
        return vd_fail(ERROR_VHD_INVALID_SIZE,
                       "VHDX Virtual Disk Size at offset %llu: %llu bytes is not a non-zero "
                       "multiple of the %u-byte sector up to 64 TiB",
                       ull(items[VIRTUAL_DISK_SIZE].offset), ull(md->virtual_disk_size),
                       md->logical_sector_size);
    if ((md->file_flags & VHDX_PARAM_HAS_PARENT) && !items[PARENT_LOCATOR].found)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "VHDX metadata table at offset %llu: differencing disk without a Parent "
                       "Locator item", ull(region));
    return ERROR_SUCCESS;
}

/* ---- open: BAT ---- */

/* Bytes of payload block `block` that lie inside the virtual disk: the last
   block may be cut short by the disk's size. */
uint64_t vhdx_block_bytes_used(const struct vd_image *image, const struct vhdx_state *s, uint64_t block)
{
    uint64_t start = block * s->block_size;
    uint64_t left = image->virtual_size - start;
    return left < s->block_size ? left : s->block_size;
}

static DWORD read_bat(struct vd_image *image, struct vhdx_state *s, const struct vhdx_regions *regions)
{
    uint64_t sb_blocks = (s->payload_blocks + s->chunk_ratio - 1) / s->chunk_ratio;
    s->bat_entries = s->has_parent ? sb_blocks * (s->chunk_ratio + 1ull)
                                   : s->payload_blocks + (s->payload_blocks - 1) / s->chunk_ratio;
    s->bat_offset = regions->bat_offset;
    if (s->bat_entries > regions->bat_length / 8)
        return vd_fail(ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT,
                       "VHDX BAT at offset %llu: region of %u bytes cannot hold the %llu entries "
                       "a %llu-byte disk with %u-byte blocks needs", ull(s->bat_offset),
                       regions->bat_length, ull(s->bat_entries), ull(image->virtual_size),
                       s->block_size);

    /* Bounded: the region length was checked against the file size.  Read
       as bytes and converted in place, each entry read before it is stored. */
    size_t bytes = (size_t)s->bat_entries * 8;
    s->bat = malloc(bytes);
    if (!s->bat)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a %zu-byte VHDX BAT", bytes);
    DWORD status = vhdx_read_at(image, s->bat, bytes, s->bat_offset, "VHDX BAT");
    if (status != ERROR_SUCCESS)
        return status;
    for (uint64_t i = 0; i < s->bat_entries; i++) {
        uint64_t entry = vd_le64((const uint8_t *)s->bat + i * 8);
        s->bat[i] = entry;
    }

    /* Every state must be valid for this disk type (§2.5.1.1, §2.5.1.2) and
       every allocated block inside the file, so read() never has to check.
       The BAT interleaves chunk_ratio payload entries and one sector bitmap
       entry: slot (the place in that cycle) and block (the payload block
       number) are counted along rather than divided out of i, two 64-bit
       divisions per entry that made this loop a fifth of opening a large
       disk. */
    for (uint64_t i = 0, slot = 0, payload_block = 0; i < s->bat_entries;
         i++, payload_block += slot != s->chunk_ratio, slot = slot == s->chunk_ratio ? 0 : slot + 1) {
        uint64_t entry = s->bat[i], off = vhdx_bat_file_offset(entry);
        uint32_t state = vhdx_bat_state(entry);
        bool is_bitmap = slot == s->chunk_ratio;
        uint64_t needed;
        const char *problem = NULL;

        if (is_bitmap) {
            if (state == SB_BLOCK_NOT_PRESENT)
                continue;
            if (state != SB_BLOCK_PRESENT || !s->has_parent) {
                problem = "invalid sector bitmap state";
            } else {
                needed = MiB;
                goto check_offset;
            }
        } else {
            uint64_t block = payload_block;
            if (block >= s->payload_blocks) {
                /* Differencing BATs run to the end of the last chunk; the
                   entries past the disk describe nothing. */
                if (state == PAYLOAD_BLOCK_NOT_PRESENT)
                    continue;
                problem = "payload entry past the end of the disk is in use";
            } else if (state <= PAYLOAD_BLOCK_UNMAPPED) {
                continue;
            } else if (state == PAYLOAD_BLOCK_FULLY_PRESENT
                       || (state == PAYLOAD_BLOCK_PARTIALLY_PRESENT && s->has_parent)) {
                if (state == PAYLOAD_BLOCK_PARTIALLY_PRESENT) {
                    uint64_t sb = vhdx_bitmap_entry(s, block / s->chunk_ratio);
                    if (vhdx_bat_state(s->bat[sb]) != SB_BLOCK_PRESENT) {
                        problem = "partially present block without a sector bitmap";
                        goto bad;
                    }
                }
                needed = vhdx_block_bytes_used(image, s, block);
                goto check_offset;
            } else {
                problem = "invalid payload state";
            }
        }
        goto bad;
    check_offset:
        if (off >= VHDX_ALIGN && off <= image->file_size && needed <= image->file_size - off)
            continue;
        problem = "block lies outside the file";
    bad:
        return vd_fail(ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT,
                       "VHDX BAT entry %llu at offset %llu: %s (state %u, file offset %llu, file "
                       "size %llu)", ull(i), ull(s->bat_offset + i * 8), problem, state, ull(off),
                       ull(image->file_size));
    }
    return ERROR_SUCCESS;
}

/* A direct loop mapping is possible when the payload blocks are all present,
   in order and back to back. */
void vhdx_find_flat_mapping(struct vd_image *image, const struct vhdx_state *s)
{
    /* A loop device would read the file around the in-memory replay. */
    if (s->log) {
        image->flat = false;
        return;
    }
    uint64_t base = vhdx_bat_file_offset(s->bat[vhdx_payload_entry(s, 0)]);
    image->flat = false;
    for (uint64_t b = 0; b < s->payload_blocks; b++) {
        uint64_t entry = s->bat[vhdx_payload_entry(s, b)];
        if (vhdx_bat_state(entry) != PAYLOAD_BLOCK_FULLY_PRESENT
            || vhdx_bat_file_offset(entry) != base + b * s->block_size)
            return;
    }
    image->flat = true;
    image->flat_offset = base;
}

/* ---- open: parent locator and parent ---- */


void vhdx_locator_free(struct vhdx_locator *l)
{
    free(l->relative_path);
    free(l->volume_path);
    free(l->absolute_win32_path);
}

/* A UTF-16LE key or value of the locator as UTF-8; NULL when it is not valid
   UTF-16 or holds a NUL (the spec stores them without terminator). */
static char *locator_string(const uint8_t *bytes, size_t length)
{
    size_t units = length / 2;
    WCHAR *text = malloc((units + 1) * sizeof *text);
    if (!text)
        return NULL;
    for (size_t i = 0; i < units; i++) {
        text[i] = vd_le16(bytes + 2 * i);
        if (text[i] == 0) {
            free(text);
            return NULL;
        }
    }
    text[units] = 0;
    char *utf8 = vd_utf16_to_utf8(text);
    free(text);
    return utf8;
}

DWORD vhdx_parse_parent_locator(struct vd_image *image, const struct vhdx_metadata *md,
                                  struct vhdx_locator *loc)
{
    uint64_t item = md->parent_locator_offset;
    uint32_t length = md->parent_locator_length; /* ≤ 1 MiB, checked with the table */
    uint8_t *data = malloc(length);
    if (!data)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX parent locator");
    DWORD status = vhdx_read_at(image, data, length, item, "VHDX parent locator");
    if (status != ERROR_SUCCESS) {
        free(data);
        return status;
    }

    const struct vhdx_parent_locator_header *h = (const void *)data;
    GUID type = vd_guid_from_le_bytes(h->LocatorType);
    uint16_t count = vd_le16(h->KeyValueCount);
    bool has_linkage = false;
    if (!vd_guid_equal(&type, &vhdx_locator_type_vhdx)) {
        status = vd_fail(ERROR_VHD_FORMAT_UNKNOWN,
                         "VHDX parent locator at offset %llu: unknown locator type %s", ull(item),
                         vhdx_guid_text(&type, false).s);
    } else if (sizeof *h + (uint64_t)count * sizeof(struct vhdx_parent_locator_entry) > length) {
        status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                         "VHDX parent locator at offset %llu: %u entries do not fit in %u bytes",
                         ull(item), count, length);
    }
    for (uint16_t i = 0; i < count && status == ERROR_SUCCESS; i++) {
        const struct vhdx_parent_locator_entry *e =
            (const void *)(data + sizeof *h + (size_t)i * sizeof *e);
        uint32_t ko = vd_le32(e->KeyOffset), vo = vd_le32(e->ValueOffset);
        uint16_t kl = vd_le16(e->KeyLength), vl = vd_le16(e->ValueLength);
        uint64_t entry_offset = item + sizeof *h + (uint64_t)i * sizeof *e;
        if (kl == 0 || vl == 0 || kl % 2 || vl % 2 || ko > length || kl > length - ko
            || vo > length || vl > length - vo) {
            status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                             "VHDX parent locator entry at offset %llu: key (%u, %u bytes) or "
                             "value (%u, %u bytes) outside the %u-byte item",
                             ull(entry_offset), ko, kl, vo, vl, length);
            break;
        }
        char *key = locator_string(data + ko, kl);
        char *value = locator_string(data + vo, vl);
        if (!key || !value) {
            status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                             "VHDX parent locator entry at offset %llu: key or value is not valid "
                             "UTF-16", ull(entry_offset));
        } else if (strcmp(key, "parent_linkage") == 0 || strcmp(key, "parent_linkage2") == 0) {
            bool second = key[14] == '2';
            if (!vhdx_guid_parse(value, second ? &loc->linkage2 : &loc->linkage))
                status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                                 "VHDX parent locator entry at offset %llu: %s \"%s\" is not a GUID",
                                 ull(entry_offset), key, value);
            else if (second)
                loc->has_linkage2 = true;
            else
                has_linkage = true;
        } else {
            char **slot = strcmp(key, "relative_path") == 0         ? &loc->relative_path
                          : strcmp(key, "volume_path") == 0         ? &loc->volume_path
                          : strcmp(key, "absolute_win32_path") == 0 ? &loc->absolute_win32_path
                                                                    : NULL;
            /* Unknown keys are allowed (§2.6.2.6.3); a repeated key keeps its
               first value. */
            if (slot && !*slot) {
                *slot = value;
                value = NULL;
            }
        }
        free(key);
        free(value);
    }
    free(data);
    if (status == ERROR_SUCCESS && !has_linkage)
        status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                         "VHDX parent locator at offset %llu has no parent_linkage", ull(item));
    return status;
}

/* image->parent_locations in search order (§2.6.2.6.3: relative, volume,
   absolute).  A relative path is resolved against the child's directory, and
   Windows' backslashes become slashes so ".\parent.vhdx" works here too. */
DWORD vhdx_build_parent_locations(struct vd_image *image, const struct vhdx_locator *loc)
{
    char *relative = NULL;
    bool use_relative = loc->relative_path
                        && !(image->open_flags & OPEN_VIRTUAL_DISK_FLAG_IGNORE_RELATIVE_PARENT_LOCATOR);
    if (use_relative) {
        const char *slash = strrchr(image->path, '/');
        size_t dir_length = slash ? (size_t)(slash - image->path) : 0;
        size_t rel_length = strlen(loc->relative_path);
        relative = malloc(dir_length + 1 + rel_length + 1);
        if (!relative)
            return vd_fail(ERROR_OUTOFMEMORY, "allocating the parent path");
        memcpy(relative, image->path, dir_length);
        relative[dir_length] = '/';
        for (size_t i = 0; i <= rel_length; i++)
            relative[dir_length + 1 + i] = loc->relative_path[i] == '\\' ? '/' : loc->relative_path[i];
    }
    const char *candidates[3] = {relative, loc->volume_path, loc->absolute_win32_path};
    size_t total = 1;
    for (int i = 0; i < 3; i++)
        if (candidates[i] && *candidates[i])
            total += strlen(candidates[i]) + 1;
    char *list = malloc(total), *p = list;
    if (!list) {
        free(relative);
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the parent locations");
    }
    for (int i = 0; i < 3; i++)
        if (candidates[i] && *candidates[i]) {
            size_t n = strlen(candidates[i]) + 1;
            memcpy(p, candidates[i], n);
            p += n;
        }
    *p = '\0';
    free(relative);
    image->parent_locations = list;
    return ERROR_SUCCESS;
}

/* The files of the chain being opened on this thread, innermost last, to
   catch a disk that is (through its parents) its own parent. */
static _Thread_local struct { dev_t dev; ino_t ino; } vhdx_chain[VHDX_MAX_CHAIN_DEPTH];
static _Thread_local int vhdx_chain_depth;

static DWORD open_parent(struct vd_image *image, const struct vhdx_state *s,
                         const struct vhdx_locator *loc)
{
    if (vhdx_chain_depth >= VHDX_MAX_CHAIN_DEPTH)
        return vd_fail(ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT,
                       "%s: differencing chain is deeper than %d disks", image->path,
                       VHDX_MAX_CHAIN_DEPTH);

    char tried[1024] = "";
    size_t tried_length = 0;
    bool access_denied = false;
    for (const char *path = image->parent_locations; *path; path += strlen(path) + 1) {
        int n = snprintf(tried + tried_length, sizeof tried - tried_length, "%s%s",
                         tried_length ? ", " : "", path);
        if (n > 0)
            tried_length = tried_length + (size_t)n < sizeof tried ? tried_length + (size_t)n : sizeof tried - 1;

        struct stat st;
        if (stat(path, &st) < 0) {
            if (errno == EACCES)
                access_denied = true;
            continue;
        }
        for (int i = 0; i < vhdx_chain_depth; i++)
            if (vhdx_chain[i].dev == st.st_dev && vhdx_chain[i].ino == st.st_ino)
                return vd_fail(ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED,
                               "%s: parent %s is already part of the chain being opened",
                               image->path, path);

        vhdx_chain[vhdx_chain_depth].dev = image->file_dev;
        vhdx_chain[vhdx_chain_depth].ino = image->file_ino;
        vhdx_chain_depth++;
        struct vd_image *parent = NULL;
        DWORD status = vd_image_open(path, VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, false, 0, &parent);
        vhdx_chain_depth--;

        if (status == ERROR_FILE_NOT_FOUND || status == ERROR_PATH_NOT_FOUND)
            continue; /* vanished between stat and open */
        if (status == ERROR_ACCESS_DENIED)
            return vd_fail(ERROR_VHD_PARENT_VHD_ACCESS_DENIED, "%s: no access to parent %s",
                           image->path, path);
        if (status == ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED)
            return status; /* keep the innermost detail */
        if (status != ERROR_SUCCESS) {
            char inner[512];
            snprintf(inner, sizeof inner, "%s", vd_last_error_detail());
            return vd_fail(ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT,
                           "%s: parent %s cannot be opened (0x%08X: %s)", image->path, path,
                           (unsigned)status, inner);
        }
        image->parent = parent; /* vd_image_close() owns it from here on */

        /* The first file found decides, as the locator order is the user's
           statement of where the parent is. */
        if (parent->format != &vd_format_vhdx)
            return vd_fail(ERROR_VHD_INVALID_TYPE, "%s: parent %s is a %s, not a VHDX",
                           image->path, path, parent->format->name);
        if (!vd_guid_equal(&parent->identifier, &loc->linkage)
            && !(loc->has_linkage2 && vd_guid_equal(&parent->identifier, &loc->linkage2)))
            return vd_fail(ERROR_VHD_CHILD_PARENT_ID_MISMATCH,
                           "%s: parent %s has DataWriteGuid %s, the child's parent_linkage is %s",
                           image->path, path, vhdx_guid_text(&parent->identifier, true).s,
                           vhdx_guid_text(&loc->linkage, true).s);
        if (parent->virtual_size != image->virtual_size
            || parent->logical_sector_size != s->logical_sector_size)
            return vd_fail(ERROR_VHD_CHILD_PARENT_SIZE_MISMATCH,
                           "%s: parent %s is %llu bytes of %u-byte sectors, the child %llu bytes "
                           "of %u-byte sectors", image->path, path, ull(parent->virtual_size),
                           (unsigned)parent->logical_sector_size, ull(image->virtual_size),
                           s->logical_sector_size);
        image->parent_resolved = true;
        return ERROR_SUCCESS;
    }
    if (access_denied)
        return vd_fail(ERROR_VHD_PARENT_VHD_ACCESS_DENIED, "%s: no access to a parent (tried %s)",
                       image->path, tried);
    return vd_fail(ERROR_VHD_PARENT_VHD_NOT_FOUND, "%s: parent not found (tried %s)", image->path,
                   tried_length ? tried : "no usable parent locator");
}

/* ---- open: every structure in its own place ---- */

const char *vhdx_extent_name(const struct vhdx_extent *x, char *buffer, size_t size)
{
    static const char *const names[] = {
        [VHDX_EXTENT_HEADERS] = "the header section", [VHDX_EXTENT_REGION_TABLES] = "the region tables",
        [VHDX_EXTENT_LOG] = "the log", [VHDX_EXTENT_METADATA] = "the metadata region",
        [VHDX_EXTENT_BAT] = "the BAT", [VHDX_EXTENT_PAYLOAD] = "the payload block",
        [VHDX_EXTENT_BITMAP] = "the sector bitmap block",
    };
    if (x->kind == VHDX_EXTENT_PAYLOAD || x->kind == VHDX_EXTENT_BITMAP)
        snprintf(buffer, size, "%s of BAT entry %llu at %llu..%llu", names[x->kind], ull(x->bat_index),
                 ull(x->start), ull(x->start + x->length));
    else
        snprintf(buffer, size, "%s at %llu..%llu", names[x->kind], ull(x->start), ull(x->start + x->length));
    return buffer;
}

static int compare_extents(const void *a, const void *b)
{
    const struct vhdx_extent *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

/* Every region and every allocated block, sorted by file offset, refused
   unless pairwise disjoint: otherwise a write to one block would destroy
   another or the file's own metadata.  Reads nothing (the BAT is in memory);
   blocks are usually allocated in BAT order, so the sort is mostly a check.
   *out (sorted) is the caller's to free. */
static DWORD check_overlaps(struct vd_image *image, struct vhdx_state *s, const struct vhdx_regions *r,
                            struct vhdx_extent **out, size_t *count)
{
    const struct vhdx_header *h = (const void *)s->header;
    uint64_t log_offset = vd_le64(h->LogOffset), log_length = vd_le32(h->LogLength);
    size_t n = 0, allocated = 0;
    for (uint64_t i = 0; i < s->bat_entries; i++)
        allocated += vhdx_bat_state(s->bat[i]) > PAYLOAD_BLOCK_UNMAPPED;
    struct vhdx_extent *x = malloc((allocated + 5) * sizeof *x);
    if (!x)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX extent list (%zu blocks)", allocated);

    x[n++] = (struct vhdx_extent){0, VHDX_REGION_TABLE1_OFFSET, VHDX_EXTENT_HEADERS, 0};
    x[n++] = (struct vhdx_extent){VHDX_REGION_TABLE1_OFFSET, 2 * VHDX_REGION_TABLE_SIZE,
                                  VHDX_EXTENT_REGION_TABLES, 0};
    /* A log outside the file is only an error when it must be read
       (vhdx_log_load); it then owns nothing here. */
    if (log_length && log_offset <= image->file_size && log_length <= image->file_size - log_offset)
        x[n++] = (struct vhdx_extent){log_offset, (uint32_t)log_length, VHDX_EXTENT_LOG, 0};
    x[n++] = (struct vhdx_extent){r->metadata_offset, r->metadata_length, VHDX_EXTENT_METADATA, 0};
    x[n++] = (struct vhdx_extent){r->bat_offset, r->bat_length, VHDX_EXTENT_BAT, 0};
    qsort(x, n, sizeof *x, compare_extents); /* the few regions */
    bool sorted = true;
    for (uint64_t i = 0; i < s->bat_entries; i++) {
        uint64_t entry = s->bat[i];
        if (vhdx_bat_state(entry) <= PAYLOAD_BLOCK_UNMAPPED)
            continue;
        bool is_bitmap = i % (s->chunk_ratio + 1ull) == s->chunk_ratio;
        uint64_t block = i - i / (s->chunk_ratio + 1ull);
        x[n] = (struct vhdx_extent){vhdx_bat_file_offset(entry),
                                    is_bitmap ? (uint32_t)MiB : (uint32_t)vhdx_block_bytes_used(image, s, block),
                                    is_bitmap ? VHDX_EXTENT_BITMAP : VHDX_EXTENT_PAYLOAD, i};
        sorted = sorted && x[n].start >= x[n - 1].start;
        n++;
    }
    if (!sorted)
        qsort(x, n, sizeof *x, compare_extents);

    for (size_t i = 1; i < n; i++) {
        if (x[i].start >= x[i - 1].start + x[i - 1].length)
            continue;
        char a[160], b[160];
        bool blocks = x[i - 1].kind >= VHDX_EXTENT_PAYLOAD || x[i].kind >= VHDX_EXTENT_PAYLOAD;
        DWORD code = blocks ? ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT : ERROR_VHD_SPARSE_HEADER_CORRUPT;
        vd_fail(code, "%s: %s overlaps %s", image->path, vhdx_extent_name(&x[i - 1], a, sizeof a),
                vhdx_extent_name(&x[i], b, sizeof b));
        free(x);
        return code;
    }
    *out = x;
    *count = n;
    return ERROR_SUCCESS;
}

/* ---- open ---- */

DWORD vhdx_open(struct vd_image *image)
{
    struct vhdx_state *s = calloc(1, sizeof *s);
    if (!s)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating VHDX state");
    pthread_mutex_init(&s->lock, NULL);
    pthread_rwlock_init(&s->map_lock, NULL);
    image->state = s; /* freed by vhdx_close(), also when open fails */

    struct vhdx_file_identifier id;
    DWORD status = ERROR_SUCCESS;
    if (VHDX_FILE_ID_OFFSET == 0 && image->probe_head_length >= sizeof id)
        memcpy(&id, image->probe_head, sizeof id); /* read already, to recognise the format */
    else
        status = vhdx_read_at(image, &id, sizeof id, VHDX_FILE_ID_OFFSET, "VHDX file identifier");
    image->probe_head_length = 0; /* a parent's open reuses the probe's buffer */
    if (status != ERROR_SUCCESS)
        return status;
    if (memcmp(id.Signature, "vhdxfile", 8) != 0)
        return vd_fail(ERROR_VHD_DRIVE_FOOTER_CORRUPT,
                       "VHDX file identifier at offset 0: signature is not \"vhdxfile\"");

    struct vhdx_regions regions = {0};
    struct vhdx_metadata md = {0};
    if ((status = read_headers(image, s)) || (status = vhdx_log_load(image, s))
        || (status = vhdx_read_region_table(image, &regions)) || (status = read_metadata(image, &regions, &md)))
        return status;

    s->block_size = md.block_size;
    s->logical_sector_size = md.logical_sector_size;
    s->has_parent = md.file_flags & VHDX_PARAM_HAS_PARENT;
    s->chunk_ratio = (uint32_t)((VHDX_SECTORS_PER_BITMAP * md.logical_sector_size) / md.block_size);
    s->payload_blocks = (md.virtual_disk_size + md.block_size - 1) / md.block_size;
    s->file_end = vhdx_round_up(image->file_size, VHDX_ALIGN);

    const struct vhdx_header *h = (const void *)s->header;
    image->subtype = s->has_parent ? VD_SUBTYPE_DIFFERENCING
                     : md.file_flags & VHDX_PARAM_LEAVE_BLOCK_ALLOCATED ? VD_SUBTYPE_FIXED
                                                                         : VD_SUBTYPE_DYNAMIC;
    image->virtual_size = md.virtual_disk_size;
    image->block_size = md.block_size;
    image->logical_sector_size = md.logical_sector_size;
    image->physical_sector_size = md.physical_sector_size;
    /* GET_VIRTUAL_DISK_INFO_IDENTIFIER: the DataWriteGuid, which is what
       vhdiinfo and qemu report as the VHDX identifier and what a child's
       parent_linkage names.  Whether Windows returns this or something else is
       not verified. */
    image->identifier = vd_guid_from_le_bytes(h->DataWriteGuid);
    image->has_virtual_disk_id = true;
    image->virtual_disk_id = md.page83;

    struct vhdx_extent *extents = NULL;
    size_t extent_count = 0;
    if ((status = read_bat(image, s, &regions)) || (status = check_overlaps(image, s, &regions, &extents, &extent_count)))
        return status;
    /* Everything the replay would write is known to be in its place now:
       put it on disk (writable) or keep serving it from memory. */
    status = vhdx_log_check_targets(image, s, extents, extent_count);
    free(extents);
    if (status == ERROR_SUCCESS && image->writable)
        status = vhdx_log_apply(image, s);
    if (status != ERROR_SUCCESS)
        return status;
    vhdx_find_flat_mapping(image, s);

    if (!s->has_parent)
        return ERROR_SUCCESS;

    struct vhdx_locator loc = {0};
    status = vhdx_parse_parent_locator(image, &md, &loc);
    if (status == ERROR_SUCCESS) {
        image->parent_identifier = loc.linkage;
        status = vhdx_build_parent_locations(image, &loc);
    }
    if (status == ERROR_SUCCESS && !(image->open_flags & OPEN_VIRTUAL_DISK_FLAG_NO_PARENTS))
        status = open_parent(image, s, &loc);
    vhdx_locator_free(&loc);
    return status;
}

void vhdx_close(struct vd_image *image)
{
    struct vhdx_state *s = image->state;
    /* Nobody hears a failure here; the log then still replays at the next
       open (to the same bytes). */
    (void)vhdx_log_finish(image, s);
    pthread_mutex_destroy(&s->lock);
    pthread_rwlock_destroy(&s->map_lock);
    free(s->freed);
    free(s->bat);
    vhdx_log_free(s->log);
    free(s);
    image->state = NULL;
}
