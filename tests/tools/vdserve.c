/*
 * Test tool: serves an image with the provider's FUSE server (fuseserve.c),
 * as the attach helper does but with no loop device on top, so that a test
 * can look at the served file itself (lseek SEEK_DATA and SEEK_HOLE, qemu-img
 * map, st_blocks) and write and fallocate it as the loop device would.  The
 * test is another process: the serving one must never open its own mount
 * (fuseserve.h).
 *
 *   vdserve [-w] IMAGE  prints the served file's path and a newline, then
 *                       serves (read-write with -w, else read-only) until
 *                       its standard input ends, then lets go of the
 *                       mount and waits for the session to end.
 *                       Meanwhile each line read is a command, answered by
 *                       one line, "ok" or "0xCODE detail":
 *     compact           compacts the served image as CompactVirtualDisk
 *                       does on a disk attached read-only (servecompact.h),
 *                       and waits for it to end.
 *
 * Exit 0, or 2 with "0xCODE detail" on stderr.  The mount is in no
 * namespace (fuseserve.h): the path printed goes through this process's
 * descriptor of its root, /proc/<pid>/fd/<n>/disk, which root may open.
 * The mount folder is made in the run directory ($VIRTDISK_RUN_DIR: the
 * test's own).
 */
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "errors.h"
#include "fuseserve.h"
#include "image.h"
#include "servecompact.h"

static int fail(DWORD status)
{
    fprintf(stderr, "0x%08X %s\n", (unsigned)status, vd_last_error_detail());
    return 2;
}

static DWORD compact(struct vd_fuse_server *server)
{
    struct vd_serve_compact *c;
    DWORD status = vd_serve_compact_start(server, 0, &c);
    if (status != ERROR_SUCCESS)
        return status;
    while (vd_serve_compact_active(c))
        nanosleep(&(struct timespec){.tv_nsec = 10 * 1000 * 1000}, NULL);
    struct vd_msg_operation_state state;
    char detail[512];
    vd_serve_compact_state(c, &state, detail, sizeof detail);
    vd_serve_compact_free(c);
    return state.status == ERROR_SUCCESS ? ERROR_SUCCESS : vd_fail(state.status, "%s", detail);
}

int main(int argc, char **argv)
{
    bool writable = argc == 3 && strcmp(argv[1], "-w") == 0;
    if (argc != 2 + writable) {
        fprintf(stderr, "usage: vdserve [-w] IMAGE\n");
        return 1;
    }
    struct vd_image *image;
    DWORD status = vd_image_open(argv[argc - 1], VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, writable,
                                 OPEN_VIRTUAL_DISK_FLAG_NONE, &image);
    if (status != ERROR_SUCCESS)
        return fail(status);
    struct vd_fuse_server *server;
    status = vd_fuse_serve(image, writable, &server);
    if (status != ERROR_SUCCESS)
        return fail(status);
    printf("/proc/%ld/fd/%d/%s\n", (long)getpid(), vd_fuse_root(server), VD_FUSE_DISK_NAME);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        status = strcmp(line, "compact\n") == 0 ? compact(server)
                                                : vd_fail(ERROR_INVALID_PARAMETER, "unknown command");
        if (status == ERROR_SUCCESS)
            printf("ok\n");
        else
            printf("0x%08X %s\n", (unsigned)status, vd_last_error_detail());
        fflush(stdout);
    }
    vd_fuse_let_go(server);
    status = vd_fuse_wait_end(server);
    return status == ERROR_SUCCESS ? 0 : fail(status);
}
