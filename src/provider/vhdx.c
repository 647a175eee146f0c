/*
 * VHDX ([MS-VHDX] v1): probe, open with full verification, virtual-disk
 * read/write, and creation of fixed, dynamic and differencing images.
 *
 * File layout this module reads (offsets fixed by the spec) and writes:
 *
 *   0        file type identifier "vhdxfile" + creator (never rewritten)
 *   64 KiB   header 1        128 KiB  header 2       (4 KiB each, CRC-32C)
 *   192 KiB  region table 1  256 KiB  region table 2 (64 KiB each, CRC-32C)
 *   1 MiB    log (1 MiB, always empty in files made here)
 *   2 MiB    metadata region (1 MiB: table, then the items at +64 KiB)
 *   3 MiB    BAT (rounded up to 1 MiB), then payload blocks, 1 MiB aligned
 *
 * Error codes.  VirtDisk has no VHDX-specific codes, so corruption is mapped
 * by analogy with the VHD structures that play the same part:
 *   - file identifier and headers (identity, version, the DataWriteGuid) are
 *     what a VHD keeps in its footer: ERROR_VHD_DRIVE_FOOTER_CORRUPT (rather
 *     than ..._CHECKSUM_MISMATCH, because a header can also fail on its
 *     signature, and what matters is that no usable header is left);
 *   - the region table, metadata table and metadata items (where the BAT is,
 *     the block size, the parent linkage) are what a VHD keeps in its sparse
 *     header: ERROR_VHD_SPARSE_HEADER_CORRUPT;
 *   - a structure that lies past the end of the file: ERROR_VHD_INVALID_FILE_SIZE;
 *   - a region or metadata item we do not know but must understand:
 *     ERROR_VHD_FORMAT_UNKNOWN; a header version other than 1:
 *     ERROR_VHD_FORMAT_UNSUPPORTED_VERSION;
 *   - a log that would have to be replayed: ERROR_VHD_INVALID_STATE.
 * Every failure's detail names the structure and its file offset.
 *
 * Write ordering.  This module never writes the log, so every update is
 * ordered so that a crash at any point leaves a file that reads either the old
 * or the new data, never garbage:
 *   1. before the first data write of a session, both headers are rewritten
 *      (non-current copy first, each with the next sequence number) with new
 *      FileWriteGuid/DataWriteGuid and an empty log, and synced: differencing
 *      children linked to the old DataWriteGuid then notice that their parent
 *      changed, as the spec requires;
 *   2. a new block is allocated past the end of the file and its data written
 *      and synced before the BAT entry that points to it is written: a crash
 *      in between only leaks space past the end;
 *   3. in a differencing file, a partially written block's data is synced
 *      before its sector-bitmap bits are set, and a new sector-bitmap block
 *      is zeroed and synced before its BAT entry is written.
 */
#define _GNU_SOURCE
#include "image.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
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

/* ---- On-disk structures ([MS-VHDX] §2), byte arrays named as in the spec;
        all integers little-endian, converted with bytes.h where read. ---- */

#define KiB (1024ull)
#define MiB (1024ull * 1024)
#define TiB (1024ull * 1024 * 1024 * 1024)

enum {
    VHDX_FILE_ID_OFFSET = 0,
    VHDX_HEADER1_OFFSET = 64 * 1024,
    VHDX_HEADER2_OFFSET = 128 * 1024,
    VHDX_HEADER_SIZE = 4096,
    VHDX_REGION_TABLE1_OFFSET = 192 * 1024,
    VHDX_REGION_TABLE2_OFFSET = 256 * 1024,
    VHDX_REGION_TABLE_SIZE = 64 * 1024,
    VHDX_METADATA_TABLE_SIZE = 64 * 1024,
    VHDX_MAX_TABLE_ENTRIES = 2047,      /* region and metadata tables (§2.2.3, §2.6.1.1) */
    VHDX_MAX_METADATA_ITEM = 1024 * 1024,
    VHDX_LOG_ENTRY_ALIGN = 4096,
};

#define VHDX_ALIGN MiB                   /* regions, blocks, the log */
#define VHDX_MAX_VIRTUAL_SIZE (64 * TiB) /* §2.6.2.2 */
#define VHDX_MIN_BLOCK_SIZE MiB
#define VHDX_MAX_BLOCK_SIZE (256 * MiB)
/* Windows' default for a new VHDX ([MS-VHDX] §2.6.2.1 leaves it to the
   implementation); 2 MiB for differencing disks as Hyper-V uses [unverified]. */
#define VHDX_DEFAULT_BLOCK_SIZE (32 * MiB)
#define VHDX_DEFAULT_DIFF_BLOCK_SIZE (2 * MiB)
#define VHDX_SECTORS_PER_BITMAP (1ull << 23) /* sectors described by one 1 MiB SB block */
#define VHDX_MAX_CHAIN_DEPTH 256

struct vhdx_file_identifier {          /* §2.2.1 */
    uint8_t Signature[8];              /* "vhdxfile" */
    uint8_t Creator[512];              /* UTF-16LE, diagnostic only */
};

struct vhdx_header {                   /* §2.2.2 */
    uint8_t Signature[4];              /* "head" */
    uint8_t Checksum[4];               /* CRC-32C of the 4 KiB with this field 0 */
    uint8_t SequenceNumber[8];
    uint8_t FileWriteGuid[16];
    uint8_t DataWriteGuid[16];
    uint8_t LogGuid[16];
    uint8_t LogVersion[2];
    uint8_t Version[2];
    uint8_t LogLength[4];
    uint8_t LogOffset[8];
    uint8_t Reserved[4016];
};

struct vhdx_region_table_header {      /* §2.2.3.1 */
    uint8_t Signature[4];              /* "regi" */
    uint8_t Checksum[4];               /* CRC-32C of the 64 KiB table */
    uint8_t EntryCount[4];
    uint8_t Reserved[4];
};

struct vhdx_region_table_entry {       /* §2.2.3.2 */
    uint8_t Guid[16];
    uint8_t FileOffset[8];
    uint8_t Length[4];
    uint8_t Required[4];               /* bit 0 */
};

struct vhdx_log_entry_header {         /* §2.3.1.1 */
    uint8_t Signature[4];              /* "loge" */
    uint8_t Checksum[4];
    uint8_t EntryLength[4];
    uint8_t Tail[4];
    uint8_t SequenceNumber[8];
    uint8_t DescriptorCount[4];
    uint8_t Reserved[4];
    uint8_t LogGuid[16];
    uint8_t FlushedFileOffset[8];
    uint8_t LastFileOffset[8];
};

