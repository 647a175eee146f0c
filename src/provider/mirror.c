/*
 * MirrorVirtualDisk and BreakMirrorVirtualDisk: the caller's side.  The
 * mirroring itself runs in the disk's server (servemirror.h), which owns the
 * image; here a request starts it, and a job follows it (servedop.h, which
 * also says which disks can be reached).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "errors.h"
#include "handles.h"
#include "job.h"
#include "servedop.h"
#include "serveproto.h"
#include "utf16.h"

#define VD_MIRROR_FLAGS_KNOWN 0x0000000Fu

/* What a mirror needs, for the refusals of vd_served_op_route(). */
#define VD_MIRROR_NEEDS "mirroring runs in a served disk's server (dynamic or differencing images)"

/* The permissions CreateVirtualDisk would give a new file here (0644 and
   this process's umask), read without changing the umask (umask(2) would,
   for every thread at once). */
static uint32_t vd_new_file_mode(void)
{
    unsigned mask = 022;
    FILE *status = fopen("/proc/self/status", "re");
    if (status) {
        char line[128];
        while (fgets(line, sizeof line, status))
            if (sscanf(line, "Umask: %o", &mask) == 1)
                break;
        fclose(status);
    }
    return 0644u & ~mask;
}

/* The target as an absolute path: the server runs in "/". */
static DWORD vd_mirror_target(const WCHAR *path, char **out)
{
    char *text = vd_utf16_to_utf8(path);
    if (!text)
        return vd_fail(ERROR_INVALID_PARAMETER, "MirrorVirtualDiskPath is not valid UTF-16");
    if (!text[0]) {
        free(text);
        return vd_fail(ERROR_INVALID_PARAMETER, "MirrorVirtualDiskPath is empty");
    }
    if (text[0] == '/') {
        *out = text;
        return ERROR_SUCCESS;
    }
    char *cwd = getcwd(NULL, 0);
    char *absolute = NULL;
    if (!cwd || asprintf(&absolute, "%s/%s", cwd, text) < 0)
        absolute = NULL;
    free(cwd);
    free(text);
    if (!absolute)
        return vd_fail(ERROR_OUTOFMEMORY, "making the mirror path absolute");
    *out = absolute;
    return ERROR_SUCCESS;
}

/* The flags this provider does not take, each with why: refused rather
   than ignored, since a caller who asks for one expects its effect. */
static DWORD vd_mirror_refuse_flags(MIRROR_VIRTUAL_DISK_FLAG flags)
{
    if (flags & MIRROR_VIRTUAL_DISK_FLAG_SKIP_MIRROR_ACTIVATION)
        return vd_fail(ERROR_NOT_SUPPORTED, "MIRROR_VIRTUAL_DISK_FLAG_SKIP_MIRROR_ACTIVATION is not supported: "
                                            "Microsoft documents no meaning for it, so none is guessed");
    if (flags & MIRROR_VIRTUAL_DISK_FLAG_ENABLE_SMB_COMPRESSION)
        return vd_fail(ERROR_NOT_SUPPORTED, "MIRROR_VIRTUAL_DISK_FLAG_ENABLE_SMB_COMPRESSION is not supported: it "
                                            "compresses a copy sent over SMB, and this provider writes the target "
                                            "through the local file system");
    return vd_fail(ERROR_NOT_SUPPORTED, "MIRROR_VIRTUAL_DISK_FLAG_IS_LIVE_MIGRATION is not supported: it is Hyper-V's "
                                        "live migration of a virtual machine's storage, which has no counterpart "
                                        "here");
}

DWORD WINAPI MirrorVirtualDisk(HANDLE VirtualDiskHandle, MIRROR_VIRTUAL_DISK_FLAG Flags,
                               MIRROR_VIRTUAL_DISK_PARAMETERS *Parameters, OVERLAPPED *Overlapped)
{
    vd_clear_detail();
    struct vd_handle *handle = vd_handle_acquire(VirtualDiskHandle);
    if (!handle)
        return vd_handle_refuse(VirtualDiskHandle, ERROR_INVALID_HANDLE);
    DWORD status = ERROR_SUCCESS;
    if (!Overlapped)
        status = vd_fail(ERROR_INVALID_PARAMETER, "MirrorVirtualDisk requires an OVERLAPPED (it runs asynchronously)");
    else if (!Parameters || Parameters->Version != MIRROR_VIRTUAL_DISK_VERSION_1)
        status = vd_fail(ERROR_INVALID_PARAMETER, "Parameters must be MIRROR_VIRTUAL_DISK_VERSION_1");
    else if (!Parameters->Version1.MirrorVirtualDiskPath)
        status = vd_fail(ERROR_INVALID_PARAMETER, "MirrorVirtualDiskPath is required");
    else if (Flags & ~VD_MIRROR_FLAGS_KNOWN)
        status = vd_fail(ERROR_INVALID_PARAMETER, "mirror flags 0x%08x include unknown bits", (unsigned)Flags);
    else if (Flags & ~(MIRROR_VIRTUAL_DISK_FLAG)MIRROR_VIRTUAL_DISK_FLAG_EXISTING_FILE)
        status = vd_mirror_refuse_flags(Flags);
    char *target = NULL;
    if (status == ERROR_SUCCESS)
        status = vd_mirror_target(Parameters->Version1.MirrorVirtualDiskPath, &target);
    char payload[VD_MSG_MAX_PAYLOAD];
    struct vd_msg_operation_start request = {.kind = VD_OPERATION_MIRROR, .flags = Flags,
                                             .mode = vd_new_file_mode()};
    size_t length = 0;
    if (status == ERROR_SUCCESS) {
        length = sizeof request + strlen(target) + 1;
        if (length > sizeof payload)
            status = vd_fail(ERROR_FILENAME_EXCED_RANGE, "%s: the path is too long", target);
        else {
            memcpy(payload, &request, sizeof request);
            memcpy(payload + sizeof request, target, length - sizeof request);
        }
    }
    if (status == ERROR_SUCCESS)
        status = vd_job_check_overlapped(handle, Overlapped);
    if (status == ERROR_SUCCESS)
        status = vd_served_op_run(handle, Overlapped, VD_OPERATION_MIRROR, payload, length, VD_MIRROR_NEEDS,
                                  "the mirror");
    free(target);
    vd_handle_release(handle);
    return status;
}

DWORD WINAPI BreakMirrorVirtualDisk(HANDLE VirtualDiskHandle)
{
    vd_clear_detail();
    struct vd_handle *handle = vd_handle_acquire(VirtualDiskHandle);
    if (!handle)
        return vd_handle_refuse(VirtualDiskHandle, ERROR_INVALID_HANDLE);
    vd_disks_lock();
    struct vd_served *served;
    DWORD status = vd_served_op_route(handle, VD_MIRROR_NEEDS, &served);
    if (status == ERROR_SUCCESS)
        status = vd_served_op_call(handle, served, VD_MSG_BREAK_MIRROR, NULL, 0, NULL);
    /* The disk runs on the target now, and its helper holds the target's
       attach claim: this process's claim on the source goes (the handle's
       own claims on the file it opened last as long as the handle). */
    if (status == ERROR_SUCCESS && served && handle->disk->attach_claim >= 0) {
        close(handle->disk->attach_claim);
        handle->disk->attach_claim = -1;
    }
    vd_disks_unlock();
    vd_handle_release(handle);
    return status;
}
