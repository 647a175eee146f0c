/*
 * TEST DOUBLE of VirtDisk.dll, for running the facade's Windows code paths
 * under Wine (whose own virtdisk.dll is stubs).  Never shipped: .ci/windows-test
 * builds it with zig, puts it in a private Wine prefix's system32 and loads it
 * with WINEDLLOVERRIDES=virtdisk=n for tests/test_windows_standin.py only.
 *
 * It keeps images and attachments in memory, per process, and touches no disk.
 * Images are registered by the test (VdTestDouble* exports below); everything
 * else follows the documented protocols (Microsoft Learn, virtdisk.h pages;
 * shared reference §5), with undocumented codes chosen and said so:
 *   - handles are real kernel objects (events), so kernel32's CloseHandle
 *     closes them; a handle is live while CompareObjectHandles finds the
 *     caller's value still naming the event this DLL keeps a duplicate of;
 *   - a disk attached without PERMANENT_LIFETIME detaches when its last handle
 *     has closed (noticed at the next call, as the double cannot see
 *     CloseHandle);
 *   - Attach needs SeManageVolumePrivilege enabled in the token; Detach needs
 *     it only in "server" mode (the docs: "on a Windows Server operating
 *     system"); DETACH access, Flags 0 and no other open handle;
 *   - GetVirtualDiskPhysicalPath and GetAllAttachedVirtualDiskPhysicalPaths
 *     answer ERROR_INSUFFICIENT_BUFFER with the size they need (in bytes);
 *   - GetVirtualDiskInformation: PARENT_LOCATION as a multi-string, with the
 *     same sizing; arms that do not apply answer ERROR_VHD_INVALID_TYPE;
 *     IS_LOADED is FALSE (nothing mounts a volume here), attached or not.
 */
#include <windows.h>

#include <stdint.h>
#include <string.h>
#include <wchar.h>

#define EXPORT __declspec(dllexport)
#define FAKE_MAX_IMAGES 16
#define FAKE_MAX_HANDLES 64
#define FAKE_PATH 520
#define FAKE_PARENTS 4096 /* WCHARs: more than the facade's first 4096-byte buffer */

/* Codes MinGW-w64's winerror.h lacks; values from the SDK's. */
#define FAKE_ERROR_VHD_DRIVE_FOOTER_MISSING 0xC03A0001u
#define FAKE_ERROR_VHD_PARENT_VHD_NOT_FOUND 0xC03A000Du
#define FAKE_ERROR_VIRTDISK_PROVIDER_NOT_FOUND 0xC03A0014u
#define FAKE_ERROR_VHD_INVALID_TYPE 0xC03A001Bu

struct fake_image {
    BOOL used;
    WCHAR path[FAKE_PATH];
    ULONG device_id; /* VIRTUAL_STORAGE_TYPE_DEVICE_* */
    ULONG subtype;   /* 2 fixed, 3 dynamic, 4 differencing; 0 for ISO */
    ULONGLONG size;
    GUID id;
    WCHAR parents[FAKE_PARENTS]; /* multi-string */
    BOOL parent_resolved;
    BOOL attached, permanent;
    int number; /* N of \\.\PhysicalDriveN or \\.\CdRomN */
};

struct fake_handle {
    HANDLE caller; /* the value handed out */
    HANDLE own;    /* our duplicate: keeps the event, tells the caller's apart */
    struct fake_image *image;
    VIRTUAL_DISK_ACCESS_MASK access;
};

static struct fake_image images[FAKE_MAX_IMAGES];
static struct fake_handle handles[FAKE_MAX_HANDLES];
static BOOL list_image_paths, server, stuck_sizes;
static int next_number = 1; /* PhysicalDrive0 is the host's own disk */
static CRITICAL_SECTION lock;
static BOOL (WINAPI *compare_object_handles)(HANDLE, HANDLE);

BOOL WINAPI DllMain(HINSTANCE instance, DWORD reason, LPVOID reserved)
{
    (void)instance;
    (void)reserved;
    if (reason == DLL_PROCESS_ATTACH) {
        InitializeCriticalSection(&lock);
        HMODULE kernelbase = GetModuleHandleW(L"kernelbase.dll");
        if (kernelbase)
            compare_object_handles =
                (BOOL(WINAPI *)(HANDLE, HANDLE))(void *)GetProcAddress(kernelbase, "CompareObjectHandles");
    }
    return TRUE;
}

