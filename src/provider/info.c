/*
 * GetVirtualDiskInformation and the other information entry points.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "bytes.h"
#include "errors.h"
#include "handles.h"
#include "image.h"
#include "info_linux.h"
#include "loopdev.h"
#include "partition.h"
#include "utf16.h"

#define VD_INFO_HEADER offsetof(GET_VIRTUAL_DISK_INFO, Size)

static DWORD vd_not_applicable(const struct vd_image *image, const char *what)
{
    return vd_fail(ERROR_VHD_INVALID_TYPE, "%s does not apply to this %s image", what, image->format->name);
}

/* The sector sizes of the block device holding a file system, read from
   sysfs once per device and process: two sysfs reads cost ten times the rest
   of an information query, an inventory of many images on one disk asks the
   same question each time, and a mounted device's sector sizes do not change. */
static struct vd_host_cache {
    pthread_mutex_t mutex;
    unsigned next;
    struct {
        dev_t dev;
        ULONG logical, physical;
        BOOL remote;
        bool known;
    } entries[8];
} vd_host_cache = {.mutex = PTHREAD_MUTEX_INITIALIZER};

static ULONG vd_sysfs_sector_size(dev_t dev, const char *which)
{
    char path[96], value[32];
    snprintf(path, sizeof path, "/sys/dev/block/%u:%u/queue/%s", major(dev), minor(dev), which);
    ULONG size = 512;
    FILE *file = fopen(path, "re");
    if (file) {
        if (fgets(value, sizeof value, file))
            size = (ULONG)strtoul(value, NULL, 10);
        fclose(file);
    }
    return size;
}

/* The host disk's sector sizes, from the block device holding the image,
   and whether its file system is remote; cached with the sector sizes, as
   the file system mounted on a device does not change either. */
static void vd_host_sectors(const struct vd_image *image, ULONG *logical, ULONG *physical, BOOL *remote)
{
    struct vd_host_cache *cache = &vd_host_cache;
    bool found = false;
    pthread_mutex_lock(&cache->mutex);
    for (unsigned i = 0; i < sizeof cache->entries / sizeof cache->entries[0] && !found; i++) {
        if (cache->entries[i].known && cache->entries[i].dev == image->file_dev) {
            *logical = cache->entries[i].logical;
            *physical = cache->entries[i].physical;
            *remote = cache->entries[i].remote;
            found = true;
        }
    }
    pthread_mutex_unlock(&cache->mutex);
    if (!found) {
        *logical = vd_sysfs_sector_size(image->file_dev, "logical_block_size");
        *physical = vd_sysfs_sector_size(image->file_dev, "physical_block_size");
        struct statfs fs;
        /* NFS, SMB/CIFS, SMB2 and 9p are what Windows would call remote. */
        *remote = fstatfs(image->fd, &fs) == 0 &&
                  (fs.f_type == 0x6969 || fs.f_type == (typeof(fs.f_type))0xFF534D42 ||
                   fs.f_type == (typeof(fs.f_type))0xFE534D42 || fs.f_type == 0x01021997);
        pthread_mutex_lock(&cache->mutex);
        unsigned slot = cache->next++ % (sizeof cache->entries / sizeof cache->entries[0]);
        cache->entries[slot].dev = image->file_dev;
        cache->entries[slot].logical = *logical;
        cache->entries[slot].physical = *physical;
        cache->entries[slot].remote = *remote;
        cache->entries[slot].known = true;
        pthread_mutex_unlock(&cache->mutex);
    }
}

/* How scattered the image file is on the host file system, from its FIEMAP
   extents.  The file's data falls into segments separated by holes (a sparse
   image has many, and they are no fault); inside a segment, every boundary
   between consecutive file-system blocks that are not physically adjacent is
   a fragment.  The percentage is
       100 * fragments / (allocated blocks - segments)
   (the share of in-segment block boundaries that are breaks), rounded up so
   that any break shows as at least 1 %; a file whose segments are each one
   extent is 0 %.  A file system without FIEMAP answers ERROR_NOT_SUPPORTED. */
