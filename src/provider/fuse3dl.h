/*
 * libfuse3, loaded at run time (dlopen of libfuse3.so.3) instead of linked.
 *
 * Why: the extension must run on any manylinux system, and the system's
 * libfuse3 is the one that matches its fusermount3 and kernel.  Linking it
 * would make the wheel either depend on a library auditwheel must not assume,
 * or carry a copy built against the build host's glibc (Debian 12's needs
 * glibc 2.34, which RHEL 8 and Ubuntu 20.04 lack).  Only serving dynamic and
 * differencing images needs FUSE; everything else works without it.
 *
 * Promises:
 *   - fuse3dl.c defines, under their libfuse names, exactly the libfuse
 *     functions the provider calls; fuseserve.c includes <fuse_lowlevel.h>
 *     and calls them as if linked.
 *   - vd_fuse3_load() loads the library once per process (thread-safe) and
 *     answers ERROR_NOT_SUPPORTED with a detail naming the library and the
 *     package to install when it or a required function is missing.  Call it
 *     (and see it succeed) before any other libfuse function.
 *   - libfuse before 3.8 (no fuse_reply_lseek) loads too: the server's
 *     lseek then answers ENOSYS, and the kernel treats the file as all data.
 *   - libfuse before 3.12 (no fuse_loop_cfg_*) loads too:
 *     fuse_loop_cfg_create() then answers NULL, and the caller runs the
 *     single-threaded loop.
 */
#ifndef VD_PROVIDER_FUSE3DL_H
#define VD_PROVIDER_FUSE3DL_H

#include "virtdisk.h"

DWORD vd_fuse3_load(void);

#endif
