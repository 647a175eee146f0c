/*
 * The FUSE precondition of served attachments (see fusecheck.h).  /dev/fuse
 * is the misc device 10:229 on every kernel; opening it loads the fuse module
 * where it is not loaded yet, and fails where the kernel has none (ENODEV),
 * where the node is missing (ENOENT: a container started without
 * --device /dev/fuse) or where a device cgroup or a nodev mount forbids it
 * (EPERM, EACCES).
 */
#define _GNU_SOURCE
#include "fusecheck.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "errors.h"

#define VD_FUSE_DEVICE "/dev/fuse"
enum { VD_FUSE_MAJOR = 10, VD_FUSE_MINOR = 229 };

/* "dynamic VHDX", "differencing VHD", "fixed VHDX with scattered blocks". */
static void vd_fuse_kind(const struct vd_image *image, char *kind, size_t size)
{
    const char *subtype = image->subtype == VD_SUBTYPE_DYNAMIC        ? "dynamic"
                          : image->subtype == VD_SUBTYPE_DIFFERENCING ? "differencing"
                                                                      : "fixed";
    snprintf(kind, size, "%s %s%s", subtype, image->format->name,
             image->subtype == VD_SUBTYPE_FIXED ? " whose blocks are not one contiguous run" : "");
}

static DWORD vd_fuse_missing(const struct vd_image *image, const char *what, int error)
{
    char kind[96];
    vd_fuse_kind(image, kind, sizeof kind);
    return vd_fail(ERROR_NOT_SUPPORTED,
                   "attaching %s (a %s) needs FUSE, and %s%s%s: load the kernel's fuse module "
                   "(modprobe fuse) or, in a container, start it with --device /dev/fuse --cap-add SYS_ADMIN "
                   "(or --privileged); fixed VHD, ISO and contiguous fixed VHDX images attach without FUSE",
                   image->path, kind, what, error ? ": " : "", error ? strerror(error) : "");
}

DWORD vd_fuse_require(const struct vd_image *image)
{
    int fd = open(VD_FUSE_DEVICE, O_RDWR | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        int error = errno;
        if (error == ENOENT)
            return vd_fuse_missing(image, VD_FUSE_DEVICE " is missing", 0);
        if (error == ENODEV || error == ENXIO)
            return vd_fuse_missing(image, "the kernel has no FUSE driver behind " VD_FUSE_DEVICE, error);
        return vd_fuse_missing(image, VD_FUSE_DEVICE " cannot be opened", error);
    }
    struct stat st;
    bool fuse = fstat(fd, &st) == 0 && S_ISCHR(st.st_mode) && major(st.st_rdev) == VD_FUSE_MAJOR &&
                minor(st.st_rdev) == VD_FUSE_MINOR;
    close(fd);
    if (!fuse)
        return vd_fuse_missing(image, VD_FUSE_DEVICE " is not the FUSE device (10:229)", 0);
    return ERROR_SUCCESS;
}
