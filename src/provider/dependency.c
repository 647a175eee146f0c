/*
 * GetStorageDependencyInformation on Linux.
 *
 * What a handle can be here:
 *   - a virtual disk handle from OpenVirtualDisk/CreateVirtualDisk (with or
 *     without GET_STORAGE_DEPENDENCY_FLAG_DISK_HANDLE): the disk's chain;
 *   - a file descriptor cast to HANDLE, Linux's stand-in for a CreateFile
 *     handle: a loop device (the disk, or with HOST_VOLUMES any file on a
 *     file system that lives on one) attached from a virtual disk image
 *     answers with that image's chain; anything else is not a virtual disk
 *     (ERROR_VIRTDISK_NOT_VIRTUAL_DISK, *SizeUsed 0).
 * Entries: the disk itself at AncestorLevel 1, each parent one level up
 * with DEPENDENT_DISK_FLAG_PARENT and READ_ONLY (parents are only read);
 * FULLY_ALLOCATED for fixed disks; READ_ONLY on the disk when attached
 * read-only; PERMANENT_LIFETIME when attached without autoclear.  Version 2
 * strings point into the caller's buffer, after the entries:
 * DependencyDeviceName "/dev/loopN" (attached disk only), HostVolumeName the
 * mount point of the file system holding the image file,
 * DependentVolumeName the loop device again, DependentVolumeRelativePath the
 * image's path below HostVolumeName.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "errors.h"
#include "handles.h"
#include "image.h"
#include "loopdev.h"
#include "utf16.h"

#define LOOP_MAJOR_NUMBER 7
#define BLOCK_EXT_MAJOR_NUMBER 259 /* loopNpM partitions */

/* The mount point of the file system with device number dev, malloc'd. */
static char *vd_mount_point(dev_t dev)
{
    FILE *info = fopen("/proc/self/mountinfo", "re");
    if (!info)
        return strdup("/");
    char line[4096], *found = NULL;
    while (!found && fgets(line, sizeof line, info)) {
        unsigned major_number, minor_number;
        char root[PATH_MAX], point[PATH_MAX];
        if (sscanf(line, "%*u %*u %u:%u %4095s %4095s", &major_number, &minor_number, root, point) == 4 &&
            makedev(major_number, minor_number) == dev)
            found = strdup(point);
    }
    fclose(info);
    return found ? found : strdup("/");
}

/* The loop device whose disk holds the file system dev (a whole loop
   device or one of its partitions), or -1. */
static int vd_loop_of_filesystem(dev_t dev)
{
    if (major(dev) == LOOP_MAJOR_NUMBER)
        return (int)minor(dev);
    char link[64], target[PATH_MAX];
    snprintf(link, sizeof link, "/sys/dev/block/%u:%u/..", major(dev), minor(dev));
    if (!realpath(link, target))
        return -1;
    const char *name = strrchr(target, '/');
    int number;
    return name && sscanf(name, "/loop%d", &number) == 1 ? number : -1;
}

/* The image attached as /dev/loopN, opened read-only, or NULL. */
static struct vd_image *vd_image_of_loop(int number)
{
    char path[96], backing[PATH_MAX];
    snprintf(path, sizeof path, "/sys/block/loop%d/loop/backing_file", number);
    FILE *file = fopen(path, "re");
    if (!file)
        return NULL;
    bool read = fgets(backing, sizeof backing, file) != NULL;
    fclose(file);
    if (!read)
        return NULL;
    backing[strcspn(backing, "\n")] = '\0';
    struct vd_image *image = NULL;
    if (vd_image_open(backing, VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, false, 0, &image) != ERROR_SUCCESS)
        return NULL;
    return image;
}

static bool vd_loop_autoclear(int number)
{
    char path[96], value[8] = "";
    snprintf(path, sizeof path, "/sys/block/loop%d/loop/autoclear", number);
    FILE *file = fopen(path, "re");
    if (file) {
        if (!fgets(value, sizeof value, file))
            value[0] = '\0';
        fclose(file);
    }
    return value[0] == '1';
}

