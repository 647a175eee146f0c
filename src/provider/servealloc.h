/*
 * How many bytes of a served disk hold data: what the FUSE server reports
 * as the file's st_blocks, so that tools which decide by st_blocks whether a
 * file is sparse (cp --sparse=auto, du, tar --sparse) look for the holes
 * SEEK_DATA/SEEK_HOLE already show.
 *
 * What counts: the bytes where some layer of the chain holds data, that is
 * every byte vd_image_chain_zeros() does not call zeros, a parent's data
 * included and a child's stated zeros excluded: exactly the data extents
 * the server's lseek reports.  A child's own blocks alone would be wrong in
 * the dangerous direction: a child holding nothing yet would report no
 * blocks at all, and GNU tar stores a file with st_blocks 0 as wholly sparse
 * without reading it, losing the parent's data.  Too high is only slow (a
 * tool copies everything); too low loses data.
 *
 * Promises:
 *   - vd_alloc_bytes() is O(1): a counter, kept as the disk changes, never a
 *     scan per getattr.  It is counted once when serving starts
 *     (vd_alloc_recount(), O(blocks) block-table lookups) and again after
 *     anything that changes the block table from outside the server's
 *     requests (a compaction, a replaced image).
 *   - Every request that may change the block table runs between
 *     vd_alloc_begin() and vd_alloc_end(), which measure the blocks it
 *     touches before and after and add the difference.  Requests on the same
 *     blocks that may change their state are serialised by a striped lock;
 *     a write into blocks that already hold data (the common case) changes
 *     no state, takes its stripes shared and measures nothing more.
 *   - When a measurement fails, the count is unknown and vd_alloc_bytes()
 *     answers the whole disk (safe, as above) until the next successful
 *     recount.
 */
#ifndef VD_PROVIDER_SERVEALLOC_H
#define VD_PROVIDER_SERVEALLOC_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "image.h"
#include "virtdisk.h"

enum { VD_ALLOC_STRIPES = 64 };

struct vd_alloc {
    uint64_t bytes;   /* atomic */
    uint64_t size;    /* the disk's, for the unknown answer */
    bool unknown;     /* atomic */
    pthread_rwlock_t stripes[VD_ALLOC_STRIPES];
};

/* One request's hold on its blocks, from vd_alloc_begin() to vd_alloc_end(). */
struct vd_alloc_change {
    uint64_t offset, length; /* the touched blocks, whole */
    uint64_t held;           /* stripes held, one bit each */
    bool exclusive;          /* held exclusively, before measured */
    uint64_t before;
};

void vd_alloc_init(struct vd_alloc *alloc, uint64_t size);
void vd_alloc_destroy(struct vd_alloc *alloc);

/* Counts image anew (no request may change it meanwhile: the caller holds
   the server's io_lock, or the stripes are taken here). */
DWORD vd_alloc_recount(struct vd_alloc *alloc, struct vd_image *image);

uint64_t vd_alloc_bytes(const struct vd_alloc *alloc);

/* Before a write (may_free false) or a discard (may_free true) of
   [offset, offset + length) of image. */
void vd_alloc_begin(struct vd_alloc *alloc, struct vd_image *image, uint64_t offset, uint64_t length, bool may_free,
                    struct vd_alloc_change *change);

/* After it, whether it succeeded or not (a failed request may have changed
   some blocks). */
void vd_alloc_end(struct vd_alloc *alloc, struct vd_image *image, struct vd_alloc_change *change);

#endif
