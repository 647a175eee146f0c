/*
 * The caller's side of operations inside a served disk's server (see
 * servedop.h).
 */
#define _GNU_SOURCE
#include "servedop.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

#include "errors.h"
#include "fuseattach.h"
#include "job.h"

/* How often a job asks the server how far it is; a cancel does not wait
   for the next time. */
enum { VD_SERVED_OP_POLL_MS = 50 };

DWORD vd_served_op_route(struct vd_handle *handle, const char *needs, struct vd_served **served)
{
    *served = handle->disk->served;
    if (*served)
        return ERROR_SUCCESS;
    bool helper = false;
    int number = vd_handle_attached_loop(handle, &helper);
    if (number < 0)
        return vd_fail(ERROR_NOT_READY, "%s is not attached; %s", handle->image->path, needs);
    /* Served by any process's helper, permanent or not: its socket takes
       the request from any privileged process, as Windows lets any handle
       with access to an attached disk run these. */
    if (helper || vd_served_find(handle->image, &helper, NULL) >= 0)
        return ERROR_SUCCESS;
    return vd_fail(ERROR_NOT_SUPPORTED, "%s is loop-mapped directly (/dev/loop%d), not served; %s",
                   handle->image->path, number, needs);
}

/* vd_served_op_call(), also returning a RESULT's number (its loop field). */
static DWORD vd_served_op_exchange(struct vd_handle *handle, struct vd_served *served, uint16_t type,
                                   const void *payload, size_t length, struct vd_msg_operation_state *state,
                                   int *number)
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
    if (reply_type == VD_MSG_RESULT && vd_msg_parse_result(reply, reply_length, &result, &loop, &detail) == 0) {
        if (number)
            *number = loop;
        return result == ERROR_SUCCESS ? ERROR_SUCCESS : vd_fail(result, "%s", detail);
    }
    return vd_fail(ERROR_GEN_FAILURE, "the helper serving %s answered with a malformed message", handle->image->path);
}

DWORD vd_served_op_call(struct vd_handle *handle, struct vd_served *served, uint16_t type, const void *payload,
                        size_t length, struct vd_msg_operation_state *state)
{
    return vd_served_op_exchange(handle, served, type, payload, length, state, NULL);
}

void vd_served_op_end(struct vd_handle *handle)
{
    /* The last release may end a call that failed (its detail is the
       caller's to read); the cancel's own outcome is nobody's. */
    char detail[512];
    snprintf(detail, sizeof detail, "%s", vd_last_error_detail());
    struct vd_msg_operation_cancel request = {.serial = handle->served_serial};
    vd_disks_lock();
    struct vd_served *served;
    if (vd_served_op_route(handle, "", &served) == ERROR_SUCCESS)
        vd_served_op_call(handle, served, VD_MSG_OPERATION_CANCEL, &request, sizeof request, NULL);
    vd_disks_unlock();
    handle->served_serial = 0;
    vd_clear_detail(); /* ERROR_NOT_FOUND, as a rule: it had ended */
    if (detail[0])
        vd_fail(ERROR_SUCCESS, "%s", detail);
}

struct vd_served_op {
    struct vd_handle *handle;
    enum vd_operation_kind kind;
    const char *name;
    bool own;        /* through this process's channel (else the permanent socket) */
    uint32_t serial; /* the server's number of it (0: a server too old to say) */
};

/* Calls the server as vd_served_op_call() does, finding the way anew: an own
   attachment detached meanwhile ended the operation with it.  A cancel names
   the operation, so that it never stops one started after this one ended. */
static DWORD vd_served_op_job_call(struct vd_served_op *op, uint16_t type, struct vd_msg_operation_state *state)
{
    struct vd_msg_operation_cancel request = {.serial = op->serial};
    bool named = type == VD_MSG_OPERATION_CANCEL && op->serial;
    vd_disks_lock();
    struct vd_served *served = op->handle->disk->served;
    DWORD status = op->own && !served
                       ? vd_fail(ERROR_OPERATION_ABORTED, "%s was detached; %s ended with it",
                                 op->handle->image->path, op->name)
                       : vd_served_op_call(op->handle, op->own ? served : NULL, type, named ? &request : NULL,
                                           named ? sizeof request : 0, state);
    vd_disks_unlock();
    return status;
}

