/*
 * CRC-32C by slicing-by-8: VHDX checksums cover at most 64 KiB at a time
 * (region tables) or a log entry, so a portable table method is plenty; no
 * SSE4.2 dispatch to keep the provider free of CPU-specific code paths.
 */
#include "crc32c.h"

#include <pthread.h>

#define CRC32C_POLY 0x82F63B78u

static uint32_t crc32c_table[8][256];
static pthread_once_t crc32c_table_once = PTHREAD_ONCE_INIT;

static void crc32c_build_table(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++)
            crc = crc & 1 ? crc >> 1 ^ CRC32C_POLY : crc >> 1;
        crc32c_table[0][n] = crc;
    }
    /* table[k][n]: the CRC of byte n followed by k zero bytes, which lets
       the main loop fold eight input bytes per step. */
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            crc32c_table[k][n] = crc32c_table[k - 1][n] >> 8
                                 ^ crc32c_table[0][crc32c_table[k - 1][n] & 0xFF];
}

uint32_t vd_crc32c(uint32_t crc, const void *data, size_t length)
{
    const uint8_t *p = data;

    pthread_once(&crc32c_table_once, crc32c_build_table);
    crc = ~crc;
    while (length >= 8) {
        /* Assembled byte by byte, so the result does not depend on the
           host's byte order or on p's alignment. */
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16
                             | (uint32_t)p[3] << 24);
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16
                      | (uint32_t)p[7] << 24;
        crc = crc32c_table[7][lo & 0xFF] ^ crc32c_table[6][lo >> 8 & 0xFF]
              ^ crc32c_table[5][lo >> 16 & 0xFF] ^ crc32c_table[4][lo >> 24]
              ^ crc32c_table[3][hi & 0xFF] ^ crc32c_table[2][hi >> 8 & 0xFF]
              ^ crc32c_table[1][hi >> 16 & 0xFF] ^ crc32c_table[0][hi >> 24];
        p += 8;
        length -= 8;
    }
    while (length--)
        crc = crc >> 8 ^ crc32c_table[0][(crc ^ *p++) & 0xFF];
    return ~crc;
}
