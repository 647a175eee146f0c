/*
 * FUSE-served attachments: in-process and helper-process servers, their
 * records, and the helper's control socket (see fuseattach.h).
 *
 * Kernel facts this relies on, tested on 6.18 (tests/test_attach_served.py):
 *   - A FUSE mount detached with MNT_DETACH stays alive while a loop device
 *     holds its file, and is destroyed when the loop device releases it; the
 *     kernel then aborts the connection and the server's read of /dev/fuse
 *     fails with ENODEV, which ends libfuse's session loop.
 *   - When a process dies, its files are released in descending descriptor
 *     order (close_files() walks upwards, and the deferred releases run last
 *     queued first).  The last release of a loop device syncs its dirty
 *     pages through the FUSE file: were /dev/fuse still open then, with no
 *     thread left to answer, that sync would wait forever.  So every holder
 *     keeps a duplicate of its /dev/fuse descriptor above its loop
 *     descriptor: /dev/fuse goes first, the connection is aborted, and the
 *     sync fails fast instead.
 */
#define _GNU_SOURCE
#include "fuseattach.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "errors.h"
#include "fuseserve.h"
#include "rundir.h"
#include "share.h"

/* How long a detach waits for a server whose loop device is gone to flush
   and end; it only has the final flush left to do. */
enum { VD_SERVER_END_MS = 60000 };

struct vd_served {
    struct vd_fuse_server *server;
    int fuse_dup;             /* /dev/fuse above the loop descriptor (see top) */
    char base[64];            /* <dev>-<ino>: its names in the run directory */
};

/* Descriptors a helper keeps: the report pipe and a differencing chain's
   files and sharing claims. */
enum { VD_MAX_KEEP_FDS = 1 + 2 * 300 };

/* What the helper tells the attaching process. */
struct vd_helper_report {
    DWORD status;
    int number;
    char detail[512];
};

static void vd_record_base(const struct vd_image *image, char *base, size_t size)
{
    snprintf(base, size, "%" PRIx64 "-%" PRIx64, (uint64_t)image->file_dev,
             (uint64_t)image->file_ino);
}

static void vd_path_with(const char *base, const char *suffix, char *out, size_t size)
{
    snprintf(out, size, "%s%s", base, suffix);
}

/* ---- records -------------------------------------------------------------- */

struct vd_record {
    int loop;
    long pid;
    bool permanent;
    uint64_t backing_dev; /* the FUSE file the loop device holds */
    uint64_t backing_ino;
};

static void vd_json_string(FILE *file, const char *text)
{
    fputc('"', file);
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(file, "\\%c", *p);
        else if (*p < 0x20)
            fprintf(file, "\\u%04x", *p);
        else
            fputc(*p, file);
    }
    fputc('"', file);
}

/* One JSON object, the numbers first so that a reader can take them without
   parsing the path; written aside and renamed into place. */
static DWORD vd_record_write(const char *base, const struct vd_record *record, const char *image_path)
{
    char path[96], temporary[128];
    vd_path_with(base, ".json", path, sizeof path);
    snprintf(temporary, sizeof temporary, "%s.%ld", path, (long)getpid());
    int dir, fd = -1;
    DWORD status = vd_run_dir(&dir);
    if (status != ERROR_SUCCESS)
        return status;
    /* A temporary of a dead process that had this pid. */
    unlinkat(dir, temporary, 0);
    status = vd_run_create(dir, temporary, O_WRONLY, 0600, &fd);
    FILE *file = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!file) {
        if (fd >= 0) {
            status = vd_fail_errno(errno, "writing %s/%s", vd_run_dir_path(), temporary);
            close(fd);
            unlinkat(dir, temporary, 0);
        }
        close(dir);
        return status;
    }
    fprintf(file,
            "{\"loop\": %d, \"pid\": %ld, \"permanent\": %s, \"backing_dev\": %" PRIu64
            ", \"backing_ino\": %" PRIu64 ", \"device\": \"/dev/loop%d\", \"image\": ",
            record->loop, record->pid, record->permanent ? "true" : "false", record->backing_dev,
            record->backing_ino, record->loop);
    vd_json_string(file, image_path);
    fprintf(file, "}\n");
    if (fclose(file) != 0 || renameat(dir, temporary, dir, path) < 0) {
        status = vd_fail_errno(errno, "writing %s/%s", vd_run_dir_path(), path);
        unlinkat(dir, temporary, 0);
    }
    close(dir);
    return status;
}

