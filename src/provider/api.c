/*
 * The VirtDisk entry points for opening, creating, attaching and detaching:
 * argument validation as Microsoft documents it, then the handle rules, then
 * the work (image.c, loopdev.c).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bytes.h"
#include "errors.h"
#include "fuseattach.h"
#include "fusecheck.h"
#include "handles.h"
#include "servrecord.h"
#include "image.h"
#include "job.h"
#include "loopdev.h"
#include "reserve.h"
#include "share.h"
#include "source.h"
#include "utf16.h"

const GUID VIRTUAL_STORAGE_TYPE_VENDOR_UNKNOWN = {0, 0, 0, {0, 0, 0, 0, 0, 0, 0, 0}};
const GUID VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT = {
    0xEC984AEC, 0xA0F9, 0x47E9, {0x90, 0x1F, 0x71, 0x41, 0x5A, 0x66, 0x34, 0x5B}};

/* Access that needs the image file open for writing. */
#define VD_WRITE_ACCESS                                                                       \
    (VIRTUAL_DISK_ACCESS_ATTACH_RW | VIRTUAL_DISK_ACCESS_CREATE | VIRTUAL_DISK_ACCESS_METAOPS)

/* Open flags that change nothing for this provider (caching, write
   hardening and host-volume policies are Windows' concerns) and are accepted. */
#define VD_OPEN_FLAGS_ACCEPTED                                                                \
    (OPEN_VIRTUAL_DISK_FLAG_NO_PARENTS | OPEN_VIRTUAL_DISK_FLAG_CACHED_IO |                    \
     OPEN_VIRTUAL_DISK_FLAG_PARENT_CACHED_IO | OPEN_VIRTUAL_DISK_FLAG_IGNORE_RELATIVE_PARENT_LOCATOR | \
     OPEN_VIRTUAL_DISK_FLAG_NO_WRITE_HARDENING | OPEN_VIRTUAL_DISK_FLAG_SUPPORT_COMPRESSED_VOLUMES | \
     OPEN_VIRTUAL_DISK_FLAG_SUPPORT_SPARSE_FILES_ANY_FS | OPEN_VIRTUAL_DISK_FLAG_SUPPORT_ENCRYPTED_FILES)
#define VD_OPEN_FLAGS_ALL 0x00000FFFu

/* Create flags with a meaning here: a fixed disk, and SPARSE_FILE, which
   leaves a fixed disk's data area unallocated in the file (Windows: a fixed
   disk on a sparse file); SUPPORT_SPARSE_FILES_ANY_FS and
   SUPPORT_COMPRESSED_VOLUMES relax Windows host-volume policies that Linux
   does not have, so they change nothing. */
#define VD_CREATE_FLAGS_ACCEPTED                                                              \
    (CREATE_VIRTUAL_DISK_FLAG_FULL_PHYSICAL_ALLOCATION | CREATE_VIRTUAL_DISK_FLAG_SPARSE_FILE |  \
     CREATE_VIRTUAL_DISK_FLAG_SUPPORT_SPARSE_FILES_ANY_FS | CREATE_VIRTUAL_DISK_FLAG_SUPPORT_COMPRESSED_VOLUMES)

/* What Microsoft's documentation calls the provider: a known device type
   from the Microsoft vendor, or "unknown" for both (decide by contents). */
static DWORD vd_check_storage_type(const VIRTUAL_STORAGE_TYPE *type)
{
    bool microsoft = vd_guid_equal(&type->VendorId, &VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT);
    bool unknown = vd_guid_is_zero(&type->VendorId);
    if (!microsoft && !unknown)
        return vd_fail(ERROR_VIRTDISK_PROVIDER_NOT_FOUND, "unknown virtual storage vendor");
    if (type->DeviceId == VIRTUAL_STORAGE_TYPE_DEVICE_VHDSET)
        return vd_fail(ERROR_VIRTDISK_PROVIDER_NOT_FOUND, "VHD Sets (.vhds) are not supported on Linux");
    if (type->DeviceId != VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN && !vd_format_for_device(type->DeviceId))
        return vd_fail(ERROR_VIRTDISK_PROVIDER_NOT_FOUND, "unknown virtual storage device type %u",
                       (unsigned)type->DeviceId);
    return ERROR_SUCCESS;
}

static DWORD vd_path_argument(const WCHAR *path, char **out)
{
    if (!path || !path[0])
        return vd_fail(ERROR_INVALID_PARAMETER, "the path is empty");
    *out = vd_utf16_to_utf8(path);
    if (!*out)
        return vd_fail(ERROR_INVALID_NAME, "the path is not valid UTF-16");
    return ERROR_SUCCESS;
}

/* The access a handle gets from the parameters of OpenVirtualDisk. */
static DWORD vd_open_access(VIRTUAL_DISK_ACCESS_MASK mask, const OPEN_VIRTUAL_DISK_PARAMETERS *parameters,
                            VIRTUAL_DISK_ACCESS_MASK *access)
{
    if (mask & ~(VIRTUAL_DISK_ACCESS_MASK)VIRTUAL_DISK_ACCESS_ALL)
        return vd_fail(ERROR_INVALID_PARAMETER, "access mask 0x%08x has bits outside VIRTUAL_DISK_ACCESS_ALL",
                       (unsigned)mask);
    if (!parameters || parameters->Version == OPEN_VIRTUAL_DISK_VERSION_1) {
        *access = mask;
        return ERROR_SUCCESS;
    }
    if (parameters->Version != OPEN_VIRTUAL_DISK_VERSION_2 && parameters->Version != OPEN_VIRTUAL_DISK_VERSION_3)
        return vd_fail(ERROR_INVALID_PARAMETER, "OPEN_VIRTUAL_DISK_PARAMETERS.Version %d is not 1, 2 or 3",
                       (int)parameters->Version);
    /* Version 2 and 3 express access through GetInfoOnly/ReadOnly and take
       VIRTUAL_DISK_ACCESS_NONE in the mask. */
    if (mask != VIRTUAL_DISK_ACCESS_NONE)
        return vd_fail(ERROR_INVALID_PARAMETER,
                       "OPEN_VIRTUAL_DISK_PARAMETERS version %d needs VIRTUAL_DISK_ACCESS_NONE",
                       (int)parameters->Version);
    if (parameters->Version == OPEN_VIRTUAL_DISK_VERSION_3 && !vd_guid_is_zero(&parameters->Version3.SnapshotId))
        return vd_fail(ERROR_NOT_SUPPORTED, "snapshots (VHD Sets) are not supported on Linux");
    if (parameters->Version2.GetInfoOnly)
        *access = VIRTUAL_DISK_ACCESS_GET_INFO;
    else if (parameters->Version2.ReadOnly)
        *access = VIRTUAL_DISK_ACCESS_ATTACH_RO | VIRTUAL_DISK_ACCESS_DETACH | VIRTUAL_DISK_ACCESS_GET_INFO;
    else
        *access = VIRTUAL_DISK_ACCESS_ALL & ~(VIRTUAL_DISK_ACCESS_MASK)VIRTUAL_DISK_ACCESS_CREATE;
    return ERROR_SUCCESS;
}