static BOOL handle_live(const struct fake_handle *handle)
{
    return compare_object_handles && compare_object_handles(handle->caller, handle->own);
}

static int live_handles_of(const struct fake_image *image)
{
    int count = 0;
    for (int i = 0; i < FAKE_MAX_HANDLES; i++)
        if (handles[i].image == image)
            count++;
    return count;
}

/* Forgets closed handles, and detaches what lived only through them. */
static void sweep(void)
{
    for (int i = 0; i < FAKE_MAX_HANDLES; i++) {
        if (handles[i].image && !handle_live(&handles[i])) {
            CloseHandle(handles[i].own);
            memset(&handles[i], 0, sizeof handles[i]);
        }
    }
    for (int i = 0; i < FAKE_MAX_IMAGES; i++)
        if (images[i].used && images[i].attached && !images[i].permanent && !live_handles_of(&images[i]))
            images[i].attached = FALSE;
}

static struct fake_handle *find_handle(HANDLE value)
{
    for (int i = 0; i < FAKE_MAX_HANDLES; i++)
        if (handles[i].image && handles[i].caller == value)
            return &handles[i];
    return NULL;
}

static BOOL full_path(const WCHAR *path, WCHAR *out)
{
    DWORD length = GetFullPathNameW(path, FAKE_PATH, out, NULL);
    return length > 0 && length < FAKE_PATH;
}

static struct fake_image *find_image(const WCHAR *full)
{
    for (int i = 0; i < FAKE_MAX_IMAGES; i++)
        if (images[i].used && _wcsicmp(images[i].path, full) == 0)
            return &images[i];
    return NULL;
}

static size_t multi_sz_bytes(const WCHAR *list)
{
    const WCHAR *item = list;
    while (*item)
        item += wcslen(item) + 1;
    return (size_t)(item - list + 1) * sizeof(WCHAR);
}

static BOOL privilege_enabled(void)
{
    HANDLE token;
    PRIVILEGE_SET set = {1, PRIVILEGE_SET_ALL_NECESSARY, {{{0, 0}, 0}}};
    BOOL enabled = FALSE;
    if (!OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &token))
        return FALSE;
    if (LookupPrivilegeValueW(NULL, L"SeManageVolumePrivilege", &set.Privilege[0].Luid))
        PrivilegeCheck(token, &set, &enabled);
    CloseHandle(token);
    return enabled;
}

/* The answer to a too small buffer: the size needed, unless the double is
   told to misbehave and repeat the caller's size. */
static DWORD too_small(ULONG *size, size_t needed)
{
    if (!stuck_sizes)
        *size = (ULONG)needed;
    return ERROR_INSUFFICIENT_BUFFER;
}

/* ---- the test's controls ------------------------------------------------ */

EXPORT void WINAPI VdTestDoubleReset(void)
{
    EnterCriticalSection(&lock);
    for (int i = 0; i < FAKE_MAX_HANDLES; i++)
        if (handles[i].image)
            CloseHandle(handles[i].own);
    memset(handles, 0, sizeof handles);
    memset(images, 0, sizeof images);
    list_image_paths = server = stuck_sizes = FALSE;
    next_number = 1;
    LeaveCriticalSection(&lock);
}

EXPORT DWORD WINAPI VdTestDoubleAddImage(const WCHAR *path, ULONG device_id, ULONG subtype, ULONGLONG size,
                                         const WCHAR *parents, BOOL parent_resolved)
{
    DWORD status = ERROR_TOO_MANY_OPEN_FILES;
    EnterCriticalSection(&lock);
    for (int i = 0; i < FAKE_MAX_IMAGES; i++) {
        struct fake_image *image = &images[i];
        if (image->used)
            continue;
        if (!full_path(path, image->path) || (parents && multi_sz_bytes(parents) > sizeof image->parents)) {
            status = ERROR_INVALID_PARAMETER;
            break;
        }
        image->used = TRUE;
        image->device_id = device_id;
        image->subtype = subtype;
        image->size = size;
        image->id.Data1 = 0x7e570000u + (ULONG)i; /* "test", per slot */
        if (parents)
            memcpy(image->parents, parents, multi_sz_bytes(parents));
        image->parent_resolved = parent_resolved;
        status = ERROR_SUCCESS;
        break;
    }
    LeaveCriticalSection(&lock);
    return status;
}

