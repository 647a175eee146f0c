/*
 * The served disk's count of bytes holding data (see servealloc.h).
 */
#include "servealloc.h"

#include "winerror.h"

/* The granule of the stripes where the format has no blocks: any fixed
   size will do, as nothing there changes state. */
#define VD_ALLOC_GRANULE (1u << 20)

void vd_alloc_init(struct vd_alloc *alloc, uint64_t size)
{
    alloc->bytes = 0;
    alloc->size = size;
    alloc->unknown = true; /* until the first count */
    for (int i = 0; i < VD_ALLOC_STRIPES; i++)
        pthread_rwlock_init(&alloc->stripes[i], NULL);
}

void vd_alloc_destroy(struct vd_alloc *alloc)
{
    for (int i = 0; i < VD_ALLOC_STRIPES; i++)
        pthread_rwlock_destroy(&alloc->stripes[i]);
}

/* The bytes of [offset, offset + length) that some layer holds data in. */
static DWORD vd_alloc_measure(struct vd_image *image, uint64_t offset, uint64_t length, uint64_t *bytes)
{
    *bytes = 0;
    for (uint64_t done = 0; done < length;) {
        bool zeros;
        uint64_t run;
        DWORD status = vd_image_chain_zeros(image, offset + done, length - done, &zeros, &run);
        if (status != ERROR_SUCCESS)
            return status;
        if (!zeros)
            *bytes += run;
        done += run;
    }
    return ERROR_SUCCESS;
}

/* Whether this layer (not its parent) holds data all over the range: then
   a write there allocates nothing and changes no block's state. */
static bool vd_alloc_layer_holds(struct vd_image *image, uint64_t offset, uint64_t length)
{
    for (uint64_t done = 0; done < length;) {
        enum vd_block_state state;
        uint64_t run;
        if (vd_image_block_status(image, offset + done, length - done, &state, &run) != ERROR_SUCCESS ||
            state != VD_BLOCK_DATA)
            return false;
        done += run;
    }
    return true;
}

static void vd_alloc_lock(struct vd_alloc *alloc, uint64_t held, bool exclusive)
{
    /* Always in ascending order: two requests over the same stripes cannot
       deadlock. */
    for (int i = 0; i < VD_ALLOC_STRIPES; i++) {
        if (!(held & (UINT64_C(1) << i)))
            continue;
        if (exclusive)
            pthread_rwlock_wrlock(&alloc->stripes[i]);
        else
            pthread_rwlock_rdlock(&alloc->stripes[i]);
    }
}

static void vd_alloc_unlock(struct vd_alloc *alloc, uint64_t held)
{
    for (int i = 0; i < VD_ALLOC_STRIPES; i++)
        if (held & (UINT64_C(1) << i))
            pthread_rwlock_unlock(&alloc->stripes[i]);
}

DWORD vd_alloc_recount(struct vd_alloc *alloc, struct vd_image *image)
{
    vd_alloc_lock(alloc, UINT64_MAX, true);
    uint64_t bytes;
    DWORD status = vd_alloc_measure(image, 0, image->virtual_size, &bytes);
    if (status == ERROR_SUCCESS)
        __atomic_store_n(&alloc->bytes, bytes, __ATOMIC_RELAXED);
    __atomic_store_n(&alloc->unknown, status != ERROR_SUCCESS, __ATOMIC_RELAXED);
    vd_alloc_unlock(alloc, UINT64_MAX);
    return status;
}

uint64_t vd_alloc_bytes(const struct vd_alloc *alloc)
{
    if (__atomic_load_n(&alloc->unknown, __ATOMIC_RELAXED))
        return alloc->size;
    return __atomic_load_n(&alloc->bytes, __ATOMIC_RELAXED);
}

void vd_alloc_begin(struct vd_alloc *alloc, struct vd_image *image, uint64_t offset, uint64_t length, bool may_free,
                    struct vd_alloc_change *change)
{
    /* A block changes state as a whole (VHD: a differencing block's sectors
       one by one, inside it), so the whole blocks touched are measured. */
    uint64_t granule = image->block_size ? image->block_size : VD_ALLOC_GRANULE;
    uint64_t first = offset / granule, last = (offset + (length ? length : 1) - 1) / granule;
    change->held = 0;
    if (last - first + 1 >= VD_ALLOC_STRIPES)
        change->held = UINT64_MAX;
    else
        for (uint64_t b = first; b <= last; b++)
            change->held |= UINT64_C(1) << (b % VD_ALLOC_STRIPES);
    change->offset = image->block_size ? first * granule : offset;
    uint64_t end = image->block_size ? (last + 1) * granule : offset + length;
    if (end > image->virtual_size)
        end = image->virtual_size;
    change->length = end - change->offset;
    change->before = 0;
    if (!may_free) {
        vd_alloc_lock(alloc, change->held, false);
        if (vd_alloc_layer_holds(image, offset, length)) {
            change->exclusive = false;
            return;
        }
        vd_alloc_unlock(alloc, change->held);
    }
    vd_alloc_lock(alloc, change->held, true);
    change->exclusive = true;
    if (vd_alloc_measure(image, change->offset, change->length, &change->before) != ERROR_SUCCESS)
        __atomic_store_n(&alloc->unknown, true, __ATOMIC_RELAXED);
}

void vd_alloc_end(struct vd_alloc *alloc, struct vd_image *image, struct vd_alloc_change *change)
{
    if (change->exclusive) {
        uint64_t after;
        if (vd_alloc_measure(image, change->offset, change->length, &after) != ERROR_SUCCESS)
            __atomic_store_n(&alloc->unknown, true, __ATOMIC_RELAXED);
        else
            __atomic_add_fetch(&alloc->bytes, after - change->before, __ATOMIC_RELAXED); /* modulo 2^64 */
    }
    vd_alloc_unlock(alloc, change->held);
}
