/*
 * The shared body of the fuzz targets (harness.h).
 *
 * Parents: a differencing input names its parent by a relative locator
 * (".\parent.vhd", "./parent.vhdx") as the seeds from make_corpus.py do; the
 * harness keeps copies of the seed parents (from $VD_FUZZ_PARENTS, default
 * the build's fuzz/corpus/parents) next to the input file, so a mutated child
 * opens a real parent and its chain checks run.
 */
#define _GNU_SOURCE
#include "harness.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crc32c.h"
#include "errors.h"
#include "image.h"
#include "shim.h"
#include "winerror.h"

/* Big enough for every seed; sparse on tmpfs, so it costs nothing. */
#define VD_FUZZ_MAX_FILE (UINT64_C(64) << 20)
/* In file_size: write the checksums as the input has them.  Without it the
   harness recomputes them (VHD footer and dynamic header, VHDX headers and
   region tables), or nearly every mutation would stop at a checksum. */
#define VD_FUZZ_KEEP_CHECKSUMS (UINT64_C(1) << 63)

static char vd_fuzz_dir[256];
static char vd_fuzz_input[300];

static void vd_fuzz_die(const char *what)
{
    fprintf(stderr, "fuzz harness: %s: %s\n", what, strerror(errno));
    abort();
}

static void vd_fuzz_copy(const char *from, const char *to)
{
    int in = open(from, O_RDONLY | O_CLOEXEC);
    if (in < 0) {
        fprintf(stderr, "fuzz harness: no seed parent %s (differencing inputs will not find it)\n", from);
        return;
    }
    int out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0)
        vd_fuzz_die(to);
    char buffer[65536];
    ssize_t n;
    while ((n = read(in, buffer, sizeof buffer)) > 0)
        if (write(out, buffer, (size_t)n) != n)
            vd_fuzz_die(to);
    close(in);
    close(out);
}

static void vd_fuzz_cleanup(void)
{
    static const char *const names[] = {"input.img", "parent.vhd", "parent.vhdx"};
    char path[400];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", vd_fuzz_dir, names[i]);
        unlink(path);
    }
    rmdir(vd_fuzz_dir);
}

static void vd_fuzz_init(void)
{
    const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(vd_fuzz_dir, sizeof vd_fuzz_dir, "%s/vd-fuzz-%ld", base, (long)getpid());
    if (mkdir(vd_fuzz_dir, 0700) < 0 && errno != EEXIST)
        vd_fuzz_die(vd_fuzz_dir);
    snprintf(vd_fuzz_input, sizeof vd_fuzz_input, "%s/input.img", vd_fuzz_dir);
    const char *parents = getenv("VD_FUZZ_PARENTS");
    if (!parents)
        parents = VD_FUZZ_DEFAULT_PARENTS;
    char from[400], to[400];
    static const char *const names[] = {"parent.vhd", "parent.vhdx"};
    for (size_t i = 0; i < 2; i++) {
        snprintf(from, sizeof from, "%s/%s", parents, names[i]);
        snprintf(to, sizeof to, "%s/%s", vd_fuzz_dir, names[i]);
        vd_fuzz_copy(from, to);
    }
    atexit(vd_fuzz_cleanup);
}

