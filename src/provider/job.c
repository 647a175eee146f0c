/*
 * Long operations and asynchronous calls (job.h), and the kernel32 calls
 * that go with them on Linux: GetVirtualDiskOperationProgress, CancelIoEx,
 * CreateEventW and WaitForSingleObject.
 */
#define _GNU_SOURCE
#include "job.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/futex.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "errors.h"
#include "handles.h"

/* Windows keeps an NTSTATUS in OVERLAPPED.Internal; STATUS_PENDING is what
   HasOverlappedIoCompleted() looks for. */
#define VD_STATUS_PENDING 0x103

/* Guards every handle's job list and the event registry. */
static pthread_mutex_t vd_jobs_mutex = PTHREAD_MUTEX_INITIALIZER;

void vd_job_init_sync(struct vd_job *job)
{
    memset(job, 0, sizeof *job);
    job->status = ERROR_IO_PENDING;
    job->event_fd = -1;
}

static DWORD vd_job_status(const struct vd_job *job)
{
    return __atomic_load_n(&job->status, __ATOMIC_ACQUIRE);
}

/* ---- events ------------------------------------------------------------- */

/* Events CreateEventW made, so CloseHandle can tell them from other
   descriptors and WaitForSingleObject knows an auto-reset one. */
struct vd_event {
    int fd;
    bool manual_reset;
    struct vd_event *next;
};
static struct vd_event *vd_events;

static bool vd_is_eventfd(int fd)
{
    char link[64], target[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0)
        return false;
    target[n] = 0;
    return strcmp(target, "anon_inode:[eventfd]") == 0;
}

/* The descriptor behind an event HANDLE, or -1 when it is not an eventfd. */
static int vd_event_fd(HANDLE event)
{
    intptr_t value = (intptr_t)event;
    if (value <= 0 || value > INT_MAX || !vd_is_eventfd((int)value))
        return -1;
    return (int)value;
}

/* Resets an event: reads its counter to zero without ever blocking, whether
   or not the descriptor was opened non-blocking. */
static void vd_event_reset(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    uint64_t value;
    while (poll(&p, 1, 0) == 1 && (p.revents & POLLIN))
        if (read(fd, &value, sizeof value) != sizeof value)
            break;
}

static void vd_event_signal(int fd)
{
    uint64_t one = 1;
    /* Cannot fail short of a counter at 2^64 - 2, which only a caller
       writing to the event itself could reach. */
    if (write(fd, &one, sizeof one) != sizeof one)
        return;
}