struct vhdx_metadata_table_header {    /* §2.6.1.1 */
    uint8_t Signature[8];              /* "metadata" */
    uint8_t Reserved[2];
    uint8_t EntryCount[2];
    uint8_t Reserved2[20];
};

struct vhdx_metadata_table_entry {     /* §2.6.1.2 */
    uint8_t ItemId[16];
    uint8_t Offset[4];                 /* from the start of the metadata region */
    uint8_t Length[4];
    uint8_t Flags[4];                  /* IsUser, IsVirtualDisk, IsRequired */
    uint8_t Reserved2[4];
};

struct vhdx_file_parameters {          /* §2.6.2.1 */
    uint8_t BlockSize[4];
    uint8_t Flags[4];                  /* LeaveBlockAllocated, HasParent */
};

struct vhdx_parent_locator_header {    /* §2.6.2.6.1 */
    uint8_t LocatorType[16];
    uint8_t Reserved[2];
    uint8_t KeyValueCount[2];
};

struct vhdx_parent_locator_entry {     /* §2.6.2.6.2; offsets from the item start */
    uint8_t KeyOffset[4];
    uint8_t ValueOffset[4];
    uint8_t KeyLength[2];
    uint8_t ValueLength[2];
};

_Static_assert(sizeof(struct vhdx_header) == VHDX_HEADER_SIZE, "header is 4 KiB");
_Static_assert(sizeof(struct vhdx_region_table_header) == 16, "region table header");
_Static_assert(sizeof(struct vhdx_region_table_entry) == 32, "region table entry");
_Static_assert(sizeof(struct vhdx_log_entry_header) == 64, "log entry header");
_Static_assert(sizeof(struct vhdx_metadata_table_header) == 32, "metadata table header");
_Static_assert(sizeof(struct vhdx_metadata_table_entry) == 32, "metadata table entry");
_Static_assert(sizeof(struct vhdx_parent_locator_header) == 20, "parent locator header");
_Static_assert(sizeof(struct vhdx_parent_locator_entry) == 12, "parent locator entry");

#define VHDX_REGION_REQUIRED 0x1u
#define VHDX_META_IS_USER 0x1u
#define VHDX_META_IS_VIRTUAL_DISK 0x2u
#define VHDX_META_IS_REQUIRED 0x4u
#define VHDX_PARAM_LEAVE_BLOCK_ALLOCATED 0x1u
#define VHDX_PARAM_HAS_PARENT 0x2u

/* BAT entries (§2.5.1): State in bits 0-2, FileOffsetMB in bits 20-63. */
#define VHDX_BAT_STATE_MASK 0x7ull
#define VHDX_BAT_OFFSET_MASK 0xFFFFFFFFFFF00000ull
enum {
    PAYLOAD_BLOCK_NOT_PRESENT = 0,
    PAYLOAD_BLOCK_UNDEFINED = 1,
    PAYLOAD_BLOCK_ZERO = 2,
    PAYLOAD_BLOCK_UNMAPPED = 3,
    PAYLOAD_BLOCK_FULLY_PRESENT = 6,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7,
    SB_BLOCK_NOT_PRESENT = 0,
    SB_BLOCK_PRESENT = 6,
};

/* The well-known GUIDs, in host form (vd_guid_from_le_bytes of the disk form). */
static const GUID vhdx_region_bat = {0x2DC27766, 0xF623, 0x4200, {0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08}};
static const GUID vhdx_region_metadata = {0x8B7CA206, 0x4790, 0x4B9A, {0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E}};
static const GUID vhdx_item_file_parameters = {0xCAA16737, 0xFA36, 0x4D43, {0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B}};
static const GUID vhdx_item_virtual_disk_size = {0x2FA54224, 0xCD1B, 0x4876, {0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8}};
static const GUID vhdx_item_page83 = {0xBECA12AB, 0xB2E6, 0x4523, {0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46}};
static const GUID vhdx_item_logical_sector_size = {0x8141BF1D, 0xA96F, 0x4709, {0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F}};
static const GUID vhdx_item_physical_sector_size = {0xCDA348C7, 0x445D, 0x4471, {0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56}};
static const GUID vhdx_item_parent_locator = {0xA8D35F2D, 0xB30B, 0x454D, {0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C}};
static const GUID vhdx_locator_type_vhdx = {0xB04AEFB7, 0xD19E, 0x4A81, {0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13}};

/* ---- In-memory state ---- */

struct vhdx_state {
    uint32_t block_size;
    uint32_t logical_sector_size;
    uint32_t chunk_ratio;          /* payload blocks per sector-bitmap block */
    bool has_parent;
    uint64_t payload_blocks;

    uint64_t bat_offset;           /* file offset of the BAT region */
    uint64_t bat_entries;
    uint64_t *bat;                 /* host order; read and written atomically */

    /* The current header as read (raw), and which slot holds it, for the
       header update before the first write of a session. */
    uint8_t header[VHDX_HEADER_SIZE];
    int current_header;            /* 0: 64 KiB, 1: 128 KiB */
    uint64_t sequence_number;

    pthread_mutex_t lock;          /* serialises header updates and allocation */
    bool session_guids_written;
    uint64_t file_end;             /* where the next block goes, 1 MiB aligned */
};

/* ---- Small helpers ---- */

static uint64_t round_up(uint64_t value, uint64_t align) { return (value + align - 1) / align * align; }
static bool is_power_of_two(uint64_t v) { return v && !(v & (v - 1)); }
static unsigned long long ull(uint64_t v) { return (unsigned long long)v; }

