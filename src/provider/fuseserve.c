/*
 * The FUSE server of one virtual disk (see fuseserve.h).
 *
 * The file system has two inodes: the root directory and "disk".  Every
 * answer about them but the file's st_blocks is fixed for the server's
 * lifetime, so the kernel is told to cache attributes and entries for a long
 * time (and to forget them when st_blocks changes outside a request of its
 * own), and the file's page cache is kept across opens.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION FUSE_MAKE_VERSION(3, 12)
#include "fuseserve.h"

#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "errors.h"
#include "fuse3dl.h"
#include "rundir.h"
#include "servealloc.h"

#define VD_FUSE_ROOT_INO FUSE_ROOT_ID
#define VD_FUSE_DISK_INO 2
/* Attributes change only with the disk's allocation (st_blocks): the
   kernel drops its copy after each write or fallocate it passes on, and
   is told to when the block table changes outside a request. */
#define VD_FUSE_TIMEOUT 86400.0

enum {
    /* Largest read or write one request carries: the kernel's FUSE_MAX_MAX_PAGES
       (256 pages), which libfuse3 negotiates when its buffer allows. */
    VD_FUSE_MAX_IO = 1 << 20,
    /* Threads serving requests at once; a loop device has 128 requests in
       flight at most, most of them merged, and the formats serialise block
       allocation anyway. */
    VD_FUSE_MAX_THREADS = 16,
    VD_FUSE_IDLE_THREADS = 4,
};

struct vd_fuse_server {
    struct vd_image *image;
    uint64_t size;  /* the image's, fixed: a replacing image has the same */
    ULONG sector;
    bool writable;
    struct fuse_session *session;
    int root_fd; /* the mount's root (O_PATH), in no namespace; -1 once let go */

    /* Taken shared by every read, write and flush, exclusively to change
       image or tap: a change waits for the requests in flight. */
    pthread_rwlock_t io_lock;
    struct vd_fuse_tap *tap;
    struct vd_alloc alloc; /* st_blocks (servealloc.h) */
    void (*end_hook)(void *context);
    void *end_context;

    pthread_t thread;
    pthread_mutex_t mutex;
    pthread_cond_t ended_cond;
    bool ended;         /* the session loop returned and the image is closed */
    DWORD flush_status; /* of the final flush */
};

static DWORD vd_fuse_flush_image(struct vd_image *image)
{
    if (!image->writable)
        return ERROR_SUCCESS;
    if (image->format->flush)
        return image->format->flush(image);
    return fdatasync(image->fd) < 0 ? vd_fail_errno(errno, "%s: flushing", image->path) : ERROR_SUCCESS;
}

/* ---- the file system ------------------------------------------------------ */

static void vd_fuse_stat(const struct vd_fuse_server *server, fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    if (ino == VD_FUSE_ROOT_INO) {
        st->st_mode = S_IFDIR | 0700;
        st->st_nlink = 2;
    } else {
        st->st_mode = S_IFREG | (server->writable ? 0600 : 0400);
        st->st_nlink = 1;
        st->st_size = (off_t)server->size;
        st->st_blocks = (blkcnt_t)((vd_alloc_bytes(&server->alloc) + 511) / 512);
        st->st_blksize = (blksize_t)server->sector;
    }
}

static void vd_fuse_init(void *data, struct fuse_conn_info *conn)
{
    /* The kernel may cache the file's pages: only this server changes them. */
    conn->want &= ~(unsigned)FUSE_CAP_AUTO_INVAL_DATA;
    /* Write-through: a write the loop device sees completed is in the image
       (flushed at fsync), never in a cache the kernel could lose with the
       session. */
    conn->want &= ~(unsigned)FUSE_CAP_WRITEBACK_CACHE;
    if (conn->max_write > VD_FUSE_MAX_IO)
        conn->max_write = VD_FUSE_MAX_IO;
    conn->max_readahead = conn->capable & FUSE_CAP_ASYNC_READ ? VD_FUSE_MAX_IO : conn->max_readahead;
}