EXPORT void WINAPI VdTestDoubleListImagePaths(BOOL on) { list_image_paths = on; }
EXPORT void WINAPI VdTestDoubleServer(BOOL on) { server = on; }
EXPORT void WINAPI VdTestDoubleStuckSizes(BOOL on) { stuck_sizes = on; }

EXPORT int WINAPI VdTestDoubleLiveHandles(void)
{
    EnterCriticalSection(&lock);
    sweep();
    int count = 0;
    for (int i = 0; i < FAKE_MAX_HANDLES; i++)
        count += handles[i].image != NULL;
    LeaveCriticalSection(&lock);
    return count;
}

/* ---- VirtDisk ------------------------------------------------------------ */

static DWORD open_image(VIRTUAL_STORAGE_TYPE *type, const WCHAR *path, VIRTUAL_DISK_ACCESS_MASK access,
                        OPEN_VIRTUAL_DISK_FLAG flags, HANDLE *out)
{
    WCHAR full[FAKE_PATH];
    if (!type || !path || !out || (access & ~VIRTUAL_DISK_ACCESS_ALL))
        return ERROR_INVALID_PARAMETER;
    if (!full_path(path, full))
        return ERROR_INVALID_NAME;
    struct fake_image *image = find_image(full);
    if (!image) {
        DWORD attributes = GetFileAttributesW(full);
        return attributes == INVALID_FILE_ATTRIBUTES ? GetLastError() : FAKE_ERROR_VHD_DRIVE_FOOTER_MISSING;
    }
    if (type->DeviceId != VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN && type->DeviceId != image->device_id)
        return FAKE_ERROR_VIRTDISK_PROVIDER_NOT_FOUND;
    if (image->subtype == 4 && !image->parent_resolved && !(flags & OPEN_VIRTUAL_DISK_FLAG_NO_PARENTS))
        return FAKE_ERROR_VHD_PARENT_VHD_NOT_FOUND;
    for (int i = 0; i < FAKE_MAX_HANDLES; i++) {
        struct fake_handle *handle = &handles[i];
        if (handle->image)
            continue;
        handle->caller = CreateEventW(NULL, TRUE, FALSE, NULL);
        if (!handle->caller)
            return GetLastError();
        if (!DuplicateHandle(GetCurrentProcess(), handle->caller, GetCurrentProcess(), &handle->own, 0, FALSE,
                             DUPLICATE_SAME_ACCESS)) {
            DWORD error = GetLastError();
            CloseHandle(handle->caller);
            return error;
        }
        handle->image = image;
        handle->access = access;
        *out = handle->caller;
        return ERROR_SUCCESS;
    }
    return ERROR_TOO_MANY_OPEN_FILES;
}

EXPORT DWORD WINAPI OpenVirtualDisk(PVIRTUAL_STORAGE_TYPE VirtualStorageType, PCWSTR Path,
                                    VIRTUAL_DISK_ACCESS_MASK VirtualDiskAccessMask, OPEN_VIRTUAL_DISK_FLAG Flags,
                                    POPEN_VIRTUAL_DISK_PARAMETERS Parameters, PHANDLE Handle)
{
    if (Parameters && Parameters->Version != OPEN_VIRTUAL_DISK_VERSION_1 &&
        Parameters->Version != OPEN_VIRTUAL_DISK_VERSION_2)
        return ERROR_INVALID_PARAMETER;
    EnterCriticalSection(&lock);
    sweep();
    DWORD status = open_image(VirtualStorageType, Path, VirtualDiskAccessMask, Flags, Handle);
    LeaveCriticalSection(&lock);
    return status;
}