/* "{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}" for messages. */
struct guid_text { char s[39]; };
static struct guid_text guid_text(const GUID *g, bool lower)
{
    struct guid_text t;
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

/* Parses "{8-4-4-4-12}" (braces required, as §2.6.2.6.3 writes parent_linkage). */
static bool guid_parse(const char *text, GUID *out)
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

static uint32_t bat_state(uint64_t entry) { return (uint32_t)(entry & VHDX_BAT_STATE_MASK); }
static uint64_t bat_file_offset(uint64_t entry) { return entry & VHDX_BAT_OFFSET_MASK; }

/* BAT index of payload block i and of the sector bitmap of chunk k (§2.5). */
static uint64_t payload_entry(const struct vhdx_state *s, uint64_t block)
{
    return block + block / s->chunk_ratio;
}
static uint64_t bitmap_entry(const struct vhdx_state *s, uint64_t chunk)
{
    return chunk * (s->chunk_ratio + 1ull) + s->chunk_ratio;
}

static uint64_t bat_load(const struct vhdx_state *s, uint64_t index)
{
    return __atomic_load_n(&s->bat[index], __ATOMIC_ACQUIRE);
}

static bool header_crc_ok(const uint8_t *buffer, size_t length, size_t checksum_offset)
{
    uint32_t stored = vd_le32(buffer + checksum_offset);
    static const uint8_t zero[4];
    uint32_t crc = vd_crc32c(0, buffer, checksum_offset);
    crc = vd_crc32c(crc, zero, 4);
    crc = vd_crc32c(crc, buffer + checksum_offset + 4, length - checksum_offset - 4);
    return crc == stored;
}

static void set_crc(uint8_t *buffer, size_t length, size_t checksum_offset)
{
    vd_put_le32(buffer + checksum_offset, 0);
    vd_put_le32(buffer + checksum_offset, vd_crc32c(0, buffer, length));
}

static DWORD read_at(struct vd_image *image, void *buffer, size_t length, uint64_t offset,
                     const char *what)
{
    if (offset > image->file_size || length > image->file_size - offset)
        return vd_fail(ERROR_VHD_INVALID_FILE_SIZE,
                       "%s at offset %llu (%llu bytes) extends past the end of the file (%llu bytes)",
                       what, ull(offset), ull(length), ull(image->file_size));
    int error = vd_pread_full(image->fd, buffer, length, offset);
    if (error)
        return vd_fail_errno(error, "reading %s at offset %llu", what, ull(offset));
    return ERROR_SUCCESS;
}

/* ---- probe ---- */

static bool vhdx_probe(const uint8_t *head, size_t head_length, const uint8_t *tail,
                       size_t tail_length, uint64_t file_size)
{
    return head_length >= 8 && memcmp(head, "vhdxfile", 8) == 0;
}

/* ---- open: headers and log ---- */

static bool header_valid(const uint8_t *h)
{
    const struct vhdx_header *header = (const void *)h;
    return memcmp(header->Signature, "head", 4) == 0
           && header_crc_ok(h, VHDX_HEADER_SIZE, offsetof(struct vhdx_header, Checksum));
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
        DWORD status = read_at(image, copies[i], VHDX_HEADER_SIZE, offsets[i], "VHDX header");
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

/* Does the log hold an entry that belongs to the header's LogGuid?  Such an
   entry may describe metadata or data updates that never reached their final
   place, so the file must not be read before the log is replayed.  We do not
   replay; we only tell an empty log (no entry of this LogGuid with a valid
   checksum, which §2.3.3 treats as empty) from a non-empty one. */
static DWORD check_log(struct vd_image *image, struct vhdx_state *s)
{
    const struct vhdx_header *h = (const void *)s->header;
    uint64_t header_offset = s->current_header ? VHDX_HEADER2_OFFSET : VHDX_HEADER1_OFFSET;
    GUID log_guid = vd_guid_from_le_bytes(h->LogGuid);
    uint64_t log_offset = vd_le64(h->LogOffset);
    uint64_t log_length = vd_le32(h->LogLength);

    if (vd_guid_is_zero(&log_guid))
        return ERROR_SUCCESS;
    if (log_offset % VHDX_ALIGN || log_offset < VHDX_ALIGN || log_length % VHDX_ALIGN
        || log_length == 0)
        return vd_fail(ERROR_VHD_DRIVE_FOOTER_CORRUPT,
                       "VHDX header at offset %llu: log at %llu (%llu bytes) is not 1 MiB aligned",
                       ull(header_offset), ull(log_offset), ull(log_length));
    if (log_offset > image->file_size || log_length > image->file_size - log_offset)
        return vd_fail(ERROR_VHD_INVALID_FILE_SIZE,
                       "VHDX log at offset %llu (%llu bytes) extends past the end of the file "
                       "(%llu bytes)", ull(log_offset), ull(log_length), ull(image->file_size));

    enum { CHUNK = 64 * 1024 };
    uint8_t *buffer = malloc(CHUNK);
    if (!buffer)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a buffer to scan the VHDX log");
    DWORD status = ERROR_SUCCESS;
    for (uint64_t pos = 0; pos < log_length && status == ERROR_SUCCESS; pos += VHDX_LOG_ENTRY_ALIGN) {
        struct vhdx_log_entry_header e;
        status = read_at(image, &e, sizeof e, log_offset + pos, "VHDX log entry");
        if (status != ERROR_SUCCESS)
            break;
        GUID entry_guid = vd_guid_from_le_bytes(e.LogGuid);
        if (memcmp(e.Signature, "loge", 4) != 0 || !vd_guid_equal(&entry_guid, &log_guid))
            continue;
        uint64_t entry_length = vd_le32(e.EntryLength);
        /* An entry that wraps around the end of the circular log cannot be
           checked here without replay logic; count it as live (refuse). */
        bool live = true;
        if (entry_length >= VHDX_LOG_ENTRY_ALIGN && entry_length % VHDX_LOG_ENTRY_ALIGN == 0
            && entry_length <= log_length - pos) {
            uint32_t crc = 0;
            for (uint64_t done = 0; done < entry_length && status == ERROR_SUCCESS;) {
                size_t n = entry_length - done < CHUNK ? (size_t)(entry_length - done) : CHUNK;
                status = read_at(image, buffer, n, log_offset + pos + done, "VHDX log entry");
                if (status != ERROR_SUCCESS)
                    break;
                if (done == 0)
                    vd_put_le32(buffer + offsetof(struct vhdx_log_entry_header, Checksum), 0);
                crc = vd_crc32c(crc, buffer, n);
                done += n;
            }
            live = crc == vd_le32(e.Checksum);
        } else if (entry_length < VHDX_LOG_ENTRY_ALIGN || entry_length % VHDX_LOG_ENTRY_ALIGN) {
            live = false; /* not a well-formed entry: torn or stale */
        }
        if (status == ERROR_SUCCESS && live)
            status = vd_fail(ERROR_VHD_INVALID_STATE,
                             "VHDX log at offset %llu holds entries (first at %llu) that must be "
                             "replayed before the disk can be used; replay it by opening the "
                             "disk with Hyper-V or with 'qemu-img check -r all'",
                             ull(log_offset), ull(log_offset + pos));
    }
    free(buffer);
    return status;
}

/* ---- open: region table ---- */

struct vhdx_regions {
    uint64_t bat_offset, metadata_offset;
    uint32_t bat_length, metadata_length;
};

static DWORD check_region_table(const uint8_t *table, uint64_t table_offset)
{
    const struct vhdx_region_table_header *rh = (const void *)table;
    if (memcmp(rh->Signature, "regi", 4) != 0)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "VHDX region table at offset %llu: bad signature", ull(table_offset));
    if (!header_crc_ok(table, VHDX_REGION_TABLE_SIZE, offsetof(struct vhdx_region_table_header, Checksum)))
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "VHDX region table at offset %llu: CRC-32C mismatch", ull(table_offset));
    if (vd_le32(rh->EntryCount) > VHDX_MAX_TABLE_ENTRIES)
        return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                       "VHDX region table at offset %llu: %u entries (at most %d)",
                       ull(table_offset), vd_le32(rh->EntryCount), VHDX_MAX_TABLE_ENTRIES);
    return ERROR_SUCCESS;
}