static void vd_fuse_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct vd_fuse_server *server = fuse_req_userdata(req);
    if (parent != VD_FUSE_ROOT_INO || strcmp(name, VD_FUSE_DISK_NAME) != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    struct fuse_entry_param entry;
    memset(&entry, 0, sizeof entry);
    entry.ino = VD_FUSE_DISK_INO;
    entry.attr_timeout = VD_FUSE_TIMEOUT;
    entry.entry_timeout = VD_FUSE_TIMEOUT;
    vd_fuse_stat(server, VD_FUSE_DISK_INO, &entry.attr);
    fuse_reply_entry(req, &entry);
}

static void vd_fuse_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct vd_fuse_server *server = fuse_req_userdata(req);
    if (ino != VD_FUSE_ROOT_INO && ino != VD_FUSE_DISK_INO) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    struct stat st;
    vd_fuse_stat(server, ino, &st);
    fuse_reply_attr(req, &st, VD_FUSE_TIMEOUT);
}

static void vd_fuse_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                            struct fuse_file_info *fi)
{
    /* The disk's size is the image's; a truncate to that same size (what
       O_TRUNC-free tools may still ask) is harmless, anything else is not. */
    struct vd_fuse_server *server = fuse_req_userdata(req);
    if ((to_set & FUSE_SET_ATTR_SIZE) && (uint64_t)attr->st_size != server->size) {
        fuse_reply_err(req, EPERM);
        return;
    }
    vd_fuse_getattr(req, ino, fi);
}

static void vd_fuse_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct vd_fuse_server *server = fuse_req_userdata(req);
    if (ino != VD_FUSE_DISK_INO) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    if ((fi->flags & O_ACCMODE) != O_RDONLY && !server->writable) {
        fuse_reply_err(req, EROFS);
        return;
    }
    fi->keep_cache = 1;
    fuse_reply_open(req, fi);
}

static void vd_fuse_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, struct fuse_file_info *fi)
{
    struct vd_fuse_server *server = fuse_req_userdata(req);
    uint64_t end = server->size;
    if (offset < 0 || (uint64_t)offset >= end) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    if (size > end - (uint64_t)offset)
        size = (size_t)(end - (uint64_t)offset);
    void *buffer = malloc(size);
    if (!buffer) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    pthread_rwlock_rdlock(&server->io_lock);
    DWORD status = server->image->format->read(server->image, buffer, (uint64_t)offset, size);
    pthread_rwlock_unlock(&server->io_lock);
    if (status == ERROR_SUCCESS) {
        fuse_reply_buf(req, buffer, size);
    } else {
        fuse_log(FUSE_LOG_ERR, "virtdisk: reading %zu bytes at %lld failed (0x%08X): %s\n", size,
                 (long long)offset, (unsigned)status, vd_last_error_detail());
        fuse_reply_err(req, EIO);
    }
    free(buffer);
}

static void vd_fuse_write(fuse_req_t req, fuse_ino_t ino, const char *buffer, size_t size, off_t offset,
                          struct fuse_file_info *fi)
{
    struct vd_fuse_server *server = fuse_req_userdata(req);
    if (!server->writable) {
        fuse_reply_err(req, EROFS);
        return;
    }
    uint64_t end = server->size;
    if (offset < 0 || (uint64_t)offset > end || size > end - (uint64_t)offset) {
        fuse_reply_err(req, ENOSPC);
        return;
    }
    pthread_rwlock_rdlock(&server->io_lock);
    struct vd_image *image = server->image;
    struct vd_alloc_change change;
    vd_alloc_begin(&server->alloc, image, (uint64_t)offset, size, false, &change);
    DWORD status = server->tap ? server->tap->write(server->tap, image, buffer, (uint64_t)offset, size)
                               : image->format->write(image, buffer, (uint64_t)offset, size);
    vd_alloc_end(&server->alloc, image, &change);
    pthread_rwlock_unlock(&server->io_lock);
    if (status == ERROR_SUCCESS) {
        fuse_reply_write(req, size);
    } else {
        fuse_log(FUSE_LOG_ERR, "virtdisk: writing %zu bytes at %lld failed (0x%08X): %s\n", size,
                 (long long)offset, (unsigned)status, vd_last_error_detail());
        fuse_reply_err(req, status == ERROR_DISK_FULL ? ENOSPC : EIO);
    }
}

