/*
 * The operations thread of a server process (see serveops.h).
 */
#define _GNU_SOURCE
#include "serveops.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "errors.h"
#include "image.h"
#include "servecompact.h"
#include "serveproto.h"
#include "servemirror.h"

struct vd_serve_ops {
    struct vd_fuse_server *server;
    int channel;
    /* Held while a request is answered and while the session's end ends
       the operation: the two never overlap. */
    pthread_mutex_t mutex;
    bool ended;
    enum vd_operation_kind kind;
    uint32_t serial; /* the last START's number (serveproto.h), from 1 */
    struct vd_mirror *mirror; /* kind MIRROR */
    struct vd_serve_compact *compact; /* kind COMPACT */
};

static bool vd_ops_active(const struct vd_serve_ops *ops)
{
    return (ops->kind == VD_OPERATION_MIRROR && vd_mirror_active(ops->mirror)) ||
           (ops->kind == VD_OPERATION_COMPACT && vd_serve_compact_active(ops->compact));
}

/* Ends the last operation. */
static void vd_ops_forget(struct vd_serve_ops *ops)
{
    if (ops->kind == VD_OPERATION_MIRROR)
        vd_mirror_free(ops->mirror);
    if (ops->kind == VD_OPERATION_COMPACT)
        vd_serve_compact_free(ops->compact);
    ops->mirror = NULL;
    ops->compact = NULL;
    ops->kind = VD_OPERATION_NONE;
}

static DWORD vd_ops_start(struct vd_serve_ops *ops, const char *payload, size_t length)
{
    struct vd_msg_operation_start request;
    if (length <= sizeof request || payload[length - 1] != '\0')
        return vd_fail(ERROR_INVALID_PARAMETER, "a malformed operation request");
    memcpy(&request, payload, sizeof request);
    const char *path = payload + sizeof request;
    if (vd_ops_active(ops))
        return vd_fail(ERROR_BUSY, "an operation is already running on this disk");
    if (request.kind != VD_OPERATION_MIRROR && request.kind != VD_OPERATION_COMPACT)
        return vd_fail(ERROR_NOT_SUPPORTED, "operation kind %u is not one this server runs", (unsigned)request.kind);
    vd_ops_forget(ops);
    DWORD status;
    if (request.kind == VD_OPERATION_COMPACT) {
        struct vd_serve_compact *compact = NULL;
        status = vd_serve_compact_start(ops->server, request.flags, &compact);
        if (status == ERROR_SUCCESS) {
            ops->kind = VD_OPERATION_COMPACT;
            ops->compact = compact;
            ops->serial++;
        }
        return status;
    }
    struct vd_mirror *mirror;
    status = vd_mirror_start(ops->server, request.flags, request.mode, path, &mirror);
    if (status == ERROR_SUCCESS) {
        ops->kind = VD_OPERATION_MIRROR;
        ops->mirror = mirror;
        ops->serial++;
    }
    return status;
}

static DWORD vd_ops_cancel(struct vd_serve_ops *ops, const char *payload, size_t length)
{
    struct vd_msg_operation_cancel request;
    if (length != 0 && length != sizeof request)
        return vd_fail(ERROR_INVALID_PARAMETER, "a malformed cancel request");
    if (length) {
        memcpy(&request, payload, sizeof request);
        if (request.serial != ops->serial || ops->kind == VD_OPERATION_NONE)
            return vd_fail(ERROR_NOT_FOUND, "operation %u has ended already", (unsigned)request.serial);
    }
    return ops->kind == VD_OPERATION_MIRROR    ? vd_mirror_cancel(ops->mirror)
           : ops->kind == VD_OPERATION_COMPACT ? vd_serve_compact_cancel(ops->compact)
                                               : vd_fail(ERROR_NOT_FOUND, "no operation is running");
}

static void vd_ops_answer(struct vd_serve_ops *ops, uint16_t type, const char *payload, size_t length)
{
    vd_clear_detail();
    if (type == VD_MSG_OPERATION_STATUS && length == 0) {
        struct vd_msg_operation_state state = {.kind = VD_OPERATION_NONE, .status = ERROR_SUCCESS};
        char detail[512] = "";
        if (ops->kind == VD_OPERATION_MIRROR)
            vd_mirror_state(ops->mirror, &state, detail, sizeof detail);
        else if (ops->kind == VD_OPERATION_COMPACT)
            vd_serve_compact_state(ops->compact, &state, detail, sizeof detail);
        vd_msg_send_state(ops->channel, &state, detail);
        return;
    }
    DWORD status;
    int handover = -1, number = -1;
    if (ops->ended)
        status = vd_fail(ERROR_NOT_READY, "the disk's session has ended");
    else if (type == VD_MSG_OPERATION_START) {
        status = vd_ops_start(ops, payload, length);
        if (status == ERROR_SUCCESS)
            number = (int)ops->serial;
    } else if (type == VD_MSG_OPERATION_CANCEL)
        status = vd_ops_cancel(ops, payload, length);
    else if (type == VD_MSG_BREAK_MIRROR && length == 0)
        status = ops->kind == VD_OPERATION_MIRROR ? vd_mirror_break(ops->mirror, &handover)
                                                  : vd_fail(ERROR_VHD_INVALID_STATE, "the disk is not mirrored");
    else
        status = vd_fail(ERROR_INVALID_PARAMETER, "not a request the server takes");
    vd_msg_send_result_passing(ops->channel, status, number, status == ERROR_SUCCESS ? "" : vd_last_error_detail(),
                               handover);
    if (handover >= 0)
        close(handover);
}

static void *vd_ops_thread(void *context)
{
    struct vd_serve_ops *ops = context;
    for (;;) {
        uint16_t type;
        char payload[VD_MSG_MAX_PAYLOAD];
        size_t length;
        int error = vd_msg_recv(ops->channel, -1, &type, payload, sizeof payload, &length, NULL);
        if (error == EPROTO) {
            vd_msg_send_result(ops->channel, ERROR_INVALID_PARAMETER, -1, "a malformed request");
            continue;
        }
        if (error)
            return NULL; /* the supervisor is gone; the session ends with it */
        pthread_mutex_lock(&ops->mutex);
        vd_ops_answer(ops, type, payload, length);
        pthread_mutex_unlock(&ops->mutex);
    }
}

/* The session ended: no operation may use the image any more. */
static void vd_ops_end(void *context)
{
    struct vd_serve_ops *ops = context;
    pthread_mutex_lock(&ops->mutex);
    ops->ended = true;
    vd_ops_forget(ops); /* stops a compaction before the image closes */
    pthread_mutex_unlock(&ops->mutex);
}

DWORD vd_serve_ops_start(struct vd_fuse_server *server, int channel)
{
    struct vd_serve_ops *ops = calloc(1, sizeof *ops);
    if (!ops) {
        close(channel);
        return vd_fail(ERROR_OUTOFMEMORY, "allocating the operations thread");
    }
    ops->server = server;
    ops->channel = channel;
    pthread_mutex_init(&ops->mutex, NULL);
    vd_fuse_set_end_hook(server, vd_ops_end, ops);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    int error = pthread_create(&thread, &attributes, vd_ops_thread, ops);
    pthread_attr_destroy(&attributes);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (error) {
        /* The record stays, owned by the end hook: the server runs on
           without operations. */
        return vd_fail_errno(error, "starting the operations thread");
    }
    return ERROR_SUCCESS;
}
