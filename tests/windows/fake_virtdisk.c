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
 *   - handles are real kernel objects (the server ends of private named
 *     pipes), so kernel32's CloseHandle closes them; a handle is live while
 *     CompareObjectHandles finds the caller's value still naming the pipe
 *     this DLL keeps a duplicate of;
 *   - long operations (Merge, Resize, Expand, Compact, and Create of a fixed
 *     disk or from a source) take an OVERLAPPED as VirtDisk does: the call
 *     issues a real pending I/O on the handle with the caller's OVERLAPPED
 *     (ConnectNamedPipe on the handle's pipe), and a thread of the double
 *     does the work in steps, then completes that I/O (by connecting to the
 *     pipe).  So kernel32 itself sets OVERLAPPED.Internal and the caller's
 *     event, and kernel32's CancelIoEx(handle, overlapped) cancels it, which
 *     the thread sees between steps (HasOverlappedIoCompleted) and answers
 *     ERROR_OPERATION_ABORTED through GetVirtualDiskOperationProgress,
 *     leaving the image as it was (a cancelled create: no image).  The work
 *     is only counting: CompletionValue is the bytes the real call would go
 *     through (the image's size; a compaction, its physical size);
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
    ULONG physical_sector; /* SetVirtualDiskInformation's; 0: the format's */
};

struct fake_handle {
    HANDLE caller; /* the value handed out */
    HANDLE own;    /* our duplicate: keeps the pipe, tells the caller's apart */
    WCHAR pipe[64]; /* the pipe's name, for completing an operation */
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

static BOOL ops_running(void);
static void ops_forget(void);

EXPORT void WINAPI VdTestDoubleReset(void)
{
    /* An operation's thread uses its record until it ends. */
    for (;;) {
        EnterCriticalSection(&lock);
        if (!ops_running())
            break;
        LeaveCriticalSection(&lock);
        Sleep(5);
    }
    ops_forget();
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
        static LONG serial;
        _snwprintf(handle->pipe, 63, L"\\\\.\\pipe\\virtdisk-test-double-%lu-%ld", GetCurrentProcessId(),
                  InterlockedIncrement(&serial));
        handle->caller = CreateNamedPipeW(handle->pipe, PIPE_ACCESS_INBOUND | FILE_FLAG_OVERLAPPED |
                                                            FILE_FLAG_FIRST_PIPE_INSTANCE,
                                          PIPE_TYPE_BYTE | PIPE_REJECT_REMOTE_CLIENTS, 1, 0, 0, 0, NULL);
        if (handle->caller == INVALID_HANDLE_VALUE) {
            handle->caller = NULL;
            return GetLastError();
        }
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
        info->VhdPhysicalSectorSize = image->physical_sector                                 ? image->physical_sector
                                      : image->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_VHDX ? 4096
                                                                                             : 512;
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

static DWORD create_operation(struct fake_handle *handle, OVERLAPPED *overlapped);

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
        VirtualDiskAccessMask != VIRTUAL_DISK_ACCESS_NONE)
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
        if (status == ERROR_SUCCESS && Overlapped) {
            /* The allocation or the copy, as an operation on the new handle. */
            struct fake_handle *handle = find_handle(*Handle);
            status = create_operation(handle, Overlapped);
            if (status != ERROR_IO_PENDING) {
                handle->image->used = FALSE;
                CloseHandle(*Handle);
                *Handle = NULL;
            }
        }
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


/* ---- long operations ----------------------------------------------------- */

#define FAKE_MAX_OPS 32
#define FAKE_STEPS 50
#define FAKE_STEP_MS 10 /* half a second in all: time for a test to cancel */
#define FAKE_ERROR_VHD_INVALID_STATE 0xC03A001Cu
#define FAKE_ERROR_VHD_RESIZE_WOULD_TRUNCATE_DATA 0xC03A0025u

enum fake_work { FAKE_MERGE, FAKE_RESIZE, FAKE_COMPACT, FAKE_CREATE };

struct fake_op {
    BOOL used;
    HANDLE caller;          /* the handle it was started on */
    OVERLAPPED *overlapped; /* the caller's */
    WCHAR pipe[64];
    struct fake_image *image;
    enum fake_work work;
    ULONGLONG new_size;     /* FAKE_RESIZE */
    volatile LONG status;   /* ERROR_IO_PENDING until the end */
    volatile LONG64 current, total;
};

static struct fake_op ops[FAKE_MAX_OPS];

static struct fake_op *find_op(HANDLE caller, const OVERLAPPED *overlapped)
{
    for (int i = 0; i < FAKE_MAX_OPS; i++)
        if (ops[i].used && ops[i].caller == caller && ops[i].overlapped == overlapped)
            return &ops[i];
    return NULL;
}

static BOOL op_running_on(const struct fake_image *image)
{
    for (int i = 0; i < FAKE_MAX_OPS; i++)
        if (ops[i].used && ops[i].image == image && ops[i].status == ERROR_IO_PENDING)
            return TRUE;
    return FALSE;
}

/* What the operation changes, once it is complete (under the lock). */
static void op_apply(struct fake_op *op)
{
    if (op->work == FAKE_RESIZE)
        op->image->size = op->new_size;
}

/* What a cancelled operation undoes (under the lock): a create leaves no image. */
static void op_undo(struct fake_op *op)
{
    if (op->work == FAKE_CREATE)
        op->image->used = FALSE;
}

static DWORD WINAPI op_thread(void *argument)
{
    struct fake_op *op = argument;
    LONG64 total = op->total;
    for (int step = 0; step < FAKE_STEPS; step++) {
        if (HasOverlappedIoCompleted(op->overlapped))
            break; /* CancelIoEx completed the caller's I/O */
        Sleep(FAKE_STEP_MS);
        InterlockedExchange64(&op->current, total * (step + 1) / FAKE_STEPS);
    }
    WCHAR pipe[64]; /* the record may be reused once the status is final */
    memcpy(pipe, op->pipe, sizeof pipe);
    EnterCriticalSection(&lock);
    BOOL cancelled = HasOverlappedIoCompleted(op->overlapped);
    if (cancelled)
        op_undo(op);
    else
        op_apply(op);
    /* The status before the I/O completes: whoever wakes on the event reads
       the final answer. */
    InterlockedExchange(&op->status, cancelled ? ERROR_OPERATION_ABORTED : ERROR_SUCCESS);
    LeaveCriticalSection(&lock);
    if (!cancelled) {
        HANDLE client = CreateFileW(pipe, GENERIC_WRITE, 0, NULL, OPEN_EXISTING, 0, NULL);
        if (client != INVALID_HANDLE_VALUE)
            CloseHandle(client);
    }
    return 0;
}

/* Starts work on handle for the caller's OVERLAPPED, or (no OVERLAPPED)
   does it at once.  Called under the lock with the arguments checked. */
static DWORD op_start(struct fake_handle *handle, OVERLAPPED *overlapped, struct fake_image *image,
                      enum fake_work work, ULONGLONG total, ULONGLONG new_size)
{
    struct fake_op sync = {.image = image, .work = work, .new_size = new_size};
    if (!overlapped) {
        op_apply(&sync);
        return ERROR_SUCCESS;
    }
    struct fake_op *op = find_op(handle->caller, overlapped);
    if (op && op->status == ERROR_IO_PENDING)
        return ERROR_INVALID_PARAMETER; /* the OVERLAPPED is in use: the double's choice of code */
    for (int i = 0; !op && i < FAKE_MAX_OPS; i++)
        if (!ops[i].used || ops[i].status != ERROR_IO_PENDING)
            op = &ops[i];
    if (!op)
        return ERROR_TOO_MANY_CMDS;
    /* Back to listening: a finished operation left the pipe connected. */
    DisconnectNamedPipe(handle->own);
    if (ConnectNamedPipe(handle->own, overlapped) || GetLastError() != ERROR_IO_PENDING)
        return GetLastError() == ERROR_SUCCESS ? ERROR_GEN_FAILURE : GetLastError();
    memset(op, 0, sizeof *op);
    op->used = TRUE;
    op->caller = handle->caller;
    op->overlapped = overlapped;
    memcpy(op->pipe, handle->pipe, sizeof op->pipe);
    op->image = image;
    op->work = work;
    op->new_size = new_size;
    op->status = ERROR_IO_PENDING;
    op->total = (LONG64)total;
    HANDLE thread = CreateThread(NULL, 0, op_thread, op, 0, NULL);
    if (!thread) {
        DWORD error = GetLastError();
        CancelIoEx(handle->own, overlapped);
        op->used = FALSE;
        return error;
    }
    CloseHandle(thread);
    return ERROR_IO_PENDING;
}

/* The handle for a long operation, checked as the docs say: METAOPS access,
   the disk detached, nothing else running on it.  NULL with *status set. */
static struct fake_handle *metaops_handle(HANDLE value, DWORD *status)
{
    struct fake_handle *handle = find_handle(value);
    *status = ERROR_SUCCESS;
    if (!handle)
        *status = ERROR_INVALID_HANDLE;
    else if (!(handle->access & VIRTUAL_DISK_ACCESS_METAOPS))
        *status = ERROR_ACCESS_DENIED;
    else if (handle->image->attached)
        *status = FAKE_ERROR_VHD_INVALID_STATE; /* the double runs detached operations only */
    else if (op_running_on(handle->image))
        *status = ERROR_BUSY; /* undocumented code: the double's choice */
    return *status == ERROR_SUCCESS ? handle : NULL;
}

EXPORT DWORD WINAPI GetVirtualDiskOperationProgress(HANDLE VirtualDiskHandle, LPOVERLAPPED Overlapped,
                                                    PVIRTUAL_DISK_PROGRESS Progress)
{
    if (!Overlapped || !Progress)
        return ERROR_INVALID_PARAMETER;
    EnterCriticalSection(&lock);
    struct fake_op *op = find_op(VirtualDiskHandle, Overlapped);
    DWORD status = op ? ERROR_SUCCESS : ERROR_INVALID_PARAMETER;
    if (op) {
        Progress->OperationStatus = (DWORD)op->status; /* first: then the counters are final */
        Progress->CurrentValue = (ULONGLONG)op->current;
        Progress->CompletionValue = (ULONGLONG)op->total;
    }
    LeaveCriticalSection(&lock);
    return status;
}

EXPORT DWORD WINAPI MergeVirtualDisk(HANDLE VirtualDiskHandle, MERGE_VIRTUAL_DISK_FLAG Flags,
                                     PMERGE_VIRTUAL_DISK_PARAMETERS Parameters, LPOVERLAPPED Overlapped)
{
    if (!Parameters || Flags != MERGE_VIRTUAL_DISK_FLAG_NONE)
        return ERROR_INVALID_PARAMETER;
    if (Parameters->Version == MERGE_VIRTUAL_DISK_VERSION_1 ? Parameters->Version1.MergeDepth == 0
        : Parameters->Version == MERGE_VIRTUAL_DISK_VERSION_2
            ? Parameters->Version2.MergeSourceDepth == 0 ||
                  Parameters->Version2.MergeTargetDepth <= Parameters->Version2.MergeSourceDepth
            : TRUE)
        return ERROR_INVALID_PARAMETER;
    EnterCriticalSection(&lock);
    sweep();
    DWORD status;
    struct fake_handle *handle = metaops_handle(VirtualDiskHandle, &status);
    if (handle && handle->image->subtype != 4)
        status = FAKE_ERROR_VHD_INVALID_TYPE; /* nothing to merge */
    if (status == ERROR_SUCCESS)
        status = op_start(handle, Overlapped, handle->image, FAKE_MERGE, handle->image->size, 0);
    LeaveCriticalSection(&lock);
    return status;
}

static DWORD resize(HANDLE value, ULONGLONG size, BOOL unsafe, BOOL expand, OVERLAPPED *overlapped)
{
    EnterCriticalSection(&lock);
    sweep();
    DWORD status;
    struct fake_handle *handle = metaops_handle(value, &status);
    struct fake_image *image = handle ? handle->image : NULL;
    if (status != ERROR_SUCCESS)
        ;
    else if (size == 0 || size % 512 || (expand && size <= image->size))
        status = ERROR_INVALID_PARAMETER;
    else if (image->subtype == 4 || image->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_ISO ||
             (size < image->size && image->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_VHD))
        status = FAKE_ERROR_VHD_INVALID_TYPE; /* a differencing disk has its parent's size; a VHD only grows */
    else if (size < image->size && !unsafe)
        status = FAKE_ERROR_VHD_RESIZE_WOULD_TRUNCATE_DATA; /* the double knows no partitions */
    if (status == ERROR_SUCCESS) {
        ULONGLONG change = size > image->size ? size - image->size : image->size - size;
        status = op_start(handle, overlapped, image, FAKE_RESIZE, change, size);
    }
    LeaveCriticalSection(&lock);
    return status;
}

EXPORT DWORD WINAPI ResizeVirtualDisk(HANDLE VirtualDiskHandle, RESIZE_VIRTUAL_DISK_FLAG Flags,
                                      PRESIZE_VIRTUAL_DISK_PARAMETERS Parameters, LPOVERLAPPED Overlapped)
{
    if (!Parameters || Parameters->Version != RESIZE_VIRTUAL_DISK_VERSION_1 ||
        (Flags & ~(RESIZE_VIRTUAL_DISK_FLAG_ALLOW_UNSAFE_VIRTUAL_SIZE)))
        return ERROR_INVALID_PARAMETER; /* SMALLEST_SAFE needs partitions: beyond this double */
    return resize(VirtualDiskHandle, Parameters->Version1.NewSize,
                  (Flags & RESIZE_VIRTUAL_DISK_FLAG_ALLOW_UNSAFE_VIRTUAL_SIZE) != 0, FALSE, Overlapped);
}

EXPORT DWORD WINAPI ExpandVirtualDisk(HANDLE VirtualDiskHandle, EXPAND_VIRTUAL_DISK_FLAG Flags,
                                      PEXPAND_VIRTUAL_DISK_PARAMETERS Parameters, LPOVERLAPPED Overlapped)
{
    if (!Parameters || Parameters->Version != EXPAND_VIRTUAL_DISK_VERSION_1 || Flags > 1)
        return ERROR_INVALID_PARAMETER;
    return resize(VirtualDiskHandle, Parameters->Version1.NewSize, FALSE, TRUE, Overlapped);
}

/* File-system-agnostic compaction of a detached dynamic or differencing
   disk, as the docs allow; a fixed disk has nothing to give back. */
EXPORT DWORD WINAPI CompactVirtualDisk(HANDLE VirtualDiskHandle, COMPACT_VIRTUAL_DISK_FLAG Flags,
                                       PCOMPACT_VIRTUAL_DISK_PARAMETERS Parameters, LPOVERLAPPED Overlapped)
{
    if (Flags > 3 || (Parameters && Parameters->Version != COMPACT_VIRTUAL_DISK_VERSION_1))
        return ERROR_INVALID_PARAMETER;
    EnterCriticalSection(&lock);
    sweep();
    DWORD status;
    struct fake_handle *handle = metaops_handle(VirtualDiskHandle, &status);
    if (handle && (handle->image->subtype == 2 || handle->image->device_id == VIRTUAL_STORAGE_TYPE_DEVICE_ISO))
        status = FAKE_ERROR_VHD_INVALID_TYPE; /* the double's choice of code */
    if (status == ERROR_SUCCESS)
        status = op_start(handle, Overlapped, handle->image, FAKE_COMPACT, handle->image->size / 4, 0);
    LeaveCriticalSection(&lock);
    return status;
}

static DWORD create_operation(struct fake_handle *handle, OVERLAPPED *overlapped)
{
    return op_start(handle, overlapped, handle->image, FAKE_CREATE, handle->image->size, 0);
}

static BOOL ops_running(void)
{
    for (int i = 0; i < FAKE_MAX_OPS; i++)
        if (ops[i].used && ops[i].status == ERROR_IO_PENDING)
            return TRUE;
    return FALSE;
}

static void ops_forget(void)
{
    memset(ops, 0, sizeof ops);
}

static struct fake_handle *metaops_handle(HANDLE value, DWORD *status);

/* The offline changes Set-VHD makes: a parent path (the parent must be a
   registered image; the double keeps no identifiers to compare), a unique
   identifier, a physical sector size (512, or 4096 for VHDX). */
EXPORT DWORD WINAPI SetVirtualDiskInformation(HANDLE VirtualDiskHandle, PSET_VIRTUAL_DISK_INFO Info)
{
    if (!Info)
        return ERROR_INVALID_PARAMETER;
    EnterCriticalSection(&lock);
    sweep();
    DWORD status;
    struct fake_handle *handle = metaops_handle(VirtualDiskHandle, &status);
    struct fake_image *image = handle ? handle->image : NULL;
    if (status != ERROR_SUCCESS)
        ;
    else if (Info->Version == SET_VIRTUAL_DISK_INFO_PARENT_PATH) {
        WCHAR full[FAKE_PATH];
        if (image->subtype != 4)
            status = FAKE_ERROR_VHD_INVALID_TYPE;
        else if (!Info->ParentFilePath || !fully_qualified(Info->ParentFilePath))
            status = ERROR_INVALID_PARAMETER;
        else if (!full_path(Info->ParentFilePath, full) || !find_image(full))
            status = FAKE_ERROR_VHD_PARENT_VHD_NOT_FOUND;
        else {
            memset(image->parents, 0, sizeof image->parents);
            wcsncpy(image->parents, full, FAKE_PATH - 1);
            image->parent_resolved = TRUE;
        }
    } else if (Info->Version == SET_VIRTUAL_DISK_INFO_IDENTIFIER) {
        image->id = Info->UniqueIdentifier;
    } else if (Info->Version == SET_VIRTUAL_DISK_INFO_PHYSICAL_SECTOR_SIZE) {
        ULONG size = Info->VhdPhysicalSectorSize;
        if (size != 512 && size != 4096)
            status = ERROR_INVALID_PARAMETER;
        else if (size == 4096 && image->device_id != VIRTUAL_STORAGE_TYPE_DEVICE_VHDX)
            status = FAKE_ERROR_VHD_INVALID_TYPE; /* the double's choice of code */
        else
            image->physical_sector = size;
    } else {
        status = ERROR_INVALID_PARAMETER; /* other versions: beyond this double */
    }
    LeaveCriticalSection(&lock);
    return status;
}
