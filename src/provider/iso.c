/*
 * ISO images (ISO 9660 and UDF): no container, the file is the disk.  Only
 * enough is parsed to tell an optical-disc image from anything else, the way
 * Windows does before it mounts one: a file whose size is not whole 2048-byte
 * sectors, that is too short for the volume descriptors, or that has no known
 * descriptor is ERROR_FILE_CORRUPT (OpenVirtualDisk's documented answer).
 */
#include "image.h"

#include <string.h>

#include "bytes.h"
#include "errors.h"
#include "winerror.h"

enum {
    ISO_SECTOR = 2048,
    /* Sectors 0-15 are the system area; the volume descriptors start at 16. */
    ISO_DESCRIPTORS = 16 * ISO_SECTOR,
    /* The system area and one descriptor: 34816 bytes, Windows' minimum. */
    ISO_MIN_SIZE = ISO_DESCRIPTORS + ISO_SECTOR,
    /* ISO 9660 and ECMA-167 both end the descriptor sequence early; this
       bounds the scan of a file that never does. */
    ISO_MAX_DESCRIPTORS = 64,
    ISO_ID_OFFSET = 1,
    ISO_ID_LENGTH = 5,
};

typedef unsigned long long ull;

/* Standard identifiers of the volume recognition sequence (ECMA-167 2/9.1;
   ISO 9660's descriptors take part in it as "CD001"). */
static const char *const iso_sequence_ids[] = {"CD001", "CDW02", "BEA01", "NSR02", "NSR03", "TEA01", "BOOT2"};

static bool iso_in_sequence(const uint8_t *id)
{
    for (size_t i = 0; i < sizeof iso_sequence_ids / sizeof iso_sequence_ids[0]; i++)
        if (memcmp(id, iso_sequence_ids[i], ISO_ID_LENGTH) == 0)
            return true;
    return false;
}

/* A volume of its own: ISO 9660 ("CD001") or UDF ("NSR02", "NSR03").  A
   bare "BEA01" only says an extended sequence begins. */
static bool iso_names_volume(const uint8_t *id)
{
    return memcmp(id, "CD001", ISO_ID_LENGTH) == 0 || memcmp(id, "NSR02", ISO_ID_LENGTH) == 0 ||
           memcmp(id, "NSR03", ISO_ID_LENGTH) == 0;
}

static bool iso_probe(const uint8_t *head, size_t head_length, const uint8_t *tail, size_t tail_length,
                      uint64_t file_size)
{
    for (size_t offset = ISO_DESCRIPTORS; offset + ISO_ID_OFFSET + ISO_ID_LENGTH <= head_length;
         offset += ISO_SECTOR) {
        const uint8_t *id = head + offset + ISO_ID_OFFSET;
        if (offset == ISO_DESCRIPTORS && memcmp(id, "CD001", ISO_ID_LENGTH) == 0)
            return true;
        if (memcmp(id, "BEA01", ISO_ID_LENGTH) == 0 || memcmp(id, "NSR02", ISO_ID_LENGTH) == 0 ||
            memcmp(id, "NSR03", ISO_ID_LENGTH) == 0)
            return true;
        if (!iso_in_sequence(id))
            return false;
    }
    return false;
}

static DWORD iso_open(struct vd_image *image)
{
    if (image->file_size % ISO_SECTOR)
        return vd_fail(ERROR_FILE_CORRUPT, "%s: %llu bytes is not a whole number of 2048-byte sectors", image->path,
                       (ull)image->file_size);
    if (image->file_size < ISO_MIN_SIZE)
        return vd_fail(ERROR_FILE_CORRUPT, "%s: %llu bytes is too short for the volume descriptors (at least %d)",
                       image->path, (ull)image->file_size, ISO_MIN_SIZE);

    bool found = false;
    for (uint64_t offset = ISO_DESCRIPTORS, n = 0;
         !found && n < ISO_MAX_DESCRIPTORS && offset + ISO_SECTOR <= image->file_size; offset += ISO_SECTOR, n++) {
        uint8_t id[ISO_ID_LENGTH];
        int error = vd_pread_full(image->fd, id, sizeof id, offset + ISO_ID_OFFSET);
        if (error)
            return vd_fail_errno(error, "%s: reading the volume descriptor at offset %llu", image->path,
                                 (ull)offset);
        if (!iso_in_sequence(id))
            break;
        found = iso_names_volume(id);
    }
    if (!found)
        return vd_fail(ERROR_FILE_CORRUPT,
                       "%s: no ISO 9660 or UDF volume descriptor in the sequence at offset %d", image->path,
                       ISO_DESCRIPTORS);

    image->subtype = VD_SUBTYPE_NONE;
    image->virtual_size = image->file_size;
    image->block_size = 0;
    image->logical_sector_size = ISO_SECTOR;
    image->physical_sector_size = ISO_SECTOR;
    /* Windows reports no identifier for an ISO. */
    memset(&image->identifier, 0, sizeof image->identifier);
    image->flat = true;
    image->flat_offset = 0;
    return ERROR_SUCCESS;
}

static DWORD iso_read(struct vd_image *image, void *buffer, uint64_t offset, size_t length)
{
    if (offset > image->virtual_size || length > image->virtual_size - offset)
        return vd_fail(ERROR_INVALID_PARAMETER, "%s: reading %zu bytes at offset %llu, past the %llu-byte disc",
                       image->path, length, (ull)offset, (ull)image->virtual_size);
    int error = vd_pread_full(image->fd, buffer, length, offset);
    return error ? vd_fail_errno(error, "%s: reading %zu bytes at offset %llu", image->path, length, (ull)offset)
                 : ERROR_SUCCESS;
}

/* Read-only and stateless: nothing to create, write or release. */
const struct vd_format vd_format_iso = {
    .name = "ISO",
    .device_id = VIRTUAL_STORAGE_TYPE_DEVICE_ISO,
    .probe = iso_probe,
    .open = iso_open,
    .create = NULL,
    .read = iso_read,
    .write = NULL,
    .close = NULL,
};