static uint64_t vd_fuzz_le(const uint8_t *p, size_t n)
{
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* Recomputes the checksum of a structure found at offset with the given
   signature, so that mutations reach the checks behind the checksums. */
static void vd_fuzz_reseal(int fd, uint64_t offset, const char *signature, size_t length, size_t checksum_at,
                           bool vhd_sum)
{
    static uint8_t buffer[64 * 1024];
    if (pread(fd, buffer, length, (off_t)offset) != (ssize_t)length ||
        memcmp(buffer, signature, strlen(signature)) != 0)
        return;
    memset(buffer + checksum_at, 0, 4);
    uint8_t sum[4];
    if (vhd_sum) {
        uint32_t total = 0;
        for (size_t i = 0; i < length; i++)
            total += buffer[i];
        total = ~total;
        sum[0] = (uint8_t)(total >> 24), sum[1] = (uint8_t)(total >> 16), sum[2] = (uint8_t)(total >> 8);
        sum[3] = (uint8_t)total;
    } else {
        uint32_t crc = vd_crc32c(0, buffer, length);
        sum[0] = (uint8_t)crc, sum[1] = (uint8_t)(crc >> 8), sum[2] = (uint8_t)(crc >> 16);
        sum[3] = (uint8_t)(crc >> 24);
    }
    if (pwrite(fd, sum, 4, (off_t)(offset + checksum_at)) != 4)
        vd_fuzz_die("pwrite");
}

static void vd_fuzz_reseal_all(int fd)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        vd_fuzz_die("fstat");
    uint64_t size = (uint64_t)st.st_size;
    if (size >= 512) {
        uint8_t footer[512];
        if (pread(fd, footer, sizeof footer, (off_t)(size - 512)) == (ssize_t)sizeof footer &&
            memcmp(footer, "conectix", 8) == 0) {
            vd_fuzz_reseal(fd, size - 512, "conectix", 512, 64, true);
            uint64_t header = 0;
            for (int i = 0; i < 8; i++)
                header = header << 8 | footer[16 + i];
            if (header < size && size - header >= 1024)
                vd_fuzz_reseal(fd, header, "cxsparse", 1024, 36, true);
        }
    }
    static const uint64_t headers[] = {64 * 1024, 128 * 1024}, tables[] = {192 * 1024, 256 * 1024};
    for (int i = 0; i < 2; i++) {
        if (headers[i] + 4096 <= size)
            vd_fuzz_reseal(fd, headers[i], "head", 4096, 4, false);
        if (tables[i] + 65536 <= size)
            vd_fuzz_reseal(fd, tables[i], "regi", 65536, 4, false);
    }
    /* Log entries (VHDX §2.3.1.1) of the log the first header names, so that
       mutations inside an entry reach the descriptor and target checks; only
       entries that neither wrap nor exceed the reseal buffer. */
    uint8_t header[80];
    if (pread(fd, header, sizeof header, 64 * 1024) != (ssize_t)sizeof header || memcmp(header, "head", 4) != 0)
        return;
    uint64_t log_offset = vd_fuzz_le(header + 72, 8), log_length = vd_fuzz_le(header + 68, 4);
    if (log_offset >= size || log_length > size - log_offset || log_length > VD_FUZZ_MAX_FILE)
        return;
    for (uint64_t at = 0; at + 4096 <= log_length; at += 4096) {
        uint8_t entry[16];
        if (pread(fd, entry, sizeof entry, (off_t)(log_offset + at)) != (ssize_t)sizeof entry ||
            memcmp(entry, "loge", 4) != 0)
            continue;
        uint64_t length = vd_fuzz_le(entry + 8, 4);
        if (length >= 4096 && length <= 64 * 1024 && length <= log_length - at)
            vd_fuzz_reseal(fd, log_offset + at, "loge", (size_t)length, 4, false);
    }
}