/* ZERO_RANGE: the range must read zeros and stay allocated, so that later
   writes there cannot fail for want of space (what a write of zeros that
   must not unmap promises).  The format's write_zeroes does it, zeroing
   blocks it holds in place without writing them; while a mirror's tap is
   set (or where the format has none), zeros are written like any data,
   through the tap too, which allocates every block they touch.  One chunk
   per hold of io_lock, so that a long zeroing does not hold off a switch. */
static DWORD vd_fuse_write_zeroes(struct vd_fuse_server *server, uint64_t offset, uint64_t length)
{
    size_t chunk = length < VD_FUSE_MAX_IO ? (size_t)length : VD_FUSE_MAX_IO;
    void *zeros = NULL;
    DWORD status = ERROR_SUCCESS;
    for (uint64_t done = 0; done < length && status == ERROR_SUCCESS;) {
        size_t n = length - done < chunk ? (size_t)(length - done) : chunk;
        pthread_rwlock_rdlock(&server->io_lock);
        struct vd_image *image = server->image;
        bool in_place = !server->tap && image->format->write_zeroes;
        if (!in_place && !zeros && !(zeros = calloc(1, chunk))) {
            pthread_rwlock_unlock(&server->io_lock);
            status = vd_fail(ERROR_OUTOFMEMORY, "allocating a buffer of zeros");
            break;
        }
        struct vd_alloc_change change;
        vd_alloc_begin(&server->alloc, image, offset + done, n, false, &change);
        status = in_place      ? image->format->write_zeroes(image, offset + done, n)
                 : server->tap ? server->tap->write(server->tap, image, zeros, offset + done, n)
                               : image->format->write(image, zeros, offset + done, n);
        vd_alloc_end(&server->alloc, image, &change);
        pthread_rwlock_unlock(&server->io_lock);
        done += n;
    }
    free(zeros);
    return status;
}

/* A discard, under io_lock like any request that uses the image (a break
   may replace it).  While a mirror's tap is set, the target must come to
   read zeros there too, and the tap knows only writes: the range is then
   written as zeros, and its space comes back at the next compaction. */
static DWORD vd_fuse_discard(struct vd_fuse_server *server, uint64_t offset, uint64_t length)
{
    pthread_rwlock_rdlock(&server->io_lock);
    bool mirrored = server->tap != NULL;
    struct vd_image *image = server->image;
    DWORD status = ERROR_SUCCESS;
    if (!mirrored && image->format->discard) {
        struct vd_alloc_change change;
        vd_alloc_begin(&server->alloc, image, offset, length, true, &change);
        status = image->format->discard(image, offset, length);
        vd_alloc_end(&server->alloc, image, &change);
    } else if (!mirrored) {
        status = vd_fail(ERROR_NOT_SUPPORTED, "the format cannot discard");
    }
    pthread_rwlock_unlock(&server->io_lock);
    return mirrored ? vd_fuse_write_zeroes(server, offset, length) : status;
}

/* The loop device turns a discard (REQ_OP_DISCARD, and REQ_OP_WRITE_ZEROES
   that may unmap) into fallocate(PUNCH_HOLE | KEEP_SIZE) on this file: the
   format's discard, which gives the space back where it can.  A write of
   zeros that must not unmap (BLKZEROOUT, blkdiscard -z) arrives as
   ZERO_RANGE | KEEP_SIZE: written zeros (vd_fuse_write_zeroes).  Anything
   else would change the file's size, which a disk cannot: refused. */