static bool vd_record_read(const char *base, const char *suffix, struct vd_record *record)
{
    char path[96], text[512];
    vd_path_with(base, suffix, path, sizeof path);
    int dir;
    if (vd_run_dir(&dir) != ERROR_SUCCESS)
        return false;
    int fd = vd_run_open_existing(dir, path);
    close(dir);
    if (fd < 0)
        return false;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return false;
    text[n] = '\0';
    char permanent[8];
    return sscanf(text,
                  "{\"loop\": %d, \"pid\": %ld, \"permanent\": %7[a-z], \"backing_dev\": %" SCNu64
                  ", \"backing_ino\": %" SCNu64,
                  &record->loop, &record->pid, permanent, &record->backing_dev, &record->backing_ino) == 5 &&
           (record->permanent = strcmp(permanent, "true") == 0, record->loop >= 0);
}

/* Removes base+suffix from the run directory. */
static void vd_run_remove(const char *base, const char *suffix)
{
    char path[96];
    int dir;
    vd_path_with(base, suffix, path, sizeof path);
    if (vd_run_dir(&dir) != ERROR_SUCCESS)
        return;
    unlinkat(dir, path, 0);
    close(dir);
}

/* A record of an attachment on its way out: the last handle closed, but
   something still holds the device.  Out of the way of readers of live
   records (*.json), still found by vd_served_find(). */
#define VD_CLOSING_SUFFIX ".closing"

static void vd_record_remove(const char *base)
{
    vd_run_remove(base, ".json");
    vd_run_remove(base, VD_CLOSING_SUFFIX);
}

static void vd_record_mark_closing(const char *base)
{
    char from[96], to[96];
    int dir;
    vd_path_with(base, ".json", from, sizeof from);
    vd_path_with(base, VD_CLOSING_SUFFIX, to, sizeof to);
    if (vd_run_dir(&dir) != ERROR_SUCCESS)
        return;
    if (renameat(dir, from, dir, to) < 0)
        unlinkat(dir, from, 0);
    close(dir);
}

/* The helper's socket address: by name, as bind() and connect() need, in the
   checked run directory. */
static DWORD vd_socket_address(const char *base, struct sockaddr_un *address)
{
    memset(address, 0, sizeof *address);
    address->sun_family = AF_UNIX;
    int length = snprintf(address->sun_path, sizeof address->sun_path, "%s/%s.sock", vd_run_dir_path(), base);
    if (length < 0 || (size_t)length >= sizeof address->sun_path)
        return vd_fail(ERROR_FILENAME_EXCED_RANGE, "the run directory %s is too long for a socket path",
                       vd_run_dir_path());
    return ERROR_SUCCESS;
}

/* Removes the records (and sockets) of servers that were killed: a record
   whose process is gone.  Logs stay. */
static void vd_records_collect_garbage(void)
{
    int dir_fd;
    if (vd_run_dir(&dir_fd) != ERROR_SUCCESS)
        return;
    DIR *dir = fdopendir(dir_fd);
    if (!dir) {
        close(dir_fd);
        return;
    }
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        size_t length = strlen(entry->d_name);
        if (length < 6 || strcmp(entry->d_name + length - 5, ".json") != 0 || length - 5 >= 80)
            continue;
        char base[64];
        struct vd_record record;
        if (length - 5 >= sizeof base)
            continue;
        snprintf(base, sizeof base, "%.*s", (int)(length - 5), entry->d_name);
        if (!vd_record_read(base, ".json", &record) || record.pid <= 0 || kill((pid_t)record.pid, 0) == 0 ||
            errno != ESRCH)
            continue;
        char path[96];
        vd_path_with(base, ".json", path, sizeof path);
        unlinkat(dir_fd, path, 0);
        vd_path_with(base, ".sock", path, sizeof path);
        unlinkat(dir_fd, path, 0);
    }
    closedir(dir);
}

int vd_served_find(const struct vd_image *image, bool *helper)
{
    char base[64];
    struct vd_record record;
    vd_record_base(image, base, sizeof base);
    if (!vd_record_read(base, ".json", &record) && !vd_record_read(base, VD_CLOSING_SUFFIX, &record))
        return -1;
    /* A record outlives a killed server; the device it names may even have
       been reused since.  Only the device's own answer counts. */
    if (!vd_loop_is_backed_by(record.loop, (dev_t)record.backing_dev, (ino_t)record.backing_ino))
        return -1;
    *helper = record.permanent;
    return record.loop;
}