HANDLE WINAPI CreateEventW(PVOID lpEventAttributes, BOOL bManualReset, BOOL bInitialState, const WCHAR *lpName)
{
    vd_clear_detail();
    if (lpEventAttributes || lpName) {
        vd_set_last_error(vd_fail(ERROR_NOT_SUPPORTED, "events with security attributes or a name are not "
                                                       "supported on Linux"));
        return NULL;
    }
    int fd = eventfd(bInitialState ? 1 : 0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd == 0) {
        /* Descriptor 0 would read as NULL, "no event". */
        int moved = fcntl(fd, F_DUPFD_CLOEXEC, 1);
        close(fd);
        fd = moved;
    }
    struct vd_event *event = fd >= 0 ? malloc(sizeof *event) : NULL;
    if (!event) {
        vd_set_last_error(fd < 0 ? vd_fail_errno(errno, "creating an eventfd") : vd_fail(ERROR_OUTOFMEMORY, "event"));
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    event->fd = fd;
    event->manual_reset = bManualReset != 0;
    pthread_mutex_lock(&vd_jobs_mutex);
    event->next = vd_events;
    vd_events = event;
    pthread_mutex_unlock(&vd_jobs_mutex);
    return (HANDLE)(intptr_t)fd;
}

bool vd_event_close(HANDLE value)
{
    pthread_mutex_lock(&vd_jobs_mutex);
    struct vd_event *found = NULL;
    for (struct vd_event **link = &vd_events; *link; link = &(*link)->next) {
        if ((HANDLE)(intptr_t)(*link)->fd == value) {
            found = *link;
            *link = found->next;
            break;
        }
    }
    pthread_mutex_unlock(&vd_jobs_mutex);
    if (!found)
        return false;
    close(found->fd);
    free(found);
    return true;
}

#define VD_WAIT_FAILED 0xFFFFFFFFu
#define VD_INFINITE 0xFFFFFFFFu

DWORD WINAPI WaitForSingleObject(HANDLE hHandle, DWORD dwMilliseconds)
{
    vd_clear_detail();
    int fd = vd_event_fd(hHandle);
    if (fd < 0) {
        vd_set_last_error(vd_fail(ERROR_INVALID_HANDLE, "only events (eventfd descriptors) can be waited for "
                                                        "on Linux"));
        return VD_WAIT_FAILED;
    }
    bool auto_reset = false;
    pthread_mutex_lock(&vd_jobs_mutex);
    for (struct vd_event *event = vd_events; event; event = event->next)
        if (event->fd == fd)
            auto_reset = !event->manual_reset;
    pthread_mutex_unlock(&vd_jobs_mutex);
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int timeout = dwMilliseconds == VD_INFINITE ? -1
                      : dwMilliseconds > INT_MAX    ? INT_MAX
                                                    : (int)dwMilliseconds;
        int n = poll(&p, 1, timeout);
        if (n < 0 && errno == EINTR)
            continue; /* the timeout restarts: waits are never shortened */
        if (n < 0) {
            vd_set_last_error(vd_fail_errno(errno, "waiting for an event"));
            return VD_WAIT_FAILED;
        }
        if (n == 0)
            return WAIT_TIMEOUT;
        if (!auto_reset)
            return 0; /* WAIT_OBJECT_0 */
        /* An auto-reset event is ours and non-blocking: another waiter may
           have taken the signal first, then wait again. */
        uint64_t value;
        if (read(fd, &value, sizeof value) == sizeof value)
            return 0;
    }
}

/* ---- jobs --------------------------------------------------------------- */

/* Called with vd_jobs_mutex held. */
static struct vd_job *vd_job_find(struct vd_handle *handle, const OVERLAPPED *overlapped)
{
    for (struct vd_job *job = handle->jobs; job; job = job->next)
        if (job->overlapped == overlapped)
            return job;
    return NULL;
}

DWORD vd_job_check_overlapped(struct vd_handle *handle, OVERLAPPED *overlapped)
{
    if (overlapped->hEvent && vd_event_fd(overlapped->hEvent) < 0)
        return vd_fail(ERROR_INVALID_HANDLE, "OVERLAPPED.hEvent %lld is not an eventfd of this process (Linux "
                                             "represents events as eventfd descriptors; CreateEventW makes one)",
                       (long long)(intptr_t)overlapped->hEvent);
    pthread_mutex_lock(&vd_jobs_mutex);
    struct vd_job *job = vd_job_find(handle, overlapped);
    bool running = job && vd_job_status(job) == ERROR_IO_PENDING;
    /* A job whose status is final is at most a few stores away from
       letting go of its record (vd_job_thread): a caller that saw the
       status and reuses the OVERLAPPED at once waits for that. */
    while (job && !running && !__atomic_load_n(&job->ended, __ATOMIC_ACQUIRE)) {
        pthread_mutex_unlock(&vd_jobs_mutex);
        sched_yield();
        pthread_mutex_lock(&vd_jobs_mutex);
        job = vd_job_find(handle, overlapped);
    }
    pthread_mutex_unlock(&vd_jobs_mutex);
    if (running)
        return vd_fail(ERROR_INVALID_PARAMETER, "this OVERLAPPED is in use by an operation still running on the "
                                                "handle");
    return ERROR_SUCCESS;
}

static void *vd_job_thread(void *argument)
{
    struct vd_job *job = argument;
    DWORD status = job->work(job, job->context);
    if (job->free_context)
        job->free_context(job->context, status);
    /* The detail lives in this thread; the caller asks from its own. */
    snprintf(job->detail, sizeof job->detail, "%s", status == ERROR_SUCCESS ? "" : vd_last_error_detail());
    /* Once ended is set the record may be replaced (the OVERLAPPED reused)
       or freed with the handle: keep what is still needed. */
    struct vd_handle *handle = job->handle;
    int event_fd = job->event_fd;
    OVERLAPPED *overlapped = job->overlapped;
    /* The order job.h promises: status, then Internal, then the event.  The
       handle is let go of before the event: a caller woken by it that closes
       the handle ends the handle's sharing claims (share.h) at once. */
    __atomic_store_n(&job->status, status, __ATOMIC_RELEASE);
    __atomic_store_n(&overlapped->Internal, (ULONG_PTR)status, __ATOMIC_RELEASE);
    __atomic_store_n(&job->ended, true, __ATOMIC_RELEASE);
    vd_handle_release(handle);
    if (event_fd >= 0) {
        vd_event_signal(event_fd);
        close(event_fd);
    }
    return NULL;
}

