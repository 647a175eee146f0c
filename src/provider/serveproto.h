/*
 * The messages between a process using the provider and a serving helper
 * (helper.c): one small, versioned, length-prefixed format for the control
 * channel an attacher holds and for a permanent helper's socket.
 *
 * Promises:
 *   - Every message is one SOCK_SEQPACKET record: a header (magic, version,
 *     type, payload length) and at most VD_MSG_MAX_PAYLOAD bytes.  A record
 *     whose magic, version or length is wrong is refused, never guessed at.
 *   - A message carries at most one descriptor (SCM_RIGHTS), received
 *     O_CLOEXEC; descriptors nobody asked for are closed on receipt.
 *   - vd_msg_recv() waits at most its timeout, so no peer can hold a reader.
 */
#ifndef VD_PROVIDER_SERVEPROTO_H
#define VD_PROVIDER_SERVEPROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "virtdisk.h"

#define VD_MSG_MAGIC 0x50534456u /* "VDSP" */
#define VD_MSG_VERSION 1u

enum { VD_MSG_MAX_PAYLOAD = 2048 };

enum vd_msg_type {
    /* attacher -> helper, with the image's descriptor */
    VD_MSG_ATTACH = 1,
    /* helper -> requester: struct vd_msg_result */
    VD_MSG_RESULT = 2,
    /* attacher -> helper after a successful permanent attach's RESULT: the
       attachment is now the helper's own (until then the channel closing
       undoes it) */
    VD_MSG_KEEP = 3,
    /* -> helper: detach with the loop device's refusal rules */
    VD_MSG_DETACH = 4,
    /* attacher -> helper: the last handle closed; let go of the device */
    VD_MSG_RELEASE = 5,
    /* attacher -> helper, before ATTACH, one for each: a descriptor holding
       a sharing claim (share.h) that must last as long as the attachment
       (the attach claim, the image's writer claim, each parent's) */
    VD_MSG_CLAIM = 6,
    /* Operations that run inside the server, which owns the image and its
       BAT (mirror, compact).  The supervisor
       forwards each to the server and the server's answer back unchanged;
       one operation at a time per attachment. */
    /* -> helper: struct vd_msg_operation_start + the target path, NUL-
       terminated (empty for kinds without one); answers RESULT once the
       operation has started (or was refused) */
    VD_MSG_OPERATION_START = 7,
    /* -> helper, no payload; answers OPERATION_STATE */
    VD_MSG_OPERATION_STATUS = 8,
    /* helper -> requester: struct vd_msg_operation_state + detail text,
       NUL-terminated */
    VD_MSG_OPERATION_STATE = 9,
    /* -> helper, no payload or a struct vd_msg_operation_cancel: stop the
       running operation (with a payload: only if it is the one numbered
       so), undoing what it did to anything but the disk; answers RESULT
       once it has stopped (ERROR_NOT_FOUND: none, or another, runs) */
    VD_MSG_OPERATION_CANCEL = 10,
    /* -> helper, no payload: end a mirror in sync and serve its target
       from now on (BreakMirrorVirtualDisk); answers RESULT.  The server's
       successful RESULT to its supervisor passes a read-only descriptor of
       the target, which the supervisor keeps and forwards without. */
    VD_MSG_BREAK_MIRROR = 11,
};

enum vd_operation_kind {
    VD_OPERATION_NONE = 0,
    VD_OPERATION_MIRROR = 1,  /* flags: MIRROR_VIRTUAL_DISK_FLAG */
    VD_OPERATION_COMPACT = 2, /* flags: COMPACT_VIRTUAL_DISK_FLAG; no path */
};

struct vd_msg_header {
    uint32_t magic;
    uint16_t version;
    uint16_t type;
    uint32_t length; /* of the payload that follows */
};

struct vd_msg_attach {
    uint32_t device_id;
    uint32_t open_flags;
    uint8_t read_only;
    uint8_t permanent;
    uint8_t reserved[6];
    /* followed by the image's absolute path, NUL-terminated */
};