static bool vd_loop_read_only(int number)
{
    char path[64], value[8] = "";
    snprintf(path, sizeof path, "/sys/block/loop%d/ro", number);
    FILE *file = fopen(path, "re");
    if (file) {
        if (!fgets(value, sizeof value, file))
            value[0] = '\0';
        fclose(file);
    }
    return value[0] == '1';
}

/* Appends UTF-8 text as a UTF-16 string to the string area; returns where it
   went (NULL when it does not fit, the size still counted). */
struct vd_strings {
    WCHAR *area;
    size_t capacity, used; /* WCHARs */
};

static WCHAR *vd_put_string(struct vd_strings *strings, const char *text)
{
    size_t room = strings->area && strings->used < strings->capacity ? strings->capacity - strings->used : 0;
    WCHAR *at = room ? strings->area + strings->used : NULL;
    size_t needed = vd_utf8_to_utf16(text, at, room);
    if (needed == 0)
        needed = vd_utf8_to_utf16("", at, room);
    strings->used += needed;
    return needed <= room ? at : NULL;
}

static DWORD vd_describe(const struct vd_image *leaf, int loop, STORAGE_DEPENDENCY_INFO *info, ULONG size,
                         ULONG *used)
{
    size_t count = 0;
    for (const struct vd_image *link = leaf; link; link = link->parent)
        count++;
    bool v2 = info->Version == STORAGE_DEPENDENCY_INFO_VERSION_2;
    size_t entry = v2 ? sizeof(STORAGE_DEPENDENCY_INFO_TYPE_2) : sizeof(STORAGE_DEPENDENCY_INFO_TYPE_1);
    size_t header = offsetof(STORAGE_DEPENDENCY_INFO, Version1Entries);
    size_t strings_at = header + count * entry;
    strings_at = (strings_at + sizeof(WCHAR) - 1) / sizeof(WCHAR) * sizeof(WCHAR);
    bool fits = size >= strings_at;
    struct vd_strings strings = {fits ? (WCHAR *)((uint8_t *)info + strings_at) : NULL,
                                 fits ? (size - strings_at) / sizeof(WCHAR) : 0, 0};
    char device[32] = "";
    if (loop >= 0)
        snprintf(device, sizeof device, "/dev/loop%d", loop);
    ULONG level = 1;
    size_t index = 0;
    for (const struct vd_image *link = leaf; link; link = link->parent, level++, index++) {
        DEPENDENT_DISK_FLAG flags = DEPENDENT_DISK_FLAG_NO_DRIVE_LETTER;
        if (link->subtype == VD_SUBTYPE_FIXED || link->subtype == VD_SUBTYPE_NONE)
            flags |= DEPENDENT_DISK_FLAG_FULLY_ALLOCATED;
        if (link != leaf)
            flags |= DEPENDENT_DISK_FLAG_PARENT | DEPENDENT_DISK_FLAG_READ_ONLY;
        else if (loop >= 0 && vd_loop_read_only(loop))
            flags |= DEPENDENT_DISK_FLAG_READ_ONLY;
        if (loop >= 0 && !vd_loop_autoclear(loop))
            flags |= DEPENDENT_DISK_FLAG_PERMANENT_LIFETIME;
        VIRTUAL_STORAGE_TYPE type = {link->format->device_id, VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT};
        char *host = vd_mount_point(link->file_dev);
        const char *relative = link->path;
        size_t host_length = host ? strlen(host) : 0;
        if (host && strncmp(link->path, host, host_length) == 0)
            relative = link->path + host_length + (host_length > 1 && link->path[host_length] == '/');
        else if (host && host_length == 1)
            relative = link->path + 1;
        if (v2) {
            STORAGE_DEPENDENCY_INFO_TYPE_2 e = {.DependencyTypeFlags = flags,
                                                .VirtualStorageType = type,
                                                .AncestorLevel = level};
            e.DependencyDeviceName = vd_put_string(&strings, link == leaf ? device : "");
            e.HostVolumeName = vd_put_string(&strings, host ? host : "");
            e.DependentVolumeName = vd_put_string(&strings, link == leaf ? device : "");
            e.DependentVolumeRelativePath = vd_put_string(&strings, relative);
            if (fits)
                memcpy((uint8_t *)info + header + index * entry, &e, sizeof e);
        } else if (fits) {
            STORAGE_DEPENDENCY_INFO_TYPE_1 e = {.DependencyTypeFlags = flags, .VirtualStorageType = type};
            memcpy((uint8_t *)info + header + index * entry, &e, sizeof e);
        }
        free(host);
    }
    size_t needed = strings_at + (v2 ? strings.used * sizeof(WCHAR) : 0);
    *used = (ULONG)needed;
    info->NumberEntries = (ULONG)count;
    if (size < needed)
        return vd_fail(ERROR_INSUFFICIENT_BUFFER, "STORAGE_DEPENDENCY_INFO needs %zu bytes for %zu entries", needed,
                       count);
    return ERROR_SUCCESS;
}

