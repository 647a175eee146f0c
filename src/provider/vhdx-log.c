/*
 * VHDX log ([MS-VHDX] §2.3): finding the active sequence of a dirty log,
 * checking every entry of it, and replaying it - on disk for a writable open,
 * in memory for a read-only one.
 *
 * The log is a circular buffer of 4 KiB sectors.  An entry is a header sector
 * (header plus the first descriptors), more descriptor sectors, then one data
 * sector per data descriptor; its checksum covers all of it.  A sequence is a
 * run of valid entries, each following the previous one in the buffer with
 * the next sequence number; it is complete when its last entry's Tail names
 * an entry of the run, and replay starts there.  Of the complete sequences
 * the one whose last entry has the highest sequence number is the active one.
 *
 * Replay never starts before the whole active sequence has been read and
 * checked, and (vhdx_log_check_targets) every write it would make lies inside
 * a region table copy, the metadata region, the BAT or a block the replayed
 * BAT allocates: a crafted log cannot reach the headers, the log itself or
 * space no structure owns.  The log region is never written here, so a replay
 * interrupted on disk is simply replayed again at the next open.
 */
#define _GNU_SOURCE
#include "vhdx.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bytes.h"
#include "crc32c.h"
#include "errors.h"

enum {
    LOG_SECTOR = 4096,
    /* 64-byte header then 32-byte descriptors, 4 KiB sectors (§2.3.1). */
    DESCRIPTOR_SIZE = 32,
    DATA_PAYLOAD = 4084, /* of a data sector: 8 leading, 4 trailing bytes live in the descriptor */
};

/* The largest log read into memory (Hyper-V and QEMU use 1 MiB). */
#define VHDX_MAX_LOG_LENGTH (256 * MiB)
/* No VHDX needs more file than its 64 TiB payload plus its BAT and bitmaps. */
#define VHDX_MAX_REPLAYED_SIZE (128 * TiB)

struct vhdx_log_descriptor {           /* §2.3.1.2, §2.3.1.3 */
    uint8_t Signature[4];              /* "zero" or "desc" */
    uint8_t TrailingBytes[4];          /* data: the sector's last 4 bytes; zero: reserved */
    uint8_t LeadingBytes[8];           /* data: the sector's first 8 bytes; zero: ZeroLength */
    uint8_t FileOffset[8];
    uint8_t SequenceNumber[8];
};

struct vhdx_log_data_sector {          /* §2.3.1.4 */
    uint8_t DataSignature[4];          /* "data" */
    uint8_t SequenceHigh[4];
    uint8_t Data[DATA_PAYLOAD];
    uint8_t SequenceLow[4];
};

_Static_assert(sizeof(struct vhdx_log_descriptor) == DESCRIPTOR_SIZE, "log descriptor");
_Static_assert(sizeof(struct vhdx_log_data_sector) == LOG_SECTOR, "log data sector");

/* One write of the replay, in log order. */
struct vhdx_log_write {
    uint64_t offset, length;
    const uint8_t *data;               /* LOG_SECTOR bytes; NULL: zeros */
    uint64_t entry;                    /* file offset of the entry, for messages */
};

struct vhdx_log {
    uint64_t real_size;                /* the file as it is on disk */
    uint64_t size;                     /* the file after replay (≥ real_size) */
    size_t count;
    struct vhdx_log_write *writes;     /* log order */
    size_t *by_start;                  /* indices into writes, sorted by offset */
    uint64_t *max_end;                 /* max_end[i]: largest end among by_start[0..i] */
    uint8_t *sectors;                  /* the replayed data sectors, LOG_SECTOR each */
    uint64_t log_offset, first_entry, head_sequence;
    size_t entries;
};

/* ---- reading the circular buffer ---- */

struct log_view {
    const uint8_t *bytes;              /* the whole log region */
    uint64_t length;                   /* multiple of 1 MiB */
    uint64_t offset;                   /* its file offset, for messages */
    GUID guid;
};

static const uint8_t *log_sector(const struct log_view *v, uint64_t pos)
{
    return v->bytes + pos % v->length;
}

struct entry_info {
    uint64_t pos, length, sequence, tail, flushed, last;
    uint32_t descriptors, descriptor_sectors;
};