DWORD vd_job_start(struct vd_handle *handle, OVERLAPPED *overlapped,
                   DWORD (*work)(struct vd_job *job, void *context), void *context,
                   void (*free_context)(void *context, DWORD status))
{
    DWORD status = vd_job_check_overlapped(handle, overlapped);
    struct vd_job *job = NULL;
    if (status == ERROR_SUCCESS) {
        job = malloc(sizeof *job);
        if (!job)
            status = vd_fail(ERROR_OUTOFMEMORY, "allocating a job");
    }
    if (status == ERROR_SUCCESS) {
        vd_job_init_sync(job);
        job->handle = handle;
        job->overlapped = overlapped;
        job->work = work;
        job->context = context;
        job->free_context = free_context;
        /* Our own descriptor: the caller's number may be closed and reused
           before the job ends. */
        if (overlapped->hEvent) {
            job->event_fd = fcntl(vd_event_fd(overlapped->hEvent), F_DUPFD_CLOEXEC, 3);
            if (job->event_fd < 0)
                status = vd_fail_errno(errno, "duplicating the OVERLAPPED's event");
        }
    }
    if (status != ERROR_SUCCESS) {
        if (job && job->event_fd >= 0)
            close(job->event_fd);
        free(job);
        if (free_context)
            free_context(context, status);
        return status;
    }
    if (job->event_fd >= 0)
        vd_event_reset(job->event_fd);
    __atomic_store_n(&overlapped->Internal, (ULONG_PTR)VD_STATUS_PENDING, __ATOMIC_RELEASE);
    overlapped->InternalHigh = 0;

    /* The job's own reference to the handle, dropped by the thread. */
    vd_handle_retain(handle);
    pthread_mutex_lock(&vd_jobs_mutex);
    for (struct vd_job **link = &handle->jobs; *link; link = &(*link)->next) {
        if ((*link)->overlapped == overlapped) {
            struct vd_job *old = *link; /* finished: checked above */
            *link = old->next;
            free(old);
            break;
        }
    }
    job->next = handle->jobs;
    handle->jobs = job;
    pthread_mutex_unlock(&vd_jobs_mutex);

    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    int error = pthread_create(&thread, &attributes, vd_job_thread, job);
    pthread_attr_destroy(&attributes);
    if (error) {
        /* Never started: take the record back out, as if never made. */
        pthread_mutex_lock(&vd_jobs_mutex);
        for (struct vd_job **link = &handle->jobs; *link; link = &(*link)->next) {
            if (*link == job) {
                *link = job->next;
                break;
            }
        }
        pthread_mutex_unlock(&vd_jobs_mutex);
        status = vd_fail_errno(error, "starting the operation's thread");
        overlapped->Internal = status;
        if (job->event_fd >= 0)
            close(job->event_fd);
        free(job);
        if (free_context)
            free_context(context, status);
        vd_handle_release(handle);
        return status;
    }
    return ERROR_IO_PENDING;
}

bool vd_job_running(struct vd_handle *handle)
{
    bool running = false;
    pthread_mutex_lock(&vd_jobs_mutex);
    for (struct vd_job *job = handle->jobs; job; job = job->next)
        if (vd_job_status(job) == ERROR_IO_PENDING)
            running = true;
    pthread_mutex_unlock(&vd_jobs_mutex);
    return running;
}

