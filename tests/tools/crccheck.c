/*
 * Test tool: the provider's CRC-32C (crc32c.c, which skips a buffer's zero
 * tail by arithmetic and runs three lanes on long ones) against the
 * definition, bit by bit, on buffers of many shapes: random bytes, zero
 * tails of every length class, lone non-zero bytes near the end, chained
 * calls.  Prints the first disagreement and exits 1, else "ok N".
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crc32c.h"

static uint32_t reference(uint32_t crc, const uint8_t *p, size_t length)
{
    crc = ~crc;
    for (size_t i = 0; i < length; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++)
            crc = crc & 1 ? crc >> 1 ^ 0x82F63B78u : crc >> 1;
    }
    return ~crc;
}

static uint64_t state = 0x9E3779B97F4A7C15ull;

static uint32_t next_random(void)
{
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(state >> 33);
}

int main(void)
{
    enum { MAX = 70 * 1024 };
    uint8_t *buffer = malloc(MAX);
    if (!buffer)
        return 2;
    if (vd_crc32c(0, "123456789", 9) != 0xE3069283u) {
        printf("check value: %08x\n", vd_crc32c(0, "123456789", 9));
        return 1;
    }
    static const size_t lengths[] = {0, 1, 7, 8, 1023, 1024, 1025, 3071, 3072, 4096, 4097, 8192, 65536, MAX};
    int cases = 0;
    for (int round = 0; round < 3000; round++) {
        size_t length = round < 14 * 6 ? lengths[round % 14] : next_random() % MAX;
        /* The data: random up to a cut, zeros after it, and sometimes one
           more non-zero byte somewhere in the zeros. */
        size_t cut = length ? next_random() % (length + 1) : 0;
        if (round % 5 == 0)
            cut = 0;
        for (size_t i = 0; i < length; i++)
            buffer[i] = i < cut ? (uint8_t)next_random() : 0;
        if (length > cut && round % 3 == 0)
            buffer[cut + next_random() % (length - cut)] = (uint8_t)(1 + next_random() % 255);
        if (length && round % 7 == 0)
            buffer[length - 1] = 0x80;
        uint32_t start = round % 4 == 0 ? next_random() : 0;
        uint32_t want = reference(start, buffer, length);
        uint32_t got = vd_crc32c(start, buffer, length);
        size_t split = length ? next_random() % length : 0;
        uint32_t chained = vd_crc32c(vd_crc32c(start, buffer, split), buffer + split, length - split);
        cases++;
        if (got != want || chained != want) {
            printf("length %zu cut %zu start %08x: want %08x got %08x chained %08x\n", length, cut, start, want,
                   got, chained);
            return 1;
        }
    }
    printf("ok %d\n", cases);
    free(buffer);
    return 0;
}