/* Is there a whole, checksummed entry of this log at pos?  Anything else -
   torn, stale, another log's - is simply not an entry (§2.3.3). */
static bool entry_at(const struct log_view *v, uint64_t pos, struct entry_info *e)
{
    const struct vhdx_log_entry_header *h = (const void *)log_sector(v, pos);
    GUID guid = vd_guid_from_le_bytes(h->LogGuid);
    if (memcmp(h->Signature, "loge", 4) != 0 || !vd_guid_equal(&guid, &v->guid))
        return false;
    e->pos = pos;
    e->length = vd_le32(h->EntryLength);
    e->sequence = vd_le64(h->SequenceNumber);
    e->tail = vd_le32(h->Tail);
    e->descriptors = vd_le32(h->DescriptorCount);
    e->flushed = vd_le64(h->FlushedFileOffset);
    e->last = vd_le64(h->LastFileOffset);
    if (e->length < LOG_SECTOR || e->length % LOG_SECTOR || e->length > v->length || e->sequence == 0
        || e->tail % LOG_SECTOR || e->tail >= v->length)
        return false;
    /* The header takes the room of two descriptors in the first sector. */
    uint64_t descriptor_sectors = ((uint64_t)e->descriptors + 2 + 127) / 128;
    if (descriptor_sectors > e->length / LOG_SECTOR)
        return false;
    e->descriptor_sectors = (uint32_t)descriptor_sectors;

    static const uint8_t zero[4];
    size_t checksum_at = offsetof(struct vhdx_log_entry_header, Checksum);
    uint32_t crc = vd_crc32c(0, (const uint8_t *)h, checksum_at);
    crc = vd_crc32c(crc, zero, 4);
    crc = vd_crc32c(crc, (const uint8_t *)h + checksum_at + 4, LOG_SECTOR - checksum_at - 4);
    for (uint64_t at = LOG_SECTOR; at < e->length; at += LOG_SECTOR)
        crc = vd_crc32c(crc, log_sector(v, pos + at), LOG_SECTOR);
    return crc == vd_le32(h->Checksum);
}

/* entry_at() of log sector i, computed once: known[i] is 0 (not yet), 1 (no
   entry) or 2 (infos[i] holds it). */
static bool entry_known(const struct log_view *v, size_t i, uint8_t *known, struct entry_info *infos)
{
    if (!known[i])
        known[i] = entry_at(v, (uint64_t)i * LOG_SECTOR, &infos[i]) ? 2 : 1;
    return known[i] == 2;
}

/* The active sequence: its entries' positions, in order (*count of them). */
static DWORD find_active_sequence(const struct log_view *v, struct entry_info **out, size_t *count)
{
    size_t sectors = (size_t)(v->length / LOG_SECTOR);
    uint8_t *known = calloc(sectors, 1);
    struct entry_info *infos = calloc(sectors, sizeof *infos);
    struct entry_info *run = calloc(sectors, sizeof *run);
    struct entry_info *best = calloc(sectors, sizeof *best);
    bool *covered = calloc(sectors, sizeof *covered);
    size_t best_count = 0;
    uint64_t best_head = 0;
    if (!known || !infos || !run || !best || !covered) {
        free(known), free(infos), free(run), free(best), free(covered);
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX log search");
    }
    for (size_t start = 0; start < sectors; start++) {
        if (covered[start] || !entry_known(v, start, known, infos))
            continue;
        size_t n = 0;
        uint64_t total = 0;
        size_t i = start;
        /* Follow the chain; a sequence never holds more than the log. */
        while (entry_known(v, i, known, infos) && total + infos[i].length <= v->length
               && (n == 0 || infos[i].sequence == run[n - 1].sequence + 1)) {
            run[n++] = infos[i];
            covered[i] = true;
            total += infos[i].length;
            i = (size_t)(((uint64_t)i * LOG_SECTOR + infos[i].length) % v->length / LOG_SECTOR);
        }
        /* Complete only if the head's Tail is one of the run's entries. */
        uint64_t tail = run[n - 1].tail;
        size_t from = n;
        for (size_t k = 0; k < n; k++)
            if (run[k].pos == tail)
                from = k;
        if (from == n || (best_count && run[n - 1].sequence <= best_head))
            continue;
        best_count = n - from;
        best_head = run[n - 1].sequence;
        memcpy(best, run + from, best_count * sizeof *best);
    }
    free(known), free(infos), free(run), free(covered);
    *out = best;
    *count = best_count;
    return ERROR_SUCCESS;
}

