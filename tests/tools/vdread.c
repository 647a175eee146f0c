/*
 * Test tool: opens an image with the provider's format code (no attach, no
 * loop device) and writes its virtual disk to stdout - the tests' own reader
 * for comparing with qemu-img's, many images a second.
 *
 *   vdread [-w] IMAGE     -w: open writable (a dirty VHDX log is replayed on disk)
 *
 * Exit 0 with the disk's bytes on stdout, or 2 with "0xCODE detail" on stderr.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "image.h"
#include "shim.h"

int main(int argc, char **argv)
{
    bool writable = argc == 3 && strcmp(argv[1], "-w") == 0;
    if (argc != 2 + writable) {
        fprintf(stderr, "usage: vdread [-w] IMAGE\n");
        return 1;
    }
    struct vd_image *image = NULL;
    vd_clear_detail();
    DWORD status = vd_image_open(argv[argc - 1], VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, writable, 0, &image);
    enum { CHUNK = 1 << 20 };
    char *buffer = malloc(CHUNK);
    for (uint64_t at = 0; status == ERROR_SUCCESS && buffer && at < image->virtual_size; at += CHUNK) {
        size_t n = image->virtual_size - at < CHUNK ? (size_t)(image->virtual_size - at) : CHUNK;
        status = image->format->read(image, buffer, at, n);
        if (status == ERROR_SUCCESS && fwrite(buffer, 1, n, stdout) != n)
            status = ERROR_WRITE_FAULT;
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