/* How deep into the chain a handle may write (MergeVirtualDisk): version 1
   says so in RWDepth; version 2 and 3 have no such limit for a handle that is
   neither read-only nor for information only. */
static ULONG vd_open_rw_depth(const OPEN_VIRTUAL_DISK_PARAMETERS *parameters, VIRTUAL_DISK_ACCESS_MASK access)
{
    if (!(access & VD_WRITE_ACCESS))
        return 0;
    if (!parameters)
        return OPEN_VIRTUAL_DISK_RW_DEPTH_DEFAULT;
    if (parameters->Version == OPEN_VIRTUAL_DISK_VERSION_1)
        return parameters->Version1.RWDepth;
    return UINT32_MAX;
}

/* A handle with METAOPS as its only write access on a disk attached
   read-only, as Optimize-VHD opens a disk that Mount-VHD -ReadOnly attached:
   the image opened read-only, since the disk's server owns it and a
   compaction runs there (compact-api.c); every other change needs the disk
   detached and refuses.  *opened: false when the disk is not attached (the
   caller then opens it as usual).  Attached read-write, or open for writing
   elsewhere: one writer per image, as for any write open. */
static DWORD vd_open_attached_read_only(const char *path, ULONG device_id, VIRTUAL_DISK_ACCESS_MASK access,
                                        OPEN_VIRTUAL_DISK_FLAG flags, HANDLE *out, bool *opened)
{
    *opened = false;
    struct vd_image *image;
    DWORD status = vd_image_open(path, device_id, false, flags, &image);
    if (status != ERROR_SUCCESS)
        return ERROR_SUCCESS; /* the usual open says what is wrong */
    /* An attachment going away (a detach just done) is gone, not seen. */
    vd_share_settle(image);
    bool helper;
    int number = vd_share_attached_loop(image, &helper);
    if (number < 0) {
        vd_image_close(image);
        return ERROR_SUCCESS;
    }
    status = vd_handle_create(image, access, out);
    if (status != ERROR_SUCCESS)
        return status;
    struct vd_handle *handle = (struct vd_handle *)*out;
    if (handle->image->share_fd < 0) {
        /* No claims here (share.h): nothing tells read-only from not. */
        CloseHandle(*out);
        *out = NULL;
        return ERROR_SUCCESS;
    }
    if (vd_share_held_elsewhere(handle->image->share_fd, VD_SHARE_WRITE)) {
        char detail[512];
        snprintf(detail, sizeof detail, "%s is attached as /dev/loop%d read-write, or open for writing: it cannot "
                                        "be opened with METAOPS access as well (a disk attached read-only can: "
                                        "compacting it is Windows' file-system-aware mode)",
                 handle->image->path, number);
        CloseHandle(*out);
        *out = NULL;
        return vd_fail(ERROR_SHARING_VIOLATION, "%s", detail);
    }
    *opened = true;
    return ERROR_SUCCESS;
}

DWORD WINAPI OpenVirtualDisk(VIRTUAL_STORAGE_TYPE *VirtualStorageType, const WCHAR *Path,
                             VIRTUAL_DISK_ACCESS_MASK VirtualDiskAccessMask, OPEN_VIRTUAL_DISK_FLAG Flags,
                             OPEN_VIRTUAL_DISK_PARAMETERS *Parameters, HANDLE *Handle)
{
    vd_clear_detail();
    if (!VirtualStorageType || !Path || !Handle)
        return vd_fail(ERROR_INVALID_PARAMETER, "VirtualStorageType, Path and Handle are required");
    if (Flags & ~VD_OPEN_FLAGS_ALL)
        return vd_fail(ERROR_INVALID_PARAMETER, "open flags 0x%08x include unknown bits", (unsigned)Flags);
    if (Flags & ~VD_OPEN_FLAGS_ACCEPTED)
        return vd_fail(ERROR_NOT_SUPPORTED, "open flags 0x%08x are not supported on Linux",
                       (unsigned)(Flags & ~VD_OPEN_FLAGS_ACCEPTED));
    VIRTUAL_DISK_ACCESS_MASK access = 0;
    DWORD status = vd_open_access(VirtualDiskAccessMask, Parameters, &access);
    if (status == ERROR_SUCCESS)
        status = vd_check_storage_type(VirtualStorageType);
    if (status != ERROR_SUCCESS)
        return status;
    if (VirtualStorageType->DeviceId == VIRTUAL_STORAGE_TYPE_DEVICE_ISO && (access & VD_WRITE_ACCESS))
        return vd_fail(ERROR_INVALID_PARAMETER,
                       "ISO images open only for ATTACH_RO, DETACH and GET_INFO access");

    char *path;
    status = vd_path_argument(Path, &path);
    if (status != ERROR_SUCCESS)
        return status;
    if ((access & VD_WRITE_ACCESS) == VIRTUAL_DISK_ACCESS_METAOPS &&
        VirtualStorageType->DeviceId != VIRTUAL_STORAGE_TYPE_DEVICE_ISO) {
        bool opened;
        status = vd_open_attached_read_only(path, VirtualStorageType->DeviceId, access, Flags, Handle, &opened);
        if (status != ERROR_SUCCESS || opened) {
            free(path);
            if (status == ERROR_SUCCESS)
                ((struct vd_handle *)*Handle)->rw_depth = vd_open_rw_depth(Parameters, access);
            return status;
        }
    }
    struct vd_image *image;
    status = vd_image_open(path, VirtualStorageType->DeviceId, (access & VD_WRITE_ACCESS) != 0, Flags, &image);
    free(path);
    if (status != ERROR_SUCCESS)
        return status;
    if (image->format->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_ISO && (access & VD_WRITE_ACCESS)) {
        vd_image_close(image);
        return vd_fail(ERROR_INVALID_PARAMETER,
                       "ISO images open only for ATTACH_RO, DETACH and GET_INFO access");
    }
    status = vd_handle_create(image, access, Handle);
    if (status == ERROR_SUCCESS)
        ((struct vd_handle *)*Handle)->rw_depth = vd_open_rw_depth(Parameters, access);
    return status;
}

