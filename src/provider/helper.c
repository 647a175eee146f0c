/*
 * The serving helper's two processes (see helper.h).
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION FUSE_MAKE_VERSION(3, 12)
#include "helper.h"

#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "errors.h"
#include "fuseserve.h"
#include "handles.h"
#include "image.h"
#include "loopdev.h"
#include "rundir.h"
#include "serveops.h"
#include "serveproto.h"
#include "servrecord.h"
#include "share.h"

enum { VD_MAX_CLIENTS = 16, VD_CAP_SYS_ADMIN = 21, VD_RELEASE_GRACE_MS = 1000 };
/* The claims of an attachment: its own, the image's, and one for each parent
   of the deepest chain a format opens (64), with room to spare. */
enum { VD_MAX_CLAIMS = 80 };
/* Descriptor numbers above every claim, for the order in which a killed
   supervisor lets go: claims, then the marker, then the device. */
enum { VD_MARKER_FD_MIN = VD_MAX_CLAIMS + 48, VD_LOOP_FD_MIN = VD_MARKER_FD_MIN + 16 };

static char *vd_serve_python;

void vd_serve_set_program(const char *python)
{
    char *copy = python ? strdup(python) : NULL;
    if (copy || !python)
        vd_serve_python = copy; /* set once at import; the old copy may be in use */
}

const char *vd_serve_program(void)
{
    return vd_serve_python;
}

/* ---- the log (stderr of both processes) ---------------------------------- */

static size_t vd_log_bytes;
static unsigned vd_log_errors;

static void vd_log_write(const char *message)
{
    char stamp[32];
    time_t now = time(NULL);
    struct tm tm;
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", localtime_r(&now, &tm));
    char line[1200];
    int length = snprintf(line, sizeof line, "%s virtdisk helper %ld: %s\n", stamp, (long)getpid(), message);
    if (length < 0)
        return;
    if ((size_t)length >= sizeof line)
        length = sizeof line - 1;
    if (vd_log_bytes + (size_t)length > VD_LOG_MAX_BYTES) {
        if (vd_log_bytes <= VD_LOG_MAX_BYTES) {
            static const char full[] = "log full: further messages dropped\n";
            if (write(STDERR_FILENO, full, sizeof full - 1) < 0)
                return;
        }
        vd_log_bytes = VD_LOG_MAX_BYTES + 1;
        return;
    }
    vd_log_bytes += (size_t)length;
    if (write(STDERR_FILENO, line, (size_t)length) < 0)
        return;
}

static void vd_log(bool error, const char *format, ...) __attribute__((format(printf, 2, 3)));

static void vd_log(bool error, const char *format, ...)
{
    char message[1024];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    if (error)
        vd_log_errors++;
    vd_log_write(message);
}

/* libfuse's messages, through the same bounded log; its errors count. */
static void vd_fuse_log(enum fuse_log_level level, const char *format, va_list args)
{
    char message[1024];
    vsnprintf(message, sizeof message, format, args);
    size_t length = strlen(message);
    if (length && message[length - 1] == '\n')
        message[length - 1] = '\0';
    if (level <= FUSE_LOG_ERR)
        vd_log_errors++;
    vd_log_write(message);
}

/* ---- the server process --------------------------------------------------- */

enum vd_report_kind { VD_REPORT_READY = 1, VD_REPORT_ENDED = 2 };

/* server -> supervisor, one write each (< PIPE_BUF: atomic) */
struct vd_server_report {
    uint32_t kind;
    uint32_t status;
    uint32_t errors;
    char text[1024]; /* the detail of a failure */
};

/* One report, one message (the channel is SOCK_SEQPACKET); fd (or -1)
   travels with it. */
static void vd_report(int socket_fd, enum vd_report_kind kind, DWORD status, const char *text, int fd)
{
    struct vd_server_report report = {.kind = kind, .status = status, .errors = vd_log_errors};
    snprintf(report.text, sizeof report.text, "%s", text ? text : "");
    struct iovec part = {.iov_base = &report, .iov_len = sizeof report};
    vd_seqpacket_send(socket_fd, &part, 1, fd); /* a failure: the supervisor is gone, nobody to tell */
}

static void vd_server_main(struct vd_image *image, bool writable, int report_fd, int ops_fd)
    __attribute__((noreturn));

static void vd_server_main(struct vd_image *image, bool writable, int report_fd, int ops_fd)
{
    prctl(PR_SET_NAME, "virtdisk-fuse");
    fuse_set_log_func(vd_fuse_log);
    vd_clear_detail();
    struct vd_fuse_server *server;
    DWORD status = vd_fuse_serve(image, writable, &server);
    if (status == ERROR_SUCCESS)
        status = vd_share_mark_attached(vd_fuse_image(server)->fd);
    if (status != ERROR_SUCCESS) {
        vd_report(report_fd, VD_REPORT_READY, status, vd_last_error_detail(), -1);
        _exit(1);
    }
    /* Without it the disk is served all the same; operations are refused. */
    if (vd_serve_ops_start(server, ops_fd) != ERROR_SUCCESS)
        vd_log(true, "no operations for this disk: %s", vd_last_error_detail());
    /* The mount's root goes to the supervisor, which opens the file (this
       process never opens its own mount); from then on the mount lives only
       in what the supervisor holds.  If it dies before it takes the root,
       the message dies with its socket, and the session with it. */
    vd_report(report_fd, VD_REPORT_READY, ERROR_SUCCESS, "", vd_fuse_root(server));
    vd_fuse_let_go(server);
    /* Serve until the kernel ends the session: the loop device let go of the
       file, and the mount is gone. */
    status = vd_fuse_wait_end(server);
    vd_report(report_fd, VD_REPORT_ENDED, status, vd_last_error_detail(), -1);
    _exit(status == ERROR_SUCCESS ? 0 : 1);
}

/* ---- the supervisor ------------------------------------------------------- */

struct vd_client {
    int fd;
    uint64_t deadline_ms;
    long pid;
    bool refused; /* not privileged: its request gets a refusal, nothing more */
};