static DWORD vd_fragmentation(const struct vd_image *image, ULONG *percentage)
{
    enum { BATCH = 256 };
    struct fiemap *map = calloc(1, sizeof *map + BATCH * sizeof(struct fiemap_extent));
    if (!map)
        return vd_fail(ERROR_OUTOFMEMORY, "FIEMAP buffer");
    uint64_t segments = 0, fragments = 0, allocated = 0, next_logical = 0, next_physical = 0, start = 0;
    bool last = false;
    DWORD status = ERROR_SUCCESS;
    uint64_t block = image->file_block_size > 0 ? image->file_block_size : 4096;
    while (status == ERROR_SUCCESS && !last) {
        memset(map, 0, sizeof *map);
        map->fm_start = start;
        map->fm_length = FIEMAP_MAX_OFFSET - start;
        map->fm_extent_count = BATCH;
        if (ioctl(image->fd, FS_IOC_FIEMAP, map) < 0) {
            status = errno == EOPNOTSUPP || errno == ENOTTY
                         ? vd_fail(ERROR_NOT_SUPPORTED, "%s: the file system cannot map the file's extents (FIEMAP)",
                                   image->path)
                         : vd_fail_errno(errno, "%s: mapping the file's extents", image->path);
            break;
        }
        if (map->fm_mapped_extents == 0)
            break;
        for (uint32_t i = 0; i < map->fm_mapped_extents; i++) {
            const struct fiemap_extent *e = &map->fm_extents[i];
            if (segments == 0 || e->fe_logical != next_logical)
                segments++;
            else if (e->fe_physical != next_physical)
                fragments++;
            allocated += (e->fe_length + block - 1) / block;
            next_logical = e->fe_logical + e->fe_length;
            next_physical = e->fe_physical + e->fe_length;
            last = e->fe_flags & FIEMAP_EXTENT_LAST;
        }
        start = next_logical;
    }
    free(map);
    if (status != ERROR_SUCCESS)
        return status;
    uint64_t boundaries = allocated > segments ? allocated - segments : 0;
    *percentage = fragments == 0 || boundaries == 0 ? 0 : (ULONG)((fragments * 100 + boundaries - 1) / boundaries);
    if (*percentage > 100)
        *percentage = 100;
    return ERROR_SUCCESS;
}

/* The MULTI_SZ of parent locations, as UTF-16: the resolved parent's path
   alone when it was found, else every candidate. */
static size_t vd_parent_multi_sz(const struct vd_image *image, WCHAR *out, size_t capacity)
{
    size_t used = 0;
    if (image->parent_resolved && image->parent) {
        used += vd_utf8_to_utf16(image->parent->path, out ? out : NULL, out ? capacity : 0);
    } else {
        for (const char *p = image->parent_locations; p && *p; p += strlen(p) + 1) {
            size_t room = out && used < capacity ? capacity - used : 0;
            used += vd_utf8_to_utf16(p, out && room ? out + used : NULL, room);
        }
    }
    if (out && used < capacity)
        out[used] = 0;
    return used + 1;
}