/* ---- create ------------------------------------------------------------ */

/* The create request from either parameter version. */
struct vd_create_arguments {
    GUID unique_id;
    ULONGLONG maximum_size;
    ULONG block_size;
    ULONG sector_size;
    ULONG physical_sector_size;
    const WCHAR *parent_path;
    const WCHAR *source_path;
    ULONG source_device;           /* SourceVirtualStorageType.DeviceId (version 2 on) */
};

static DWORD vd_create_arguments(VIRTUAL_DISK_ACCESS_MASK mask, const CREATE_VIRTUAL_DISK_PARAMETERS *p,
                                 struct vd_create_arguments *args, VIRTUAL_DISK_ACCESS_MASK *access)
{
    memset(args, 0, sizeof *args);
    if (mask & ~(VIRTUAL_DISK_ACCESS_MASK)VIRTUAL_DISK_ACCESS_ALL)
        return vd_fail(ERROR_INVALID_PARAMETER, "access mask 0x%08x has bits outside VIRTUAL_DISK_ACCESS_ALL",
                       (unsigned)mask);
    switch (p->Version) {
    case CREATE_VIRTUAL_DISK_VERSION_1:
        args->unique_id = p->Version1.UniqueId;
        args->maximum_size = p->Version1.MaximumSize;
        args->block_size = p->Version1.BlockSizeInBytes;
        args->sector_size = p->Version1.SectorSizeInBytes;
        args->parent_path = p->Version1.ParentPath;
        args->source_path = p->Version1.SourcePath;
        if (args->sector_size != 0 && args->sector_size != 512)
            return vd_fail(ERROR_INVALID_PARAMETER, "version 1 parameters allow 512-byte sectors only");
        *access = mask;
        return ERROR_SUCCESS;
    case CREATE_VIRTUAL_DISK_VERSION_2:
    case CREATE_VIRTUAL_DISK_VERSION_3:
    case CREATE_VIRTUAL_DISK_VERSION_4:
        if (mask != VIRTUAL_DISK_ACCESS_NONE)
            return vd_fail(ERROR_INVALID_PARAMETER,
                           "CREATE_VIRTUAL_DISK_PARAMETERS version %d needs VIRTUAL_DISK_ACCESS_NONE",
                           (int)p->Version);
        if (p->Version >= CREATE_VIRTUAL_DISK_VERSION_3 &&
            (p->Version3.SourceLimitPath || p->Version3.BackingStorageType.DeviceId))
            return vd_fail(ERROR_NOT_SUPPORTED, "SourceLimitPath and BackingStorageType are not supported on Linux");
        args->unique_id = p->Version2.UniqueId;
        args->maximum_size = p->Version2.MaximumSize;
        args->block_size = p->Version2.BlockSizeInBytes;
        args->sector_size = p->Version2.SectorSizeInBytes;
        args->physical_sector_size = p->Version2.PhysicalSectorSizeInBytes;
        args->parent_path = p->Version2.ParentPath;
        args->source_path = p->Version2.SourcePath;
        args->source_device = p->Version2.SourceVirtualStorageType.DeviceId;
        /* The handle from a version 2 create can do everything but create. */
        *access = VIRTUAL_DISK_ACCESS_ALL & ~(VIRTUAL_DISK_ACCESS_MASK)VIRTUAL_DISK_ACCESS_CREATE;
        return ERROR_SUCCESS;
    default:
        return vd_fail(ERROR_INVALID_PARAMETER, "CREATE_VIRTUAL_DISK_PARAMETERS.Version %d is not 1 to 4",
                       (int)p->Version);
    }
}

/* The device type to create: the caller's, or the path's extension. */
static DWORD vd_create_device(const VIRTUAL_STORAGE_TYPE *type, const char *path, ULONG *device)
{
    if (type->DeviceId == VIRTUAL_STORAGE_TYPE_DEVICE_VHD || type->DeviceId == VIRTUAL_STORAGE_TYPE_DEVICE_VHDX) {
        *device = type->DeviceId;
        return ERROR_SUCCESS;
    }
    if (type->DeviceId == VIRTUAL_STORAGE_TYPE_DEVICE_ISO)
        return vd_fail(ERROR_NOT_SUPPORTED, "ISO images cannot be created through VirtDisk");
    const char *dot = strrchr(path, '.');
    if (dot && strcasecmp(dot, ".vhdx") == 0)
        *device = VIRTUAL_STORAGE_TYPE_DEVICE_VHDX;
    else if (dot && strcasecmp(dot, ".vhd") == 0)
        *device = VIRTUAL_STORAGE_TYPE_DEVICE_VHD;
    else
        return vd_fail(ERROR_INVALID_PARAMETER,
                       "device type unknown and %s ends neither in .vhd nor .vhdx", path);
    return ERROR_SUCCESS;
}

