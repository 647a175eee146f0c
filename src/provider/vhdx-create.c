/*
 * VHDX creation: fixed, dynamic and differencing files laid out as vhdx.h
 * describes, and the parent locator item (also used by set_parent).
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

/* ---- create ---- */

enum {
    CREATE_LOG_OFFSET = 1 * 1024 * 1024,
    CREATE_LOG_LENGTH = 1 * 1024 * 1024,
    CREATE_METADATA_OFFSET = 2 * 1024 * 1024,
    CREATE_METADATA_LENGTH = 1 * 1024 * 1024,
    CREATE_BAT_OFFSET = 3 * 1024 * 1024,
};

struct create_item {
    const GUID *id;
    uint32_t flags;
    const uint8_t *data;
    uint32_t length;
};

/* A path from the directory of `from` to `to`, both absolute: what the
   relative_path locator holds, so the pair can move together. */
static char *relative_path(const char *from, const char *to)
{
    const char *last_slash = strrchr(from, '/');
    size_t dir_end = last_slash ? (size_t)(last_slash - from) : 0; /* index of that '/' */
    /* common: just past the last '/' the two paths share, so to + common is
       what remains below the deepest shared directory. */
    size_t common = 0;
    for (size_t i = 0; i <= dir_end && from[i] && from[i] == to[i]; i++)
        if (from[i] == '/')
            common = i + 1;
    /* One "../" per directory of from below the shared one. */
    size_t ups = 0;
    for (size_t i = common; i <= dir_end && common <= dir_end; i++)
        if (from[i] == '/')
            ups++;
    char *out = malloc(2 + ups * 3 + strlen(to + common) + 1), *p = out;
    if (!out)
        return NULL;
    if (ups == 0) {
        memcpy(p, "./", 2);
        p += 2;
    }
    for (size_t i = 0; i < ups; i++, p += 3)
        memcpy(p, "../", 3);
    strcpy(p, to + common);
    return out;
}

/* Appends a UTF-16LE key or value to the locator; returns its length in
   bytes, 0 when the text is not valid UTF-8 or does not fit. */
static uint16_t put_utf16(uint8_t *item, uint32_t *used, uint32_t capacity, const char *text)
{
    size_t units = vd_utf8_to_utf16(text, NULL, 0);
    if (units < 2 || (units - 1) * 2 > UINT16_MAX || *used + (units - 1) * 2 > capacity)
        return 0;
    WCHAR *wide = malloc(units * sizeof *wide);
    if (!wide)
        return 0;
    vd_utf8_to_utf16(text, wide, units);
    for (size_t i = 0; i + 1 < units; i++)
        vd_put_le16(item + *used + 2 * i, wide[i]);
    free(wide);
    *used += (uint32_t)((units - 1) * 2);
    return (uint16_t)((units - 1) * 2);
}

/* The Parent Locator item (§2.6.2.6): parent_linkage = the parent's
   DataWriteGuid, and the parent's path relative to the child and absolute.
   The paths are Linux paths; Windows would not resolve them, but nothing on
   Windows would find a Linux parent anyway. */
DWORD vhdx_build_locator(const struct vd_create_request *r, uint8_t *item, uint32_t capacity,
                           uint32_t *length)
{
    struct vd_image *parent = r->parent;
    char *relative = relative_path(r->path, parent->path);
    if (!relative)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the parent's relative path");
    const char *pairs[3][2] = {
        {"parent_linkage", vhdx_guid_text(&parent->identifier, true).s},
        {"relative_path", relative},
        {"absolute_win32_path", parent->path},
    };
    char linkage[39];
    snprintf(linkage, sizeof linkage, "%s", vhdx_guid_text(&parent->identifier, true).s);
    pairs[0][1] = linkage;

    struct vhdx_parent_locator_header *h = (void *)item;
    vd_guid_to_le_bytes(&vhdx_locator_type_vhdx, h->LocatorType);
    vd_put_le16(h->KeyValueCount, 3);
    uint32_t used = sizeof *h + 3 * sizeof(struct vhdx_parent_locator_entry);
    DWORD status = ERROR_SUCCESS;
    for (int i = 0; i < 3 && status == ERROR_SUCCESS; i++) {
        struct vhdx_parent_locator_entry *e = (void *)(item + sizeof *h + i * sizeof *e);
        vd_put_le32(e->KeyOffset, used);
        uint16_t kl = put_utf16(item, &used, capacity, pairs[i][0]);
        vd_put_le32(e->ValueOffset, used);
        uint16_t vl = put_utf16(item, &used, capacity, pairs[i][1]);
        if (!kl || !vl)
            status = vd_fail(ERROR_INVALID_PARAMETER,
                             "parent path %s cannot be stored in a VHDX parent locator", parent->path);
        vd_put_le16(e->KeyLength, kl);
        vd_put_le16(e->ValueLength, vl);
    }
    free(relative);
    *length = used;
    return status;
}

