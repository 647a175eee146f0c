/*
 * CreateVirtualDisk's SourcePath: the disk whose contents a new image starts
 * with.  A VHD, VHDX or ISO image is read through its format (its virtual
 * disk, not its file); anything else that is a regular file or a block
 * device is taken as a raw disk, byte for byte.
 */
#ifndef VD_PROVIDER_SOURCE_H
#define VD_PROVIDER_SOURCE_H

#include <stdint.h>

#include "image.h"
#include "job.h"

struct vd_source {
    struct vd_image *image;        /* a virtual disk, or NULL for raw */
    int fd;                        /* raw: the file or device, else -1 */
    char *path;                    /* UTF-8, owned */
    uint64_t size;                 /* bytes of disk the source holds */
    ULONG logical_sector_size;     /* the image's; 512 for raw */
    ULONG physical_sector_size;
};

/* Opens SourcePath read-only.  device_id: SourceVirtualStorageType.DeviceId
   (VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN: decide by the contents, raw when no
   format recognises them). */
DWORD vd_source_open(const WCHAR *path, ULONG device_id, struct vd_source *source);
void vd_source_close(struct vd_source *source);

/* Copies the source's disk into the new image at target_path (created empty
   by the format, of at least source->size bytes).  Stretches that read as
   zeros are skipped: a new image reads as zeros there already (dynamic
   images leave the blocks unallocated, fixed ones were preallocated with
   zeros); the source's block_status() finds unallocated ones without
   reading them.  A VHDX gets its DataWriteGuid back afterwards (unique_id),
   since writing data changes it.  Progress (bytes of the source's disk, the
   job's whole total) and cancellation (ERROR_OPERATION_ABORTED) go through
   job. */
DWORD vd_source_copy(const struct vd_source *source, const char *target_path, ULONG device_id,
                     const GUID *unique_id, struct vd_job *job);

/* The same into an image already open for writing (an asynchronous
   create's handle): its writes skip write hardening for the copy, as a new
   file's do, and one fsync ends it.  It advances job by the bytes of the
   source's disk it has gone over; the caller has set the total, which may
   count work of its own (reserving a fixed disk's space first). */
DWORD vd_source_copy_into(const struct vd_source *source, struct vd_image *target, const GUID *unique_id,
                          struct vd_job *job);

#endif