/* source: what a SourcePath holds (NULL without one), whose sector sizes
   are the defaults and whose size MaximumSize 0 stands for. */
static DWORD vd_check_geometry(ULONG device, const struct vd_create_arguments *args, bool differencing,
                               const struct vd_source *source, struct vd_create_request *request)
{
    ULONG default_sector = 512;
    if (source && device == VIRTUAL_STORAGE_TYPE_DEVICE_VHDX)
        default_sector = source->logical_sector_size == 4096 ? 4096 : 512;
    request->logical_sector_size = args->sector_size ? args->sector_size : default_sector;
    request->physical_sector_size = args->physical_sector_size ? args->physical_sector_size
                                    : source && source->physical_sector_size == 4096
                                        ? source->physical_sector_size
                                        : request->logical_sector_size;
    if (request->logical_sector_size != 512 &&
        !(device == VIRTUAL_STORAGE_TYPE_DEVICE_VHDX && request->logical_sector_size == 4096))
        return vd_fail(ERROR_INVALID_PARAMETER, "sector size %u is not 512 (or 4096 for VHDX)",
                       (unsigned)request->logical_sector_size);
    if (request->physical_sector_size != 512 && request->physical_sector_size != 4096)
        return vd_fail(ERROR_INVALID_PARAMETER, "physical sector size %u is not 512 or 4096",
                       (unsigned)request->physical_sector_size);
    request->block_size = args->block_size;
    if (device == VIRTUAL_STORAGE_TYPE_DEVICE_VHD) {
        if (args->block_size != 0 && args->block_size != 0x80000 && args->block_size != 0x200000)
            return vd_fail(ERROR_INVALID_PARAMETER, "VHD block size %u is not 0, 512 KiB or 2 MiB",
                           (unsigned)args->block_size);
    } else if (args->block_size != 0) {
        bool power_of_two = (args->block_size & (args->block_size - 1)) == 0;
        if (!power_of_two || args->block_size < (1u << 20) || args->block_size > (256u << 20))
            return vd_fail(ERROR_INVALID_PARAMETER,
                           "VHDX block size %u is not a power of two from 1 MiB to 256 MiB",
                           (unsigned)args->block_size);
    }
    if (differencing) {
        if (args->maximum_size != 0)
            return vd_fail(ERROR_INVALID_PARAMETER, "a differencing disk takes its size from its parent: "
                                                    "MaximumSize must be 0");
        return ERROR_SUCCESS;
    }
    if (source) {
        /* MaximumSize 0 takes the source's size (a raw source's last partial
           sector reads as zeros); otherwise the source must fit. */
        uint64_t ss = request->logical_sector_size;
        uint64_t needed = (source->size + ss - 1) / ss * ss;
        if (args->maximum_size == 0) {
            request->virtual_size = needed;
            return ERROR_SUCCESS;
        }
        if (args->maximum_size < needed)
            return vd_fail(ERROR_INVALID_PARAMETER, "MaximumSize %llu is smaller than the source %s (%llu bytes)",
                           (unsigned long long)args->maximum_size, source->path, (unsigned long long)source->size);
    }
    if (args->maximum_size < 3u * 1024 * 1024)
        return vd_fail(ERROR_INVALID_PARAMETER, "MaximumSize %llu is below the 3 MiB minimum",
                       (unsigned long long)args->maximum_size);
    if (args->maximum_size % request->logical_sector_size)
        return vd_fail(ERROR_INVALID_PARAMETER, "MaximumSize %llu is not a multiple of the %u-byte sector",
                       (unsigned long long)args->maximum_size, (unsigned)request->logical_sector_size);
    request->virtual_size = args->maximum_size;
    return ERROR_SUCCESS;
}

/* An asynchronous create: the file exists, empty of data; the copy from a
   source (if any) runs as the handle's job.  A fixed disk is laid out over
   a sparse file and its space reserved by the job (allocate) before any
   copy, so that reserving, which is what takes time, shows progress and
   stops at a cancel: the progress is bytes of the file, then bytes of the
   source's disk. */
struct vd_create_job {
    struct vd_source source;
    struct vd_image *image;        /* the handle's */
    GUID unique_id;
    char *path;
    bool allocate;
};

static DWORD vd_create_work(struct vd_job *job, void *context)
{
    struct vd_create_job *c = context;
    struct stat st;
    if (c->allocate && fstat(c->image->fd, &st) < 0)
        return vd_fail_errno(errno, "%s", c->path);
    uint64_t reserve = c->allocate ? (uint64_t)st.st_size : 0;
    vd_job_set_total(job, reserve + (c->source.path ? c->source.size : 0));
    DWORD status = ERROR_SUCCESS;
    if (c->allocate) {
        status = vd_job_fallocate(job, c->image->fd, 0, 0, reserve, c->path);
        if (status == ERROR_SUCCESS && !c->source.path && vd_fdatasync(c->image->fd) < 0)
            status = vd_fail_errno(errno, "flushing %s", c->path);
    }
    /* The copy ends with its own fsync. */
    if (status == ERROR_SUCCESS && c->source.path)
        status = vd_source_copy_into(&c->source, c->image, &c->unique_id, job);
    return status;
}

static void vd_create_done(void *context, DWORD status)
{
    struct vd_create_job *c = context;
    /* As a synchronous create leaves no file behind when the copy fails;
       the handle keeps the unlinked file open until it closes. */
    if (status != ERROR_SUCCESS)
        unlink(c->path);
    vd_source_close(&c->source);
    free(c->path);
    free(c);
}

