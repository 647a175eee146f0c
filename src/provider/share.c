/*
 * Sharing claims and attachment markers (see share.h).
 *
 * The lock file of an image: flock() on the whole file is the claim mutex;
 * byte VD_HOLD_BYTE + p is read-locked by every claim that holds permission
 * p, byte VD_DENY_BYTE + p by every claim that denies it.  The locks are
 * open-file-description locks (F_OFD_*), so two handles of one process
 * conflict as two processes do (Windows' sharing modes are per handle too),
 * and F_OFD_GETLK reports every claim but the asking description's own.
 */
#define _GNU_SOURCE
#include "share.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../_cffi_src/shim.h"
#include "errors.h"
#include "fuseattach.h"
#include "loopdev.h"
#include "rundir.h"

enum { VD_HOLD_BYTE = 100, VD_DENY_BYTE = 200, VD_PERMISSIONS = 3 };

/* The mutex is held for a few lock calls; a holder that does not let go
   within this time is stopped or stuck, and the caller is better told than
   hung. */
enum { VD_MUTEX_WAIT_MS = 3000 };

/* How long a claimant waits for a closed attachment to finish going: the
   passing opener's second, then the teardown and its server's exit, which
   a busy machine can stretch. */
enum { VD_SETTLE_MS = 2 * VD_LOOP_TRANSIENT_MS };

/* The image-file byte the attachment marker locks: the largest offset a lock
   can name, beyond any image's data and other programs' locks (qemu locks
   bytes 100-299 of the image itself). */
#define VD_ATTACHED_LOCK_OFFSET (INT64_MAX - 2)

static const char *const vd_permission_names[VD_PERMISSIONS] = {
    "an open handle",
    "a writer (a handle with ATTACH_RW, METAOPS or CREATE access, or a read-write attachment)",
    "an attach in progress or a process-held attachment",
};

static const char *const vd_denial_names[VD_PERMISSIONS] = {
    "",
    "a claim that keeps the image read-only (a writer, a read-only attachment, or an open or attached "
    "differencing disk using it as a parent)",
    "an attach in progress or a process-held attachment",
};

static int vd_read_lock(int fd, off_t offset)
{
    struct flock lock = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = offset, .l_len = 1};
    return fcntl(fd, F_OFD_SETLK, &lock);
}

static bool vd_locked_elsewhere(int fd, off_t offset)
{
    struct flock lock = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = offset, .l_len = 1};
    return fcntl(fd, F_OFD_GETLK, &lock) == 0 && lock.l_type != F_UNLCK;
}

/* Whether this process may make claims: the lock files are root's, as
   attaching is. */
static bool vd_share_may_claim(void)
{
    int state = VD_PRIVILEGE_ABSENT;
    return vd_manage_volume_privilege_state(&state) == ERROR_SUCCESS && state == VD_PRIVILEGE_ENABLED;
}

static void vd_share_lock_name(dev_t dev, ino_t ino, char *name, size_t size)
{
    snprintf(name, size, "%" PRIx64 "-%" PRIx64 ".lock", (uint64_t)dev, (uint64_t)ino);
}

/* Opens (creating when absent) the lock file of image; the caller checks
   that it is a regular file (vd_share_claim() examines it anyway).  Every
   open makes a claim, so this is one system call: the run directory's
   descriptor is kept (rundir.h). */
static DWORD vd_share_lock_file(const struct vd_image *image, int *fd)
{
    int dir;
    DWORD status = vd_run_dir_kept(&dir);
    if (status != ERROR_SUCCESS)
        return status;
    char name[64];
    vd_share_lock_name(image->file_dev, image->file_ino, name, sizeof name);
    *fd = vd_run_open_lock(dir, name);
    if (*fd < 0)
        return vd_fail_errno(errno, "cannot open the lock file of %s in %s", image->path, vd_run_dir_path());
    return ERROR_SUCCESS;
}

static DWORD vd_share_lock_mutex(int fd, const struct vd_image *image)
{
    struct timespec pause = {0, 1000000};
    for (int waited = 0; flock(fd, LOCK_EX | LOCK_NB) < 0; waited++) {
        if (errno != EWOULDBLOCK && errno != EINTR)
            return vd_fail_errno(errno, "locking the claims of %s", image->path);
        if (waited >= VD_MUTEX_WAIT_MS)
            return vd_fail(ERROR_SHARING_VIOLATION,
                           "another process has held the claims of %s for %d ms; is it stopped?", image->path,
                           VD_MUTEX_WAIT_MS);
        nanosleep(&pause, NULL);
    }
    return ERROR_SUCCESS;
}

/* The first conflict of (hold, deny) with the claims other than check_fd's,
   as a failure naming it, or ERROR_SUCCESS. */
