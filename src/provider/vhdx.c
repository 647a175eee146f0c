/*
 * VHDX ([MS-VHDX] v1): the format table and probe.  The work is split by
 * concern as vhdx.h lists (open, I/O, create, offline changes, the log); what
 * follows here is what holds for all of them.
 *
 * File layout this module reads (offsets fixed by the spec) and writes:
 *
 *   0        file type identifier "vhdxfile" + creator (never rewritten)
 *   64 KiB   header 1        128 KiB  header 2       (4 KiB each, CRC-32C)
 *   192 KiB  region table 1  256 KiB  region table 2 (64 KiB each, CRC-32C)
 *   1 MiB    log (1 MiB; written by vhdx_meta_write, empty whenever a file is closed)
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
 *   - a corrupt log entry, or one that would write outside the region tables,
 *     the metadata region, the BAT and allocated blocks: also
 *     ERROR_VHD_SPARSE_HEADER_CORRUPT; regions or blocks that overlap:
 *     ERROR_VHD_BLOCK_ALLOCATION_TABLE_CORRUPT when a block is one of them.
 * Every failure's detail names the structure and its file offset.
 *
 * Write ordering.  A crash at any point leaves a file that reads either the
 * old or the new data, never garbage:
 *   1. before the first change of a session, both headers are rewritten
 *      (non-current copy first, each with the next sequence number and
 *      synced) with new FileWriteGuid/DataWriteGuid and the session's
 *      LogGuid: differencing children linked to the old DataWriteGuid then
 *      notice that their parent changed, as the spec requires;
 *   2. data goes to its place first (a new block past the end of the file,
 *      where nothing points yet), then every metadata change - BAT entries,
 *      sector bitmaps, metadata items, region tables - goes through the log
 *      (vhdx_meta_write: flush, entry, flush, in place), so a crash replays
 *      to all of one change or none of it;
 *   3. closing flushes and writes headers without LogGuid.
 */
#include "vhdx.h"

#include <string.h>

static bool vhdx_probe(const uint8_t *head, size_t head_length, const uint8_t *tail,
                       size_t tail_length, uint64_t file_size)
{
    return head_length >= 8 && memcmp(head, "vhdxfile", 8) == 0;
}

const struct vd_format vd_format_vhdx = {
    .name = "VHDX",
    .device_id = VIRTUAL_STORAGE_TYPE_DEVICE_VHDX,
    .probe = vhdx_probe,
    .open = vhdx_open,
    .create = vhdx_create,
    .read = vhdx_read,
    .write = vhdx_write,
    .discard = vhdx_discard,
    .write_zeroes = vhdx_write_zeroes,
    .block_status = vhdx_block_status,
    .set_identifier = vhdx_set_identifier,
    .set_parent = vhdx_set_parent,
    .set_physical_sector_size = vhdx_set_physical_sector_size,
    .set_virtual_disk_id = vhdx_set_virtual_disk_id,
    .resize = vhdx_resize,
    .close = vhdx_close,
    .prepare_direct_write = vhdx_prepare_direct_write,
    .flush = vhdx_flush,
    .compact_layout = vhdx_compact_layout,
    .compact_drop = vhdx_compact_drop,
    .compact_move = vhdx_compact_move,
    .compact_truncate = vhdx_compact_truncate,
};

