/*
 * VHDX log ([MS-VHDX] §2.3).
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


/* Does the log hold an entry that belongs to the header's LogGuid?  Such an
   entry may describe metadata or data updates that never reached their final
   place, so the file must not be read before the log is replayed.  We do not
   replay; we only tell an empty log (no entry of this LogGuid with a valid
   checksum, which §2.3.3 treats as empty) from a non-empty one. */
DWORD vhdx_check_log(struct vd_image *image, struct vhdx_state *s)
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
        status = vhdx_read_at(image, &e, sizeof e, log_offset + pos, "VHDX log entry");
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
                status = vhdx_read_at(image, buffer, n, log_offset + pos + done, "VHDX log entry");
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