struct vd_supervisor {
    char base[64];      /* the record's and socket's name: the disk's image file */
    char log_base[64];  /* the log's: the attached image's, whatever a break made the disk */
    char *image_path;
    dev_t image_dev;    /* the disk's image file (the target after a break) */
    ino_t image_ino;
    bool permanent;
    int control;        /* the attacher's channel, until it closes (or KEEP) */
    int listener;       /* privileged clients' requests (a non-permanent disk's: operations only) */
    struct sockaddr_un address;
    pid_t server;
    int report_fd;      /* the server's reports; end of file when it died */
    int ops_fd;         /* requests about operations, forwarded to the server (serveops.h) */
    /* A mirror target the server created and has not made the disk yet
       (no break): removed if the server dies, as its cancel would have.
       Its identity guards against removing a file that replaced it. */
    char mirror_target[VD_MSG_MAX_PAYLOAD];
    dev_t mirror_dev;
    ino_t mirror_ino;
    /* The target of the last mirror started, created or existing: the
       disk's name after a break. */
    char mirror_path[VD_MSG_MAX_PAYLOAD];
    /* The process that started the last operation, as a pidfd (readable once
       it has exited), else -1: on Windows closing the handle that started an
       operation cancels it, and a dead process's handles are closed, so its
       end cancels the operation here.  Learned from the kernel (the
       connection's peer), not from the requester's word. */
    int requester_pidfd;
    bool requester_control; /* it came through the attacher's channel */
    uint32_t requester_serial; /* the operation's number (serveproto.h) */
    int marker_fd;      /* this process's attachment marker (share.h), else -1 */
    struct vd_loop loop;
    uint64_t backing_dev;
    uint64_t backing_ino;
    struct vd_client clients[VD_MAX_CLIENTS];
    size_t client_count;
    /* The attacher's sharing claims, held (never read) until this process
       ends, and with it the attachment; the attach claim only until the
       handles let go (a disk on its way out is waited for, not refused). */
    int attach_claim;
    int claims[VD_MAX_CLAIMS];
    size_t claim_count;
};

/* Reads one report within timeout_ms: 0, ETIMEDOUT, or EPIPE (the server
   died without a word).  A descriptor that came with it goes to *fd when fd
   is not NULL (else it is closed); *fd is -1 when none came. */
static int vd_read_report(int socket_fd, int timeout_ms, struct vd_server_report *report, int *fd)
{
    struct iovec part = {.iov_base = report, .iov_len = sizeof *report};
    int received = -1;
    bool truncated;
    ssize_t got = vd_seqpacket_recv(socket_fd, timeout_ms, &part, 1, &received, &truncated);
    if (fd)
        *fd = -1;
    if (got < 0 && errno == ETIMEDOUT)
        return ETIMEDOUT;
    if (got != (ssize_t)sizeof *report || truncated) {
        if (received >= 0)
            close(received);
        return EPIPE; /* the end of the channel, or not a report of the server's */
    }
    if (fd)
        *fd = received;
    else if (received >= 0)
        close(received);
    report->text[sizeof report->text - 1] = '\0';
    return 0;
}

static void vd_reap(pid_t pid)
{
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        continue;
}

/* Aborts the server's FUSE connection through fusectl, when it is mounted.
   Its /dev/fuse closing has done the same already; this also covers a
   descriptor someone else might still hold. */
static void vd_abort_connection(const struct vd_supervisor *s)
{
    dev_t dev = (dev_t)s->backing_dev;
    char path[96];
    snprintf(path, sizeof path, "/sys/fs/fuse/connections/%u/abort", (major(dev) << 20) | minor(dev));
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (write(fd, "1", 1) < 0)
            vd_log(true, "aborting the FUSE connection through %s: %s", path, strerror(errno));
        close(fd);
    }
}

/* Waits up to timeout_ms for the server to end, and returns its final
   status (ERROR_BUSY: still serving). */
static DWORD vd_wait_server(struct vd_supervisor *s, int timeout_ms)
{
    struct vd_server_report report;
    int error = vd_read_report(s->report_fd, timeout_ms, &report, NULL);
    if (error == ETIMEDOUT)
        return vd_fail(ERROR_BUSY, "the server of %s is still serving after %d ms", s->image_path, timeout_ms);
    vd_reap(s->server);
    s->server = -1;
    if (error || report.kind != VD_REPORT_ENDED) {
        vd_log(true, "the server ended without its final report");
        return vd_fail(ERROR_GEN_FAILURE, "the server of %s ended without its final report", s->image_path);
    }
    if (report.errors)
        vd_log_errors += report.errors;
    if (report.status != ERROR_SUCCESS) {
        vd_log(true, "final flush failed (0x%08X): %s", (unsigned)report.status, report.text);
        return vd_fail(report.status, "%s", report.text);
    }
    return ERROR_SUCCESS;
}

static void vd_drop_claims(struct vd_supervisor *s)
{
    if (s->attach_claim >= 0)
        close(s->attach_claim);
    s->attach_claim = -1;
    for (size_t i = 0; i < s->claim_count; i++)
        close(s->claims[i]);
    s->claim_count = 0;
}

/* Removes the attachment's files and ends its claims and its marker, then
   answers reply_fd (or -1), and ends the supervisor: whoever hears the
   answer finds nothing of it left, and may open the image for writing at
   once. */
static void vd_finish(struct vd_supervisor *s, DWORD status, int reply_fd) __attribute__((noreturn));

static void vd_finish(struct vd_supervisor *s, DWORD status, int reply_fd)
{
    char detail[1024];
    snprintf(detail, sizeof detail, "%s", status == ERROR_SUCCESS ? "" : vd_last_error_detail());
    struct vd_record record;
    if (vd_record_read(s->base, &record) && record.pid == (long)getpid())
        vd_run_remove(s->base, ".json");
    if (s->listener >= 0)
        unlink(s->address.sun_path);
    bool clean = status == ERROR_SUCCESS && vd_log_errors == 0;
    vd_log(!clean, "ended (0x%08X)%s", (unsigned)status, clean ? "" : "; log kept");
    if (clean)
        vd_run_remove(s->log_base, ".log");
    vd_drop_claims(s);
    /* The marker too, before the answer: exiting would drop it only after
       the requester has heard "detached" and gone on (the answer's reader
       often runs first), and an image that still shows a marker counts as
       on its way out. */
    if (s->marker_fd >= 0)
        close(s->marker_fd);
    s->marker_fd = -1;
    if (reply_fd >= 0)
        vd_msg_send_result(reply_fd, status, -1, detail);
    _exit(clean ? 0 : 1);
}

