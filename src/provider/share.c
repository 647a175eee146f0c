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

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
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

#define VD_SHARE_LOCK_SUFFIX ".lock"

/* The run directory's count of lock files created since its last sweep
   (vd_share_count_created()). */
#define VD_SHARE_COUNTER "lock-files.count"

/* Touched by every sweep: its modification time is the last sweep's. */
#define VD_SHARE_SWEPT "lock-files.swept"


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

/* Read-locks byte base + p for every permission p in bits, a run of
   adjacent bits in one call. */
static int vd_read_lock_bits(int fd, off_t base, unsigned bits)
{
    for (int p = 0; p < VD_PERMISSIONS;) {
        if (!(bits & (1u << p))) {
            p++;
            continue;
        }
        int first = p;
        while (p < VD_PERMISSIONS && (bits & (1u << p)))
            p++;
        struct flock lock = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = base + first, .l_len = p - first};
        if (fcntl(fd, F_OFD_SETLK, &lock) < 0)
            return -1;
    }
    return 0;
}

static bool vd_range_locked_elsewhere(int fd, off_t offset, off_t length)
{
    struct flock lock = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = offset, .l_len = length};
    return fcntl(fd, F_OFD_GETLK, &lock) == 0 && lock.l_type != F_UNLCK;
}

static bool vd_locked_elsewhere(int fd, off_t offset)
{
    return vd_range_locked_elsewhere(fd, offset, 1);
}

/* Whether this process may make claims: the lock files are root's, as
   attaching is. */
static bool vd_share_may_claim(void)
{
    int state = VD_PRIVILEGE_ABSENT;
    return vd_manage_volume_privilege_state(&state) == ERROR_SUCCESS && state == VD_PRIVILEGE_ENABLED;
}

/* The image file's device, inode and birth time: the inode alone could be
   a deleted image's, reused, whose claims a helper still holds. */
