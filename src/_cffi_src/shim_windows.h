/*
 * The Windows side of virtdisk._native: the preamble cffi compiles its
 * generated code with (build_virtdisk.py).  shim_windows.c implements shim.h.
 *
 * Promises: the cdef's types, constants and functions (virtdisk_api.h,
 * shim.h) declared with the SDK's layouts, char16_t declared, and the
 * functions newer than Windows 7 routed to their run-time lookup thunks.
 *
 * The declarations come from one of two places:
 *   - with the SDK (MSVC), the system's <virtdisk.h> (windows_sdk.h), which
 *     cffi then checks our cdef against;
 *   - with MinGW-w64 (zig, .ci/windows-wheel), the project's own
 *     virtdisk_api.h: MinGW-w64's <virtdisk.h> lacks OPEN_VIRTUAL_DISK v3,
 *     CREATE v3/v4 and ATTACH v2, and its CREATE v2 and ATTACH layouts differ
 *     from the SDK's, while ours equal the SDK's on x64, x86 and ARM64
 *     (tests/test_conformance.py).  <windows.h> stays out of this file then:
 *     its ULONG is not uint32_t's type.
 */
#ifndef VD_SHIM_WINDOWS_H
#define VD_SHIM_WINDOWS_H

#include <stddef.h>
#include <stdint.h>
/* cffi spells every WCHAR of the cdef as char16_t in the code it generates,
   and its documentation leaves declaring char16_t to set_source's code: no
   Windows header does. */
#include <uchar.h>

#if defined(__MINGW64_VERSION_MAJOR) /* defined by every MinGW-w64 C header */
#ifndef WINAPI
#define WINAPI __stdcall
#endif
#include "virtdisk_api.h"
#else
#include "windows_sdk.h"
#endif

#include "late_bound.h"
#include "shim.h"

/* cffi's generated calls use these names: they reach the thunks, never an
   import of the real function.  One line per VD_LATE_FUNCTIONS entry
   (tests/test_conformance.py checks that they agree). */
#define EnumerateVirtualDiskMetadata vd_late_EnumerateVirtualDiskMetadata
#define GetVirtualDiskMetadata vd_late_GetVirtualDiskMetadata
#define SetVirtualDiskMetadata vd_late_SetVirtualDiskMetadata
#define DeleteVirtualDiskMetadata vd_late_DeleteVirtualDiskMetadata
#define ResizeVirtualDisk vd_late_ResizeVirtualDisk
#define MirrorVirtualDisk vd_late_MirrorVirtualDisk
#define BreakMirrorVirtualDisk vd_late_BreakMirrorVirtualDisk
#define AddVirtualDiskParent vd_late_AddVirtualDiskParent
#define GetAllAttachedVirtualDiskPhysicalPaths vd_late_GetAllAttachedVirtualDiskPhysicalPaths
#define QueryChangesVirtualDisk vd_late_QueryChangesVirtualDisk
#define TakeSnapshotVhdSet vd_late_TakeSnapshotVhdSet
#define DeleteSnapshotVhdSet vd_late_DeleteSnapshotVhdSet
#define ModifyVhdSet vd_late_ModifyVhdSet
#define ApplySnapshotVhdSet vd_late_ApplySnapshotVhdSet
#define RawSCSIVirtualDisk vd_late_RawSCSIVirtualDisk
#define ForkVirtualDisk vd_late_ForkVirtualDisk
#define CompleteForkVirtualDisk vd_late_CompleteForkVirtualDisk

#endif
