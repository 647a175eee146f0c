/*
 * Win32 codes from errno values, and the per-thread failure detail.
 */
#include "errors.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "messages.h"

static _Thread_local char vd_detail[512];
static _Thread_local DWORD vd_last_error;

void vd_set_last_error(DWORD code)
{
    vd_last_error = code;
}

DWORD WINAPI GetLastError(void)
{
    return vd_last_error;
}

void vd_clear_detail(void)
{
    vd_detail[0] = '\0';
}

const char *vd_last_error_detail(void)
{
    return vd_detail;
}

size_t vd_error_message(DWORD code, char *buffer, size_t size)
{
    const char *text = vd_error_table_text(code);
    return text ? vd_copy_message(text, buffer, size) : vd_copy_message("", buffer, size);
}

static void vd_set_detail(const char *format, va_list args)
{
    vsnprintf(vd_detail, sizeof vd_detail, format, args);
}

DWORD vd_fail(DWORD code, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vd_set_detail(format, args);
    va_end(args);
    return code;
}

DWORD vd_win32_from_errno(int error)
{
    switch (error) {
    case 0:
        return ERROR_SUCCESS;
    case ENOENT:
        return ERROR_FILE_NOT_FOUND;
    case ENOTDIR:
        return ERROR_PATH_NOT_FOUND;
    case EACCES:
    case EROFS:
        return ERROR_ACCESS_DENIED;
    case EPERM:
        /* Loop devices and other privileged operations answer EPERM when the
           caller lacks CAP_SYS_ADMIN: the analogue of the missing
           SeManageVolumePrivilege. */
        return ERROR_PRIVILEGE_NOT_HELD;
    case EBUSY:
    case ETXTBSY:
        return ERROR_SHARING_VIOLATION;
    case EEXIST:
        return ERROR_FILE_EXISTS;
    case EINVAL:
        return ERROR_INVALID_PARAMETER;
    case ENOSPC:
    case EDQUOT:
        return ERROR_DISK_FULL;
    case EFBIG:
        return ERROR_FILE_SYSTEM_LIMITATION;
    case ENOMEM:
        return ERROR_OUTOFMEMORY;
    case ENAMETOOLONG:
        return ERROR_FILENAME_EXCED_RANGE;
    case EMFILE:
    case ENFILE:
        return ERROR_TOO_MANY_OPEN_FILES;
    case ENOSYS:
    case EOPNOTSUPP:
    case ENOTTY:
        return ERROR_NOT_SUPPORTED;
    case ENXIO:
    case ENODEV:
        return ERROR_DEV_NOT_EXIST;
    case EISDIR:
        return ERROR_ACCESS_DENIED;
    default:
        return ERROR_GEN_FAILURE;
    }
}

DWORD vd_fail_errno(int error, const char *format, ...)
{
    char prefix[400];
    va_list args;
    va_start(args, format);
    vsnprintf(prefix, sizeof prefix, format, args);
    va_end(args);
    snprintf(vd_detail, sizeof vd_detail, "%s: %s", prefix, strerror(error));
    return vd_win32_from_errno(error);
}
