/*
 * The provider's run directory (see rundir.h).
 */
#define _GNU_SOURCE
#include "rundir.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "errors.h"

static const char *vd_run_dir_value;
static pthread_once_t vd_run_dir_once = PTHREAD_ONCE_INIT;

static void vd_run_dir_read(void)
{
    const char *value = getenv(VD_RUN_DIR_ENV);
    /* A copy: the environment may be changed later by the caller. */
    vd_run_dir_value = value && value[0] ? strdup(value) : NULL;
    if (!vd_run_dir_value)
        vd_run_dir_value = VD_RUN_DIR_DEFAULT;
}

const char *vd_run_dir_path(void)
{
    pthread_once(&vd_run_dir_once, vd_run_dir_read);
    return vd_run_dir_value;
}

/* Why st is not an acceptable run directory, or NULL. */
static const char *vd_run_dir_fault(const struct stat *st, char *buffer, size_t size)
{
    if (!S_ISDIR(st->st_mode))
        return "is not a directory";
    if (st->st_uid != 0) {
        snprintf(buffer, size, "is owned by uid %u, not root", (unsigned)st->st_uid);
        return buffer;
    }
    if ((st->st_mode & 07777) != 0700) {
        snprintf(buffer, size, "has mode %04o, not 0700", (unsigned)(st->st_mode & 07777));
        return buffer;
    }
    return NULL;
}

DWORD vd_run_dir(int *dirfd)
{
    *dirfd = -1;
    const char *path = vd_run_dir_path();
    if (path[0] != '/')
        return vd_fail(ERROR_INVALID_PARAMETER, "%s=%s: the run directory must be an absolute path",
                       VD_RUN_DIR_ENV, path);
    /* Twice at most: once to find it absent, once after creating it (or
       after losing the race to another process creating it). */
    for (int attempt = 0; attempt < 2; attempt++) {
        int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0 && errno == ENOENT && attempt == 0) {
            if (mkdir(path, 0700) < 0 && errno != EEXIST)
                return vd_fail_errno(errno,
                                     "cannot create the run directory %s (set %s to a directory owned by "
                                     "root with mode 0700)",
                                     path, VD_RUN_DIR_ENV);
            continue;
        }
        if (fd < 0) {
            if (errno == ELOOP || errno == ENOTDIR)
                return vd_fail(ERROR_ACCESS_DENIED,
                               "refusing the run directory %s: it is a symbolic link or not a directory", path);
            return vd_fail_errno(errno, "cannot open the run directory %s", path);
        }
        struct stat st;
        if (fstat(fd, &st) < 0) {
            DWORD status = vd_fail_errno(errno, "cannot examine the run directory %s", path);
            close(fd);
            return status;
        }
        char buffer[64];
        const char *fault = vd_run_dir_fault(&st, buffer, sizeof buffer);
        if (fault) {
            close(fd);
            return vd_fail(ERROR_ACCESS_DENIED, "refusing the run directory %s: it %s", path, fault);
        }
        *dirfd = fd;
        return ERROR_SUCCESS;
    }
    return vd_fail(ERROR_PATH_NOT_FOUND, "the run directory %s vanished while being created", path);
}

static pthread_mutex_t vd_run_dir_kept_mutex = PTHREAD_MUTEX_INITIALIZER;
static int vd_run_dir_kept_fd = -1;

DWORD vd_run_dir_kept(int *dirfd, bool check)
{
    *dirfd = -1;
    pthread_mutex_lock(&vd_run_dir_kept_mutex);
    DWORD status = ERROR_SUCCESS;
    struct stat st;
    char buffer[64];
    bool usable = vd_run_dir_kept_fd >= 0 &&
                  (!check || (fstat(vd_run_dir_kept_fd, &st) == 0 && st.st_nlink > 0 &&
                              !vd_run_dir_fault(&st, buffer, sizeof buffer)));
    if (!usable) {
        int fresh;
        status = vd_run_dir(&fresh);
        if (status == ERROR_SUCCESS && vd_run_dir_kept_fd < 0) {
            vd_run_dir_kept_fd = fresh;
        } else if (status == ERROR_SUCCESS) {
            /* The same number, atomically: another thread still using it
               reaches the old directory or the new one, never a
               descriptor reused for something else. */
            if (dup3(fresh, vd_run_dir_kept_fd, O_CLOEXEC) < 0)
                status = vd_fail_errno(errno, "keeping the run directory %s open", vd_run_dir_path());
            close(fresh);
        }
    }
    if (status == ERROR_SUCCESS)
        *dirfd = vd_run_dir_kept_fd;
    pthread_mutex_unlock(&vd_run_dir_kept_mutex);
    return status;
}

int vd_run_open_lock(int dirfd, const char *name, bool *created)
{
    *created = false;
    /* Without O_CREAT first: a lock file outlives its claims (share.h), so
       it is usually there, and creating costs a second call only when it is
       not. */
    int fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        fd = openat(dirfd, name, O_RDONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0600);
        *created = fd >= 0;
    }
    return fd;
}

int vd_run_open_shared(int dirfd, const char *name, int flags, bool *created)
{
    *created = false;
    flags |= O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC;
    int fd = openat(dirfd, name, flags);
    if (fd < 0 && errno == ENOENT) {
        fd = openat(dirfd, name, flags | O_CREAT, 0600);
        *created = fd >= 0;
    }
    return fd;
}

DWORD vd_run_create(int dirfd, const char *name, int flags, mode_t mode, int *fd)
{
    *fd = openat(dirfd, name, flags | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
    if (*fd < 0)
        return vd_fail_errno(errno, "creating %s/%s", vd_run_dir_path(), name);
    return ERROR_SUCCESS;
}

int vd_run_open_existing(int dirfd, const char *name)
{
    int fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    struct stat st;
    if (fd >= 0 && (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))) {
        close(fd);
        fd = -1;
    }
    return fd;
}

DWORD vd_run_make_dir(int dirfd, const char *prefix, char *name, size_t size)
{
    /* Random enough to make collisions rare; mkdirat's EEXIST makes them
       harmless. */
    static const char letters[] = "abcdefghijklmnopqrstuvwxyz0123456789";
    for (int attempt = 0; attempt < 100; attempt++) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        uint64_t seed = (uint64_t)now.tv_nsec ^ ((uint64_t)now.tv_sec << 20) ^ ((uint64_t)getpid() << 40) ^
                        (uint64_t)(uintptr_t)name ^ (uint64_t)attempt * 0x9E3779B97F4A7C15ull;
        char suffix[9];
        for (int i = 0; i < 8; i++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            suffix[i] = letters[(seed >> 33) % (sizeof letters - 1)];
        }
        suffix[8] = '\0';
        snprintf(name, size, "%s%s", prefix, suffix);
        if (mkdirat(dirfd, name, 0700) == 0)
            return ERROR_SUCCESS;
        if (errno != EEXIST)
            return vd_fail_errno(errno, "creating %s/%s", vd_run_dir_path(), name);
    }
    return vd_fail(ERROR_ALREADY_EXISTS, "no free name for a directory %s* in %s", prefix, vd_run_dir_path());
}