DWORD WINAPI GetStorageDependencyInformation(HANDLE ObjectHandle, GET_STORAGE_DEPENDENCY_FLAG Flags,
                                             ULONG StorageDependencyInfoSize,
                                             STORAGE_DEPENDENCY_INFO *StorageDependencyInfo, ULONG *SizeUsed)
{
    vd_clear_detail();
    if (SizeUsed)
        *SizeUsed = 0;
    if (!StorageDependencyInfo || StorageDependencyInfoSize < offsetof(STORAGE_DEPENDENCY_INFO, Version1Entries))
        return vd_fail(ERROR_INVALID_PARAMETER, "StorageDependencyInfo must hold at least its 8-byte header");
    if (Flags & ~(GET_STORAGE_DEPENDENCY_FLAG)(GET_STORAGE_DEPENDENCY_FLAG_HOST_VOLUMES |
                                               GET_STORAGE_DEPENDENCY_FLAG_DISK_HANDLE))
        return vd_fail(ERROR_INVALID_PARAMETER, "flags 0x%08x include unknown bits", (unsigned)Flags);
    STORAGE_DEPENDENCY_INFO_VERSION version = StorageDependencyInfo->Version;
    if (version != STORAGE_DEPENDENCY_INFO_VERSION_1 && version != STORAGE_DEPENDENCY_INFO_VERSION_2)
        return vd_fail(ERROR_INVALID_PARAMETER, "STORAGE_DEPENDENCY_INFO.Version %d is not 1 or 2", (int)version);

    ULONG used = 0;
    DWORD status;
    struct vd_handle *handle = vd_handle_acquire(ObjectHandle);
    if (handle) {
        bool helper;
        struct vd_loop_binding found;
        int loop = vd_handle_attached_binding(handle, &helper, &found);
        status = vd_describe(handle->image, loop, StorageDependencyInfo, StorageDependencyInfoSize, &used);
        /* The device's flags were read by number: they are this disk's only
           if the binding found still holds it.  If not, the disk has been
           detached meanwhile (and the number may be someone else's). */
        if (loop >= 0 && found.seq && vd_loop_current_seq(loop) != found.seq)
            status = vd_describe(handle->image, -1, StorageDependencyInfo, StorageDependencyInfoSize, &used);
        vd_handle_release(handle);
    } else {
        intptr_t fd = (intptr_t)ObjectHandle;
        struct stat st;
        if (fd < 0 || fd > INT_MAX || fstat((int)fd, &st) < 0)
            return vd_fail(ERROR_INVALID_HANDLE, "neither a virtual disk handle nor an open file descriptor");
        int loop = -1;
        if (S_ISBLK(st.st_mode))
            loop = vd_loop_of_filesystem(st.st_rdev);
        else if (Flags & GET_STORAGE_DEPENDENCY_FLAG_HOST_VOLUMES)
            loop = vd_loop_of_filesystem(st.st_dev);
        struct vd_image *image = loop >= 0 ? vd_image_of_loop(loop) : NULL;
        if (!image)
            return vd_fail(ERROR_VIRTDISK_NOT_VIRTUAL_DISK, "the handle's %s is not on a virtual disk",
                           S_ISBLK(st.st_mode) ? "device" : "file system");
        status = vd_describe(image, loop, StorageDependencyInfo, StorageDependencyInfoSize, &used);
        vd_image_close(image);
    }
    if (SizeUsed && (status == ERROR_SUCCESS || status == ERROR_INSUFFICIENT_BUFFER))
        *SizeUsed = used;
    return status;
}