static void vd_fuse_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                              struct fuse_file_info *fi)
{
    struct vd_fuse_server *server = fuse_req_userdata(req);
    struct vd_image *image = server->image;
    bool punch = mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
    if (!punch && mode != (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE) && mode != FALLOC_FL_ZERO_RANGE) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    if (!server->writable) {
        fuse_reply_err(req, EROFS);
        return;
    }
    if (punch && !image->format->discard) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    if (offset < 0 || length <= 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    /* Past the end there is nothing to zero (a file's KEEP_SIZE semantics). */
    uint64_t end = server->size, start = (uint64_t)offset;
    uint64_t count = start >= end ? 0 : (uint64_t)length < end - start ? (uint64_t)length : end - start;
    DWORD status = count == 0 ? ERROR_SUCCESS
                   : punch    ? vd_fuse_discard(server, start, count)
                              : vd_fuse_write_zeroes(server, start, count);
    if (status != ERROR_SUCCESS) {
        fuse_log(FUSE_LOG_ERR, "virtdisk: %s %llu bytes at %llu failed (0x%08X): %s\n",
                 punch ? "discarding" : "zeroing", (unsigned long long)count, (unsigned long long)start,
                 (unsigned)status, vd_last_error_detail());
        fuse_reply_err(req, status == ERROR_DISK_FULL ? ENOSPC : EIO);
        return;
    }
    fuse_reply_err(req, 0);
}

/* SEEK_DATA and SEEK_HOLE (cp --sparse, qemu-img map, anything that copies
   the file): a hole is where no layer of the chain holds data, so it surely
   reads zeros (vd_image_chain_zeros); anything else, a parent's data
   included, is data.  The end of the disk is a hole, as in any file.  The
   walk asks the chain one block (or run) at a time. */
static void vd_fuse_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi)
{
    struct vd_fuse_server *server = fuse_req_userdata(req);
    if (ino != VD_FUSE_DISK_INO || (whence != SEEK_DATA && whence != SEEK_HOLE)) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    uint64_t end = server->size;
    if (off < 0 || (uint64_t)off >= end) {
        fuse_reply_err(req, ENXIO);
        return;
    }
    bool hole_wanted = whence == SEEK_HOLE;
    uint64_t at = (uint64_t)off;
    DWORD status = ERROR_SUCCESS;
    pthread_rwlock_rdlock(&server->io_lock);
    while (at < end) {
        bool zeros;
        uint64_t run;
        status = vd_image_chain_zeros(server->image, at, end - at, &zeros, &run);
        if (status != ERROR_SUCCESS || zeros == hole_wanted)
            break;
        at += run;
    }
    pthread_rwlock_unlock(&server->io_lock);
    if (status != ERROR_SUCCESS) {
        fuse_log(FUSE_LOG_ERR, "virtdisk: finding %s from %lld failed (0x%08X): %s\n",
                 hole_wanted ? "a hole" : "data", (long long)off, (unsigned)status, vd_last_error_detail());
        fuse_reply_err(req, EIO);
    } else if (at >= end && !hole_wanted) {
        fuse_reply_err(req, ENXIO); /* no data after off */
    } else {
        fuse_reply_lseek(req, (off_t)(at < end ? at : end));
    }
}

static void vd_fuse_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    struct vd_fuse_server *server = fuse_req_userdata(req);
    pthread_rwlock_rdlock(&server->io_lock);
    DWORD status = vd_fuse_flush_image(server->image);
    if (status == ERROR_SUCCESS && server->tap)
        status = server->tap->flush(server->tap);
    pthread_rwlock_unlock(&server->io_lock);
    if (status != ERROR_SUCCESS)
        fuse_log(FUSE_LOG_ERR, "virtdisk: flush failed (0x%08X): %s\n", (unsigned)status, vd_last_error_detail());
    fuse_reply_err(req, status == ERROR_SUCCESS ? 0 : EIO);
}

static void vd_fuse_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_reply_err(req, 0); /* close(): durability is fsync's business */
}

