/*
 * The serving helper: a program of its own (`python -I -m virtdisk._serve`,
 * which calls vd_serve_main()), started by the attaching process with fork
 * and exec (posix_spawn), so that no FUSE server ever runs in a process that
 * uses the disk, and nothing of the attacher's runtime (locks, threads,
 * handlers) is inherited.
 *
 * One helper per served attachment, two processes:
 *   - the supervisor ("virtdisk-serve") receives the request on the control
 *     channel (serveproto.h), opens the loop device on the FUSE file and
 *     holds it (autoclear), writes the record (servrecord.h), answers
 *     requests, and ends the attachment;
 *   - its child, the server ("virtdisk-fuse"), holds /dev/fuse and nothing
 *     else: it mounts, serves and flushes, and never opens its own mount.
 *     A process that waits on its own FUSE mount cannot die once its server
 *     threads are gone (issue 11); split this way, whichever dies, the other
 *     one is still there to answer or to abort.
 *
 * Promises:
 *   - The server dying for any reason closes the only /dev/fuse descriptor,
 *     which aborts the connection (and the supervisor also writes fusectl's
 *     abort when fusectl is mounted): I/O fails with EIO at once; the
 *     supervisor then closes the loop device (autoclear), removes the record
 *     and exits.
 *   - The mount is seen by no process (fuseserve.h: made in the server's own
 *     mount namespace and detached there); the server hands its root to the
 *     supervisor with its READY report (SCM_RIGHTS), and the supervisor
 *     opens the file through it and attaches the loop device on it.  From
 *     then on the loop device alone holds the mount.
 *   - The supervisor dying closes its loop descriptor: the kernel detaches
 *     the device once nobody else holds it; the server then ends with its
 *     session.  A supervisor that dies before it took the root loses it with
 *     its socket, and the session ends as well.
 *   - Non-permanent: the attacher holds the control channel; the channel
 *     closing (the last handle closed, or the attacher died) ends the
 *     attachment as closing an autoclear device would.  A forked child of
 *     the attacher does not hold it (handles.c closes it at fork).
 *   - Permanent: after the attacher's KEEP, the helper listens on
 *     <base>.<pid>.sock and obeys DETACH from any peer whose effective
 *     capabilities hold CAP_SYS_ADMIN; clients are served concurrently, a
 *     silent one is dropped after VD_CLIENT_REQUEST_MS, and a request is
 *     not started after the deadline its sender gave (serveproto.h).
 *   - Requests about operations in the server (serveproto.h: OPERATION_*,
 *     BREAK_MIRROR) from the attacher or a privileged socket client are
 *     forwarded to the server on a channel of their own (serveops.h) and
 *     its answer returned unchanged.  A server that dies leaves no mirror
 *     target it created behind unless a break made it the disk.
 *   - An operation ends with the process that started it: the supervisor
 *     takes a pidfd of the START's sender from the kernel (SO_PEERPIDFD;
 *     before Linux 6.5 pidfd_open of SO_PEERCRED's pid; before 5.3 there is
 *     none, and only the attacher's channel closing tells), and once that
 *     process has exited, however it died, cancels that operation (by its
 *     number, never a later one), as Windows closes a dead process's
 *     handles and a closed handle's operation is cancelled.  The attacher's
 *     handles all closing (its channel closing, or RELEASE) cancels an
 *     operation started through that channel before the attachment is let
 *     go of.  A mirror in sync ends as a cancel ends it (servemirror.h):
 *     the source stays the disk, a target it created is removed.
 *   - The log <base>.log is bounded (VD_LOG_MAX_BYTES per process) and
 *     removed at a clean end; it stays when it recorded an error.
 */
#ifndef VD_PROVIDER_HELPER_H
#define VD_PROVIDER_HELPER_H

#include "virtdisk.h"
#include "serve_linux.h"

enum {
    VD_SERVER_END_MS = 60000,      /* a server whose device is gone has only its final flush left */
    VD_ATTACH_REQUEST_MS = 30000,  /* for the attacher's request, and its KEEP */
    VD_CLIENT_REQUEST_MS = 5000,   /* for a socket client's request */
    VD_OPERATION_REPLY_MS = 60000, /* for the server's answer to an operation request (a break flushes) */
    VD_LOG_MAX_BYTES = 256 << 10,
};

/* The interpreter set by vd_serve_set_program(), or NULL. */
const char *vd_serve_program(void);

#endif
