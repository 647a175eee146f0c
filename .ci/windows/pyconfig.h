/*
 * pyconfig.h for building a limited-API (abi3) extension for 64-bit and
 * 32-bit Windows with a MinGW-w64 compiler (zig cc), with the Python headers
 * of the Linux interpreter running the build (.ci/windows-wheel).  The Python
 * headers are the same on every platform except this file; here is what
 * CPython's own PC/pyconfig.h tells them that the limited API needs: which
 * Windows, the sizes of the C types on LLP64/ILP32 Windows, and that Python
 * is a DLL whose symbols are imported.
 */
#ifndef VD_WINDOWS_PYCONFIG_H
#define VD_WINDOWS_PYCONFIG_H

#if !defined(_WIN32)
#error "this pyconfig.h is for Windows targets only"
#endif

#define MS_WIN32
#define MS_WINDOWS
#define NT_THREADS
#define WITH_THREAD
#ifdef _WIN64
#define MS_WIN64
#endif

/* python3.dll, through its import library: symbols are __declspec(dllimport)
   and the module's PyInit function is exported. */
#define Py_ENABLE_SHARED 1
#define HAVE_DECLSPEC_DLL

#define SIZEOF_SHORT 2
#define SIZEOF_INT 4
#define SIZEOF_LONG 4 /* LLP64 on 64-bit Windows too */
#define SIZEOF_LONG_LONG 8
#define SIZEOF_DOUBLE 8
#define SIZEOF_FLOAT 4
#define SIZEOF_WCHAR_T 2
#define SIZEOF__BOOL 1
#define SIZEOF_OFF_T 4
#define SIZEOF_TIME_T 8
#define SIZEOF_FPOS_T 8
#ifdef _WIN64
#define SIZEOF_VOID_P 8
#define SIZEOF_SIZE_T 8
#define SIZEOF_HKEY 8
#else
#define SIZEOF_VOID_P 4
#define SIZEOF_SIZE_T 4
#define SIZEOF_HKEY 4
#endif
#define ALIGNOF_SIZE_T SIZEOF_SIZE_T
#define ALIGNOF_LONG 4

#define HAVE_STDDEF_H 1
#define HAVE_STDLIB_H 1
#define HAVE_WCHAR_H 1
#define HAVE_LONG_LONG 1
#define PY_LONG_LONG long long
#define PY_LLONG_MIN LLONG_MIN
#define PY_LLONG_MAX LLONG_MAX
#define PY_ULLONG_MAX ULLONG_MAX
#define Py_WCHAR_T_SIGNED 0
#define PY_UNICODE_TYPE wchar_t
#define DOUBLE_IS_LITTLE_ENDIAN_IEEE754 1

#endif
