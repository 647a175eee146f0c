/*
 * VHD images: fixed, dynamic and differencing disks, after Microsoft's
 * "Virtual Hard Disk Image Format Specification" 1.0 (2006).
 *
 * Every integer on disk is big-endian.  The structures below are declared
 * once with the specification's field names, as byte arrays, so that each
 * field is converted explicitly (vd_be32() and friends) where it is read.
 *
 * A dynamic or differencing disk is
 *     [footer copy][dynamic header][BAT][parent locator data]...[blocks][footer]
 * where each block is [sector bitmap, padded to 512 bytes][block_size bytes].
 */
#define _GNU_SOURCE /* fallocate() */

#include "image.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bytes.h"
#include "errors.h"
#include "reserve.h"
#include "utf16.h"
#include "winerror.h"

enum {
    VHD_SECTOR = 512,
    VHD_FOOTER_SIZE = 512,
    /* Images made before Virtual PC 2004 end with a 511-byte footer. */
    VHD_OLD_FOOTER_SIZE = 511,
    VHD_HEADER_SIZE = 1024,
    VHD_LOCATOR_COUNT = 8,
    VHD_PARENT_NAME_BYTES = 512,
    /* A chain longer than this is taken for a cycle that (dev, ino) did not
       catch, e.g. through a bind mount. */
    VHD_MAX_CHAIN_DEPTH = 64,
    /* A Windows path is at most 32767 UTF-16 units. */
    VHD_MAX_LOCATOR_BYTES = 65536,
};

#define VHD_COOKIE "conectix"
#define VHD_SPARSE_COOKIE "cxsparse"
#define VHD_TYPE_FIXED 2u
#define VHD_TYPE_DYNAMIC 3u
#define VHD_TYPE_DIFFERENCING 4u
#define VHD_VERSION 0x00010000u
#define VHD_FEATURES_RESERVED 0x00000002u
#define VHD_BAT_UNUSED 0xFFFFFFFFu
#define VHD_NO_DATA_OFFSET UINT64_C(0xFFFFFFFFFFFFFFFF)
#define VHD_PLATFORM_W2RU 0x57327275u /* "W2ru": relative path, UTF-16LE */
#define VHD_PLATFORM_W2KU 0x57326B75u /* "W2ku": absolute path, UTF-16LE */
/* Time stamps count seconds from 2000-01-01 00:00:00 UTC. */
#define VHD_EPOCH INT64_C(946684800)
/* Windows' limit for VHD; also what the CHS geometry can still describe. */
#define VHD_MAX_SIZE (UINT64_C(2040) << 30)
/* Larger blocks would make the per-block sector bitmap, which is read on
   every access, needlessly large; no known writer goes past 2 MiB. */
#define VHD_MAX_BLOCK_SIZE (UINT32_C(256) << 20)
/* Enough for a 2040 GiB disk in 512 KiB blocks; bounds the in-memory BAT at
   16 MiB whatever the header claims. */
#define VHD_MAX_BLOCKS (UINT32_C(1) << 22)
#define VHD_DEFAULT_BLOCK_SIZE UINT32_C(0x200000)
#define VHD_SMALL_BLOCK_SIZE UINT32_C(0x80000)

struct vhd_footer {
    char cookie[8];
    uint8_t features[4];
    uint8_t file_format_version[4];
    uint8_t data_offset[8];
    uint8_t time_stamp[4];
    char creator_application[4];
    uint8_t creator_version[4];
    uint8_t creator_host_os[4];
    uint8_t original_size[8];
    uint8_t current_size[8];
    uint8_t disk_geometry[4];
    uint8_t disk_type[4];
    uint8_t checksum[4];
    uint8_t unique_id[16];
    uint8_t saved_state;
    uint8_t reserved[427];
};
_Static_assert(sizeof(struct vhd_footer) == VHD_FOOTER_SIZE, "VHD footer layout");

struct vhd_parent_locator {
    uint8_t platform_code[4];
    uint8_t platform_data_space[4];
    uint8_t platform_data_length[4];
    uint8_t reserved[4];
    uint8_t platform_data_offset[8];
};

struct vhd_dynamic_header {
    char cookie[8];
    uint8_t data_offset[8];
    uint8_t table_offset[8];
    uint8_t header_version[4];
    uint8_t max_table_entries[4];
    uint8_t block_size[4];
    uint8_t checksum[4];
    uint8_t parent_unique_id[16];
    uint8_t parent_time_stamp[4];
    uint8_t reserved1[4];
    uint8_t parent_unicode_name[VHD_PARENT_NAME_BYTES];
    struct vhd_parent_locator parent_locator[VHD_LOCATOR_COUNT];
    uint8_t reserved2[256];
};
_Static_assert(sizeof(struct vhd_dynamic_header) == VHD_HEADER_SIZE, "VHD dynamic header layout");

struct vhd_state {
    /* Held by read() and write() of dynamic and differencing disks: block
       allocation moves the footer and fills the BAT, and bitmap is scratch. */
    pthread_mutex_t lock;
    struct vhd_footer footer; /* as read; rewritten unchanged when the file grows */
    uint64_t footer_offset;
    uint32_t disk_type;
    uint32_t block_size;
    uint32_t bitmap_size; /* one bit per sector, padded to a whole sector */
    uint32_t block_count; /* blocks the virtual size needs (<= max table entries) */
    uint64_t table_offset;
    uint32_t *bat;        /* block_count entries, host order */
    uint8_t *bitmap;      /* bitmap_size bytes */
    /* Bulk writing (prepare_bulk_write): blocks reserved in one footer move,
       [reserve_next, reserve_end) bytes of the file, and the BAT entries of
       blocks written since, committed by flush() after their data. */
    bool bulk;
    uint64_t reserve_next, reserve_end;
    uint32_t *pending;    /* block numbers whose BAT entry is not yet written */
    size_t pending_count, pending_capacity;
    /* Fixed disk, read-only, its grow interrupted (vhd_grow_fixed): the disk
       offset of the old footer, which reads as zeros.  0: none. */
    uint64_t stale_footer;
};

/* In the reserved bytes of a fixed disk's footer while a grow is under way
   (vhd_grow_fixed): this mark, then the old size (big-endian) - where the
   old footer may still lie inside the disk.  Reserved bytes are zero in
   every footer written otherwise, and other readers ignore them. */
#define VHD_GROW_MARK "virtdisk grow"
#define VHD_GROW_MARK_SIZE 16

typedef unsigned long long ull;

static uint64_t vhd_round_up(uint64_t value, uint64_t unit)
{
    return (value + unit - 1) / unit * unit;
}

/* One's complement of the byte sum, the checksum field counting as zero. */
static uint32_t vhd_checksum(const void *structure, size_t length, size_t checksum_offset)
{
    const uint8_t *bytes = structure;
    uint32_t sum = 0;
    for (size_t i = 0; i < length; i++)
        if (i < checksum_offset || i >= checksum_offset + 4)
            sum += bytes[i];
    return ~sum;
}

static void vhd_seal_footer(struct vhd_footer *footer)
{
    vd_put_be32(footer->checksum, vhd_checksum(footer, sizeof *footer, offsetof(struct vhd_footer, checksum)));
}

static void vhd_seal_header(struct vhd_dynamic_header *header)
{
    vd_put_be32(header->checksum,
                vhd_checksum(header, sizeof *header, offsetof(struct vhd_dynamic_header, checksum)));
}

/* Bit 7 of byte 0 is the block's first sector (VirtualBox
   vhdBlockBitmapSectorContainsData; qemu agrees). */
static bool vhd_bit(const uint8_t *bitmap, uint32_t sector)
{
    return bitmap[sector / 8] & (0x80u >> (sector % 8));
}

static uint32_t vhd_time_stamp(time_t unix_time)
{
    int64_t seconds = (int64_t)unix_time - VHD_EPOCH;
    return seconds < 0 ? 0 : seconds > UINT32_MAX ? UINT32_MAX : (uint32_t)seconds;
}

/* Flushes what was written so far before the write that makes it reachable.
   OPEN_VIRTUAL_DISK_FLAG_NO_WRITE_HARDENING is Windows' way of asking for
   exactly this to be skipped. */
static int vhd_barrier(const struct vd_image *image)
{
    if (image->open_flags & OPEN_VIRTUAL_DISK_FLAG_NO_WRITE_HARDENING)
        return 0;
    return vd_fdatasync(image->fd) < 0 ? errno : 0;
}

/* ---- UTF-16 text in headers and locators -------------------------------- */

/* length bytes of UTF-16 in the given byte order, up to the first NUL, as a
   malloc'd UTF-8 string; NULL when not valid UTF-16 (or out of memory). */
static char *vhd_decode_utf16(const uint8_t *bytes, size_t length, bool big_endian)
{
    size_t units = length / 2;
    WCHAR *text = malloc((units + 1) * sizeof *text);
    if (!text)
        return NULL;
    size_t i;
    for (i = 0; i < units; i++) {
        text[i] = big_endian ? vd_be16(bytes + 2 * i) : vd_le16(bytes + 2 * i);
        if (!text[i])
            break;
    }
    text[i] = 0;
    char *utf8 = vd_utf16_to_utf8(text);
    free(text);
    return utf8;
}

/* UTF-8 text as UTF-16 bytes in the given byte order, without a NUL;
   malloc'd, *length in bytes.  NULL when the text is not valid UTF-8. */
static uint8_t *vhd_encode_utf16(const char *text, bool big_endian, size_t *length)
{
    size_t units = vd_utf8_to_utf16(text, NULL, 0);
    if (units == 0)
        return NULL;
    WCHAR *wide = malloc(units * sizeof *wide);
    uint8_t *bytes = malloc(units * 2);
    if (!wide || !bytes) {
        free(wide);
        free(bytes);
        return NULL;
    }
    vd_utf8_to_utf16(text, wide, units);
    units--; /* the NUL */
    for (size_t i = 0; i < units; i++) {
        if (big_endian)
            vd_put_be16(bytes + 2 * i, wide[i]);
        else
            vd_put_le16(bytes + 2 * i, wide[i]);
    }
    free(wide);
    *length = units * 2;
    return bytes;
}

/* ---- paths --------------------------------------------------------------- */

/* The directory part of a path, malloc'd: "/" for "/x", "." for "x". */
static char *vhd_dirname(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return strdup(".");
    size_t length = slash == path ? 1 : (size_t)(slash - path);
    char *dir = malloc(length + 1);
    if (!dir)
        return NULL;
    memcpy(dir, path, length);
    dir[length] = '\0';
    return dir;
}

static char *vhd_join(const char *dir, const char *name)
{
    size_t dir_length = strlen(dir), name_length = strlen(name);
    bool slash = dir_length > 0 && dir[dir_length - 1] != '/';
    char *path = malloc(dir_length + slash + name_length + 1);
    if (!path)
        return NULL;
    memcpy(path, dir, dir_length);
    if (slash)
        path[dir_length] = '/';
    memcpy(path + dir_length + slash, name, name_length + 1);
    return path;
}

/* A W2ru locator (".\parent.vhd", "..\base\parent.vhd": Windows separators,
   relative to the child's directory) as a path on this system. */
static char *vhd_resolve_relative(const char *child_dir, const char *locator)
{
    char *relative = strdup(locator);
    if (!relative)
        return NULL;
    for (char *c = relative; *c; c++)
        if (*c == '\\')
            *c = '/';
    const char *rest = relative;
    while (rest[0] == '.' && rest[1] == '/')
        rest += 2;
    char *path = rest[0] == '/' ? strdup(rest) : vhd_join(child_dir, rest);
    free(relative);
    return path;
}

/* The W2ru locator for target seen from directory from_dir (both absolute
   and canonical): ".\name" or "..\..\dir\name", with Windows separators so
   that Windows can follow it too.  File names containing '\' do not survive
   the round trip; Windows could not represent them anyway. */
static char *vhd_relative_locator(const char *from_dir, const char *target)
{
    char *from = vhd_join(from_dir, ""); /* with a trailing '/' */
    if (!from)
        return NULL;
    /* The shared leading directories end at the last '/' both agree on;
       every directory of from_dir after that is one "..". */
    size_t common = 0;
    for (size_t i = 0; from[i] && from[i] == target[i]; i++)
        if (from[i] == '/')
            common = i + 1;
    size_t ups = 0;
    for (const char *c = from + common; *c; c++)
        ups += *c == '/';
    free(from);
    const char *tail = target + common;
    size_t length = (ups ? 3 * ups : 2) + strlen(tail);
    char *locator = malloc(length + 1);
    if (!locator)
        return NULL;
    char *out = locator;
    if (ups == 0) {
        memcpy(out, ".\\", 2);
        out += 2;
    }
    for (size_t i = 0; i < ups; i++, out += 3)
        memcpy(out, "..\\", 3);
    for (; *tail; tail++)
        *out++ = *tail == '/' ? '\\' : *tail;
    *out = '\0';
    return locator;
}

/* ---- the footer ---------------------------------------------------------- */