/* Takes ownership of path and source. */
static DWORD vd_create_async(char *path, ULONG device_id, const GUID *unique_id, struct vd_source *source,
                             bool allocate, VIRTUAL_DISK_ACCESS_MASK access, OVERLAPPED *overlapped, HANDLE *out)
{
    struct vd_create_job *c = calloc(1, sizeof *c);
    struct vd_image *image = NULL;
    DWORD status = c ? vd_image_open(path, device_id, true, 0, &image) : vd_fail(ERROR_OUTOFMEMORY, "create job");
    HANDLE handle = NULL;
    if (status == ERROR_SUCCESS)
        status = vd_handle_create(image, access, &handle);
    struct vd_handle *h = handle ? vd_handle_acquire(handle) : NULL;
    if (status == ERROR_SUCCESS)
        status = vd_job_check_overlapped(h, overlapped);
    if (status != ERROR_SUCCESS) {
        if (h) {
            vd_handle_release(h);
            CloseHandle(handle);
        }
        unlink(path);
        free(path);
        free(c);
        vd_source_close(source);
        return status;
    }
    c->source = *source;
    c->image = h->image;
    c->unique_id = *unique_id;
    c->path = path;
    c->allocate = allocate;
    *out = handle;
    status = vd_job_start(h, overlapped, vd_create_work, c, vd_create_done);
    vd_handle_release(h);
    if (status != ERROR_IO_PENDING) {
        CloseHandle(handle);
        *out = NULL;
    }
    return status;
}

/* A differencing disk shows its parent's sectors and, as on Windows, takes
   its parent's block size unless the caller names one. */
static DWORD vd_inherit_geometry(const struct vd_create_arguments *args, const struct vd_image *parent,
                                 struct vd_create_request *request)
{
    if (args->sector_size && args->sector_size != parent->logical_sector_size)
        return vd_fail(ERROR_INVALID_PARAMETER, "sector size %u differs from the parent's %u (%s)",
                       (unsigned)args->sector_size, (unsigned)parent->logical_sector_size, parent->path);
    request->logical_sector_size = parent->logical_sector_size;
    if (!args->physical_sector_size)
        request->physical_sector_size = parent->physical_sector_size;
    if (!args->block_size && parent->block_size)
        request->block_size = parent->block_size;
    return ERROR_SUCCESS;
}

DWORD WINAPI CreateVirtualDisk(VIRTUAL_STORAGE_TYPE *VirtualStorageType, const WCHAR *Path,
                               VIRTUAL_DISK_ACCESS_MASK VirtualDiskAccessMask,
                               PSECURITY_DESCRIPTOR SecurityDescriptor, CREATE_VIRTUAL_DISK_FLAG Flags,
                               ULONG ProviderSpecificFlags, CREATE_VIRTUAL_DISK_PARAMETERS *Parameters,
                               OVERLAPPED *Overlapped, HANDLE *Handle)
{
    vd_clear_detail();
    if (!VirtualStorageType || !Path || !Parameters || !Handle)
        return vd_fail(ERROR_INVALID_PARAMETER, "VirtualStorageType, Path, Parameters and Handle are required");
    if (SecurityDescriptor)
        return vd_fail(ERROR_NOT_SUPPORTED, "security descriptors are not supported on Linux");
    if (Flags & ~(CREATE_VIRTUAL_DISK_FLAG)0x7FF)
        return vd_fail(ERROR_INVALID_PARAMETER, "create flags 0x%08x include unknown bits", (unsigned)Flags);
    if (Flags & ~VD_CREATE_FLAGS_ACCEPTED)
        return vd_fail(ERROR_NOT_SUPPORTED, "create flags 0x%08x are not supported on Linux",
                       (unsigned)(Flags & ~VD_CREATE_FLAGS_ACCEPTED));

    struct vd_create_arguments args;
    VIRTUAL_DISK_ACCESS_MASK access = 0;
    DWORD status = vd_create_arguments(VirtualDiskAccessMask, Parameters, &args, &access);
    if (status == ERROR_SUCCESS)
        status = vd_check_storage_type(VirtualStorageType);
    if (status != ERROR_SUCCESS)
        return status;
    if (args.parent_path && args.source_path)
        return vd_fail(ERROR_INVALID_PARAMETER, "ParentPath and SourcePath exclude each other");
    bool differencing = args.parent_path != NULL;
    if (differencing && (Flags & CREATE_VIRTUAL_DISK_FLAG_FULL_PHYSICAL_ALLOCATION))
        return vd_fail(ERROR_INVALID_PARAMETER, "a differencing disk cannot be fully allocated");

    char *path;
    status = vd_path_argument(Path, &path);
    if (status != ERROR_SUCCESS)
        return status;

    struct vd_create_request request;
    memset(&request, 0, sizeof request);
    request.fixed = (Flags & CREATE_VIRTUAL_DISK_FLAG_FULL_PHYSICAL_ALLOCATION) != 0;
    request.sparse = request.fixed && (Flags & CREATE_VIRTUAL_DISK_FLAG_SPARSE_FILE);
    /* Asynchronous and fixed: the job reserves the space (before the copy
       from a source, if any). */
    bool allocate_later = Overlapped && request.fixed && !request.sparse;
    if (allocate_later)
        request.sparse = true;
    struct vd_image *parent = NULL;
    struct vd_source source = {.fd = -1};
    status = vd_create_device(VirtualStorageType, path, &request.device_id);
    if (status == ERROR_SUCCESS && args.source_path)
        status = vd_source_open(args.source_path, args.source_device, &source);
    if (status == ERROR_SUCCESS)
        status = vd_check_geometry(request.device_id, &args, differencing, args.source_path ? &source : NULL,
                                   &request);
    if (status == ERROR_SUCCESS && differencing) {
        char *parent_path;
        status = vd_path_argument(args.parent_path, &parent_path);
        if (status == ERROR_SUCCESS) {
            status = vd_image_open(parent_path, VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, false, 0, &parent);
            if (status == ERROR_FILE_NOT_FOUND || status == ERROR_PATH_NOT_FOUND)
                status = vd_fail(ERROR_VHD_PARENT_VHD_NOT_FOUND, "parent %s does not exist", parent_path);
            free(parent_path);
        }
        if (status == ERROR_SUCCESS && parent->format->device_id != request.device_id)
            status = vd_fail(ERROR_VHD_INVALID_TYPE, "the parent %s is a %s; a differencing %s needs a %s parent",
                             parent->path, parent->format->name,
                             request.device_id == VIRTUAL_STORAGE_TYPE_DEVICE_VHD ? "VHD" : "VHDX",
                             request.device_id == VIRTUAL_STORAGE_TYPE_DEVICE_VHD ? "VHD" : "VHDX");
        /* The parent is read through the child from now on: refused while
           it has a writer, and kept read-only until the child's own handle
           holds it (share.h). */
        if (status == ERROR_SUCCESS)
            status = vd_share_claim(parent, 0, VD_SHARE_WRITE, -1, "creating a differencing disk over it",
                                    &parent->share_fd);
        if (status == ERROR_SUCCESS)
            status = vd_share_open_chain(parent, 0, -1);
        if (status == ERROR_SUCCESS)
            status = vd_inherit_geometry(&args, parent, &request);
        if (status == ERROR_SUCCESS) {
            request.virtual_size = parent->virtual_size;
            request.parent = parent;
        }
    }
    if (status == ERROR_SUCCESS && vd_guid_is_zero(&args.unique_id)) {
        int error = vd_guid_generate(&args.unique_id);
        if (error)
            status = vd_fail_errno(error, "generating a unique id");
    }
    request.unique_id = args.unique_id;
    const struct vd_format *format = vd_format_for_device(request.device_id);
    if (status == ERROR_SUCCESS && (!format || !format->create))
        status = vd_fail(ERROR_NOT_SUPPORTED, "creating this image type is not supported");
    if (status != ERROR_SUCCESS) {
        vd_image_close(parent);
        vd_source_close(&source);
        free(path);
        return status;
    }

    /* O_EXCL: never overwrite an existing file, whatever it is. */
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        status = vd_fail_errno(errno, "creating %s", path);
        vd_image_close(parent);
        vd_source_close(&source);
        free(path);
        return status;
    }
    char *absolute = realpath(path, NULL);
    request.path = absolute ? absolute : path;
    status = format->create(fd, &request);
    if (status == ERROR_SUCCESS && fsync(fd) < 0)
        status = vd_fail_errno(errno, "flushing %s", path);
    close(fd);
    free(absolute);
    if (status == ERROR_SUCCESS && Overlapped) {
        status = vd_create_async(path, request.device_id, &request.unique_id, &source, allocate_later, access,
                                 Overlapped, Handle);
        vd_image_close(parent); /* the new handle holds the chain now */
        return status;
    }
    if (status == ERROR_SUCCESS && args.source_path) {
        struct vd_job job;
        vd_job_init_sync(&job);
        status = vd_source_copy(&source, path, request.device_id, &request.unique_id, &job);
    }
    vd_source_close(&source);
    if (status != ERROR_SUCCESS) {
        vd_image_close(parent);
        unlink(path);
        free(path);
        return status;
    }

    struct vd_image *image;
    status = vd_image_open(path, request.device_id, true, 0, &image);
    if (status != ERROR_SUCCESS) {
        /* Our own writer made something our reader refuses: keep the file
           for a bug report rather than hiding it, but say so. */
        char detail[256];
        snprintf(detail, sizeof detail, "%s", vd_last_error_detail());
        vd_image_close(parent);
        free(path);
        return vd_fail(status, "the new image does not reopen: %s", detail);
    }
    free(path);
    status = vd_handle_create(image, access, Handle);
    vd_image_close(parent); /* the new handle holds the chain now */
    return status;
}

