/*
 * Test tool: opens an image with the provider's format code (no attach, no
 * loop device) and writes its virtual disk to stdout - the tests' own reader
 * for comparing with qemu-img's, many images a second.
 *
 *   vdread [-w] IMAGE                    the whole disk
 *   vdread [-w] IMAGE OFFSET:LENGTH...   the disk's size (u64, little-endian), then
 *                                        those ranges (ending past the disk: only its size)
 *   -w: open writable (a dirty VHDX log is replayed on disk)
 *
 * Exit 0 with the bytes on stdout, or 2 with "0xCODE detail" on stderr.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bytes.h"
#include "errors.h"
#include "image.h"
#include "shim.h"

static DWORD dump(struct vd_image *image, char *buffer, uint64_t offset, uint64_t length)
{
    enum { CHUNK = 1 << 20 };
    DWORD status = ERROR_SUCCESS;
    for (uint64_t at = offset; status == ERROR_SUCCESS && at < offset + length; at += CHUNK) {
        size_t n = offset + length - at < CHUNK ? (size_t)(offset + length - at) : CHUNK;
        status = image->format->read(image, buffer, at, n);
        if (status == ERROR_SUCCESS && fwrite(buffer, 1, n, stdout) != n)
            status = ERROR_WRITE_FAULT;
    }
    return status;
}

int main(int argc, char **argv)
{
    bool writable = argc >= 3 && strcmp(argv[1], "-w") == 0;
    int first_range = 2 + writable;
    if (argc < first_range) {
        fprintf(stderr, "usage: vdread [-w] IMAGE [OFFSET:LENGTH...]\n");
        return 1;
    }
    struct vd_image *image = NULL;
    vd_clear_detail();
    DWORD status = vd_image_open(argv[first_range - 1], VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, writable, 0, &image);
    char *buffer = malloc(1 << 20);
    if (status == ERROR_SUCCESS && !buffer)
        status = ERROR_OUTOFMEMORY;
    if (status == ERROR_SUCCESS && argc == first_range)
        status = dump(image, buffer, 0, image->virtual_size);
    if (status == ERROR_SUCCESS && argc > first_range) {
        uint8_t size[8];
        vd_put_le64(size, image->virtual_size);
        if (fwrite(size, 1, 8, stdout) != 8)
            status = ERROR_WRITE_FAULT;
        for (int i = first_range; i < argc && status == ERROR_SUCCESS; i++) {
            unsigned long long offset, length;
            if (sscanf(argv[i], "%llu:%llu", &offset, &length) != 2)
                status = ERROR_INVALID_PARAMETER;
            else if (offset + length <= image->virtual_size)
                status = dump(image, buffer, offset, length);
        }
    }
    free(buffer);
    if (image)
        vd_image_close(image);
    if (status != ERROR_SUCCESS) {
        fprintf(stderr, "0x%08X %s\n", (unsigned)status, vd_last_error_detail());
        return 2;
    }
    return fflush(stdout) == 0 ? 0 : 2;
}