static void vd_fuzz_write_image(const uint8_t *data, size_t size)
{
    int fd = open(vd_fuzz_input, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        vd_fuzz_die(vd_fuzz_input);
    uint64_t file_size = size >= 8 ? vd_fuzz_le(data, 8) : 0;
    bool keep_checksums = file_size & VD_FUZZ_KEEP_CHECKSUMS;
    file_size &= ~VD_FUZZ_KEEP_CHECKSUMS;
    if (file_size > VD_FUZZ_MAX_FILE)
        file_size = VD_FUZZ_MAX_FILE;
    if (ftruncate(fd, (off_t)file_size) < 0)
        vd_fuzz_die("ftruncate");
    size_t at = size >= 8 ? 8 : size;
    while (size - at >= 6) {
        uint64_t offset = vd_fuzz_le(data + at, 4);
        size_t length = (size_t)vd_fuzz_le(data + at + 4, 2);
        at += 6;
        if (length > size - at)
            length = size - at;
        if (offset + length <= VD_FUZZ_MAX_FILE && pwrite(fd, data + at, length, (off_t)offset) != (ssize_t)length)
            vd_fuzz_die("pwrite");
        at += length;
    }
    if (!keep_checksums)
        vd_fuzz_reseal_all(fd);
    close(fd);
}

/* What a malformed image may answer: the VirtDisk codes (facility 0x3A,
   which the facade raises as InvalidImageError or a subclass) and, for ISO,
   ERROR_FILE_CORRUPT.  Anything else (ERROR_GEN_FAILURE from a read past the
   end, ERROR_OUTOFMEMORY from an unbounded allocation, ...) breaks a promise. */
static bool vd_fuzz_code_allowed(DWORD code)
{
    return (code & 0xFFFF0000u) == 0xC03A0000u || code == ERROR_FILE_CORRUPT;
}

static void vd_fuzz_check(DWORD status, const char *what)
{
    if (status == ERROR_SUCCESS || getenv("VD_FUZZ_ANY_CODE"))
        return;
    const char *detail = vd_last_error_detail();
    if (!vd_fuzz_code_allowed(status) || !detail || !*detail) {
        fprintf(stderr, "fuzz harness: %s answered 0x%08X (%s) with detail \"%s\"\n", what, (unsigned)status,
                vd_error_name(status) ? vd_error_name(status) : "?", detail ? detail : "");
        abort();
    }
}

static void vd_fuzz_read(struct vd_image *image, uint64_t offset, size_t length)
{
    static uint8_t buffer[3 * 4096];
    if (length > sizeof buffer)
        length = sizeof buffer;
    if (offset > image->virtual_size || length > image->virtual_size - offset)
        return;
    vd_clear_detail();
    vd_fuzz_check(image->format->read(image, buffer, offset, length), "read()");
}

void vd_fuzz_one(const uint8_t *data, size_t size, ULONG device_id)
{
    static bool ready;
    if (!ready) {
        vd_fuzz_init();
        ready = true;
    }
    vd_fuzz_write_image(data, size);

    struct vd_image *image = NULL;
    vd_clear_detail();
    DWORD status = vd_image_open(vd_fuzz_input, device_id, false, 0, &image);
    if (getenv("VD_FUZZ_VERBOSE"))
        fprintf(stderr, "fuzz harness: open: 0x%08X %s%s\n", (unsigned)status, vd_last_error_detail(),
                status == ERROR_SUCCESS && image->subtype == VD_SUBTYPE_DIFFERENCING
                    ? (image->parent_resolved ? " (parent resolved)" : " (parent not resolved)")
                    : "");
    vd_fuzz_check(status, "vd_image_open()");
    if (status != ERROR_SUCCESS)
        return;

    uint64_t sector = image->logical_sector_size ? image->logical_sector_size : 512;
    uint64_t sectors = image->virtual_size / sector;
    uint64_t hash = 1469598103934665603ull;
    for (size_t i = 0; i < size; i++)
        hash = (hash ^ data[i]) * 1099511628211ull;
    if (sectors) {
        vd_fuzz_read(image, 0, sector);
        vd_fuzz_read(image, (sectors - 1) * sector, sector);
        vd_fuzz_read(image, hash % sectors * sector, sector);
        /* Across a block boundary: two blocks' mappings in one call. */
        if (image->block_size && image->virtual_size > image->block_size)
            vd_fuzz_read(image, image->block_size - sector, 3 * sector);
        /* Unaligned, for the partial-sector paths. */
        vd_fuzz_read(image, hash % image->virtual_size, (size_t)(hash >> 40) % 1500 + 1);
    }
    vd_image_close(image);
}