static DWORD vd_served_op_work(struct vd_job *job, void *context)
{
    struct vd_served_op *op = context;
    for (;;) {
        if (vd_job_cancelled(job)) {
            DWORD status = vd_served_op_job_call(op, VD_MSG_OPERATION_CANCEL, NULL);
            if (status != ERROR_SUCCESS && status != ERROR_NOT_FOUND)
                return status;
            /* The server's own outcome when it had ended first. */
            struct vd_msg_operation_state state;
            if (status == ERROR_NOT_FOUND && vd_served_op_job_call(op, VD_MSG_OPERATION_STATUS, &state) ==
                                                 ERROR_SUCCESS && state.kind == op->kind &&
                state.status != ERROR_IO_PENDING && state.status != ERROR_OPERATION_ABORTED) {
                vd_job_set_total(job, state.total);
                __atomic_store_n(&job->done, state.done, __ATOMIC_RELAXED);
                return state.status;
            }
            return vd_fail(ERROR_OPERATION_ABORTED, "%s of %s was cancelled", op->name, op->handle->image->path);
        }
        struct vd_msg_operation_state state;
        DWORD status = vd_served_op_job_call(op, VD_MSG_OPERATION_STATUS, &state);
        if (status != ERROR_SUCCESS)
            return status;
        if (state.kind != op->kind)
            return vd_fail(ERROR_GEN_FAILURE, "the server of %s no longer knows of %s", op->handle->image->path,
                           op->name);
        vd_job_set_total(job, state.total);
        __atomic_store_n(&job->done, state.done, __ATOMIC_RELAXED);
        if (state.status != ERROR_IO_PENDING)
            return state.status; /* the detail was recorded by vd_served_op_call */
        vd_job_wait_cancel(job, VD_SERVED_OP_POLL_MS);
    }
}

static void vd_served_op_free(void *context, DWORD status)
{
    free(context);
}

DWORD vd_served_op_run(struct vd_handle *handle, OVERLAPPED *overlapped, enum vd_operation_kind kind,
                       const void *payload, size_t length, const char *needs, const char *name)
{
    struct vd_served_op *op = calloc(1, sizeof *op);
    if (!op)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating an operation's job");
    op->handle = handle;
    op->kind = kind;
    op->name = name;
    vd_disks_lock();
    struct vd_served *served;
    DWORD status = vd_served_op_route(handle, needs, &served);
    int number = -1;
    if (status == ERROR_SUCCESS)
        status = vd_served_op_exchange(handle, served, VD_MSG_OPERATION_START, payload, length, NULL, &number);
    if (status == ERROR_SUCCESS && number > 0)
        handle->served_serial = op->serial = (uint32_t)number;
    op->own = served != NULL;
    vd_disks_unlock();
    if (status != ERROR_SUCCESS) {
        free(op);
        return status;
    }
    if (!overlapped) {
        struct vd_job job;
        vd_job_init_sync(&job);
        status = vd_served_op_work(&job, op);
        free(op);
        return status;
    }
    struct vd_msg_operation_cancel request = {.serial = op->serial};
    status = vd_job_start(handle, overlapped, vd_served_op_work, op, vd_served_op_free); /* op freed on failure */
    if (status != ERROR_IO_PENDING) {
        /* Started in the server, but nobody would follow it: stop it. */
        char detail[512];
        snprintf(detail, sizeof detail, "%s", vd_last_error_detail());
        vd_disks_lock();
        if (vd_served_op_route(handle, needs, &served) == ERROR_SUCCESS)
            vd_served_op_call(handle, served, VD_MSG_OPERATION_CANCEL, request.serial ? &request : NULL,
                              request.serial ? sizeof request : 0, NULL);
        vd_disks_unlock();
        vd_fail(status, "%s", detail);
    }
    return status;
}
