/*
 * The floor of opening a dynamic VHDX for information, in system calls
 * alone: what info_create.py's ratios are measured against.  Each level
 * adds what the design must do to the one before, no parsing, no Python:
 *   bare     open, two 4 KiB reads, close (info_create.py's peer);
 *   format   open, statx, the reads a VHDX needs (file identifier, both
 *            headers, the 64 KiB region table whose checksum covers all of
 *            it, the metadata table and items, the BAT), close;
 *   claim    + the sharing claim on a kept lock file: openat, flock,
 *            fstat (is it still linked?), one F_OFD_SETLK, flock(UN),
 *            the attachment marker's F_OFD_GETLK, close;
 *   info     + what the provider asks besides: capget (may this process
 *            claim?), readlink of /proc/self/fd (the resolved path),
 *            F_SETFL (O_NONBLOCK off), FIEMAP (fragmentation).
 * Usage: open_floor IMAGE LOCKDIR ITERATIONS; prints microseconds per
 * open and the ratio of each level to bare.  IMAGE is a dynamic VHDX
 * made by virtdisk (its metadata at 2 MiB, BAT at 3 MiB); LOCKDIR any
 * directory to keep the lock file in.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { BARE, FORMAT, CLAIM, INFO, LEVELS };
static const char *const names[LEVELS] = {"bare", "format", "claim", "info"};

static uint8_t buffer[64 * 1024];

static void once(int level, const char *image, int dir)
{
    int fd = open(image, O_RDONLY | O_CLOEXEC | O_NOCTTY | (level >= INFO ? O_NONBLOCK : 0));
    if (fd < 0)
        perror("open"), exit(1);
    if (level == BARE) {
        pread(fd, buffer, 4096, 0);
        pread(fd, buffer, 4096, 65536);
        close(fd);
        return;
    }
    struct statx st;
    statx(fd, "", AT_EMPTY_PATH, STATX_BASIC_STATS | STATX_BTIME, &st);
    if (level >= INFO) {
        fcntl(fd, F_SETFL, 0);
        char link[64], name[4096];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        readlink(link, name, sizeof name);
    }
    pread(fd, buffer, 4096, 0);
    pread(fd, buffer, 4096, 64 * 1024);
    pread(fd, buffer, 4096, 128 * 1024);
    pread(fd, buffer, 64 * 1024, 192 * 1024);
    pread(fd, buffer, 4096, 2 * 1024 * 1024);
    pread(fd, buffer, 40, 2 * 1024 * 1024 + 64 * 1024);
    pread(fd, buffer, 16, 3 * 1024 * 1024);
    int lock = -1;
    if (level >= CLAIM) {
        if (level >= INFO) {
            struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
            struct __user_cap_data_struct data[2];
            syscall(SYS_capget, &header, data);
        }
        lock = openat(dir, "floor.lock", O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (lock < 0)
            lock = openat(dir, "floor.lock", O_RDONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0600);
        flock(lock, LOCK_EX | LOCK_NB);
        struct stat ls;
        fstat(lock, &ls);
        struct flock hold = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 100, .l_len = 1};
        fcntl(lock, F_OFD_SETLK, &hold);
        flock(lock, LOCK_UN);
        struct flock marker = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = INT64_MAX - 2, .l_len = 1};
        fcntl(fd, F_OFD_GETLK, &marker);
    }
    if (level >= INFO) {
        struct {
            struct fiemap map;
            struct fiemap_extent extents[256];
        } request = {.map = {.fm_length = ~0ull, .fm_extent_count = 256}};
        ioctl(fd, FS_IOC_FIEMAP, &request);
    }
    if (lock >= 0)
        close(lock);
    close(fd);
}

static double seconds(void)
{
    struct timespec now;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
    return now.tv_sec + now.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return fprintf(stderr, "usage: open_floor IMAGE LOCKDIR ITERATIONS\n"), 2;
    int dir = open(argv[2], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int iterations = atoi(argv[3]);
    if (dir < 0 || iterations <= 0)
        return perror(argv[2]), 1;
    /* Interleaved rounds, best of each: the least disturbed measurement. */
    double best[LEVELS];
    for (int level = 0; level < LEVELS; level++)
        best[level] = 1e9;
    for (int round = 0; round < 15; round++) {
        for (int level = 0; level < LEVELS; level++) {
            double start = seconds();
            for (int i = 0; i < iterations; i++)
                once(level, argv[1], dir);
            double each = (seconds() - start) / iterations;
            if (each < best[level])
                best[level] = each;
        }
    }
    for (int level = 0; level < LEVELS; level++)
        printf("%-7s %6.1fus %5.1fx\n", names[level], best[level] * 1e6, best[level] / best[BARE]);
    return 0;
}