static DWORD vhd_read_footer(struct vd_image *image, struct vhd_state *state)
{
    uint8_t raw[VHD_FOOTER_SIZE] = {0};
    if (image->file_size < VHD_OLD_FOOTER_SIZE)
        return vd_fail(ERROR_VHD_DRIVE_FOOTER_MISSING, "%s: %llu bytes is too small for a VHD footer",
                       image->path, (ull)image->file_size);
    size_t tail = image->file_size < VHD_FOOTER_SIZE ? VHD_OLD_FOOTER_SIZE : VHD_FOOTER_SIZE;
    int error = vd_pread_full(image->fd, raw, tail, image->file_size - tail);
    if (error)
        return vd_fail_errno(error, "%s: reading the footer", image->path);

    size_t footer_length;
    if (tail == VHD_FOOTER_SIZE && memcmp(raw, VHD_COOKIE, 8) == 0) {
        footer_length = VHD_FOOTER_SIZE;
        memcpy(&state->footer, raw, VHD_FOOTER_SIZE);
    } else if (memcmp(raw + tail - VHD_OLD_FOOTER_SIZE, VHD_COOKIE, 8) == 0) {
        /* The byte the old footer lacks is reserved, i.e. zero, so the
           checksum below comes out the same. */
        footer_length = VHD_OLD_FOOTER_SIZE;
        memset(&state->footer, 0, sizeof state->footer);
        memcpy(&state->footer, raw + tail - VHD_OLD_FOOTER_SIZE, VHD_OLD_FOOTER_SIZE);
    } else {
        char head[8] = {0};
        bool copy = image->file_size >= VHD_FOOTER_SIZE + 8 &&
                    vd_pread_full(image->fd, head, sizeof head, 0) == 0 &&
                    memcmp(head, VHD_COOKIE, 8) == 0;
        return vd_fail(ERROR_VHD_DRIVE_FOOTER_MISSING,
                       "%s: no \"conectix\" footer in the last 512 bytes (offset %llu)%s", image->path,
                       (ull)(image->file_size - tail),
                       copy ? "; the footer copy at offset 0 is present, the file may be truncated" : "");
    }
    state->footer_offset = image->file_size - footer_length;
    const struct vhd_footer *footer = &state->footer;
    ull at = state->footer_offset;

    uint32_t stored = vd_be32(footer->checksum);
    uint32_t computed = vhd_checksum(footer, sizeof *footer, offsetof(struct vhd_footer, checksum));
    if (stored != computed)
        return vd_fail(ERROR_VHD_DRIVE_FOOTER_CHECKSUM_MISMATCH,
                       "%s: footer at offset %llu: checksum 0x%08x, computed 0x%08x", image->path, at,
                       (unsigned)stored, (unsigned)computed);

    uint32_t version = vd_be32(footer->file_format_version);
    if (version >> 16 != VHD_VERSION >> 16)
        return vd_fail(ERROR_VHD_FORMAT_UNSUPPORTED_VERSION,
                       "%s: footer at offset %llu: file format version 0x%08x, only 1.x is known", image->path,
                       at, (unsigned)version);

    state->disk_type = vd_be32(footer->disk_type);
    if (state->disk_type != VHD_TYPE_FIXED && state->disk_type != VHD_TYPE_DYNAMIC &&
        state->disk_type != VHD_TYPE_DIFFERENCING)
        return vd_fail(ERROR_VHD_DRIVE_FOOTER_CORRUPT,
                       "%s: footer at offset %llu: disk type %u is not fixed (2), dynamic (3) or differencing (4)",
                       image->path, at, (unsigned)state->disk_type);

    uint64_t size = vd_be64(footer->current_size);
    if (size % VHD_SECTOR)
        return vd_fail(ERROR_VHD_DRIVE_FOOTER_CORRUPT,
                       "%s: footer at offset %llu: current size %llu is not a multiple of 512", image->path, at,
                       (ull)size);
    /* Also keeps the block count computed from the size from wrapping
       around (a size just below 2^64 rounded up to whole blocks is 0). */
    if (size > VHD_MAX_SIZE)
        return vd_fail(ERROR_VHD_INVALID_SIZE,
                       "%s: footer at offset %llu: current size %llu exceeds the VHD limit of 2040 GiB", image->path,
                       at, (ull)size);
    image->virtual_size = size;
    return ERROR_SUCCESS;
}

/* ---- the dynamic header and the BAT -------------------------------------- */

static DWORD vhd_read_dynamic_header(struct vd_image *image, struct vhd_state *state, uint64_t offset,
                                     struct vhd_dynamic_header *header)
{
    if (offset > state->footer_offset || state->footer_offset - offset < VHD_HEADER_SIZE)
        return vd_fail(ERROR_VHD_DRIVE_FOOTER_CORRUPT,
                       "%s: footer at offset %llu: dynamic header offset %llu is outside the file", image->path,
                       (ull)state->footer_offset, (ull)offset);
    int error = vd_pread_full(image->fd, header, sizeof *header, offset);
    if (error)
        return vd_fail_errno(error, "%s: reading the dynamic header at offset %llu", image->path, (ull)offset);

    if (memcmp(header->cookie, VHD_SPARSE_COOKIE, 8) != 0)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT, "%s: dynamic header at offset %llu: no \"cxsparse\" cookie",
                       image->path, (ull)offset);
    uint32_t stored = vd_be32(header->checksum);
    uint32_t computed = vhd_checksum(header, sizeof *header, offsetof(struct vhd_dynamic_header, checksum));
    if (stored != computed)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CHECKSUM_MISMATCH,
                       "%s: dynamic header at offset %llu: checksum 0x%08x, computed 0x%08x", image->path,
                       (ull)offset, (unsigned)stored, (unsigned)computed);
    uint32_t version = vd_be32(header->header_version);
    if (version >> 16 != VHD_VERSION >> 16)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_UNSUPPORTED_VERSION,
                       "%s: dynamic header at offset %llu: header version 0x%08x, only 1.x is known", image->path,
                       (ull)offset, (unsigned)version);

    uint32_t block_size = vd_be32(header->block_size);
    if (block_size < VHD_SECTOR || block_size > VHD_MAX_BLOCK_SIZE || (block_size & (block_size - 1)))
        return vd_fail(ERROR_VHD_INVALID_BLOCK_SIZE,
                       "%s: dynamic header at offset %llu: block size %u is not a power of two from 512 to %u",
                       image->path, (ull)offset, (unsigned)block_size, (unsigned)VHD_MAX_BLOCK_SIZE);
    state->block_size = block_size;
    state->bitmap_size = (uint32_t)vhd_round_up(block_size / VHD_SECTOR / 8, VHD_SECTOR);
    return ERROR_SUCCESS;
}

static bool vhd_overlaps(uint64_t a_start, uint64_t a_length, uint64_t b_start, uint64_t b_length)
{
    return a_start < b_start + b_length && b_start < a_start + a_length;
}

static int vhd_compare_entries(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Every allocated block must lie inside the file, clear of the metadata and
   of every other block: otherwise a write through one block would land in
   the header, the BAT or another block. */
static DWORD vhd_check_blocks(const struct vd_image *image, const struct vhd_state *state,
                              uint64_t header_offset, uint64_t table_length)
{
    uint64_t span = (uint64_t)state->bitmap_size + state->block_size;
    uint32_t *sorted = malloc((size_t)state->block_count * sizeof *sorted + 1);
    if (!sorted)
        return vd_fail(ERROR_OUTOFMEMORY, "%s: checking %u BAT entries", image->path, (unsigned)state->block_count);
    size_t allocated = 0;
    for (uint32_t i = 0; i < state->block_count; i++) {
        uint32_t entry = state->bat[i];
        if (entry == VHD_BAT_UNUSED)
            continue;
        uint64_t start = (uint64_t)entry * VHD_SECTOR;
        const char *problem = NULL;
        if (start > state->footer_offset || state->footer_offset - start < span)
            problem = "runs past the footer";
        else if (start < VHD_FOOTER_SIZE)
            problem = "overlaps the footer copy";
        else if (vhd_overlaps(start, span, header_offset, VHD_HEADER_SIZE))
            problem = "overlaps the dynamic header";
        else if (vhd_overlaps(start, span, state->table_offset, table_length))
            problem = "overlaps the BAT";
        if (problem) {
            free(sorted);
            return vd_fail(ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT,
                           "%s: BAT entry %u (at offset %llu): block at offset %llu %s", image->path, (unsigned)i,
                           (ull)(state->table_offset + 4 * (uint64_t)i), (ull)start, problem);
        }
        sorted[allocated++] = entry;
    }
    qsort(sorted, allocated, sizeof *sorted, vhd_compare_entries);
    for (size_t i = 1; i < allocated; i++) {
        if ((uint64_t)(sorted[i] - sorted[i - 1]) * VHD_SECTOR < span) {
            ull first = (ull)sorted[i - 1] * VHD_SECTOR, second = (ull)sorted[i] * VHD_SECTOR;
            free(sorted);
            return vd_fail(ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT,
                           "%s: BAT at offset %llu: blocks at offsets %llu and %llu overlap", image->path,
                           (ull)state->table_offset, first, second);
        }
    }
    free(sorted);
    return ERROR_SUCCESS;
}

static DWORD vhd_load_bat(struct vd_image *image, struct vhd_state *state, const struct vhd_dynamic_header *header,
                          uint64_t header_offset)
{
    uint64_t blocks = vhd_round_up(image->virtual_size, state->block_size) / state->block_size;
    uint32_t max_entries = vd_be32(header->max_table_entries);
    state->table_offset = vd_be64(header->table_offset);
    uint64_t table_length = (uint64_t)max_entries * 4;
    if (blocks > max_entries)
        return vd_fail(ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT,
                       "%s: dynamic header at offset %llu: %u BAT entries cannot map %llu bytes in %u-byte blocks",
                       image->path, (ull)header_offset, (unsigned)max_entries, (ull)image->virtual_size,
                       (unsigned)state->block_size);
    if (blocks > VHD_MAX_BLOCKS)
        return vd_fail(ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT,
                       "%s: dynamic header at offset %llu: %llu blocks exceed the supported %u", image->path,
                       (ull)header_offset, (ull)blocks, (unsigned)VHD_MAX_BLOCKS);
    if (state->table_offset > state->footer_offset || state->footer_offset - state->table_offset < table_length)
        return vd_fail(ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT,
                       "%s: BAT at offset %llu (%u entries) runs past the footer at offset %llu", image->path,
                       (ull)state->table_offset, (unsigned)max_entries, (ull)state->footer_offset);
    state->block_count = (uint32_t)blocks;

    /* Only the entries the virtual size uses are loaded; the rest of the
       table is inside the file (checked above) and never consulted. */
    size_t bytes = (size_t)blocks * 4;
    uint8_t *raw = malloc(bytes + 1);
    state->bat = malloc(bytes + 1);
    if (!raw || !state->bat) {
        free(raw);
        return vd_fail(ERROR_OUTOFMEMORY, "%s: BAT of %llu entries", image->path, (ull)blocks);
    }
    int error = vd_pread_full(image->fd, raw, bytes, state->table_offset);
    if (error) {
        free(raw);
        return vd_fail_errno(error, "%s: reading the BAT at offset %llu", image->path, (ull)state->table_offset);
    }
    for (size_t i = 0; i < blocks; i++)
        state->bat[i] = vd_be32(raw + 4 * i);
    free(raw);
    return vhd_check_blocks(image, state, header_offset, table_length);
}

/* ---- parents ------------------------------------------------------------- */

/* Where the parent of a differencing disk may be, in the order they are
   tried: W2ru locators, W2ku locators, then the header's parent name in the
   child's directory. */
struct vhd_candidates {
    char *path[VHD_LOCATOR_COUNT + 1];
    bool relative[VHD_LOCATOR_COUNT + 1];
    size_t count;
};

static void vhd_candidates_free(struct vhd_candidates *candidates)
{
    for (size_t i = 0; i < candidates->count; i++)
        free(candidates->path[i]);
    candidates->count = 0;
}

/* Takes ownership of path. */
static void vhd_candidates_add(struct vhd_candidates *candidates, char *path, bool relative)
{
    for (size_t i = 0; i < candidates->count; i++) {
        if (strcmp(candidates->path[i], path) == 0) {
            free(path);
            return;
        }
    }
    candidates->path[candidates->count] = path;
    candidates->relative[candidates->count] = relative;
    candidates->count++;
}

/* The text of one W2ru/W2ku locator, malloc'd; *text NULL when empty. */
static DWORD vhd_read_locator(const struct vd_image *image, const struct vhd_state *state,
                              const struct vhd_parent_locator *locator, uint64_t entry_offset, char **text)
{
    *text = NULL;
    uint32_t space = vd_be32(locator->platform_data_space);
    uint32_t length = vd_be32(locator->platform_data_length);
    uint64_t offset = vd_be64(locator->platform_data_offset);
    if (length == 0)
        return ERROR_SUCCESS;
    /* The specification counts the data space in sectors, Virtual PC and
       Hyper-V write bytes: whichever reading holds the data is accepted. */
    uint64_t capacity = space >= length ? space : (uint64_t)space * VHD_SECTOR;
    const char *problem = NULL;
    if (length % 2)
        problem = "is not a whole number of UTF-16 units";
    else if (length > VHD_MAX_LOCATOR_BYTES)
        problem = "exceeds 64 KiB";
    else if (capacity < length)
        problem = "exceeds its data space";
    else if (offset > state->footer_offset || state->footer_offset - offset < length)
        problem = "runs past the footer";
    if (problem)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "%s: parent locator at offset %llu: %u bytes of data at offset %llu %s", image->path,
                       (ull)entry_offset, (unsigned)length, (ull)offset, problem);
    uint8_t *raw = malloc(length);
    if (!raw)
        return vd_fail(ERROR_OUTOFMEMORY, "%s: parent locator of %u bytes", image->path, (unsigned)length);
    int error = vd_pread_full(image->fd, raw, length, offset);
    if (error) {
        free(raw);
        return vd_fail_errno(error, "%s: reading parent locator data at offset %llu", image->path, (ull)offset);
    }
    *text = vhd_decode_utf16(raw, length, false);
    free(raw);
    if (!*text)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "%s: parent locator at offset %llu: data at offset %llu is not valid UTF-16LE", image->path,
                       (ull)entry_offset, (ull)offset);
    if (!**text) {
        free(*text);
        *text = NULL;
    }
    return ERROR_SUCCESS;
}

