/*
 * Mirroring a served disk (see servemirror.h).
 */
#define _GNU_SOURCE
#include "servemirror.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bytes.h"
#include "errors.h"
#include "image.h"
#include "share.h"

enum { VD_MIRROR_CHUNK = 1 << 20 };

#define VD_MIRROR_FLAGS_KNOWN 0x0000000Fu

enum vd_mirror_phase {
    VD_MIRROR_COPYING, /* status ERROR_IO_PENDING */
    VD_MIRROR_IN_SYNC, /* status ERROR_SUCCESS, writes still go to both */
    VD_MIRROR_OVER,    /* broken, cancelled or failed: the target is let go of */
};

struct vd_mirror {
    struct vd_fuse_tap tap; /* first: the tap's address is the mirror's */
    struct vd_fuse_server *server;
    struct vd_image *source; /* the served image (not ours) */
    struct vd_image *target; /* ours until a break hands it to the server */
    char *target_path;
    bool created;            /* we made the file: an unfinished mirror removes it */
    OPEN_VIRTUAL_DISK_FLAG target_flags;

    /* Orders each guest write's two halves against each chunk the copy
       reads and writes; guards copied, busy_* and the failure below.  The
       copy does its I/O outside it, with the chunk marked busy: a guest
       write that touches the chunk waits (on idle) until it is copied,
       others go ahead. */
    pthread_mutex_t mutex;
    pthread_cond_t idle;
    uint64_t copied; /* [0, copied) of the target equals the source */
    uint64_t busy_start, busy_end; /* the chunk being copied, else empty */

    uint64_t total;   /* atomic */
    uint64_t done;    /* atomic */
    DWORD status;     /* atomic: ERROR_IO_PENDING, ERROR_SUCCESS (in sync) or the failure */
    bool cancel;      /* atomic */
    enum vd_mirror_phase phase; /* changed by the operations thread only */
    char detail[512]; /* of a failure; written once, before status */

    bool thread_started;
    pthread_t thread;
};

static DWORD vd_mirror_status(const struct vd_mirror *m)
{
    return __atomic_load_n(&m->status, __ATOMIC_ACQUIRE);
}

/* Records the mirror's failure (the first one counts; a cancel is not
   overwritten). */