/* ---- building the replay ---- */

static int compare_by_start(const void *a, const void *b, void *context)
{
    const struct vhdx_log_write *w = context;
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    if (w[x].offset != w[y].offset)
        return w[x].offset < w[y].offset ? -1 : 1;
    return x < y ? -1 : x > y;
}

/* Every descriptor and data sector of the active sequence, checked and turned
   into writes.  The checksum says the entry was written whole, so anything
   wrong inside it is corruption, not a torn write: refused. */
static DWORD build_writes(const struct log_view *v, const struct entry_info *entries, size_t n,
                          struct vhdx_log *log)
{
    size_t writes = 0, data = 0;
    for (size_t i = 0; i < n; i++)
        writes += entries[i].descriptors;
    log->writes = calloc(writes ? writes : 1, sizeof *log->writes);
    log->sectors = malloc(writes ? writes * (size_t)LOG_SECTOR : 1);
    if (!log->writes || !log->sectors)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the replay of the VHDX log");

    for (size_t i = 0; i < n; i++) {
        const struct entry_info *e = &entries[i];
        uint64_t entry_file = v->offset + e->pos;
        uint64_t data_pos = e->pos + (uint64_t)e->descriptor_sectors * LOG_SECTOR;
        uint64_t data_end = e->pos + e->length;
        uint64_t limit = e->last > log->real_size ? e->last : log->real_size;
        if (e->flushed > log->real_size)
            return vd_fail(ERROR_VHD_INVALID_FILE_SIZE,
                           "VHDX log entry at offset %llu (sequence %llu): FlushedFileOffset %llu is "
                           "past the end of the file (%llu bytes): the file was truncated after the "
                           "entry was written", ull(entry_file), ull(e->sequence), ull(e->flushed),
                           ull(log->real_size));
        if (e->last > VHDX_MAX_REPLAYED_SIZE)
            return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                           "VHDX log entry at offset %llu (sequence %llu): LastFileOffset %llu is "
                           "larger than any VHDX file", ull(entry_file), ull(e->sequence), ull(e->last));
        limit = vhdx_round_up(limit, VHDX_ALIGN);
        if (limit > log->size)
            log->size = limit;

        for (uint32_t d = 0; d < e->descriptors; d++) {
            uint64_t at = (uint64_t)(d + 2) * DESCRIPTOR_SIZE; /* after the 64-byte header */
            const struct vhdx_log_descriptor *desc =
                (const void *)(log_sector(v, e->pos + at / LOG_SECTOR * LOG_SECTOR) + at % LOG_SECTOR);
            struct vhdx_log_write *w = &log->writes[log->count];
            bool is_zero = memcmp(desc->Signature, "zero", 4) == 0;
            w->offset = vd_le64(desc->FileOffset);
            w->length = is_zero ? vd_le64(desc->LeadingBytes) : LOG_SECTOR;
            w->entry = entry_file;
            const char *problem = NULL;
            if (!is_zero && memcmp(desc->Signature, "desc", 4) != 0)
                problem = "signature is neither \"desc\" nor \"zero\"";
            else if (vd_le64(desc->SequenceNumber) != e->sequence)
                problem = "sequence number differs from the entry's";
            else if (w->offset % LOG_SECTOR || w->length % LOG_SECTOR || w->length == 0)
                problem = "file offset or length is not a multiple of 4 KiB";
            else if (w->offset > limit || w->length > limit - w->offset)
                problem = "writes past the entry's LastFileOffset";
            if (!problem && !is_zero) {
                const struct vhdx_log_data_sector *sector = (const void *)log_sector(v, data_pos);
                uint64_t sequence = (uint64_t)vd_le32(sector->SequenceHigh) << 32 | vd_le32(sector->SequenceLow);
                if (data_pos >= data_end)
                    problem = "its data sector lies past the end of the entry";
                else if (memcmp(sector->DataSignature, "data", 4) != 0)
                    problem = "its data sector has no \"data\" signature";
                else if (sequence != e->sequence)
                    problem = "its data sector has another sequence number";
                if (!problem) {
                    uint8_t *out = log->sectors + data * LOG_SECTOR;
                    memcpy(out, desc->LeadingBytes, 8);
                    memcpy(out + 8, sector->Data, DATA_PAYLOAD);
                    memcpy(out + 8 + DATA_PAYLOAD, desc->TrailingBytes, 4);
                    w->data = out;
                    data++;
                    data_pos += LOG_SECTOR;
                }
            }
            if (problem)
                return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                               "VHDX log entry at offset %llu (sequence %llu), descriptor %u (file "
                               "offset %llu, %llu bytes): %s", ull(entry_file), ull(e->sequence), d,
                               ull(w->offset), ull(w->length), problem);
            log->count++;
        }
    }

    log->by_start = malloc((log->count ? log->count : 1) * sizeof *log->by_start);
    log->max_end = malloc((log->count ? log->count : 1) * sizeof *log->max_end);
    if (!log->by_start || !log->max_end)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the replay index of the VHDX log");
    for (size_t i = 0; i < log->count; i++)
        log->by_start[i] = i;
    qsort_r(log->by_start, log->count, sizeof *log->by_start, compare_by_start, log->writes);
    uint64_t max_end = 0;
    for (size_t i = 0; i < log->count; i++) {
        const struct vhdx_log_write *w = &log->writes[log->by_start[i]];
        if (w->offset + w->length > max_end)
            max_end = w->offset + w->length;
        log->max_end[i] = max_end;
    }
    return ERROR_SUCCESS;
}

