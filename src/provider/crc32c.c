/*
 * CRC-32C by slicing-by-8, and on x86-64 processors with SSE4.2 by the crc32
 * instruction.  Opening a VHDX checksums two headers and a 64 KiB region
 * table; the table method spends most of an open there, the instruction a
 * tenth of it.  The table method stays the portable reference: both must give
 * the same result (crc32c("123456789") == 0xE3069283).
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

static uint32_t crc32c_table_method(uint32_t crc, const uint8_t *p, size_t length)
{
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <string.h>

/* clang 14 and newer (zig cc too) make the instruction a feature apart from
   SSE 4.2; GCC takes both names. */
__attribute__((target("sse4.2,crc32"))) static uint32_t crc32c_serial(uint32_t crc, const uint8_t *p,
                                                                      size_t length)
{
    uint64_t state = ~crc;
    while (length >= 8) {
        uint64_t word;
        memcpy(&word, p, 8); /* unaligned-safe; x86-64 is little-endian like the CRC */
        state = __builtin_ia32_crc32di(state, word);
        p += 8;
        length -= 8;
    }
    uint32_t small = (uint32_t)state;
    while (length--)
        small = __builtin_ia32_crc32qi(small, *p++);
    return ~small;
}

/* a * b modulo the polynomial, both reflected (x^0 in the top bit). */
static uint32_t crc32c_multiply(uint32_t a, uint32_t b)
{
    uint32_t product = 0;
    for (uint32_t bit = 1u << 31; bit; bit >>= 1) {
        if (a & bit)
            product ^= b;
        b = b & 1 ? b >> 1 ^ CRC32C_POLY : b >> 1;
    }
    return product;
}

/* x^(8 * bytes) modulo the polynomial, by squaring. */
static uint32_t crc32c_shift_of(size_t bytes)
{
    uint32_t result = 1u << 31, square = 1u << 23; /* x^0, x^8 */
    for (; bytes; bytes >>= 1) {
        if (bytes & 1)
            result = crc32c_multiply(result, square);
        square = crc32c_multiply(square, square);
    }
    return result;
}

/* The instruction has a latency of three cycles and a throughput of one, so
   one dependent chain uses a third of it: three lanes run interleaved over
   thirds of a long buffer, and their CRCs are joined as zlib's
   crc32_combine() does (the CRC of A then B is CRC(A) shifted by B's length,
   plus CRC(B)).  A VHDX open checksums a 64 KiB region table. */
enum { CRC32C_LANES_FROM = 3 * 1024 };

__attribute__((target("sse4.2,crc32"))) static uint32_t crc32c_instruction(uint32_t crc, const uint8_t *p,
                                                                           size_t length)
{
    if (length < CRC32C_LANES_FROM)
        return crc32c_serial(crc, p, length);
    size_t lane = length / 3 & ~(size_t)7;
    const uint8_t *b = p + lane, *c = p + 2 * lane;
    uint64_t sa = ~crc, sb = 0xFFFFFFFFu, sc = 0xFFFFFFFFu;
    for (size_t i = 0; i < lane; i += 8) {
        uint64_t wa, wb, wc;
        memcpy(&wa, p + i, 8);
        memcpy(&wb, b + i, 8);
        memcpy(&wc, c + i, 8);
        sa = __builtin_ia32_crc32di(sa, wa);
        sb = __builtin_ia32_crc32di(sb, wb);
        sc = __builtin_ia32_crc32di(sc, wc);
    }
    uint32_t shift = crc32c_shift_of(lane);
    uint32_t joined = crc32c_multiply(shift, ~(uint32_t)sa) ^ ~(uint32_t)sb;
    joined = crc32c_multiply(shift, joined) ^ ~(uint32_t)sc;
    return crc32c_serial(joined, p + 3 * lane, length - 3 * lane);
}

uint32_t vd_crc32c(uint32_t crc, const void *data, size_t length)
{
    if (__builtin_cpu_supports("sse4.2"))
        return crc32c_instruction(crc, data, length);
    return crc32c_table_method(crc, data, length);
}
#else
uint32_t vd_crc32c(uint32_t crc, const void *data, size_t length)
{
    return crc32c_table_method(crc, data, length);
}
#endif