static DWORD vd_share_conflict(int check_fd, unsigned hold, unsigned deny, const struct vd_image *image,
                               const char *what)
{
    for (int p = 0; p < VD_PERMISSIONS; p++) {
        if ((hold & (1u << p)) && vd_locked_elsewhere(check_fd, VD_DENY_BYTE + p))
            return vd_fail(ERROR_SHARING_VIOLATION, "%s on %s conflicts with %s", what, image->path,
                           vd_denial_names[p]);
        if ((deny & (1u << p)) && vd_locked_elsewhere(check_fd, VD_HOLD_BYTE + p))
            return vd_fail(ERROR_SHARING_VIOLATION, "%s on %s conflicts with %s", what, image->path,
                           vd_permission_names[p]);
    }
    return ERROR_SUCCESS;
}

DWORD vd_share_claim(const struct vd_image *image, unsigned hold, unsigned deny, int except_fd, const char *what,
                     int *fd)
{
    *fd = -1;
    if (!vd_share_may_claim())
        return ERROR_SUCCESS;
    int claim;
    DWORD status;
    /* The mutex makes check-and-publish one step: without it two claimants
       could each publish, then each see the other and both give up (or, in
       the other order, both go ahead).  A lock file is removed, under its
       mutex, once no claim is left on it (vd_share_forget()): a claimant that
       opened it just before must not publish on the removed file, where
       nobody looks, so it starts again on the new one. */
    for (int attempt = 0;; attempt++) {
        status = vd_share_lock_file(image, &claim);
        if (status != ERROR_SUCCESS)
            return status;
        status = vd_share_lock_mutex(claim, image);
        struct stat st;
        if (status == ERROR_SUCCESS && fstat(claim, &st) < 0)
            status = vd_fail_errno(errno, "examining the lock file of %s", image->path);
        else if (status == ERROR_SUCCESS && !S_ISREG(st.st_mode))
            status = vd_fail(ERROR_SHARING_VIOLATION, "the lock file of %s in %s is not a regular file",
                             image->path, vd_run_dir_path());
        if (status != ERROR_SUCCESS || st.st_nlink > 0 || attempt == 8)
            break;
        close(claim);
    }
    if (status == ERROR_SUCCESS) {
        status = vd_share_conflict(except_fd >= 0 ? except_fd : claim, hold, deny, image, what);
        for (int p = 0; status == ERROR_SUCCESS && p < VD_PERMISSIONS; p++) {
            if (((hold & (1u << p)) && vd_read_lock(claim, VD_HOLD_BYTE + p) < 0) ||
                ((deny & (1u << p)) && vd_read_lock(claim, VD_DENY_BYTE + p) < 0))
                status = vd_fail_errno(errno, "publishing a claim on %s", image->path);
        }
        flock(claim, LOCK_UN);
    }
    if (status != ERROR_SUCCESS) {
        close(claim); /* drops whatever was published */
        return status;
    }
    *fd = claim;
    return ERROR_SUCCESS;
}