static DWORD vhd_find_parent_candidates(struct vd_image *image, const struct vhd_state *state,
                                        const struct vhd_dynamic_header *header, uint64_t header_offset,
                                        struct vhd_candidates *candidates)
{
    char *dir = vhd_dirname(image->path);
    if (!dir)
        return vd_fail(ERROR_OUTOFMEMORY, "%s: parent locations", image->path);
    static const uint32_t order[] = {VHD_PLATFORM_W2RU, VHD_PLATFORM_W2KU};
    for (size_t pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < VHD_LOCATOR_COUNT; i++) {
            const struct vhd_parent_locator *locator = &header->parent_locator[i];
            if (vd_be32(locator->platform_code) != order[pass])
                continue;
            uint64_t entry_offset = header_offset + offsetof(struct vhd_dynamic_header, parent_locator) +
                                    i * sizeof *locator;
            char *text;
            DWORD status = vhd_read_locator(image, state, locator, entry_offset, &text);
            if (status != ERROR_SUCCESS) {
                free(dir);
                return status;
            }
            if (!text)
                continue;
            bool relative = order[pass] == VHD_PLATFORM_W2RU;
            char *path = relative ? vhd_resolve_relative(dir, text) : text;
            if (relative)
                free(text);
            if (!path) {
                free(dir);
                return vd_fail(ERROR_OUTOFMEMORY, "%s: parent locations", image->path);
            }
            vhd_candidates_add(candidates, path, relative);
        }
    }

    char *name = vhd_decode_utf16(header->parent_unicode_name, sizeof header->parent_unicode_name, true);
    if (!name) {
        free(dir);
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "%s: dynamic header at offset %llu: parent unicode name is not valid UTF-16BE", image->path,
                       (ull)header_offset);
    }
    if (*name) {
        /* Windows may store a whole Windows path here; only its last
           component means anything on this system. */
        const char *base = name;
        if (name[0] != '/')
            for (const char *c = name; *c; c++)
                if (*c == '\\' || *c == '/')
                    base = c + 1;
        char *path = base[0] == '/' ? strdup(base) : *base ? vhd_join(dir, base) : NULL;
        if (*base && !path) {
            free(name);
            free(dir);
            return vd_fail(ERROR_OUTOFMEMORY, "%s: parent locations", image->path);
        }
        if (path)
            vhd_candidates_add(candidates, path, false);
    }
    free(name);
    free(dir);

    size_t total = 1;
    for (size_t i = 0; i < candidates->count; i++)
        total += strlen(candidates->path[i]) + 1;
    char *list = malloc(total);
    if (!list)
        return vd_fail(ERROR_OUTOFMEMORY, "%s: parent locations", image->path);
    char *out = list;
    for (size_t i = 0; i < candidates->count; i++) {
        size_t length = strlen(candidates->path[i]) + 1;
        memcpy(out, candidates->path[i], length);
        out += length;
    }
    *out = '\0';
    free(image->parent_locations);
    image->parent_locations = list;
    return ERROR_SUCCESS;
}

/* The files whose open() is in progress on this thread, child first:
   vd_image_open() of a parent re-enters vhd_open() for a grandparent. */
static _Thread_local struct {
    dev_t dev;
    ino_t ino;
} vhd_chain[VHD_MAX_CHAIN_DEPTH];
static _Thread_local size_t vhd_chain_depth;

static bool vhd_in_chain(dev_t dev, ino_t ino)
{
    for (size_t i = 0; i < vhd_chain_depth; i++)
        if (vhd_chain[i].dev == dev && vhd_chain[i].ino == ino)
            return true;
    return false;
}

static void vhd_append(char *buffer, size_t size, const char *text)
{
    size_t used = strlen(buffer);
    if (used < size)
        snprintf(buffer + used, size - used, "%s%s", used ? ", " : "", text);
}

/* Tries the candidates in turn; the first VHD whose unique id is the one
   the child names becomes image->parent. */
static DWORD vhd_open_candidates(struct vd_image *image, const struct vhd_candidates *candidates)
{
    char tried[320] = "";
    char mismatch[320] = "";
    bool access_denied = false;
    for (size_t i = 0; i < candidates->count; i++) {
        const char *path = candidates->path[i];
        if (candidates->relative[i] && (image->open_flags & OPEN_VIRTUAL_DISK_FLAG_IGNORE_RELATIVE_PARENT_LOCATOR))
            continue;
        vhd_append(tried, sizeof tried, path);
        struct stat st;
        if (stat(path, &st) < 0) {
            access_denied |= errno == EACCES;
            continue;
        }
        if (vhd_in_chain(st.st_dev, st.st_ino))
            return vd_fail(ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED,
                           "%s: parent %s is already in the differencing chain", image->path, path);

        struct vd_image *parent = NULL;
        DWORD status = vd_image_open(path, VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, false, 0, &parent);
        if (status == ERROR_FILE_NOT_FOUND || status == ERROR_PATH_NOT_FOUND)
            continue;
        if (status == ERROR_ACCESS_DENIED) {
            access_denied = true;
            continue;
        }
        if (status == ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED)
            return status; /* the detail already names the loop */
        if (status != ERROR_SUCCESS) {
            char detail[400];
            snprintf(detail, sizeof detail, "%s", vd_last_error_detail());
            return vd_fail(ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT, "%s: parent %s: error 0x%08x: %s",
                           image->path, path, (unsigned)status, detail);
        }
        if (parent->format != &vd_format_vhd || !vd_guid_equal(&parent->identifier, &image->parent_identifier)) {
            vhd_append(mismatch, sizeof mismatch, path);
            vd_image_close(parent);
            continue;
        }
        if (parent->virtual_size != image->virtual_size) {
            ull parent_size = parent->virtual_size;
            vd_image_close(parent);
            return vd_fail(ERROR_VHD_CHILD_PARENT_SIZE_MISMATCH, "%s: %llu bytes, but parent %s has %llu",
                           image->path, (ull)image->virtual_size, path, parent_size);
        }
        image->parent = parent;
        image->parent_resolved = true;
        return ERROR_SUCCESS;
    }
    if (*mismatch)
        return vd_fail(ERROR_VHD_CHILD_PARENT_ID_MISMATCH,
                       "%s: no parent has the unique id the child names; not a match: %s", image->path, mismatch);
    if (access_denied)
        return vd_fail(ERROR_VHD_PARENT_VHD_ACCESS_DENIED, "%s: parent not accessible; tried %s", image->path, tried);
    return vd_fail(ERROR_VHD_PARENT_VHD_NOT_FOUND, "%s: parent not found; tried %s", image->path,
                   *tried ? tried : "(no parent locator or name)");
}

static DWORD vhd_open_parent(struct vd_image *image, const struct vhd_candidates *candidates)
{
    if (vhd_chain_depth >= VHD_MAX_CHAIN_DEPTH)
        return vd_fail(ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED,
                       "%s: differencing chain deeper than %d disks", image->path, VHD_MAX_CHAIN_DEPTH);
    vhd_chain[vhd_chain_depth].dev = image->file_dev;
    vhd_chain[vhd_chain_depth].ino = image->file_ino;
    vhd_chain_depth++;
    DWORD status = vhd_open_candidates(image, candidates);
    vhd_chain_depth--;
    return status;
}

/* ---- open and close ------------------------------------------------------ */

static void vhd_free_state(struct vhd_state *state)
{
    free(state->pending);
    free(state->bat);
    free(state->bitmap);
    free(state);
}

static DWORD vhd_open_sparse(struct vd_image *image, struct vhd_state *state)
{
    struct vhd_dynamic_header header;
    uint64_t header_offset = vd_be64(state->footer.data_offset);
    DWORD status = vhd_read_dynamic_header(image, state, header_offset, &header);
    if (status == ERROR_SUCCESS)
        status = vhd_load_bat(image, state, &header, header_offset);
    if (status != ERROR_SUCCESS)
        return status;
    state->bitmap = malloc(state->bitmap_size);
    if (!state->bitmap)
        return vd_fail(ERROR_OUTOFMEMORY, "%s: sector bitmap buffer", image->path);
    image->block_size = state->block_size;

    if (state->disk_type != VHD_TYPE_DIFFERENCING)
        return ERROR_SUCCESS;
    image->parent_identifier = vd_guid_from_be_bytes(header.parent_unique_id);
    image->parent_timestamp = vd_be32(header.parent_time_stamp);
    struct vhd_candidates candidates = {.count = 0};
    status = vhd_find_parent_candidates(image, state, &header, header_offset, &candidates);
    if (status == ERROR_SUCCESS && !(image->open_flags & OPEN_VIRTUAL_DISK_FLAG_NO_PARENTS))
        status = vhd_open_parent(image, &candidates);
    vhd_candidates_free(&candidates);
    return status;
}

static uint64_t vhd_grow_pending(const struct vd_image *image, const struct vhd_footer *footer);
static int vhd_finish_grow(struct vd_image *image, uint64_t stale);

static DWORD vhd_open(struct vd_image *image)
{
    struct vhd_state *state = calloc(1, sizeof *state);
    if (!state)
        return vd_fail(ERROR_OUTOFMEMORY, "%s: VHD state", image->path);
    DWORD status = vhd_read_footer(image, state);
    if (status != ERROR_SUCCESS)
        goto fail;

    image->identifier = vd_guid_from_be_bytes(state->footer.unique_id);
    image->logical_sector_size = VHD_SECTOR;
    image->physical_sector_size = VHD_SECTOR;
    image->subtype = (enum vd_subtype)state->disk_type;
    if (state->disk_type == VHD_TYPE_FIXED) {
        /* The data offset of a fixed disk is not checked: the specification
           says 0xFFFFFFFF for a 64-bit field, and writers differ. */
        if (state->footer_offset != image->virtual_size) {
            status = vd_fail(ERROR_VHD_INVALID_FILE_SIZE,
                             "%s: footer at offset %llu: fixed disk of %llu bytes, but %llu bytes precede the footer",
                             image->path, (ull)state->footer_offset, (ull)image->virtual_size,
                             (ull)state->footer_offset);
            goto fail;
        }
        image->block_size = 0;
        image->flat = true;
        image->flat_offset = 0;
        uint64_t stale = vhd_grow_pending(image, &state->footer);
        if (stale && image->writable) {
            int error = vhd_finish_grow(image, stale);
            if (error) {
                status = vd_fail_errno(error, "%s: finishing an interrupted grow (old footer at %llu)",
                                       image->path, (ull)stale);
                goto fail;
            }
        } else if (stale) {
            /* Read-only: the stale footer reads as zeros, which a loop
               device mapping the file directly would not do. */
            state->stale_footer = stale;
            image->flat = false;
        }
    } else {
        status = vhd_open_sparse(image, state);
        if (status != ERROR_SUCCESS)
            goto fail;
        image->flat = false;
    }
    int error = pthread_mutex_init(&state->lock, NULL);
    if (error) {
        status = vd_fail_errno(error, "%s: VHD lock", image->path);
        goto fail;
    }
    image->state = state;
    return ERROR_SUCCESS;

fail:
    /* Leave the image as vd_image_open() handed it over. */
    vd_image_close(image->parent);
    image->parent = NULL;
    image->parent_resolved = false;
    free(image->parent_locations);
    image->parent_locations = NULL;
    vhd_free_state(state);
    return status;
}

static void vhd_close(struct vd_image *image)
{
    struct vhd_state *state = image->state;
    if (!state)
        return;
    pthread_mutex_destroy(&state->lock);
    vhd_free_state(state);
    image->state = NULL;
}

/* ---- reading ------------------------------------------------------------- */

static bool vhd_in_range(const struct vd_image *image, uint64_t offset, size_t length)
{
    return offset <= image->virtual_size && length <= image->virtual_size - offset;
}

/* Sectors this file does not hold: zeros, or the parent's. */
static DWORD vhd_read_absent(struct vd_image *image, uint8_t *out, uint64_t offset, size_t length)
{
    struct vhd_state *state = image->state;
    if (state->disk_type != VHD_TYPE_DIFFERENCING) {
        memset(out, 0, length);
        return ERROR_SUCCESS;
    }
    if (!image->parent)
        return vd_fail(ERROR_VHD_PARENT_VHD_NOT_FOUND,
                       "%s: reading %zu bytes at offset %llu needs the parent, which was not opened", image->path,
                       length, (ull)offset);
    return image->parent->format->read(image->parent, out, offset, length);
}

static DWORD vhd_read_bitmap(const struct vd_image *image, uint64_t block_offset, uint32_t first_byte,
                             uint32_t bytes)
{
    const struct vhd_state *state = image->state;
    int error = vd_pread_full(image->fd, state->bitmap + first_byte, bytes, block_offset + first_byte);
    if (error)
        return vd_fail_errno(error, "%s: reading the sector bitmap at offset %llu", image->path,
                             (ull)(block_offset + first_byte));
    return ERROR_SUCCESS;
}

