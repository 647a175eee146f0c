/*
 * Reserving a fixed disk's space (a new fixed disk, or a grown one) in
 * steps that report to a job and stop when it is cancelled.
 *
 * Promises:
 *   - Needs only the job record (job.h's inline functions), bytes.c and
 *     errors.c: the format modules use it, and the tools and fuzzers that
 *     link the format modules without the handle and job machinery link it
 *     too.
 */
#ifndef VD_PROVIDER_RESERVE_H
#define VD_PROVIDER_RESERVE_H

#include <stdint.h>

#include "job.h"

/* Allocates length bytes of fd from offset (fallocate with mode: 0 inside
   the file, FALLOC_FL_KEEP_SIZE past its end) in steps, advancing the job by
   the bytes each step covers and stopping between steps when it is
   cancelled, so that reserving gigabytes shows progress and can be stopped.
   Where the file system cannot preallocate: mode 0 writes zeros into the
   range's holes only (holes read as zeros, so no byte changes), and
   KEEP_SIZE does nothing (the caller's own path extends the file).  A
   cancelled or failed KEEP_SIZE reservation is given back (the file is
   truncated to the size it has).  Returns ERROR_SUCCESS,
   ERROR_OPERATION_ABORTED or an error, with detail. */
DWORD vd_job_fallocate(struct vd_job *job, int fd, int mode, uint64_t offset, uint64_t length, const char *path);

#endif