static void vd_mirror_fail(struct vd_mirror *m, DWORD status)
{
    char detail[sizeof m->detail];
    snprintf(detail, sizeof detail, "%s", vd_last_error_detail());
    pthread_mutex_lock(&m->mutex);
    DWORD now = vd_mirror_status(m);
    if (now == ERROR_IO_PENDING || now == ERROR_SUCCESS) {
        memcpy(m->detail, detail, sizeof detail);
        __atomic_store_n(&m->status, status, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&m->mutex);
}

static DWORD vd_image_flush(struct vd_image *image)
{
    if (image->format->flush)
        return image->format->flush(image);
    return fdatasync(image->fd) < 0 ? vd_fail_errno(errno, "%s: flushing", image->path) : ERROR_SUCCESS;
}

/* ---- the tap: guest writes and flushes while mirrored ------------------- */

static DWORD vd_mirror_write(struct vd_fuse_tap *tap, struct vd_image *image, const void *buffer, uint64_t offset,
                             size_t length)
{
    struct vd_mirror *m = (struct vd_mirror *)tap;
    pthread_mutex_lock(&m->mutex);
    /* Between the copy's read of its chunk and its write of the target, a
       change to the source there would be lost to the target. */
    while (offset < m->busy_end && offset + length > m->busy_start)
        pthread_cond_wait(&m->idle, &m->mutex);
    DWORD status = image->format->write(image, buffer, offset, length);
    DWORD mirror = vd_mirror_status(m);
    DWORD target_status = ERROR_SUCCESS;
    /* The part the copy has not reached yet it will read from the source,
       after this write: writing it here too would only cost. */
    if (status == ERROR_SUCCESS && offset < m->copied && (mirror == ERROR_IO_PENDING || mirror == ERROR_SUCCESS)) {
        size_t n = m->copied - offset < length ? (size_t)(m->copied - offset) : length;
        target_status = m->target->format->write(m->target, buffer, offset, n);
    }
    pthread_mutex_unlock(&m->mutex);
    if (target_status != ERROR_SUCCESS)
        vd_mirror_fail(m, target_status);
    return status;
}

static DWORD vd_mirror_flush(struct vd_fuse_tap *tap)
{
    struct vd_mirror *m = (struct vd_mirror *)tap;
    /* Only a target in sync can become the disk.  While copying, nothing of
       it needs to be durable yet: the copy flushes it once, under the
       mutex, before it says "in sync", and that covers every write the
       guest made to it before.  Flushing it here would make each guest
       flush wait for the writeback of the whole copy so far. */
    if (vd_mirror_status(m) != ERROR_SUCCESS)
        return ERROR_SUCCESS;
    DWORD status = vd_image_flush(m->target);
    if (status != ERROR_SUCCESS)
        vd_mirror_fail(m, status);
    return ERROR_SUCCESS; /* the guest's flush of the source succeeded */
}

/* ---- the copy ------------------------------------------------------------ */

/* Copies one chunk at offset, marked busy; *n is how much it covered. */
static DWORD vd_mirror_copy_chunk(struct vd_mirror *m, uint8_t *buffer, uint8_t *other, uint64_t offset,
                                  size_t *n)
{
    bool zeros;
    uint64_t run;
    DWORD status = vd_image_chain_zeros(m->source, offset, *n, &zeros, &run);
    if (status != ERROR_SUCCESS)
        return status;
    *n = (size_t)run;
    if (!zeros) {
        status = m->source->format->read(m->source, buffer, offset, *n);
        if (status != ERROR_SUCCESS)
            return status;
        zeros = vd_all_zero(buffer, *n);
    }
    if (!zeros)
        return m->target->format->write(m->target, buffer, offset, *n);
    if (m->created)
        return ERROR_SUCCESS; /* a new image reads as zeros already */
    /* An existing target: zero what does not read as zeros there. */
    status = m->target->format->read(m->target, other, offset, *n);
    if (status != ERROR_SUCCESS || vd_all_zero(other, *n))
        return status;
    memset(buffer, 0, *n);
    return m->target->format->write(m->target, buffer, offset, *n);
}

static void *vd_mirror_thread(void *context)
{
    struct vd_mirror *m = context;
    uint8_t *buffer = malloc(VD_MIRROR_CHUNK), *other = malloc(VD_MIRROR_CHUNK);
    DWORD status = buffer && other ? ERROR_SUCCESS : vd_fail(ERROR_OUTOFMEMORY, "mirror buffers");
    uint64_t size = m->source->virtual_size;
    for (uint64_t offset = 0; offset < size && status == ERROR_SUCCESS;) {
        if (__atomic_load_n(&m->cancel, __ATOMIC_RELAXED) || vd_mirror_status(m) != ERROR_IO_PENDING)
            break;
        size_t n = size - offset < VD_MIRROR_CHUNK ? (size_t)(size - offset) : VD_MIRROR_CHUNK;
        pthread_mutex_lock(&m->mutex);
        m->busy_start = offset;
        m->busy_end = offset + n;
        pthread_mutex_unlock(&m->mutex);
        status = vd_mirror_copy_chunk(m, buffer, other, offset, &n);
        pthread_mutex_lock(&m->mutex);
        if (status == ERROR_SUCCESS)
            m->copied = offset + n;
        m->busy_start = m->busy_end = 0;
        pthread_cond_broadcast(&m->idle);
        pthread_mutex_unlock(&m->mutex);
        offset += n;
        if (status == ERROR_SUCCESS)
            __atomic_store_n(&m->done, offset, __ATOMIC_RELAXED);
    }
    free(buffer);
    free(other);
    if (status == ERROR_SUCCESS && !__atomic_load_n(&m->cancel, __ATOMIC_RELAXED) &&
        vd_mirror_status(m) == ERROR_IO_PENDING) {
        /* In sync from here: the copy is durable, and the guest's writes to
           the target are hardened again (a new target's copy was not: an
           unfinished one is removed anyway). */
        pthread_mutex_lock(&m->mutex);
        status = vd_image_flush(m->target);
        if (status == ERROR_SUCCESS) {
            m->target->open_flags = m->target_flags;
            __atomic_store_n(&m->status, ERROR_SUCCESS, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&m->mutex);
    }
    if (status != ERROR_SUCCESS)
        vd_mirror_fail(m, status);
    return NULL;
}

/* ---- starting ------------------------------------------------------------ */

static DWORD vd_mirror_create_target(const struct vd_image *source, const char *path, mode_t mode,
                                     struct vd_image **out)
{
    const struct vd_format *format = source->format;
    if (!format->create)
        return vd_fail(ERROR_VHD_INVALID_TYPE, "%s images cannot be created", format->name);
    struct vd_create_request request = {
        .device_id = format->device_id,
        .virtual_size = source->virtual_size,
        .block_size = source->block_size,
        .logical_sector_size = source->logical_sector_size,
        .physical_sector_size = source->physical_sector_size,
        .fixed = source->subtype == VD_SUBTYPE_FIXED,
        .path = path,
    };
    /* The disk keeps its identity (a guest must not see another disk after
       the move): a VHD's unique id is its only one, and VHDX's is the Page
       83 data, set below.  VHDX's DataWriteGuid names a version of the
       file's contents (MS-VHDX 2.2.2.1), the one differencing children link
       to: the target's is its own, so that the source's children never take
       the target, which goes on changing, for their parent. */
    request.unique_id = source->identifier;
    int error = format->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_VHDX ? vd_guid_generate(&request.unique_id) : 0;
    if (error)
        return vd_fail_errno(error, "generating a unique id");
    /* O_EXCL: never overwrite an existing file (that is EXISTING_FILE's). */
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno == EEXIST)
        return vd_fail(ERROR_FILE_EXISTS, "the mirror target %s exists (MIRROR_VIRTUAL_DISK_FLAG_EXISTING_FILE "
                                          "mirrors onto an existing image)", path);
    if (fd < 0)
        return vd_fail_errno(errno, "creating the mirror target %s", path);
    /* The caller's permissions, not the helper's umask (077). */
    DWORD status = fchmod(fd, mode & 0777) < 0 ? vd_fail_errno(errno, "setting the mode of %s", path) : ERROR_SUCCESS;
    if (status == ERROR_SUCCESS)
        status = format->create(fd, &request);
    if (status == ERROR_SUCCESS && fsync(fd) < 0)
        status = vd_fail_errno(errno, "flushing %s", path);
    close(fd);
    if (status == ERROR_SUCCESS)
        status = vd_image_open(path, format->device_id, true, OPEN_VIRTUAL_DISK_FLAG_NO_WRITE_HARDENING, out);
    if (status == ERROR_SUCCESS && source->has_virtual_disk_id && (*out)->format->set_virtual_disk_id) {
        status = (*out)->format->set_virtual_disk_id(*out, &source->virtual_disk_id);
        if (status != ERROR_SUCCESS)
            vd_image_close(*out);
    }
    if (status != ERROR_SUCCESS)
        unlink(path);
    return status;
}

static DWORD vd_mirror_open_target(const struct vd_image *source, const char *path, struct vd_image **out)
{
    struct vd_image *target;
    DWORD status = vd_image_open(path, VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, true, 0, &target);
    if (status != ERROR_SUCCESS)
        return status;
    if (target->file_dev == source->file_dev && target->file_ino == source->file_ino)
        status = vd_fail(ERROR_INVALID_PARAMETER, "%s is the mirrored disk itself", path);
    else if (target->virtual_size != source->virtual_size)
        status = vd_fail(ERROR_INVALID_PARAMETER, "the mirror target %s is %llu bytes; the disk is %llu", path,
                         (unsigned long long)target->virtual_size, (unsigned long long)source->virtual_size);
    else if (target->logical_sector_size != source->logical_sector_size)
        status = vd_fail(ERROR_INVALID_PARAMETER, "the mirror target %s has %u-byte sectors; the disk %u", path,
                         (unsigned)target->logical_sector_size, (unsigned)source->logical_sector_size);
    else if (!target->format->write)
        status = vd_fail(ERROR_VHD_INVALID_TYPE, "%s images cannot be written", target->format->name);
    if (status != ERROR_SUCCESS) {
        vd_image_close(target);
        return status;
    }
    *out = target;
    return ERROR_SUCCESS;
}

DWORD vd_mirror_start(struct vd_fuse_server *server, uint32_t flags, uint32_t mode, const char *target_path,
                      struct vd_mirror **out)
{
    if (flags & ~VD_MIRROR_FLAGS_KNOWN)
        return vd_fail(ERROR_INVALID_PARAMETER, "mirror flags 0x%08x include unknown bits", (unsigned)flags);
    if (flags & ~(uint32_t)MIRROR_VIRTUAL_DISK_FLAG_EXISTING_FILE)
        return vd_fail(ERROR_NOT_SUPPORTED, "mirror flags 0x%08x are not supported on Linux",
                       (unsigned)(flags & ~(uint32_t)MIRROR_VIRTUAL_DISK_FLAG_EXISTING_FILE));
    if (target_path[0] != '/')
        return vd_fail(ERROR_INVALID_PARAMETER, "the mirror target %s is not an absolute path", target_path);
    struct vd_image *source = vd_fuse_image(server);
    struct vd_mirror *m = calloc(1, sizeof *m);
    if (!m || !(m->target_path = strdup(target_path))) {
        free(m);
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a mirror");
    }
    m->created = !(flags & MIRROR_VIRTUAL_DISK_FLAG_EXISTING_FILE);
    DWORD status = m->created ? vd_mirror_create_target(source, target_path, (mode_t)mode, &m->target)
                              : vd_mirror_open_target(source, target_path, &m->target);
    /* The target's writer claim, held while it is open here. */
    if (status == ERROR_SUCCESS)
        status = vd_share_open_chain(m->target, 0, -1);
    if (status != ERROR_SUCCESS) {
        if (m->target) {
            vd_image_close(m->target);
            if (m->created)
                unlink(target_path);
        }
        free(m->target_path);
        free(m);
        return status;
    }
    /* Hardened writes once in sync (a created target copies without). */
    m->target_flags = m->created ? m->target->open_flags & ~(OPEN_VIRTUAL_DISK_FLAG)OPEN_VIRTUAL_DISK_FLAG_NO_WRITE_HARDENING
                                 : m->target->open_flags;
    m->server = server;
    m->source = source;
    m->tap.write = vd_mirror_write;
    m->tap.flush = vd_mirror_flush;
    m->total = source->virtual_size;
    m->status = ERROR_IO_PENDING;
    m->phase = VD_MIRROR_COPYING;
    pthread_mutex_init(&m->mutex, NULL);
    pthread_cond_init(&m->idle, NULL);
    /* Every write from here on goes through the tap; those in flight have
       finished (they are before the copy reads their chunks). */
    vd_fuse_set_tap(server, &m->tap);
    int error = pthread_create(&m->thread, NULL, vd_mirror_thread, m);
    if (error) {
        vd_fuse_set_tap(server, NULL);
        vd_image_close(m->target);
        if (m->created)
            unlink(target_path);
        pthread_cond_destroy(&m->idle);
        pthread_mutex_destroy(&m->mutex);
        free(m->target_path);
        free(m);
        return vd_fail_errno(error, "starting the mirror's thread");
    }
    m->thread_started = true;
    *out = m;
    return ERROR_SUCCESS;
}

/* ---- the operations thread's requests ------------------------------------ */

void vd_mirror_state(struct vd_mirror *m, struct vd_msg_operation_state *state, char *detail, size_t size)
{
    state->kind = VD_OPERATION_MIRROR;
    state->status = vd_mirror_status(m); /* first: a final status comes with final counters */
    state->done = __atomic_load_n(&m->done, __ATOMIC_RELAXED);
    state->total = m->total;
    detail[0] = '\0';
    if (state->status != ERROR_IO_PENDING && state->status != ERROR_SUCCESS) {
        pthread_mutex_lock(&m->mutex);
        snprintf(detail, size, "%s", m->detail);
        pthread_mutex_unlock(&m->mutex);
    }
}

bool vd_mirror_active(struct vd_mirror *m)
{
    return m->phase != VD_MIRROR_OVER;
}

static void vd_mirror_join(struct vd_mirror *m)
{
    if (m->thread_started) {
        __atomic_store_n(&m->cancel, true, __ATOMIC_RELAXED);
        pthread_join(m->thread, NULL);
        m->thread_started = false;
    }
}

/* Stops mirroring and lets go of the target: kept when keep (in sync at the
   session's end), else removed when this module created it. */
static void vd_mirror_stop(struct vd_mirror *m, bool keep)
{
    if (m->phase == VD_MIRROR_OVER)
        return;
    vd_mirror_join(m);
    vd_fuse_set_tap(m->server, NULL);
    if (keep && vd_image_flush(m->target) != ERROR_SUCCESS)
        keep = false;
    vd_image_close(m->target);
    m->target = NULL;
    if (!keep && m->created)
        unlink(m->target_path);
    m->phase = VD_MIRROR_OVER;
}

DWORD vd_mirror_cancel(struct vd_mirror *m)
{
    if (m->phase == VD_MIRROR_OVER)
        return vd_fail(ERROR_NOT_FOUND, "the mirror onto %s has ended already", m->target_path);
    vd_mirror_stop(m, false);
    DWORD status = vd_mirror_status(m);
    if (status == ERROR_IO_PENDING || status == ERROR_SUCCESS) {
        snprintf(m->detail, sizeof m->detail, "the mirror onto %s was cancelled", m->target_path);
        __atomic_store_n(&m->status, ERROR_OPERATION_ABORTED, __ATOMIC_RELEASE);
    }
    return ERROR_SUCCESS;
}

DWORD vd_mirror_break(struct vd_mirror *m, int *handover)
{
    *handover = -1;
    DWORD status = vd_mirror_status(m);
    if (m->phase == VD_MIRROR_OVER || status != ERROR_SUCCESS)
        return vd_fail(ERROR_VHD_INVALID_STATE, "the mirror onto %s is %s", m->target_path,
                       m->phase == VD_MIRROR_OVER        ? "over"
                       : status == ERROR_IO_PENDING      ? "still copying (cancel it to stop)"
                                                         : "failed");
    struct vd_image *target = m->target;
    /* The attachment's marker goes to the target before the source lets go
       of its own: at no moment does neither look attached (an opener for
       writing would find the target free). */
    status = vd_share_mark_attached(target->fd);
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", target->fd);
    if (status == ERROR_SUCCESS && (*handover = open(self, O_RDONLY | O_NONBLOCK | O_CLOEXEC)) < 0)
        status = vd_fail_errno(errno, "opening %s for the helper", m->target_path);
    if (status != ERROR_SUCCESS)
        return status; /* still in sync: the caller may try again */
    vd_mirror_join(m); /* ended already: the copy is done */
    /* The target equals the source now, and every write from the next
       request on goes to the target alone. */
    struct vd_image *source = vd_fuse_replace_image(m->server, target);
    m->target = NULL;
    m->source = NULL;
    m->phase = VD_MIRROR_OVER;
    status = vd_image_flush(target);
    DWORD source_status = source->writable ? vd_image_flush(source) : ERROR_SUCCESS;
    /* The source is no longer the disk: closing it ends its marker here,
       so that it can be opened, written and attached again. */
    vd_image_close(source);
    return status == ERROR_SUCCESS ? source_status : status;
}

void vd_mirror_free(struct vd_mirror *m)
{
    if (!m)
        return;
    vd_mirror_stop(m, vd_mirror_status(m) == ERROR_SUCCESS);
    pthread_cond_destroy(&m->idle);
    pthread_mutex_destroy(&m->mutex);
    free(m->target_path);
    free(m);
}