static void vd_fuse_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, struct fuse_file_info *fi)
{
    struct vd_fuse_server *server = fuse_req_userdata(req);
    if (ino != VD_FUSE_ROOT_INO) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    static const struct { const char *name; fuse_ino_t ino; } entries[] = {
        {".", VD_FUSE_ROOT_INO}, {"..", VD_FUSE_ROOT_INO}, {VD_FUSE_DISK_NAME, VD_FUSE_DISK_INO}};
    char buffer[512];
    size_t used = 0;
    for (size_t i = (size_t)offset; i < sizeof entries / sizeof entries[0]; i++) {
        struct stat st;
        vd_fuse_stat(server, entries[i].ino, &st);
        size_t need = fuse_add_direntry(req, buffer + used, sizeof buffer - used, entries[i].name, &st,
                                        (off_t)(i + 1));
        if (used + need > size || used + need > sizeof buffer)
            break;
        used += need;
    }
    fuse_reply_buf(req, buffer, used);
}

static const struct fuse_lowlevel_ops vd_fuse_ops = {
    .init = vd_fuse_init,
    .lookup = vd_fuse_lookup,
    .getattr = vd_fuse_getattr,
    .setattr = vd_fuse_setattr,
    .open = vd_fuse_open,
    .read = vd_fuse_read,
    .write = vd_fuse_write,
    .flush = vd_fuse_flush,
    .fsync = vd_fuse_fsync,
    .fallocate = vd_fuse_fallocate,
    .readdir = vd_fuse_readdir,
    .lseek = vd_fuse_lseek,
};

/* ---- the mount, seen by nobody ---------------------------------------------- */

/* Test-only (tests/test_mount_namespace.py): with this set to 1 the process
   stops itself (SIGSTOP) while the file system is mounted and not yet
   detached, so that a test can copy mount namespaces at that very moment. */
#define VD_FUSE_TEST_STOP_MOUNTED "VIRTDISK_TEST_STOP_MOUNTED"

/* Where a mount namespace cannot be had (a seccomp filter, systemd's
   RestrictNamespaces=, user.max_mnt_namespaces reached): the mount is made
   where the process lives, and only visible for the moment between mount
   and detach. */
static void vd_fuse_note_no_namespace(const char *what, int error)
{
    fuse_log(FUSE_LOG_WARNING,
             "virtdisk: no mount namespace of the server's own (%s: %s); the mount is visible until it is "
             "detached\n",
             what, strerror(error));
}

/* Mounts the session on mount_dir and keeps only a descriptor of the mount's
   root (server->root_fd), the mount itself detached from every namespace
   (MNT_DETACH): the kernel ends the session once that descriptor and every
   file opened through it are closed.

   The mount is made in a mount namespace of this process's own (private:
   nothing propagates out of it), and the process returns to its own
   namespace, root and working directory before anything else happens.  A
   mount made where others live can be copied while it exists (unshare -m,
   clone(CLONE_NEWNS), a container starting); removing its folder removes
   the copies that are still on it, but not one a copier bound elsewhere or
   opened: that one outlives the detach here, the session never ends, and
   the detach of the disk waits for it and fails.  This namespace lives for
   the few system calls below, in one process that no other shares, so
   nothing can copy it; and no other process ever sees the mount, its
   propagation or its events (systemd's mount units, udisks).

   The process must have one thread: setns(CLONE_NEWNS) refuses a process
   that shares its file system context.  No FUSE request is needed here (the
   O_PATH open of the root calls nothing of the file system), so no server
   thread has to run yet. */
