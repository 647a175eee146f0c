/*
 * Test tool: serves an image read-only with the provider's FUSE server
 * (fuseserve.c), as the attach helper does but with no loop device on top,
 * so that a test can look at the served file itself (lseek SEEK_DATA and
 * SEEK_HOLE, qemu-img map).  The test is another process: the serving one
 * must never open its own mount (fuseserve.h).
 *
 *   vdserve IMAGE     prints the served file's path and a newline, serves
 *                     until its standard input ends, then lets go of the
 *                     mount and waits for the session to end.
 *
 * Exit 0, or 2 with "0xCODE detail" on stderr.  The mount is in no
 * namespace (fuseserve.h): the path printed goes through this process's
 * descriptor of its root, /proc/<pid>/fd/<n>/disk, which root may open.
 * The mount folder is made in the run directory ($VIRTDISK_RUN_DIR: the
 * test's own).
 */
#include <stdio.h>
#include <unistd.h>

#include "errors.h"
#include "fuseserve.h"
#include "image.h"

static int fail(DWORD status)
{
    fprintf(stderr, "0x%08X %s\n", (unsigned)status, vd_last_error_detail());
    return 2;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: vdserve IMAGE\n");
        return 1;
    }
    struct vd_image *image;
    DWORD status = vd_image_open(argv[1], VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, false, OPEN_VIRTUAL_DISK_FLAG_NONE,
                                 &image);
    if (status != ERROR_SUCCESS)
        return fail(status);
    struct vd_fuse_server *server;
    status = vd_fuse_serve(image, false, &server);
    if (status != ERROR_SUCCESS)
        return fail(status);
    printf("/proc/%ld/fd/%d/%s\n", (long)getpid(), vd_fuse_root(server), VD_FUSE_DISK_NAME);
    fflush(stdout);
    char byte;
    while (read(STDIN_FILENO, &byte, 1) > 0)
        continue;
    vd_fuse_let_go(server);
    status = vd_fuse_wait_end(server);
    return status == ERROR_SUCCESS ? 0 : fail(status);
}
