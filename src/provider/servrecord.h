/*
 * The run directory's contents for served attachments (rundir.h): each
 * serving helper's record, socket, log and mount folder, and their removal
 * once the helper that made them is gone.
 *
 * Names, for an image whose file is (dev, ino), base = "<dev>-<ino>" in hex:
 *   <base>.json          the record: loop device, helper pid, permanence,
 *                        the FUSE file the loop device holds, image path
 *   <base>.json.<pid>    a record being written by process pid
 *   <base>.<pid>.sock    a permanent helper's control socket
 *   <base>.log           the last helper's log (removed at a clean end)
 *   mnt.<pid>.<random>   the folder server process pid mounts on, for the
 *                        moment it takes, in its own namespace (fuseserve.h)
 *
 * Promises:
 *   - A record is trusted only while its helper lives (vd_run_pid_alive) and
 *     its loop device is still bound to its FUSE file.
 *   - vd_run_collect_garbage() removes what dead helpers left: records,
 *     temporaries, sockets, mount folders (lazily unmounting a dead server's
 *     mount first, which is there only if it mounted where it lived, or
 *     came from an older version: its connection is already aborted, so
 *     nothing blocks),
 *     and keeps at most VD_RUN_MAX_LOGS logs, the newest; and it sweeps
 *     the lock files of sharing claims (share.h).
 */
#ifndef VD_PROVIDER_SERVRECORD_H
#define VD_PROVIDER_SERVRECORD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/un.h>

#include "virtdisk.h"

enum { VD_RUN_MAX_LOGS = 32 };

struct vd_record {
    int loop;
    long pid; /* the helper */
    bool permanent;
    uint64_t backing_dev; /* the FUSE file the loop device holds */
    uint64_t backing_ino;
};

/* "<dev>-<ino>" of an image file. */
void vd_record_base(dev_t dev, ino_t ino, char *base, size_t size);

/* Writes the record aside and renames it into place. */
DWORD vd_record_write(const char *base, const struct vd_record *record, const char *image_path);

bool vd_record_read(const char *base, struct vd_record *record);

/* The image path a record names (unescaped), or false. */
bool vd_record_image(const char *base, char *path, size_t size);

/* Calls visit(base, context) for each record in the run directory. */
void vd_records_for_each(void (*visit)(const char *base, void *context), void *context);

/* Removes base+suffix from the run directory, if there. */
void vd_run_remove(const char *base, const char *suffix);

/* The socket address of the permanent helper pid serving base. */
DWORD vd_socket_address(const char *base, long pid, struct sockaddr_un *address);

/* Whether pid is a live provider helper or server (not a reused pid). */
bool vd_run_pid_alive(long pid);

void vd_run_collect_garbage(void);

#endif