static DWORD vd_fuse_mount_hidden(struct vd_fuse_server *server, const struct vd_image *image, const char *mount_dir)
{
    int home_ns = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC);
    int home_root = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    int home_cwd = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    DWORD status = ERROR_SUCCESS;
    bool own_ns = false;
    if (home_root < 0 || home_cwd < 0) {
        status = vd_fail_errno(errno, "opening the server's root and working directory");
    } else if (home_ns < 0) {
        vd_fuse_note_no_namespace("/proc/self/ns/mnt", errno);
    } else if (unshare(CLONE_NEWNS) < 0) {
        vd_fuse_note_no_namespace("unshare", errno);
    } else {
        own_ns = true;
        /* The copy's mounts keep their propagation: under a shared mount
           (systemd makes / shared) a mount here would appear in the peers. */
        if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
            status = vd_fail_errno(errno, "making the server's mount namespace private");
    }
    bool mounted = false;
    if (status == ERROR_SUCCESS && fuse_session_mount(server->session, mount_dir) != 0) {
        status = access("/dev/fuse", F_OK) == 0
                     ? vd_fail(ERROR_NOT_SUPPORTED, "mounting the FUSE server on %s failed (see stderr)", mount_dir)
                     : vd_fail(ERROR_NOT_SUPPORTED, "serving a %s %s image needs FUSE, and /dev/fuse is missing",
                               image->subtype == VD_SUBTYPE_DIFFERENCING ? "differencing" : "dynamic",
                               image->format->name);
    } else if (status == ERROR_SUCCESS) {
        mounted = true;
        const char *stop = getenv(VD_FUSE_TEST_STOP_MOUNTED);
        if (stop && strcmp(stop, "1") == 0)
            raise(SIGSTOP);
        server->root_fd = open(mount_dir, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (server->root_fd < 0)
            status = vd_fail_errno(errno, "opening the root of the FUSE mount %s", mount_dir);
    }
    if (mounted && umount2(mount_dir, MNT_DETACH | UMOUNT_NOFOLLOW) < 0 && status == ERROR_SUCCESS)
        status = vd_fail_errno(errno, "detaching the FUSE mount %s", mount_dir);
    /* Back home, as the process was: setns() moves root and working
       directory to the namespace's own, and the caller may have had others
       (a chroot). */
    if (own_ns && (setns(home_ns, CLONE_NEWNS) < 0 || fchdir(home_root) < 0 || chroot(".") < 0 ||
                   fchdir(home_cwd) < 0)) {
        int error = errno;
        /* Staying would hold a copy of every mount of the system: this
           process must not go on. */
        if (status == ERROR_SUCCESS)
            status = vd_fail_errno(error, "returning to the server's mount namespace");
    }
    if (status != ERROR_SUCCESS) {
        if (server->root_fd >= 0)
            close(server->root_fd);
        server->root_fd = -1;
        fuse_session_destroy(server->session);
        server->session = NULL;
    }
    if (home_ns >= 0)
        close(home_ns);
    if (home_root >= 0)
        close(home_root);
    if (home_cwd >= 0)
        close(home_cwd);
    return status;
}

/* ---- the server's life ---------------------------------------------------- */

static void vd_fuse_free(struct vd_fuse_server *server)
{
    vd_alloc_destroy(&server->alloc);
    pthread_mutex_destroy(&server->mutex);
    pthread_rwlock_destroy(&server->io_lock);
    pthread_cond_destroy(&server->ended_cond);
    if (server->root_fd >= 0)
        close(server->root_fd);
    free(server);
}

static void *vd_fuse_thread(void *context)
{
    struct vd_fuse_server *server = context;
    struct fuse_loop_config *config = fuse_loop_cfg_create();
    if (config) {
        fuse_loop_cfg_set_max_threads(config, VD_FUSE_MAX_THREADS);
        fuse_loop_cfg_set_idle_threads(config, VD_FUSE_IDLE_THREADS);
        /* One /dev/fuse descriptor: see fuseserve.h. */
        fuse_loop_cfg_set_clone_fd(config, 0);
        fuse_session_loop_mt(server->session, config);
        fuse_loop_cfg_destroy(config);
    } else {
        fuse_session_loop(server->session);
    }
    pthread_mutex_lock(&server->mutex);
    void (*hook)(void *) = server->end_hook;
    void *hook_context = server->end_context;
    server->end_hook = NULL;
    pthread_mutex_unlock(&server->mutex);
    if (hook)
        hook(hook_context);
    DWORD status = vd_fuse_flush_image(server->image);
    if (status != ERROR_SUCCESS)
        fuse_log(FUSE_LOG_ERR, "virtdisk: final flush of %s failed (0x%08X): %s\n", server->image->path,
                 (unsigned)status, vd_last_error_detail());
    fuse_session_destroy(server->session);
    vd_image_close(server->image);
    server->image = NULL;

    pthread_mutex_lock(&server->mutex);
    server->ended = true;
    server->flush_status = status;
    pthread_cond_broadcast(&server->ended_cond);
    pthread_mutex_unlock(&server->mutex);
    return NULL;
}

