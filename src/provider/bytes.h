/*
 * On-disk integers (VHD is big-endian, VHDX and ISO little-endian), GUIDs,
 * and whole-buffer pread/pwrite.  Formats convert at this boundary and nowhere
 * else.
 */
#ifndef VD_PROVIDER_BYTES_H
#define VD_PROVIDER_BYTES_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#include "virtdisk.h"

static inline uint16_t vd_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t vd_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t vd_be64(const uint8_t *p) { return (uint64_t)vd_be32(p) << 32 | vd_be32(p + 4); }
static inline uint16_t vd_le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint32_t vd_le32(const uint8_t *p)
{
    return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t vd_le64(const uint8_t *p) { return vd_le32(p) | (uint64_t)vd_le32(p + 4) << 32; }

static inline void vd_put_be16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
static inline void vd_put_be32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static inline void vd_put_be64(uint8_t *p, uint64_t v) { vd_put_be32(p, v >> 32); vd_put_be32(p + 4, (uint32_t)v); }
static inline void vd_put_le16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = v >> 8; }
static inline void vd_put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = v >> 24;
}
static inline void vd_put_le64(uint8_t *p, uint64_t v) { vd_put_le32(p, (uint32_t)v); vd_put_le32(p + 4, v >> 32); }

/* GUIDs: VHDX stores Microsoft's mixed-endian form (the in-memory GUID on a
   little-endian machine); VHD stores 16 bytes that qemu and libvhdi read in
   RFC 4122 (big-endian) order, so that is how they become a GUID here. */
GUID vd_guid_from_le_bytes(const uint8_t bytes[16]);
void vd_guid_to_le_bytes(const GUID *guid, uint8_t bytes[16]);
GUID vd_guid_from_be_bytes(const uint8_t bytes[16]);
void vd_guid_to_be_bytes(const GUID *guid, uint8_t bytes[16]);
bool vd_guid_is_zero(const GUID *guid);

/* Whether length bytes at data are all zero. */
bool vd_all_zero(const void *data, size_t length);
bool vd_guid_equal(const GUID *a, const GUID *b);
/* A random (version 4) GUID; 0 or an errno. */
int vd_guid_generate(GUID *guid);

/* pread/pwrite of exactly length bytes, retrying short transfers and EINTR.
   0 on success, else an errno (EIO for an unexpected end of file). */
int vd_pread_full(int fd, void *buffer, size_t length, uint64_t offset);
int vd_pwrite_full(int fd, const void *buffer, size_t length, uint64_t offset);

/* fdatasync, ftruncate and fallocate as libc has them (0, or -1 and errno),
   for image files: the formats change their files only through these and
   vd_pwrite_full, so that the test seam below sees every change. */
int vd_fdatasync(int fd);
int vd_ftruncate(int fd, uint64_t size);
int vd_fallocate(int fd, int mode, uint64_t offset, uint64_t length);

/* Test seam for the crash-consistency harness (tests/tools/vdwork.c): when
   set, called after every successful write, flush, truncate and allocate
   above, in the order they happened.  Nothing in the provider sets it. */
enum vd_io_op { VD_IO_WRITE = 'W', VD_IO_FLUSH = 'S', VD_IO_TRUNCATE = 'T', VD_IO_ALLOCATE = 'A' };
extern void (*vd_io_observer)(int fd, enum vd_io_op op, uint64_t offset, const void *data, uint64_t length,
                              int mode);

#endif
