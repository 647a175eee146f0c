/*
 * FUSE-served attachments, the attacher's side: starting a helper,
 * talking to it, finding attachments (see fuseattach.h).
 */
#define _GNU_SOURCE
#include "fuseattach.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "errors.h"
#include "helper.h"
#include "loopdev.h"
#include "rundir.h"
#include "serveproto.h"
#include "servrecord.h"
#include "share.h"

extern char **environ;

/* How long a requester waits to be told its detach started; the helper
   refuses to start it later (serveproto.h). */
enum { VD_DETACH_START_MS = 10000, VD_REPLY_SLACK_MS = 5000 };

/* The helper descriptor's number in the helper (argv says it too). */
#define VD_HELPER_CONTROL_FD 3

struct vd_served {
    int control; /* the channel to the helper, -1 in a forked child */
    char path[1]; /* the image path, for messages (allocated to fit) */
};

/* Starts `python -I -m virtdisk._serve 3` with the helper end of a fresh
   channel as descriptor 3.  posix_spawn: no code of this (multithreaded)
   process runs between fork and exec. */
static DWORD vd_spawn_helper(int *control)
{
    const char *python = vd_serve_program();
    if (!python)
        return vd_fail(ERROR_NOT_SUPPORTED, "serving an image needs the virtdisk package's helper "
                                            "(import virtdisk, which names its interpreter)");
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0)
        return vd_fail_errno(errno, "creating the helper's channel");
    /* Above 3, so that the dup2 below always makes a new, inheritable one. */
    int helper_end = fcntl(pair[1], F_DUPFD_CLOEXEC, 10);
    close(pair[1]);
    if (helper_end < 0) {
        DWORD status = vd_fail_errno(errno, "duplicating the helper's channel");
        close(pair[0]);
        return status;
    }
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, helper_end, VD_HELPER_CONTROL_FD);
    posix_spawnattr_init(&attributes);
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attributes, &none);
    posix_spawnattr_setsigdefault(&attributes, &all);
    /* Its own session: no terminal's signals reach it. */
    posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSID);
    char *argv[] = {(char *)python, "-I", "-m", "virtdisk._serve", "3", NULL};
    pid_t pid;
    int error = posix_spawn(&pid, python, &actions, &attributes, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attributes);
    close(helper_end);
    if (error) {
        close(pair[0]);
        return vd_fail_errno(error, "starting the serving helper %s", python);
    }
    /* It forks the supervisor and exits at once: reap it now. */
    int wstatus = 0;
    while (waitpid(pid, &wstatus, 0) < 0 && errno == EINTR)
        continue;
    if (!WIFEXITED(wstatus) || WEXITSTATUS(wstatus) != 0) {
        close(pair[0]);
        return vd_fail(ERROR_GEN_FAILURE, "the serving helper (%s -I -m virtdisk._serve) failed to start (status %d)",
                       python, wstatus);
    }
    *control = pair[0];
    return ERROR_SUCCESS;
}

/* Waits for a RESULT on fd; its status (and detail) or a failure. */
static DWORD vd_await_result(int fd, int timeout_ms, const char *what, const char *path, int *loop)
{
    uint16_t type;
    char payload[VD_MSG_MAX_PAYLOAD];
    size_t length;
    int error = vd_msg_recv(fd, timeout_ms, &type, payload, sizeof payload, &length, NULL);
    DWORD status;
    const char *detail;
    int number;
    if (error == ETIMEDOUT)
        return vd_fail(ERROR_BUSY, "the helper serving %s did not answer %s within %d ms", path, what, timeout_ms);
    if (error == EPIPE)
        return vd_fail(ERROR_GEN_FAILURE, "the helper serving %s ended while %s (see its log in %s)", path, what,
                       vd_run_dir_path());
    if (error || type != VD_MSG_RESULT || vd_msg_parse_result(payload, length, &status, &number, &detail) != 0)
        return vd_fail(ERROR_GEN_FAILURE, "the helper serving %s answered %s with a malformed message", path, what);
    if (loop)
        *loop = number;
    return status == ERROR_SUCCESS ? ERROR_SUCCESS : vd_fail(status, "%s", detail);
}

static struct vd_served *vd_served_new(int control, const char *path)
{
    struct vd_served *served = malloc(sizeof *served + strlen(path));
    if (served) {
        served->control = control;
        strcpy(served->path, path);
    }
    return served;
}

/* Hands the helper a copy of every claim the attachment stands on: the
   copies share the claims' open file descriptions, so the claims last until
   the helper lets go, however long after this process it does.  The image's
   own claim also holds its handle's HANDLE, which must end with the handle:
   the helper gets a writer's claim of its own instead (writer, -1 for a
   read-only attachment, whose attach claim keeps the image read-only: the
   handle that attached it, one opened with METAOPS as the file-system-aware
   compaction's is, keeps its own writer claim, or a permanent attachment
   would hold one for good and refuse the compaction's own METAOPS open). */
