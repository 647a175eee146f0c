/*
 * MirrorVirtualDisk and BreakMirrorVirtualDisk: the caller's side.  The
 * mirroring itself runs in the disk's server (servemirror.h), which owns the
 * image; here a request starts it, and an asynchronous job (job.h) follows
 * its progress by asking the server, and cancels it when the caller does.
 *
 * Which disks: an attached, served one (dynamic, differencing, non-contiguous
 * VHDX), through this process's own channel to its helper (attached here
 * without PERMANENT_LIFETIME) or the helper's socket (attached permanently,
 * or by another process).  A disk that is not attached answers
 * ERROR_NOT_READY; one loop-mapped directly (fixed VHD, contiguous VHDX)
 * answers ERROR_NOT_SUPPORTED.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "errors.h"
#include "fuseattach.h"
#include "handles.h"
#include "job.h"
#include "serveproto.h"
#include "utf16.h"

#define VD_MIRROR_FLAGS_KNOWN 0x0000000Fu

/* How often a job asks the server how far it is. */
enum { VD_MIRROR_POLL_MS = 50 };

/* Finds the way to the disk's server: *served is this process's channel,
   or NULL for a permanent helper's socket.  Called under vd_disks_lock(). */
static DWORD vd_mirror_route(struct vd_handle *handle, struct vd_served **served)
{
    *served = handle->disk->served;
    if (*served)
        return ERROR_SUCCESS;
    bool helper = false;
    int number = vd_handle_attached_loop(handle, &helper);
    if (number < 0)
        return vd_fail(ERROR_NOT_READY, "%s is not attached; a mirror copies an attached disk", handle->image->path);
    /* Served by any process's helper, permanent or not: its socket takes
       the request from any privileged process, as Windows lets any handle
       with access to an attached disk mirror it. */
    if (helper || vd_served_find(handle->image, &helper) >= 0)
        return ERROR_SUCCESS;
    return vd_fail(ERROR_NOT_SUPPORTED, "%s is loop-mapped directly (/dev/loop%d), not served; mirroring runs "
                                        "in a served disk's server (dynamic or differencing images)",
                   handle->image->path, number);
}

/* One request and its RESULT (or, for STATUS, its state). */
static DWORD vd_mirror_call(struct vd_handle *handle, struct vd_served *served, uint16_t type, const void *payload,
                            size_t length, struct vd_msg_operation_state *state)
{
    uint16_t reply_type;
    char reply[VD_MSG_MAX_PAYLOAD];
    size_t reply_length;
    DWORD status = vd_served_request(served, handle->image, type, payload, length, &reply_type, reply, sizeof reply,
                                     &reply_length);
    if (status != ERROR_SUCCESS)
        return status;
    const char *detail;
    if (state && reply_type == VD_MSG_OPERATION_STATE &&
        vd_msg_parse_state(reply, reply_length, state, &detail) == 0) {
        if (state->status != ERROR_IO_PENDING && state->status != ERROR_SUCCESS)
            vd_fail(state->status, "%s", detail);
        return ERROR_SUCCESS;
    }
    DWORD result;
    int loop;
    if (reply_type == VD_MSG_RESULT && vd_msg_parse_result(reply, reply_length, &result, &loop, &detail) == 0)
        return result == ERROR_SUCCESS ? ERROR_SUCCESS : vd_fail(result, "%s", detail);
    return vd_fail(ERROR_GEN_FAILURE, "the helper serving %s answered with a malformed message", handle->image->path);
}

struct vd_mirror_job {
    struct vd_handle *handle;
    bool own; /* through this process's channel (else the permanent socket) */
};

/* Calls the server as vd_mirror_call() does, finding the way anew: an own
   attachment detached meanwhile ended the mirror with it. */
static DWORD vd_mirror_job_call(struct vd_mirror_job *j, uint16_t type, struct vd_msg_operation_state *state)
{
    vd_disks_lock();
    struct vd_served *served = j->handle->disk->served;
    DWORD status = j->own && !served
                       ? vd_fail(ERROR_OPERATION_ABORTED, "%s was detached; the mirror ended with it",
                                 j->handle->image->path)
                       : vd_mirror_call(j->handle, j->own ? served : NULL, type, NULL, 0, state);
    vd_disks_unlock();
    return status;
}

static DWORD vd_mirror_work(struct vd_job *job, void *context)
{
    struct vd_mirror_job *j = context;
    for (;;) {
        if (vd_job_cancelled(job)) {
            DWORD status = vd_mirror_job_call(j, VD_MSG_OPERATION_CANCEL, NULL);
            if (status != ERROR_SUCCESS && status != ERROR_NOT_FOUND)
                return status;
            return vd_fail(ERROR_OPERATION_ABORTED, "the mirror of %s was cancelled", j->handle->image->path);
        }
        struct vd_msg_operation_state state;
        DWORD status = vd_mirror_job_call(j, VD_MSG_OPERATION_STATUS, &state);
        if (status != ERROR_SUCCESS)
            return status;
        if (state.kind != VD_OPERATION_MIRROR)
            return vd_fail(ERROR_GEN_FAILURE, "the server of %s no longer knows of the mirror",
                           j->handle->image->path);
        vd_job_set_total(job, state.total);
        __atomic_store_n(&job->done, state.done, __ATOMIC_RELAXED);
        if (state.status != ERROR_IO_PENDING)
            return state.status; /* the detail was recorded by vd_mirror_call */
        poll(NULL, 0, VD_MIRROR_POLL_MS);
    }
}

static void vd_mirror_job_free(void *context, DWORD status)
{
    free(context);
}

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
    struct vd_mirror_job *j = NULL;
    if (status == ERROR_SUCCESS && !(j = calloc(1, sizeof *j)))
        status = vd_fail(ERROR_OUTOFMEMORY, "allocating a mirror job");
    if (status == ERROR_SUCCESS) {
        vd_disks_lock();
        struct vd_served *served;
        status = vd_mirror_route(handle, &served);
        if (status == ERROR_SUCCESS)
            status = vd_mirror_call(handle, served, VD_MSG_OPERATION_START, payload, length, NULL);
        j->own = served != NULL;
        vd_disks_unlock();
    }
    free(target);
    if (status == ERROR_SUCCESS) {
        j->handle = handle;
        status = vd_job_start(handle, Overlapped, vd_mirror_work, j, vd_mirror_job_free);
        if (status != ERROR_IO_PENDING) {
            /* Started in the server, but nobody would follow it: stop it. */
            char detail[512];
            snprintf(detail, sizeof detail, "%s", vd_last_error_detail());
            vd_disks_lock();
            struct vd_served *served;
            if (vd_mirror_route(handle, &served) == ERROR_SUCCESS)
                vd_mirror_call(handle, served, VD_MSG_OPERATION_CANCEL, NULL, 0, NULL);
            vd_disks_unlock();
            vd_fail(status, "%s", detail);
        }
    } else {
        free(j);
    }
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
    DWORD status = vd_mirror_route(handle, &served);
    if (status == ERROR_SUCCESS)
        status = vd_mirror_call(handle, served, VD_MSG_BREAK_MIRROR, NULL, 0, NULL);
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