EXPORT DWORD WINAPI AttachVirtualDisk(HANDLE VirtualDiskHandle, PSECURITY_DESCRIPTOR SecurityDescriptor,
                                      ATTACH_VIRTUAL_DISK_FLAG Flags, ULONG ProviderSpecificFlags,
                                      PATTACH_VIRTUAL_DISK_PARAMETERS Parameters, LPOVERLAPPED Overlapped)
{
    (void)SecurityDescriptor;
    (void)ProviderSpecificFlags;
    if (Overlapped)
        return ERROR_NOT_SUPPORTED; /* the double is synchronous only */
    EnterCriticalSection(&lock);
    sweep();
    struct fake_handle *handle = find_handle(VirtualDiskHandle);
    BOOL read_only = (Flags & ATTACH_VIRTUAL_DISK_FLAG_READ_ONLY) != 0;
    DWORD status = ERROR_SUCCESS;
    if (!handle || Flags > 0x7FF || (Parameters && Parameters->Version != 1 && Parameters->Version != 2))
        status = ERROR_INVALID_PARAMETER;
    else if (!(handle->access & (read_only ? VIRTUAL_DISK_ACCESS_ATTACH_RO | VIRTUAL_DISK_ACCESS_ATTACH_RW
                                           : VIRTUAL_DISK_ACCESS_ATTACH_RW)))
        status = ERROR_ACCESS_DENIED;
    else if (!privilege_enabled())
        status = ERROR_PRIVILEGE_NOT_HELD;
    else if (handle->image->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_ISO && !read_only)
        status = ERROR_NOT_SUPPORTED; /* the docs: ISO only with READ_ONLY */
    else if (handle->image->attached)
        status = ERROR_SHARING_VIOLATION; /* undocumented code: the double's choice */
    if (status == ERROR_SUCCESS) {
        handle->image->attached = TRUE;
        handle->image->permanent = (Flags & ATTACH_VIRTUAL_DISK_FLAG_PERMANENT_LIFETIME) != 0;
        handle->image->number = next_number++;
    }
    LeaveCriticalSection(&lock);
    return status;
}

EXPORT DWORD WINAPI DetachVirtualDisk(HANDLE VirtualDiskHandle, DETACH_VIRTUAL_DISK_FLAG Flags,
                                      ULONG ProviderSpecificFlags)
{
    (void)ProviderSpecificFlags;
    EnterCriticalSection(&lock);
    sweep();
    struct fake_handle *handle = find_handle(VirtualDiskHandle);
    DWORD status = ERROR_SUCCESS;
    if (!handle || Flags != DETACH_VIRTUAL_DISK_FLAG_NONE)
        status = ERROR_INVALID_PARAMETER;
    else if (!(handle->access & VIRTUAL_DISK_ACCESS_DETACH))
        status = ERROR_ACCESS_DENIED;
    else if (server && !privilege_enabled())
        status = ERROR_PRIVILEGE_NOT_HELD;
    else if (!handle->image->attached)
        status = ERROR_NOT_READY;
    else if (live_handles_of(handle->image) > 1)
        status = ERROR_SHARING_VIOLATION;
    else
        handle->image->attached = FALSE;
    LeaveCriticalSection(&lock);
    return status;
}

static void device_path(const struct fake_image *image, WCHAR *out, size_t count)
{
    const WCHAR *kind = image->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_ISO ? L"CdRom" : L"PhysicalDrive";
    swprintf(out, count, L"\\\\.\\%ls%d", kind, image->number);
}

EXPORT DWORD WINAPI GetVirtualDiskPhysicalPath(HANDLE VirtualDiskHandle, PULONG DiskPathSizeInBytes,
                                               PWSTR DiskPath)
{
    WCHAR device[64];
    EnterCriticalSection(&lock);
    sweep();
    struct fake_handle *handle = find_handle(VirtualDiskHandle);
    DWORD status = ERROR_SUCCESS;
    if (!handle || !DiskPathSizeInBytes) {
        status = ERROR_INVALID_PARAMETER;
    } else if (!(handle->access & VIRTUAL_DISK_ACCESS_GET_INFO)) {
        status = ERROR_ACCESS_DENIED;
    } else if (!handle->image->attached) {
        status = ERROR_DEV_NOT_EXIST; /* undocumented code: the one reported seen */
    } else {
        device_path(handle->image, device, 64);
        size_t needed = (wcslen(device) + 1) * sizeof(WCHAR);
        if (!DiskPath || *DiskPathSizeInBytes < needed)
            status = too_small(DiskPathSizeInBytes, needed);
        else
            memcpy(DiskPath, device, needed);
    }
    LeaveCriticalSection(&lock);
    return status;
}

