/*
 * Test tool for the crash-consistency harness: runs a workload on an image
 * through the provider's format operations, with the provider's I/O seam
 * (vd_io_observer) recording every write, flush, truncate and allocate on the
 * image into a trace, and markers for what the workload was told succeeded.
 *
 *   vdwork TRACE IMAGE STEP...
 *     w:OFFSET:LENGTH:SEED   write LENGTH bytes of pattern SEED at OFFSET
 *     f                      flush (format->flush, or fdatasync)
 *     r:SIZE                 resize (format->resize)
 *     p:PARENT               set parent (format->set_parent, PARENT opened read-only)
 *     d:OFFSET:LENGTH        discard (format->discard): the range reads as zeros
 *     Z:OFFSET:LENGTH        zero a range, staying allocated (format->write_zeroes,
 *                            else a write of zeros): marked as a discard, as it too
 *                            reads zeros once flushed
 *     z:OFFSET:LENGTH        write LENGTH bytes of zeros at OFFSET (unmarked: for
 *                            making images whose whole disk is compared, not
 *                            for workloads checked against the markers)
 *     c:FLAGS                compact (vd_compact_image, COMPACT_VIRTUAL_DISK_FLAG bits)
 *
 * Trace records, little-endian: u8 op, u64 offset, u64 length, u32 mode, then
 * length bytes of data for op 'W'.  Ops: the seam's W S T A, and the markers
 * 'V' (a write acknowledged: offset, length, mode = seed), 'D' (a discard
 * acknowledged: offset, length), 'F' (a flush acknowledged), 'M' (a resize
 * or set parent acknowledged: offset = size), 'C' (a compaction
 * acknowledged).
 * The pattern byte at disk offset o of seed s is (o / 512 * 131 + s * 17 + o % 512) & 0xFF.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bytes.h"
#include "compact.h"
#include "errors.h"
#include "image.h"
#include "job.h"
#include "shim.h"

static FILE *trace;
static int image_fd = -1;

static void put(char op, uint64_t offset, uint64_t length, uint32_t mode, const void *data)
{
    uint8_t head[21];
    head[0] = (uint8_t)op;
    vd_put_le64(head + 1, offset);
    vd_put_le64(head + 9, length);
    vd_put_le32(head + 17, mode);
    if (fwrite(head, 1, sizeof head, trace) != sizeof head || (data && fwrite(data, 1, length, trace) != length)) {
        perror("vdwork: trace");
        exit(1);
    }
}

static void observe(int fd, enum vd_io_op op, uint64_t offset, const void *data, uint64_t length, int mode)
{
    if (fd == image_fd)
        put((char)op, offset, length, (uint32_t)mode, op == VD_IO_WRITE ? data : NULL);
}

static int fail(const char *step, DWORD status)
{
    fprintf(stderr, "0x%08X %s: %s\n", (unsigned)status, step, vd_last_error_detail());
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: vdwork TRACE IMAGE STEP...\n");
        return 1;
    }
    trace = fopen(argv[1], "wb");
    if (!trace) {
        perror(argv[1]);
        return 1;
    }
    struct vd_image *image = NULL;
    DWORD status = vd_image_open(argv[2], VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, true, 0, &image);
    if (status != ERROR_SUCCESS)
        return fail("open", status);
    image_fd = image->fd;
    vd_io_observer = observe;
    for (int i = 3; i < argc; i++) {
        const char *step = argv[i];
        if (step[0] == 'w') {
            unsigned long long offset, length, seed;
            if (sscanf(step, "w:%llu:%llu:%llu", &offset, &length, &seed) != 3)
                return fail(step, ERROR_INVALID_PARAMETER);
            uint8_t *data = malloc(length);
            for (unsigned long long o = offset; o < offset + length; o++)
                data[o - offset] = (uint8_t)((o / 512 * 131 + seed * 17 + o % 512) & 0xFF);
            status = image->format->write(image, data, offset, length);
            free(data);
            if (status != ERROR_SUCCESS)
                return fail(step, status);
            put('V', offset, length, (uint32_t)seed, NULL);
        } else if (step[0] == 'd') {
            unsigned long long offset, length;
            if (sscanf(step, "d:%llu:%llu", &offset, &length) != 2)
                return fail(step, ERROR_INVALID_PARAMETER);
            status = image->format->discard(image, offset, length);
            if (status != ERROR_SUCCESS)
                return fail(step, status);
            put('D', offset, length, 0, NULL);
        } else if (step[0] == 'Z') {
            unsigned long long offset, length;
            if (sscanf(step, "Z:%llu:%llu", &offset, &length) != 2)
                return fail(step, ERROR_INVALID_PARAMETER);
            if (image->format->write_zeroes) {
                status = image->format->write_zeroes(image, offset, length);
            } else {
                uint8_t *data = calloc(1, length);
                status = image->format->write(image, data, offset, length);
                free(data);
            }
            if (status != ERROR_SUCCESS)
                return fail(step, status);
            put('D', offset, length, 0, NULL);
        } else if (step[0] == 'f') {
            status = image->format->flush ? image->format->flush(image)
                                          : (vd_fdatasync(image->fd) == 0 ? ERROR_SUCCESS : ERROR_WRITE_FAULT);
            if (status != ERROR_SUCCESS)
                return fail(step, status);
            put('F', 0, 0, 0, NULL);
        } else if (step[0] == 'r') {
            unsigned long long size;
            if (sscanf(step, "r:%llu", &size) != 1)
                return fail(step, ERROR_INVALID_PARAMETER);
            struct vd_job job = {0}; /* synchronous: never cancelled */
            status = image->format->resize(image, size, &job);
            if (status != ERROR_SUCCESS)
                return fail(step, status);
            put('M', size, 0, 0, NULL);
        } else if (step[0] == 'p') {
            struct vd_image *parent = NULL;
            status = vd_image_open(step + 2, VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, false, 0, &parent);
            if (status == ERROR_SUCCESS)
                status = image->format->set_parent(image, parent);
            if (status != ERROR_SUCCESS)
                return fail(step, status);
            put('M', image->virtual_size, 0, 1, NULL);
        } else if (step[0] == 'z') {
            unsigned long long offset, length;
            if (sscanf(step, "z:%llu:%llu", &offset, &length) != 2)
                return fail(step, ERROR_INVALID_PARAMETER);
            uint8_t *data = calloc(1, length);
            status = image->format->write(image, data, offset, length);
            free(data);
            if (status != ERROR_SUCCESS)
                return fail(step, status);
        } else if (step[0] == 'c') {
            unsigned flags;
            if (sscanf(step, "c:%u", &flags) != 1)
                return fail(step, ERROR_INVALID_PARAMETER);
            struct vd_job job = {.status = ERROR_IO_PENDING, .event_fd = -1}; /* no thread, no event */
            status = vd_compact_image(image, flags, &job);
            if (status != ERROR_SUCCESS)
                return fail(step, status);
            put('C', image->file_size, 0, 0, NULL);
        } else {
            return fail(step, ERROR_INVALID_PARAMETER);
        }
    }
    vd_image_close(image); /* a VHDX session's last writes: its headers without LogGuid */
    put('F', 0, 0, 0, NULL);
    return fclose(trace) == 0 ? 0 : 1;
}