void vd_share_remove_if_unclaimed(int dir, const char *name)
{
    /* Asked through a description of its own: a claim inherited by a helper
       shares the releaser's description, whose locks that one would not
       see.  Under the mutex (not waited for: a claimant holding it is about
       to use the file), and only while the name still means this file. */
    int lock = openat(dir, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (lock < 0)
        return;
    struct flock any = {.l_type = F_WRLCK,
                        .l_whence = SEEK_SET,
                        .l_start = VD_HOLD_BYTE,
                        .l_len = VD_DENY_BYTE + VD_PERMISSIONS - VD_HOLD_BYTE};
    struct stat mine, named;
    if (fstat(lock, &mine) == 0 && S_ISREG(mine.st_mode) && flock(lock, LOCK_EX | LOCK_NB) == 0 &&
        fcntl(lock, F_OFD_GETLK, &any) == 0 && any.l_type == F_UNLCK &&
        fstatat(dir, name, &named, AT_SYMLINK_NOFOLLOW) == 0 && mine.st_dev == named.st_dev &&
        mine.st_ino == named.st_ino)
        unlinkat(dir, name, 0);
    close(lock);
}

void vd_share_forget(dev_t dev, ino_t ino)
{
    int dir;
    if (vd_run_dir_kept(&dir) != ERROR_SUCCESS)
        return;
    char name[64];
    vd_share_lock_name(dev, ino, name, sizeof name);
    vd_share_remove_if_unclaimed(dir, name);
}

bool vd_share_held_elsewhere(int fd, unsigned perm)
{
    for (int p = 0; fd >= 0 && p < VD_PERMISSIONS; p++)
        if ((perm & (1u << p)) && vd_locked_elsewhere(fd, VD_HOLD_BYTE + p))
            return true;
    return false;
}

bool vd_share_denied_elsewhere(int fd, unsigned perm)
{
    for (int p = 0; fd >= 0 && p < VD_PERMISSIONS; p++)
        if ((perm & (1u << p)) && vd_locked_elsewhere(fd, VD_DENY_BYTE + p))
            return true;
    return false;
}

DWORD vd_share_open_chain(struct vd_image *image, int except_fd)
{
    DWORD status = ERROR_SUCCESS;
    if (image->writable)
        status = vd_share_claim(image, VD_SHARE_WRITE, VD_SHARE_WRITE, except_fd, "opening for writing",
                                &image->share_fd);
    for (struct vd_image *parent = image->parent; status == ERROR_SUCCESS && parent; parent = parent->parent)
        status = vd_share_claim(parent, 0, VD_SHARE_WRITE, -1, "using it as the parent of a differencing disk",
                                &parent->share_fd);
    if (status != ERROR_SUCCESS) {
        for (struct vd_image *link = image; link; link = link->parent) {
            if (link->share_fd >= 0)
                close(link->share_fd);
            link->share_fd = -1;
        }
    }
    return status;
}

DWORD vd_share_mark_attached(int image_fd)
{
    if (vd_read_lock(image_fd, VD_ATTACHED_LOCK_OFFSET) < 0)
        return vd_fail_errno(errno, "marking the image as attached");
    return ERROR_SUCCESS;
}

int vd_share_attached_loop(const struct vd_image *image, bool *helper)
{
    *helper = false;
    /* No marker: certainly not attached by this provider, in O(1).  Nobody
       but the attachment can remove its marker, so this answer cannot be
       forged; a marker can (any reader can lock that byte), so it is only
       believed when a root-owned record or a loop device confirms it. */
    if (!vd_locked_elsewhere(image->fd, VD_ATTACHED_LOCK_OFFSET))
        return -1;
    int number = vd_served_find(image, helper);
    if (number >= 0)
        return number;
    return vd_loop_find(image->file_dev, image->file_ino);
}

/* Whether /dev/loopN detaches by itself when its last opener closes. */
static bool vd_loop_autoclears(int number)
{
    char path[64], value[8] = "";
    snprintf(path, sizeof path, "/sys/block/loop%d/loop/autoclear", number);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    ssize_t n = read(fd, value, sizeof value - 1);
    close(fd);
    return n > 0 && value[0] == '1';
}

/* Waits at most timeout_ms for no other process to hold image_fd's
   attachment marker. */
static void vd_wait_unmarked(int image_fd, long timeout_ms)
{
    struct timespec start, now, pause = {0, 2000000};
    clock_gettime(CLOCK_MONOTONIC, &start);
    while (vd_locked_elsewhere(image_fd, VD_ATTACHED_LOCK_OFFSET)) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000 >= timeout_ms)
            return;
        nanosleep(&pause, NULL);
    }
}

void vd_share_settle(const struct vd_image *image)
{
    bool helper;
    int number = vd_share_attached_loop(image, &helper);
    /* Read at once: the wait below is for this binding, not for another
       attacher's that gets the number next. */
    uint64_t seq = number >= 0 ? vd_loop_current_seq(number) : 0;
    if (number < 0) {
        /* A marker with no device behind it: a served attachment whose
           device is gone while its helper still lets go of its claims (it
           drops the marker last), or a marker someone forged.  Either way
           worth a bounded wait, never an answer. */
        vd_wait_unmarked(image->fd, VD_SETTLE_MS);
        return;
    }
    /* A permanent disk is held by nobody (flat: not autoclear) or by its
       helper; a live non-permanent one by its attaching process's ATTACH
       claim.  What is left is one on its way out. */
    if (helper || !vd_loop_autoclears(number))
        return;
    int probe;
    if (vd_share_claim(image, 0, 0, -1, "looking", &probe) != ERROR_SUCCESS || probe < 0)
        return;
    bool held = vd_share_held_elsewhere(probe, VD_SHARE_ATTACH);
    close(probe);
    if (held)
        return;
    /* Then its holder's marker, which goes after its claims (image.c) or,
       served, before its helper's. */
    struct timespec start, now, pause = {0, 2000000};
    clock_gettime(CLOCK_MONOTONIC, &start);
    if (!vd_loop_wait_unbound(number, seq, VD_SETTLE_MS))
        return;
    for (;;) {
        /* Then its server's writer claims, which its helper gives up just
           after the server ends. */
        if (!vd_locked_elsewhere(image->fd, VD_ATTACHED_LOCK_OFFSET)) {
            if (vd_share_claim(image, 0, 0, -1, "looking", &probe) != ERROR_SUCCESS || probe < 0)
                return;
            held = vd_share_held_elsewhere(probe, VD_SHARE_WRITE);
            close(probe);
            if (!held)
                return;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed_ms = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (elapsed_ms >= VD_SETTLE_MS)
            return;
        nanosleep(&pause, NULL);
    }
}