/* Part of one allocated block, [within, within + length). */
static DWORD vhd_read_present(struct vd_image *image, uint32_t block, uint32_t within, uint8_t *out, size_t length)
{
    struct vhd_state *state = image->state;
    uint64_t block_offset = (uint64_t)state->bat[block] * VHD_SECTOR;
    uint64_t data_offset = block_offset + state->bitmap_size;
    uint32_t end = within + (uint32_t)length;
    uint32_t first = within / VHD_SECTOR, last = (end - 1) / VHD_SECTOR;
    DWORD status = vhd_read_bitmap(image, block_offset, first / 8, last / 8 - first / 8 + 1);
    if (status != ERROR_SUCCESS)
        return status;

    for (uint32_t position = within; position < end;) {
        uint32_t sector = position / VHD_SECTOR;
        bool present = vhd_bit(state->bitmap, sector);
        while (sector < last && vhd_bit(state->bitmap, sector + 1) == present)
            sector++;
        uint32_t run_end = (sector + 1) * VHD_SECTOR < end ? (sector + 1) * VHD_SECTOR : end;
        uint8_t *target = out + (position - within);
        if (present) {
            int error = vd_pread_full(image->fd, target, run_end - position, data_offset + position);
            if (error)
                return vd_fail_errno(error, "%s: reading block %u at offset %llu", image->path, (unsigned)block,
                                     (ull)(data_offset + position));
        } else {
            /* The parent's read() takes the parent's lock, never this one:
               the chain has no cycles, so the order child, parent is total. */
            status = vhd_read_absent(image, target, (uint64_t)block * state->block_size + position,
                                     run_end - position);
            if (status != ERROR_SUCCESS)
                return status;
        }
        position = run_end;
    }
    return ERROR_SUCCESS;
}

/* Caller holds state->lock. */
static DWORD vhd_read_locked(struct vd_image *image, uint8_t *out, uint64_t offset, size_t length)
{
    struct vhd_state *state = image->state;
    while (length > 0) {
        uint32_t block = (uint32_t)(offset / state->block_size);
        uint32_t within = (uint32_t)(offset % state->block_size);
        size_t n = state->block_size - within < length ? state->block_size - within : length;
        DWORD status = state->bat[block] == VHD_BAT_UNUSED ? vhd_read_absent(image, out, offset, n)
                                                           : vhd_read_present(image, block, within, out, n);
        if (status != ERROR_SUCCESS)
            return status;
        out += n;
        offset += n;
        length -= n;
    }
    return ERROR_SUCCESS;
}

static DWORD vhd_read(struct vd_image *image, void *buffer, uint64_t offset, size_t length)
{
    struct vhd_state *state = image->state;
    if (!vhd_in_range(image, offset, length))
        return vd_fail(ERROR_INVALID_PARAMETER, "%s: reading %zu bytes at offset %llu, past the %llu-byte disk",
                       image->path, length, (ull)offset, (ull)image->virtual_size);
    if (state->disk_type == VHD_TYPE_FIXED) {
        int error = vd_pread_full(image->fd, buffer, length, offset);
        if (error)
            return vd_fail_errno(error, "%s: reading %zu bytes at offset %llu", image->path, length, (ull)offset);
        uint64_t stale = state->stale_footer;
        if (stale && stale < offset + length && offset < stale + VHD_FOOTER_SIZE) {
            uint64_t from = stale > offset ? stale : offset;
            uint64_t to = stale + VHD_FOOTER_SIZE < offset + length ? stale + VHD_FOOTER_SIZE : offset + length;
            memset((uint8_t *)buffer + (from - offset), 0, to - from);
        }
        return ERROR_SUCCESS;
    }
    pthread_mutex_lock(&state->lock);
    DWORD status = vhd_read_locked(image, buffer, offset, length);
    pthread_mutex_unlock(&state->lock);
    return status;
}

/* Dynamic blocks answer per block; a differencing disk's allocated block per
   run of sectors in its bitmap, since only those hide the parent. */
static DWORD vhd_block_status(struct vd_image *image, uint64_t offset, uint64_t length,
                              enum vd_block_state *out, uint64_t *run)
{
    struct vhd_state *state = image->state;
    if (!vhd_in_range(image, offset, length) || length == 0)
        return vd_fail(ERROR_INVALID_PARAMETER, "%s: block status of %llu bytes at offset %llu", image->path,
                       (ull)length, (ull)offset);
    if (state->disk_type == VHD_TYPE_FIXED) {
        *out = VD_BLOCK_DATA;
        *run = length;
        return ERROR_SUCCESS;
    }
    uint32_t block = (uint32_t)(offset / state->block_size);
    uint32_t within = (uint32_t)(offset % state->block_size);
    uint64_t in_block = state->block_size - within < length ? state->block_size - within : length;
    pthread_mutex_lock(&state->lock);
    DWORD status = ERROR_SUCCESS;
    if (state->bat[block] == VHD_BAT_UNUSED) {
        *out = VD_BLOCK_ABSENT;
        *run = in_block;
    } else if (state->disk_type != VHD_TYPE_DIFFERENCING) {
        *out = VD_BLOCK_DATA;
        *run = in_block;
    } else {
        uint32_t first = within / VHD_SECTOR, last = (uint32_t)((within + in_block - 1) / VHD_SECTOR);
        uint64_t block_offset = (uint64_t)state->bat[block] * VHD_SECTOR;
        status = vhd_read_bitmap(image, block_offset, first / 8, last / 8 - first / 8 + 1);
        if (status == ERROR_SUCCESS) {
            bool present = vhd_bit(state->bitmap, first);
            uint32_t sector = first;
            while (sector < last && vhd_bit(state->bitmap, sector + 1) == present)
                sector++;
            uint64_t end = (uint64_t)(sector + 1) * VHD_SECTOR < within + in_block ? (uint64_t)(sector + 1) * VHD_SECTOR
                                                                                    : within + in_block;
            *out = present ? VD_BLOCK_DATA : VD_BLOCK_ABSENT;
            *run = end - within;
        }
    }
    pthread_mutex_unlock(&state->lock);
    return status;
}

/* ---- writing ------------------------------------------------------------- */

/* Makes room for a new block where the footer is, and returns its BAT entry
   (its sector number); the BAT itself is updated by the caller once the data
   is in place.  The order keeps the file a valid image at every step, should
   the process or the machine stop in between:
     1. the footer is written at the new end of the file (the file now ends
        with a valid footer; the old one is unreferenced garbage);
     2. flush;
     3. the block's sector bitmap overwrites the old footer (dynamic: all
        sectors present, the data being zeros, as qemu does; differencing:
        none present, so unwritten sectors keep coming from the parent);
   then the caller writes the data and the bitmap bits, flushes, and only
   then writes the BAT entry that makes the block part of the disk.  Until
   that last write a reader sees the disk as it was.  The footer copy at
   offset 0 never changes: the footer's contents do not. */
static DWORD vhd_allocate_block(struct vd_image *image, uint32_t *entry)
{
    struct vhd_state *state = image->state;
    if (state->reserve_next < state->reserve_end) {
        /* Footer moved and bitmap written already (vhd_prepare_bulk_write). */
        *entry = (uint32_t)(state->reserve_next / VHD_SECTOR);
        state->reserve_next += state->bitmap_size + state->block_size;
        return ERROR_SUCCESS;
    }
    uint64_t block_offset = vhd_round_up(state->footer_offset, VHD_SECTOR);
    uint64_t footer_offset = block_offset + state->bitmap_size + state->block_size;
    if (block_offset / VHD_SECTOR >= VHD_BAT_UNUSED)
        return vd_fail(ERROR_VHD_BLOCK_ALLOCATION_FAILURE,
                       "%s: a block at offset %llu is beyond what a BAT entry can address", image->path,
                       (ull)block_offset);
    uint64_t old_size = image->file_size;

    /* A footer from before Virtual PC 2004 (511 bytes) is replaced by a
       current one: the extra byte is reserved and zero. */
    int error = vd_pwrite_full(image->fd, &state->footer, sizeof state->footer, footer_offset);
    if (!error)
        error = vhd_barrier(image);
    if (error) {
        /* A partly written footer must not become the end of the file. */
        if (vd_ftruncate(image->fd, (uint64_t)old_size) < 0) {
            /* Nothing more can be done; the original error is the one to report. */
        }
        return vd_fail_errno(error, "%s: moving the footer to offset %llu for a new block", image->path,
                             (ull)footer_offset);
    }
    state->footer_offset = footer_offset;
    image->file_size = footer_offset + VHD_FOOTER_SIZE;

    memset(state->bitmap, state->disk_type == VHD_TYPE_DYNAMIC ? 0xFF : 0x00, state->bitmap_size);
    error = vd_pwrite_full(image->fd, state->bitmap, state->bitmap_size, block_offset);
    if (error)
        return vd_fail_errno(error, "%s: writing a sector bitmap at offset %llu", image->path, (ull)block_offset);
    *entry = (uint32_t)(block_offset / VHD_SECTOR);
    return ERROR_SUCCESS;
}

/* Sets the bitmap bits of sectors [first, first + count) of a block. */
static DWORD vhd_mark_present(struct vd_image *image, uint64_t block_offset, uint32_t first, uint32_t count)
{
    struct vhd_state *state = image->state;
    uint32_t first_byte = first / 8, last_byte = (first + count - 1) / 8;
    DWORD status = vhd_read_bitmap(image, block_offset, first_byte, last_byte - first_byte + 1);
    if (status != ERROR_SUCCESS)
        return status;
    bool changed = false;
    for (uint32_t sector = first; sector < first + count; sector++) {
        if (!vhd_bit(state->bitmap, sector)) {
            state->bitmap[sector / 8] |= (uint8_t)(0x80u >> (sector % 8));
            changed = true;
        }
    }
    if (!changed)
        return ERROR_SUCCESS;
    int error = vd_pwrite_full(image->fd, state->bitmap + first_byte, last_byte - first_byte + 1,
                               block_offset + first_byte);
    return error ? vd_fail_errno(error, "%s: writing the sector bitmap at offset %llu", image->path,
                                 (ull)(block_offset + first_byte))
                 : ERROR_SUCCESS;
}

/* Bulk writing: the BAT entry of a block just written waits for flush();
   until then the block is this session's alone (the file on disk does not
   reference it, so an interruption leaves the image as it was there). */
static DWORD vhd_defer_bat_entry(struct vd_image *image, uint32_t block, uint32_t entry)
{
    struct vhd_state *state = image->state;
    if (state->pending_count == state->pending_capacity) {
        size_t capacity = state->pending_capacity ? state->pending_capacity * 2 : 256;
        uint32_t *grown = realloc(state->pending, capacity * sizeof *grown);
        if (!grown)
            return vd_fail(ERROR_OUTOFMEMORY, "%s: pending BAT entries", image->path);
        state->pending = grown;
        state->pending_capacity = capacity;
    }
    state->pending[state->pending_count++] = block;
    state->bat[block] = entry;
    return ERROR_SUCCESS;
}

/* Whole sectors [first, first + count) of one block. */
static DWORD vhd_write_sectors(struct vd_image *image, uint32_t block, uint32_t first, const uint8_t *data,
                               uint32_t count)
{
    struct vhd_state *state = image->state;
    uint32_t entry = state->bat[block];
    bool fresh = entry == VHD_BAT_UNUSED;
    DWORD status = fresh ? vhd_allocate_block(image, &entry) : ERROR_SUCCESS;
    if (status != ERROR_SUCCESS)
        return status;
    uint64_t block_offset = (uint64_t)entry * VHD_SECTOR;
    uint64_t target = block_offset + state->bitmap_size + (uint64_t)first * VHD_SECTOR;
    int error = vd_pwrite_full(image->fd, data, (size_t)count * VHD_SECTOR, target);
    if (error)
        return vd_fail_errno(error, "%s: writing block %u at offset %llu", image->path, (unsigned)block, (ull)target);
    /* Data before bitmap: a bit must never claim a sector not yet written. */
    if (!(fresh && state->disk_type == VHD_TYPE_DYNAMIC)) {
        status = vhd_mark_present(image, block_offset, first, count);
        if (status != ERROR_SUCCESS)
            return status;
    }
    if (!fresh)
        return ERROR_SUCCESS;
    if (state->bulk)
        return vhd_defer_bat_entry(image, block, entry);

    uint8_t raw[4];
    vd_put_be32(raw, entry);
    uint64_t bat_entry = state->table_offset + 4 * (uint64_t)block;
    error = vhd_barrier(image);
    if (!error)
        error = vd_pwrite_full(image->fd, raw, sizeof raw, bat_entry);
    if (error)
        return vd_fail_errno(error, "%s: writing BAT entry %u at offset %llu", image->path, (unsigned)block,
                             (ull)bat_entry);
    state->bat[block] = entry;
    return ERROR_SUCCESS;
}