/* ---- attach and detach --------------------------------------------------- */

#define VD_ATTACH_FLAGS_ALL 0x000007FFu
/* Flags that change nothing here: Linux has no drive letters, security
   descriptors on the device, encryption policy or PnP distinction. */
#define VD_ATTACH_FLAGS_ACCEPTED                                                              \
    (ATTACH_VIRTUAL_DISK_FLAG_READ_ONLY | ATTACH_VIRTUAL_DISK_FLAG_NO_DRIVE_LETTER |           \
     ATTACH_VIRTUAL_DISK_FLAG_PERMANENT_LIFETIME | ATTACH_VIRTUAL_DISK_FLAG_NO_SECURITY_DESCRIPTOR | \
     ATTACH_VIRTUAL_DISK_FLAG_BYPASS_DEFAULT_ENCRYPTION_POLICY | ATTACH_VIRTUAL_DISK_FLAG_NON_PNP)

static DWORD vd_attach_checks(struct vd_handle *handle, ATTACH_VIRTUAL_DISK_FLAG flags,
                              const ATTACH_VIRTUAL_DISK_PARAMETERS *parameters)
{
    if (flags & ~VD_ATTACH_FLAGS_ALL)
        return vd_fail(ERROR_INVALID_PARAMETER, "attach flags 0x%08x include unknown bits", (unsigned)flags);
    if (parameters && parameters->Version != ATTACH_VIRTUAL_DISK_VERSION_1 &&
        parameters->Version != ATTACH_VIRTUAL_DISK_VERSION_2)
        return vd_fail(ERROR_INVALID_PARAMETER, "ATTACH_VIRTUAL_DISK_PARAMETERS.Version %d is not 1 or 2",
                       (int)parameters->Version);
    if (flags & ~VD_ATTACH_FLAGS_ACCEPTED)
        return vd_fail(ERROR_NOT_SUPPORTED, "attach flags 0x%08x are not supported on Linux",
                       (unsigned)(flags & ~VD_ATTACH_FLAGS_ACCEPTED));
    bool read_only = flags & ATTACH_VIRTUAL_DISK_FLAG_READ_ONLY;
    if (read_only && !(handle->access & (VIRTUAL_DISK_ACCESS_ATTACH_RO | VIRTUAL_DISK_ACCESS_ATTACH_RW)))
        return vd_fail(ERROR_ACCESS_DENIED, "the handle was opened without VIRTUAL_DISK_ACCESS_ATTACH_RO");
    if (!read_only && !(handle->access & VIRTUAL_DISK_ACCESS_ATTACH_RW))
        return vd_fail(ERROR_ACCESS_DENIED, "a read-write attach needs a handle opened with "
                                            "VIRTUAL_DISK_ACCESS_ATTACH_RW (or pass ATTACH_VIRTUAL_DISK_FLAG_READ_ONLY)");
    if (handle->image->format->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_ISO && !read_only)
        return vd_fail(ERROR_INVALID_PARAMETER, "ISO images attach only with ATTACH_VIRTUAL_DISK_FLAG_READ_ONLY");
    return ERROR_SUCCESS;
}

