/*
 * Whether this machine can serve an image through FUSE, asked before an
 * attachment that needs it creates anything.
 *
 * Promises:
 *   - vd_fuse_require() touches nothing: it opens /dev/fuse and closes it
 *     again, so that a container without FUSE learns what is missing before
 *     any loop device, mount, record or helper exists.
 *   - Its error (ERROR_NOT_SUPPORTED) names the image's kind, what is
 *     missing, and how to get it, and says that flat images need no FUSE.
 */
#ifndef VD_PROVIDER_FUSECHECK_H
#define VD_PROVIDER_FUSECHECK_H

#include "image.h"
#include "virtdisk.h"

/* ERROR_SUCCESS when /dev/fuse is the FUSE device and can be opened for
   reading and writing, else ERROR_NOT_SUPPORTED with the detail above. */
DWORD vd_fuse_require(const struct vd_image *image);

#endif