/* ---- attaching ------------------------------------------------------------ */

/* Opens the image again for its server: new open file descriptions (its
   marker must live as long as the server, not as the handle), the parents
   read-only, the image itself read-only for a read-only attach. */
static DWORD vd_served_open_image(const struct vd_image *image, bool read_only, struct vd_image **out)
{
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", image->fd);
    DWORD status = vd_image_open(self, image->format->device_id, !read_only, image->open_flags, out);
    if (status == ERROR_SUCCESS && ((*out)->file_dev != image->file_dev || (*out)->file_ino != image->file_ino))
        status = vd_fail(ERROR_FILE_NOT_FOUND, "%s changed while being attached", image->path);
    /* The server's own claims (share.h), for as long as it serves: a
       read-only attachment keeps the image read-only, a read-write one is
       its writer, and the parents are held read-only.  The attaching
       handle's claim does not count against them. */
    if (status == ERROR_SUCCESS && read_only)
        status = vd_share_claim(*out, 0, VD_SHARE_WRITE, image->share_fd, "attaching read-only",
                                &(*out)->share_fd);
    if (status == ERROR_SUCCESS)
        status = vd_share_open_chain(*out, image->share_fd);
    if (status != ERROR_SUCCESS)
        vd_image_close(*out);
    return status;
}

/* Serves image (owned from here on) and attaches a held, autoclear loop
   device on it.  On success the mount is already hidden. */
static DWORD vd_served_start(struct vd_image *image, bool read_only, struct vd_served *served,
                             struct vd_loop *loop, struct vd_record *record)
{
    served->fuse_dup = -1;
    served->server = NULL;
    const char *name = image->path;
    uint64_t size = image->virtual_size;
    uint32_t block_size = image->logical_sector_size;
    char *name_copy = strdup(name);
    if (!name_copy) {
        vd_image_close(image);
        return vd_fail(ERROR_OUTOFMEMORY, "allocating a path");
    }
    DWORD status = vd_fuse_serve(image, !read_only, &served->server);
    if (status != ERROR_SUCCESS) {
        free(name_copy);
        return status;
    }
    status = vd_share_mark_attached(vd_fuse_image(served->server)->fd);
    int disk_fd = -1;
    if (status == ERROR_SUCCESS)
        disk_fd = vd_fuse_open_disk(served->server, !read_only, &status);
    struct stat st;
    if (disk_fd >= 0 && fstat(disk_fd, &st) < 0)
        status = vd_fail_errno(errno, "examining the FUSE view of %s", name_copy);
    if (status == ERROR_SUCCESS) {
        struct vd_loop_request request = {
            .backing_fd = disk_fd,
            .offset = 0,
            .size = size,
            .block_size = block_size,
            .read_only = read_only,
            .autoclear = true,
            /* The FUSE file's page cache would only duplicate the loop
               device's own, and direct I/O keeps many requests in flight
               (benchmarks/attached_io.py: sequential reads up to twice as
               fast here). */
            .direct_io = true,
            .name = name_copy,
        };
        status = vd_loop_attach(&request, loop);
    }
    if (disk_fd >= 0)
        close(disk_fd); /* the loop device holds its own reference */
    free(name_copy);
    if (status == ERROR_SUCCESS) {
        record->loop = loop->number;
        record->backing_dev = (uint64_t)st.st_dev;
        record->backing_ino = (uint64_t)st.st_ino;
        served->fuse_dup = fcntl(vd_fuse_device_fd(served->server), F_DUPFD_CLOEXEC, loop->fd + 1);
        if (served->fuse_dup < 0)
            status = vd_fail_errno(errno, "duplicating the /dev/fuse descriptor");
    }
    DWORD hidden = vd_fuse_hide(served->server);
    if (status == ERROR_SUCCESS)
        status = hidden;
    if (status != ERROR_SUCCESS) {
        if (loop->fd >= 0) {
            close(loop->fd); /* autoclear: the only holder closing detaches */
            loop->fd = -1;
        }
        if (served->fuse_dup >= 0)
            close(served->fuse_dup);
        served->fuse_dup = -1;
        if (vd_fuse_wait(served->server, VD_SERVER_END_MS) == ERROR_BUSY)
            vd_fuse_abandon(served->server);
        served->server = NULL;
    }
    return status;
}