/* One sector of a block, bytes [skip, skip + length) replaced by data. */
static DWORD vhd_write_partial_sector(struct vd_image *image, uint32_t block, uint32_t sector, uint32_t skip,
                                      const uint8_t *data, size_t length)
{
    struct vhd_state *state = image->state;
    uint8_t merged[VHD_SECTOR];
    DWORD status = vhd_read_locked(image, merged, (uint64_t)block * state->block_size + (uint64_t)sector * VHD_SECTOR,
                                   VHD_SECTOR);
    if (status != ERROR_SUCCESS)
        return status;
    memcpy(merged + skip, data, length);
    return vhd_write_sectors(image, block, sector, merged, 1);
}

/* [within, within + length) of one block.  The bitmap tracks whole sectors,
   so partial sectors at either end are merged with their current contents
   (the parent's, for a differencing disk) first. */
static DWORD vhd_write_in_block(struct vd_image *image, uint32_t block, uint32_t within, const uint8_t *data,
                                size_t length)
{
    DWORD status;
    uint32_t skip = within % VHD_SECTOR;
    if (skip) {
        size_t n = VHD_SECTOR - skip < length ? VHD_SECTOR - skip : length;
        status = vhd_write_partial_sector(image, block, within / VHD_SECTOR, skip, data, n);
        if (status != ERROR_SUCCESS)
            return status;
        within += (uint32_t)n;
        data += n;
        length -= n;
    }
    size_t whole = length / VHD_SECTOR;
    if (whole) {
        status = vhd_write_sectors(image, block, within / VHD_SECTOR, data, (uint32_t)whole);
        if (status != ERROR_SUCCESS)
            return status;
        within += (uint32_t)(whole * VHD_SECTOR);
        data += whole * VHD_SECTOR;
        length -= whole * VHD_SECTOR;
    }
    if (length)
        return vhd_write_partial_sector(image, block, within / VHD_SECTOR, 0, data, length);
    return ERROR_SUCCESS;
}

static DWORD vhd_write(struct vd_image *image, const void *buffer, uint64_t offset, size_t length)
{
    struct vhd_state *state = image->state;
    if (!image->writable)
        return vd_fail(ERROR_WRITE_PROTECT, "%s is open read-only", image->path);
    if (!vhd_in_range(image, offset, length))
        return vd_fail(ERROR_INVALID_PARAMETER, "%s: writing %zu bytes at offset %llu, past the %llu-byte disk",
                       image->path, length, (ull)offset, (ull)image->virtual_size);
    if (state->disk_type == VHD_TYPE_FIXED) {
        int error = vd_pwrite_full(image->fd, buffer, length, offset);
        return error ? vd_fail_errno(error, "%s: writing %zu bytes at offset %llu", image->path, length, (ull)offset)
                     : ERROR_SUCCESS;
    }
    const uint8_t *data = buffer;
    DWORD status = ERROR_SUCCESS;
    pthread_mutex_lock(&state->lock);
    while (length > 0 && status == ERROR_SUCCESS) {
        uint32_t block = (uint32_t)(offset / state->block_size);
        uint32_t within = (uint32_t)(offset % state->block_size);
        size_t n = state->block_size - within < length ? state->block_size - within : length;
        status = vhd_write_in_block(image, block, within, data, n);
        data += n;
        offset += n;
        length -= n;
    }
    pthread_mutex_unlock(&state->lock);
    return status;
}

/* Refuses a change of length bytes at offset (doing: "zeroing", ...) to an
   image open read-only or past the disk's end. */
static DWORD vhd_check_change(const struct vd_image *image, uint64_t offset, uint64_t length, const char *doing)
{
    if (!image->writable)
        return vd_fail(ERROR_WRITE_PROTECT, "%s is open read-only", image->path);
    if (!vhd_in_range(image, offset, (size_t)length) || length > image->virtual_size)
        return vd_fail(ERROR_INVALID_PARAMETER, "%s: %s %llu bytes at offset %llu, past the %llu-byte disk",
                       image->path, doing, (ull)length, (ull)offset, (ull)image->virtual_size);
    return ERROR_SUCCESS;
}

/* An allocated block of a dynamic disk holds its data in place, every
   sector present: zeroed in the file (vd_image_zero_range).  Anything else
   (a differencing block's bitmap must come to hide the parent, an
   unallocated block must be allocated, a fixed disk's footer must never be
   touched) is written as zeros, as by write(). */
static DWORD vhd_write_zeroes(struct vd_image *image, uint64_t offset, uint64_t length)
{
    enum { CHUNK = 1 << 20 };
    struct vhd_state *state = image->state;
    DWORD refused = vhd_check_change(image, offset, length, "zeroing");
    if (refused != ERROR_SUCCESS)
        return refused;
    uint8_t *zeros = calloc(1, CHUNK);
    if (!zeros)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a buffer of zeros");
    DWORD status = ERROR_SUCCESS;
    if (state->disk_type == VHD_TYPE_FIXED) {
        for (uint64_t done = 0; done < length && status == ERROR_SUCCESS;) {
            size_t n = length - done < CHUNK ? (size_t)(length - done) : CHUNK;
            status = vhd_write(image, zeros, offset + done, n);
            done += n;
        }
        free(zeros);
        return status;
    }
    pthread_mutex_lock(&state->lock);
    while (length > 0 && status == ERROR_SUCCESS) {
        uint32_t block = (uint32_t)(offset / state->block_size);
        uint32_t within = (uint32_t)(offset % state->block_size);
        uint64_t n = state->block_size - within < length ? state->block_size - within : length;
        uint32_t entry = state->bat[block];
        bool done = false;
        if (state->disk_type == VHD_TYPE_DYNAMIC && entry != VHD_BAT_UNUSED)
            status = vd_image_zero_range(image, (uint64_t)entry * VHD_SECTOR + state->bitmap_size + within, n, &done);
        for (uint64_t k = 0; !done && k < n && status == ERROR_SUCCESS;) {
            size_t m = n - k < CHUNK ? (size_t)(n - k) : CHUNK;
            status = vhd_write_in_block(image, block, within + (uint32_t)k, zeros, m);
            k += m;
        }
        offset += n;
        length -= n;
    }
    pthread_mutex_unlock(&state->lock);
    free(zeros);
    return status;
}

/* ---- discard -------------------------------------------------------------- */

/* [at, at + length) of the file reads as zeros: punched where the file
   system can (giving the space back), else written. */
static DWORD vhd_punch_or_zero(struct vd_image *image, uint64_t at, uint64_t length)
{
    if (vd_fallocate(image->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, at, length) == 0)
        return ERROR_SUCCESS;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return vd_fail_errno(errno, "%s: punching %llu bytes at file offset %llu", image->path, (ull)length,
                             (ull)at);
    enum { CHUNK = 1 << 20 };
    uint8_t *zeros = calloc(1, CHUNK);
    if (!zeros)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a buffer of zeros");
    int error = 0;
    for (uint64_t done = 0; done < length && !error;) {
        size_t n = length - done < CHUNK ? (size_t)(length - done) : CHUNK;
        error = vd_pwrite_full(image->fd, zeros, n, at + done);
        done += n;
    }
    free(zeros);
    return error ? vd_fail_errno(error, "%s: zeroing %llu bytes at file offset %llu", image->path, (ull)length,
                                 (ull)at)
                 : ERROR_SUCCESS;
}

/* A differencing block's range where the parent may show: zeros written as
   this file's data (allocating the block and setting the bitmap bits, in the
   order of any write), then punched to give the space back. */
static DWORD vhd_hide_parent(struct vd_image *image, uint32_t block, uint32_t within, uint64_t length)
{
    struct vhd_state *state = image->state;
    size_t chunk = length < (1u << 20) ? (size_t)length : (1u << 20);
    uint8_t *zeros = calloc(1, chunk);
    if (!zeros)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a buffer of zeros");
    DWORD status = ERROR_SUCCESS;
    for (uint64_t done = 0; done < length && status == ERROR_SUCCESS;) {
        size_t n = length - done < chunk ? (size_t)(length - done) : chunk;
        status = vhd_write_in_block(image, block, within + (uint32_t)done, zeros, n);
        done += n;
    }
    free(zeros);
    if (status == ERROR_SUCCESS && state->bat[block] != VHD_BAT_UNUSED)
        status = vhd_punch_or_zero(image, (uint64_t)state->bat[block] * VHD_SECTOR + state->bitmap_size + within,
                                   length);
    return status;
}

/* VHD has no block state for "trimmed", and a BAT entry cannot be taken
   back (other readers expect blocks to stay where they are), so a discard
   zeros: the data of allocated blocks is punched out of the file (zeroed
   where the file system cannot punch); a differencing disk also writes
   zeros where its parent would show, so the bitmap hides the parent.  A
   fixed disk punches its data range, never the footer past it. */
static DWORD vhd_discard(struct vd_image *image, uint64_t offset, uint64_t length)
{
    struct vhd_state *state = image->state;
    DWORD refused = vhd_check_change(image, offset, length, "discarding");
    if (refused != ERROR_SUCCESS)
        return refused;
    if (length == 0)
        return ERROR_SUCCESS;
    if (state->disk_type == VHD_TYPE_FIXED)
        return vhd_punch_or_zero(image, offset, length);

    DWORD status = ERROR_SUCCESS;
    pthread_mutex_lock(&state->lock);
    while (length > 0 && status == ERROR_SUCCESS) {
        uint32_t block = (uint32_t)(offset / state->block_size);
        uint32_t within = (uint32_t)(offset % state->block_size);
        uint64_t n = state->block_size - within < length ? state->block_size - within : length;
        uint32_t entry = state->bat[block];
        if (state->disk_type != VHD_TYPE_DIFFERENCING) {
            /* Unallocated reads as zeros; allocated: bitmap bits or not,
               zeroed data reads as zeros. */
            if (entry != VHD_BAT_UNUSED)
                status = vhd_punch_or_zero(image, (uint64_t)entry * VHD_SECTOR + state->bitmap_size + within, n);
        } else {
            /* A block not in this file shows the parent: zeros need
               writing only where the parent has data.  (This image's own
               block_status would take the lock held here.) */
            bool zeros = false;
            if (entry == VHD_BAT_UNUSED)
                status = vd_image_reads_zeros(image->parent, offset, n, &zeros);
            if (status == ERROR_SUCCESS && !zeros)
                status = vhd_hide_parent(image, block, within, n);
        }
        offset += n;
        length -= n;
    }
    pthread_mutex_unlock(&state->lock);
    return status;
}

/* Block allocation orders itself with barriers; this makes the data of
   writes into existing blocks (and a fixed disk's) durable too. */
/* Reserves, with one footer move and one flush, every block the extents
   will need, and defers BAT entries to flush(): data first, one flush, then
   the entries, another flush, instead of two flushes per block. */
static DWORD vhd_prepare_bulk_write(struct vd_image *image, const struct vd_extent *extents, size_t count)
{
    struct vhd_state *state = image->state;
    if (state->disk_type == VHD_TYPE_FIXED || !image->writable)
        return ERROR_SUCCESS;
    pthread_mutex_lock(&state->lock);
    uint64_t blocks = 0, last = UINT64_MAX;
    for (size_t i = 0; i < count; i++) {
        uint64_t offset = extents[i].offset, length = extents[i].length;
        if (!length || !vhd_in_range(image, offset, length))
            continue;
        for (uint64_t b = offset / state->block_size; b <= (offset + length - 1) / state->block_size; b++) {
            if (b != last && state->bat[b] == VHD_BAT_UNUSED)
                blocks++;
            last = b;
        }
    }
    uint64_t block_bytes = (uint64_t)state->bitmap_size + state->block_size;
    uint64_t first = vhd_round_up(state->footer_offset, VHD_SECTOR);
    uint64_t footer_offset = first + blocks * block_bytes;
    DWORD status = ERROR_SUCCESS;
    if (blocks && footer_offset / VHD_SECTOR >= VHD_BAT_UNUSED)
        status = vd_fail(ERROR_VHD_BLOCK_ALLOCATION_FAILURE, "%s: %llu new blocks would lie beyond what a BAT "
                         "entry can address", image->path, (ull)blocks);
    int error = 0;
    if (status == ERROR_SUCCESS && blocks) {
        /* The order of vhd_allocate_block, once for all the blocks. */
        uint64_t old_size = image->file_size;
        error = vd_pwrite_full(image->fd, &state->footer, sizeof state->footer, footer_offset);
        if (!error)
            error = vd_fdatasync(image->fd) < 0 ? errno : 0;
        if (error) {
            if (vd_ftruncate(image->fd, (uint64_t)old_size) < 0) {
                /* The original error is the one to report. */
            }
            status = vd_fail_errno(error, "%s: moving the footer to offset %llu for %llu new blocks", image->path,
                                   (ull)footer_offset, (ull)blocks);
        }
    }
    if (status == ERROR_SUCCESS && blocks) {
        state->footer_offset = footer_offset;
        image->file_size = footer_offset + VHD_FOOTER_SIZE;
        memset(state->bitmap, state->disk_type == VHD_TYPE_DYNAMIC ? 0xFF : 0x00, state->bitmap_size);
        for (uint64_t b = 0; b < blocks && !error; b++)
            error = vd_pwrite_full(image->fd, state->bitmap, state->bitmap_size, first + b * block_bytes);
        if (error)
            status = vd_fail_errno(error, "%s: writing the sector bitmaps of new blocks", image->path);
        state->reserve_next = first;
        state->reserve_end = status == ERROR_SUCCESS ? footer_offset : first;
    }
    if (status == ERROR_SUCCESS)
        state->bulk = true;
    pthread_mutex_unlock(&state->lock);
    return status;
}

