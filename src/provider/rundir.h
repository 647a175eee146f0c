/*
 * The provider's run directory: where FUSE mounts, serving records, helper
 * sockets and logs live.  Everything in it is made by root and trusted by
 * root, so the directory itself is checked before anything is made in it.
 *
 * Promises:
 *   - The path is $VIRTDISK_RUN_DIR when set (an absolute path), else
 *     /run/virtdisk; it is read once per process, so a serving process and
 *     the process that started it agree (the variable is inherited).
 *   - An absent directory is created with mode 0700; an existing one is used
 *     only if it is a real directory (not a symbolic link), owned by root,
 *     with mode exactly 0700.  Anything else is refused with a detail that
 *     names the path and what is wrong; so is a directory that cannot be
 *     created (read-only /run, no permission).
 *   - vd_run_dir() returns a fresh descriptor each call (the caller closes
 *     it): the check is made anew every time, a forked child shares nothing
 *     with its parent's use, and no descriptor leaks into exec'd programs.
 *   - vd_run_dir_kept() is the exception, for the sharing claims every
 *     open makes: one descriptor for the life of the process, checked anew
 *     (fstat) each call and reopened when the directory was removed.
 *   - Files are only ever created with vd_run_create(): openat on that
 *     descriptor with O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC, so no name in
 *     the directory can redirect a write elsewhere; lock files, never
 *     written, with vd_run_open_lock(): O_CREAT|O_NOFOLLOW, read-only; the
 *     few files every process shares (the sharing claims' count and sweep
 *     mark) with vd_run_open_shared(): O_CREAT|O_NOFOLLOW, never blocking.
 */
#ifndef VD_PROVIDER_RUNDIR_H
#define VD_PROVIDER_RUNDIR_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "virtdisk.h"

#define VD_RUN_DIR_ENV "VIRTDISK_RUN_DIR"
#define VD_RUN_DIR_DEFAULT "/run/virtdisk"

/* The run directory's path (static storage; never NULL). */
const char *vd_run_dir_path(void);

/* Opens (creating when absent) and checks the run directory: *dirfd is an
   O_DIRECTORY|O_CLOEXEC descriptor the caller closes. */
DWORD vd_run_dir(int *dirfd);

/* The run directory as vd_run_dir() opens and checks it, through one
   descriptor the process keeps (the caller does not close it): opening and
   checking the path anew costs as much as a sharing claim itself.  It is
   checked when first opened and, with check, again (fstat: a directory of
   root's, mode 0700, not removed), a removed directory opened anew under
   the same number.  Without check the descriptor is trusted: only root
   can change or remove the directory, and a caller that finds a name
   missing that must be there (ENOENT from creating in a removed
   directory) asks again with check. */
DWORD vd_run_dir_kept(int *dirfd, bool check);

/* Opens name in the run directory dirfd read-only, creating it empty (mode
   0600) when absent: for lock files, which nobody writes.  One call when
   the file exists, two when it is created (*created tells).  Never follows
   a symbolic link, never blocks; the caller, which examines the file
   anyway, checks that it is a regular file.  -1 (errno) on failure. */
int vd_run_open_lock(int dirfd, const char *name, bool *created);

/* Opens name in the run directory dirfd with flags (O_WRONLY, O_APPEND,
   ...), creating it empty (mode 0600) when absent: for a small file every
   process shares.  O_NOFOLLOW, O_NONBLOCK and O_CLOEXEC are always added;
   *created tells whether this call made it.  -1 (errno) on failure. */
int vd_run_open_shared(int dirfd, const char *name, int flags, bool *created);

/* Creates name (one path component) in the run directory dirfd, exclusively:
   flags are O_WRONLY/O_RDWR plus extras such as O_APPEND; O_CREAT, O_EXCL,
   O_NOFOLLOW and O_CLOEXEC are always added.  *fd is the new descriptor. */
DWORD vd_run_create(int dirfd, const char *name, int flags, mode_t mode, int *fd);

/* Opens an existing name in the run directory for reading, never following a
   symbolic link and never blocking (a regular file only), or returns -1. */
int vd_run_open_existing(int dirfd, const char *name);

/* Makes a fresh directory prefix<random> (mode 0700) in the run directory;
   its name is stored in name. */
DWORD vd_run_make_dir(int dirfd, const char *prefix, char *name, size_t size);

#endif
