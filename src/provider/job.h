/*
 * Long operations (merge, create with a source or fixed, resize, expand):
 * progress, cancellation, and running them asynchronously for an OVERLAPPED.
 *
 * Promises:
 *   - An operation's work function sees one struct vd_job whether it runs
 *     synchronously (on the caller's stack) or on a thread of its own: it
 *     reports progress with vd_job_set_total()/vd_job_advance() and asks
 *     vd_job_cancelled() between units of work, answering
 *     ERROR_OPERATION_ABORTED (as Windows answers a cancelled operation)
 *     once it has left the image consistent.
 *   - vd_job_start() either fails without starting anything (and without
 *     touching the OVERLAPPED or its event) or returns ERROR_IO_PENDING; the
 *     job then holds a reference to its handle until it ends, so a
 *     CloseHandle meanwhile cancels it but never frees what it uses.
 *   - When a job ends its status is stored before the OVERLAPPED's Internal
 *     field and the event are set, so whoever wakes on the event reads the
 *     final status from GetVirtualDiskOperationProgress.
 *   - At most one job per (handle, OVERLAPPED); a finished job's answer stays
 *     readable until the OVERLAPPED is reused on that handle or the handle
 *     is freed.
 *
 * The event: on Linux an OVERLAPPED's hEvent is an eventfd descriptor cast to
 * HANDLE (NULL: no event).  An eventfd is what poll/select/asyncio can wait
 * on, it needs no new API (CreateEventW here makes one, and callers may make
 * their own), and its counter behaves as a manual-reset event: "signalled"
 * while non-zero, reset by reading it.  Descriptor 0 cannot be used, since
 * it reads as NULL.
 */
#ifndef VD_PROVIDER_JOB_H
#define VD_PROVIDER_JOB_H

#include <stdbool.h>
#include <stdint.h>

#include "virtdisk.h"

struct vd_handle;

struct vd_job {
    uint64_t done;           /* atomic: CurrentValue */
    uint64_t total;          /* atomic: CompletionValue */
    uint32_t cancel;         /* atomic, 0 or 1: set by CancelIoEx or CloseHandle
                                (a futex word: vd_job_wait_cancel sleeps on it) */
    DWORD status;            /* atomic: ERROR_IO_PENDING until the end */
    bool ended;              /* atomic: the thread no longer uses the record */
    char detail[512];        /* the job thread's vd_last_error_detail() */
    /* Asynchronous jobs only. */
    struct vd_handle *handle;
    OVERLAPPED *overlapped;
    int event_fd;            /* -1: no event */
    DWORD (*work)(struct vd_job *job, void *context);
    void *context;
    void (*free_context)(void *context, DWORD status);
    struct vd_job *next;     /* in the handle's list, under the jobs lock */
};

/* A job for a synchronous call: no thread, no event. */
void vd_job_init_sync(struct vd_job *job);

static inline void vd_job_set_total(struct vd_job *job, uint64_t total)
{
    __atomic_store_n(&job->total, total, __ATOMIC_RELAXED);
}

static inline void vd_job_advance(struct vd_job *job, uint64_t amount)
{
    __atomic_add_fetch(&job->done, amount, __ATOMIC_RELAXED);
}

static inline bool vd_job_cancelled(const struct vd_job *job)
{
    return __atomic_load_n(&job->cancel, __ATOMIC_RELAXED);
}

/* Sleeps up to milliseconds or until the job is cancelled, whichever comes
   first; true when cancelled.  For work that waits on something else (a
   server's progress): a cancel then acts at once, not a poll period later. */
bool vd_job_wait_cancel(struct vd_job *job, int milliseconds);

/* Checks an OVERLAPPED before an asynchronous call commits to anything:
   its event must be NULL or an eventfd of this process, and no job of this
   handle may be running with it. */
DWORD vd_job_check_overlapped(struct vd_handle *handle, OVERLAPPED *overlapped);

/* Runs work(job, context) on a new thread for handle and overlapped;
   free_context(context, final status), when not NULL, is called on that
   thread after the work (also when starting fails: then with that error).
   Returns ERROR_IO_PENDING or an error. */
DWORD vd_job_start(struct vd_handle *handle, OVERLAPPED *overlapped,
                   DWORD (*work)(struct vd_job *job, void *context), void *context,
                   void (*free_context)(void *context, DWORD status));

/* Whether a job of this handle is still running. */
bool vd_job_running(struct vd_handle *handle);

/* Cancels the handle's running jobs (all of them when overlapped is NULL);
   false when none matched. */
bool vd_job_cancel(struct vd_handle *handle, OVERLAPPED *overlapped);

/* Frees the job records of a handle being freed (no job is running then:
   each holds a reference to the handle). */
void vd_job_free_all(struct vd_handle *handle);

/* CloseHandle of an event CreateEventW made: false when value is none. */
bool vd_event_close(HANDLE value);

#endif