static void vd_share_lock_name(const struct vd_image *image, char *name, size_t size)
{
    snprintf(name, size, "%" PRIx64 "-%" PRIx64 "-%" PRIx64 "-%" PRIx32 "%s", (uint64_t)image->file_dev,
             (uint64_t)image->file_ino, (uint64_t)image->file_btime_sec, image->file_btime_nsec, VD_SHARE_LOCK_SUFFIX);
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
    /* Nobody denies HANDLE, so holding it conflicts with nothing. */
    hold &= ~(unsigned)VD_SHARE_HANDLE;
    if (!hold && !deny)
        return ERROR_SUCCESS;
    /* Usually no other claim touches these bytes: one look at the span from
       the first to the last says so; they are looked at one by one only to
       name a conflict, or when a claim between them does not matter. */
    off_t first = INT64_MAX, last = 0;
    for (int p = 0; p < VD_PERMISSIONS; p++) {
        off_t bytes[2] = {(hold & (1u << p)) ? VD_DENY_BYTE + p : -1, (deny & (1u << p)) ? VD_HOLD_BYTE + p : -1};
        for (int i = 0; i < 2; i++) {
            if (bytes[i] >= 0 && bytes[i] < first)
                first = bytes[i];
            if (bytes[i] > last)
                last = bytes[i];
        }
    }
    if (!vd_range_locked_elsewhere(check_fd, first, last - first + 1))
        return ERROR_SUCCESS;
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

/* Removes name in the run directory dir when no claim is on it and it was
   created before born_before. */
static void vd_share_remove_if_unclaimed(int dir, const char *name, struct timespec born_before)
{
    /* Asked through a description of its own: a claim inherited by a helper
       shares the releaser's description, whose locks that one would not
       see.  Under the mutex (not waited for: a claimant holding it is about
       to use the file), and only while the name still means this file; a
       claimant that opened the file before the unlink finds it unlinked
       once it holds the mutex, and opens the name anew.  A lock file's
       ctime is its creation: nothing changes it after. */
    int lock = openat(dir, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (lock < 0)
        return;
    struct flock any = {.l_type = F_WRLCK,
                        .l_whence = SEEK_SET,
                        .l_start = VD_HOLD_BYTE,
                        .l_len = VD_DENY_BYTE + VD_PERMISSIONS - VD_HOLD_BYTE};
    struct stat mine, named;
    bool old = false;
    if (fstat(lock, &mine) == 0 && S_ISREG(mine.st_mode))
        old = mine.st_ctim.tv_sec < born_before.tv_sec ||
              (mine.st_ctim.tv_sec == born_before.tv_sec && mine.st_ctim.tv_nsec < born_before.tv_nsec);
    if (old && flock(lock, LOCK_EX | LOCK_NB) == 0 && fcntl(lock, F_OFD_GETLK, &any) == 0 &&
        any.l_type == F_UNLCK && fstatat(dir, name, &named, AT_SYMLINK_NOFOLLOW) == 0 &&
        mine.st_dev == named.st_dev && mine.st_ino == named.st_ino)
        unlinkat(dir, name, 0);
    close(lock);
}

void vd_share_sweep(int dir)
{
    /* Only what was there at the previous sweep goes: a lock file created
       since may be about to be used again (an inventory going round its
       images), and sweeping it would make every open create one.  The
       previous sweep's time is the mark file's modification time; the
       first sweep, finding none, removes nothing. */
    struct timespec born_before = {0, 0};
    bool created;
    int mark = vd_run_open_shared(dir, VD_SHARE_SWEPT, O_WRONLY, &created);
    struct stat st;
    if (mark < 0)
        return;
    if (!created && fstat(mark, &st) == 0 && S_ISREG(st.st_mode))
        born_before = st.st_mtim;
    futimens(mark, NULL);
    close(mark);
    int copy = openat(dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *listing = copy >= 0 ? fdopendir(copy) : NULL;
    if (!listing) {
        if (copy >= 0)
            close(copy);
        return;
    }
    size_t suffix = strlen(VD_SHARE_LOCK_SUFFIX);
    for (struct dirent *entry; (entry = readdir(listing)) != NULL;) {
        size_t length = strlen(entry->d_name);
        if (length > suffix && strcmp(entry->d_name + length - suffix, VD_SHARE_LOCK_SUFFIX) == 0)
            vd_share_remove_if_unclaimed(dir, entry->d_name, born_before);
    }
    closedir(listing);
}

/* Counts a lock file just created, in a file of the run directory every
   process appends a byte to: whoever brings it to VD_SHARE_SWEEP_EVERY
   empties it and sweeps.  Only the calls that create a lock file pay for
   this. */
static void vd_share_count_created(int dir)
{
    bool created;
    int counter = vd_run_open_shared(dir, VD_SHARE_COUNTER, O_WRONLY | O_APPEND, &created);
    if (counter < 0)
        return;
    struct stat st;
    /* The byte count is read after the write, not atomically with it: two
       creators may both see the limit reached; the flock picks one, which
       looks again. */
    if (write(counter, "+", 1) == 1 && fstat(counter, &st) == 0 && S_ISREG(st.st_mode) &&
        st.st_size >= VD_SHARE_SWEEP_EVERY && flock(counter, LOCK_EX | LOCK_NB) == 0) {
        if (fstat(counter, &st) == 0 && st.st_size >= VD_SHARE_SWEEP_EVERY && ftruncate(counter, 0) == 0)
            vd_share_sweep(dir);
        flock(counter, LOCK_UN);
    }
    close(counter);
}

/* vd_share_claim(), but checked for conflicts only when check. */
static DWORD vd_share_publish(const struct vd_image *image, unsigned hold, unsigned deny, int except_fd,
                              const char *what, bool check, int *fd)
{
    *fd = -1;
    if (!vd_share_may_claim())
        return ERROR_SUCCESS;
    char name[96];
    vd_share_lock_name(image, name, sizeof name);
    int claim = -1, dir = -1;
    bool created = false;
    DWORD status;
    /* The mutex makes check-and-publish one step: without it two claimants
       could each publish, then each see the other and both give up (or, in
       the other order, both go ahead).  A sweep removes a lock file, under
       its mutex, once no claim is left on it (vd_share_sweep()):
       a claimant that opened it just before must not publish on the removed
       file, where nobody looks, so it starts again on a new one. */
    for (int attempt = 0;; attempt++) {
        /* The kept run directory is checked again only when something is
           wrong: a lock file removed under us may mean the directory went. */
        status = vd_run_dir_kept(&dir, attempt > 0);
        if (status != ERROR_SUCCESS)
            return status;
        bool made;
        claim = vd_run_open_lock(dir, name, &made);
        if (claim < 0 && attempt == 0 && (errno == ENOENT || errno == ENOTDIR || errno == EBADF))
            continue; /* creating in a removed directory: look at it again */
        if (claim < 0)
            return vd_fail_errno(errno, "cannot open the lock file of %s in %s", image->path, vd_run_dir_path());
        created |= made;
        status = vd_share_lock_mutex(claim, image);
        struct stat st;
        if (status == ERROR_SUCCESS && fstat(claim, &st) < 0)
            status = vd_fail_errno(errno, "examining the lock file of %s", image->path);
        else if (status == ERROR_SUCCESS && !S_ISREG(st.st_mode))
            status = vd_fail(ERROR_SHARING_VIOLATION, "the lock file of %s in %s is not a regular file",
                             image->path, vd_run_dir_path());
        else if (status == ERROR_SUCCESS && st.st_nlink == 0 && attempt == 8)
            status = vd_fail(ERROR_SHARING_VIOLATION,
                             "the lock file of %s in %s is removed as often as it is made", image->path,
                             vd_run_dir_path());
        if (status != ERROR_SUCCESS || st.st_nlink > 0)
            break;
        close(claim);
    }
    if (status == ERROR_SUCCESS) {
        if (check)
            status = vd_share_conflict(except_fd >= 0 ? except_fd : claim, hold, deny, image, what);
        if (status == ERROR_SUCCESS &&
            (vd_read_lock_bits(claim, VD_HOLD_BYTE, hold) < 0 || vd_read_lock_bits(claim, VD_DENY_BYTE, deny) < 0))
            status = vd_fail_errno(errno, "publishing a claim on %s", image->path);
        flock(claim, LOCK_UN);
    }
    if (status != ERROR_SUCCESS) {
        close(claim); /* drops whatever was published */
        return status;
    }
    /* Counted once published: the sweep this may start sees the claim. */
    if (created)
        vd_share_count_created(dir);
    *fd = claim;
    return ERROR_SUCCESS;
}

DWORD vd_share_claim(const struct vd_image *image, unsigned hold, unsigned deny, int except_fd, const char *what,
                     int *fd)
{
    return vd_share_publish(image, hold, deny, except_fd, what, true, fd);
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

DWORD vd_share_open_chain(struct vd_image *image, unsigned hold, int except_fd)
{
    DWORD status = ERROR_SUCCESS;
    unsigned deny = image->writable ? VD_SHARE_WRITE : 0;
    hold |= deny;
    if (hold)
        status = vd_share_claim(image, hold, deny, except_fd,
                                image->writable ? "opening for writing" : "opening a handle", &image->share_fd);
    for (struct vd_image *parent = image->parent; status == ERROR_SUCCESS && parent; parent = parent->parent)
        status = vd_share_claim(parent, 0, VD_SHARE_WRITE, -1, "using it as the parent of a differencing disk",
                                &parent->share_fd);
    if (status != ERROR_SUCCESS)
        vd_share_end_chain(image);
    return status;
}

void vd_share_end_chain(struct vd_image *image)
{
    for (struct vd_image *link = image; link; link = link->parent) {
        if (link->share_fd >= 0)
            close(link->share_fd);
        link->share_fd = -1;
    }
}

DWORD vd_share_claim_writer(const struct vd_image *image, int *fd)
{
    *fd = -1;
    if (!image->writable || image->share_fd < 0)
        return ERROR_SUCCESS;
    /* Not checked: the image's own claim holds and denies the same already,
       checked when it was made, and a check now would see the ATTACH claim
       of the very attachment this is for (which denies WRITE when it is
       read-only). */
    return vd_share_publish(image, VD_SHARE_WRITE, VD_SHARE_WRITE, -1, "serving", false, fd);
}

DWORD vd_share_mark_attached(int image_fd)
{
    if (vd_read_lock(image_fd, VD_ATTACHED_LOCK_OFFSET) < 0)
        return vd_fail_errno(errno, "marking the image as attached");
    return ERROR_SUCCESS;
}

int vd_share_attached_loop(const struct vd_image *image, bool *helper)
{
    struct vd_loop_binding found;
    return vd_share_attached_binding(image, helper, &found);
}

int vd_share_attached_binding(const struct vd_image *image, bool *helper, struct vd_loop_binding *found)
{
    *helper = false;
    /* No marker: certainly not attached by this provider, in O(1).  Nobody
       but the attachment can remove its marker, so this answer cannot be
       forged; a marker can (any reader can lock that byte), so it is only
       believed when a root-owned record or a loop device confirms it. */
    if (!vd_locked_elsewhere(image->fd, VD_ATTACHED_LOCK_OFFSET))
        return -1;
    int number = vd_served_find(image, helper, found);
    if (number >= 0)
        return number;
    return vd_loop_find(image->file_dev, image->file_ino, found);
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
    struct vd_loop_binding found;
    int number = vd_share_attached_binding(image, &helper, &found);
    /* The binding the lookup saw: the wait below is for it, not for
       another attacher's that gets the number next. */
    uint64_t seq = number >= 0 ? found.seq : 0;
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
    /* The flag is the found binding's only if that binding still holds the
       number; if not, it has ended, which is what this waits for. */
    if (seq && vd_loop_current_seq(number) != seq)
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
