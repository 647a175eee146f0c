/*
 * Test double, loaded with LD_PRELOAD into a test's subprocess: a file system
 * without fallocate (as some network and FUSE file systems are).  Every
 * fallocate answers EOPNOTSUPP, so the provider's fallbacks run: a fixed
 * disk's space is then written as zeros into the file's holes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>

int fallocate(int fd, int mode, off_t offset, off_t length)
{
    (void)fd, (void)mode, (void)offset, (void)length;
    errno = EOPNOTSUPP;
    return -1;
}

int fallocate64(int fd, int mode, off_t offset, off_t length)
{
    return fallocate(fd, mode, offset, length);
}