static DWORD vd_served_attach_here(const struct vd_image *image, bool read_only, struct vd_loop *loop,
                                   struct vd_served **out)
{
    struct vd_served *served = calloc(1, sizeof *served);
    if (!served)
        return vd_fail(ERROR_OUTOFMEMORY, "allocating an attachment");
    vd_record_base(image, served->base, sizeof served->base);
    struct vd_image *server_image;
    DWORD status = vd_served_open_image(image, read_only, &server_image);
    struct vd_record record = {.pid = (long)getpid(), .permanent = false};
    loop->fd = -1;
    if (status == ERROR_SUCCESS)
        status = vd_served_start(server_image, read_only, served, loop, &record);
    if (status == ERROR_SUCCESS) {
        status = vd_record_write(served->base, &record, image->path);
        if (status != ERROR_SUCCESS) {
            close(loop->fd);
            loop->fd = -1;
            vd_served_end(served, loop->number);
            return status;
        }
    }
    if (status != ERROR_SUCCESS) {
        free(served);
        return status;
    }
    *out = served;
    return ERROR_SUCCESS;
}

DWORD vd_served_end(struct vd_served *served, int number)
{
    DWORD status = ERROR_SUCCESS;
    if (vd_loop_is_bound(number)) {
        /* The record stays while the device does, as closing: it is how
           the next user of the image finds this attachment on its way out
           and waits for it (share.h, vd_share_settle()); it stops counting
           when the device lets go of the FUSE file. */
        vd_record_mark_closing(served->base);
        vd_fuse_abandon(served->server);
    } else {
        vd_record_remove(served->base);
        status = vd_fuse_wait(served->server, VD_SERVER_END_MS);
        if (status == ERROR_BUSY)
            vd_fuse_abandon(served->server); /* it ends when the kernel lets go */
    }
    if (served->fuse_dup >= 0)
        close(served->fuse_dup);
    free(served);
    return status;
}

/* ---- the helper process --------------------------------------------------- */

static void vd_log(const char *format, ...) __attribute__((format(printf, 1, 2)));

static void vd_log(const char *format, ...)
{
    char stamp[32];
    time_t now = time(NULL);
    struct tm tm;
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", localtime_r(&now, &tm));
    char message[1024];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    dprintf(STDERR_FILENO, "%s virtdisk helper %ld: %s\n", stamp, (long)getpid(), message);
}