static DWORD create_write(int fd, const void *buffer, size_t length, uint64_t offset, const char *what)
{
    int error = vd_pwrite_full(fd, buffer, length, offset);
    if (error)
        return vd_fail_errno(error, "writing the VHDX %s at offset %llu", what, ull(offset));
    return ERROR_SUCCESS;
}

static DWORD create_metadata(int fd, const struct vd_create_request *r, uint32_t block_size,
                             uint32_t file_flags, uint64_t virtual_size, uint32_t logical,
                             uint32_t physical)
{
    uint8_t params[8], size[8], page83[16], lss[4], pss[4];
    GUID disk_id;
    int error = vd_guid_generate(&disk_id);
    if (error)
        return vd_fail_errno(error, "generating the VHDX virtual disk id");
    vd_put_le32(params, block_size);
    vd_put_le32(params + 4, file_flags);
    vd_put_le64(size, virtual_size);
    vd_guid_to_le_bytes(&disk_id, page83);
    vd_put_le32(lss, logical);
    vd_put_le32(pss, physical);

    uint8_t *region = calloc(1, CREATE_METADATA_LENGTH);
    if (!region)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX metadata region");
    DWORD status = ERROR_SUCCESS;
    uint32_t locator_length = 0;
    /* The locator goes last, at the end of the fixed-size items. */
    uint32_t locator_at = VHDX_METADATA_TABLE_SIZE + 8 + 8 + 16 + 4 + 4;
    if (r->parent)
        status = vhdx_build_locator(r, region + locator_at, CREATE_METADATA_LENGTH - locator_at,
                               &locator_length);

    /* Flags per §2.6.2: the sizes and the disk id describe the virtual disk
       (IsVirtualDisk); all of them must be understood to open the file. */
    const uint32_t vd = VHDX_META_IS_VIRTUAL_DISK | VHDX_META_IS_REQUIRED;
    struct create_item items[] = {
        {&vhdx_item_file_parameters, VHDX_META_IS_REQUIRED, params, 8},
        {&vhdx_item_virtual_disk_size, vd, size, 8},
        {&vhdx_item_page83, vd, page83, 16},
        {&vhdx_item_logical_sector_size, vd, lss, 4},
        {&vhdx_item_physical_sector_size, vd, pss, 4},
        {&vhdx_item_parent_locator, VHDX_META_IS_REQUIRED, NULL, locator_length},
    };
    uint16_t count = r->parent ? 6 : 5;
    struct vhdx_metadata_table_header *mh = (void *)region;
    memcpy(mh->Signature, "metadata", 8);
    vd_put_le16(mh->EntryCount, count);
    uint32_t at = VHDX_METADATA_TABLE_SIZE;
    for (uint16_t i = 0; i < count && status == ERROR_SUCCESS; i++) {
        struct vhdx_metadata_table_entry *e = (void *)(region + sizeof *mh + i * sizeof *e);
        vd_guid_to_le_bytes(items[i].id, e->ItemId);
        vd_put_le32(e->Offset, at);
        vd_put_le32(e->Length, items[i].length);
        vd_put_le32(e->Flags, items[i].flags);
        if (items[i].data)
            memcpy(region + at, items[i].data, items[i].length);
        at += items[i].length;
    }
    if (status == ERROR_SUCCESS)
        status = create_write(fd, region, at, CREATE_METADATA_OFFSET, "metadata region");
    free(region);
    return status;
}

static DWORD create_bat(int fd, uint64_t entries, uint32_t chunk_ratio, bool fixed,
                        uint64_t payload_blocks, uint64_t data_start, uint32_t block_size)
{
    if (!fixed)
        return ERROR_SUCCESS; /* all NOT_PRESENT: the zeros ftruncate left */
    enum { CHUNK_ENTRIES = 128 * 1024 };
    uint8_t *buffer = malloc(CHUNK_ENTRIES * 8);
    if (!buffer)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a VHDX BAT buffer");
    DWORD status = ERROR_SUCCESS;
    for (uint64_t first = 0; first < entries && status == ERROR_SUCCESS; first += CHUNK_ENTRIES) {
        uint64_t n = entries - first < CHUNK_ENTRIES ? entries - first : CHUNK_ENTRIES;
        for (uint64_t i = first; i < first + n; i++) {
            uint64_t entry = 0;
            if (i % (chunk_ratio + 1ull) != chunk_ratio) {
                uint64_t block = i - i / (chunk_ratio + 1ull);
                if (block < payload_blocks)
                    entry = (data_start + block * block_size) | PAYLOAD_BLOCK_FULLY_PRESENT;
            }
            vd_put_le64(buffer + (i - first) * 8, entry);
        }
        status = create_write(fd, buffer, (size_t)n * 8, CREATE_BAT_OFFSET + first * 8, "BAT");
    }
    free(buffer);
    return status;
}

