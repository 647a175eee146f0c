/*
 * A virtual disk image as the provider sees it, whatever its format, and the
 * interface each format module (vhd.c, vhdx*.c, iso.c) implements.
 *
 * Promises of every format module:
 *   - open() trusts nothing in the file: every offset and length is checked
 *     against image->file_size before use, every allocation sized from the
 *     file is bounded, checksums are verified before the fields they cover are
 *     used.  A malformed file yields an ERROR_VHD_* / ERROR_VIRTDISK_* code with
 *     vd_fail() naming the structure and its file offset.  Never a crash.
 *   - open() of a read-only image writes nothing.
 *   - create() writes a complete, valid image into an empty file, or returns
 *     an error (the caller then removes the file).
 *   - read()/write()/discard() address the virtual disk's bytes, not the file's.
 */
#ifndef VD_PROVIDER_IMAGE_H
#define VD_PROVIDER_IMAGE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "virtdisk.h"

struct vd_format;
struct vd_job;

/* GET_VIRTUAL_DISK_INFO_PROVIDER_SUBTYPE values. */
enum vd_subtype {
    VD_SUBTYPE_NONE = 0, /* ISO: no container */
    VD_SUBTYPE_FIXED = 2,
    VD_SUBTYPE_DYNAMIC = 3,
    VD_SUBTYPE_DIFFERENCING = 4,
};

struct vd_image {
    /* Set by vd_image_open() before format->open(). */
    int fd;              /* the image file: O_RDONLY, or O_RDWR when writable */
    bool writable;
    char *path;          /* absolute UTF-8 path, owned by the image */
    uint64_t file_size;
    dev_t file_dev;      /* identity of the file, for finding its loop device */
    ino_t file_ino;
    int64_t file_btime_sec;   /* birth time (statx), 0 where the file system keeps none */
    uint32_t file_btime_nsec;
    uint32_t file_block_size; /* the file system's preferred I/O size (st_blksize) */
    OPEN_VIRTUAL_DISK_FLAG open_flags;
    int share_fd;        /* this open's sharing claim (share.h), else -1; closed with the image */
    const uint8_t *probe_head; /* during format->open() only: the file's first bytes, as read to */
    size_t probe_head_length;  /* recognise its format (length 0 when it was named, not probed) */

    /* Filled by format->open(). */
    const struct vd_format *format;
    enum vd_subtype subtype;
    uint64_t virtual_size;         /* bytes the attached disk shows */
    ULONG block_size;              /* 0 where the format has no blocks (fixed VHD, ISO) */
    ULONG logical_sector_size;     /* 512, 4096 (VHDX), 2048 (ISO) */
    ULONG physical_sector_size;
    GUID identifier;               /* GET_VIRTUAL_DISK_INFO_IDENTIFIER */
    bool has_virtual_disk_id;      /* VHDX Page 83 data */
    GUID virtual_disk_id;

    /* Differencing disks only (subtype VD_SUBTYPE_DIFFERENCING). */
    char *parent_locations;        /* candidate parent paths, UTF-8, each NUL-terminated,
                                      the list ended by an empty string; owned */
    bool parent_resolved;          /* parent found and opened (then parent != NULL) */
    GUID parent_identifier;
    ULONG parent_timestamp;        /* VHD only: seconds since 2000-01-01 UTC */
    struct vd_image *parent;       /* opened read-only, owned */

    /* When the virtual disk is one contiguous byte range of the file
       ([flat_offset, flat_offset + virtual_size)), it can be loop-mapped
       directly.  Fixed VHD: offset 0.  ISO: offset 0. */
    bool flat;
    uint64_t flat_offset;

    void *state;                   /* the format's own, freed by format->close() */
};

/* What CreateVirtualDisk asked for, validated and with defaults applied by
   the caller except where noted. */
