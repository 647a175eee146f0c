/*
 * VHDX ([MS-VHDX] v1) inside the provider: the on-disk structures, the
 * in-memory state, and what each vhdx-*.c file offers the others.  Only the
 * vhdx-*.c files include this; the rest of the provider sees vd_format_vhdx.
 *
 *   vhdx-ondisk.c  GUIDs, checksums, bounded structure reads
 *   vhdx-log.c     the log: finding, checking and replaying its active sequence
 *   vhdx-open.c    headers, region table, metadata, BAT, parent
 *   vhdx-io.c      virtual-disk reads and writes, block allocation
 *   vhdx-discard.c discard, and the reuse of the file space it frees
 *   vhdx-create.c  new files
 *   vhdx-meta.c    offline changes (identifier, parent, sizes)
 *   vhdx-compact.c dropping and moving blocks, cutting the file (compact.h)
 *   vhdx.c         probe and the format table
 *
 * Promises: every function taking a vd_image validates what it reads from the
 * file before use and reports failure through vd_fail() with the structure
 * and its file offset; none of them writes to an image opened read-only.
 */
#ifndef VD_PROVIDER_VHDX_H
#define VD_PROVIDER_VHDX_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "image.h"

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

/* The well-known GUIDs, in host form (vd_guid_from_le_bytes of the disk form). */
extern const GUID vhdx_region_bat, vhdx_region_metadata, vhdx_item_file_parameters,
    vhdx_item_virtual_disk_size, vhdx_item_page83, vhdx_item_logical_sector_size,
    vhdx_item_physical_sector_size, vhdx_item_parent_locator, vhdx_locator_type_vhdx;

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
    /* A dirty log's replay, read but not yet on disk: reads of the file go
       through it (vhdx_log_pread).  NULL when the log is clean. */
    struct vhdx_log *log;
    /* This session's log (vhdx_meta_write): the LogGuid the headers carry
       (zero: none in use), where the next entry goes, the last sequence. */
    GUID log_guid;
    uint64_t log_position, log_sequence;
    uint64_t file_end;             /* where the next block goes, 1 MiB aligned */

    /* Held shared by I/O that uses a block's file offset outside `lock`
       (reads, writes into fully present blocks) and exclusively by a discard
       while it takes blocks out of the file: once it has the lock, no I/O
       still aims at an offset the next allocation may hand to another block. */
    pthread_rwlock_t map_lock;
    /* File ranges no structure uses, 1 MiB aligned (vhdx-discard.c): blocks
       discarded this session and, found once at the session's first
       allocation, holes left by earlier ones.  vhdx_allocate takes from here
       before it grows the file. */
    struct vd_extent *freed;
    size_t freed_count, freed_capacity;
    bool freed_scanned;
};


struct vhdx_regions {
    uint64_t bat_offset, metadata_offset;
    uint32_t bat_length, metadata_length;
    /* Optional regions this reader does not know, as one span covering all
       of them (others_end 0: none): ignored, but never to be overwritten. */
    uint64_t others_start, others_end;
};

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

struct vhdx_locator {
    GUID linkage, linkage2;
    bool has_linkage2;
    char *relative_path, *volume_path, *absolute_win32_path;
};

/* ---- Small helpers ---- */

static inline uint64_t vhdx_round_up(uint64_t value, uint64_t align) { return (value + align - 1) / align * align; }
static inline bool vhdx_is_power_of_two(uint64_t v) { return v && !(v & (v - 1)); }
static inline unsigned long long ull(uint64_t v) { return (unsigned long long)v; }

static inline uint32_t vhdx_bat_state(uint64_t entry) { return (uint32_t)(entry & VHDX_BAT_STATE_MASK); }
static inline uint64_t vhdx_bat_file_offset(uint64_t entry) { return entry & VHDX_BAT_OFFSET_MASK; }

/* BAT index of payload block i and of the sector bitmap of chunk k (§2.5). */
static inline uint64_t vhdx_payload_entry(const struct vhdx_state *s, uint64_t block)
{
    return block + block / s->chunk_ratio;
}
static inline uint64_t vhdx_bitmap_entry(const struct vhdx_state *s, uint64_t chunk)
{
    return chunk * (s->chunk_ratio + 1ull) + s->chunk_ratio;
}
static inline uint64_t vhdx_bat_load(const struct vhdx_state *s, uint64_t index)
{
    return __atomic_load_n(&s->bat[index], __ATOMIC_ACQUIRE);
}

/* ---- vhdx-ondisk.c ---- */