void vhdx_log_free(struct vhdx_log *log)
{
    if (!log)
        return;
    free(log->writes);
    free(log->sectors);
    free(log->by_start);
    free(log->max_end);
    free(log);
}

DWORD vhdx_log_load(struct vd_image *image, struct vhdx_state *s)
{
    const struct vhdx_header *h = (const void *)s->header;
    uint64_t header_offset = s->current_header ? VHDX_HEADER2_OFFSET : VHDX_HEADER1_OFFSET;
    struct log_view v = {.guid = vd_guid_from_le_bytes(h->LogGuid),
                         .offset = vd_le64(h->LogOffset),
                         .length = vd_le32(h->LogLength)};

    if (vd_guid_is_zero(&v.guid))
        return ERROR_SUCCESS;
    if (vd_le16(h->LogVersion) != 0)
        return vd_fail(ERROR_VHD_FORMAT_UNSUPPORTED_VERSION,
                       "VHDX header at offset %llu: log version %u (only 0 is defined)",
                       ull(header_offset), vd_le16(h->LogVersion));
    if (v.offset % VHDX_ALIGN || v.offset < VHDX_ALIGN || v.length % VHDX_ALIGN || v.length == 0)
        return vd_fail(ERROR_VHD_DRIVE_FOOTER_CORRUPT,
                       "VHDX header at offset %llu: log at %llu (%llu bytes) is not 1 MiB aligned",
                       ull(header_offset), ull(v.offset), ull(v.length));
    if (v.offset > image->file_size || v.length > image->file_size - v.offset)
        return vd_fail(ERROR_VHD_INVALID_FILE_SIZE,
                       "VHDX log at offset %llu (%llu bytes) extends past the end of the file "
                       "(%llu bytes)", ull(v.offset), ull(v.length), ull(image->file_size));
    if (v.length > VHDX_MAX_LOG_LENGTH)
        return vd_fail(ERROR_VIRTUAL_DISK_LIMITATION,
                       "VHDX log at offset %llu is %llu bytes; replaying logs over %llu bytes is "
                       "not supported", ull(v.offset), ull(v.length), ull(VHDX_MAX_LOG_LENGTH));

    uint8_t *bytes = malloc(v.length);
    if (!bytes)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating %llu bytes for the VHDX log", ull(v.length));
    DWORD status = vhdx_read_at(image, bytes, v.length, v.offset, "VHDX log");
    v.bytes = bytes;
    struct entry_info *entries = NULL;
    size_t n = 0;
    if (status == ERROR_SUCCESS)
        status = find_active_sequence(&v, &entries, &n);
    struct vhdx_log *log = NULL;
    if (status == ERROR_SUCCESS && n > 0) {
        log = calloc(1, sizeof *log);
        if (!log)
            status = vd_fail(ERROR_OUTOFMEMORY, "allocating the VHDX log replay");
    }
    if (log) {
        log->real_size = image->file_size;
        log->size = image->file_size;
        log->log_offset = v.offset;
        log->first_entry = v.offset + entries[0].pos;
        log->head_sequence = entries[n - 1].sequence;
        log->entries = n;
        status = build_writes(&v, entries, n, log);
        if (status != ERROR_SUCCESS) {
            vhdx_log_free(log);
            log = NULL;
        }
    }
    free(entries);
    free(bytes);
    if (status != ERROR_SUCCESS)
        return status;
    /* No complete sequence: the log is empty (§2.3.3), nothing to replay. */
    s->log = log;
    if (log)
        image->file_size = log->size; /* the replayed view reads zeros past the real end */
    return ERROR_SUCCESS;
}

