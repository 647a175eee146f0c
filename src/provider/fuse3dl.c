/* libfuse3 through dlopen: see fuse3dl.h for why and what is promised. */
#define _GNU_SOURCE
#define FUSE_USE_VERSION FUSE_MAKE_VERSION(3, 12)

#include "fuse3dl.h"

#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "errors.h"

/* The soname every libfuse 3.x has kept: the ABI of 3.0 is still there, and
   newer functions carry symbol versions of their own. */
#define VD_FUSE3_SONAME "libfuse3.so.3"

static struct {
    void *library;
    char error[256];
    size_t (*add_direntry)(fuse_req_t, char *, size_t, const char *, const struct stat *, off_t);
    void (*log)(enum fuse_log_level, const char *, ...); /* 3.7 and newer */
    void (*set_log_func)(fuse_log_func_t);               /* 3.7 and newer */
    struct fuse_loop_config *(*loop_cfg_create)(void);   /* this and the next four: 3.12 */
    void (*loop_cfg_destroy)(struct fuse_loop_config *);
    void (*loop_cfg_set_max_threads)(struct fuse_loop_config *, unsigned int);
    void (*loop_cfg_set_idle_threads)(struct fuse_loop_config *, unsigned int);
    void (*loop_cfg_set_clone_fd)(struct fuse_loop_config *, unsigned int);
    int (*session_loop_mt)(struct fuse_session *, struct fuse_loop_config *);
    void (*opt_free_args)(struct fuse_args *);
    int (*reply_attr)(fuse_req_t, const struct stat *, double);
    int (*reply_buf)(fuse_req_t, const char *, size_t);
    int (*reply_entry)(fuse_req_t, const struct fuse_entry_param *);
    int (*reply_err)(fuse_req_t, int);
    int (*reply_lseek)(fuse_req_t, off_t); /* 3.8 and newer */
    int (*reply_open)(fuse_req_t, const struct fuse_file_info *);
    int (*reply_write)(fuse_req_t, size_t);
    int (*lowlevel_notify_inval_inode)(struct fuse_session *, fuse_ino_t, off_t, off_t);
    void *(*req_userdata)(fuse_req_t);
    void (*session_destroy)(struct fuse_session *);
    int (*session_fd)(struct fuse_session *);
    int (*session_loop)(struct fuse_session *);
    int (*session_mount)(struct fuse_session *, const char *);
    struct fuse_session *(*session_new)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t, void *);
} vd_fuse3;

static pthread_once_t vd_fuse3_once = PTHREAD_ONCE_INIT;

/* dlsym into a function pointer of the right type (POSIX guarantees the
   conversion; the memcpy keeps -Wpedantic quiet about it). */
#define VD_FUSE3_SYMBOL(field, name) \
    do { \
        void *symbol = dlsym(vd_fuse3.library, name); \
        memcpy(&vd_fuse3.field, &symbol, sizeof symbol); \
    } while (0)