DWORD vd_fuse_serve(struct vd_image *image, bool writable, struct vd_fuse_server **out)
{
    if (writable && (!image->writable || !image->format->write)) {
        vd_image_close(image);
        return vd_fail(ERROR_ACCESS_DENIED, "%s is not open for writing", image->path);
    }
    struct vd_fuse_server *server = calloc(1, sizeof *server);
    if (!server) {
        vd_image_close(image);
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a FUSE server");
    }
    server->image = image;
    server->size = image->virtual_size;
    server->sector = image->logical_sector_size;
    server->writable = writable;
    server->root_fd = -1;
    pthread_mutex_init(&server->mutex, NULL);
    /* Writer preference: a tap change must not wait behind a steady stream
       of guest requests. */
    pthread_rwlockattr_t lock_attributes;
    pthread_rwlockattr_init(&lock_attributes);
    pthread_rwlockattr_setkind_np(&lock_attributes, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&server->io_lock, &lock_attributes);
    pthread_rwlockattr_destroy(&lock_attributes);
    pthread_cond_init(&server->ended_cond, NULL);
    vd_alloc_init(&server->alloc, image->virtual_size);
    /* A failed count leaves it unknown: the whole disk is reported. */
    vd_alloc_recount(&server->alloc, image);

    int run_dir = -1;
    char *mount_dir = NULL;
    DWORD status = vd_fuse3_load();
    if (status == ERROR_SUCCESS)
        status = vd_run_dir(&run_dir);
    if (status == ERROR_SUCCESS) {
        char name[48];
        /* The server's pid in the name tells a later garbage collection
           whether the folder's server is gone (servrecord.h). */
        char prefix[32];
        snprintf(prefix, sizeof prefix, "mnt.%ld.", (long)getpid());
        status = vd_run_make_dir(run_dir, prefix, name, sizeof name);
        close(run_dir);
        /* By name from here: mount(2) takes a path.  The directory was
           checked to be root's own, so the name cannot be redirected. */
        if (status == ERROR_SUCCESS && asprintf(&mount_dir, "%s/%s", vd_run_dir_path(), name) < 0) {
            mount_dir = NULL;
            status = vd_fail(ERROR_OUTOFMEMORY, "allocating a mount path");
        }
    }
    if (status == ERROR_SUCCESS) {
        /* The source column of /proc/mounts names the image served, as the
           run directory names its files (servrecord.h): which mount serves
           what is plain to an administrator (nsenter into the server while
           it mounts, or the fallback below). */
        char options[96];
        snprintf(options, sizeof options, "fsname=virtdisk:%jx-%jx,subtype=virtdisk",
                 (uintmax_t)image->file_dev, (uintmax_t)image->file_ino);
        char *argv[] = {"virtdisk", "-o", options, NULL};
        struct fuse_args args = FUSE_ARGS_INIT(3, argv);
        server->session = fuse_session_new(&args, &vd_fuse_ops, sizeof vd_fuse_ops, server);
        fuse_opt_free_args(&args);
        if (!server->session)
            status = vd_fail(ERROR_NOT_SUPPORTED, "libfuse3 could not create a session (see stderr)");
    }
    if (status == ERROR_SUCCESS)
        status = vd_fuse_mount_hidden(server, image, mount_dir);
    if (mount_dir) {
        rmdir(mount_dir); /* empty again in every namespace: the mount left it */
        free(mount_dir);
    }
    if (status == ERROR_SUCCESS) {
        int fd = fuse_session_fd(server->session);
        fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC);
        /* Server threads take no signal meant for the process (Python's
           handlers run in its main thread); libfuse's workers inherit this. */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        int error = pthread_create(&server->thread, NULL, vd_fuse_thread, server);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (error) {
            status = vd_fail_errno(error, "starting the FUSE server thread");
            close(server->root_fd); /* the mount's last holder: the session ends */
            server->root_fd = -1;
            fuse_session_destroy(server->session);
            server->session = NULL;
        }
    }
    if (status != ERROR_SUCCESS) {
        vd_image_close(image);
        vd_fuse_free(server);
        return status;
    }
    *out = server;
    return ERROR_SUCCESS;
}