static DWORD read_region_table(struct vd_image *image, struct vhdx_regions *regions)
{
    static const uint64_t offsets[2] = {VHDX_REGION_TABLE1_OFFSET, VHDX_REGION_TABLE2_OFFSET};
    uint8_t *table = malloc(VHDX_REGION_TABLE_SIZE);
    if (!table)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX region table");

    /* The two copies must be identical (§2.2.3); the second is the fallback
       for a torn or corrupted first copy. */
    DWORD status = ERROR_SUCCESS;
    uint64_t table_offset = 0;
    for (int i = 0; i < 2; i++) {
        table_offset = offsets[i];
        status = read_at(image, table, VHDX_REGION_TABLE_SIZE, table_offset, "VHDX region table");
        if (status == ERROR_SUCCESS)
            status = check_region_table(table, table_offset);
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
                                 "marked required", ull(entry_offset), guid_text(&guid, false).s);
            continue; /* optional regions we do not know are ignored (§2.2.3.2) */
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
                             ull(table_offset), guid_text(&guid, false).s);
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

struct vhdx_metadata {
    uint32_t block_size;
    uint32_t file_flags;
    uint64_t virtual_disk_size;
    GUID page83;
    uint32_t logical_sector_size;
    uint32_t physical_sector_size;
    uint64_t parent_locator_offset; /* file offset, 0 when absent */
    uint32_t parent_locator_length;
};

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
    DWORD status = read_at(image, table, VHDX_METADATA_TABLE_SIZE, region, "VHDX metadata table");
    const struct vhdx_metadata_table_header *mh = (const void *)table;
    if (status == ERROR_SUCCESS && memcmp(mh->Signature, "metadata", 8) != 0)
        status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                         "VHDX metadata table at offset %llu: bad signature", ull(region));
    if (status == ERROR_SUCCESS && vd_le16(mh->EntryCount) > VHDX_MAX_TABLE_ENTRIES)
        status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                         "VHDX metadata table at offset %llu: %u entries (at most %d)", ull(region),
                         vd_le16(mh->EntryCount), VHDX_MAX_TABLE_ENTRIES);

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
                             guid_text(&id, false).s, offset, length, regions->metadata_length);
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
                                 "required", ull(entry_offset), guid_text(&id, false).s);
            continue;
        }
        if (known->found)
            status = vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                             "VHDX metadata table at offset %llu: item %s (%s) listed twice",
                             ull(region), known->name, guid_text(&id, false).s);
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
                           ull(region), items[k].name, guid_text(items[k].id, false).s);

    struct vhdx_file_parameters fp;
    uint8_t size[8], page83[16], logical[4], physical[4];
    if ((status = read_at(image, &fp, sizeof fp, items[FILE_PARAMETERS].offset, "VHDX File Parameters")) ||
        (status = read_at(image, size, 8, items[VIRTUAL_DISK_SIZE].offset, "VHDX Virtual Disk Size")) ||
        (status = read_at(image, page83, 16, items[PAGE83].offset, "VHDX Page 83 Data")) ||
        (status = read_at(image, logical, 4, items[LOGICAL_SECTOR].offset, "VHDX Logical Sector Size")) ||
        (status = read_at(image, physical, 4, items[PHYSICAL_SECTOR].offset, "VHDX Physical Sector Size")))
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
        || !is_power_of_two(md->block_size))
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
static uint64_t block_bytes_used(const struct vd_image *image, const struct vhdx_state *s, uint64_t block)
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
    DWORD status = read_at(image, s->bat, bytes, s->bat_offset, "VHDX BAT");
    if (status != ERROR_SUCCESS)
        return status;
    for (uint64_t i = 0; i < s->bat_entries; i++) {
        uint64_t entry = vd_le64((const uint8_t *)s->bat + i * 8);
        s->bat[i] = entry;
    }

    /* Every state must be valid for this disk type (§2.5.1.1, §2.5.1.2) and
       every allocated block inside the file, so read() never has to check. */
    for (uint64_t i = 0; i < s->bat_entries; i++) {
        uint64_t entry = s->bat[i], off = bat_file_offset(entry);
        uint32_t state = bat_state(entry);
        bool is_bitmap = i % (s->chunk_ratio + 1ull) == s->chunk_ratio;
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
            uint64_t block = i - i / (s->chunk_ratio + 1ull);
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
                    uint64_t sb = bitmap_entry(s, block / s->chunk_ratio);
                    if (bat_state(s->bat[sb]) != SB_BLOCK_PRESENT) {
                        problem = "partially present block without a sector bitmap";
                        goto bad;
                    }
                }
                needed = block_bytes_used(image, s, block);
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
static void find_flat_mapping(struct vd_image *image, const struct vhdx_state *s)
{
    uint64_t base = bat_file_offset(s->bat[payload_entry(s, 0)]);
    image->flat = false;
    for (uint64_t b = 0; b < s->payload_blocks; b++) {
        uint64_t entry = s->bat[payload_entry(s, b)];
        if (bat_state(entry) != PAYLOAD_BLOCK_FULLY_PRESENT
            || bat_file_offset(entry) != base + b * s->block_size)
            return;
    }
    image->flat = true;
    image->flat_offset = base;
}

/* ---- open: parent locator and parent ---- */

struct vhdx_locator {
    GUID linkage, linkage2;
    bool has_linkage2;
    char *relative_path, *volume_path, *absolute_win32_path;
};

static void locator_free(struct vhdx_locator *l)
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

static DWORD parse_parent_locator(struct vd_image *image, const struct vhdx_metadata *md,
                                  struct vhdx_locator *loc)
{
    uint64_t item = md->parent_locator_offset;
    uint32_t length = md->parent_locator_length; /* ≤ 1 MiB, checked with the table */
    uint8_t *data = malloc(length);
    if (!data)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX parent locator");
    DWORD status = read_at(image, data, length, item, "VHDX parent locator");
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
                         guid_text(&type, false).s);
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
            if (!guid_parse(value, second ? &loc->linkage2 : &loc->linkage))
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
static DWORD build_parent_locations(struct vd_image *image, const struct vhdx_locator *loc)
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
                           image->path, path, guid_text(&parent->identifier, true).s,
                           guid_text(&loc->linkage, true).s);
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