static void vd_reply(int fd, DWORD status, int loop)
{
    if (fd >= 0)
        vd_msg_send_result(fd, status, loop, status == ERROR_SUCCESS ? "" : vd_last_error_detail());
}

/* The server died: abort, let go of the device, go. */
static void vd_server_died(struct vd_supervisor *s) __attribute__((noreturn));

static void vd_server_died(struct vd_supervisor *s)
{
    vd_abort_connection(s);
    vd_reap(s->server);
    vd_log(true, "the server of %s died; releasing /dev/loop%d", s->image_path, s->loop.number);
    if (s->loop.fd >= 0)
        close(s->loop.fd);
    struct stat st;
    if (s->mirror_target[0] && lstat(s->mirror_target, &st) == 0 && st.st_dev == s->mirror_dev &&
        st.st_ino == s->mirror_ino && unlink(s->mirror_target) == 0)
        vd_log(false, "removed the unfinished mirror target %s", s->mirror_target);
    vd_finish(s, ERROR_GEN_FAILURE, -1);
}

/* Lets go of the device, as closing an autoclear device's last descriptor
   does: when nobody else holds it, it is gone and the server ends; else the
   server serves on until the last holder lets go.  reply_fd (or -1) learns
   the outcome as soon as it is known. */
static void vd_release(struct vd_supervisor *s, int reply_fd) __attribute__((noreturn));

static void vd_release(struct vd_supervisor *s, int reply_fd)
{
    vd_clear_detail();
    if (s->attach_claim >= 0)
        close(s->attach_claim); /* no longer held by a process: on its way out */
    s->attach_claim = -1;
    close(s->loop.fd);
    s->loop.fd = -1;
    /* Another opener may hold the device for a moment (a lister reading its
       status, udev's probe): the autoclear then happens at its close.  Worth
       a short wait, so that a close followed by a new attach finds the image
       free; a real holder (a mount) keeps it much longer. */
    DWORD status = vd_loop_wait_unbound(s->loop.number, s->loop.seq, VD_RELEASE_GRACE_MS)
                       ? vd_wait_server(s, VD_SERVER_END_MS)
                       : ERROR_BUSY;
    if (status == ERROR_BUSY) {
        vd_log(false, "/dev/loop%d is still held elsewhere; serving until it is released", s->loop.number);
        vd_reply(reply_fd, ERROR_SUCCESS, s->loop.number);
        for (;;) {
            status = vd_wait_server(s, 24 * 3600 * 1000);
            if (status != ERROR_BUSY)
                break;
        }
        vd_finish(s, status, -1);
    }
    vd_finish(s, status, reply_fd);
}

/* A DETACH: refused (and the attachment kept) while the device is in use,
   else done, flushed and answered before the supervisor ends. */
static void vd_detach(struct vd_supervisor *s, int reply_fd, const struct vd_msg_detach *request)
{
    vd_clear_detail();
    if (vd_msg_now_ms() >= request->start_deadline_ms) {
        vd_reply(reply_fd, vd_fail(ERROR_BUSY, "the detach request waited past its deadline and was not run"),
                 -1);
        return;
    }
    DWORD status = vd_loop_detach(s->loop.number, &s->loop.fd);
    if (status != ERROR_SUCCESS) {
        vd_log(false, "detach refused (0x%08X): %s", (unsigned)status, vd_last_error_detail());
        vd_reply(reply_fd, status, s->loop.number);
        return;
    }
    status = vd_wait_server(s, VD_SERVER_END_MS);
    vd_log(status != ERROR_SUCCESS, "detached /dev/loop%d from %s (0x%08X)", s->loop.number, s->image_path,
           (unsigned)status);
    vd_finish(s, status, reply_fd);
}

/* Linux 6.5's option for a pidfd of a socket's peer; older kernels answer
   ENOPROTOOPT and older headers lack the name. */
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

/* The effective capabilities in /proc/<pid>/status, or false when unread. */
static bool vd_process_has_cap_sys_admin(long pid)
{
    char path[64], text[4096];
    snprintf(path, sizeof path, "/proc/%ld/status", pid);
    int status_fd = open(path, O_RDONLY | O_CLOEXEC);
    if (status_fd < 0)
        return false;
    ssize_t n = read(status_fd, text, sizeof text - 1);
    close(status_fd);
    if (n <= 0)
        return false;
    text[n] = '\0';
    const char *line = strstr(text, "\nCapEff:");
    if (!line)
        return false;
    unsigned long long caps = strtoull(line + 8, NULL, 16);
    return (caps >> VD_CAP_SYS_ADMIN) & 1;
}

/* Whether the process on the other end of a connected socket has
   CAP_SYS_ADMIN in its effective set (what the API itself requires).
   SO_PEERCRED names the connecting process by number, and /proc is read by
   number: a peer that queued its request and exited could have its number
   taken by a privileged process before the read, and borrow its
   capabilities.  The peer's pidfd tells: if that process is still running
   after the read, the number named it. */
static bool vd_peer_is_privileged(int fd, long *pid)
{
    struct ucred peer;
    socklen_t size = sizeof peer;
    *pid = -1;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &size) < 0 || peer.pid <= 0)
        return false;
    *pid = peer.pid;
    int pidfd = -1;
    size = sizeof pidfd;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &size) < 0) {
        if (errno != ENOPROTOOPT)
            return false; /* the peer is already gone */
        pidfd = -1;       /* before Linux 6.5: the number is all there is */
    }
    bool privileged = vd_process_has_cap_sys_admin(peer.pid);
    if (pidfd >= 0) {
        /* A pidfd polls readable once its process has exited. */
        struct pollfd exited = {.fd = pidfd, .events = POLLIN};
        if (poll(&exited, 1, 0) != 0)
            privileged = false;
        close(pidfd);
    }
    return privileged;
}

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434 /* one number on every architecture (Linux 5.3) */
#endif