static DWORD vd_get_info(struct vd_handle *handle, ULONG size, GET_VIRTUAL_DISK_INFO *info, ULONG *used)
{
    const struct vd_image *image = handle->image;
    bool differencing = image->subtype == VD_SUBTYPE_DIFFERENCING;
    *used = sizeof(GET_VIRTUAL_DISK_INFO);
    switch (info->Version) {
    case GET_VIRTUAL_DISK_INFO_SIZE:
        info->Size.VirtualSize = image->virtual_size;
        info->Size.PhysicalSize = image->file_size;
        info->Size.BlockSize = image->block_size;
        info->Size.SectorSize = image->logical_sector_size;
        return ERROR_SUCCESS;
    case GET_VIRTUAL_DISK_INFO_IDENTIFIER:
        info->Identifier = image->identifier;
        return ERROR_SUCCESS;
    case GET_VIRTUAL_DISK_INFO_PARENT_LOCATION: {
        if (!differencing)
            return vd_not_applicable(image, "PARENT_LOCATION");
        size_t chars = vd_parent_multi_sz(image, NULL, 0);
        *used = (ULONG)(offsetof(GET_VIRTUAL_DISK_INFO, ParentLocation.ParentLocationBuffer) +
                        chars * sizeof(WCHAR));
        if (size < *used)
            return vd_fail(ERROR_INSUFFICIENT_BUFFER, "PARENT_LOCATION needs %u bytes", (unsigned)*used);
        info->ParentLocation.ParentResolved = image->parent_resolved;
        vd_parent_multi_sz(image, info->ParentLocation.ParentLocationBuffer, chars);
        return ERROR_SUCCESS;
    }
    case GET_VIRTUAL_DISK_INFO_PARENT_IDENTIFIER:
        if (!differencing)
            return vd_not_applicable(image, "PARENT_IDENTIFIER");
        info->ParentIdentifier = image->parent_identifier;
        return ERROR_SUCCESS;
    case GET_VIRTUAL_DISK_INFO_PARENT_TIMESTAMP:
        if (!differencing || image->format->device_id != VIRTUAL_STORAGE_TYPE_DEVICE_VHD)
            return vd_not_applicable(image, "PARENT_TIMESTAMP");
        info->ParentTimestamp = image->parent_timestamp;
        return ERROR_SUCCESS;
    case GET_VIRTUAL_DISK_INFO_VIRTUAL_STORAGE_TYPE:
        info->VirtualStorageType.DeviceId = image->format->device_id;
        info->VirtualStorageType.VendorId = VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT;
        return ERROR_SUCCESS;
    case GET_VIRTUAL_DISK_INFO_PROVIDER_SUBTYPE:
        if (image->subtype == VD_SUBTYPE_NONE)
            return vd_not_applicable(image, "PROVIDER_SUBTYPE");
        info->ProviderSubtype = image->subtype;
        return ERROR_SUCCESS;
    case GET_VIRTUAL_DISK_INFO_IS_4K_ALIGNED:
        /* Whether every data block starts on a 4 KiB boundary of the file:
           true for flat images at an aligned offset and for VHDX (1 MiB
           aligned blocks); a dynamic VHD's blocks follow a 512-byte bitmap. */
        info->Is4kAligned = image->format->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_VHDX ||
                            (image->flat && image->flat_offset % 4096 == 0 &&
                             image->format->device_id != VIRTUAL_STORAGE_TYPE_DEVICE_VHD) ||
                            (image->format->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_VHD &&
                             image->subtype == VD_SUBTYPE_FIXED);
        return ERROR_SUCCESS;
    case GET_VIRTUAL_DISK_INFO_PHYSICAL_DISK:
        vd_host_sectors(image, &info->PhysicalDisk.LogicalSectorSize, &info->PhysicalDisk.PhysicalSectorSize,
                        &info->PhysicalDisk.IsRemote);
        return ERROR_SUCCESS;
    case GET_VIRTUAL_DISK_INFO_VHD_PHYSICAL_SECTOR_SIZE:
        info->VhdPhysicalSectorSize = image->physical_sector_size;
        return ERROR_SUCCESS;
    case GET_VIRTUAL_DISK_INFO_IS_LOADED: {
        bool helper;
        info->IsLoaded = vd_handle_attached_loop(handle, &helper) >= 0;
        return ERROR_SUCCESS;
    }
    case GET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID:
        if (!image->has_virtual_disk_id)
            return vd_not_applicable(image, "VIRTUAL_DISK_ID");
        info->VirtualDiskId = image->virtual_disk_id;
        return ERROR_SUCCESS;
    case GET_VIRTUAL_DISK_INFO_SMALLEST_SAFE_VIRTUAL_SIZE:
        if (image->subtype == VD_SUBTYPE_NONE)
            return vd_not_applicable(image, "SMALLEST_SAFE_VIRTUAL_SIZE");
        return vd_smallest_safe_size(handle->image, &info->SmallestSafeVirtualSize, NULL);
    case GET_VIRTUAL_DISK_INFO_FRAGMENTATION:
        return vd_fragmentation(image, &info->FragmentationPercentage);
    case GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE:
        /* Resilient change tracking is a VHDX feature; this provider never
           enables it, so a VHDX reports it off with no change id. */
        if (image->format->device_id != VIRTUAL_STORAGE_TYPE_DEVICE_VHDX)
            return vd_not_applicable(image, "CHANGE_TRACKING_STATE");
        *used = (ULONG)(offsetof(GET_VIRTUAL_DISK_INFO, ChangeTrackingState.MostRecentId) + sizeof(WCHAR));
        if (size < *used)
            return vd_fail(ERROR_INSUFFICIENT_BUFFER, "CHANGE_TRACKING_STATE needs %u bytes", (unsigned)*used);
        info->ChangeTrackingState.Enabled = 0;
        info->ChangeTrackingState.NewerChanges = 0;
        info->ChangeTrackingState.MostRecentId[0] = 0;
        return ERROR_SUCCESS;
    default:
        return vd_fail(ERROR_INVALID_PARAMETER, "GET_VIRTUAL_DISK_INFO.Version %d is unknown", (int)info->Version);
    }
}