static void vd_fuse3_open(void)
{
    void *library = dlopen(VD_FUSE3_SONAME, RTLD_NOW | RTLD_LOCAL);
    if (!library) {
        const char *why = dlerror();
        snprintf(vd_fuse3.error, sizeof vd_fuse3.error, "%s", why ? why : VD_FUSE3_SONAME " not found");
        return;
    }
    vd_fuse3.library = library;
    VD_FUSE3_SYMBOL(add_direntry, "fuse_add_direntry");
    VD_FUSE3_SYMBOL(log, "fuse_log");
    VD_FUSE3_SYMBOL(set_log_func, "fuse_set_log_func");
    VD_FUSE3_SYMBOL(opt_free_args, "fuse_opt_free_args");
    VD_FUSE3_SYMBOL(reply_attr, "fuse_reply_attr");
    VD_FUSE3_SYMBOL(reply_buf, "fuse_reply_buf");
    VD_FUSE3_SYMBOL(reply_entry, "fuse_reply_entry");
    VD_FUSE3_SYMBOL(reply_err, "fuse_reply_err");
    VD_FUSE3_SYMBOL(reply_lseek, "fuse_reply_lseek");
    VD_FUSE3_SYMBOL(reply_open, "fuse_reply_open");
    VD_FUSE3_SYMBOL(reply_write, "fuse_reply_write");
    VD_FUSE3_SYMBOL(lowlevel_notify_inval_inode, "fuse_lowlevel_notify_inval_inode");
    VD_FUSE3_SYMBOL(req_userdata, "fuse_req_userdata");
    VD_FUSE3_SYMBOL(session_destroy, "fuse_session_destroy");
    VD_FUSE3_SYMBOL(session_fd, "fuse_session_fd");
    VD_FUSE3_SYMBOL(session_loop, "fuse_session_loop");
    VD_FUSE3_SYMBOL(session_mount, "fuse_session_mount");
    VD_FUSE3_SYMBOL(session_new, "fuse_session_new");
    VD_FUSE3_SYMBOL(loop_cfg_create, "fuse_loop_cfg_create");
    VD_FUSE3_SYMBOL(loop_cfg_destroy, "fuse_loop_cfg_destroy");
    VD_FUSE3_SYMBOL(loop_cfg_set_max_threads, "fuse_loop_cfg_set_max_threads");
    VD_FUSE3_SYMBOL(loop_cfg_set_idle_threads, "fuse_loop_cfg_set_idle_threads");
    VD_FUSE3_SYMBOL(loop_cfg_set_clone_fd, "fuse_loop_cfg_set_clone_fd");
    /* Three versions share this name; the configuration object is 3.12's. */
    void *loop_mt = dlvsym(library, "fuse_session_loop_mt", "FUSE_3.12");
    memcpy(&vd_fuse3.session_loop_mt, &loop_mt, sizeof loop_mt);

    const char *missing = !vd_fuse3.add_direntry      ? "fuse_add_direntry"
                          : !vd_fuse3.opt_free_args   ? "fuse_opt_free_args"
                          : !vd_fuse3.reply_attr      ? "fuse_reply_attr"
                          : !vd_fuse3.reply_buf       ? "fuse_reply_buf"
                          : !vd_fuse3.reply_entry     ? "fuse_reply_entry"
                          : !vd_fuse3.reply_err       ? "fuse_reply_err"
                          : !vd_fuse3.reply_open      ? "fuse_reply_open"
                          : !vd_fuse3.reply_write     ? "fuse_reply_write"
                          : !vd_fuse3.req_userdata    ? "fuse_req_userdata"
                          : !vd_fuse3.session_destroy ? "fuse_session_destroy"
                          : !vd_fuse3.session_fd      ? "fuse_session_fd"
                          : !vd_fuse3.session_loop    ? "fuse_session_loop"
                          : !vd_fuse3.session_mount   ? "fuse_session_mount"
                          : !vd_fuse3.session_new     ? "fuse_session_new"
                                                      : NULL;
    if (missing) {
        snprintf(vd_fuse3.error, sizeof vd_fuse3.error, "%s has no %s", VD_FUSE3_SONAME, missing);
        vd_fuse3.library = NULL; /* never dlclosed: a half-loaded library is not used */
        return;
    }
    /* The multi-threaded loop only as a whole: else the single-threaded one. */
    if (!vd_fuse3.loop_cfg_destroy || !vd_fuse3.loop_cfg_set_max_threads ||
        !vd_fuse3.loop_cfg_set_idle_threads || !vd_fuse3.loop_cfg_set_clone_fd || !vd_fuse3.session_loop_mt)
        vd_fuse3.loop_cfg_create = NULL;
}

DWORD vd_fuse3_load(void)
{
    pthread_once(&vd_fuse3_once, vd_fuse3_open);
    if (vd_fuse3.library)
        return ERROR_SUCCESS;
    return vd_fail(ERROR_NOT_SUPPORTED,
                   "serving dynamic and differencing images needs libfuse3 (Debian/Ubuntu: apt-get install "
                   "fuse3; RHEL/Fedora: dnf install fuse3): %s",
                   vd_fuse3.error);
}

/* ---- the libfuse functions the provider calls, forwarded ------------------ */

size_t fuse_add_direntry(fuse_req_t req, char *buf, size_t bufsize, const char *name, const struct stat *stbuf,
                         off_t off)
{
    return vd_fuse3.add_direntry(req, buf, bufsize, name, stbuf, off);
}