static DWORD vhd_flush(struct vd_image *image)
{
    struct vhd_state *state = image->state;
    if (vd_fdatasync(image->fd) < 0)
        return vd_fail_errno(errno, "%s: flushing", image->path);
    if (!state || !state->bulk)
        return ERROR_SUCCESS;
    /* The data is durable: now the entries that make it part of the disk. */
    pthread_mutex_lock(&state->lock);
    int error = 0;
    for (size_t i = 0; i < state->pending_count && !error; i++) {
        uint32_t block = state->pending[i];
        uint8_t raw[4];
        vd_put_be32(raw, state->bat[block]);
        error = vd_pwrite_full(image->fd, raw, sizeof raw, state->table_offset + 4 * (uint64_t)block);
    }
    if (!error && vd_fdatasync(image->fd) < 0)
        error = errno;
    state->pending_count = 0;
    state->bulk = false;
    state->reserve_next = state->reserve_end = 0;
    pthread_mutex_unlock(&state->lock);
    return error ? vd_fail_errno(error, "%s: writing the BAT entries of new blocks", image->path) : ERROR_SUCCESS;
}

/* ---- creating ------------------------------------------------------------ */

/* Cylinders, heads and sectors per track, by the specification's algorithm
   (appendix "CHS calculation"), packed as the footer stores them. */
static uint32_t vhd_geometry(uint64_t size)
{
    uint64_t total = size / VHD_SECTOR;
    uint64_t cylinders_times_heads;
    uint32_t heads, sectors;
    if (total > UINT64_C(65535) * 16 * 255)
        total = UINT64_C(65535) * 16 * 255;
    if (total >= UINT64_C(65535) * 16 * 63) {
        sectors = 255;
        heads = 16;
        cylinders_times_heads = total / sectors;
    } else {
        sectors = 17;
        cylinders_times_heads = total / sectors;
        heads = (uint32_t)((cylinders_times_heads + 1023) / 1024);
        if (heads < 4)
            heads = 4;
        if (cylinders_times_heads >= heads * UINT64_C(1024) || heads > 16) {
            sectors = 31;
            heads = 16;
            cylinders_times_heads = total / sectors;
        }
        if (cylinders_times_heads >= heads * UINT64_C(1024)) {
            sectors = 63;
            heads = 16;
            cylinders_times_heads = total / sectors;
        }
    }
    uint32_t cylinders = (uint32_t)(cylinders_times_heads / heads);
    return cylinders << 16 | heads << 8 | sectors;
}

/* Creator "win " makes qemu take current_size for the size instead of the
   CHS product, as it does for Hyper-V's images (its "known creator apps"). */
static void vhd_build_footer(struct vhd_footer *footer, uint32_t disk_type, uint64_t size, uint64_t data_offset,
                             const GUID *unique_id)
{
    memset(footer, 0, sizeof *footer);
    memcpy(footer->cookie, VHD_COOKIE, 8);
    vd_put_be32(footer->features, VHD_FEATURES_RESERVED);
    vd_put_be32(footer->file_format_version, VHD_VERSION);
    vd_put_be64(footer->data_offset, data_offset);
    vd_put_be32(footer->time_stamp, vhd_time_stamp(time(NULL)));
    memcpy(footer->creator_application, "win ", 4);
    vd_put_be32(footer->creator_version, 0x000A0000u);
    memcpy(footer->creator_host_os, "Wi2k", 4);
    vd_put_be64(footer->original_size, size);
    vd_put_be64(footer->current_size, size);
    vd_put_be32(footer->disk_geometry, vhd_geometry(size));
    vd_put_be32(footer->disk_type, disk_type);
    vd_guid_to_be_bytes(unique_id, footer->unique_id);
    vhd_seal_footer(footer);
}

static DWORD vhd_write_at(int fd, const void *data, size_t length, uint64_t offset, const char *what)
{
    int error = vd_pwrite_full(fd, data, length, offset);
    return error ? vd_fail_errno(error, "writing the %s at offset %llu", what, (ull)offset) : ERROR_SUCCESS;
}

/* Reserves the data area of a fixed disk.  Only where the file system cannot
   preallocate are zeros written instead, which allocates just the same. */
static DWORD vhd_preallocate(int fd, uint64_t size)
{
    int result;
    do
        result = vd_fallocate(fd, 0, 0, size);
    while (result < 0 && errno == EINTR);
    if (result == 0)
        return ERROR_SUCCESS;
    if (errno != EOPNOTSUPP)
        return vd_fail_errno(errno, "allocating %llu bytes for a fixed VHD", (ull)size);
    if (vd_ftruncate(fd, (uint64_t)size) < 0)
        return vd_fail_errno(errno, "extending a fixed VHD to %llu bytes", (ull)size);
    enum { CHUNK = 1 << 20 };
    uint8_t *zeros = calloc(1, CHUNK);
    if (!zeros)
        return vd_fail(ERROR_OUTOFMEMORY, "zero buffer for a fixed VHD");
    DWORD status = ERROR_SUCCESS;
    for (uint64_t offset = 0; offset < size && status == ERROR_SUCCESS; offset += CHUNK) {
        size_t n = size - offset < CHUNK ? (size_t)(size - offset) : CHUNK;
        status = vhd_write_at(fd, zeros, n, offset, "data area");
    }
    free(zeros);
    return status;
}

/* What a differencing child records about its parent. */
struct vhd_parent_info {
    uint8_t *name;         /* parent's file name, UTF-16BE */
    size_t name_length;
    uint8_t *absolute;     /* W2ku, UTF-16LE */
    size_t absolute_length;
    uint8_t *relative;     /* W2ru, UTF-16LE */
    size_t relative_length;
};

static void vhd_parent_info_free(struct vhd_parent_info *info)
{
    free(info->name);
    free(info->absolute);
    free(info->relative);
}

static DWORD vhd_parent_info(const char *child_path, const struct vd_image *parent, struct vhd_parent_info *info)
{
    const char *slash = strrchr(parent->path, '/');
    const char *base = slash ? slash + 1 : parent->path;
    info->name = vhd_encode_utf16(base, true, &info->name_length);
    info->absolute = vhd_encode_utf16(parent->path, false, &info->absolute_length);
    if (!info->name || !info->absolute)
        return vd_fail(ERROR_INVALID_PARAMETER, "parent path %s is not valid UTF-8", parent->path);
    if (info->name_length > VHD_PARENT_NAME_BYTES)
        return vd_fail(ERROR_INVALID_PARAMETER, "parent file name %s is longer than the 256 UTF-16 units VHD stores",
                       base);

    /* The child's directory as the kernel sees it, like parent->path, so
       that the relative path is computed between comparable names. */
    char *lexical = vhd_dirname(child_path);
    char *dir = lexical ? realpath(lexical, NULL) : NULL;
    const char *from = dir ? dir : lexical;
    char *locator = from ? vhd_relative_locator(from, parent->path) : NULL;
    free(dir);
    free(lexical);
    if (!locator)
        return vd_fail(ERROR_OUTOFMEMORY, "relative parent locator");
    info->relative = vhd_encode_utf16(locator, false, &info->relative_length);
    free(locator);
    if (!info->relative)
        return vd_fail(ERROR_INVALID_PARAMETER, "parent path %s is not valid UTF-8", parent->path);
    if (info->absolute_length > VHD_MAX_LOCATOR_BYTES || info->relative_length > VHD_MAX_LOCATOR_BYTES)
        return vd_fail(ERROR_INVALID_PARAMETER, "parent path %s is too long for a parent locator", parent->path);
    return ERROR_SUCCESS;
}

static void vhd_set_locator(struct vhd_parent_locator *locator, uint32_t code, size_t length, uint64_t offset)
{
    vd_put_be32(locator->platform_code, code);
    /* In bytes, as Windows writes it (the specification says sectors). */
    vd_put_be32(locator->platform_data_space, (uint32_t)vhd_round_up(length, VHD_SECTOR));
    vd_put_be32(locator->platform_data_length, (uint32_t)length);
    vd_put_be64(locator->platform_data_offset, offset);
}

static DWORD vhd_write_bat(int fd, uint64_t offset, uint64_t length)
{
    enum { CHUNK = 64 * 1024 };
    uint8_t *unused = malloc(CHUNK);
    if (!unused)
        return vd_fail(ERROR_OUTOFMEMORY, "BAT buffer");
    memset(unused, 0xFF, CHUNK);
    DWORD status = ERROR_SUCCESS;
    for (uint64_t done = 0; done < length && status == ERROR_SUCCESS; done += CHUNK) {
        size_t n = length - done < CHUNK ? (size_t)(length - done) : CHUNK;
        status = vhd_write_at(fd, unused, n, offset + done, "BAT");
    }
    free(unused);
    return status;
}

static DWORD vhd_create_sparse(int fd, const struct vd_create_request *request, uint64_t size, uint32_t block_size)
{
    const struct vd_image *parent = request->parent;
    uint32_t disk_type = parent ? VHD_TYPE_DIFFERENCING : VHD_TYPE_DYNAMIC;
    uint64_t entries = vhd_round_up(size, block_size) / block_size;
    uint64_t table_offset = VHD_FOOTER_SIZE + VHD_HEADER_SIZE;
    uint64_t table_length = vhd_round_up(entries * 4, VHD_SECTOR);
    uint64_t end = table_offset + table_length;

    struct vhd_dynamic_header header;
    memset(&header, 0, sizeof header);
    memcpy(header.cookie, VHD_SPARSE_COOKIE, 8);
    vd_put_be64(header.data_offset, VHD_NO_DATA_OFFSET);
    vd_put_be64(header.table_offset, table_offset);
    vd_put_be32(header.header_version, VHD_VERSION);
    vd_put_be32(header.max_table_entries, (uint32_t)entries);
    vd_put_be32(header.block_size, block_size);

    struct vhd_parent_info info = {0};
    uint64_t absolute_offset = 0, relative_offset = 0;
    DWORD status;
    if (parent) {
        status = vhd_parent_info(request->path, parent, &info);
        if (status != ERROR_SUCCESS)
            goto done;
        const struct vhd_state *parent_state = parent->state;
        memcpy(header.parent_unique_id, parent_state->footer.unique_id, 16);
        struct stat st;
        if (fstat(parent->fd, &st) < 0) {
            status = vd_fail_errno(errno, "examining parent %s", parent->path);
            goto done;
        }
        vd_put_be32(header.parent_time_stamp, vhd_time_stamp(st.st_mtime));
        memcpy(header.parent_unicode_name, info.name, info.name_length);
        absolute_offset = end;
        end += vhd_round_up(info.absolute_length, VHD_SECTOR);
        relative_offset = end;
        end += vhd_round_up(info.relative_length, VHD_SECTOR);
        vhd_set_locator(&header.parent_locator[0], VHD_PLATFORM_W2KU, info.absolute_length, absolute_offset);
        vhd_set_locator(&header.parent_locator[1], VHD_PLATFORM_W2RU, info.relative_length, relative_offset);
    }
    vhd_seal_header(&header);

    struct vhd_footer footer;
    vhd_build_footer(&footer, disk_type, size, VHD_FOOTER_SIZE, &request->unique_id);
    /* Padding between the pieces must read as zeros: the file starts empty
       and ftruncate() makes it so. */
    if (vd_ftruncate(fd, end + VHD_FOOTER_SIZE) < 0) {
        status = vd_fail_errno(errno, "extending a new VHD to %llu bytes", (ull)(end + VHD_FOOTER_SIZE));
        goto done;
    }
    status = vhd_write_at(fd, &header, sizeof header, VHD_FOOTER_SIZE, "dynamic header");
    if (status == ERROR_SUCCESS)
        status = vhd_write_bat(fd, table_offset, table_length);
    if (status == ERROR_SUCCESS && parent)
        status = vhd_write_at(fd, info.absolute, info.absolute_length, absolute_offset, "W2ku parent locator");
    if (status == ERROR_SUCCESS && parent)
        status = vhd_write_at(fd, info.relative, info.relative_length, relative_offset, "W2ru parent locator");
    if (status == ERROR_SUCCESS)
        status = vhd_write_at(fd, &footer, sizeof footer, 0, "footer copy");
    if (status == ERROR_SUCCESS)
        status = vhd_write_at(fd, &footer, sizeof footer, end, "footer");
done:
    vhd_parent_info_free(&info);
    return status;
}