struct vd_create_request {
    ULONG device_id;               /* VIRTUAL_STORAGE_TYPE_DEVICE_VHD or _VHDX */
    uint64_t virtual_size;         /* multiple of logical_sector_size */
    ULONG block_size;              /* 0: the format's default */
    ULONG logical_sector_size;     /* 512 or 4096 (VHDX only) */
    ULONG physical_sector_size;    /* 512 or 4096 */
    bool fixed;                    /* CREATE_VIRTUAL_DISK_FLAG_FULL_PHYSICAL_ALLOCATION */
    bool sparse;                   /* fixed, but the data area left unallocated (SPARSE_FILE) */
    GUID unique_id;                /* never zero: the caller generates one */
    const char *path;              /* where the file is being created (absolute) */
    struct vd_image *parent;       /* differencing: the opened parent, else NULL */
};

/* A byte range of a virtual disk. */
struct vd_extent {
    uint64_t offset, length;
};

/* What one layer of a chain holds at a place (block_status()). */
enum vd_block_state {
    VD_BLOCK_ABSENT, /* not this file's: its parent's, or zeros without one */
    VD_BLOCK_DATA,   /* this file's data (or may be: a conservative answer) */
    VD_BLOCK_ZERO,   /* zeros this file states, hiding any parent's data */
};

/* Compaction (compact.c) sees a file as places that never move (headers,
   tables, logs) and units: stretches of the file that one table entry
   points at, which may be dropped or moved.  compact_layout() describes the
   file as it is now. */
enum vd_unit_kind {
    VD_UNIT_DATA,     /* a block of the virtual disk that holds data */
    VD_UNIT_STALE,    /* space an entry still names though the block reads
                         the same without it (VHDX ZERO/UNMAPPED with an
                         offset): dropped without looking */
    VD_UNIT_METADATA, /* the format's own (VHDX sector bitmap): movable;
                         kept while a DATA unit of its group is */
};

struct vd_compact_unit {
    uint64_t id;                   /* the format's name for it (a BAT index) */
    uint64_t file_offset, length;  /* the file bytes it owns */
    uint64_t virtual_offset;       /* DATA: the disk bytes it holds ... */
    uint64_t virtual_length;       /* ... (the last block may be short) */
    enum vd_unit_kind kind;
    /* 0, or the group (a VHDX chunk) the unit belongs to: a METADATA unit
       of a group is dropped, after its DATA units, once none of them is
       kept.  A METADATA unit of group 0 is always kept. */
    uint64_t group;
};

struct vd_compact_layout {
    struct vd_extent *fixed;       /* file ranges that never move; malloc'd */
    size_t fixed_count;
    struct vd_compact_unit *units; /* malloc'd */
    size_t unit_count;
    uint64_t alignment;            /* a moved unit starts at a multiple of this */
    /* A dropped DATA unit reads as the parent's data (VHD: an unallocated
       block of a differencing disk), else as zeros (VHDX states zeros). */
    bool drop_shows_parent;
};

struct vd_format {
    const char *name;              /* "VHD", "VHDX", "ISO" */
    ULONG device_id;               /* VIRTUAL_STORAGE_TYPE_DEVICE_* */

    /* Does the file look like this format?  head: the first bytes of the file
       (up to 64 KiB), tail: the last 512 bytes (fewer for tiny files). */
    bool (*probe)(const uint8_t *head, size_t head_length, const uint8_t *tail,
                  size_t tail_length, uint64_t file_size);

    /* Parses and verifies the image, filling the fields listed above. */
    DWORD (*open)(struct vd_image *image);

    /* Writes a new image into fd, an empty file opened O_RDWR.  NULL when the
       format cannot be created (ISO). */
    DWORD (*create)(int fd, const struct vd_create_request *request);

    /* Virtual-disk I/O, for the block-translating server and for tests.
       write is NULL for read-only formats. */
    DWORD (*read)(struct vd_image *image, void *buffer, uint64_t offset, size_t length);
    DWORD (*write)(struct vd_image *image, const void *buffer, uint64_t offset, size_t length);