/* A pidfd of the process on the other end of fd (a client's connecting
   process, or the attacher, which made the control channel), or -1 with
   errno: ENOSYS when the kernel has no pidfds (before 5.3), anything else
   when the peer is gone.  Before Linux 6.5 (no SO_PEERPIDFD) the peer's
   number is opened, which still names it when it has not exited. */
static int vd_peer_pidfd(int fd)
{
    int pidfd = -1;
    socklen_t size = sizeof pidfd;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &size) == 0)
        return pidfd;
    if (errno != ENOPROTOOPT)
        return -1;
    struct ucred peer;
    size = sizeof peer;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &size) < 0 || peer.pid <= 0) {
        errno = ESRCH;
        return -1;
    }
    return (int)syscall(SYS_pidfd_open, peer.pid, 0);
}

static void vd_forget_requester(struct vd_supervisor *s)
{
    if (s->requester_pidfd >= 0)
        close(s->requester_pidfd);
    s->requester_pidfd = -1;
    s->requester_control = false;
}

static void vd_drop_client(struct vd_supervisor *s, size_t index)
{
    close(s->clients[index].fd);
    s->clients[index] = s->clients[--s->client_count];
}

static void vd_accept(struct vd_supervisor *s)
{
    int fd = accept4(s->listener, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0)
        return;
    if (s->client_count == VD_MAX_CLIENTS) {
        vd_msg_send_result(fd, ERROR_BUSY, -1, "the helper has too many clients; try again");
        close(fd);
        return;
    }
    /* Decided now, at connect time (SO_PEERCRED is the connecting process);
       told when its request arrives, so that it hears the answer. */
    long pid;
    bool privileged = vd_peer_is_privileged(fd, &pid);
    s->clients[s->client_count++] = (struct vd_client){
        .fd = fd, .deadline_ms = vd_msg_now_ms() + VD_CLIENT_REQUEST_MS, .pid = pid, .refused = !privileged};
}

static bool vd_is_operation_message(uint16_t type)
{
    return type == VD_MSG_OPERATION_START || type == VD_MSG_OPERATION_STATUS || type == VD_MSG_OPERATION_CANCEL ||
           type == VD_MSG_BREAK_MIRROR;
}

/* Follows the mirror target the server creates (see struct vd_supervisor):
   known from a started mirror without EXISTING_FILE, forgotten once a break
   made it the disk or a cancel or a new operation ended that mirror. */
static void vd_note_mirror(struct vd_supervisor *s, uint16_t type, const char *payload, size_t length,
                           uint16_t reply_type, const char *reply, size_t reply_length)
{
    DWORD status;
    int loop;
    const char *detail;
    if (reply_type != VD_MSG_RESULT || vd_msg_parse_result(reply, reply_length, &status, &loop, &detail) != 0 ||
        status != ERROR_SUCCESS)
        return;
    if (type == VD_MSG_BREAK_MIRROR || type == VD_MSG_OPERATION_CANCEL)
        s->mirror_target[0] = '\0';
    struct vd_msg_operation_start request;
    if (type != VD_MSG_OPERATION_START || length <= sizeof request)
        return;
    memcpy(&request, payload, sizeof request);
    s->mirror_target[0] = '\0';
    if (request.kind == VD_OPERATION_MIRROR)
        snprintf(s->mirror_path, sizeof s->mirror_path, "%s", payload + sizeof request);
    struct stat st;
    if (request.kind == VD_OPERATION_MIRROR && !(request.flags & MIRROR_VIRTUAL_DISK_FLAG_EXISTING_FILE) &&
        lstat(payload + sizeof request, &st) == 0) {
        snprintf(s->mirror_target, sizeof s->mirror_target, "%s", payload + sizeof request);
        s->mirror_dev = st.st_dev;
        s->mirror_ino = st.st_ino;
    }
}

/* After a break the disk runs on the mirror's target, as on Windows: the
   attachment's record, socket, marker and claims move to the target's file
   (target_fd, the server's handover), and the source is let go of, free to
   be opened for writing, attached or removed.  The new ones are in place
   before the old ones go, so that the disk is always found under one of the
   two names. */