static DWORD vhd_create(int fd, const struct vd_create_request *request)
{
    const struct vd_image *parent = request->parent;
    if (request->device_id != VIRTUAL_STORAGE_TYPE_DEVICE_VHD)
        return vd_fail(ERROR_INVALID_PARAMETER, "device type %u is not VHD", (unsigned)request->device_id);
    if (request->logical_sector_size != VHD_SECTOR || request->physical_sector_size != VHD_SECTOR)
        return vd_fail(ERROR_INVALID_PARAMETER, "VHD sectors are 512 bytes, not %u logical / %u physical",
                       (unsigned)request->logical_sector_size, (unsigned)request->physical_sector_size);

    uint64_t size = request->virtual_size;
    if (parent) {
        if (request->fixed)
            return vd_fail(ERROR_INVALID_PARAMETER, "a differencing VHD cannot be fully allocated");
        if (parent->format != &vd_format_vhd)
            return vd_fail(ERROR_INVALID_PARAMETER, "parent %s of a VHD must be a VHD, not %s", parent->path,
                           parent->format->name);
        if (size == 0)
            size = parent->virtual_size;
        if (size != parent->virtual_size)
            return vd_fail(ERROR_INVALID_PARAMETER, "a differencing VHD has its parent's size %llu, not %llu",
                           (ull)parent->virtual_size, (ull)size);
    }
    if (size == 0 || size % VHD_SECTOR)
        return vd_fail(ERROR_INVALID_PARAMETER, "virtual size %llu is not a positive multiple of 512", (ull)size);
    if (size > VHD_MAX_SIZE)
        return vd_fail(ERROR_VHD_INVALID_SIZE, "virtual size %llu exceeds the VHD limit of 2040 GiB", (ull)size);

    if (request->fixed) {
        DWORD status = request->sparse ? ERROR_SUCCESS : vhd_preallocate(fd, size);
        if (status != ERROR_SUCCESS)
            return status;
        struct vhd_footer footer;
        vhd_build_footer(&footer, VHD_TYPE_FIXED, size, VHD_NO_DATA_OFFSET, &request->unique_id);
        return vhd_write_at(fd, &footer, sizeof footer, size, "footer");
    }

    uint32_t block_size = request->block_size ? request->block_size : VHD_DEFAULT_BLOCK_SIZE;
    if (block_size != VHD_DEFAULT_BLOCK_SIZE && block_size != VHD_SMALL_BLOCK_SIZE)
        return vd_fail(ERROR_INVALID_PARAMETER, "VHD block size %u is neither 2 MiB nor 512 KiB",
                       (unsigned)block_size);
    return vhd_create_sparse(fd, request, size, block_size);
}

/* ---- offline changes ----------------------------------------------------- */

/* The footer, changed: the copy at offset 0 first (dynamic and differencing
   disks), flushed, then the one that ends the file, which is the one readers
   trust.  Interrupted in between, the old footer stays in charge. */
static DWORD vhd_write_footers(struct vd_image *image, struct vhd_footer *footer)
{
    struct vhd_state *state = image->state;
    vhd_seal_footer(footer);
    int error = 0;
    if (state->disk_type != VHD_TYPE_FIXED) {
        error = vd_pwrite_full(image->fd, footer, sizeof *footer, 0);
        if (!error)
            error = vhd_barrier(image);
        if (error)
            return vd_fail_errno(error, "%s: writing the footer copy at offset 0", image->path);
    }
    error = vd_pwrite_full(image->fd, footer, sizeof *footer, state->footer_offset);
    if (!error)
        error = vhd_barrier(image);
    if (error)
        return vd_fail_errno(error, "%s: writing the footer at offset %llu", image->path, (ull)state->footer_offset);
    state->footer = *footer;
    image->file_size = state->footer_offset + VHD_FOOTER_SIZE;
    return ERROR_SUCCESS;
}

/* Makes length bytes of room where the footer is, moving the footer (as it
   is) past them first, so that the file ends with a valid footer at every
   step.  *start: the room, sector aligned, still holding the old footer. */
static DWORD vhd_make_room(struct vd_image *image, uint64_t length, uint64_t *start)
{
    struct vhd_state *state = image->state;
    uint64_t at = vhd_round_up(state->footer_offset, VHD_SECTOR);
    uint64_t footer_offset = at + vhd_round_up(length, VHD_SECTOR);
    int error = vd_pwrite_full(image->fd, &state->footer, sizeof state->footer, footer_offset);
    if (!error)
        error = vhd_barrier(image);
    if (error)
        return vd_fail_errno(error, "%s: moving the footer to offset %llu", image->path, (ull)footer_offset);
    state->footer_offset = footer_offset;
    image->file_size = footer_offset + VHD_FOOTER_SIZE;
    *start = at;
    return ERROR_SUCCESS;
}

static DWORD vhd_write_header(struct vd_image *image, struct vhd_dynamic_header *header, uint64_t offset)
{
    vhd_seal_header(header);
    int error = vd_pwrite_full(image->fd, header, sizeof *header, offset);
    if (!error)
        error = vhd_barrier(image);
    return error ? vd_fail_errno(error, "%s: writing the dynamic header at offset %llu", image->path, (ull)offset)
                 : ERROR_SUCCESS;
}

static DWORD vhd_set_identifier(struct vd_image *image, const GUID *identifier)
{
    struct vhd_state *state = image->state;
    struct vhd_footer footer = state->footer;
    vd_guid_to_be_bytes(identifier, footer.unique_id);
    DWORD status = vhd_write_footers(image, &footer);
    if (status == ERROR_SUCCESS)
        image->identifier = *identifier;
    return status;
}

/* VHD has no field for it: 512 bytes is all a VHD can say. */
static DWORD vhd_set_physical_sector_size(struct vd_image *image, ULONG size)
{
    if (size != VHD_SECTOR)
        return vd_fail(ERROR_VHD_INVALID_TYPE, "%s: a VHD cannot record a %u-byte physical sector", image->path,
                       (unsigned)size);
    return ERROR_SUCCESS;
}

/* New parent locators (W2ku, W2ru), parent name and time stamp.  The 1 KiB
   dynamic header has no second copy and a byte-sum checksum, so rewriting
   it in place could be torn between its two sectors into something neither
   old nor new.  Instead a whole new header goes past the old end of the
   file with the new locator data, is flushed, and then the footers (one
   sector each, the copy at 0 first, the one at the end in charge) switch
   their data offset to it.  An interruption leaves the old header and
   locators in force; the old ones are left unused. */
static DWORD vhd_set_parent(struct vd_image *image, struct vd_image *parent)
{
    struct vhd_state *state = image->state;
    uint64_t header_offset = vd_be64(state->footer.data_offset);
    struct vhd_dynamic_header header;
    struct vhd_parent_info info = {0};
    struct stat st;
    DWORD status = vhd_read_dynamic_header(image, state, header_offset, &header);
    if (status == ERROR_SUCCESS)
        status = vhd_parent_info(image->path, parent, &info);
    if (status == ERROR_SUCCESS && fstat(parent->fd, &st) < 0)
        status = vd_fail_errno(errno, "examining parent %s", parent->path);
    uint64_t absolute_space = vhd_round_up(info.absolute_length, VHD_SECTOR);
    uint64_t new_header = 0, start = 0;
    if (status == ERROR_SUCCESS)
        status = vhd_make_room(image, sizeof header + absolute_space + vhd_round_up(info.relative_length, VHD_SECTOR),
                               &new_header);
    start = new_header + sizeof header;
    if (status == ERROR_SUCCESS) {
        int error = vd_pwrite_full(image->fd, info.absolute, info.absolute_length, start);
        if (!error)
            error = vd_pwrite_full(image->fd, info.relative, info.relative_length, start + absolute_space);
        if (!error)
            error = vhd_barrier(image);
        if (error)
            status = vd_fail_errno(error, "%s: writing parent locators at offset %llu", image->path, (ull)start);
    }
    if (status == ERROR_SUCCESS) {
        const struct vhd_state *parent_state = parent->state;
        memcpy(header.parent_unique_id, parent_state->footer.unique_id, 16);
        vd_put_be32(header.parent_time_stamp, vhd_time_stamp(st.st_mtime));
        memset(header.parent_unicode_name, 0, sizeof header.parent_unicode_name);
        memcpy(header.parent_unicode_name, info.name, info.name_length);
        memset(header.parent_locator, 0, sizeof header.parent_locator);
        vhd_set_locator(&header.parent_locator[0], VHD_PLATFORM_W2KU, info.absolute_length, start);
        vhd_set_locator(&header.parent_locator[1], VHD_PLATFORM_W2RU, info.relative_length, start + absolute_space);
        status = vhd_write_header(image, &header, new_header);
    }
    if (status == ERROR_SUCCESS) {
        struct vhd_footer footer = state->footer;
        vd_put_be64(footer.data_offset, new_header);
        status = vhd_write_footers(image, &footer);
        header_offset = new_header;
    }
    vhd_parent_info_free(&info);
    if (status != ERROR_SUCCESS) {
        vd_image_close(parent);
        return status;
    }
    vd_image_close(image->parent);
    image->parent = parent;
    image->parent_resolved = true;
    image->parent_timestamp = vd_be32(header.parent_time_stamp);
    struct vhd_candidates candidates = {.count = 0};
    status = vhd_find_parent_candidates(image, state, &header, header_offset, &candidates);
    vhd_candidates_free(&candidates);
    return status;
}

/* Where an interrupted grow left the old footer (VHD_GROW_MARK), or 0. */
static uint64_t vhd_grow_pending(const struct vd_image *image, const struct vhd_footer *footer)
{
    if (memcmp(footer->reserved, VHD_GROW_MARK, sizeof VHD_GROW_MARK) != 0)
        return 0;
    uint64_t old = vd_be64(footer->reserved + VHD_GROW_MARK_SIZE);
    return old && old % VHD_SECTOR == 0 && old < image->virtual_size ? old : 0;
}

/* The footer at the end of the file, rewritten with or without the mark. */
static int vhd_write_fixed_footer(struct vd_image *image, uint64_t size, uint64_t stale)
{
    struct vhd_state *state = image->state;
    struct vhd_footer footer = state->footer;
    vd_put_be64(footer.current_size, size);
    vd_put_be32(footer.disk_geometry, vhd_geometry(size));
    memset(footer.reserved, 0, sizeof footer.reserved);
    if (stale) {
        memcpy(footer.reserved, VHD_GROW_MARK, sizeof VHD_GROW_MARK);
        vd_put_be64(footer.reserved + VHD_GROW_MARK_SIZE, stale);
    }
    vhd_seal_footer(&footer);
    int error = vd_pwrite_full(image->fd, &footer, sizeof footer, size);
    if (!error)
        error = vhd_barrier(image);
    if (!error)
        state->footer = footer;
    return error;
}

/* Zeros over the old footer (now inside the disk), then the footer without
   the mark.  Idempotent: open repeats it after a crash. */
static int vhd_finish_grow(struct vd_image *image, uint64_t stale)
{
    static const uint8_t zeros[VHD_FOOTER_SIZE];
    int error = vd_pwrite_full(image->fd, zeros, sizeof zeros, stale);
    if (!error)
        error = vhd_barrier(image);
    if (!error)
        error = vhd_write_fixed_footer(image, image->virtual_size, 0);
    return error;
}

/* A larger fixed disk.  The old footer becomes part of the disk and must
   never show there, but it is the disk's only footer until the new one is
   written at the new end.  So the new footer carries a mark naming the old
   footer's place (VHD_GROW_MARK): until the old footer is overwritten with
   zeros and the mark cleared, every open reads zeros there (and a writable
   one finishes the job).  Each step is flushed before the next.  The new
   space is reserved first, past the end of the file, which is what takes
   time: a cancel then leaves the disk as it was. */
static DWORD vhd_grow_fixed(struct vd_image *image, uint64_t size, struct vd_job *job)
{
    struct vhd_state *state = image->state;
    uint64_t old_size = image->virtual_size;
    vd_job_set_total(job, size - old_size);
    DWORD reserved = vd_job_fallocate(job, image->fd, FALLOC_FL_KEEP_SIZE, old_size + VHD_FOOTER_SIZE,
                                      size - old_size, image->path);
    if (reserved != ERROR_SUCCESS)
        return reserved;
    int error = vhd_write_fixed_footer(image, size, old_size);
    if (error)
        return vd_fail_errno(error, "%s: writing the footer at offset %llu", image->path, (ull)size);
    state->footer_offset = size;
    image->file_size = size + VHD_FOOTER_SIZE;
    image->virtual_size = size;
    if (vd_fallocate(image->fd, FALLOC_FL_KEEP_SIZE, (uint64_t)old_size, (uint64_t)(size - old_size)) < 0 &&
        errno != EOPNOTSUPP)
        return vd_fail_errno(errno, "%s: allocating %llu bytes for the larger disk", image->path,
                             (ull)(size - old_size));
    error = vhd_finish_grow(image, old_size);
    return error ? vd_fail_errno(error, "%s: clearing the old footer at offset %llu", image->path, (ull)old_size)
                 : ERROR_SUCCESS;
}

/* A larger dynamic disk.  The BAT grows in place into its sector padding
   when that suffices, else a larger copy is written past the old end of the
   file; either way the new entries are written (unused) and flushed before
   the one header write that makes them part of the table, and the footers
   with the new size come last. */