/* Reserves the payload of a fixed disk.  fallocate gives real, zeroed
   allocation without writing; only where the file system cannot do that are
   zeros written, so that "fixed" still means fully provisioned. */
static DWORD create_payload(int fd, uint64_t offset, uint64_t length)
{
    if (vd_fallocate(fd, 0, (uint64_t)offset, (uint64_t)length) == 0)
        return ERROR_SUCCESS;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return vd_fail_errno(errno, "allocating %llu bytes for the fixed VHDX payload", ull(length));
    uint8_t *zeros = calloc(1, MiB);
    if (!zeros)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a zero buffer");
    DWORD status = ERROR_SUCCESS;
    for (uint64_t done = 0; done < length && status == ERROR_SUCCESS; done += MiB)
        status = create_write(fd, zeros, length - done < MiB ? (size_t)(length - done) : MiB,
                              offset + done, "payload");
    free(zeros);
    return status;
}

DWORD vhdx_create(int fd, const struct vd_create_request *r)
{
    struct vd_image *parent = r->parent;
    uint64_t virtual_size = r->virtual_size;
    uint32_t logical = r->logical_sector_size, physical = r->physical_sector_size;
    uint64_t block_size = r->block_size;

    if (parent) {
        if (!r->path)
            return vd_fail(ERROR_INVALID_PARAMETER,
                           "a differencing VHDX needs its own path for the relative parent locator");
        if (r->fixed)
            return vd_fail(ERROR_INVALID_PARAMETER, "a differencing VHDX cannot be fixed");
        if (parent->format != &vd_format_vhdx)
            return vd_fail(ERROR_VHD_INVALID_TYPE,
                           "the parent of a differencing VHDX must be a VHDX, %s is a %s",
                           parent->path, parent->format->name);
        if (virtual_size != 0 && virtual_size != parent->virtual_size)
            return vd_fail(ERROR_INVALID_PARAMETER,
                           "a differencing disk has its parent's size (%llu bytes), not %llu",
                           ull(parent->virtual_size), ull(virtual_size));
        /* The child shows the parent's sectors; the request's defaults do not
           apply. */
        virtual_size = parent->virtual_size;
        logical = parent->logical_sector_size;
        physical = parent->physical_sector_size;
        if (block_size == 0)
            block_size = VHDX_DEFAULT_DIFF_BLOCK_SIZE;
    }
    if (block_size == 0)
        block_size = VHDX_DEFAULT_BLOCK_SIZE;
    if ((logical != 512 && logical != 4096) || (physical != 512 && physical != 4096))
        return vd_fail(ERROR_INVALID_PARAMETER,
                       "VHDX sector sizes must be 512 or 4096 (logical %u, physical %u)",
                       (unsigned)logical, (unsigned)physical);
    if (block_size < VHDX_MIN_BLOCK_SIZE || block_size > VHDX_MAX_BLOCK_SIZE || !vhdx_is_power_of_two(block_size))
        return vd_fail(ERROR_INVALID_PARAMETER,
                       "VHDX block size %llu is not a power of two between 1 MiB and 256 MiB",
                       ull(block_size));
    if (virtual_size == 0 || virtual_size > VHDX_MAX_VIRTUAL_SIZE)
        return vd_fail(ERROR_VHD_INVALID_SIZE,
                       "VHDX size %llu is not between one sector and 64 TiB", ull(virtual_size));
    if (virtual_size % logical)
        return vd_fail(ERROR_INVALID_PARAMETER,
                       "VHDX size %llu is not a multiple of the %u-byte sector", ull(virtual_size),
                       (unsigned)logical);

    uint32_t chunk_ratio = (uint32_t)(VHDX_SECTORS_PER_BITMAP * logical / block_size);
    uint64_t payload_blocks = (virtual_size + block_size - 1) / block_size;
    uint64_t sb_blocks = (payload_blocks + chunk_ratio - 1) / chunk_ratio;
    uint64_t entries = parent ? sb_blocks * (chunk_ratio + 1ull)
                              : payload_blocks + (payload_blocks - 1) / chunk_ratio;
    uint64_t bat_length = vhdx_round_up(entries * 8, VHDX_ALIGN);
    uint64_t data_start = CREATE_BAT_OFFSET + bat_length;
    uint32_t file_flags = parent ? VHDX_PARAM_HAS_PARENT : r->fixed ? VHDX_PARAM_LEAVE_BLOCK_ALLOCATED : 0;

    /* Everything up to the payload, zero-filled; the structures below are
       written over it. */
    if (vd_ftruncate(fd, (uint64_t)data_start) < 0)
        return vd_fail_errno(errno, "sizing the new VHDX file to %llu bytes", ull(data_start));
    DWORD status = ERROR_SUCCESS;
    if (r->fixed && r->sparse && vd_ftruncate(fd, (uint64_t)(data_start + payload_blocks * block_size)) < 0)
        status = vd_fail_errno(errno, "sizing the new VHDX file for its sparse payload");
    else if (r->fixed && !r->sparse)
        status = create_payload(fd, data_start, payload_blocks * block_size);
    if (status == ERROR_SUCCESS)
        status = create_metadata(fd, r, (uint32_t)block_size, file_flags, virtual_size, logical, physical);
    if (status == ERROR_SUCCESS)
        status = create_bat(fd, entries, chunk_ratio, r->fixed, payload_blocks, data_start, (uint32_t)block_size);
    if (status != ERROR_SUCCESS)
        return status;

    /* Region table, both copies. */
    uint8_t *table = calloc(1, VHDX_REGION_TABLE_SIZE);
    if (!table)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX region table");
    struct vhdx_region_table_header *rh = (void *)table;
    struct vhdx_region_table_entry *re = (void *)(table + sizeof *rh);
    memcpy(rh->Signature, "regi", 4);
    vd_put_le32(rh->EntryCount, 2);
    vd_guid_to_le_bytes(&vhdx_region_bat, re[0].Guid);
    vd_put_le64(re[0].FileOffset, CREATE_BAT_OFFSET);
    vd_put_le32(re[0].Length, (uint32_t)bat_length);
    vd_put_le32(re[0].Required, VHDX_REGION_REQUIRED);
    vd_guid_to_le_bytes(&vhdx_region_metadata, re[1].Guid);
    vd_put_le64(re[1].FileOffset, CREATE_METADATA_OFFSET);
    vd_put_le32(re[1].Length, CREATE_METADATA_LENGTH);
    vd_put_le32(re[1].Required, VHDX_REGION_REQUIRED);
    vhdx_set_crc(table, VHDX_REGION_TABLE_SIZE, offsetof(struct vhdx_region_table_header, Checksum));
    status = create_write(fd, table, VHDX_REGION_TABLE_SIZE, VHDX_REGION_TABLE1_OFFSET, "region table");
    if (status == ERROR_SUCCESS)
        status = create_write(fd, table, VHDX_REGION_TABLE_SIZE, VHDX_REGION_TABLE2_OFFSET, "region table");
    free(table);
    if (status != ERROR_SUCCESS)
        return status;

    /* Headers: both valid, the second current; the log empty (LogGuid 0). */
    uint8_t h[VHDX_HEADER_SIZE] = {0};
    struct vhdx_header *header = (void *)h;
    GUID file_write;
    int error = vd_guid_generate(&file_write);
    if (error)
        return vd_fail_errno(error, "generating the VHDX FileWriteGuid");
    memcpy(header->Signature, "head", 4);
    vd_guid_to_le_bytes(&file_write, header->FileWriteGuid);
    vd_guid_to_le_bytes(&r->unique_id, header->DataWriteGuid);
    vd_put_le16(header->LogVersion, 0);
    vd_put_le16(header->Version, 1);
    vd_put_le32(header->LogLength, CREATE_LOG_LENGTH);
    vd_put_le64(header->LogOffset, CREATE_LOG_OFFSET);
    for (int i = 0; i < 2 && status == ERROR_SUCCESS; i++) {
        vd_put_le64(header->SequenceNumber, (uint64_t)i + 1);
        vhdx_set_crc(h, sizeof h, offsetof(struct vhdx_header, Checksum));
        status = create_write(fd, h, sizeof h, i ? VHDX_HEADER2_OFFSET : VHDX_HEADER1_OFFSET, "header");
    }

    /* The file type identifier last: until it is there, nothing takes the
       half-written file for a VHDX. */
    struct vhdx_file_identifier id = {0};
    memcpy(id.Signature, "vhdxfile", 8);
    static const char creator[] = "virtdisk";
    for (size_t i = 0; i < sizeof creator - 1; i++)
        vd_put_le16(id.Creator + 2 * i, (uint16_t)creator[i]);
    if (status == ERROR_SUCCESS)
        status = create_write(fd, &id, sizeof id, VHDX_FILE_ID_OFFSET, "file type identifier");
    if (status == ERROR_SUCCESS && fsync(fd) < 0)
        status = vd_fail_errno(errno, "flushing the new VHDX file");
    return status;
}