static void vd_adopt_target(struct vd_supervisor *s, int target_fd)
{
    struct stat st;
    if (!s->mirror_path[0] || fstat(target_fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        vd_log(true, "a break handed over no usable target; the attachment keeps the name %s", s->image_path);
        return;
    }
    char *path = strdup(s->mirror_path);
    if (!path) {
        vd_log(true, "out of memory taking over %s", s->mirror_path);
        return;
    }
    char base[sizeof s->base];
    vd_record_base(st.st_dev, st.st_ino, base, sizeof base);
    /* The attachment's claim, made as the attach made it on the source. */
    int attach_claim = -1;
    if (s->attach_claim >= 0) {
        struct vd_image view = {.fd = target_fd, .path = path, .file_dev = st.st_dev, .file_ino = st.st_ino,
                                .share_fd = -1};
        vd_clear_detail();
        if (vd_share_claim(&view, VD_SHARE_ATTACH, VD_SHARE_ATTACH, -1, "taking the attachment over",
                           &attach_claim) != ERROR_SUCCESS)
            vd_log(true, "no attach claim on %s: %s", path, vd_last_error_detail());
    }
    int marker = -1;
    if (vd_share_mark_attached(target_fd) == ERROR_SUCCESS)
        marker = fcntl(target_fd, F_DUPFD_CLOEXEC, VD_MARKER_FD_MIN);
    if (marker < 0)
        vd_log(true, "could not mark %s as attached from the supervisor", path);
    struct vd_record record = {.loop = s->loop.number,
                               .pid = (long)getpid(),
                               .permanent = s->permanent,
                               .backing_dev = s->backing_dev,
                               .backing_ino = s->backing_ino};
    vd_clear_detail();
    if (vd_record_write(base, &record, path) != ERROR_SUCCESS)
        vd_log(true, "could not record %s: %s", path, vd_last_error_detail());
    if (s->listener >= 0) {
        struct sockaddr_un address;
        int listener = -1;
        if (vd_socket_address(base, (long)getpid(), &address) == ERROR_SUCCESS &&
            (listener = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) >= 0 &&
            bind(listener, (struct sockaddr *)&address, sizeof address) == 0 && listen(listener, VD_MAX_CLIENTS) == 0) {
            close(s->listener);
            unlink(s->address.sun_path);
            s->listener = listener;
            s->address = address;
        } else {
            vd_log(true, "could not listen for %s: %s; requests go to the old socket", path, strerror(errno));
            if (listener >= 0)
                close(listener);
        }
    }
    vd_run_remove(s->base, ".json");
    if (s->marker_fd >= 0)
        close(s->marker_fd);
    s->marker_fd = marker;
    if (s->attach_claim >= 0)
        close(s->attach_claim);
    s->attach_claim = attach_claim;
    /* The source's writer claim and its parents': the target is a disk of
       its own, whose writer claim its server holds (servemirror.h). */
    for (size_t i = 0; i < s->claim_count; i++)
        close(s->claims[i]);
    s->claim_count = 0; /* the source's lock file stays for its next open (share.h) */
    vd_log(false, "the disk on /dev/loop%d now runs on %s (was %s)", s->loop.number, path, s->image_path);
    snprintf(s->base, sizeof s->base, "%s", base);
    s->image_path = path; /* the first one is the attach request's, never freed */
    s->image_dev = st.st_dev;
    s->image_ino = st.st_ino;
}

/* Whether a reply is a successful RESULT. */
static bool vd_reply_succeeded(uint16_t reply_type, const char *reply, size_t reply_length)
{
    DWORD status;
    int loop;
    const char *detail;
    return reply_type == VD_MSG_RESULT && vd_msg_parse_result(reply, reply_length, &status, &loop, &detail) == 0 &&
           status == ERROR_SUCCESS;
}

/* Passes a request about an operation to the server and its answer back,
   unchanged (fd -1: the supervisor's own request, answered to the log).  A
   server that does not answer in time loses its channel (a late answer must
   not be taken for the next request's).  A START's requester is learned
   here, from fd's peer (see struct vd_supervisor). */
static void vd_forward_operation(struct vd_supervisor *s, int fd, uint16_t type, const void *payload, size_t length)
{
    if (s->ops_fd < 0) {
        if (fd >= 0)
            vd_msg_send_result(fd, ERROR_NOT_SUPPORTED, -1, "this disk's server takes no operations");
        return;
    }
    int requester = -1;
    if (type == VD_MSG_OPERATION_START && fd >= 0) {
        requester = vd_peer_pidfd(fd);
        if (requester < 0 && errno != ENOSYS) {
            /* Nobody would hear of it, and nobody could cancel it. */
            vd_msg_send_result(fd, ERROR_OPERATION_ABORTED, -1, "the requesting process is gone");
            return;
        }
    }
    int error = vd_msg_send(s->ops_fd, type, payload, length, -1);
    uint16_t reply_type = 0;
    char reply[VD_MSG_MAX_PAYLOAD];
    size_t reply_length = 0;
    int handover = -1;
    if (!error)
        error = vd_msg_recv(s->ops_fd, VD_OPERATION_REPLY_MS, &reply_type, reply, sizeof reply, &reply_length,
                            &handover);
    if (error) {
        /* A break that got no answer may have made the target the disk, and
           the guest's writes since went to it alone: it is kept. */
        if (type == VD_MSG_BREAK_MIRROR)
            s->mirror_target[0] = '\0';
        vd_log(true, "the server did not answer an operation request: %s", strerror(error));
        close(s->ops_fd);
        s->ops_fd = -1;
        if (requester >= 0)
            close(requester);
        if (fd >= 0)
            vd_msg_send_result(fd, ERROR_GEN_FAILURE, -1, "the disk's server did not answer the operation request");
        return;
    }
    vd_note_mirror(s, type, payload, length, reply_type, reply, reply_length);
    bool succeeded = vd_reply_succeeded(reply_type, reply, reply_length);
    if (type == VD_MSG_OPERATION_START && succeeded) {
        vd_forget_requester(s);
        s->requester_pidfd = requester;
        s->requester_control = fd == s->control;
        DWORD status;
        int number = -1;
        const char *detail;
        vd_msg_parse_result(reply, reply_length, &status, &number, &detail);
        s->requester_serial = (uint32_t)number;
        requester = -1;
    } else if ((type == VD_MSG_OPERATION_CANCEL || type == VD_MSG_BREAK_MIRROR) && succeeded) {
        vd_forget_requester(s); /* its operation is over */
    }
    if (requester >= 0)
        close(requester);
    if (fd < 0) {
        DWORD status = ERROR_GEN_FAILURE;
        int loop;
        const char *detail = "a malformed answer";
        if (reply_type == VD_MSG_RESULT)
            vd_msg_parse_result(reply, reply_length, &status, &loop, &detail);
        vd_log(status != ERROR_SUCCESS && status != ERROR_NOT_FOUND, "the server answered 0x%08X%s%s",
               (unsigned)status, detail[0] ? ": " : "", detail);
    }
    if (handover >= 0) {
        if (type == VD_MSG_BREAK_MIRROR)
            vd_adopt_target(s, handover);
        close(handover);
    }
    if (fd >= 0)
        vd_msg_send(fd, (enum vd_msg_type)reply_type, reply, reply_length, -1);
}

/* The process that started the operation has exited, or (when it came
   through the attacher's channel) the attacher's handles all closed: the
   handle that started it is closed, which cancels it, whatever the process
   said or did not say before it went.  A mirror in sync ends as a cancel
   ends it: the source stays the disk, a target the mirror created is
   removed (servemirror.h). */
static void vd_cancel_orphaned(struct vd_supervisor *s, const char *why)
{
    struct vd_msg_operation_cancel request = {.serial = s->requester_serial};
    vd_forget_requester(s);
    vd_log(false, "%s: cancelling operation %u", why, (unsigned)request.serial);
    vd_forward_operation(s, -1, VD_MSG_OPERATION_CANCEL, &request, sizeof request);
}

static void vd_serve_client(struct vd_supervisor *s, size_t index)
{
    int fd = s->clients[index].fd;
    uint16_t type;
    char payload[VD_MSG_MAX_PAYLOAD];
    size_t length;
    int error = vd_msg_recv(fd, 0, &type, payload, sizeof payload, &length, NULL);
    if (error == ETIMEDOUT)
        return;
    if ((error == 0 || error == EPROTO) && s->clients[index].refused) {
        vd_log(false, "refused a request from pid %ld: no CAP_SYS_ADMIN in its effective set", s->clients[index].pid);
        vd_msg_send_result(fd, ERROR_PRIVILEGE_NOT_HELD, -1,
                           "detaching, mirroring or compacting an attached virtual disk needs CAP_SYS_ADMIN in "
                           "the effective set");
    } else if (error == 0 && type == VD_MSG_DETACH && !s->permanent) {
        vd_msg_send_result(fd, ERROR_DEVICE_IN_USE, -1,
                           "the disk was attached without PERMANENT_LIFETIME: it is detached by its attaching "
                           "process, or when that process's handles close");
    } else if (error == 0 && type == VD_MSG_DETACH && length == sizeof(struct vd_msg_detach)) {
        struct vd_msg_detach request;
        memcpy(&request, payload, sizeof request);
        vd_detach(s, fd, &request);
    } else if (error == 0 && vd_is_operation_message(type)) {
        vd_forward_operation(s, fd, type, payload, length);
    } else if (error == 0 || error == EPROTO) {
        vd_msg_send_result(fd, ERROR_INVALID_PARAMETER, -1, "not a request this helper takes");
    }
    vd_drop_client(s, index);
}

static void vd_serve_control(struct vd_supervisor *s)
{
    uint16_t type;
    char payload[VD_MSG_MAX_PAYLOAD];
    size_t length;
    int error = vd_msg_recv(s->control, 0, &type, payload, sizeof payload, &length, NULL);
    if (error == ETIMEDOUT)
        return;
    if ((error == EPIPE || error == ECONNRESET || (error == 0 && type == VD_MSG_RELEASE)) &&
        s->requester_control)
        vd_cancel_orphaned(s, "the attacher's handles closed");
    if (error == EPIPE || error == ECONNRESET) {
        /* The attacher's last handle closed, or it died. */
        vd_release(s, -1);
    }
    if (error == 0 && type == VD_MSG_RELEASE)
        vd_release(s, s->control);
    if (error == 0 && type == VD_MSG_DETACH && length == sizeof(struct vd_msg_detach)) {
        struct vd_msg_detach request;
        memcpy(&request, payload, sizeof request);
        vd_detach(s, s->control, &request);
        return;
    }
    if (error == 0 && vd_is_operation_message(type)) {
        vd_forward_operation(s, s->control, type, payload, length);
        return;
    }
    vd_msg_send_result(s->control, ERROR_INVALID_PARAMETER, -1, "not a request this helper takes");
}

static void vd_supervise(struct vd_supervisor *s) __attribute__((noreturn));

static void vd_supervise(struct vd_supervisor *s)
{
    for (;;) {
        struct pollfd fds[4 + VD_MAX_CLIENTS];
        size_t count = 0;
        fds[count++] = (struct pollfd){.fd = s->report_fd, .events = POLLIN};
        fds[count++] = (struct pollfd){.fd = s->control, .events = POLLIN};
        fds[count++] = (struct pollfd){.fd = s->listener, .events = POLLIN};
        fds[count++] = (struct pollfd){.fd = s->requester_pidfd, .events = POLLIN};
        uint64_t now = vd_msg_now_ms(), next = UINT64_MAX;
        for (size_t i = 0; i < s->client_count; i++) {
            fds[count++] = (struct pollfd){.fd = s->clients[i].fd, .events = POLLIN};
            if (s->clients[i].deadline_ms < next)
                next = s->clients[i].deadline_ms;
        }
        int timeout = next == UINT64_MAX ? -1 : next <= now ? 0 : (int)(next - now);
        int n = poll(fds, count, timeout);
        if (n < 0 && errno != EINTR) {
            vd_log(true, "poll: %s", strerror(errno));
            sleep(1);
            continue;
        }
        if (fds[0].revents) {
            /* A report now means the server ended: the device let go of its
               file behind our back (an administrator's losetup -d), or it
               died. */
            struct vd_server_report report;
            if (vd_read_report(s->report_fd, 1000, &report, NULL) == 0 && report.kind == VD_REPORT_ENDED) {
                vd_reap(s->server);
                if (s->loop.fd >= 0)
                    close(s->loop.fd);
                vd_log(report.status != ERROR_SUCCESS, "the server ended by itself (0x%08X)",
                       (unsigned)report.status);
                vd_finish(s, report.status, -1);
            }
            vd_server_died(s);
        }
        /* Before the attacher's channel: the requester's end is its
           operation's, whatever becomes of the attachment. */
        if (s->requester_pidfd >= 0 && fds[3].revents)
            vd_cancel_orphaned(s, "the process that started the operation has exited");
        if (s->control >= 0 && fds[1].revents)
            vd_serve_control(s);
        if (s->listener >= 0 && fds[2].revents)
            vd_accept(s);
        now = vd_msg_now_ms();
        /* From the last: vd_drop_client moves the last entry into the gap. */
        for (size_t i = s->client_count; i-- > 0;) {
            size_t slot = 4 + i;
            if (slot < count && fds[slot].fd == s->clients[i].fd && fds[slot].revents)
                vd_serve_client(s, i);
            else if (s->clients[i].deadline_ms <= now)
                vd_drop_client(s, i); /* silent: it may not hold up anyone else */
        }
    }
}

/* Starts the server and the loop device; answers nothing. */
static DWORD vd_start(struct vd_supervisor *s, int image_fd, const struct vd_msg_attach *request)
{
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", image_fd);
    struct vd_image *image;
    DWORD status = vd_image_open(self, request->device_id, !request->read_only, request->open_flags, &image);
    if (status != ERROR_SUCCESS)
        return status;
    struct stat st;
    if (fstat(image_fd, &st) < 0 || st.st_dev != image->file_dev || st.st_ino != image->file_ino) {
        vd_image_close(image);
        return vd_fail(ERROR_FILE_NOT_FOUND, "%s changed while being attached", s->image_path);
    }
    int report[2], ops[2];
    /* Reports carry the mount's root (SCM_RIGHTS): a socket, not a pipe. */
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, report) < 0) {
        vd_image_close(image);
        return vd_fail_errno(errno, "creating the server's report channel");
    }
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ops) < 0) {
        close(report[0]);
        close(report[1]);
        vd_image_close(image);
        return vd_fail_errno(errno, "creating the server's operations channel");
    }
    /* This process has one thread: fork is safe here. */
    s->server = fork();
    if (s->server == 0) {
        close(report[0]);
        close(ops[0]);
        close(s->control);
        close(image_fd); /* the handle's own: its lock must end with the handle */
        vd_drop_claims(s); /* the supervisor's to hold: they end with it */
        vd_server_main(image, !request->read_only, report[1], ops[1]);
    }
    int fork_error = errno;
    vd_image_close(image); /* the server has its own copies */
    close(report[1]);
    close(ops[1]);
    s->ops_fd = ops[0];
    s->report_fd = report[0];
    if (s->server < 0)
        return vd_fail_errno(fork_error, "starting the server process");

    struct vd_server_report ready;
    int root_fd = -1;
    int error = vd_read_report(s->report_fd, VD_ATTACH_REQUEST_MS, &ready, &root_fd);
    if (error) {
        kill(s->server, SIGKILL);
        vd_reap(s->server);
        return vd_fail(ERROR_GEN_FAILURE, "the server of %s %s before mounting", s->image_path,
                       error == ETIMEDOUT ? "hung" : "died");
    }
    if (ready.status != ERROR_SUCCESS) {
        if (root_fd >= 0)
            close(root_fd);
        vd_reap(s->server);
        return vd_fail(ready.status, "%s", ready.text);
    }
    /* The mount is in no namespace (fuseserve.h): the file is reached only
       through its root, which the server handed over. */
    int disk_fd = root_fd < 0 ? (errno = EBADF, -1)
                              : openat(root_fd, VD_FUSE_DISK_NAME,
                                       (request->read_only ? O_RDONLY : O_RDWR) | O_NOFOLLOW | O_CLOEXEC);
    if (disk_fd < 0)
        status = vd_fail_errno(errno, "opening the FUSE view of %s", s->image_path);
    if (root_fd >= 0)
        close(root_fd); /* from here the file alone holds the mount */
    struct stat disk_st;
    if (status == ERROR_SUCCESS && fstat(disk_fd, &disk_st) < 0)
        status = vd_fail_errno(errno, "examining the FUSE view of %s", s->image_path);
    if (status == ERROR_SUCCESS) {
        s->backing_dev = (uint64_t)disk_st.st_dev;
        s->backing_ino = (uint64_t)disk_st.st_ino;
        struct vd_loop_request loop_request = {
            .backing_fd = disk_fd,
            .offset = 0,
            .size = (uint64_t)disk_st.st_size,
            .block_size = (uint32_t)disk_st.st_blksize,
            .read_only = request->read_only,
            .autoclear = true,
            /* The FUSE file's page cache would only duplicate the loop
               device's own, and direct I/O keeps many requests in flight
               (benchmarks/attached_io.py). */
            .direct_io = true,
            .name = s->image_path,
        };
        status = vd_loop_attach(&loop_request, &s->loop);
    }
    if (disk_fd >= 0)
        close(disk_fd); /* the loop device holds its own reference: the session lives while it does */
    if (status != ERROR_SUCCESS) {
        if (s->loop.fd >= 0) {
            close(s->loop.fd); /* autoclear: the only holder closing detaches */
            s->loop.fd = -1;
        }
        DWORD ended = vd_wait_server(s, VD_SERVER_END_MS);
        if (ended == ERROR_BUSY) {
            kill(s->server, SIGKILL);
            vd_reap(s->server);
        }
        return status;
    }
    /* The attachment's marker (share.h), held here too, on a description of
       its own: the server's goes when the server ends, but the claims this
       process holds go only after it, and an image that shows no marker
       must hold none of them (vd_share_settle waits for a marker with no
       device behind it).  Then /dev/loopN's descriptor above every other:
       a dying supervisor closes its claims, then the marker, then the
       device (close_files() walks upwards; claims are received first, so
       they sit lowest). */
    int marker = open(self, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (marker < 0 || vd_share_mark_attached(marker) != ERROR_SUCCESS)
        vd_log(true, "could not mark %s as attached from the supervisor: %s", s->image_path,
               marker < 0 ? strerror(errno) : vd_last_error_detail());
    else if ((s->marker_fd = fcntl(marker, F_DUPFD_CLOEXEC, VD_MARKER_FD_MIN)) < 0)
        vd_log(true, "could not move the marker of %s: %s", s->image_path, strerror(errno));
    if (marker >= 0)
        close(marker); /* the copy above holds the lock: same description */
    int high = fcntl(s->loop.fd, F_DUPFD_CLOEXEC, VD_LOOP_FD_MIN);
    if (high >= 0) {
        close(s->loop.fd);
        s->loop.fd = high;
    }
    struct vd_record record = {.loop = s->loop.number,
                               .pid = (long)getpid(),
                               .permanent = request->permanent,
                               .backing_dev = s->backing_dev,
                               .backing_ino = s->backing_ino};
    /* Every attachment listens: any privileged process's handle may mirror
       it, as on Windows; only a permanent one takes DETACH (vd_serve_client). */
    {
        status = vd_socket_address(s->base, (long)getpid(), &s->address);
        if (status == ERROR_SUCCESS) {
            s->listener = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
            if (s->listener < 0 || bind(s->listener, (struct sockaddr *)&s->address, sizeof s->address) < 0 ||
                listen(s->listener, VD_MAX_CLIENTS) < 0) {
                status = vd_fail_errno(errno, "listening on %s", s->address.sun_path);
                if (s->listener >= 0)
                    close(s->listener);
                s->listener = -1;
            }
        }
    }
    if (status == ERROR_SUCCESS)
        status = vd_record_write(s->base, &record, s->image_path);
    return status;
}