/* "{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}" for messages. */
struct vhdx_guid_text { char s[39]; };
struct vhdx_guid_text vhdx_guid_text(const GUID *g, bool lower);
/* Parses "{8-4-4-4-12}" (braces required, as §2.6.2.6.3 writes parent_linkage). */
bool vhdx_guid_parse(const char *text, GUID *out);
/* CRC-32C of buffer with its 4-byte checksum field taken as zero. */
bool vhdx_crc_ok(const uint8_t *buffer, size_t length, size_t checksum_offset);
void vhdx_set_crc(uint8_t *buffer, size_t length, size_t checksum_offset);
/* A structure of the file, refused (ERROR_VHD_INVALID_FILE_SIZE) when it
   extends past image->file_size. */
DWORD vhdx_read_at(struct vd_image *image, void *buffer, size_t length, uint64_t offset,
                   const char *what);

/* ---- vhdx-open.c: the file's extents ---- */

/* A byte range of the file that one structure owns. */
enum vhdx_extent_kind {
    VHDX_EXTENT_HEADERS,               /* file identifier and both headers: [0, 192 KiB) */
    VHDX_EXTENT_REGION_TABLES,         /* both copies: [192 KiB, 320 KiB) */
    VHDX_EXTENT_LOG,
    VHDX_EXTENT_METADATA,
    VHDX_EXTENT_BAT,
    VHDX_EXTENT_PAYLOAD,
    VHDX_EXTENT_BITMAP,
};
struct vhdx_extent {
    uint64_t start;
    uint32_t length;
    uint32_t kind;                     /* enum vhdx_extent_kind */
    uint64_t bat_index;                /* blocks: their BAT entry, for messages */
};

/* "the BAT (3145728..4194304)", "payload block of BAT entry 7 (...)". */
const char *vhdx_extent_name(const struct vhdx_extent *x, char *buffer, size_t size);

/* ---- vhdx-log.c ---- */

struct vhdx_log;

/* Reads the log the current header names and, when it holds an active
   sequence, checks all of it and sets s->log to its replay (and
   image->file_size to the size the file has after replay).  Writes nothing.
   A corrupt active sequence is refused, naming the entry and descriptor. */
DWORD vhdx_log_load(struct vd_image *image, struct vhdx_state *s);
/* Refuses a replay that would write anything but the region tables, the
   metadata region, the BAT and blocks the (replayed) BAT allocates.  sorted:
   the file's extents, sorted and disjoint. */
DWORD vhdx_log_check_targets(const struct vd_image *image, const struct vhdx_state *s,
                             const struct vhdx_extent *sorted, size_t n);
/* Writable open: replays s->log on disk, flushes, then writes new headers
   without LogGuid, and frees s->log.  Nothing to do when s->log is NULL. */
DWORD vhdx_log_apply(struct vd_image *image, struct vhdx_state *s);
/* pread of the replayed file: the bytes on disk with the log's writes laid
   over them, zeros past the real end.  0 or an errno. */
int vhdx_log_pread(const struct vhdx_log *log, int fd, void *buffer, size_t length, uint64_t offset);
void vhdx_log_free(struct vhdx_log *log);

/* A metadata change: length bytes of data at file offset. */
struct vhdx_meta_change {
    uint64_t offset;
    const void *data;
    uint64_t length;
};
/* THE way metadata changes reach a writable VHDX (BAT entries, sector
   bitmaps, metadata items, region tables): the changes, widened to 4 KiB
   sectors with the file's current bytes, go into one log entry (§2.3) -
   flush (the caller's data and the previous entry's in-place writes), write
   the entry, flush, write in place.  A crash at any point leaves a file that
   replays to all of the changes or none.  More sectors than the log holds
   are split over several entries, each atomic.  Call with s->lock held (or
   the image otherwise exclusive). */
DWORD vhdx_meta_write(struct vd_image *image, struct vhdx_state *s, const struct vhdx_meta_change *changes,
                      size_t n);
/* Picks this session's LogGuid (once), for the next header write to carry. */
DWORD vhdx_log_start(struct vhdx_state *s);
/* Writable close: flush, then headers without LogGuid. */
DWORD vhdx_log_finish(struct vd_image *image, struct vhdx_state *s);

/* ---- vhdx-open.c ---- */

DWORD vhdx_check_region_table(const uint8_t *table, uint64_t table_offset);
DWORD vhdx_read_region_table(struct vd_image *image, struct vhdx_regions *regions);
DWORD vhdx_parse_parent_locator(struct vd_image *image, const struct vhdx_metadata *md,
                                struct vhdx_locator *loc);
DWORD vhdx_build_parent_locations(struct vd_image *image, const struct vhdx_locator *loc);
void vhdx_locator_free(struct vhdx_locator *l);
/* Bytes of payload block `block` that lie inside the virtual disk: the last
   block may be cut short by the disk's size. */