DWORD WINAPI AttachVirtualDisk(HANDLE VirtualDiskHandle, PSECURITY_DESCRIPTOR SecurityDescriptor,
                               ATTACH_VIRTUAL_DISK_FLAG Flags, ULONG ProviderSpecificFlags,
                               ATTACH_VIRTUAL_DISK_PARAMETERS *Parameters, OVERLAPPED *Overlapped)
{
    vd_clear_detail();
    struct vd_handle *handle = vd_handle_acquire(VirtualDiskHandle);
    if (!handle)
        return vd_handle_refuse(VirtualDiskHandle, ERROR_INVALID_PARAMETER);
    DWORD status = vd_attach_checks(handle, Flags, Parameters);
    if (status == ERROR_SUCCESS && vd_job_running(handle))
        status = vd_fail(ERROR_BUSY, "an operation is still running on this handle");
    if (status == ERROR_SUCCESS && Overlapped)
        status = vd_fail(ERROR_NOT_SUPPORTED, "asynchronous attach (Overlapped) is not supported on Linux");
    if (status == ERROR_SUCCESS && SecurityDescriptor)
        status = vd_fail(ERROR_NOT_SUPPORTED, "security descriptors are not supported on Linux");
    if (status != ERROR_SUCCESS) {
        vd_handle_release(handle);
        return status;
    }

    bool read_only = Flags & ATTACH_VIRTUAL_DISK_FLAG_READ_ONLY;
    bool permanent = Flags & ATTACH_VIRTUAL_DISK_FLAG_PERMANENT_LIFETIME;
    struct vd_image *image = handle->image;
    vd_disks_lock();
    bool helper;
    int existing = vd_handle_attached_loop(handle, &helper);
    int claim = -1;
    if (existing < 0) {
        /* One attach at a time, and none while another holds the image
           against it: a read-write attach comes from the image's writer (whose
           handle already denies other writers), a read-only one keeps the
           image read-only.  The claim is made before looking for an
           existing attachment, so an attach that finishes meanwhile is
           seen (its marker is in place before its claim ends). */
        vd_share_settle(image);
        status = vd_share_claim(image, VD_SHARE_ATTACH, VD_SHARE_ATTACH | (read_only ? VD_SHARE_WRITE : 0),
                                image->share_fd,
                                read_only ? "attaching read-only" : "attaching read-write", &claim);
        if (status == ERROR_SUCCESS)
            existing = vd_share_attached_loop(image, &helper);
    }
    if (status != ERROR_SUCCESS) {
        /* the claim's failure says what conflicts */
    } else if (existing >= 0) {
        status = vd_fail(ERROR_SHARING_VIOLATION, "%s is already attached as /dev/loop%d", image->path, existing);
    } else if (!image->flat) {
        /* Blocks to translate: a FUSE server shows the disk as a file. */
        int number;
        struct vd_served *served;
        /* What is missing is said before anything (a mount, a helper, a
           record) is made; a missing privilege is said first. */
        status = vd_loop_require_privilege("attaching a virtual disk");
        if (status == ERROR_SUCCESS)
            status = vd_fuse_require(image);
        if (status == ERROR_SUCCESS)
            status = vd_served_attach(image, read_only, permanent, claim, &number, &served);
        if (status == ERROR_SUCCESS && !permanent) {
            handle->disk->loop_number = number;
            handle->disk->served = served; /* its helper holds the device */
        }
    } else {
        /* The loop device gets its own open file description, which carries
           the attachment's marker for exactly as long as the kernel holds it
           (share.h), and is read-only for a read-only attach. */
        char self_path[64];
        snprintf(self_path, sizeof self_path, "/proc/self/fd/%d", image->fd);
        int backing_fd = open(self_path, (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
        struct vd_loop_request request = {
            .backing_fd = backing_fd,
            .offset = image->flat_offset,
            .size = image->virtual_size,
            .block_size = image->logical_sector_size,
            .read_only = read_only,
            .autoclear = !permanent,
            .name = image->path,
        };
        struct vd_loop loop;
        if (backing_fd < 0)
            status = vd_fail_errno(errno, "reopening %s for the loop device", image->path);
        else if (!read_only && image->format->prepare_direct_write)
            status = image->format->prepare_direct_write(image);
        if (status == ERROR_SUCCESS && backing_fd >= 0)
            status = vd_share_mark_attached(backing_fd);
        if (status == ERROR_SUCCESS)
            status = vd_loop_attach(&request, &loop);
        if (backing_fd >= 0)
            close(backing_fd); /* the loop device holds its own reference */
        if (status == ERROR_SUCCESS) {
            if (permanent) {
                /* Nothing holds a permanent disk: it stays until a detach. */
                close(loop.fd);
            } else {
                handle->disk->loop_number = loop.number;
                handle->disk->loop_fd = loop.fd;
                handle->disk->loop_seq = loop.seq;
            }
        }
    }
    if (status == ERROR_SUCCESS && !permanent) {
        /* This process holds the attachment: its claim lives as long. */
        handle->disk->attach_claim = claim;
    } else if (claim >= 0) {
        /* A permanent attachment outlives this process: from here on its
           marker (and a served one's server claims) speak for it. */
        close(claim);
    }
    vd_disks_unlock();
    vd_handle_release(handle);
    return status;
}

DWORD WINAPI DetachVirtualDisk(HANDLE VirtualDiskHandle, DETACH_VIRTUAL_DISK_FLAG Flags, ULONG ProviderSpecificFlags)
{
    vd_clear_detail();
    if (Flags != DETACH_VIRTUAL_DISK_FLAG_NONE)
        return vd_fail(ERROR_INVALID_PARAMETER, "detach flags must be DETACH_VIRTUAL_DISK_FLAG_NONE, not 0x%08x",
                       (unsigned)Flags);
    struct vd_handle *handle = vd_handle_acquire(VirtualDiskHandle);
    if (!handle)
        return vd_handle_refuse(VirtualDiskHandle, ERROR_INVALID_PARAMETER);
    DWORD status = ERROR_SUCCESS;
    if (!(handle->access & VIRTUAL_DISK_ACCESS_DETACH))
        status = vd_fail(ERROR_ACCESS_DENIED, "the handle was opened without VIRTUAL_DISK_ACCESS_DETACH");
    vd_disks_lock();
    if (status == ERROR_SUCCESS && vd_handle_has_others(handle))
        status = vd_fail(ERROR_SHARING_VIOLATION,
                         "other handles to %s are open; close them before detaching", handle->image->path);
    int number = -1;
    bool helper = false;
    struct vd_loop_binding found;
    if (status == ERROR_SUCCESS) {
        number = vd_handle_attached_binding(handle, &helper, &found);
        if (number < 0)
            status = vd_fail(ERROR_NOT_READY, "%s is not attached", handle->image->path);
    }
    if (status == ERROR_SUCCESS && helper) {
        status = vd_served_detach(handle->image);
    } else if (status == ERROR_SUCCESS) {
        /* This process's own attachment, also when a mirror's break moved
           it from the image file another handle of this process opened. */
        struct vd_disk *disk = vd_disk_attached_as(number);
        if (!disk)
            disk = handle->disk;
        bool own = disk->loop_number == number;
        if (own && disk->served) {
            /* Success means the server is gone and the image flushed. */
            status = vd_served_detach_own(disk->served);
            if (status == ERROR_SUCCESS)
                disk->served = NULL;
        } else if (own) {
            status = vd_loop_detach(number, &disk->loop_fd);
        } else {
            /* Found by a lookup (a permanent disk, or another process's):
               acted on only through a descriptor that still shows it. */
            status = vd_loop_detach_found(&found);
        }
        if (own && status == ERROR_SUCCESS) {
            disk->loop_number = -1;
            if (disk->attach_claim >= 0)
                close(disk->attach_claim);
            disk->attach_claim = -1;
        }
    }
    vd_disks_unlock();
    vd_handle_release(handle);
    return status;
}

DWORD WINAPI GetVirtualDiskPhysicalPath(HANDLE VirtualDiskHandle, ULONG *DiskPathSizeInBytes, WCHAR *DiskPath)
{
    vd_clear_detail();
    if (!DiskPathSizeInBytes)
        return vd_fail(ERROR_INVALID_PARAMETER, "DiskPathSizeInBytes is required");
    struct vd_handle *handle = vd_handle_acquire(VirtualDiskHandle);
    if (!handle)
        return vd_handle_refuse(VirtualDiskHandle, ERROR_INVALID_PARAMETER);
    DWORD status = ERROR_SUCCESS;
    if (!(handle->access & VIRTUAL_DISK_ACCESS_GET_INFO)) {
        status = vd_fail(ERROR_ACCESS_DENIED, "the handle was opened without VIRTUAL_DISK_ACCESS_GET_INFO");
    } else {
        bool helper;
        int number = vd_handle_attached_loop(handle, &helper);
        if (number < 0) {
            status = vd_fail(ERROR_DEV_NOT_EXIST, "%s is not attached", handle->image->path);
        } else {
            char device[32];
            snprintf(device, sizeof device, "/dev/loop%d", number);
            WCHAR wide[32];
            size_t needed = vd_utf8_to_utf16(device, wide, 32) * sizeof(WCHAR);
            if (!DiskPath || *DiskPathSizeInBytes < needed) {
                status = vd_fail(ERROR_INSUFFICIENT_BUFFER, "the path needs %zu bytes", needed);
            } else {
                memcpy(DiskPath, wide, needed);
            }
            *DiskPathSizeInBytes = (ULONG)needed;
        }
    }
    vd_handle_release(handle);
    return status;
}

struct vd_path_list {
    WCHAR *buffer;
    size_t capacity; /* WCHARs */
    size_t used;     /* WCHARs, without the final list terminator */
};

static void vd_path_list_add(int number, void *context)
{
    struct vd_path_list *list = context;
    char device[32];
    snprintf(device, sizeof device, "/dev/loop%d", number);
    WCHAR wide[32];
    size_t length = vd_utf8_to_utf16(device, wide, 32);
    if (list->buffer && list->used + length <= list->capacity)
        memcpy(list->buffer + list->used, wide, length * sizeof(WCHAR));
    list->used += length;
}

DWORD WINAPI GetAllAttachedVirtualDiskPhysicalPaths(ULONG *PathsBufferSizeInBytes, WCHAR *PathsBuffer)
{
    vd_clear_detail();
    if (!PathsBufferSizeInBytes)
        return vd_fail(ERROR_INVALID_PARAMETER, "PathsBufferSizeInBytes is required");
    struct vd_path_list list = {PathsBuffer, *PathsBufferSizeInBytes / sizeof(WCHAR), 0};
    /* What killed helpers left behind goes now (root only: the run
       directory is root's). */
    if (geteuid() == 0)
        vd_run_collect_garbage();
    vd_loop_for_each_virtual_disk(vd_path_list_add, &list);
    /* A MULTI_SZ: every path NUL-terminated, then one more NUL. */
    size_t needed = (list.used + 1) * sizeof(WCHAR);
    DWORD status = ERROR_SUCCESS;
    if (!PathsBuffer || *PathsBufferSizeInBytes < needed)
        status = vd_fail(ERROR_INSUFFICIENT_BUFFER, "the list needs %zu bytes", needed);
    else
        PathsBuffer[list.used] = 0;
    *PathsBufferSizeInBytes = (ULONG)needed;
    return status;
}