struct vd_msg_detach {
    /* CLOCK_BOOTTIME (shared by all processes) in ms after which the
       requester no longer waits to be told the request started: the helper
       refuses to start it then, so a caller told it failed never sees it run. */
    uint64_t start_deadline_ms;
};

struct vd_msg_claim {
    uint8_t attach; /* the attach claim, which ends when the handles let go */
    uint8_t reserved[7];
};

struct vd_msg_operation_start {
    uint32_t kind;  /* enum vd_operation_kind */
    uint32_t flags; /* the kind's own API flags */
    uint32_t mode;  /* permissions of a file the operation creates (the caller's umask applied) */
    uint32_t reserved;
    /* followed by the target path (absolute), NUL-terminated */
};

/* Names the operation a CANCEL is for: the number the START's RESULT
   carried in its loop field (every START the server takes gets the next
   one), so that a late cancel never stops a later operation. */
struct vd_msg_operation_cancel {
    uint32_t serial;
    uint32_t reserved;
};

struct vd_msg_operation_state {
    uint32_t kind;   /* VD_OPERATION_NONE: nothing was started */
    uint32_t status; /* ERROR_IO_PENDING while running, then its outcome */
    uint64_t done;   /* CurrentValue */
    uint64_t total;  /* CompletionValue */
    /* followed by the detail of a failure, NUL-terminated */
};

struct vd_msg_result {
    uint32_t status; /* Win32 code */
    int32_t loop;    /* the loop device number (attach), the operation's
                        number (a successful OPERATION_START), else -1 */
    /* followed by the detail text, NUL-terminated */
};

/* The present CLOCK_BOOTTIME in milliseconds. */
uint64_t vd_msg_now_ms(void);

/* Sends parts as one record on a SOCK_SEQPACKET socket, with pass_fd
   (SCM_RIGHTS) when >= 0; retried on EINTR, never raising SIGPIPE.  The
   bytes sent, or -1 with errno set. */
ssize_t vd_seqpacket_send(int socket_fd, struct iovec *parts, size_t count, int pass_fd);

/* Waits up to timeout_ms (-1: no limit) for one record and receives it
   into parts: its length (0 at the end of the stream), or -1 with errno set
   (ETIMEDOUT when none came).  The first descriptor it carried goes to
   *passed (-1 when none) when passed is not NULL; any other is closed.
   *truncated: the record or its control data did not fit. */
ssize_t vd_seqpacket_recv(int socket_fd, int timeout_ms, struct iovec *parts, size_t count, int *passed,
                          bool *truncated);

/* Sends one message (passing pass_fd when >= 0).  Returns 0 or an errno. */
int vd_msg_send(int fd, enum vd_msg_type type, const void *payload, size_t length, int pass_fd);

/* Receives one message within timeout_ms (-1: no limit).  *length is the
   payload's length; *passed a received descriptor or -1 (pass NULL to
   refuse descriptors).  Returns 0, ETIMEDOUT, EPIPE at end of stream, EPROTO
   for a malformed message, or an errno. */
int vd_msg_recv(int fd, int timeout_ms, uint16_t *type, void *payload, size_t capacity, size_t *length,
                int *passed);

/* Sends a RESULT. */
int vd_msg_send_result(int fd, DWORD status, int loop, const char *detail);

/* Sends a RESULT passing pass_fd (when >= 0) with it. */
int vd_msg_send_result_passing(int fd, DWORD status, int loop, const char *detail, int pass_fd);

/* Parses a RESULT payload: *detail points into payload (NUL-terminated). */
int vd_msg_parse_result(const void *payload, size_t length, DWORD *status, int *loop, const char **detail);

/* Sends an OPERATION_STATE. */
int vd_msg_send_state(int fd, const struct vd_msg_operation_state *state, const char *detail);

/* Parses an OPERATION_STATE payload: *detail points into payload. */
int vd_msg_parse_state(const void *payload, size_t length, struct vd_msg_operation_state *state,
                       const char **detail);

#endif