bool vd_job_cancel(struct vd_handle *handle, OVERLAPPED *overlapped)
{
    bool found = false;
    pthread_mutex_lock(&vd_jobs_mutex);
    for (struct vd_job *job = handle->jobs; job; job = job->next) {
        if ((!overlapped || job->overlapped == overlapped) && vd_job_status(job) == ERROR_IO_PENDING) {
            __atomic_store_n(&job->cancel, 1, __ATOMIC_RELAXED);
            syscall(SYS_futex, &job->cancel, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
            found = true;
        }
    }
    pthread_mutex_unlock(&vd_jobs_mutex);
    return found;
}

bool vd_job_wait_cancel(struct vd_job *job, int milliseconds)
{
    struct timespec now, deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += milliseconds / 1000;
    deadline.tv_nsec += (long)(milliseconds % 1000) * 1000000;
    if (deadline.tv_nsec >= 1000000000) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000;
    }
    while (!vd_job_cancelled(job)) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        struct timespec left = {deadline.tv_sec - now.tv_sec, deadline.tv_nsec - now.tv_nsec};
        if (left.tv_nsec < 0) {
            left.tv_sec--;
            left.tv_nsec += 1000000000;
        }
        if (left.tv_sec < 0)
            return false;
        /* Returns at once if the word is no longer 0 (a cancel raced in),
           when woken by vd_job_cancel, or at the timeout. */
        syscall(SYS_futex, &job->cancel, FUTEX_WAIT_PRIVATE, 0, &left, NULL, 0);
    }
    return true;
}

void vd_job_free_all(struct vd_handle *handle)
{
    pthread_mutex_lock(&vd_jobs_mutex);
    struct vd_job *job = handle->jobs;
    handle->jobs = NULL;
    pthread_mutex_unlock(&vd_jobs_mutex);
    while (job) {
        struct vd_job *next = job->next;
        free(job);
        job = next;
    }
}

/* ---- entry points ------------------------------------------------------- */

DWORD WINAPI GetVirtualDiskOperationProgress(HANDLE VirtualDiskHandle, OVERLAPPED *Overlapped,
                                             VIRTUAL_DISK_PROGRESS *Progress)
{
    vd_clear_detail();
    if (!Overlapped || !Progress)
        return vd_fail(ERROR_INVALID_PARAMETER, "Overlapped and Progress are required");
    struct vd_handle *handle = vd_handle_acquire(VirtualDiskHandle);
    if (!handle)
        return vd_fail(ERROR_INVALID_HANDLE, "not a handle from OpenVirtualDisk or CreateVirtualDisk");
    DWORD status = ERROR_SUCCESS;
    pthread_mutex_lock(&vd_jobs_mutex);
    struct vd_job *job = vd_job_find(handle, Overlapped);
    if (job) {
        /* Status first: a finished job's counters are final by then. */
        Progress->OperationStatus = vd_job_status(job);
        Progress->CurrentValue = __atomic_load_n(&job->done, __ATOMIC_RELAXED);
        Progress->CompletionValue = __atomic_load_n(&job->total, __ATOMIC_RELAXED);
    }
    char detail[sizeof job->detail] = "";
    if (job && Progress->OperationStatus != ERROR_IO_PENDING)
        snprintf(detail, sizeof detail, "%s", job->detail);
    pthread_mutex_unlock(&vd_jobs_mutex);
    if (detail[0])
        vd_fail(Progress->OperationStatus, "%s", detail); /* for the caller's vd_last_error_detail() */
    if (!job)
        status = vd_fail(ERROR_INVALID_PARAMETER, "no asynchronous operation was started on this handle with this "
                                                  "OVERLAPPED");
    vd_handle_release(handle);
    return status;
}

BOOL WINAPI CancelIoEx(HANDLE hFile, OVERLAPPED *lpOverlapped)
{
    vd_clear_detail();
    struct vd_handle *handle = vd_handle_acquire(hFile);
    if (!handle) {
        vd_set_last_error(vd_fail(ERROR_INVALID_HANDLE, "not a handle from OpenVirtualDisk or CreateVirtualDisk"));
        return 0;
    }
    bool found = vd_job_cancel(handle, lpOverlapped);
    vd_handle_release(handle);
    if (!found) {
        /* Windows' answer when nothing matching is in progress. */
        vd_set_last_error(vd_fail(ERROR_NOT_FOUND, "no operation of this handle%s is running",
                                  lpOverlapped ? " with this OVERLAPPED" : ""));
        return 0;
    }
    return 1;
}