/* ---- reading through the replay ---- */

/* The first by_start index whose write could overlap [offset, ...): the
   prefix maxima of the ends are sorted, so a binary search finds it. */
static size_t first_candidate(const struct vhdx_log *log, uint64_t offset)
{
    size_t lo = 0, hi = log->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (log->max_end[mid] <= offset)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int compare_index(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

int vhdx_log_pread(const struct vhdx_log *log, int fd, void *buffer, size_t length, uint64_t offset)
{
    uint8_t *out = buffer;
    size_t on_disk = offset >= log->real_size ? 0
                     : log->real_size - offset < length ? (size_t)(log->real_size - offset) : length;
    if (on_disk) {
        int error = vd_pread_full(fd, out, on_disk, offset);
        if (error)
            return error;
    }
    memset(out + on_disk, 0, length - on_disk);

    /* The writes that overlap, applied in log order so the last one wins. */
    size_t first = first_candidate(log, offset), n = 0;
    for (size_t i = first; i < log->count && log->writes[log->by_start[i]].offset < offset + length; i++)
        n++;
    if (n == 0)
        return 0;
    size_t *hits = malloc(n * sizeof *hits);
    if (!hits)
        return ENOMEM;
    n = 0;
    for (size_t i = first; i < log->count && log->writes[log->by_start[i]].offset < offset + length; i++) {
        const struct vhdx_log_write *w = &log->writes[log->by_start[i]];
        if (w->offset + w->length > offset)
            hits[n++] = log->by_start[i];
    }
    qsort(hits, n, sizeof *hits, compare_index);
    for (size_t k = 0; k < n; k++) {
        const struct vhdx_log_write *w = &log->writes[hits[k]];
        uint64_t from = w->offset > offset ? w->offset : offset;
        uint64_t to = w->offset + w->length < offset + length ? w->offset + w->length : offset + length;
        if (w->data)
            memcpy(out + (from - offset), w->data + (from - w->offset), to - from);
        else
            memset(out + (from - offset), 0, to - from);
    }
    free(hits);
    return 0;
}

/* ---- where replay may write ---- */

DWORD vhdx_log_check_targets(const struct vd_image *image, const struct vhdx_state *s,
                             const struct vhdx_extent *sorted, size_t n)
{
    const struct vhdx_log *log = s->log;
    for (size_t i = 0; log && i < log->count; i++) {
        const struct vhdx_log_write *w = &log->writes[i];
        /* The extents are sorted and disjoint (vhdx_check_overlaps): walk the
           ones that cover the write back to back. */
        for (uint64_t at = w->offset; at < w->offset + w->length;) {
            size_t lo = 0, hi = n;
            while (lo < hi) { /* the first extent starting after `at` */
                size_t mid = lo + (hi - lo) / 2;
                if (sorted[mid].start <= at)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            const struct vhdx_extent *x = lo ? &sorted[lo - 1] : NULL;
            char name[160];
            if (!x || x->start + x->length <= at)
                return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                               "VHDX log entry at offset %llu: its write of %llu bytes at file offset "
                               "%llu reaches %llu, which belongs to no region or block of the file",
                               ull(w->entry), ull(w->length), ull(w->offset), ull(at));
            if (x->kind == VHDX_EXTENT_HEADERS || x->kind == VHDX_EXTENT_LOG)
                return vd_fail(ERROR_VHD_SPARSE_HEADER_CORRUPT,
                               "VHDX log entry at offset %llu: its write of %llu bytes at file offset "
                               "%llu would overwrite %s", ull(w->entry), ull(w->length), ull(w->offset),
                               vhdx_extent_name(x, name, sizeof name));
            at = x->start + x->length;
        }
    }
    return ERROR_SUCCESS;
}

/* ---- replay on disk ---- */

DWORD vhdx_log_apply(struct vd_image *image, struct vhdx_state *s)
{
    struct vhdx_log *log = s->log;
    if (!log)
        return ERROR_SUCCESS;
    /* Growing the file only adds zeros past its end: harmless if we stop. */
    if (log->size > log->real_size && vd_ftruncate(image->fd, (uint64_t)log->size) < 0)
        return vd_fail_errno(errno, "%s: extending the file to %llu bytes for the VHDX log replay",
                             image->path, ull(log->size));
    static const uint8_t zeros[LOG_SECTOR];
    DWORD status = ERROR_SUCCESS;
    for (size_t i = 0; i < log->count && status == ERROR_SUCCESS; i++) {
        const struct vhdx_log_write *w = &log->writes[i];
        for (uint64_t done = 0; done < w->length && status == ERROR_SUCCESS; done += LOG_SECTOR)
            status = vhdx_write_file(image, w->data ? w->data : zeros, LOG_SECTOR, w->offset + done);
    }
    if (status == ERROR_SUCCESS)
        status = vhdx_sync_file(image, "clearing the replayed VHDX log");
    if (status != ERROR_SUCCESS)
        return status;
    /* The log is replayed and durable: a new header without LogGuid. */
    s->log = NULL;
    memset(&s->log_guid, 0, sizeof s->log_guid);
    const struct vhdx_header *h = (const void *)s->header;
    GUID data_write = vd_guid_from_le_bytes(h->DataWriteGuid);
    status = vhdx_write_headers(image, s, &data_write);
    /* Replay is not the session's first change to the disk's data: that
       still gets its new DataWriteGuid. */
    s->session_guids_written = false;
    vhdx_log_free(log);
    return status;
}

/* ---- metadata changes through the log ---- */

DWORD vhdx_log_start(struct vhdx_state *s)
{
    if (!vd_guid_is_zero(&s->log_guid))
        return ERROR_SUCCESS;
    /* A new LogGuid per session: entries an earlier session left in the log
       can never be taken for this one's. */
    int error = vd_guid_generate(&s->log_guid);
    if (error)
        return vd_fail_errno(error, "generating a VHDX LogGuid");
    s->log_position = 0;
    s->log_sequence = 0;
    return ERROR_SUCCESS;
}

DWORD vhdx_log_finish(struct vd_image *image, struct vhdx_state *s)
{
    if (!image->writable || vd_guid_is_zero(&s->log_guid))
        return ERROR_SUCCESS;
    /* Every entry's in-place writes durable, then a header without LogGuid:
       the file needs no replay, and QEMU opens it read-only again. */
    DWORD status = vhdx_sync_file(image, "closing the VHDX log");
    if (status != ERROR_SUCCESS)
        return status;
    const struct vhdx_header *h = (const void *)s->header;
    GUID data_write = vd_guid_from_le_bytes(h->DataWriteGuid);
    bool session = s->session_guids_written;
    memset(&s->log_guid, 0, sizeof s->log_guid);
    status = vhdx_write_headers(image, s, &data_write);
    s->session_guids_written = session;
    return status;
}

static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The 4 KiB sectors the changes touch, sorted and unique, each with its new
   content: what is in the file now with the changes laid over it in order. */
static DWORD gather_sectors(struct vd_image *image, const struct vhdx_meta_change *changes, size_t n,
                            uint64_t **offsets_out, uint8_t **sectors_out, size_t *count_out)
{
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        count += (size_t)((changes[i].offset + changes[i].length + LOG_SECTOR - 1) / LOG_SECTOR
                          - changes[i].offset / LOG_SECTOR);
    uint64_t *offsets = malloc((count ? count : 1) * sizeof *offsets);
    if (!offsets)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the sectors of a VHDX metadata change");
    count = 0;
    for (size_t i = 0; i < n; i++)
        for (uint64_t at = changes[i].offset / LOG_SECTOR * LOG_SECTOR; at < changes[i].offset + changes[i].length;
             at += LOG_SECTOR)
            offsets[count++] = at;
    qsort(offsets, count, sizeof *offsets, compare_u64);
    size_t unique = 0;
    for (size_t i = 0; i < count; i++)
        if (unique == 0 || offsets[unique - 1] != offsets[i])
            offsets[unique++] = offsets[i];
    uint8_t *sectors = calloc(unique ? unique : 1, LOG_SECTOR);
    if (!sectors) {
        free(offsets);
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the sectors of a VHDX metadata change");
    }
    DWORD status = ERROR_SUCCESS;
    for (size_t i = 0; i < unique && status == ERROR_SUCCESS; i++) {
        /* Beyond the end of the file a sector is zeros (space allocated since). */
        uint64_t have = offsets[i] >= image->file_size ? 0
                        : image->file_size - offsets[i] < LOG_SECTOR ? image->file_size - offsets[i] : LOG_SECTOR;
        if (have)
            status = vhdx_read_file(image, sectors + i * LOG_SECTOR, (size_t)have, offsets[i]);
    }
    for (size_t c = 0; c < n && status == ERROR_SUCCESS; c++) {
        const uint8_t *data = changes[c].data;
        for (uint64_t at = changes[c].offset; at < changes[c].offset + changes[c].length;) {
            uint64_t sector = at / LOG_SECTOR * LOG_SECTOR;
            uint64_t *found = bsearch(&sector, offsets, unique, sizeof *offsets, compare_u64);
            uint64_t take = sector + LOG_SECTOR - at;
            if (take > changes[c].offset + changes[c].length - at)
                take = changes[c].offset + changes[c].length - at;
            memcpy(sectors + (size_t)(found - offsets) * LOG_SECTOR + (at - sector), data + (at - changes[c].offset),
                   (size_t)take);
            at += take;
        }
    }
    if (status != ERROR_SUCCESS) {
        free(offsets);
        free(sectors);
        return status;
    }
    *offsets_out = offsets;
    *sectors_out = sectors;
    *count_out = unique;
    return ERROR_SUCCESS;
}

/* Where this session writes its entries: the log the current header names,
   when it is a usable one (1 MiB aligned, inside the file, ours alone). */
static bool log_usable(const struct vd_image *image, const struct vhdx_state *s, uint64_t *offset, uint64_t *length)
{
    const struct vhdx_header *h = (const void *)s->header;
    *offset = vd_le64(h->LogOffset);
    *length = vd_le32(h->LogLength);
    return *offset >= VHDX_ALIGN && *offset % VHDX_ALIGN == 0 && *length >= VHDX_ALIGN && *length % VHDX_ALIGN == 0
           && *offset <= image->file_size && *length <= image->file_size - *offset && *length <= VHDX_MAX_LOG_LENGTH;
}

/* One entry (header, descriptors, data sectors) for sectors[0 .. count). */
static uint8_t *build_entry(const struct vhdx_state *s, const uint64_t *offsets, const uint8_t *sectors,
                            size_t count, uint64_t position, uint64_t sequence, uint64_t file_size, size_t *length)
{
    size_t descriptor_sectors = (count + 2 + 127) / 128;
    *length = (descriptor_sectors + count) * LOG_SECTOR;
    uint8_t *entry = calloc(1, *length);
    if (!entry)
        return NULL;
    struct vhdx_log_entry_header *h = (void *)entry;
    memcpy(h->Signature, "loge", 4);
    vd_put_le32(h->EntryLength, (uint32_t)*length);
    /* Every earlier entry is applied and flushed before this one is written:
       replay starts here. */
    vd_put_le32(h->Tail, (uint32_t)position);
    vd_put_le64(h->SequenceNumber, sequence);
    vd_put_le32(h->DescriptorCount, (uint32_t)count);
    memcpy(h->LogGuid, ((const struct vhdx_header *)s->header)->LogGuid, 16);
    vd_put_le64(h->FlushedFileOffset, file_size);
    vd_put_le64(h->LastFileOffset, file_size);
    for (size_t i = 0; i < count; i++) {
        struct vhdx_log_descriptor *d = (void *)(entry + 64 + i * DESCRIPTOR_SIZE);
        struct vhdx_log_data_sector *data = (void *)(entry + (descriptor_sectors + i) * LOG_SECTOR);
        const uint8_t *sector = sectors + i * LOG_SECTOR;
        memcpy(d->Signature, "desc", 4);
        memcpy(d->TrailingBytes, sector + 8 + DATA_PAYLOAD, 4);
        memcpy(d->LeadingBytes, sector, 8);
        vd_put_le64(d->FileOffset, offsets[i]);
        vd_put_le64(d->SequenceNumber, sequence);
        memcpy(data->DataSignature, "data", 4);
        vd_put_le32(data->SequenceHigh, (uint32_t)(sequence >> 32));
        memcpy(data->Data, sector + 8, DATA_PAYLOAD);
        vd_put_le32(data->SequenceLow, (uint32_t)sequence);
    }
    vd_put_le32(h->Checksum, vd_crc32c(0, entry, *length));
    return entry;
}

DWORD vhdx_meta_write(struct vd_image *image, struct vhdx_state *s, const struct vhdx_meta_change *changes,
                      size_t n)
{
    uint64_t *offsets = NULL;
    uint8_t *sectors = NULL;
    size_t count = 0;
    DWORD status = gather_sectors(image, changes, n, &offsets, &sectors, &count);
    if (status != ERROR_SUCCESS)
        return status;

    uint64_t log_offset, log_length;
    if (!log_usable(image, s, &log_offset, &log_length)) {
        /* No log to write to (a file we did not make): in place, flushed,
           as before logging - each sector write is as atomic as the disk. */
        for (size_t i = 0; i < count && status == ERROR_SUCCESS; i++)
            status = vhdx_write_file(image, sectors + i * LOG_SECTOR, LOG_SECTOR, offsets[i]);
        if (status == ERROR_SUCCESS)
            status = vhdx_sync_file(image, "using the new metadata");
        free(offsets);
        free(sectors);
        return status;
    }

    /* The header must name the log before an entry of it can count. */
    const struct vhdx_header *h = (const void *)s->header;
    GUID guid = vd_guid_from_le_bytes(h->LogGuid);
    if (vd_guid_is_zero(&guid)) {
        bool session = s->session_guids_written;
        GUID data_write = vd_guid_from_le_bytes(h->DataWriteGuid);
        status = vhdx_log_start(s);
        if (status == ERROR_SUCCESS)
            status = vhdx_write_headers(image, s, &data_write);
        s->session_guids_written = session;
    }

    /* As many sectors per entry as the log holds; each entry is one atomic
       step, so callers put what must change together in one call. */
    size_t log_sectors = (size_t)(log_length / LOG_SECTOR);
    size_t per_entry = log_sectors - (log_sectors + 2 + 127) / 128;
    for (size_t first = 0; first < count && status == ERROR_SUCCESS; first += per_entry) {
        size_t k = count - first < per_entry ? count - first : per_entry;
        size_t length = ((k + 2 + 127) / 128 + k) * LOG_SECTOR;
        /* An entry that would run past the end starts again at the front. */
        uint64_t position = s->log_position + length > log_length ? 0 : s->log_position;
        /* Durable before the entry: the caller's data writes (a BAT entry
           must never point at unwritten data) and the previous entry's
           in-place writes (after this entry it is no longer replayed). */
        status = vhdx_sync_file(image, "writing a VHDX log entry");
        uint8_t *entry = NULL;
        if (status == ERROR_SUCCESS) {
            entry = build_entry(s, offsets + first, sectors + first * LOG_SECTOR, k, position,
                                s->log_sequence + 1, image->file_size, &length);
            if (!entry)
                status = vd_fail(ERROR_OUTOFMEMORY, "allocating a VHDX log entry");
        }
        if (status == ERROR_SUCCESS)
            status = vhdx_write_file(image, entry, length, log_offset + position);
        free(entry);
        if (status == ERROR_SUCCESS)
            status = vhdx_sync_file(image, "applying a VHDX log entry");
        if (status == ERROR_SUCCESS) {
            s->log_sequence++;
            s->log_position = (position + length) % log_length;
        }
        /* In place; flushed by the next entry, vhdx_flush or close.  A crash
           before then replays this entry: the same bytes again. */
        for (size_t i = first; i < first + k && status == ERROR_SUCCESS; i++)
            status = vhdx_write_file(image, sectors + i * LOG_SECTOR, LOG_SECTOR, offsets[i]);
    }
    free(offsets);
    free(sectors);
    return status;
}