/* ---- open ---- */

static DWORD vhdx_open(struct vd_image *image)
{
    struct vhdx_state *s = calloc(1, sizeof *s);
    if (!s)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating VHDX state");
    pthread_mutex_init(&s->lock, NULL);
    image->state = s; /* freed by vhdx_close(), also when open fails */

    struct vhdx_file_identifier id;
    DWORD status = read_at(image, &id, sizeof id, VHDX_FILE_ID_OFFSET, "VHDX file identifier");
    if (status != ERROR_SUCCESS)
        return status;
    if (memcmp(id.Signature, "vhdxfile", 8) != 0)
        return vd_fail(ERROR_VHD_DRIVE_FOOTER_CORRUPT,
                       "VHDX file identifier at offset 0: signature is not \"vhdxfile\"");

    struct vhdx_regions regions = {0};
    struct vhdx_metadata md = {0};
    if ((status = read_headers(image, s)) || (status = check_log(image, s))
        || (status = read_region_table(image, &regions)) || (status = read_metadata(image, &regions, &md)))
        return status;

    s->block_size = md.block_size;
    s->logical_sector_size = md.logical_sector_size;
    s->has_parent = md.file_flags & VHDX_PARAM_HAS_PARENT;
    s->chunk_ratio = (uint32_t)((VHDX_SECTORS_PER_BITMAP * md.logical_sector_size) / md.block_size);
    s->payload_blocks = (md.virtual_disk_size + md.block_size - 1) / md.block_size;
    s->file_end = round_up(image->file_size, VHDX_ALIGN);

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

    if ((status = read_bat(image, s, &regions)))
        return status;
    find_flat_mapping(image, s);

    if (!s->has_parent)
        return ERROR_SUCCESS;

    struct vhdx_locator loc = {0};
    status = parse_parent_locator(image, &md, &loc);
    if (status == ERROR_SUCCESS) {
        image->parent_identifier = loc.linkage;
        status = build_parent_locations(image, &loc);
    }
    if (status == ERROR_SUCCESS && !(image->open_flags & OPEN_VIRTUAL_DISK_FLAG_NO_PARENTS))
        status = open_parent(image, s, &loc);
    locator_free(&loc);
    return status;
}

static void vhdx_close(struct vd_image *image)
{
    struct vhdx_state *s = image->state;
    pthread_mutex_destroy(&s->lock);
    free(s->bat);
    free(s);
    image->state = NULL;
}

/* ---- read ---- */

static DWORD read_parent(struct vd_image *image, uint8_t *buffer, uint64_t offset, size_t length)
{
    if (!image->parent)
        return vd_fail(ERROR_VHD_PARENT_VHD_NOT_FOUND,
                       "%s: reading %zu bytes at %llu needs the parent, which was not opened "
                       "(OPEN_VIRTUAL_DISK_FLAG_NO_PARENTS)", image->path, length, ull(offset));
    return image->parent->format->read(image->parent, buffer, offset, length);
}

static DWORD read_file(struct vd_image *image, void *buffer, size_t length, uint64_t file_offset)
{
    int error = vd_pread_full(image->fd, buffer, length, file_offset);
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
    uint64_t sb_entry = bat_load(s, bitmap_entry(s, block / s->chunk_ratio));
    uint64_t first = offset / ss, last = (offset + length - 1) / ss; /* virtual sectors */
    uint64_t chunk_first = block / s->chunk_ratio * s->chunk_ratio * (s->block_size / ss);
    uint64_t bit0 = first - chunk_first;
    uint64_t nbytes = (last - chunk_first) / 8 - bit0 / 8 + 1; /* ≤ block_size/ss/8 + 1 */
    uint8_t *bits = malloc(nbytes);
    if (!bits)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a sector bitmap buffer");
    DWORD status = read_file(image, bits, nbytes, bat_file_offset(sb_entry) + bit0 / 8);

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
            status = read_file(image, out, to - from, data_offset + (from - block_start));
        else
            status = read_parent(image, out, from, to - from);
        sector = run_end;
    }
    free(bits);
    return status;
}

