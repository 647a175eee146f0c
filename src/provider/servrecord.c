/*
 * Served attachments' files in the run directory (see servrecord.h).
 */
#define _GNU_SOURCE
#include "servrecord.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "errors.h"
#include "rundir.h"
#include "share.h"

void vd_record_base(dev_t dev, ino_t ino, char *base, size_t size)
{
    snprintf(base, size, "%" PRIx64 "-%" PRIx64, (uint64_t)dev, (uint64_t)ino);
}

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
DWORD vd_record_write(const char *base, const struct vd_record *record, const char *image_path)
{
    char path[96], temporary[128];
    snprintf(path, sizeof path, "%s.json", base);
    snprintf(temporary, sizeof temporary, "%s.%ld", path, (long)getpid());
    int dir, fd = -1;
    DWORD status = vd_run_dir(&dir);
    if (status != ERROR_SUCCESS)
        return status;
    unlinkat(dir, temporary, 0); /* left by a dead process that had this pid */
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

/* The text of base's record, NUL-terminated (truncated to size). */
static bool vd_record_text(int dir, const char *base, char *text, size_t size)
{
    char name[96];
    snprintf(name, sizeof name, "%s.json", base);
    int fd = vd_run_open_existing(dir, name);
    if (fd < 0)
        return false;
    ssize_t n = read(fd, text, size - 1);
    close(fd);
    if (n <= 0)
        return false;
    text[n] = '\0';
    return true;
}

static bool vd_record_read_at(int dir, const char *base, struct vd_record *record)
{
    char text[512];
    if (!vd_record_text(dir, base, text, sizeof text))
        return false;
    char permanent[8];
    return sscanf(text,
                  "{\"loop\": %d, \"pid\": %ld, \"permanent\": %7[a-z], \"backing_dev\": %" SCNu64
                  ", \"backing_ino\": %" SCNu64,
                  &record->loop, &record->pid, permanent, &record->backing_dev, &record->backing_ino) == 5 &&
           (record->permanent = strcmp(permanent, "true") == 0, record->loop >= 0);
}

bool vd_record_read(const char *base, struct vd_record *record)
{
    int dir;
    if (vd_run_dir(&dir) != ERROR_SUCCESS)
        return false;
    bool found = vd_record_read_at(dir, base, record);
    close(dir);
    return found;
}

bool vd_record_image(const char *base, char *path, size_t size)
{
    char text[8192];
    int dir;
    if (size == 0 || vd_run_dir(&dir) != ERROR_SUCCESS)
        return false;
    bool found = vd_record_text(dir, base, text, sizeof text);
    close(dir);
    if (!found)
        return false;
    /* The writer's escapes only: \" \\ and \u00XX (vd_json_string). */
    const char *p = strstr(text, "\"image\": \"");
    if (!p)
        return false;
    p += strlen("\"image\": \"");
    size_t used = 0;
    for (; *p && *p != '"'; p++) {
        char c = *p;
        if (c == '\\') {
            p++;
            if (*p == 'u' && strlen(p) >= 5) {
                c = (char)strtol((char[]){p[3], p[4], '\0'}, NULL, 16);
                p += 4;
            } else if (*p) {
                c = *p;
            } else {
                return false;
            }
        }
        if (used + 1 < size)
            path[used++] = c;
    }
    path[used] = '\0';
    return *p == '"';
}

void vd_records_for_each(void (*visit)(const char *base, void *context), void *context)
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
        if (length > 5 && length - 5 < 64 && strcmp(entry->d_name + length - 5, ".json") == 0) {
            char base[64];
            snprintf(base, sizeof base, "%.*s", (int)(length - 5), entry->d_name);
            visit(base, context);
        }
    }
    closedir(dir);
}

void vd_run_remove(const char *base, const char *suffix)
{
    char path[96];
    int dir;
    snprintf(path, sizeof path, "%s%s", base, suffix);
    if (vd_run_dir(&dir) != ERROR_SUCCESS)
        return;
    unlinkat(dir, path, 0);
    close(dir);
}

DWORD vd_socket_address(const char *base, long pid, struct sockaddr_un *address)
{
    memset(address, 0, sizeof *address);
    address->sun_family = AF_UNIX;
    int length =
        snprintf(address->sun_path, sizeof address->sun_path, "%s/%s.%ld.sock", vd_run_dir_path(), base, pid);
    if (length < 0 || (size_t)length >= sizeof address->sun_path)
        return vd_fail(ERROR_FILENAME_EXCED_RANGE, "the run directory %s is too long for a socket path",
                       vd_run_dir_path());
    return ERROR_SUCCESS;
}

