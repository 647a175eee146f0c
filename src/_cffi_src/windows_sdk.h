/*
 * The system's Windows and VirtDisk headers, for shim_windows.c and for the
 * module's C where the system <virtdisk.h> is the SDK's (shim_windows.h):
 * <windows.h>, <virtdisk.h>, and what some versions of them lack.
 */
#ifndef VD_WINDOWS_SDK_H
#define VD_WINDOWS_SDK_H

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

/* SDKs before 10.0.26100 (10.0.22000 and 10.0.25290 among them, still
   common) lack ATTACH_VIRTUAL_DISK_FLAG_AT_BOOT, and cffi checks every
   #define of the cdef against the compiler: without this the build fails.
   The SDK's value; where the SDK has the enumerator, this macro stands for
   it with the same value (tests/test_conformance.py checks it). */
#define ATTACH_VIRTUAL_DISK_FLAG_AT_BOOT 0x00000400

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

#endif
