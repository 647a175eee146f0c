/*
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of
 * VHDX headers, region tables and log entries ([MS-VHDX] §2.2.2).
 */
#ifndef VD_PROVIDER_CRC32C_H
#define VD_PROVIDER_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continues a CRC over more bytes: start with crc = 0; the usual pre- and
   post-inversion happen inside, so chained calls equal one call over the
   concatenation.  crc32c(0, "123456789", 9) == 0xE3069283. */
uint32_t vd_crc32c(uint32_t crc, const void *data, size_t length);

#endif
