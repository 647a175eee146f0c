/*
 * Win32 and VirtDisk error codes as C constants, from the shared table
 * (../_cffi_src/errors.def).  Every provider entry point returns one of these.
 */
#ifndef VD_PROVIDER_WINERROR_H
#define VD_PROVIDER_WINERROR_H

/* The VirtDisk codes (0xC03A00xx) do not fit an int: GNU C gives this enum
   an unsigned underlying type, which is what a DWORD needs. */
enum vd_win32_error {
#define VD_ERROR(name, code, text) name = code,
#include "errors.def"
#undef VD_ERROR
};

#endif
