/*
 * Test tool: a write into a block that a discard takes out of the file at
 * that very moment must not land in the block that reuses the space.
 *
 *   vdrace IMAGE
 *
 * IMAGE: a dynamic VHDX of 1 MiB blocks with block 0 written.  A thread
 * writes 4 KiB into block 0 (present: no lock but the map's), its pwrite
 * held back (__wrap_pwrite, linked with -Wl,--wrap=pwrite) until the main
 * thread has started discarding block 0; the main thread then writes all of
 * block 5, a new block that takes block 0's freed space.  Exit 0 when block
 * 5 reads back what was written, 3 when the late write landed in it, 2 on
 * an error.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "errors.h"
#include "image.h"

#define MIB (1024 * 1024)

ssize_t __real_pwrite(int fd, const void *buffer, size_t length, off_t offset);

static pthread_t slow_thread;
static volatile int armed;

/* The slow thread's 4 KiB write waits 300 ms before it reaches the file:
   long enough for the discard to run, if nothing holds it back. */
ssize_t __wrap_pwrite(int fd, const void *buffer, size_t length, off_t offset)
{
    if (armed && pthread_equal(pthread_self(), slow_thread) && length == 4096) {
        armed = 0;
        struct timespec pause = {0, 300 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    return __real_pwrite(fd, buffer, length, offset);
}

static struct vd_image *image;
static DWORD slow_status;

static void *slow_write(void *unused)
{
    static uint8_t data[4096];
    memset(data, 'A', sizeof data);
    slow_status = image->format->write(image, data, 4096, sizeof data);
    return NULL;
}

static int fail(const char *what, DWORD status)
{
    fprintf(stderr, "0x%08X %s: %s\n", (unsigned)status, what, vd_last_error_detail());
    return 2;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: vdrace IMAGE\n");
        return 2;
    }
    DWORD status = vd_image_open(argv[1], VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, true, 0, &image);
    if (status != ERROR_SUCCESS)
        return fail("open", status);
    /* The session's header update first, so that the slow write is the
       only 4 KiB pwrite of its thread. */
    uint8_t *block = malloc(MIB);
    memset(block, 'B', MIB);
    status = image->format->write(image, block, 15 * MIB, 512);
    if (status != ERROR_SUCCESS)
        return fail("first write", status);

    armed = 1;
    if (pthread_create(&slow_thread, NULL, slow_write, NULL) != 0)
        return fail("thread", ERROR_OUTOFMEMORY);
    struct timespec pause = {0, 100 * 1000 * 1000};
    nanosleep(&pause, NULL); /* the slow write is inside its pwrite now */
    status = image->format->discard(image, 0, MIB);
    if (status == ERROR_SUCCESS)
        status = image->format->write(image, block, 5 * MIB, MIB);
    pthread_join(slow_thread, NULL);
    if (status != ERROR_SUCCESS)
        return fail("discard and write", status);
    if (slow_status != ERROR_SUCCESS)
        return fail("slow write", slow_status);

    uint8_t *back = malloc(MIB);
    status = image->format->read(image, back, 5 * MIB, MIB);
    if (status != ERROR_SUCCESS)
        return fail("read", status);
    int result = memcmp(back, block, MIB) == 0 ? 0 : 3;
    if (result)
        fprintf(stderr, "block 5 does not read back what was written to it\n");
    vd_image_close(image);
    free(block);
    free(back);
    return result;
}