static int vd_send_claims(int control, const struct vd_image *image, int attach_claim, int writer)
{
    struct vd_msg_claim attach = {.attach = 1}, other = {.attach = 0};
    int error = attach_claim >= 0 ? vd_msg_send(control, VD_MSG_CLAIM, &attach, sizeof attach, attach_claim) : 0;
    if (!error && writer >= 0)
        error = vd_msg_send(control, VD_MSG_CLAIM, &other, sizeof other, writer);
    for (const struct vd_image *link = image->parent; !error && link; link = link->parent)
        if (link->share_fd >= 0)
            error = vd_msg_send(control, VD_MSG_CLAIM, &other, sizeof other, link->share_fd);
    return error;
}

DWORD vd_served_attach(const struct vd_image *image, bool read_only, bool permanent, int attach_claim,
                       int *number, struct vd_served **out)
{
    *out = NULL;
    *number = -1;
    /* Before any mount: without the privilege nothing may be touched. */
    DWORD status = vd_loop_require_privilege("attaching a virtual disk");
    if (status != ERROR_SUCCESS)
        return status;
    int dir;
    status = vd_run_dir(&dir); /* its faults are the caller's to hear */
    if (status != ERROR_SUCCESS)
        return status;
    close(dir);
    vd_run_collect_garbage();
    size_t path_length = strlen(image->path);
    struct vd_msg_attach request = {.device_id = image->format->device_id,
                                    .open_flags = image->open_flags,
                                    .read_only = read_only,
                                    .permanent = permanent};
    if (sizeof request + path_length + 1 > VD_MSG_MAX_PAYLOAD)
        return vd_fail(ERROR_FILENAME_EXCED_RANGE, "%s: the path is too long to serve", image->path);
    struct vd_served *served = vd_served_new(-1, image->path);
    if (!served)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating an attachment");
    int writer = -1;
    status = read_only ? ERROR_SUCCESS : vd_share_claim_writer(image, &writer);
    if (status != ERROR_SUCCESS) {
        free(served);
        return status;
    }
    int control = -1;
    status = vd_spawn_helper(&control);
    if (status != ERROR_SUCCESS) {
        if (writer >= 0)
            close(writer);
        free(served);
        return status;
    }
    char payload[VD_MSG_MAX_PAYLOAD];
    memcpy(payload, &request, sizeof request);
    memcpy(payload + sizeof request, image->path, path_length + 1);
    int error = vd_send_claims(control, image, attach_claim, writer);
    if (writer >= 0)
        close(writer); /* the helper's copy keeps it */
    if (!error)
        error = vd_msg_send(control, VD_MSG_ATTACH, payload, sizeof request + path_length + 1, image->fd);
    if (error)
        status = vd_fail_errno(error, "sending the attach request for %s to its helper", image->path);
    else
        /* Generous: an interpreter to start, a mount and a loop device; closing
           the channel on a timeout undoes whatever the helper did. */
        status = vd_await_result(control, VD_SERVER_END_MS, "the attach request", image->path, number);
    if (status == ERROR_SUCCESS && permanent) {
        error = vd_msg_send(control, VD_MSG_KEEP, NULL, 0, -1);
        if (error)
            status = vd_fail_errno(error, "confirming the attachment of %s to its helper", image->path);
    }
    if (status != ERROR_SUCCESS || permanent) {
        close(control);
        free(served);
        return status;
    }
    served->control = control;
    *out = served;
    return ERROR_SUCCESS;
}

DWORD vd_served_end(struct vd_served *served)
{
    DWORD status = ERROR_SUCCESS;
    if (served->control >= 0) {
        int error = vd_msg_send(served->control, VD_MSG_RELEASE, NULL, 0, -1);
        if (error == 0)
            status = vd_await_result(served->control, VD_SERVER_END_MS + VD_REPLY_SLACK_MS, "the release",
                                     served->path, NULL);
        /* A helper that is gone has ended the attachment already. */
        else if (error != EPIPE && error != ECONNRESET)
            status = vd_fail_errno(error, "releasing the attachment of %s", served->path);
        close(served->control);
    }
    free(served);
    return status;
}

static DWORD vd_detach_over(int fd, const char *path)
{
    struct vd_msg_detach request = {.start_deadline_ms = vd_msg_now_ms() + VD_DETACH_START_MS};
    int error = vd_msg_send(fd, VD_MSG_DETACH, &request, sizeof request, -1);
    if (error)
        return vd_fail_errno(error, "asking the helper of %s to detach", path);
    /* Past the start deadline the helper refuses to start, and once started
       it takes at most VD_SERVER_END_MS: waiting that long means never
       reporting a failure for a detach that then happens. */
    return vd_await_result(fd, VD_DETACH_START_MS + VD_SERVER_END_MS + VD_REPLY_SLACK_MS, "the detach request",
                           path, NULL);
}