    /* Makes [offset, offset + length) of the virtual disk read as zeros (a
       TRIM: the FUSE server's fallocate PUNCH_HOLE), also where a
       parent has data, and gives the file space back where the format can:
       whole blocks leave the block map, the rest is punched out of the file
       (zeroed where the file system cannot punch).  An interruption leaves
       each sector reading its old data or zeros, nothing else.  NULL for
       read-only formats. */
    DWORD (*discard)(struct vd_image *image, uint64_t offset, uint64_t length);

    /* Makes [offset, offset + length) read as zeros and stay allocated (a
       write of zeros that must not unmap: BLKZEROOUT, the FUSE server's
       fallocate ZERO_RANGE), with a write's guarantees: until the next
       flush each sector reads its old data or zeros, zeros after it.  Where
       this file holds the block's data in place and in full (VHDX fully
       present, an allocated dynamic VHD block), the file range is zeroed by
       vd_image_zero_range(), which most file systems do by marking extents
       unwritten instead of writing the bytes; elsewhere, and where the file
       system cannot, zeros are written as by write().  NULL: the caller
       writes zeros. */
    DWORD (*write_zeroes)(struct vd_image *image, uint64_t offset, uint64_t length);

    /* What this file (not its parent) holds at offset: *state for the
       *run bytes from offset (0 < *run <= length), for copying only what a
       layer holds (merge, create with a source).  ABSENT is exact; DATA may
       cover bytes the file does not hold (a partly written block) when
       finding out costs more than copying them.  NULL: all DATA. */
    DWORD (*block_status)(struct vd_image *image, uint64_t offset, uint64_t length,
                          enum vd_block_state *state, uint64_t *run);

    /* Offline changes (SetVirtualDiskInformation, ResizeVirtualDisk,
       ExpandVirtualDisk) to an image opened writable and not attached; the
       caller has checked access and state.  Each writes in the order its
       specification needs for an interrupted change to leave a readable
       image (old or new), then updates the in-memory image.  NULL where the
       format has no such thing: the caller answers ERROR_VHD_INVALID_TYPE.
       set_parent takes ownership of parent, also on failure; the caller has
       checked that it is the parent the child names (identifier, size). */
    DWORD (*set_identifier)(struct vd_image *image, const GUID *identifier);
    DWORD (*set_parent)(struct vd_image *image, struct vd_image *parent);
    DWORD (*set_physical_sector_size)(struct vd_image *image, ULONG size);
    DWORD (*set_virtual_disk_id)(struct vd_image *image, const GUID *id);
    /* A new virtual size, a multiple of the logical sector size; shrinking
       only where the format can (the caller has decided it is safe).  What
       takes time (reserving a fixed disk's new space) reports to job and
       stops there when it is cancelled, before anything changes the image's
       size: a cancelled resize leaves the old size (job.h). */
    DWORD (*resize)(struct vd_image *image, uint64_t size, struct vd_job *job);

    /* Compaction of an image opened writable, detached and exclusive.  NULL
       where the format has no blocks to compact (fixed, ISO).
       compact_drop: the units stop owning file space; a DATA unit then reads
       as zeros, or as the parent (layout.drop_shows_parent: the caller has
       checked that the parent reads zeros there); a METADATA unit is one no
       kept unit needs any more.  Durable on return, so
       the space may be reused; a dropped DATA unit's space is punched out
       of the file by then (vd_image_punch_unused).
       compact_move: unit i is copied to targets[i] (free space, not
       overlapping any unit or fixed range, aligned), made durable, then
       the entries are pointed at the copies; the old places are free once
       it returns.  A crash at any point reads as before.
       compact_truncate: the file ends at end (past every fixed range and
       unit) plus whatever the format keeps at the end (VHD: its footer);
       nothing to do when it ends there already. */
    DWORD (*compact_layout)(struct vd_image *image, struct vd_compact_layout *layout);
    DWORD (*compact_drop)(struct vd_image *image, const struct vd_compact_unit *units, size_t count);
    DWORD (*compact_move)(struct vd_image *image, const struct vd_compact_unit *units, const uint64_t *targets,
                          size_t count);
    DWORD (*compact_truncate)(struct vd_image *image, uint64_t end);

