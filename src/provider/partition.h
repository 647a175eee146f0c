/*
 * The partition table inside a virtual disk (MBR or GPT), read through the
 * image's format: how small the disk can become without cutting a partition
 * (GET_VIRTUAL_DISK_INFO_SMALLEST_SAFE_VIRTUAL_SIZE, ResizeVirtualDisk).
 *
 * Promises: every field taken from the table is checked against the disk's
 * size before use; the GPT header and entry array are used only when their
 * CRC-32s match; a malformed table is "no table", never a crash.
 */
#ifndef VD_PROVIDER_PARTITION_H
#define VD_PROVIDER_PARTITION_H

#include <stdbool.h>
#include <stdint.h>

#include "image.h"

/* The smallest virtual size that keeps every partition whole:
     - GPT (protective MBR + valid "EFI PART" header at LBA 1): the end of the
       last partition (or of the primary entry array when there is none),
       plus room for the backup entry array and backup header that GPT keeps
       at the end of the disk;
     - MBR (0x55AA signature, no protective entry): the end of the partition
       that ends last (an extended partition covers its logical ones); a table
       without partitions needs its one sector;
     - anything else (no table, an unreadable or inconsistent one): the
       current virtual size, because nothing is known to be unused.
   The answer is rounded up to a whole logical sector and to at least 3 MiB
   (the smallest disk CreateVirtualDisk makes), and never exceeds the current
   size.  Fails only when the disk cannot be read (e.g. the parent of a
   differencing disk was not opened): ERROR_VHD_COULD_NOT_COMPUTE_MINIMUM_VIRTUAL_SIZE.
   *from_table (may be NULL) says whether a partition table decided it. */
DWORD vd_smallest_safe_size(struct vd_image *image, uint64_t *size, bool *from_table);

#endif