static DWORD vhd_grow_dynamic(struct vd_image *image, uint64_t size)
{
    struct vhd_state *state = image->state;
    uint64_t header_offset = vd_be64(state->footer.data_offset);
    struct vhd_dynamic_header header;
    DWORD status = vhd_read_dynamic_header(image, state, header_offset, &header);
    if (status != ERROR_SUCCESS)
        return status;
    uint64_t blocks = vhd_round_up(size, state->block_size) / state->block_size;
    uint32_t max_entries = vd_be32(header.max_table_entries);
    if (blocks > VHD_MAX_BLOCKS)
        return vd_fail(ERROR_VHD_INVALID_SIZE, "%s: %llu bytes need %llu blocks, more than the supported %u",
                       image->path, (ull)size, (ull)blocks, (unsigned)VHD_MAX_BLOCKS);
    uint32_t *bat = malloc((size_t)blocks * sizeof *bat);
    uint8_t *raw = malloc((size_t)blocks * 4 + VHD_SECTOR);
    if (!bat || !raw) {
        free(bat);
        free(raw);
        return vd_fail(ERROR_OUTOFMEMORY, "%s: a BAT of %llu entries", image->path, (ull)blocks);
    }
    for (uint64_t i = 0; i < blocks; i++)
        bat[i] = i < state->block_count ? state->bat[i] : VHD_BAT_UNUSED;
    /* Entries past the old size are written even where the table already
       has them: whatever another writer left there must not come back as
       blocks of the larger disk. */
    uint64_t in_place = vhd_round_up((uint64_t)max_entries * 4, VHD_SECTOR) / 4;
    bool move = blocks > in_place;
    uint64_t table_offset = state->table_offset;
    uint64_t table_length = vhd_round_up(blocks * 4, VHD_SECTOR);
    uint64_t first_new = move ? 0 : state->block_count;
    if (move)
        status = vhd_make_room(image, table_length, &table_offset);
    memset(raw, 0xFF, table_length);
    for (uint64_t i = 0; i < blocks; i++)
        vd_put_be32(raw + 4 * i, bat[i]);
    if (status == ERROR_SUCCESS) {
        size_t length = move ? (size_t)table_length : (size_t)(blocks - first_new) * 4;
        int error = vd_pwrite_full(image->fd, raw + 4 * first_new, length, table_offset + 4 * first_new);
        if (!error)
            error = vhd_barrier(image);
        if (error)
            status = vd_fail_errno(error, "%s: writing the BAT at offset %llu", image->path, (ull)table_offset);
    }
    if (status == ERROR_SUCCESS && blocks > max_entries) {
        vd_put_be64(header.table_offset, table_offset);
        vd_put_be32(header.max_table_entries, (uint32_t)blocks);
        status = vhd_write_header(image, &header, header_offset);
    }
    free(raw);
    struct vhd_footer footer = state->footer;
    vd_put_be64(footer.current_size, size);
    vd_put_be32(footer.disk_geometry, vhd_geometry(size));
    if (status == ERROR_SUCCESS)
        status = vhd_write_footers(image, &footer);
    if (status != ERROR_SUCCESS) {
        free(bat);
        return status;
    }
    free(state->bat);
    state->bat = bat;
    state->block_count = (uint32_t)blocks;
    state->table_offset = table_offset;
    image->virtual_size = size;
    return ERROR_SUCCESS;
}

/* VHD only grows: its BAT has no way to say a block was given back. */
static DWORD vhd_resize(struct vd_image *image, uint64_t size, struct vd_job *job)
{
    struct vhd_state *state = image->state;
    if (size < image->virtual_size)
        return vd_fail(ERROR_VHD_INVALID_TYPE, "%s: a VHD cannot shrink (only VHDX can)", image->path);
    if (state->disk_type == VHD_TYPE_DIFFERENCING)
        return vd_fail(ERROR_VHD_INVALID_TYPE, "%s: a differencing VHD has its parent's size", image->path);
    if (size > VHD_MAX_SIZE)
        return vd_fail(ERROR_VHD_INVALID_SIZE, "%s: %llu bytes exceed the VHD limit of 2040 GiB", image->path,
                       (ull)size);
    if (size == image->virtual_size)
        return ERROR_SUCCESS;
    return state->disk_type == VHD_TYPE_FIXED ? vhd_grow_fixed(image, size, job) : vhd_grow_dynamic(image, size);
}

/* ---- probe --------------------------------------------------------------- */

/* The footer ends the file (511 bytes in images from before Virtual PC
   2004); dynamic and differencing disks also start with a copy of it, which
   still identifies a file whose end was lost. */
/* ---- compaction (compact.h) ---------------------------------------------- */

/* Flushes, and names what waits on it when that fails. */
static DWORD vhd_sync(struct vd_image *image, const char *before)
{
    return vd_fdatasync(image->fd) < 0 ? vd_fail_errno(errno, "%s: flushing before %s", image->path, before)
                                       : ERROR_SUCCESS;
}

/* The fixed places: the footer copy, the dynamic header, the whole BAT as
   the header sizes it, and every parent locator's data space (where
   set_parent may have put it: after the blocks too).  The units: every
   allocated block, its sector bitmap and data together. */
static DWORD vhd_compact_layout(struct vd_image *image, struct vd_compact_layout *layout)
{
    struct vhd_state *state = image->state;
    struct vhd_dynamic_header header;
    uint64_t header_offset = vd_be64(state->footer.data_offset);
    int error = vd_pread_full(image->fd, &header, sizeof header, header_offset);
    if (error)
        return vd_fail_errno(error, "%s: reading the dynamic header at offset %llu", image->path,
                             (ull)header_offset);
    layout->fixed = malloc((3 + VHD_LOCATOR_COUNT) * sizeof *layout->fixed);
    layout->units = malloc(((size_t)state->block_count + 1) * sizeof *layout->units);
    if (!layout->fixed || !layout->units)
        return vd_fail(ERROR_OUTOFMEMORY, "%s: the compaction's layout", image->path);
    size_t n = 0;
    layout->fixed[n++] = (struct vd_extent){0, VHD_FOOTER_SIZE};
    layout->fixed[n++] = (struct vd_extent){header_offset, VHD_HEADER_SIZE};
    layout->fixed[n++] = (struct vd_extent){state->table_offset,
                                            vhd_round_up((uint64_t)vd_be32(header.max_table_entries) * 4, VHD_SECTOR)};
    if (state->disk_type == VHD_TYPE_DIFFERENCING) {
        for (int i = 0; i < VHD_LOCATOR_COUNT; i++) {
            const struct vhd_parent_locator *locator = &header.parent_locator[i];
            uint32_t space = vd_be32(locator->platform_data_space);
            uint32_t length = vd_be32(locator->platform_data_length);
            uint64_t offset = vd_be64(locator->platform_data_offset);
            if (vd_be32(locator->platform_code) == 0 || offset == 0 || offset >= state->footer_offset)
                continue;
            /* Bytes or sectors (vhd_read_locator): the larger reading is kept. */
            uint64_t capacity = space >= length ? vhd_round_up(space, VHD_SECTOR) : (uint64_t)space * VHD_SECTOR;
            if (capacity > state->footer_offset - offset)
                capacity = state->footer_offset - offset;
            layout->fixed[n++] = (struct vd_extent){offset, capacity};
        }
    }
    layout->fixed_count = n;
    size_t units = 0;
    for (uint32_t block = 0; block < state->block_count; block++) {
        if (state->bat[block] == VHD_BAT_UNUSED)
            continue;
        uint64_t start = (uint64_t)block * state->block_size;
        uint64_t left = image->virtual_size - start;
        layout->units[units++] = (struct vd_compact_unit){
            .id = block,
            .file_offset = (uint64_t)state->bat[block] * VHD_SECTOR,
            .length = (uint64_t)state->bitmap_size + state->block_size,
            .virtual_offset = start,
            .virtual_length = left < state->block_size ? left : state->block_size,
            .kind = VD_UNIT_DATA,
        };
    }
    layout->unit_count = units;
    layout->alignment = VHD_SECTOR;
    layout->drop_shows_parent = state->disk_type == VHD_TYPE_DIFFERENCING;
    return ERROR_SUCCESS;
}

/* BAT entries in place, then a flush: each 4-byte entry lies inside one
   sector, whose write is atomic. */
static DWORD vhd_write_bat_entries(struct vd_image *image, const struct vd_compact_unit *units, size_t count)
{
    struct vhd_state *state = image->state;
    int error = 0;
    for (size_t i = 0; i < count && !error; i++) {
        uint8_t raw[4];
        vd_put_be32(raw, state->bat[units[i].id]);
        error = vd_pwrite_full(image->fd, raw, sizeof raw, state->table_offset + 4 * units[i].id);
    }
    if (error)
        return vd_fail_errno(error, "%s: writing BAT entries at offset %llu", image->path,
                             (ull)state->table_offset);
    return vhd_sync(image, "reusing the space of moved or dropped blocks");
}

/* The entries first, flushed; only then the blocks' space punched out of
   the file (a VHD never reuses it: without moves the host gets it back
   only so). */
static DWORD vhd_compact_drop(struct vd_image *image, const struct vd_compact_unit *units, size_t count)
{
    struct vhd_state *state = image->state;
    pthread_mutex_lock(&state->lock);
    for (size_t i = 0; i < count; i++)
        state->bat[units[i].id] = VHD_BAT_UNUSED;
    DWORD status = vhd_write_bat_entries(image, units, count);
    for (size_t i = 0; i < count && status == ERROR_SUCCESS; i++)
        status = vd_image_punch_unused(image, units[i].file_offset, units[i].length);
    pthread_mutex_unlock(&state->lock);
    return status;
}

/* Each block copied (bitmap and data), all of them flushed, then the BAT
   entries pointed at the copies and flushed. */
static DWORD vhd_compact_move(struct vd_image *image, const struct vd_compact_unit *units, const uint64_t *targets,
                              size_t count)
{
    struct vhd_state *state = image->state;
    uint64_t span = (uint64_t)state->bitmap_size + state->block_size;
    uint8_t *buffer = malloc(span);
    if (!buffer)
        return vd_fail(ERROR_OUTOFMEMORY, "%s: a block buffer", image->path);
    DWORD status = ERROR_SUCCESS;
    for (size_t i = 0; i < count && status == ERROR_SUCCESS; i++) {
        if (targets[i] % VHD_SECTOR || targets[i] / VHD_SECTOR >= VHD_BAT_UNUSED) {
            status = vd_fail(ERROR_INVALID_PARAMETER, "%s: a block cannot start at offset %llu", image->path,
                             (ull)targets[i]);
            break;
        }
        int error = vd_pread_full(image->fd, buffer, span, units[i].file_offset);
        if (!error)
            error = vd_pwrite_full(image->fd, buffer, span, targets[i]);
        if (error)
            status = vd_fail_errno(error, "%s: moving the block at offset %llu to %llu", image->path,
                                   (ull)units[i].file_offset, (ull)targets[i]);
    }
    free(buffer);
    if (status == ERROR_SUCCESS)
        status = vhd_sync(image, "pointing the BAT at moved blocks");
    if (status != ERROR_SUCCESS)
        return status;
    pthread_mutex_lock(&state->lock);
    for (size_t i = 0; i < count; i++)
        state->bat[units[i].id] = (uint32_t)(targets[i] / VHD_SECTOR);
    status = vhd_write_bat_entries(image, units, count);
    pthread_mutex_unlock(&state->lock);
    return status;
}

/* The footer written after the last block first and flushed, then the file
   cut after it: until the cut, the old footer still ends the file. */
static DWORD vhd_compact_truncate(struct vd_image *image, uint64_t end)
{
    struct vhd_state *state = image->state;
    uint64_t footer_offset = vhd_round_up(end, VHD_SECTOR);
    if (footer_offset >= state->footer_offset)
        return ERROR_SUCCESS;
    pthread_mutex_lock(&state->lock);
    int error = vd_pwrite_full(image->fd, &state->footer, sizeof state->footer, footer_offset);
    DWORD status = error ? vd_fail_errno(error, "%s: writing the footer at offset %llu", image->path,
                                         (ull)footer_offset)
                         : vhd_sync(image, "cutting the file after the last block");
    if (status == ERROR_SUCCESS && vd_ftruncate(image->fd, footer_offset + VHD_FOOTER_SIZE) < 0)
        status = vd_fail_errno(errno, "%s: cutting the file to %llu bytes", image->path,
                               (ull)(footer_offset + VHD_FOOTER_SIZE));
    if (status == ERROR_SUCCESS)
        status = vhd_sync(image, "reporting the compaction done");
    if (status == ERROR_SUCCESS) {
        state->footer_offset = footer_offset;
        image->file_size = footer_offset + VHD_FOOTER_SIZE;
    }
    pthread_mutex_unlock(&state->lock);
    return status;
}

static bool vhd_probe(const uint8_t *head, size_t head_length, const uint8_t *tail, size_t tail_length,
                      uint64_t file_size)
{
    if (tail_length >= VHD_FOOTER_SIZE && memcmp(tail + tail_length - VHD_FOOTER_SIZE, VHD_COOKIE, 8) == 0)
        return true;
    if (tail_length >= VHD_OLD_FOOTER_SIZE && memcmp(tail + tail_length - VHD_OLD_FOOTER_SIZE, VHD_COOKIE, 8) == 0)
        return true;
    return head_length >= VHD_FOOTER_SIZE && memcmp(head, VHD_COOKIE, 8) == 0;
}

const struct vd_format vd_format_vhd = {
    .name = "VHD",
    .device_id = VIRTUAL_STORAGE_TYPE_DEVICE_VHD,
    .probe = vhd_probe,
    .open = vhd_open,
    .create = vhd_create,
    .read = vhd_read,
    .write = vhd_write,
    .discard = vhd_discard,
    .write_zeroes = vhd_write_zeroes,
    .block_status = vhd_block_status,
    .set_identifier = vhd_set_identifier,
    .set_parent = vhd_set_parent,
    .set_physical_sector_size = vhd_set_physical_sector_size,
    .resize = vhd_resize,
    .close = vhd_close,
    .prepare_bulk_write = vhd_prepare_bulk_write,
    .flush = vhd_flush,
    .compact_layout = vhd_compact_layout,
    .compact_drop = vhd_compact_drop,
    .compact_move = vhd_compact_move,
    .compact_truncate = vhd_compact_truncate,
};