/* Undocumented; a double-NUL-terminated list, one entry per attached disk:
   device paths, or (VdTestDoubleListImagePaths) the images' paths, as some
   Windows builds are reported to answer. */
EXPORT DWORD WINAPI GetAllAttachedVirtualDiskPhysicalPaths(PULONG PathsBufferSizeInBytes, PWSTR PathsBuffer)
{
    WCHAR list[FAKE_MAX_IMAGES * FAKE_PATH + 1];
    WCHAR *end = list;
    if (!PathsBufferSizeInBytes)
        return ERROR_INVALID_PARAMETER;
    EnterCriticalSection(&lock);
    sweep();
    for (int i = 0; i < FAKE_MAX_IMAGES; i++) {
        if (!images[i].used || !images[i].attached)
            continue;
        if (list_image_paths)
            wcscpy(end, images[i].path);
        else
            device_path(&images[i], end, 64);
        end += wcslen(end) + 1;
    }
    *end++ = L'\0';
    size_t needed = (size_t)(end - list) * sizeof(WCHAR);
    DWORD status = ERROR_SUCCESS;
    if (!PathsBuffer || *PathsBufferSizeInBytes < needed)
        status = too_small(PathsBufferSizeInBytes, needed);
    else
        memcpy(PathsBuffer, list, needed);
    LeaveCriticalSection(&lock);
    return status;
}

static DWORD information(const struct fake_image *image, ULONG *size, GET_VIRTUAL_DISK_INFO *info)
{
    BOOL iso = image->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_ISO;
    BOOL differencing = image->subtype == 4;
    size_t fixed = sizeof *info;
    if (*size < fixed && info->Version != GET_VIRTUAL_DISK_INFO_PARENT_LOCATION)
        return too_small(size, fixed);
    switch (info->Version) {
    case GET_VIRTUAL_DISK_INFO_SIZE:
        info->Size.VirtualSize = image->size;
        info->Size.PhysicalSize = iso ? image->size : image->size / 4;
        info->Size.BlockSize = image->subtype == 3 || differencing ? 2u << 20 : 0;
        info->Size.SectorSize = iso ? 2048 : 512;
        break;
    case GET_VIRTUAL_DISK_INFO_IDENTIFIER:
        if (iso)
            return FAKE_ERROR_VHD_INVALID_TYPE; /* an ISO has no identifier */
        info->Identifier = image->id;
        break;
    case GET_VIRTUAL_DISK_INFO_PARENT_LOCATION: {
        if (!differencing)
            return FAKE_ERROR_VHD_INVALID_TYPE;
        size_t needed = offsetof(GET_VIRTUAL_DISK_INFO, ParentLocation.ParentLocationBuffer) +
                        multi_sz_bytes(image->parents);
        if (*size < needed)
            return too_small(size, needed);
        info->ParentLocation.ParentResolved = image->parent_resolved;
        memcpy(info->ParentLocation.ParentLocationBuffer, image->parents, multi_sz_bytes(image->parents));
        break;
    }
    case GET_VIRTUAL_DISK_INFO_PARENT_IDENTIFIER:
        if (!differencing)
            return FAKE_ERROR_VHD_INVALID_TYPE;
        info->ParentIdentifier = image->id;
        info->ParentIdentifier.Data1 ^= 0xFFFFu;
        break;
    case GET_VIRTUAL_DISK_INFO_PARENT_TIMESTAMP:
        if (!differencing || image->device_id != VIRTUAL_STORAGE_TYPE_DEVICE_VHD)
            return FAKE_ERROR_VHD_INVALID_TYPE;
        info->ParentTimestamp = 123456789;
        break;
    case GET_VIRTUAL_DISK_INFO_VIRTUAL_STORAGE_TYPE:
        info->VirtualStorageType.DeviceId = image->device_id;
        info->VirtualStorageType.VendorId = VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT;
        break;
    case GET_VIRTUAL_DISK_INFO_PROVIDER_SUBTYPE:
        if (iso)
            return FAKE_ERROR_VHD_INVALID_TYPE;
        info->ProviderSubtype = image->subtype;
        break;
    case GET_VIRTUAL_DISK_INFO_VHD_PHYSICAL_SECTOR_SIZE:
        if (iso)
            return FAKE_ERROR_VHD_INVALID_TYPE;
        info->VhdPhysicalSectorSize = image->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_VHDX ? 4096 : 512;
        break;
    case GET_VIRTUAL_DISK_INFO_IS_LOADED:
        info->IsLoaded = FALSE;
        break;
    case GET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID:
        if (image->device_id != VIRTUAL_STORAGE_TYPE_DEVICE_VHDX)
            return FAKE_ERROR_VHD_INVALID_TYPE;
        info->VirtualDiskId = image->id;
        info->VirtualDiskId.Data2 = 0x1d;
        break;
    default:
        return ERROR_NOT_SUPPORTED; /* the rest is beyond this double */
    }
    return ERROR_SUCCESS;
}