DWORD WINAPI GetVirtualDiskInformation(HANDLE VirtualDiskHandle, ULONG *VirtualDiskInfoSize,
                                       GET_VIRTUAL_DISK_INFO *VirtualDiskInfo, ULONG *SizeUsed)
{
    vd_clear_detail();
    if (!VirtualDiskInfoSize || !VirtualDiskInfo)
        return vd_fail(ERROR_INVALID_PARAMETER, "VirtualDiskInfoSize and VirtualDiskInfo are required");
    if (*VirtualDiskInfoSize < sizeof(GET_VIRTUAL_DISK_INFO)) {
        *VirtualDiskInfoSize = sizeof(GET_VIRTUAL_DISK_INFO);
        return vd_fail(ERROR_INSUFFICIENT_BUFFER, "GET_VIRTUAL_DISK_INFO needs at least %zu bytes",
                       sizeof(GET_VIRTUAL_DISK_INFO));
    }
    struct vd_handle *handle = vd_handle_acquire(VirtualDiskHandle);
    if (!handle)
        return vd_handle_refuse(VirtualDiskHandle, ERROR_INVALID_HANDLE);
    DWORD status;
    ULONG used = 0;
    if (!(handle->access & VIRTUAL_DISK_ACCESS_GET_INFO))
        status = vd_fail(ERROR_ACCESS_DENIED, "the handle was opened without VIRTUAL_DISK_ACCESS_GET_INFO");
    else
        status = vd_get_info(handle, *VirtualDiskInfoSize, VirtualDiskInfo, &used);
    if (status == ERROR_INSUFFICIENT_BUFFER)
        *VirtualDiskInfoSize = used;
    if (SizeUsed && (status == ERROR_SUCCESS || status == ERROR_INSUFFICIENT_BUFFER))
        *SizeUsed = used;
    vd_handle_release(handle);
    return status;
}

void vd_get_information_batch(HANDLE handle_value, ULONG count, const GET_VIRTUAL_DISK_INFO_VERSION *versions,
                              GET_VIRTUAL_DISK_INFO *answers, DWORD *codes)
{
    vd_clear_detail();
    struct vd_handle *handle = vd_handle_acquire(handle_value);
    DWORD refused = ERROR_SUCCESS;
    if (!handle)
        refused = vd_handle_refuse(handle_value, ERROR_INVALID_HANDLE);
    else if (!(handle->access & VIRTUAL_DISK_ACCESS_GET_INFO))
        refused = vd_fail(ERROR_ACCESS_DENIED, "the handle was opened without VIRTUAL_DISK_ACCESS_GET_INFO");
    for (ULONG i = 0; i < count; i++) {
        ULONG used = 0;
        answers[i].Version = versions[i];
        codes[i] = refused != ERROR_SUCCESS
                       ? refused
                       : vd_get_info(handle, sizeof(GET_VIRTUAL_DISK_INFO), &answers[i], &used);
    }
    if (handle)
        vd_handle_release(handle);
}
