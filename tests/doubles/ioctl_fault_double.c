/*
 * Test double, loaded with LD_PRELOAD into a test's subprocess: answers
 * chosen loop-device ioctls with an injected error instead of calling the
 * kernel, and logs every loop-device ioctl, so that tests can make the kernel
 * "fail" at one exact step of an attach and see what the provider did then.
 * Every other ioctl, and every loop ioctl not chosen, goes to the kernel.
 *
 * VD_TEST_IOCTL_FAULTS: comma-separated NAME=ERRNO or NAME=ERRNO*COUNT
 *   (the first COUNT calls fail; without *COUNT, every call), e.g.
 *   "LOOP_SET_STATUS64=EINVAL" or "LOOP_SET_FD=EBUSY*3".
 * VD_TEST_IOCTL_LOG: a file that gets one line per loop ioctl:
 *   "NAME DEVICE RESULT ERRNO", DEVICE being what the descriptor names
 *   (/dev/loopN, /dev/loop-control), ERRNO "-" on success.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct name {
    const char *text;
    unsigned long value;
};

static const struct name requests[] = {
    {"LOOP_SET_FD", 0x4C00},        {"LOOP_CLR_FD", 0x4C01},       {"LOOP_SET_STATUS64", 0x4C04},
    {"LOOP_GET_STATUS64", 0x4C05},  {"LOOP_SET_CAPACITY", 0x4C07}, {"LOOP_SET_DIRECT_IO", 0x4C08},
    {"LOOP_SET_BLOCK_SIZE", 0x4C09}, {"LOOP_CONFIGURE", 0x4C0A},   {"LOOP_CTL_GET_FREE", 0x4C82},
};

static const struct name errnos[] = {
    {"EINVAL", EINVAL}, {"ENOTTY", ENOTTY}, {"EBUSY", EBUSY}, {"EAGAIN", EAGAIN},
    {"EIO", EIO},       {"ENXIO", ENXIO},   {"EPERM", EPERM}, {"ENOSPC", ENOSPC},
};

struct fault {
    unsigned long request;
    int error;
    long remaining; /* < 0: every call */
};

static struct fault faults[16];
static size_t fault_count;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static int (*real_ioctl)(int, unsigned long, ...);

static const char *request_name(unsigned long request)
{
    for (size_t i = 0; i < sizeof requests / sizeof requests[0]; i++)
        if (requests[i].value == request)
            return requests[i].text;
    return NULL;
}

static long lookup(const struct name *table, size_t count, const char *text, size_t length)
{
    for (size_t i = 0; i < count; i++)
        if (strlen(table[i].text) == length && strncmp(table[i].text, text, length) == 0)
            return (long)table[i].value;
    fprintf(stderr, "ioctl_fault_double: unknown name %.*s\n", (int)length, text);
    abort();
}

static void setup(void)
{
    real_ioctl = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    const char *spec = getenv("VD_TEST_IOCTL_FAULTS");
    while (spec && *spec && fault_count < sizeof faults / sizeof faults[0]) {
        const char *end = strchr(spec, ',');
        size_t length = end ? (size_t)(end - spec) : strlen(spec);
        const char *equals = memchr(spec, '=', length);
        if (!equals) {
            fprintf(stderr, "ioctl_fault_double: %.*s is not NAME=ERRNO\n", (int)length, spec);
            abort();
        }
        const char *star = memchr(equals, '*', length - (size_t)(equals - spec));
        const char *error_end = star ? star : spec + length;
        struct fault *fault = &faults[fault_count++];
        fault->request = (unsigned long)lookup(requests, sizeof requests / sizeof requests[0], spec,
                                               (size_t)(equals - spec));
        fault->error = (int)lookup(errnos, sizeof errnos / sizeof errnos[0], equals + 1,
                                   (size_t)(error_end - equals - 1));
        fault->remaining = star ? strtol(star + 1, NULL, 10) : -1;
        spec = end ? end + 1 : NULL;
    }
}

static int injected_error(unsigned long request)
{
    int error = 0;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < fault_count && !error; i++) {
        if (faults[i].request != request || faults[i].remaining == 0)
            continue;
        if (faults[i].remaining > 0)
            faults[i].remaining--;
        error = faults[i].error;
    }
    pthread_mutex_unlock(&lock);
    return error;
}

static void log_call(const char *name, int fd, int result, int error)
{
    const char *path = getenv("VD_TEST_IOCTL_LOG");
    if (!path)
        return;
    char link[64], device[256] = "?";
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, device, sizeof device - 1);
    device[n > 0 ? n : 1] = '\0';
    const char *error_name = "-";
    for (size_t i = 0; result < 0 && i < sizeof errnos / sizeof errnos[0]; i++)
        if ((int)errnos[i].value == error)
            error_name = errnos[i].text;
    char line[400];
    int length = snprintf(line, sizeof line, "%s %s %d %s\n", name, device, result,
                          result < 0 && strcmp(error_name, "-") == 0 ? "other" : error_name);
    int out = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (out >= 0) {
        if (write(out, line, (size_t)length) < 0) {
            /* nothing to do: the log is best effort */
        }
        close(out);
    }
}

int ioctl(int fd, unsigned long request, ...)
{
    va_list args;
    va_start(args, request);
    void *argument = va_arg(args, void *);
    va_end(args);
    pthread_once(&once, setup);

    const char *name = request_name(request);
    if (!name)
        return real_ioctl(fd, request, argument);
    int error = injected_error(request);
    int result = -1;
    if (!error) {
        result = real_ioctl(fd, request, argument);
        error = result < 0 ? errno : 0;
    }
    log_call(name, fd, result, error);
    errno = error;
    return result;
}