EXPORT DWORD WINAPI GetVirtualDiskInformation(HANDLE VirtualDiskHandle, PULONG VirtualDiskInfoSize,
                                              PGET_VIRTUAL_DISK_INFO VirtualDiskInfo, PULONG SizeUsed)
{
    EnterCriticalSection(&lock);
    sweep();
    struct fake_handle *handle = find_handle(VirtualDiskHandle);
    DWORD status;
    if (!handle || !VirtualDiskInfoSize || !VirtualDiskInfo)
        status = ERROR_INVALID_PARAMETER;
    else if (!(handle->access & VIRTUAL_DISK_ACCESS_GET_INFO))
        status = ERROR_ACCESS_DENIED;
    else
        status = information(handle->image, VirtualDiskInfoSize, VirtualDiskInfo);
    if (SizeUsed && VirtualDiskInfoSize)
        *SizeUsed = *VirtualDiskInfoSize;
    LeaveCriticalSection(&lock);
    return status;
}

/* The start of the SDK's CREATE_VIRTUAL_DISK_PARAMETERS Version2, which
   MinGW-w64 lays out differently (it lacks PhysicalSectorSizeInBytes). */
struct fake_create_v2 {
    CREATE_VIRTUAL_DISK_VERSION Version;
    GUID UniqueId;
    ULONGLONG MaximumSize;
    ULONG BlockSizeInBytes;
    ULONG SectorSizeInBytes;
    ULONG PhysicalSectorSizeInBytes;
    PCWSTR ParentPath;
    PCWSTR SourcePath;
};

/* "X:\..." or "\\server\..."; the docs want parent and source paths fully
   qualified.  The code Windows answers otherwise is undocumented: the double
   answers ERROR_INVALID_PARAMETER. */
static BOOL fully_qualified(const WCHAR *path)
{
    return (path[0] && path[1] == L':' && path[2] == L'\\') || (path[0] == L'\\' && path[1] == L'\\');
}

