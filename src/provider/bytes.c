/*
 * GUID conversions and whole-buffer file I/O (see bytes.h).
 */
#define _GNU_SOURCE /* fallocate() */
#include "bytes.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

GUID vd_guid_from_le_bytes(const uint8_t bytes[16])
{
    GUID guid;
    guid.Data1 = vd_le32(bytes);
    guid.Data2 = vd_le16(bytes + 4);
    guid.Data3 = vd_le16(bytes + 6);
    memcpy(guid.Data4, bytes + 8, 8);
    return guid;
}

void vd_guid_to_le_bytes(const GUID *guid, uint8_t bytes[16])
{
    vd_put_le32(bytes, guid->Data1);
    vd_put_le16(bytes + 4, guid->Data2);
    vd_put_le16(bytes + 6, guid->Data3);
    memcpy(bytes + 8, guid->Data4, 8);
}

GUID vd_guid_from_be_bytes(const uint8_t bytes[16])
{
    GUID guid;
    guid.Data1 = vd_be32(bytes);
    guid.Data2 = vd_be16(bytes + 4);
    guid.Data3 = vd_be16(bytes + 6);
    memcpy(guid.Data4, bytes + 8, 8);
    return guid;
}

void vd_guid_to_be_bytes(const GUID *guid, uint8_t bytes[16])
{
    vd_put_be32(bytes, guid->Data1);
    vd_put_be16(bytes + 4, guid->Data2);
    vd_put_be16(bytes + 6, guid->Data3);
    memcpy(bytes + 8, guid->Data4, 8);
}

bool vd_all_zero(const void *data, size_t length)
{
    static const uint8_t zeros[64];
    const uint8_t *p = data;
    size_t head = length < sizeof zeros ? length : sizeof zeros;
    /* After the first 64 bytes, each byte is compared with the one 64 before:
       one memcmp over the buffer, no zero buffer as long as it. */
    return memcmp(p, zeros, head) == 0 && (length <= head || memcmp(p, p + head, length - head) == 0);
}

bool vd_guid_is_zero(const GUID *guid)
{
    static const GUID zero;
    return vd_guid_equal(guid, &zero);
}

bool vd_guid_equal(const GUID *a, const GUID *b)
{
    return a->Data1 == b->Data1 && a->Data2 == b->Data2 && a->Data3 == b->Data3 &&
           memcmp(a->Data4, b->Data4, 8) == 0;
}

int vd_guid_generate(GUID *guid)
{
    uint8_t bytes[16];
    size_t have = 0;
    while (have < sizeof bytes) {
        ssize_t n = getrandom(bytes + have, sizeof bytes - have, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        have += (size_t)n;
    }
    bytes[6] = (uint8_t)((bytes[6] & 0x0f) | 0x40); /* version 4 */
    bytes[8] = (uint8_t)((bytes[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    *guid = vd_guid_from_be_bytes(bytes);
    return 0;
}

int vd_pread_full(int fd, void *buffer, size_t length, uint64_t offset)
{
    uint8_t *p = buffer;
    while (length > 0) {
        ssize_t n = pread(fd, p, length, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return EIO;
        p += n;
        length -= (size_t)n;
        offset += (uint64_t)n;
    }
    return 0;
}

void (*vd_io_observer)(int fd, enum vd_io_op op, uint64_t offset, const void *data, uint64_t length, int mode);

int vd_pwrite_full(int fd, const void *buffer, size_t length, uint64_t offset)
{
    const uint8_t *p = buffer;
    if (vd_io_observer)
        vd_io_observer(fd, VD_IO_WRITE, offset, buffer, length, 0);
    while (length > 0) {
        ssize_t n = pwrite(fd, p, length, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        p += n;
        length -= (size_t)n;
        offset += (uint64_t)n;
    }
    return 0;
}

int vd_fdatasync(int fd)
{
    int result = fdatasync(fd);
    if (result == 0 && vd_io_observer)
        vd_io_observer(fd, VD_IO_FLUSH, 0, NULL, 0, 0);
    return result;
}

int vd_ftruncate(int fd, uint64_t size)
{
    int result = ftruncate(fd, (off_t)size);
    if (result == 0 && vd_io_observer)
        vd_io_observer(fd, VD_IO_TRUNCATE, size, NULL, 0, 0);
    return result;
}

int vd_fallocate(int fd, int mode, uint64_t offset, uint64_t length)
{
    int result = fallocate(fd, mode, (off_t)offset, (off_t)length);
    if (result == 0 && vd_io_observer)
        vd_io_observer(fd, VD_IO_ALLOCATE, offset, NULL, length, mode);
    return result;
}
