/*
 * VHDX on-disk helpers: the well-known GUIDs, CRC-32C of a structure, GUIDs as
 * text, and bounded reads of structures from the file.
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

const GUID vhdx_region_bat = {0x2DC27766, 0xF623, 0x4200, {0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08}};
const GUID vhdx_region_metadata = {0x8B7CA206, 0x4790, 0x4B9A, {0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E}};
const GUID vhdx_item_file_parameters = {0xCAA16737, 0xFA36, 0x4D43, {0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B}};
const GUID vhdx_item_virtual_disk_size = {0x2FA54224, 0xCD1B, 0x4876, {0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8}};
const GUID vhdx_item_page83 = {0xBECA12AB, 0xB2E6, 0x4523, {0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46}};
const GUID vhdx_item_logical_sector_size = {0x8141BF1D, 0xA96F, 0x4709, {0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F}};
const GUID vhdx_item_physical_sector_size = {0xCDA348C7, 0x445D, 0x4471, {0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56}};
const GUID vhdx_item_parent_locator = {0xA8D35F2D, 0xB30B, 0x454D, {0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C}};
const GUID vhdx_locator_type_vhdx = {0xB04AEFB7, 0xD19E, 0x4A81, {0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13}};

struct vhdx_guid_text vhdx_guid_text(const GUID *g, bool lower)
{
    struct vhdx_guid_text t;
    snprintf(t.s, sizeof t.s,
             lower ? "{%08x-%04x-%04x-%02x%02x-%02x%02x%02x%02x%02x%02x}"
                   : "{%08X-%04X-%04X-%02X%02X-%02X%02X%02X%02X%02X%02X}",
             (unsigned)g->Data1, g->Data2, g->Data3, g->Data4[0], g->Data4[1], g->Data4[2],
             g->Data4[3], g->Data4[4], g->Data4[5], g->Data4[6], g->Data4[7]);
    return t;
}

static int hex_value(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

bool vhdx_guid_parse(const char *text, GUID *out)
{
    static const int group_end[] = {8, 12, 16, 20, 32};
    uint8_t bytes[16];
    size_t pos = 0;
    int digits = 0;

    if (strlen(text) != 38 || text[0] != '{' || text[37] != '}')
        return false;
    for (size_t i = 1; i < 37; i++) {
        if (i == 9 || i == 14 || i == 19 || i == 24) {
            if (text[i] != '-' || digits != group_end[pos])
                return false;
            pos++;
            continue;
        }
        int v = hex_value(text[i]);
        if (v < 0)
            return false;
        if (digits % 2 == 0)
            bytes[digits / 2] = (uint8_t)(v << 4);
        else
            bytes[digits / 2] |= (uint8_t)v;
        digits++;
    }
    if (digits != 32)
        return false;
    /* The text is the GUID's field order, i.e. the big-endian byte form. */
    *out = vd_guid_from_be_bytes(bytes);
    return true;
}

bool vhdx_crc_ok(const uint8_t *buffer, size_t length, size_t checksum_offset)
{
    uint32_t stored = vd_le32(buffer + checksum_offset);
    static const uint8_t zero[4];
    uint32_t crc = vd_crc32c(0, buffer, checksum_offset);
    crc = vd_crc32c(crc, zero, 4);
    crc = vd_crc32c(crc, buffer + checksum_offset + 4, length - checksum_offset - 4);
    return crc == stored;
}

void vhdx_set_crc(uint8_t *buffer, size_t length, size_t checksum_offset)
{
    vd_put_le32(buffer + checksum_offset, 0);
    vd_put_le32(buffer + checksum_offset, vd_crc32c(0, buffer, length));
}

DWORD vhdx_read_at(struct vd_image *image, void *buffer, size_t length, uint64_t offset,
                     const char *what)
{
    if (offset > image->file_size || length > image->file_size - offset)
        return vd_fail(ERROR_VHD_INVALID_FILE_SIZE,
                       "%s at offset %llu (%llu bytes) extends past the end of the file (%llu bytes)",
                       what, ull(offset), ull(length), ull(image->file_size));
    const struct vhdx_state *s = image->state;
    int error = s && s->log ? vhdx_log_pread(s->log, image->fd, buffer, length, offset)
                            : vd_pread_full(image->fd, buffer, length, offset);
    if (error)
        return vd_fail_errno(error, "reading %s at offset %llu", what, ull(offset));
    return ERROR_SUCCESS;
}