DWORD vd_served_detach_own(struct vd_served *served)
{
    if (served->control < 0)
        return vd_fail(ERROR_INVALID_HANDLE, "%s was attached by the parent of this forked process", served->path);
    DWORD status = vd_detach_over(served->control, served->path);
    /* Refusals leave the helper serving; success and lost helpers leave
       nothing to hold. */
    if (status == ERROR_SUCCESS) {
        close(served->control);
        free(served);
    }
    return status;
}

void vd_served_forget(struct vd_served *served)
{
    if (served->control >= 0)
        close(served->control);
    served->control = -1;
}

int vd_served_find(const struct vd_image *image, bool *helper, struct vd_loop_binding *found)
{
    char base[64];
    struct vd_record record;
    vd_record_base(image->file_dev, image->file_ino, base, sizeof base);
    if (!vd_record_read(base, &record) || !vd_run_pid_alive(record.pid))
        return -1;
    /* A record outlives a killed helper; the device it names may even have
       been reused since.  Only the device's own answer counts. */
    uint64_t seq = 0;
    if (!vd_loop_is_backed_by(record.loop, (dev_t)record.backing_dev, (ino_t)record.backing_ino, &seq))
        return -1;
    *helper = record.permanent;
    if (found)
        *found = (struct vd_loop_binding){record.loop, record.backing_dev, record.backing_ino, seq};
    return record.loop;
}

/* Connects to the socket of the permanent helper serving image. */
static DWORD vd_connect_helper(const struct vd_image *image, int *out)
{
    char base[64];
    struct vd_record record;
    vd_record_base(image->file_dev, image->file_ino, base, sizeof base);
    if (!vd_record_read(base, &record) || !vd_run_pid_alive(record.pid))
        return vd_fail(ERROR_NOT_READY, "%s is not attached any more (its helper is gone)", image->path);
    struct sockaddr_un address;
    DWORD status = vd_socket_address(base, record.pid, &address);
    if (status != ERROR_SUCCESS)
        return status;
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return vd_fail_errno(errno, "creating a socket");
    if (connect(fd, (struct sockaddr *)&address, sizeof address) < 0) {
        status = vd_fail(ERROR_NOT_READY, "%s is not attached any more (its helper is gone: %s)", image->path,
                         strerror(errno));
        close(fd);
        return status;
    }
    *out = fd;
    return ERROR_SUCCESS;
}

DWORD vd_served_detach(const struct vd_image *image)
{
    DWORD status = vd_loop_require_privilege("detaching a virtual disk");
    if (status != ERROR_SUCCESS)
        return status;
    int fd;
    status = vd_connect_helper(image, &fd);
    if (status != ERROR_SUCCESS)
        return status;
    status = vd_detach_over(fd, image->path);
    close(fd);
    return status;
}

DWORD vd_served_request(struct vd_served *served, const struct vd_image *image, uint16_t type, const void *payload,
                        size_t length, uint16_t *reply_type, void *reply, size_t capacity, size_t *reply_length)
{
    int fd;
    DWORD status = ERROR_SUCCESS;
    if (served && served->control < 0)
        return vd_fail(ERROR_INVALID_HANDLE, "%s was attached by the parent of this forked process", served->path);
    if (served)
        fd = served->control;
    else
        status = vd_connect_helper(image, &fd);
    if (status != ERROR_SUCCESS)
        return status;
    int error = vd_msg_send(fd, (enum vd_msg_type)type, payload, length, -1);
    if (!error)
        error = vd_msg_recv(fd, VD_OPERATION_REPLY_MS + VD_REPLY_SLACK_MS, reply_type, reply, capacity, reply_length,
                            NULL);
    if (!served)
        close(fd);
    if (error == EPIPE)
        return vd_fail(ERROR_GEN_FAILURE, "the helper serving %s has ended (see its log in %s)", image->path,
                       vd_run_dir_path());
    if (error)
        return vd_fail_errno(error, "asking the helper serving %s", image->path);
    return ERROR_SUCCESS;
}

struct vd_image_search {
    int number;
    char *path;
    size_t size;
    size_t found;
};

static void vd_image_search_visit(const char *base, void *context)
{
    struct vd_image_search *search = context;
    struct vd_record record;
    if (search->found || !vd_record_read(base, &record) || record.loop != search->number ||
        !vd_run_pid_alive(record.pid) ||
        !vd_loop_is_backed_by(record.loop, (dev_t)record.backing_dev, (ino_t)record.backing_ino, NULL))
        return;
    if (vd_record_image(base, search->path, search->size))
        search->found = strlen(search->path);
}

size_t vd_served_image_of(int number, char *path, size_t size)
{
    struct vd_image_search search = {.number = number, .path = path, .size = size};
    if (size)
        path[0] = '\0';
    vd_records_for_each(vd_image_search_visit, &search);
    return search.found;
}
