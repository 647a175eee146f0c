/*
 * CRC-32C by slicing-by-8, and on x86-64 processors with SSE4.2 by the crc32
 * instruction.  Opening a VHDX checksums two headers and a 64 KiB region
 * table; the table method spends most of an open there, the instruction a
 * tenth of it, and skipping their zero tails by arithmetic (vd_crc32c) a
 * tenth of that.  The table method stays the portable reference: both must
 * give the same result (crc32c("123456789") == 0xE3069283;
 * tests/tools/crccheck.c compares both paths with the definition).
 */
#include "crc32c.h"

#include <pthread.h>
#include <string.h>

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

/* crc32c_powers[i] = x^(8 * 2^i) modulo the polynomial. */
static uint32_t crc32c_powers[64];
static pthread_once_t crc32c_powers_once = PTHREAD_ONCE_INIT;

static void crc32c_build_powers(void)
{
    uint32_t power = 1u << 23; /* x^8 */
    for (int i = 0; i < 64; i++) {
        crc32c_powers[i] = power;
        power = crc32c_multiply(power, power);
    }
}

/* x^(8 * bytes) modulo the polynomial: one multiplication per bit set. */
static uint32_t crc32c_shift_of(size_t bytes)
{
    pthread_once(&crc32c_powers_once, crc32c_build_powers);
    uint32_t result = 1u << 31; /* x^0 */
    for (int i = 0; bytes; bytes >>= 1, i++)
        if (bytes & 1)
            result = crc32c_multiply(result, crc32c_powers[i]);
    return result;
}

/* How many zero bytes p[0, length) ends with: whole pages by memcmp (the C
   library's, vectorised), then ever smaller pieces. */
static size_t crc32c_zero_tail(const uint8_t *p, size_t length)
{
    static const uint8_t zeros[4096];
    static const size_t pieces[] = {sizeof zeros, 256, 8, 1};
    size_t tail = 0;
    for (size_t k = 0; k < sizeof pieces / sizeof pieces[0]; k++)
        while (tail + pieces[k] <= length && memcmp(p + length - tail - pieces[k], zeros, pieces[k]) == 0)
            tail += pieces[k];
    return tail;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

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

static uint32_t crc32c_bytes(uint32_t crc, const uint8_t *data, size_t length)
{
    if (__builtin_cpu_supports("sse4.2"))
        return crc32c_instruction(crc, data, length);
    return crc32c_table_method(crc, data, length);
}
#else
static uint32_t crc32c_bytes(uint32_t crc, const uint8_t *data, size_t length)
{
    return crc32c_table_method(crc, data, length);
}
#endif

/* VHDX structures are mostly zeros: a 64 KiB region table holds a few
   dozen bytes, a 4 KiB header a hundred.  Appending n zero bytes to the CRC
   register multiplies it by x^(8n) (no input, no constant term), so a zero
   tail, found by memcmp far faster than it is checksummed, costs a few
   multiplications: the same CRC, of every byte, for a fraction of the
   work. */
enum { CRC32C_ZERO_TAIL_FROM = 1024 };

uint32_t vd_crc32c(uint32_t crc, const void *data, size_t length)
{
    size_t zeros = length >= CRC32C_ZERO_TAIL_FROM ? crc32c_zero_tail(data, length) : 0;
    uint32_t head = crc32c_bytes(crc, data, length - zeros);
    if (zeros == 0)
        return head;
    return ~crc32c_multiply(crc32c_shift_of(zeros), ~head);
}
