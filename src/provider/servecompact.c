/*
 * Compacting a served disk attached read-only (see servecompact.h).
 */
#define _GNU_SOURCE
#include "servecompact.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compact.h"
#include "errors.h"
#include "job.h"
#include "share.h"

#define VD_COMPACT_FLAGS_KNOWN (COMPACT_VIRTUAL_DISK_FLAG_NO_ZERO_SCAN | COMPACT_VIRTUAL_DISK_FLAG_NO_BLOCK_MOVES)

struct vd_serve_compact {
    struct vd_fuse_server *server;
    struct vd_image *image; /* the served image (the server's) */
    COMPACT_VIRTUAL_DISK_FLAG flags;
    struct vd_job job;      /* done, total, cancel; status: atomic */
    char detail[512];       /* of a failure; written once, before job.status */
    bool thread_started;
    pthread_t thread;
};

static void *vd_serve_compact_thread(void *context)
{
    struct vd_serve_compact *c = context;
    vd_clear_detail();
    DWORD status = vd_compact_image(c->image, c->flags, &c->job);
    if (status != ERROR_SUCCESS)
        snprintf(c->detail, sizeof c->detail, "%s", vd_last_error_detail());
    /* Dropped blocks leave the file's st_blocks, also those of a cancelled
       or failed run; counted before the status says it has ended. */
    vd_fuse_recount(c->server);
    __atomic_store_n(&c->job.status, status, __ATOMIC_RELEASE);
    return NULL;
}

/* The served image opened anew for writing, through the server's own
   descriptor: the very file served, whatever its name is now. */
static DWORD vd_serve_compact_reopen(const struct vd_image *served, struct vd_image **out)
{
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", served->fd);
    struct vd_image *image;
    DWORD status = vd_image_open(self, served->format->device_id, true, served->open_flags, &image);
    if (status != ERROR_SUCCESS)
        return status;
    if (image->file_dev != served->file_dev || image->file_ino != served->file_ino ||
        image->virtual_size != served->virtual_size || image->logical_sector_size != served->logical_sector_size ||
        image->subtype != served->subtype) {
        vd_image_close(image);
        return vd_fail(ERROR_GEN_FAILURE, "%s reopened for the compaction is not the disk served", served->path);
    }
    *out = image;
    return ERROR_SUCCESS;
}

DWORD vd_serve_compact_start(struct vd_fuse_server *server, uint32_t flags, struct vd_serve_compact **out)
{
    if (flags & ~(uint32_t)VD_COMPACT_FLAGS_KNOWN)
        return vd_fail(ERROR_INVALID_PARAMETER, "compact flags 0x%08x include unknown bits", (unsigned)flags);
    struct vd_image *served = vd_fuse_image(server);
    /* Windows compacts an attached disk only in the file-system-aware mode,
       read-only: a guest writing meanwhile would race every block move. */
    if (vd_fuse_writable(server))
        return vd_fail(ERROR_NOT_SUPPORTED,
                       "%s is attached read-write: a disk compacts attached only when attached read-only "
                       "(file-system-aware mode); detach it and attach it read-only, or compact it detached",
                       served->path);
    if ((served->subtype != VD_SUBTYPE_DYNAMIC && served->subtype != VD_SUBTYPE_DIFFERENCING) ||
        !served->format->compact_layout)
        return vd_fail(ERROR_VHD_INVALID_TYPE, "%s is a %s%s image: only dynamic and differencing disks compact",
                       served->path, served->subtype == VD_SUBTYPE_FIXED ? "fixed " : "", served->format->name);
    struct vd_serve_compact *c = calloc(1, sizeof *c);
    if (!c)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a compaction");
    DWORD status = ERROR_SUCCESS;
    struct vd_image *image = served;
    if (!served->writable) {
        status = vd_serve_compact_reopen(served, &image);
        if (status != ERROR_SUCCESS) {
            free(c);
            return status;
        }
        /* The writable open is the attachment's from now on: it takes the
           marker before the read-only one lets go of its own (at no moment
           does the disk look detached), and the read-only one closes, so
           that only the disk's current open holds the file (as after a
           mirror's break, which must leave its source free).  From the next
           request on the guest reads through the writable open, whose block
           table the compaction changes; the requests in flight on the old
           one have finished (vd_fuse_replace_image). */
        status = vd_share_mark_attached(image->fd);
        if (status != ERROR_SUCCESS) {
            vd_image_close(image);
            free(c);
            return status;
        }
        vd_image_close(vd_fuse_replace_image(server, image));
    }
    c->server = server;
    c->image = image;
    c->flags = flags;
    vd_job_init_sync(&c->job);
    int error = pthread_create(&c->thread, NULL, vd_serve_compact_thread, c);
    if (error) {
        free(c);
        return vd_fail_errno(error, "starting the compaction's thread");
    }
    c->thread_started = true;
    *out = c;
    return ERROR_SUCCESS;
}

void vd_serve_compact_state(struct vd_serve_compact *c, struct vd_msg_operation_state *state, char *detail,
                            size_t size)
{
    state->kind = VD_OPERATION_COMPACT;
    /* The status first: a final status comes with final counters. */
    state->status = __atomic_load_n(&c->job.status, __ATOMIC_ACQUIRE);
    state->done = __atomic_load_n(&c->job.done, __ATOMIC_RELAXED);
    state->total = __atomic_load_n(&c->job.total, __ATOMIC_RELAXED);
    detail[0] = '\0';
    if (state->status != ERROR_IO_PENDING && state->status != ERROR_SUCCESS)
        snprintf(detail, size, "%s", c->detail);
}

bool vd_serve_compact_active(struct vd_serve_compact *c)
{
    return __atomic_load_n(&c->job.status, __ATOMIC_ACQUIRE) == ERROR_IO_PENDING;
}

static void vd_serve_compact_join(struct vd_serve_compact *c)
{
    if (c->thread_started) {
        __atomic_store_n(&c->job.cancel, 1, __ATOMIC_RELAXED);
        pthread_join(c->thread, NULL);
        c->thread_started = false;
    }
}

DWORD vd_serve_compact_cancel(struct vd_serve_compact *c)
{
    if (!vd_serve_compact_active(c))
        return vd_fail(ERROR_NOT_FOUND, "the compaction has ended already");
    vd_serve_compact_join(c);
    return ERROR_SUCCESS;
}

void vd_serve_compact_free(struct vd_serve_compact *c)
{
    if (!c)
        return;
    vd_serve_compact_join(c);
    free(c);
}
