/*
 * The Windows side of virtdisk._native: the preamble cffi compiles its
 * generated code with (build_virtdisk.py), and the header of shim_windows.c.
 *
 * The system's <virtdisk.h> declares everything; cffi checks our cdef against
 * it.  Two things are added here:
 *   - the functions newer than Windows 7 are routed through run-time lookup
 *     (late_bound.h), so that the module imports on any Windows and a missing
 *     function answers ERROR_CALL_NOT_IMPLEMENTED instead;
 *   - what MinGW-w64's <virtdisk.h> lacks, so that shim_windows.c also builds
 *     with MinGW-w64 and zig, which is how tests/test_conformance.py checks it
 *     on Linux.  (The module itself is built with MSVC and the SDK: MinGW-w64's
 *     stale layouts would fail cffi's own checks.)
 */
#ifndef VD_SHIM_WINDOWS_H
#define VD_SHIM_WINDOWS_H

/* Python's pyconfig.h targets Windows 8 (NTDDI_WIN8), and the SDK's
   <virtdisk.h> hides whatever is newer than NTDDI_VERSION.  Every declaration
   is wanted here, whatever Windows build it arrived in: which of them this
   Windows has is decided at run time.  0x0A00FFFF is past every Windows 10/11
   NTDDI value. */
#undef NTDDI_VERSION
#undef _WIN32_WINNT
#undef WINVER
#define NTDDI_VERSION 0x0A00FFFF
#define _WIN32_WINNT 0x0A00
#define WINVER 0x0A00

#include <windows.h>
#include <virtdisk.h>

/* Up to at least 15.0 (zig's) MinGW-w64 declares neither RawSCSIVirtualDisk
   nor ForkVirtualDisk, nor their types; these are the SDK's definitions. */
#if defined(__MINGW64_VERSION_MAJOR) && __MINGW64_VERSION_MAJOR <= 15
typedef enum _RAW_SCSI_VIRTUAL_DISK_VERSION {
    RAW_SCSI_VIRTUAL_DISK_VERSION_UNSPECIFIED = 0,
    RAW_SCSI_VIRTUAL_DISK_VERSION_1 = 1
} RAW_SCSI_VIRTUAL_DISK_VERSION;

typedef struct _RAW_SCSI_VIRTUAL_DISK_PARAMETERS {
    RAW_SCSI_VIRTUAL_DISK_VERSION Version;
    union {
        struct {
            BOOL RSVDHandle;
            UCHAR DataIn;
            UCHAR CdbLength;
            UCHAR SenseInfoLength;
            ULONG SrbFlags;
            ULONG DataTransferLength;
            PVOID DataBuffer;
            UCHAR *SenseInfo;
            UCHAR *Cdb;
        } Version1;
    };
} RAW_SCSI_VIRTUAL_DISK_PARAMETERS, *PRAW_SCSI_VIRTUAL_DISK_PARAMETERS;

typedef struct _RAW_SCSI_VIRTUAL_DISK_RESPONSE {
    RAW_SCSI_VIRTUAL_DISK_VERSION Version;
    union {
        struct {
            UCHAR ScsiStatus;
            UCHAR SenseInfoLength;
            ULONG DataTransferLength;
        } Version1;
    };
} RAW_SCSI_VIRTUAL_DISK_RESPONSE, *PRAW_SCSI_VIRTUAL_DISK_RESPONSE;

typedef enum _RAW_SCSI_VIRTUAL_DISK_FLAG {
    RAW_SCSI_VIRTUAL_DISK_FLAG_NONE = 0x0
} RAW_SCSI_VIRTUAL_DISK_FLAG;

typedef enum _FORK_VIRTUAL_DISK_VERSION {
    FORK_VIRTUAL_DISK_VERSION_UNSPECIFIED = 0,
    FORK_VIRTUAL_DISK_VERSION_1 = 1
} FORK_VIRTUAL_DISK_VERSION;

typedef struct _FORK_VIRTUAL_DISK_PARAMETERS {
    FORK_VIRTUAL_DISK_VERSION Version;
    union {
        struct {
            PCWSTR ForkedVirtualDiskPath;
        } Version1;
    };
} FORK_VIRTUAL_DISK_PARAMETERS, *PFORK_VIRTUAL_DISK_PARAMETERS;

typedef enum _FORK_VIRTUAL_DISK_FLAG {
    FORK_VIRTUAL_DISK_FLAG_NONE = 0x00000000,
    FORK_VIRTUAL_DISK_FLAG_EXISTING_FILE = 0x00000001
} FORK_VIRTUAL_DISK_FLAG;
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
