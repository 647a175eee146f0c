/*
 * Test double, loaded with LD_PRELOAD into a test's subprocess (and so into
 * the serving helper it starts): unshare(2) answers EPERM, as it does under a
 * seccomp filter or systemd's RestrictNamespaces=, so that a test sees what
 * the FUSE server does without a mount namespace of its own
 * (src/provider/fuseserve.h).  Every other call goes to the kernel.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>

int unshare(int flags)
{
    (void)flags;
    errno = EPERM;
    return -1;
}