    /* Releases state (not fd, path, parent_locations or parent:
       vd_image_close() owns those).  Called only when state is not NULL, also
       after a failed open(). */
    void (*close)(struct vd_image *image);

    /* Called before a writable image is loop-mapped directly (flat), where
       the disk's writes reach the file without passing through write(): does
       now what write() would do before the first write of a session (VHDX:
       new FileWriteGuid/DataWriteGuid).  NULL when there is nothing to do. */
    DWORD (*prepare_direct_write)(struct vd_image *image);

    /* About to write count extents ({offset, length} of the virtual disk)
       in one go (a merge): the format may reserve what they need at once
       and defer the metadata that makes new data part of the disk to the
       next flush(), which then writes it after the data is durable.  Until
       that flush an interruption leaves the image as it was wherever new
       space was allocated.  NULL: nothing to prepare. */
    DWORD (*prepare_bulk_write)(struct vd_image *image, const struct vd_extent *extents, size_t count);

    /* Makes everything write() has returned durable in the file (the FUSE
       server's fsync, and before a detach reports success).  NULL: an
       fdatasync() of image->fd is enough. */
    DWORD (*flush)(struct vd_image *image);
};

extern const struct vd_format vd_format_vhd;
extern const struct vd_format vd_format_vhdx;
extern const struct vd_format vd_format_iso;

/* Opens path as a virtual disk.  device_id VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN
   means "decide by the contents"; a known device_id must match the contents
   (ERROR_VIRTDISK_PROVIDER_NOT_FOUND when no format recognises the file).
   On success *out is a heap image owned by the caller (vd_image_close()). */
DWORD vd_image_open(const char *path, ULONG device_id, bool writable,
                    OPEN_VIRTUAL_DISK_FLAG open_flags, struct vd_image **out);

void vd_image_close(struct vd_image *image);

/* block_status() of any image, whatever its format (all DATA where the
   format does not say). */
DWORD vd_image_block_status(struct vd_image *image, uint64_t offset, uint64_t length,
                            enum vd_block_state *state, uint64_t *run);

/* *zeros: [offset, offset + *run) of image surely reads as zeros without
   reading it: no layer of its chain holds data there (0 < *run <= length,
   the bytes from offset that one answer covers; false when unsure).  For
   copies that skip what need not be read (create with a source, mirror). */
DWORD vd_image_chain_zeros(struct vd_image *image, uint64_t offset, uint64_t length, bool *zeros, uint64_t *run);

/* *zeros: [offset, offset + length) of image reads as zeros because no
   layer of its chain holds data there (block_status() says so: a
   conservative answer, false when unsure).  Lets a discard skip what
   already reads as zeros instead of writing zeros over a parent. */
DWORD vd_image_reads_zeros(struct vd_image *image, uint64_t offset, uint64_t length, bool *zeros);

/* Gives [offset, offset + length) of image's file back to the host
   (PUNCH_HOLE, the file's size kept), for space no structure of the image
   uses any more.  Where the file system cannot punch, the space just stays
   allocated: nothing reads it. */
DWORD vd_image_punch_unused(struct vd_image *image, uint64_t offset, uint64_t length);

/* fallocate(ZERO_RANGE | KEEP_SIZE) of [offset, offset + length) of image's
   file: reads zeros from then on, the space staying allocated; durable at
   the next fdatasync, as a write is (on ext4 and XFS an extent change
   through the journal, all of it or none of each extent).  *done false,
   and nothing changed, where the file system has no ZERO_RANGE. */
DWORD vd_image_zero_range(struct vd_image *image, uint64_t offset, uint64_t length, bool *done);

/* The format module for a device id, or NULL. */
const struct vd_format *vd_format_for_device(ULONG device_id);

#endif