static DWORD vhdx_read(struct vd_image *image, void *buffer, uint64_t offset, size_t length)
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
        uint64_t entry = bat_load(s, payload_entry(s, block));
        DWORD status = ERROR_SUCCESS;
        switch (bat_state(entry)) {
        case PAYLOAD_BLOCK_FULLY_PRESENT:
            status = read_file(image, out, n, bat_file_offset(entry) + in_block);
            break;
        case PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            status = read_partial(image, s, block, bat_file_offset(entry), out, offset, n);
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
static DWORD vhdx_block_status(struct vd_image *image, uint64_t offset, uint64_t length,
                               enum vd_block_state *state, uint64_t *run)
{
    struct vhdx_state *s = image->state;
    if (length == 0 || offset > image->virtual_size || length > image->virtual_size - offset)
        return vd_fail(ERROR_INVALID_PARAMETER, "block status of %llu bytes at %llu", ull(length), ull(offset));
    uint64_t block = offset / s->block_size, in_block = offset % s->block_size;
    *run = s->block_size - in_block < length ? s->block_size - in_block : length;
    switch (bat_state(bat_load(s, payload_entry(s, block)))) {
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

static DWORD write_file(struct vd_image *image, const void *buffer, size_t length, uint64_t file_offset)
{
    int error = vd_pwrite_full(image->fd, buffer, length, file_offset);
    if (error)
        return vd_fail_errno(error, "%s: writing %zu bytes at file offset %llu", image->path,
                             length, ull(file_offset));
    return ERROR_SUCCESS;
}

/* The barrier of the write ordering described at the top of this file. */
static DWORD sync_file(struct vd_image *image, const char *before)
{
    if (fdatasync(image->fd) < 0)
        return vd_fail_errno(errno, "%s: flushing before %s", image->path, before);
    return ERROR_SUCCESS;
}

static DWORD write_bat_entry(struct vd_image *image, struct vhdx_state *s, uint64_t index, uint64_t entry)
{
    uint8_t raw[8];
    vd_put_le64(raw, entry);
    DWORD status = write_file(image, raw, 8, s->bat_offset + index * 8);
    if (status == ERROR_SUCCESS)
        status = sync_file(image, "using the new BAT entry");
    if (status == ERROR_SUCCESS)
        __atomic_store_n(&s->bat[index], entry, __ATOMIC_RELEASE);
    return status;
}

/* Both header copies with a new FileWriteGuid and the given DataWriteGuid:
   the non-current copy first, each with the next sequence number and
   flushed, so a torn write leaves the old current header in charge.  The
   log is known to be empty (check_log), so LogGuid is cleared as well. */
static DWORD write_headers(struct vd_image *image, struct vhdx_state *s, const GUID *data_write)
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
    memset(header->LogGuid, 0, sizeof header->LogGuid);
    for (int i = 1; i <= 2; i++) {
        int slot = (s->current_header + i) % 2;
        uint64_t offset = slot ? VHDX_HEADER2_OFFSET : VHDX_HEADER1_OFFSET;
        vd_put_le64(header->SequenceNumber, s->sequence_number + 1);
        set_crc(h, sizeof h, offsetof(struct vhdx_header, Checksum));
        DWORD status = write_file(image, h, sizeof h, offset);
        if (status == ERROR_SUCCESS)
            status = sync_file(image, "writing data after the header update");
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
static DWORD update_headers(struct vd_image *image, struct vhdx_state *s)
{
    GUID data_write;
    int error = vd_guid_generate(&data_write);
    if (error)
        return vd_fail_errno(error, "generating a VHDX DataWriteGuid");
    return write_headers(image, s, &data_write);
}

/* size bytes of zeros past the end of the file, 1 MiB aligned.  fallocate
   makes ENOSPC show up here rather than at some later write. */
static DWORD allocate(struct vd_image *image, struct vhdx_state *s, uint64_t size, uint64_t *offset)
{
    uint64_t at = s->file_end;
    if (fallocate(image->fd, 0, (off_t)at, (off_t)size) < 0) {
        if (errno != EOPNOTSUPP && errno != ENOSYS)
            return vd_fail_errno(errno, "%s: allocating a %llu-byte VHDX block at %llu",
                                 image->path, ull(size), ull(at));
        if (ftruncate(image->fd, (off_t)(at + size)) < 0)
            return vd_fail_errno(errno, "%s: extending the file to %llu bytes", image->path,
                                 ull(at + size));
    }
    s->file_end = round_up(at + size, VHDX_ALIGN);
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
    uint64_t start = offset / ss * ss, end = round_up(offset + length, ss);
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

/* Sets (or, with exact, sets exactly) the bitmap bits of the sectors
   [offset, offset + length) of block `block`.  With exact the whole slice of
   the block is written, which also clears bits a crashed earlier allocation
   of the same block may have left behind. */
static DWORD set_bitmap_bits(struct vd_image *image, struct vhdx_state *s, uint64_t block,
                             uint64_t offset, uint64_t length, bool exact)
{
    uint64_t ss = s->logical_sector_size;
    uint64_t sectors_per_block = s->block_size / ss; /* ≥ 256: whole bytes */
    uint64_t sb = bat_file_offset(bat_load(s, bitmap_entry(s, block / s->chunk_ratio)));
    uint64_t slice = sb + (block % s->chunk_ratio) * sectors_per_block / 8;
    uint64_t first = offset / ss - block * sectors_per_block, count = length / ss;
    uint64_t from = exact ? 0 : first / 8;
    uint64_t to = exact ? sectors_per_block / 8 : (first + count - 1) / 8 + 1;
    uint8_t *bits = calloc(1, to - from);
    if (!bits)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a sector bitmap buffer");
    DWORD status = exact ? ERROR_SUCCESS : read_file(image, bits, to - from, slice + from);
    for (uint64_t i = first; i < first + count && status == ERROR_SUCCESS; i++)
        bits[i / 8 - from] |= (uint8_t)(1u << (i % 8));
    if (status == ERROR_SUCCESS)
        status = write_file(image, bits, to - from, slice + from);
    free(bits);
    return status;
}

/* A differencing block that is not yet in the file receives less than a
   whole block: only the written sectors go into it, the rest stays with the
   parent through the sector bitmap (copying the parent's whole block would
   cost up to 256 MiB per small write). */
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

    uint64_t sb_index = bitmap_entry(s, block / s->chunk_ratio), at;
    if (bat_state(bat_load(s, sb_index)) != SB_BLOCK_PRESENT) {
        status = allocate(image, s, MiB, &at);
        if (status == ERROR_SUCCESS)
            status = sync_file(image, "using a new sector bitmap block");
        if (status == ERROR_SUCCESS)
            status = write_bat_entry(image, s, sb_index, at | SB_BLOCK_PRESENT);
    }
    if (status == ERROR_SUCCESS)
        status = allocate(image, s, s->block_size, &at);
    if (status == ERROR_SUCCESS)
        status = write_file(image, aligned, alen, at + (aoff - block * s->block_size));
    if (status == ERROR_SUCCESS)
        status = set_bitmap_bits(image, s, block, aoff, alen, true);
    if (status == ERROR_SUCCESS)
        status = sync_file(image, "using the new block");
    if (status == ERROR_SUCCESS)
        status = write_bat_entry(image, s, payload_entry(s, block), at | PAYLOAD_BLOCK_PARTIALLY_PRESENT);
    free(owned);
    return status;
}

static DWORD write_existing_partial(struct vd_image *image, struct vhdx_state *s, uint64_t block,
                                    uint64_t data_offset, const uint8_t *data, uint64_t offset,
                                    size_t length)
{
    const uint8_t *aligned;
    uint64_t aoff;
    size_t alen;
    uint8_t *owned;
    DWORD status = align_to_sectors(image, s, data, offset, length, &aligned, &aoff, &alen, &owned);
    if (status == ERROR_SUCCESS)
        status = write_file(image, aligned, alen, data_offset + (aoff - block * s->block_size));
    if (status == ERROR_SUCCESS)
        status = sync_file(image, "marking the sectors present");
    if (status == ERROR_SUCCESS)
        status = set_bitmap_bits(image, s, block, aoff, alen, false);
    free(owned);
    return status;
}

/* Everything but a present block: a new block that is complete by itself,
   because what it replaces reads as zeros (or the write covers all of it). */
static DWORD write_new_full(struct vd_image *image, struct vhdx_state *s, uint64_t block,
                            const uint8_t *data, uint64_t in_block, size_t length)
{
    uint64_t at;
    DWORD status = allocate(image, s, s->block_size, &at);
    if (status == ERROR_SUCCESS)
        status = write_file(image, data, length, at + in_block);
    if (status == ERROR_SUCCESS)
        status = sync_file(image, "using the new block");
    if (status == ERROR_SUCCESS)
        status = write_bat_entry(image, s, payload_entry(s, block), at | PAYLOAD_BLOCK_FULLY_PRESENT);
    return status;
}

static DWORD write_block(struct vd_image *image, struct vhdx_state *s, uint64_t block,
                         const uint8_t *data, uint64_t offset, size_t length)
{
    uint64_t in_block = offset - block * s->block_size;
    uint64_t entry = bat_load(s, payload_entry(s, block));
    if (bat_state(entry) == PAYLOAD_BLOCK_FULLY_PRESENT)
        return write_file(image, data, length, bat_file_offset(entry) + in_block);

    /* Block state changes are serialised; re-read the entry under the lock
       since another writer may just have allocated this block. */
    pthread_mutex_lock(&s->lock);
    DWORD status;
    entry = bat_load(s, payload_entry(s, block));
    switch (bat_state(entry)) {
    case PAYLOAD_BLOCK_FULLY_PRESENT:
        status = write_file(image, data, length, bat_file_offset(entry) + in_block);
        break;
    case PAYLOAD_BLOCK_PARTIALLY_PRESENT:
        status = write_existing_partial(image, s, block, bat_file_offset(entry), data, offset, length);
        break;
    case PAYLOAD_BLOCK_NOT_PRESENT:
        if (s->has_parent && length < block_bytes_used(image, s, block)) {
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

static DWORD vhdx_write(struct vd_image *image, const void *buffer, uint64_t offset, size_t length)
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
    DWORD status = s->session_guids_written ? ERROR_SUCCESS : update_headers(image, s);
    pthread_mutex_unlock(&s->lock);

    while (length > 0 && status == ERROR_SUCCESS) {
        uint64_t block = offset / s->block_size, in_block = offset % s->block_size;
        size_t n = s->block_size - in_block < length ? (size_t)(s->block_size - in_block) : length;
        status = write_block(image, s, block, data, offset, n);
        data += n;
        offset += n;
        length -= n;
    }
    return status;
}

static DWORD vhdx_prepare_direct_write(struct vd_image *image)
{
    struct vhdx_state *s = image->state;
    if (!image->writable)
        return vd_fail(ERROR_ACCESS_DENIED, "%s is open read-only", image->path);
    pthread_mutex_lock(&s->lock);
    DWORD status = s->session_guids_written ? ERROR_SUCCESS : update_headers(image, s);
    pthread_mutex_unlock(&s->lock);
    return status;
}

/* Every write above orders its metadata with its own barriers; what is left
   is the data of writes into blocks that were already present. */
static DWORD vhdx_flush(struct vd_image *image)
{
    return sync_file(image, "reporting the disk flushed");
}

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
static DWORD build_locator(const struct vd_create_request *r, uint8_t *item, uint32_t capacity,
                           uint32_t *length)
{
    struct vd_image *parent = r->parent;
    char *relative = relative_path(r->path, parent->path);
    if (!relative)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the parent's relative path");
    const char *pairs[3][2] = {
        {"parent_linkage", guid_text(&parent->identifier, true).s},
        {"relative_path", relative},
        {"absolute_win32_path", parent->path},
    };
    char linkage[39];
    snprintf(linkage, sizeof linkage, "%s", guid_text(&parent->identifier, true).s);
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
        status = build_locator(r, region + locator_at, CREATE_METADATA_LENGTH - locator_at,
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
    if (fallocate(fd, 0, (off_t)offset, (off_t)length) == 0)
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

static DWORD vhdx_create(int fd, const struct vd_create_request *r)
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
    if (block_size < VHDX_MIN_BLOCK_SIZE || block_size > VHDX_MAX_BLOCK_SIZE || !is_power_of_two(block_size))
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
    uint64_t bat_length = round_up(entries * 8, VHDX_ALIGN);
    uint64_t data_start = CREATE_BAT_OFFSET + bat_length;
    uint32_t file_flags = parent ? VHDX_PARAM_HAS_PARENT : r->fixed ? VHDX_PARAM_LEAVE_BLOCK_ALLOCATED : 0;

    /* Everything up to the payload, zero-filled; the structures below are
       written over it. */
    if (ftruncate(fd, (off_t)data_start) < 0)
        return vd_fail_errno(errno, "sizing the new VHDX file to %llu bytes", ull(data_start));
    DWORD status = ERROR_SUCCESS;
    if (r->fixed && r->sparse && ftruncate(fd, (off_t)(data_start + payload_blocks * block_size)) < 0)
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
    set_crc(table, VHDX_REGION_TABLE_SIZE, offsetof(struct vhdx_region_table_header, Checksum));
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
        set_crc(h, sizeof h, offsetof(struct vhdx_header, Checksum));
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
    DWORD status = read_region_table(image, regions);
    if (status != ERROR_SUCCESS)
        return status;
    uint8_t *table = malloc(VHDX_METADATA_TABLE_SIZE);
    if (!table)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX metadata table");
    status = read_at(image, table, VHDX_METADATA_TABLE_SIZE, regions->metadata_offset, "VHDX metadata table");
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
                         ull(regions->metadata_offset), guid_text(id, false).s);
    return status;
}

static DWORD begin_change(struct vd_image *image, struct vhdx_state *s, bool data_changes)
{
    if (s->session_guids_written && !data_changes)
        return ERROR_SUCCESS;
    const struct vhdx_header *h = (const void *)s->header;
    GUID data_write = vd_guid_from_le_bytes(h->DataWriteGuid);
    if (data_changes) {
        int error = vd_guid_generate(&data_write);
        if (error)
            return vd_fail_errno(error, "generating a VHDX DataWriteGuid");
    }
    return write_headers(image, s, &data_write);
}

/* A fixed-size item (at most 16 bytes) rewritten in place. */
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
    if (status == ERROR_SUCCESS)
        status = write_file(image, data, length, item_offset);
    if (status == ERROR_SUCCESS)
        status = sync_file(image, "reporting the metadata changed");
    return status;
}

static DWORD vhdx_set_identifier(struct vd_image *image, const GUID *identifier)
{
    struct vhdx_state *s = image->state;
    pthread_mutex_lock(&s->lock);
    DWORD status = write_headers(image, s, identifier);
    pthread_mutex_unlock(&s->lock);
    return status;
}

static DWORD vhdx_set_physical_sector_size(struct vd_image *image, ULONG size)
{
    uint8_t raw[4];
    vd_put_le32(raw, size);
    DWORD status = write_item(image, &vhdx_item_physical_sector_size, "Physical Sector Size", raw, 4);
    if (status == ERROR_SUCCESS)
        image->physical_sector_size = size;
    return status;
}

static DWORD vhdx_set_virtual_disk_id(struct vd_image *image, const GUID *id)
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
static DWORD vhdx_set_parent(struct vd_image *image, struct vd_image *parent)
{
    struct vhdx_state *s = image->state;
    struct vhdx_regions regions;
    uint64_t entry_offset, item_offset;
    uint32_t item_length, used_end, length = 0;
    uint8_t *item = calloc(1, VHDX_MAX_METADATA_ITEM);
    if (!item) {
        vd_image_close(parent);
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a VHDX parent locator");
    }
    struct vd_create_request request = {.path = image->path, .parent = parent};
    DWORD status = find_item(image, &vhdx_item_parent_locator, &regions, &entry_offset, &item_offset,
                             &item_length, &used_end);
    if (status == ERROR_SUCCESS)
        status = build_locator(&request, item, VHDX_MAX_METADATA_ITEM, &length);
    uint32_t at = (uint32_t)round_up(used_end, 8);
    if (status == ERROR_SUCCESS && (at > regions.metadata_length || length > regions.metadata_length - at))
        status = vd_fail(ERROR_VHD_METADATA_FULL,
                         "%s: the VHDX metadata region at offset %llu (%u bytes) has no room for a %u-byte "
                         "parent locator", image->path, ull(regions.metadata_offset), regions.metadata_length,
                         length);
    pthread_mutex_lock(&s->lock);
    if (status == ERROR_SUCCESS)
        status = begin_change(image, s, false);
    pthread_mutex_unlock(&s->lock);
    if (status == ERROR_SUCCESS)
        status = write_file(image, item, length, regions.metadata_offset + at);
    if (status == ERROR_SUCCESS)
        status = sync_file(image, "using the new parent locator");
    uint8_t entry[8];
    vd_put_le32(entry, at);
    vd_put_le32(entry + 4, length);
    if (status == ERROR_SUCCESS)
        status = write_file(image, entry, sizeof entry,
                            entry_offset + offsetof(struct vhdx_metadata_table_entry, Offset));
    if (status == ERROR_SUCCESS)
        status = sync_file(image, "reporting the parent changed");
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
    status = parse_parent_locator(image, &md, &loc);
    if (status == ERROR_SUCCESS) {
        free(image->parent_locations);
        image->parent_locations = NULL;
        status = build_parent_locations(image, &loc);
    }
    locator_free(&loc);
    return status;
}

/* A copy of the region table with the BAT region moved, written to both
   copies in turn, each flushed: a reader takes the first valid copy. */
static DWORD move_bat_region(struct vd_image *image, uint64_t offset, uint64_t length)
{
    static const uint64_t copies[2] = {VHDX_REGION_TABLE1_OFFSET, VHDX_REGION_TABLE2_OFFSET};
    uint8_t *table = malloc(VHDX_REGION_TABLE_SIZE);
    if (!table)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX region table");
    DWORD status = ERROR_SUCCESS;
    for (int i = 0; i < 2; i++) {
        status = read_at(image, table, VHDX_REGION_TABLE_SIZE, copies[i], "VHDX region table");
        if (status == ERROR_SUCCESS)
            status = check_region_table(table, copies[i]);
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
    set_crc(table, VHDX_REGION_TABLE_SIZE, offsetof(struct vhdx_region_table_header, Checksum));
    for (int i = 0; i < 2 && status == ERROR_SUCCESS; i++) {
        status = write_file(image, table, VHDX_REGION_TABLE_SIZE, copies[i]);
        if (status == ERROR_SUCCESS)
            status = sync_file(image, "writing the other region table copy");
    }
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
    DWORD status = write_file(image, raw, count * 8, bat_offset + first * 8);
    free(raw);
    if (status == ERROR_SUCCESS)
        status = sync_file(image, "using the new BAT entries");
    return status;
}

/* Growing: the new BAT entries (NOT_PRESENT, or for a fixed disk blocks
   allocated now) are written, in a larger BAT region past the end of the
   file when the old one is too small, before the size item changes.
   Shrinking: the size item changes first, then the entries past the new end
   are cleared, so that no later growth brings their blocks back.  The space
   they held is not given back to the file system. */
static DWORD vhdx_resize(struct vd_image *image, uint64_t size)
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

    pthread_mutex_lock(&s->lock);
    DWORD status = begin_change(image, s, true);
    if (status == ERROR_SUCCESS && grow) {
        struct vhdx_regions regions;
        status = read_region_table(image, &regions);
        uint64_t old_blocks = s->payload_blocks;
        uint64_t payload = 0;
        /* The payload first, so that it follows the old blocks in the file. */
        if (status == ERROR_SUCCESS && fixed)
            status = allocate(image, s, (blocks - old_blocks) * s->block_size, &payload);
        for (uint64_t b = old_blocks; b < blocks && fixed && status == ERROR_SUCCESS; b++)
            bat[payload_entry(s, b)] = (payload + (b - old_blocks) * s->block_size) | PAYLOAD_BLOCK_FULLY_PRESENT;
        if (status == ERROR_SUCCESS && entries * 8 > regions.bat_length) {
            uint64_t length = round_up(entries * 8, VHDX_ALIGN);
            if (length > UINT32_MAX)
                status = vd_fail(ERROR_VHD_INVALID_SIZE, "%s: a BAT of %llu entries exceeds a region's limit",
                                 image->path, ull(entries));
            if (status == ERROR_SUCCESS)
                status = allocate(image, s, length, &bat_offset);
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
        uint64_t last = bat[payload_entry(s, old_blocks - 1)];
        if (status == ERROR_SUCCESS && tail && bat_state(last) == PAYLOAD_BLOCK_FULLY_PRESENT) {
            uint8_t *zeros = calloc(1, s->block_size - tail);
            status = zeros ? write_file(image, zeros, s->block_size - tail, bat_file_offset(last) + tail)
                           : vd_fail(ERROR_OUTOFMEMORY, "allocating a zero buffer");
            free(zeros);
            if (status == ERROR_SUCCESS)
                status = sync_file(image, "making the old last block's tail visible");
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
        find_flat_mapping(image, s);
    } else {
        free(bat);
    }
    pthread_mutex_unlock(&s->lock);
    return status;
}

const struct vd_format vd_format_vhdx = {
    .name = "VHDX",
    .device_id = VIRTUAL_STORAGE_TYPE_DEVICE_VHDX,
    .probe = vhdx_probe,
    .open = vhdx_open,
    .create = vhdx_create,
    .read = vhdx_read,
    .write = vhdx_write,
    .block_status = vhdx_block_status,
    .set_identifier = vhdx_set_identifier,
    .set_parent = vhdx_set_parent,
    .set_physical_sector_size = vhdx_set_physical_sector_size,
    .set_virtual_disk_id = vhdx_set_virtual_disk_id,
    .resize = vhdx_resize,
    .close = vhdx_close,
    .prepare_direct_write = vhdx_prepare_direct_write,
    .flush = vhdx_flush,
};
