/*
 * Turning failures into Win32 codes, and keeping the detail a code cannot
 * carry (which structure, which offset, which device) for the facade.
 *
 * Every entry point starts with vd_clear_detail(); every failure path returns
 * through vd_fail() or vd_fail_errno(), so vd_last_error_detail() always
 * describes the call that just failed on this thread.
 */
#ifndef VD_PROVIDER_ERRORS_H
#define VD_PROVIDER_ERRORS_H

#include "virtdisk.h"
#include "winerror.h"

void vd_clear_detail(void);

/* What GetLastError() answers on this thread (only CloseHandle sets it: the
   VirtDisk functions return their code). */
void vd_set_last_error(DWORD code);

/* Records the detail (printf-style) and returns code, so that a failure reads
   `return vd_fail(ERROR_VHD_DRIVE_FOOTER_CORRUPT, "footer at %llu: ...", off);`. */
DWORD vd_fail(DWORD code, const char *format, ...) __attribute__((format(printf, 2, 3)));

/* The Win32 code for an errno value, as Windows would report the same fault. */
DWORD vd_win32_from_errno(int error);

/* vd_fail(vd_win32_from_errno(error), ...) with strerror(error) appended. */
DWORD vd_fail_errno(int error, const char *format, ...) __attribute__((format(printf, 2, 3)));

#endif