static int vd_compare_fd(const void *a, const void *b)
{
    return *(const int *)a - *(const int *)b;
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

/* Closes every inherited descriptor but the ones listed: the caller's handle
   descriptors carry locks that must end with the handles, its loop and
   /dev/fuse descriptors must end with the caller. */
static void vd_close_all_but(int *keep, size_t count)
{
    qsort(keep, count, sizeof *keep, vd_compare_fd);
    unsigned first = 3;
    for (size_t i = 0; i < count; i++) {
        if ((unsigned)keep[i] >= first) {
            if ((unsigned)keep[i] > first)
                vd_close_range(first, (unsigned)keep[i] - 1);
            first = (unsigned)keep[i] + 1;
        }
    }
    vd_close_range(first, ~0u);
}

static void vd_helper_reply(int fd, DWORD status, const char *detail)
{
    dprintf(fd, "%08X %s\n", (unsigned)status, status == ERROR_SUCCESS ? "" : detail);
}

/* Serves detach requests until one succeeds. */
static void vd_helper_serve(int listener, struct vd_served *served, struct vd_loop *loop, const char *image_path)
{
    for (;;) {
        int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (client < 0) {
            if (errno != EINTR && errno != ECONNABORTED)
                vd_log("accept: %s", strerror(errno));
            continue;
        }
        char command[32] = {0};
        ssize_t n = read(client, command, sizeof command - 1);
        struct ucred peer;
        socklen_t peer_size = sizeof peer;
        if (getsockopt(client, SOL_SOCKET, SO_PEERCRED, &peer, &peer_size) < 0 || peer.uid != 0 || n <= 0 ||
            strncmp(command, "detach\n", 7) != 0) {
            vd_helper_reply(client, ERROR_ACCESS_DENIED, "not a detach request from root");
            close(client);
            continue;
        }
        vd_clear_detail();
        int number = loop->number;
        DWORD status = vd_loop_detach(number, &loop->fd);
        if (status != ERROR_SUCCESS) {
            vd_log("detach refused (0x%08X): %s", (unsigned)status, vd_last_error_detail());
            vd_helper_reply(client, status, vd_last_error_detail());
            close(client);
            continue;
        }
        vd_run_remove(served->base, ".sock");
        status = vd_served_end(served, number);
        vd_log("detached /dev/loop%d from %s; final flush 0x%08X", number, image_path, (unsigned)status);
        vd_helper_reply(client, status, vd_last_error_detail());
        /* The client waits for this process to end: its end of the
           connection closes with the process. */
        _exit(status == ERROR_SUCCESS ? 0 : 1);
    }
}

static void vd_helper_main(struct vd_image *image, bool read_only, int report_fd) __attribute__((noreturn));

static void vd_helper_main(struct vd_image *image, bool read_only, int report_fd)
{
    int keep[VD_MAX_KEEP_FDS];
    size_t count = 0;
    keep[count++] = report_fd;
    for (struct vd_image *i = image; i && count + 2 <= VD_MAX_KEEP_FDS; i = i->parent) {
        keep[count++] = i->fd;
        if (i->share_fd >= 0)
            keep[count++] = i->share_fd;
    }
    vd_close_all_but(keep, count);
    prctl(PR_SET_NAME, "virtdisk-serve");

    char base[64];
    vd_record_base(image, base, sizeof base);
    char log_name[96];
    vd_path_with(base, ".log", log_name, sizeof log_name);
    int log_fd = -1, run_dir;
    if (vd_run_dir(&run_dir) == ERROR_SUCCESS) {
        /* A new log per attachment: the last one's tale is over. */
        unlinkat(run_dir, log_name, 0);
        vd_run_create(run_dir, log_name, O_WRONLY | O_APPEND, 0600, &log_fd);
        close(run_dir);
    }
    int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null_fd >= 0)
        dup2(null_fd, STDIN_FILENO);
    dup2(log_fd >= 0 ? log_fd : null_fd, STDOUT_FILENO);
    dup2(log_fd >= 0 ? log_fd : null_fd, STDERR_FILENO);
    if (log_fd > STDERR_FILENO)
        close(log_fd);
    if (null_fd > STDERR_FILENO)
        close(null_fd);
    if (chdir("/") < 0) {
        /* "/" always exists; nothing depends on the directory anyway. */
    }
    umask(077);
    /* The caller's signal handlers belong to its runtime, not to this
       process. */
    for (int sig = 1; sig < NSIG; sig++)
        signal(sig, SIG_DFL);
    signal(SIGPIPE, SIG_IGN);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    char *image_path = strdup(image->path);
    struct vd_helper_report report = {.number = -1};
    struct vd_record record = {.pid = (long)getpid(), .permanent = true};
    struct vd_loop loop = {.number = -1, .fd = -1};
    struct vd_served *served = calloc(1, sizeof *served);
    vd_clear_detail();
    if (!image_path || !served) {
        vd_image_close(image);
        report.status = vd_fail(ERROR_OUTOFMEMORY, "allocating the helper's state");
    } else {
        snprintf(served->base, sizeof served->base, "%s", base);
        report.status = vd_served_start(image, read_only, served, &loop, &record);
    }

    int listener = -1;
    struct sockaddr_un address;
    if (report.status == ERROR_SUCCESS)
        report.status = vd_socket_address(base, &address);
    if (report.status == ERROR_SUCCESS) {
        vd_run_remove(base, ".sock");
        listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (listener < 0 || bind(listener, (struct sockaddr *)&address, sizeof address) < 0 ||
            listen(listener, 8) < 0)
            report.status = vd_fail_errno(errno, "listening on %s", address.sun_path);
    }
    if (report.status == ERROR_SUCCESS)
        report.status = vd_record_write(base, &record, image_path);
    if (report.status == ERROR_SUCCESS) {
        report.number = loop.number;
        vd_log("serving %s (%s) on /dev/loop%d", image_path, read_only ? "read-only" : "read-write", loop.number);
    } else {
        snprintf(report.detail, sizeof report.detail, "%s", vd_last_error_detail());
        vd_log("attaching %s failed (0x%08X): %s", image_path, (unsigned)report.status, report.detail);
    }
    ssize_t written = write(report_fd, &report, sizeof report);
    close(report_fd);
    if (report.status != ERROR_SUCCESS || written != (ssize_t)sizeof report) {
        if (loop.fd >= 0) {
            close(loop.fd);
            vd_served_end(served, loop.number);
        }
        _exit(1);
    }
    vd_helper_serve(listener, served, &loop, image_path);
    _exit(1);
}