uint64_t vhdx_block_bytes_used(const struct vd_image *image, const struct vhdx_state *s, uint64_t block);
/* Sets image->flat when the payload blocks are all present, in order and
   back to back. */
void vhdx_find_flat_mapping(struct vd_image *image, const struct vhdx_state *s);
DWORD vhdx_open(struct vd_image *image);
void vhdx_close(struct vd_image *image);

/* ---- vhdx-io.c ---- */

DWORD vhdx_read_file(struct vd_image *image, void *buffer, size_t length, uint64_t file_offset);
DWORD vhdx_write_file(struct vd_image *image, const void *buffer, size_t length, uint64_t file_offset);
/* The barrier of the write ordering (vhdx.c); `before` names what waits on it. */
DWORD vhdx_sync_file(struct vd_image *image, const char *before);
/* Both headers rewritten with a new FileWriteGuid and this DataWriteGuid. */
DWORD vhdx_write_headers(struct vd_image *image, struct vhdx_state *s, const GUID *data_write);
/* size bytes of zeros past the end of the file, 1 MiB aligned. */
DWORD vhdx_allocate(struct vd_image *image, struct vhdx_state *s, uint64_t size, uint64_t *offset);
DWORD vhdx_read(struct vd_image *image, void *buffer, uint64_t offset, size_t length);
DWORD vhdx_write(struct vd_image *image, const void *buffer, uint64_t offset, size_t length);
/* vhdx_write's step inside one payload block; the session's headers are
   written already (vhdx_begin_changes). */
DWORD vhdx_write_block(struct vd_image *image, struct vhdx_state *s, uint64_t block, const uint8_t *data,
                       uint64_t offset, size_t length);
DWORD vhdx_block_status(struct vd_image *image, uint64_t offset, uint64_t length, enum vd_block_state *state,
                        uint64_t *run);
/* vd_format.write_zeroes (image.h). */
DWORD vhdx_write_zeroes(struct vd_image *image, uint64_t offset, uint64_t length);
DWORD vhdx_prepare_direct_write(struct vd_image *image);
DWORD vhdx_flush(struct vd_image *image);

/* ---- vhdx-discard.c ---- */

/* vd_format.discard: whole blocks leave the file (UNMAPPED, or ZERO in a
   differencing disk, where NOT_PRESENT would show the parent; a fixed disk
   keeps them allocated and punches them), partial ranges are punched (or
   zeroed) in place, or written as zeros where the parent shows through. */
DWORD vhdx_discard(struct vd_image *image, uint64_t offset, uint64_t length);
/* A freed range of at least size bytes, zeroed and reserved, at *offset;
   *found false when there is none (the caller then grows the file). */
DWORD vhdx_take_freed(struct vd_image *image, struct vhdx_state *s, uint64_t size, uint64_t *offset, bool *found);
/* Called by vhdx_write and vhdx_discard before their first change. */
DWORD vhdx_begin_changes(struct vd_image *image, struct vhdx_state *s);
/* For a change of length bytes at offset (doing: "zeroing", ...): refuses a
   read-only image and a range past the disk, then begins the session's
   changes once (vhdx_begin_changes); nothing for an empty range. */
DWORD vhdx_begin_range_change(struct vd_image *image, uint64_t offset, uint64_t length, const char *doing);

/* ---- vhdx-create.c ---- */

/* The Parent Locator item for r->parent, into item (capacity bytes). */
DWORD vhdx_build_locator(const struct vd_create_request *r, uint8_t *item, uint32_t capacity,
                         uint32_t *length);
DWORD vhdx_create(int fd, const struct vd_create_request *r);

/* ---- vhdx-meta.c ---- */

DWORD vhdx_set_identifier(struct vd_image *image, const GUID *identifier);
DWORD vhdx_set_parent(struct vd_image *image, struct vd_image *parent);
DWORD vhdx_set_physical_sector_size(struct vd_image *image, ULONG size);
DWORD vhdx_set_virtual_disk_id(struct vd_image *image, const GUID *id);
DWORD vhdx_resize(struct vd_image *image, uint64_t size, struct vd_job *job);

/* ---- vhdx-compact.c ---- */

DWORD vhdx_compact_layout(struct vd_image *image, struct vd_compact_layout *layout);
DWORD vhdx_compact_drop(struct vd_image *image, const struct vd_compact_unit *units, size_t count);
DWORD vhdx_compact_move(struct vd_image *image, const struct vd_compact_unit *units, const uint64_t *targets,
                        size_t count);
DWORD vhdx_compact_truncate(struct vd_image *image, uint64_t end);

#endif