/* Registers the image (no file is written); version 2 only, as the facade calls it. */
EXPORT DWORD WINAPI CreateVirtualDisk(PVIRTUAL_STORAGE_TYPE VirtualStorageType, PCWSTR Path,
                                      VIRTUAL_DISK_ACCESS_MASK VirtualDiskAccessMask,
                                      PSECURITY_DESCRIPTOR SecurityDescriptor, CREATE_VIRTUAL_DISK_FLAG Flags,
                                      ULONG ProviderSpecificFlags, PCREATE_VIRTUAL_DISK_PARAMETERS Parameters,
                                      LPOVERLAPPED Overlapped, PHANDLE Handle)
{
    const struct fake_create_v2 *v2 = (const struct fake_create_v2 *)(const void *)Parameters;
    WCHAR full[FAKE_PATH], parents[FAKE_PATH + 1] = {0};
    (void)SecurityDescriptor, (void)ProviderSpecificFlags;
    if (!VirtualStorageType || !Path || !Handle || !v2 || v2->Version != 2 ||
        VirtualDiskAccessMask != VIRTUAL_DISK_ACCESS_NONE || Overlapped)
        return ERROR_INVALID_PARAMETER;
    if ((v2->ParentPath && !fully_qualified(v2->ParentPath)) || (v2->SourcePath && !fully_qualified(v2->SourcePath)))
        return ERROR_INVALID_PARAMETER;
    if (!full_path(Path, full))
        return ERROR_INVALID_NAME;
    EnterCriticalSection(&lock);
    sweep();
    DWORD status = ERROR_SUCCESS;
    struct fake_image *parent = NULL;
    if (find_image(full) || GetFileAttributesW(full) != INVALID_FILE_ATTRIBUTES)
        status = ERROR_FILE_EXISTS;
    else if (v2->ParentPath && !(parent = find_image(v2->ParentPath)))
        status = FAKE_ERROR_VHD_PARENT_VHD_NOT_FOUND;
    if (status == ERROR_SUCCESS) {
        ULONG device = VirtualStorageType->DeviceId;
        if (device == VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN)
            device = parent ? parent->device_id
                            : _wcsicmp(full + wcslen(full) - 5, L".vhdx") == 0 ? VIRTUAL_STORAGE_TYPE_DEVICE_VHDX
                                                                                : VIRTUAL_STORAGE_TYPE_DEVICE_VHD;
        if (parent)
            wcsncpy(parents, v2->ParentPath, FAKE_PATH - 1);
        ULONG subtype = parent ? 4 : (Flags & CREATE_VIRTUAL_DISK_FLAG_FULL_PHYSICAL_ALLOCATION) ? 2 : 3;
        LeaveCriticalSection(&lock);
        status = VdTestDoubleAddImage(full, device, subtype, parent ? parent->size : v2->MaximumSize,
                                      parent ? parents : NULL, parent != NULL);
        EnterCriticalSection(&lock);
        if (status == ERROR_SUCCESS)
            status = open_image(VirtualStorageType, full, VIRTUAL_DISK_ACCESS_ALL, 0, Handle);
    }
    LeaveCriticalSection(&lock);
    return status;
}

/* The rest of what the module imports from VirtDisk.dll: beyond this double. */

EXPORT DWORD WINAPI GetStorageDependencyInformation(HANDLE a, GET_STORAGE_DEPENDENCY_FLAG b, ULONG c,
                                                    PSTORAGE_DEPENDENCY_INFO d, PULONG e)
{
    (void)a, (void)b, (void)c, (void)d, (void)e;
    return ERROR_CALL_NOT_IMPLEMENTED;
}

EXPORT DWORD WINAPI SetVirtualDiskInformation(HANDLE a, PSET_VIRTUAL_DISK_INFO b)
{
    (void)a, (void)b;
    return ERROR_CALL_NOT_IMPLEMENTED;
}

EXPORT DWORD WINAPI GetVirtualDiskOperationProgress(HANDLE a, LPOVERLAPPED b, PVIRTUAL_DISK_PROGRESS c)
{
    (void)a, (void)b, (void)c;
    return ERROR_CALL_NOT_IMPLEMENTED;
}

EXPORT DWORD WINAPI CompactVirtualDisk(HANDLE a, COMPACT_VIRTUAL_DISK_FLAG b, PCOMPACT_VIRTUAL_DISK_PARAMETERS c,
                                       LPOVERLAPPED d)
{
    (void)a, (void)b, (void)c, (void)d;
    return ERROR_CALL_NOT_IMPLEMENTED;
}

EXPORT DWORD WINAPI MergeVirtualDisk(HANDLE a, MERGE_VIRTUAL_DISK_FLAG b, PMERGE_VIRTUAL_DISK_PARAMETERS c,
                                     LPOVERLAPPED d)
{
    (void)a, (void)b, (void)c, (void)d;
    return ERROR_CALL_NOT_IMPLEMENTED;
}

EXPORT DWORD WINAPI ExpandVirtualDisk(HANDLE a, EXPAND_VIRTUAL_DISK_FLAG b, PEXPAND_VIRTUAL_DISK_PARAMETERS c,
                                      LPOVERLAPPED d)
{
    (void)a, (void)b, (void)c, (void)d;
    return ERROR_CALL_NOT_IMPLEMENTED;
}