static DWORD vd_served_attach_helper(const struct vd_image *image, bool read_only, struct vd_loop *loop)
{
    struct vd_image *server_image;
    DWORD status = vd_served_open_image(image, read_only, &server_image);
    if (status != ERROR_SUCCESS)
        return status;
    int report_pipe[2];
    if (pipe2(report_pipe, O_CLOEXEC) < 0) {
        status = vd_fail_errno(errno, "creating a pipe for the helper");
        vd_image_close(server_image);
        return status;
    }
    /* Double fork: the helper is nobody's child here (no zombie for the
       caller to reap) and leads no session (no controlling terminal). */
    pid_t child = fork();
    if (child == 0) {
        close(report_pipe[0]);
        setsid();
        pid_t helper = fork();
        if (helper != 0)
            _exit(helper < 0 ? 1 : 0);
        vd_helper_main(server_image, read_only, report_pipe[1]);
    }
    int fork_error = errno;
    close(report_pipe[1]);
    vd_image_close(server_image); /* the helper has its own copies */
    if (child < 0) {
        close(report_pipe[0]);
        return vd_fail_errno(fork_error, "starting the helper process");
    }
    while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
        continue;

    struct vd_helper_report report;
    size_t got = 0;
    while (got < sizeof report) {
        ssize_t n = read(report_pipe[0], (char *)&report + got, sizeof report - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(report_pipe[0]);
    if (got != sizeof report) {
        char base[64];
        vd_record_base(image, base, sizeof base);
        return vd_fail(ERROR_GEN_FAILURE, "the helper serving %s ended before attaching (see %s/%s.log)",
                       image->path, vd_run_dir_path(), base);
    }
    if (report.status != ERROR_SUCCESS) {
        report.detail[sizeof report.detail - 1] = '\0';
        return vd_fail(report.status, "%s", report.detail);
    }
    loop->number = report.number;
    loop->fd = -1;
    return ERROR_SUCCESS;
}

DWORD vd_served_attach(const struct vd_image *image, bool read_only, bool permanent, struct vd_loop *loop,
                       struct vd_served **out)
{
    *out = NULL;
    /* Before any mount: without the privilege nothing may be touched. */
    DWORD status = vd_loop_require_privilege("attaching a virtual disk");
    if (status != ERROR_SUCCESS)
        return status;
    vd_records_collect_garbage();
    if (permanent)
        return vd_served_attach_helper(image, read_only, loop);
    return vd_served_attach_here(image, read_only, loop, out);
}

/* ---- detaching through the helper --------------------------------------- */

DWORD vd_served_detach(const struct vd_image *image)
{
    DWORD privilege = vd_loop_require_privilege("detaching a virtual disk");
    if (privilege != ERROR_SUCCESS)
        return privilege;
    char base[64];
    struct sockaddr_un address;
    vd_record_base(image, base, sizeof base);
    DWORD checked = vd_socket_address(base, &address);
    if (checked != ERROR_SUCCESS)
        return checked;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return vd_fail_errno(errno, "creating a socket");
    if (connect(fd, (struct sockaddr *)&address, sizeof address) < 0) {
        DWORD status = vd_fail(ERROR_NOT_READY, "%s is not attached any more (its helper is gone: %s)",
                               image->path, strerror(errno));
        close(fd);
        return status;
    }
    static const char command[] = "detach\n";
    char reply[640];
    size_t got = 0;
    DWORD status = ERROR_SUCCESS;
    if (write(fd, command, sizeof command - 1) != (ssize_t)(sizeof command - 1))
        status = vd_fail_errno(errno, "asking the helper of %s to detach", image->path);
    /* The reply, then end of file when the helper has exited. */
    while (status == ERROR_SUCCESS && got < sizeof reply - 1) {
        struct pollfd wait = {.fd = fd, .events = POLLIN};
        int ready = poll(&wait, 1, VD_SERVER_END_MS + 5000);
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready <= 0) {
            status = vd_fail(ERROR_BUSY, "the helper of %s did not answer", image->path);
            break;
        }
        ssize_t n = read(fd, reply + got, sizeof reply - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    if (status != ERROR_SUCCESS)
        return status;
    reply[got] = '\0';
    unsigned code;
    char *newline = strchr(reply, '\n');
    if (!newline || sscanf(reply, "%8X", &code) != 1)
        return vd_fail(ERROR_GEN_FAILURE, "the helper of %s ended without answering", image->path);
    *newline = '\0';
    if (code != ERROR_SUCCESS)
        return vd_fail((DWORD)code, "%s", reply + 9);
    return ERROR_SUCCESS;
}
