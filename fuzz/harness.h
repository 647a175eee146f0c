/*
 * What every fuzz target shares: turning a fuzz input into an image file and
 * opening it through vd_image_open(), as OpenVirtualDisk does.
 *
 * Input encoding (see pack.py): the images are megabytes of zeros around a few
 * KiB of structures, so an input lists only the bytes that matter:
 *     u64 file_size, then records {u32 offset, u16 length, length bytes}
 * all little-endian.  The file is file_size bytes (capped at VD_FUZZ_MAX_FILE;
 * holes read as zeros) with each record's bytes written at its offset.  Every
 * mutation then lands in a structure, and one that changes a record's offset
 * moves a structure somewhere else in the file.  Then the checksums of the
 * VHD footer and dynamic header and of the VHDX headers and region tables are
 * recomputed, unless bit 63 of file_size asks to keep them as they are.
 */
#ifndef VD_FUZZ_HARNESS_H
#define VD_FUZZ_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include "virtdisk.h"

/* Writes data as an image, opens it with device_id (UNKNOWN: probe), checks
   the answer against the promises of image.h, reads a few sectors and closes.
   Aborts (a finding) when a promise is broken. */
void vd_fuzz_one(const uint8_t *data, size_t size, ULONG device_id);

#endif