void fuse_log(enum fuse_log_level level, const char *fmt, ...)
{
    char message[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    if (vd_fuse3.log)
        vd_fuse3.log(level, "%s", message);
    else
        fputs(message, stderr);
}

void fuse_set_log_func(fuse_log_func_t func)
{
    /* Called before anything is served (a helper's log first): load here,
       and without the function libfuse's messages go to stderr, as before. */
    if (vd_fuse3_load() == ERROR_SUCCESS && vd_fuse3.set_log_func)
        vd_fuse3.set_log_func(func);
}

struct fuse_loop_config *fuse_loop_cfg_create(void)
{
    return vd_fuse3.loop_cfg_create ? vd_fuse3.loop_cfg_create() : NULL;
}

void fuse_loop_cfg_destroy(struct fuse_loop_config *config)
{
    vd_fuse3.loop_cfg_destroy(config);
}

void fuse_loop_cfg_set_max_threads(struct fuse_loop_config *config, unsigned int value)
{
    vd_fuse3.loop_cfg_set_max_threads(config, value);
}

void fuse_loop_cfg_set_idle_threads(struct fuse_loop_config *config, unsigned int value)
{
    vd_fuse3.loop_cfg_set_idle_threads(config, value);
}

void fuse_loop_cfg_set_clone_fd(struct fuse_loop_config *config, unsigned int value)
{
    vd_fuse3.loop_cfg_set_clone_fd(config, value);
}

/* A macro for fuse_session_loop_mt_312 in some builds of the header: this
   definition then takes that name, which is the one fuseserve.c calls. */
int fuse_session_loop_mt(struct fuse_session *se, struct fuse_loop_config *config)
{
    return vd_fuse3.session_loop_mt(se, config);
}

void fuse_opt_free_args(struct fuse_args *args)
{
    vd_fuse3.opt_free_args(args);
}

int fuse_reply_attr(fuse_req_t req, const struct stat *attr, double attr_timeout)
{
    return vd_fuse3.reply_attr(req, attr, attr_timeout);
}

int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size)
{
    return vd_fuse3.reply_buf(req, buf, size);
}

int fuse_reply_entry(fuse_req_t req, const struct fuse_entry_param *e)
{
    return vd_fuse3.reply_entry(req, e);
}

int fuse_reply_err(fuse_req_t req, int err)
{
    return vd_fuse3.reply_err(req, err);
}

/* Without it (libfuse before 3.8) ENOSYS: the kernel then stops asking and
   answers SEEK_DATA/SEEK_HOLE itself, as if the whole file were data. */
int fuse_reply_lseek(fuse_req_t req, off_t off)
{
    return vd_fuse3.reply_lseek ? vd_fuse3.reply_lseek(req, off) : vd_fuse3.reply_err(req, ENOSYS);
}

int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    return vd_fuse3.reply_open(req, fi);
}

int fuse_reply_write(fuse_req_t req, size_t count)
{
    return vd_fuse3.reply_write(req, count);
}

/* Optional: without it the kernel keeps cached attributes until they time
   out (a stale st_blocks, nothing worse). */
int fuse_lowlevel_notify_inval_inode(struct fuse_session *se, fuse_ino_t ino, off_t off, off_t len)
{
    return vd_fuse3.lowlevel_notify_inval_inode ? vd_fuse3.lowlevel_notify_inval_inode(se, ino, off, len) : -ENOSYS;
}

void *fuse_req_userdata(fuse_req_t req)
{
    return vd_fuse3.req_userdata(req);
}

void fuse_session_destroy(struct fuse_session *se)
{
    vd_fuse3.session_destroy(se);
}

int fuse_session_fd(struct fuse_session *se)
{
    return vd_fuse3.session_fd(se);
}

int fuse_session_loop(struct fuse_session *se)
{
    return vd_fuse3.session_loop(se);
}

int fuse_session_mount(struct fuse_session *se, const char *mountpoint)
{
    return vd_fuse3.session_mount(se, mountpoint);
}

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op, size_t op_size,
                                      void *userdata)
{
    return vd_fuse3.session_new(args, op, op_size, userdata);
}