struct vd_image *vd_fuse_image(const struct vd_fuse_server *server)
{
    return server->image;
}

bool vd_fuse_writable(const struct vd_fuse_server *server)
{
    return server->writable;
}

int vd_fuse_root(const struct vd_fuse_server *server)
{
    return server->root_fd;
}

void vd_fuse_let_go(struct vd_fuse_server *server)
{
    if (server->root_fd >= 0)
        close(server->root_fd);
    server->root_fd = -1;
}

void vd_fuse_set_tap(struct vd_fuse_server *server, struct vd_fuse_tap *tap)
{
    pthread_rwlock_wrlock(&server->io_lock);
    server->tap = tap;
    pthread_rwlock_unlock(&server->io_lock);
}

/* The kernel keeps the file's attributes for VD_FUSE_TIMEOUT unless told:
   after a change of the block table that no request of its own carried. */
static void vd_fuse_attributes_changed(struct vd_fuse_server *server)
{
    int error = fuse_lowlevel_notify_inval_inode(server->session, VD_FUSE_DISK_INO, -1, 0);
    /* ENOENT: the kernel has no attributes of the file cached. */
    if (error && error != -ENOENT && error != -ENOSYS)
        fuse_log(FUSE_LOG_ERR, "virtdisk: telling the kernel of new attributes failed: %s\n", strerror(-error));
}

struct vd_image *vd_fuse_replace_image(struct vd_fuse_server *server, struct vd_image *image)
{
    pthread_rwlock_wrlock(&server->io_lock);
    struct vd_image *old = server->image;
    server->image = image;
    server->tap = NULL;
    vd_alloc_recount(&server->alloc, image);
    pthread_rwlock_unlock(&server->io_lock);
    vd_fuse_attributes_changed(server);
    return old;
}

void vd_fuse_recount(struct vd_fuse_server *server)
{
    pthread_rwlock_rdlock(&server->io_lock);
    DWORD status = vd_alloc_recount(&server->alloc, server->image);
    pthread_rwlock_unlock(&server->io_lock);
    if (status != ERROR_SUCCESS)
        fuse_log(FUSE_LOG_ERR, "virtdisk: counting the allocated blocks failed (0x%08X): %s\n", (unsigned)status,
                 vd_last_error_detail());
    vd_fuse_attributes_changed(server);
}

void vd_fuse_set_end_hook(struct vd_fuse_server *server, void (*hook)(void *context), void *context)
{
    pthread_mutex_lock(&server->mutex);
    server->end_hook = hook;
    server->end_context = context;
    pthread_mutex_unlock(&server->mutex);
}

DWORD vd_fuse_wait_end(struct vd_fuse_server *server)
{
    pthread_mutex_lock(&server->mutex);
    while (!server->ended)
        pthread_cond_wait(&server->ended_cond, &server->mutex);
    DWORD status = server->flush_status;
    pthread_mutex_unlock(&server->mutex);
    pthread_join(server->thread, NULL);
    vd_fuse_free(server);
    return status;
}
