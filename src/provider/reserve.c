/*
 * Reserving a fixed disk's space in steps, for a job (reserve.h).
 */
#define _GNU_SOURCE
#include "reserve.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bytes.h"
#include "errors.h"

/* A step small enough that progress moves and a cancel is seen within a
   fraction of a second, large enough that the calls cost nothing. */
enum { VD_ALLOCATE_STEP = 64 << 20, VD_ZERO_CHUNK = 1 << 20 };

/* Zeros into the holes of [offset, end) of fd, for file systems that cannot
   preallocate.  Only holes: data already there (the image's metadata) must
   stay; a hole reads as zeros, so filling one with zeros changes nothing. */
static int vd_fill_holes(int fd, uint64_t offset, uint64_t end)
{
    static const uint8_t zeros[VD_ZERO_CHUNK];
    while (offset < end) {
        off_t hole = lseek(fd, (off_t)offset, SEEK_HOLE);
        if (hole < 0)
            return errno == ENXIO ? 0 : errno;
        if ((uint64_t)hole >= end)
            return 0;
        off_t data = lseek(fd, hole, SEEK_DATA);
        uint64_t stop = data < 0 || (uint64_t)data > end ? end : (uint64_t)data;
        for (uint64_t at = (uint64_t)hole; at < stop;) {
            size_t n = stop - at < VD_ZERO_CHUNK ? (size_t)(stop - at) : VD_ZERO_CHUNK;
            int error = vd_pwrite_full(fd, zeros, n, at);
            if (error)
                return error;
            at += n;
        }
        offset = stop;
    }
    return 0;
}

/* Gives back what KEEP_SIZE reserved past the end of the file: truncating
   to the size it has frees the blocks beyond it. */
static void vd_unreserve(int fd)
{
    struct stat st;
    if (fstat(fd, &st) == 0 && vd_ftruncate(fd, (uint64_t)st.st_size) < 0)
        return; /* only space, and nothing else to do about it */
}

static DWORD vd_job_reserve(struct vd_job *job, int fd, int mode, uint64_t offset, uint64_t length,
                            const char *path)
{
    for (uint64_t done = 0; done < length;) {
        if (vd_job_cancelled(job))
            return vd_fail(ERROR_OPERATION_ABORTED, "%s: cancelled while allocating", path);
        uint64_t n = length - done < VD_ALLOCATE_STEP ? length - done : VD_ALLOCATE_STEP;
        int result;
        do
            result = vd_fallocate(fd, mode, offset + done, n);
        while (result < 0 && errno == EINTR);
        if (result < 0 && (errno == EOPNOTSUPP || errno == ENOSYS)) {
            if (mode & FALLOC_FL_KEEP_SIZE)
                return ERROR_SUCCESS; /* nothing to reserve ahead: the caller extends the file */
            int error = vd_fill_holes(fd, offset + done, offset + done + n);
            if (error)
                return vd_fail_errno(error, "%s: writing zeros at offset %llu", path,
                                     (unsigned long long)(offset + done));
        } else if (result < 0) {
            return vd_fail_errno(errno, "%s: allocating %llu bytes at offset %llu", path, (unsigned long long)n,
                                 (unsigned long long)(offset + done));
        }
        done += n;
        vd_job_advance(job, n);
    }
    /* A cancel that came during the last step still finds nothing changed. */
    if (vd_job_cancelled(job))
        return vd_fail(ERROR_OPERATION_ABORTED, "%s: cancelled while allocating", path);
    return ERROR_SUCCESS;
}

DWORD vd_job_fallocate(struct vd_job *job, int fd, int mode, uint64_t offset, uint64_t length, const char *path)
{
    DWORD status = vd_job_reserve(job, fd, mode, offset, length, path);
    if (status != ERROR_SUCCESS && (mode & FALLOC_FL_KEEP_SIZE))
        vd_unreserve(fd);
    return status;
}