bool vd_run_pid_alive(long pid)
{
    if (pid <= 0 || (kill((pid_t)pid, 0) < 0 && errno == ESRCH))
        return false;
    char path[64], comm[32] = {0};
    snprintf(path, sizeof path, "/proc/%ld/comm", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno != ENOENT;
    ssize_t n = read(fd, comm, sizeof comm - 1);
    close(fd);
    /* A zombie still has its name; it holds nothing any more. */
    char stat_path[64], state[256] = {0};
    snprintf(stat_path, sizeof stat_path, "/proc/%ld/stat", pid);
    fd = open(stat_path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t m = read(fd, state, sizeof state - 1);
        close(fd);
        const char *end = m > 0 ? strrchr(state, ')') : NULL;
        if (end && end[1] == ' ' && end[2] == 'Z')
            return false;
    }
    return n > 0 && strncmp(comm, "virtdisk-", 9) == 0;
}

/* The pid in "<prefix><pid>." at the start of name, or -1. */
static long vd_name_pid(const char *name, const char *prefix)
{
    size_t length = strlen(prefix);
    if (strncmp(name, prefix, length) != 0)
        return -1;
    char *end;
    long pid = strtol(name + length, &end, 10);
    return end != name + length && (*end == '.' || *end == '\0') ? pid : -1;
}

struct vd_log_entry {
    char name[96];
    struct timespec mtime;
};

static int vd_log_newer_first(const void *a, const void *b)
{
    const struct timespec *x = &((const struct vd_log_entry *)a)->mtime;
    const struct timespec *y = &((const struct vd_log_entry *)b)->mtime;
    if (x->tv_sec != y->tv_sec)
        return x->tv_sec > y->tv_sec ? -1 : 1;
    return x->tv_nsec > y->tv_nsec ? -1 : x->tv_nsec < y->tv_nsec;
}

void vd_run_collect_garbage(void)
{
    int dir_fd;
    if (vd_run_dir(&dir_fd) != ERROR_SUCCESS)
        return;
    int scan_fd = dup(dir_fd);
    DIR *dir = scan_fd >= 0 ? fdopendir(scan_fd) : NULL;
    if (!dir) {
        if (scan_fd >= 0)
            close(scan_fd);
        close(dir_fd);
        return;
    }
    struct vd_log_entry *logs = NULL;
    size_t log_count = 0, log_capacity = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        const char *name = entry->d_name;
        size_t length = strlen(name);
        const char *dot = strchr(name, '.');
        if (name[0] == '.' || !dot)
            continue;
        if (strncmp(name, "mnt.", 4) == 0) {
            long pid = vd_name_pid(name, "mnt.");
            if (pid > 0 && !vd_run_pid_alive(pid)) {
                char path[512];
                snprintf(path, sizeof path, "%s/%s", vd_run_dir_path(), name);
                /* A dead server's mount: its /dev/fuse closed with it, which
                   aborted the connection, so this cannot block. */
                umount2(path, MNT_DETACH | UMOUNT_NOFOLLOW);
                unlinkat(dir_fd, name, AT_REMOVEDIR);
            }
            continue;
        }
        char base[64];
        if ((size_t)(dot - name) >= sizeof base)
            continue;
        snprintf(base, sizeof base, "%.*s", (int)(dot - name), name);
        if (strcmp(dot, ".json") == 0) {
            struct vd_record record;
            if (vd_record_read_at(dir_fd, base, &record) && !vd_run_pid_alive(record.pid))
                unlinkat(dir_fd, name, 0);
        } else if (strncmp(dot, ".json.", 6) == 0 || (length > 5 && strcmp(name + length - 5, ".sock") == 0)) {
            long pid = vd_name_pid(dot + 1, strncmp(dot, ".json.", 6) == 0 ? "json." : "");
            if (pid > 0 && !vd_run_pid_alive(pid))
                unlinkat(dir_fd, name, 0);
        } else if (strcmp(dot, ".log") == 0 && length < sizeof logs->name) {
            struct stat st;
            if (fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                continue;
            if (log_count == log_capacity) {
                size_t capacity = log_capacity ? 2 * log_capacity : 64;
                struct vd_log_entry *grown = realloc(logs, capacity * sizeof *logs);
                if (!grown)
                    continue;
                logs = grown;
                log_capacity = capacity;
            }
            snprintf(logs[log_count].name, sizeof logs[log_count].name, "%s", name);
            logs[log_count++].mtime = st.st_mtim;
        }
    }
    closedir(dir);
    vd_share_sweep(dir_fd);
    if (log_count > VD_RUN_MAX_LOGS) {
        qsort(logs, log_count, sizeof *logs, vd_log_newer_first);
        for (size_t i = VD_RUN_MAX_LOGS; i < log_count; i++) {
            char record[128];
            /* A serving helper's log stays (it has a record). */
            snprintf(record, sizeof record, "%.*s.json", (int)(strlen(logs[i].name) - 4), logs[i].name);
            if (faccessat(dir_fd, record, F_OK, AT_SYMLINK_NOFOLLOW) < 0)
                unlinkat(dir_fd, logs[i].name, 0);
        }
    }
    free(logs);
    close(dir_fd);
}
