/*
 * The serving helper's message format (see serveproto.h).
 */
#define _GNU_SOURCE
#include "serveproto.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdbool.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

uint64_t vd_msg_now_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_BOOTTIME, &now);
    return (uint64_t)now.tv_sec * 1000u + (uint64_t)now.tv_nsec / 1000000u;
}

ssize_t vd_seqpacket_send(int socket_fd, struct iovec *parts, size_t count, int pass_fd)
{
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr message = {.msg_iov = parts, .msg_iovlen = count};
    if (pass_fd >= 0) {
        memset(&control, 0, sizeof control);
        message.msg_control = control.bytes;
        message.msg_controllen = sizeof control.bytes;
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&message);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &pass_fd, sizeof(int));
    }
    ssize_t sent;
    do
        sent = sendmsg(socket_fd, &message, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    return sent;
}

/* Takes the descriptors a message carried: the first into *keep when keep
   is not NULL, every other one closed. */
static void vd_seqpacket_take_passed(struct msghdr *message, int *keep)
{
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(message); cmsg; cmsg = CMSG_NXTHDR(message, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof fd);
            if (keep && *keep < 0)
                *keep = fd;
            else
                close(fd);
        }
    }
}

ssize_t vd_seqpacket_recv(int socket_fd, int timeout_ms, struct iovec *parts, size_t count, int *passed,
                          bool *truncated)
{
    if (passed)
        *passed = -1;
    *truncated = false;
    uint64_t deadline = timeout_ms < 0 ? 0 : vd_msg_now_ms() + (uint64_t)timeout_ms;
    for (;;) {
        int wait = -1;
        if (timeout_ms >= 0) {
            uint64_t now = vd_msg_now_ms();
            wait = now >= deadline ? 0 : (int)(deadline - now);
        }
        struct pollfd ready = {.fd = socket_fd, .events = POLLIN};
        int n = poll(&ready, 1, wait);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        break;
    }
    /* Room for more descriptors than anyone may pass: extras are closed,
       not left to truncate the control data. */
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(4 * sizeof(int))];
    } control;
    struct msghdr message = {
        .msg_iov = parts, .msg_iovlen = count, .msg_control = control.bytes, .msg_controllen = sizeof control.bytes};
    ssize_t got;
    do
        got = recvmsg(socket_fd, &message, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    while (got < 0 && errno == EINTR);
    if (got < 0)
        return -1;
    vd_seqpacket_take_passed(&message, passed);
    *truncated = (message.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0;
    return got;
}

int vd_msg_send(int fd, enum vd_msg_type type, const void *payload, size_t length, int pass_fd)
{
    if (length > VD_MSG_MAX_PAYLOAD)
        return EMSGSIZE;
    struct vd_msg_header header = {
        .magic = VD_MSG_MAGIC, .version = VD_MSG_VERSION, .type = (uint16_t)type, .length = (uint32_t)length};
    struct iovec parts[2] = {{&header, sizeof header}, {(void *)payload, length}};
    ssize_t sent = vd_seqpacket_send(fd, parts, length ? 2 : 1, pass_fd);
    if (sent < 0)
        return errno;
    return (size_t)sent == sizeof header + length ? 0 : EPROTO;
}

int vd_msg_recv(int fd, int timeout_ms, uint16_t *type, void *payload, size_t capacity, size_t *length,
                int *passed)
{
    if (passed)
        *passed = -1;
    struct vd_msg_header header;
    char body[VD_MSG_MAX_PAYLOAD + 1];
    struct iovec parts[2] = {{&header, sizeof header}, {body, sizeof body}};
    int received = -1;
    bool truncated;
    ssize_t got = vd_seqpacket_recv(fd, timeout_ms, parts, 2, passed ? &received : NULL, &truncated);
    if (got < 0)
        return errno == ECONNRESET ? EPIPE : errno;
    if (got == 0)
        return EPIPE;
    bool bad = (size_t)got < sizeof header || header.magic != VD_MSG_MAGIC || header.version != VD_MSG_VERSION ||
               header.length != (size_t)got - sizeof header || header.length > capacity || truncated;
    if (bad) {
        if (received >= 0)
            close(received);
        return EPROTO;
    }
    memcpy(payload, body, header.length);
    *type = header.type;
    *length = header.length;
    if (passed)
        *passed = received;
    return 0;
}

int vd_msg_send_result(int fd, DWORD status, int loop, const char *detail)
{
    return vd_msg_send_result_passing(fd, status, loop, detail, -1);
}

int vd_msg_send_result_passing(int fd, DWORD status, int loop, const char *detail, int pass_fd)
{
    char payload[VD_MSG_MAX_PAYLOAD];
    struct vd_msg_result result = {.status = status, .loop = loop};
    memcpy(payload, &result, sizeof result);
    size_t room = sizeof payload - sizeof result;
    size_t text = strnlen(detail ? detail : "", room - 1);
    memcpy(payload + sizeof result, detail ? detail : "", text);
    payload[sizeof result + text] = '\0';
    return vd_msg_send(fd, VD_MSG_RESULT, payload, sizeof result + text + 1, pass_fd);
}

int vd_msg_parse_result(const void *payload, size_t length, DWORD *status, int *loop, const char **detail)
{
    struct vd_msg_result result;
    if (length < sizeof result + 1 || ((const char *)payload)[length - 1] != '\0')
        return EPROTO;
    memcpy(&result, payload, sizeof result);
    *status = result.status;
    *loop = result.loop;
    *detail = (const char *)payload + sizeof result;
    return 0;
}

/* A fixed part and a NUL-terminated text after it, cut to fit. */
static int vd_msg_send_with_text(int fd, enum vd_msg_type type, const void *head, size_t head_length,
                                 const char *text)
{
    char payload[VD_MSG_MAX_PAYLOAD];
    memcpy(payload, head, head_length);
    size_t room = sizeof payload - head_length;
    size_t n = strnlen(text ? text : "", room - 1);
    memcpy(payload + head_length, text ? text : "", n);
    payload[head_length + n] = '\0';
    return vd_msg_send(fd, type, payload, head_length + n + 1, -1);
}

int vd_msg_send_state(int fd, const struct vd_msg_operation_state *state, const char *detail)
{
    return vd_msg_send_with_text(fd, VD_MSG_OPERATION_STATE, state, sizeof *state, detail);
}

int vd_msg_parse_state(const void *payload, size_t length, struct vd_msg_operation_state *state,
                       const char **detail)
{
    if (length < sizeof *state + 1 || ((const char *)payload)[length - 1] != '\0')
        return EPROTO;
    memcpy(state, payload, sizeof *state);
    *detail = (const char *)payload + sizeof *state;
    return 0;
}
