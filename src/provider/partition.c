/*
 * MBR and GPT, just far enough to know where the last partition ends
 * (UEFI 2.10 §5.2-5.3; the classic MBR layout).
 */
#include "partition.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bytes.h"
#include "errors.h"

#define MiB (UINT64_C(1) << 20)
#define VD_MIN_DISK_SIZE (3 * MiB)
/* UEFI requires room for at least 128 entries of 128 bytes; real tables
   never go much beyond, so anything above this is taken for garbage. */
#define GPT_MAX_ENTRY_ARRAY (UINT64_C(1) << 20)

enum {
    MBR_TABLE = 446,
    MBR_ENTRY = 16,
    MBR_SIGNATURE = 510,
    MBR_TYPE_PROTECTIVE = 0xEE,
    GPT_HEADER_SIZE_MIN = 92,
};

typedef unsigned long long ull;

/* CRC-32 (IEEE 802.3, reflected), as GPT uses it. */
static uint32_t gpt_crc32(const uint8_t *data, size_t length)
{
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < length; i++) {
        crc ^= data[i];
        for (int bit = 0; bit < 8; bit++)
            crc = crc >> 1 ^ (0xEDB88320u & (0u - (crc & 1)));
    }
    return ~crc;
}

static DWORD read_disk(struct vd_image *image, void *buffer, uint64_t offset, size_t length)
{
    return image->format->read(image, buffer, offset, length);
}

/* The end (in bytes) of what a GPT at LBA 1 needs kept, or 0 when LBA 1 holds
   no valid GPT header. */
static DWORD gpt_end(struct vd_image *image, uint64_t *end)
{
    uint64_t ss = image->logical_sector_size;
    uint64_t sectors = image->virtual_size / ss;
    *end = 0;
    if (sectors < 3)
        return ERROR_SUCCESS;
    uint8_t *header = malloc(ss);
    if (!header)
        return vd_fail(ERROR_OUTOFMEMORY, "GPT header buffer");
    DWORD status = read_disk(image, header, ss, ss);
    if (status != ERROR_SUCCESS || memcmp(header, "EFI PART", 8) != 0) {
        free(header);
        return status;
    }
    uint32_t header_size = vd_le32(header + 12);
    uint32_t stored = vd_le32(header + 16);
    uint64_t first_usable = vd_le64(header + 40);
    uint64_t entries_lba = vd_le64(header + 72);
    uint32_t count = vd_le32(header + 80);
    uint32_t entry_size = vd_le32(header + 84);
    uint32_t entries_crc = vd_le32(header + 88);
    bool valid = header_size >= GPT_HEADER_SIZE_MIN && header_size <= ss;
    if (valid) {
        vd_put_le32(header + 16, 0);
        valid = gpt_crc32(header, header_size) == stored;
    }
    free(header);
    uint64_t array_bytes = (uint64_t)count * entry_size;
    if (!valid || entry_size < 128 || entry_size % 8 || array_bytes == 0 || array_bytes > GPT_MAX_ENTRY_ARRAY ||
        entries_lba < 2 || entries_lba >= sectors || first_usable >= sectors)
        return ERROR_SUCCESS;
    uint64_t array_sectors = (array_bytes + ss - 1) / ss;
    if (entries_lba + array_sectors > sectors)
        return ERROR_SUCCESS;

    uint8_t *entries = malloc(array_bytes);
    if (!entries)
        return vd_fail(ERROR_OUTOFMEMORY, "GPT entry array of %llu bytes", (ull)array_bytes);
    status = read_disk(image, entries, entries_lba * ss, array_bytes);
    if (status != ERROR_SUCCESS || gpt_crc32(entries, array_bytes) != entries_crc) {
        free(entries);
        return status;
    }
    /* Without partitions the table itself is what must stay. */
    uint64_t last = first_usable > 0 ? first_usable - 1 : entries_lba + array_sectors - 1;
    static const uint8_t unused[16];
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *entry = entries + (size_t)i * entry_size;
        if (memcmp(entry, unused, 16) == 0)
            continue;
        uint64_t ending = vd_le64(entry + 40);
        if (ending >= sectors) {
            /* A partition past the end of the disk: the table cannot be
               trusted to say what is safe. */
            free(entries);
            *end = image->virtual_size;
            return ERROR_SUCCESS;
        }
        if (ending > last)
            last = ending;
    }
    free(entries);
    /* The backup entry array and backup header follow the last usable LBA. */
    *end = (last + 1 + array_sectors + 1) * ss;
    return ERROR_SUCCESS;
}

static DWORD table_end(struct vd_image *image, uint64_t *end, bool *from_table)
{
    *from_table = false;
    uint64_t ss = image->logical_sector_size;
    *end = image->virtual_size; /* no table: nothing is known to be unused */
    uint8_t *mbr = malloc(ss);
    if (!mbr)
        return vd_fail(ERROR_OUTOFMEMORY, "MBR buffer");
    DWORD status = read_disk(image, mbr, 0, ss);
    if (status != ERROR_SUCCESS || mbr[MBR_SIGNATURE] != 0x55 || mbr[MBR_SIGNATURE + 1] != 0xAA) {
        free(mbr);
        return status;
    }
    bool protective = false;
    uint64_t last = 1; /* the MBR's own sector */
    for (int i = 0; i < 4; i++) {
        const uint8_t *entry = mbr + MBR_TABLE + i * MBR_ENTRY;
        uint8_t type = entry[4];
        if (type == 0)
            continue;
        if (type == MBR_TYPE_PROTECTIVE)
            protective = true;
        uint64_t partition_end = (uint64_t)vd_le32(entry + 8) + vd_le32(entry + 12);
        if (partition_end > last)
            last = partition_end;
    }
    free(mbr);
    if (protective) {
        uint64_t gpt;
        status = gpt_end(image, &gpt);
        if (status == ERROR_SUCCESS && gpt) {
            *end = gpt;
            *from_table = true;
        }
        return status;
    }
    /* A protective entry of a GPT disk larger than 2 TiB is clipped, so only
       a plain MBR is judged by its entries. */
    if (last * ss <= image->virtual_size) {
        *end = last * ss;
        *from_table = true;
    }
    return ERROR_SUCCESS;
}

DWORD vd_smallest_safe_size(struct vd_image *image, uint64_t *size, bool *from_table)
{
    uint64_t end;
    bool table;
    DWORD status = table_end(image, &end, &table);
    if (from_table)
        *from_table = table;
    if (status != ERROR_SUCCESS) {
        char detail[400];
        snprintf(detail, sizeof detail, "%s", vd_last_error_detail());
        return vd_fail(ERROR_VHD_COULD_NOT_COMPUTE_MINIMUM_VIRTUAL_SIZE,
                       "%s: the partition table cannot be read (0x%08x: %s)", image->path, (unsigned)status, detail);
    }
    uint64_t ss = image->logical_sector_size;
    end = (end + ss - 1) / ss * ss;
    if (end < VD_MIN_DISK_SIZE)
        end = VD_MIN_DISK_SIZE;
    *size = end < image->virtual_size ? end : image->virtual_size;
    return ERROR_SUCCESS;
}
