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

#include <stddef.h>
#include <stdint.h>

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

struct vd_msg_result {
    uint32_t status; /* Win32 code */
    int32_t loop;    /* the loop device number (attach), else -1 */
    /* followed by the detail text, NUL-terminated */
};

/* The present CLOCK_BOOTTIME in milliseconds. */
uint64_t vd_msg_now_ms(void);

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

/* Parses a RESULT payload: *detail points into payload (NUL-terminated). */
int vd_msg_parse_result(const void *payload, size_t length, DWORD *status, int *loop, const char **detail);

#endif