/* Sets up stdio (the log on stderr) once the image is known. */
static void vd_open_log(const char *base)
{
    int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    int log_fd = -1, run_dir;
    if (vd_run_dir(&run_dir) == ERROR_SUCCESS) {
        char name[96];
        snprintf(name, sizeof name, "%s.log", base);
        /* A new log per attachment: the last one's tale is over. */
        unlinkat(run_dir, name, 0);
        vd_run_create(run_dir, name, O_WRONLY | O_APPEND, 0600, &log_fd);
        close(run_dir);
    }
    if (null_fd >= 0) {
        dup2(null_fd, STDIN_FILENO);
        dup2(null_fd, STDOUT_FILENO);
    }
    dup2(log_fd >= 0 ? log_fd : null_fd, STDERR_FILENO);
    if (log_fd > STDERR_FILENO)
        close(log_fd);
    if (null_fd > STDERR_FILENO)
        close(null_fd);
}

static void vd_supervisor_main(int control) __attribute__((noreturn));

static void vd_supervisor_main(int control)
{
    struct vd_supervisor s = {.control = control, .listener = -1, .server = -1, .report_fd = -1, .ops_fd = -1,
                              .loop = {.number = -1, .fd = -1}, .attach_claim = -1, .marker_fd = -1,
                              .requester_pidfd = -1};
    uint16_t type;
    char payload[VD_MSG_MAX_PAYLOAD];
    size_t length;
    int image_fd;
    struct vd_msg_attach request;
    int error = vd_msg_recv(control, VD_ATTACH_REQUEST_MS, &type, payload, sizeof payload, &length, &image_fd);
    while (!error && type == VD_MSG_CLAIM && image_fd >= 0 && s.claim_count < VD_MAX_CLAIMS) {
        struct vd_msg_claim claim;
        if (length == sizeof claim && (memcpy(&claim, payload, sizeof claim), claim.attach) && s.attach_claim < 0)
            s.attach_claim = image_fd;
        else
            s.claims[s.claim_count++] = image_fd;
        error = vd_msg_recv(control, VD_ATTACH_REQUEST_MS, &type, payload, sizeof payload, &length, &image_fd);
    }
    struct stat st;
    if (error || type != VD_MSG_ATTACH || length <= sizeof request || payload[length - 1] != '\0' ||
        image_fd < 0 || fstat(image_fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        vd_msg_send_result(control, ERROR_INVALID_PARAMETER, -1, "the helper got no valid attach request");
        _exit(2);
    }
    memcpy(&request, payload, sizeof request);
    s.image_path = payload + sizeof request;
    s.permanent = request.permanent;
    vd_record_base(st.st_dev, st.st_ino, s.base, sizeof s.base);
    memcpy(s.log_base, s.base, sizeof s.log_base);
    s.image_dev = st.st_dev;
    s.image_ino = st.st_ino;
    vd_open_log(s.base);
    vd_run_collect_garbage();
    vd_clear_detail();
    DWORD status = vd_start(&s, image_fd, &request);
    close(image_fd);
    if (status != ERROR_SUCCESS) {
        vd_log(true, "attaching %s failed (0x%08X): %s", s.image_path, (unsigned)status, vd_last_error_detail());
        vd_finish(&s, status, control);
    }
    vd_log(false, "serving %s (%s, %s) on /dev/loop%d", s.image_path,
           request.read_only ? "read-only" : "read-write", s.permanent ? "permanent" : "until its handles close",
           s.loop.number);
    if (vd_msg_send_result(control, ERROR_SUCCESS, s.loop.number, "") != 0)
        vd_release(&s, -1); /* the attacher is gone: nobody was told */
    if (s.permanent) {
        /* Ours only once the attacher confirms it heard of it; a caller that
           died or gave up before must not find it attached. */
        error = vd_msg_recv(control, VD_ATTACH_REQUEST_MS, &type, payload, sizeof payload, &length, NULL);
        if (error || type != VD_MSG_KEEP) {
            vd_log(false, "the attacher left before taking the attachment; undoing it");
            vd_release(&s, -1);
        }
        close(control);
        s.control = -1;
    }
    vd_supervise(&s);
}

/* close_range(2) without glibc 2.34's wrapper (manylinux builds target 2.28),
   and by hand on kernels before 5.9, which lack the call: no descriptor in
   the range may survive either way. */
#ifndef SYS_close_range
#define SYS_close_range 436 /* one number on every architecture (Linux 5.9) */
#endif

static void vd_close_range(unsigned first, unsigned last)
{
    if (syscall(SYS_close_range, first, last, 0) == 0)
        return;
    struct rlimit limit;
    unsigned end = getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY
                       ? (unsigned)limit.rlim_cur
                       : 65536;
    for (unsigned fd = first; fd <= last && fd < end; fd++)
        close((int)fd);
}

void vd_serve_main(int control_fd)
{
    /* Nothing of the interpreter's state matters from here on: this never
       returns into it. */
    for (int sig = 1; sig < NSIG; sig++)
        signal(sig, SIG_DFL);
    signal(SIGPIPE, SIG_IGN);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    umask(077);
    if (chdir("/") < 0) {
        /* "/" always exists; nothing depends on the directory anyway. */
    }
    if (control_fd > STDERR_FILENO + 1)
        vd_close_range(STDERR_FILENO + 1, (unsigned)control_fd - 1);
    vd_close_range((unsigned)control_fd + 1, ~0u);
    fcntl(control_fd, F_SETFD, FD_CLOEXEC);
    /* Leave the attacher, which reaps this process: the supervisor goes on
       as nobody's child (no zombie for the attacher to collect later). */
    pid_t child = fork();
    if (child != 0)
        _exit(child < 0 ? 1 : 0);
    prctl(PR_SET_NAME, "virtdisk-serve");
    vd_supervisor_main(control_fd);
}
