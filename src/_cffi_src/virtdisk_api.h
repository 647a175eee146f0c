/*
 * The VirtDisk API surface, spelled as the Windows SDK's virtdisk.h spells it.
 *
 * This one file is read twice:
 *   - by build_virtdisk.py as the cffi cdef, on every platform.  On Windows cffi
 *     compiles checks of every #define value below against the real
 *     <virtdisk.h>, and of the struct layouts as far as cffi checks them: the
 *     whole layout of a struct without anonymous members, but only the member
 *     sizes of one with an anonymous union (most here), whose offsets it takes
 *     from the compiler.  tests/test_conformance.py checks the rest.
 *   - by the C compiler as the Linux provider's stand-in for <virtdisk.h>
 *     (through src/provider/virtdisk.h, which supplies WINAPI and <stdint.h>),
 *     and as the Windows module's, where the system <virtdisk.h> is
 *     MinGW-w64's and lacks what the SDK has (shim_windows.h).
 *
 * It must therefore stay in the common subset of C and cffi's cdef syntax: no
 * #if, no #include, integer literals only in #define, P-typedefs written as
 * plain pointers.  Layouts are the SDK's for x64 (checked by
 * tests/test_conformance.py); ULONG is 32 bits and WCHAR 16 bits everywhere.
 */

/* ---- base types -------------------------------------------------------- */

typedef uint32_t ULONG;
typedef uint32_t DWORD;
typedef int32_t BOOL;
typedef uint64_t ULONGLONG;
typedef uint64_t ULONG64;
typedef unsigned char UCHAR;
typedef char16_t WCHAR;
typedef void *HANDLE;
typedef void *PVOID;
typedef void *PSECURITY_DESCRIPTOR;
typedef uintptr_t ULONG_PTR;

/* kernel32's OVERLAPPED, laid out as the SDK lays it out (32 bytes on x64):
   callers allocate one for an asynchronous call.  On Linux hEvent, when not
   NULL, is an eventfd descriptor cast to HANDLE (CreateEventW below makes
   one); the provider drains it when the operation starts and signals it when
   the operation ends, Internal is STATUS_PENDING (0x103) while it runs and
   the operation's Win32 result afterwards. */
typedef struct _OVERLAPPED {
    ULONG_PTR Internal;
    ULONG_PTR InternalHigh;
    union {
        struct {
            DWORD Offset;
            DWORD OffsetHigh;
        };
        PVOID Pointer;
    };
    HANDLE hEvent;
} OVERLAPPED;

typedef struct _GUID {
    uint32_t Data1;
    uint16_t Data2;
    uint16_t Data3;
    uint8_t Data4[8];
} GUID;

/* ---- storage type ------------------------------------------------------ */

typedef struct _VIRTUAL_STORAGE_TYPE {
    ULONG DeviceId;
    GUID VendorId;
} VIRTUAL_STORAGE_TYPE;

#define VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN 0
#define VIRTUAL_STORAGE_TYPE_DEVICE_ISO 1
#define VIRTUAL_STORAGE_TYPE_DEVICE_VHD 2
#define VIRTUAL_STORAGE_TYPE_DEVICE_VHDX 3
#define VIRTUAL_STORAGE_TYPE_DEVICE_VHDSET 4

/* Objects in the SDK (DEFINE_GUID): VirtDisk's GUID instances on Windows
   (INITGUID), the provider's on Linux. */
extern const GUID VIRTUAL_STORAGE_TYPE_VENDOR_UNKNOWN;
extern const GUID VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT;

/* ---- open -------------------------------------------------------------- */

#define OPEN_VIRTUAL_DISK_RW_DEPTH_DEFAULT 1

typedef uint32_t VIRTUAL_DISK_ACCESS_MASK;
#define VIRTUAL_DISK_ACCESS_NONE 0x00000000
#define VIRTUAL_DISK_ACCESS_ATTACH_RO 0x00010000
#define VIRTUAL_DISK_ACCESS_ATTACH_RW 0x00020000
#define VIRTUAL_DISK_ACCESS_DETACH 0x00040000
#define VIRTUAL_DISK_ACCESS_GET_INFO 0x00080000
#define VIRTUAL_DISK_ACCESS_CREATE 0x00100000
#define VIRTUAL_DISK_ACCESS_METAOPS 0x00200000
#define VIRTUAL_DISK_ACCESS_READ 0x000d0000
#define VIRTUAL_DISK_ACCESS_ALL 0x003f0000
#define VIRTUAL_DISK_ACCESS_WRITABLE 0x00320000

typedef uint32_t OPEN_VIRTUAL_DISK_FLAG;
#define OPEN_VIRTUAL_DISK_FLAG_NONE 0x00000000
#define OPEN_VIRTUAL_DISK_FLAG_NO_PARENTS 0x00000001
#define OPEN_VIRTUAL_DISK_FLAG_BLANK_FILE 0x00000002
#define OPEN_VIRTUAL_DISK_FLAG_BOOT_DRIVE 0x00000004
#define OPEN_VIRTUAL_DISK_FLAG_CACHED_IO 0x00000008
#define OPEN_VIRTUAL_DISK_FLAG_CUSTOM_DIFF_CHAIN 0x00000010
#define OPEN_VIRTUAL_DISK_FLAG_PARENT_CACHED_IO 0x00000020
#define OPEN_VIRTUAL_DISK_FLAG_VHDSET_FILE_ONLY 0x00000040
#define OPEN_VIRTUAL_DISK_FLAG_IGNORE_RELATIVE_PARENT_LOCATOR 0x00000080
#define OPEN_VIRTUAL_DISK_FLAG_NO_WRITE_HARDENING 0x00000100
#define OPEN_VIRTUAL_DISK_FLAG_SUPPORT_COMPRESSED_VOLUMES 0x00000200
#define OPEN_VIRTUAL_DISK_FLAG_SUPPORT_SPARSE_FILES_ANY_FS 0x00000400
#define OPEN_VIRTUAL_DISK_FLAG_SUPPORT_ENCRYPTED_FILES 0x00000800

typedef int32_t OPEN_VIRTUAL_DISK_VERSION;
#define OPEN_VIRTUAL_DISK_VERSION_UNSPECIFIED 0
#define OPEN_VIRTUAL_DISK_VERSION_1 1
#define OPEN_VIRTUAL_DISK_VERSION_2 2
#define OPEN_VIRTUAL_DISK_VERSION_3 3

typedef struct _OPEN_VIRTUAL_DISK_PARAMETERS {
    OPEN_VIRTUAL_DISK_VERSION Version;
    union {
        struct {
            ULONG RWDepth;
        } Version1;
        struct {
            BOOL GetInfoOnly;
            BOOL ReadOnly;
            GUID ResiliencyGuid;
        } Version2;
        struct {
            BOOL GetInfoOnly;
            BOOL ReadOnly;
            GUID ResiliencyGuid;
            GUID SnapshotId;
        } Version3;
    };
} OPEN_VIRTUAL_DISK_PARAMETERS;

/* ---- create ------------------------------------------------------------ */

#define CREATE_VIRTUAL_DISK_PARAMETERS_DEFAULT_BLOCK_SIZE 0
#define CREATE_VIRTUAL_DISK_PARAMETERS_DEFAULT_SECTOR_SIZE 0

typedef uint32_t CREATE_VIRTUAL_DISK_FLAG;
#define CREATE_VIRTUAL_DISK_FLAG_NONE 0x00000000
#define CREATE_VIRTUAL_DISK_FLAG_FULL_PHYSICAL_ALLOCATION 0x00000001
#define CREATE_VIRTUAL_DISK_FLAG_PREVENT_WRITES_TO_SOURCE_DISK 0x00000002
#define CREATE_VIRTUAL_DISK_FLAG_DO_NOT_COPY_METADATA_FROM_PARENT 0x00000004
#define CREATE_VIRTUAL_DISK_FLAG_CREATE_BACKING_STORAGE 0x00000008
#define CREATE_VIRTUAL_DISK_FLAG_USE_CHANGE_TRACKING_SOURCE_LIMIT 0x00000010
#define CREATE_VIRTUAL_DISK_FLAG_PRESERVE_PARENT_CHANGE_TRACKING_STATE 0x00000020
#define CREATE_VIRTUAL_DISK_FLAG_VHD_SET_USE_ORIGINAL_BACKING_STORAGE 0x00000040
#define CREATE_VIRTUAL_DISK_FLAG_SPARSE_FILE 0x00000080
#define CREATE_VIRTUAL_DISK_FLAG_PMEM_COMPATIBLE 0x00000100
#define CREATE_VIRTUAL_DISK_FLAG_SUPPORT_COMPRESSED_VOLUMES 0x00000200
#define CREATE_VIRTUAL_DISK_FLAG_SUPPORT_SPARSE_FILES_ANY_FS 0x00000400

typedef int32_t CREATE_VIRTUAL_DISK_VERSION;
#define CREATE_VIRTUAL_DISK_VERSION_UNSPECIFIED 0
#define CREATE_VIRTUAL_DISK_VERSION_1 1
#define CREATE_VIRTUAL_DISK_VERSION_2 2
#define CREATE_VIRTUAL_DISK_VERSION_3 3
#define CREATE_VIRTUAL_DISK_VERSION_4 4

typedef struct _CREATE_VIRTUAL_DISK_PARAMETERS {
    CREATE_VIRTUAL_DISK_VERSION Version;
    union {
        struct {
            GUID UniqueId;
            ULONGLONG MaximumSize;
            ULONG BlockSizeInBytes;
            ULONG SectorSizeInBytes;
            const WCHAR *ParentPath;
            const WCHAR *SourcePath;
        } Version1;
        struct {
            GUID UniqueId;
            ULONGLONG MaximumSize;
            ULONG BlockSizeInBytes;
            ULONG SectorSizeInBytes;
            ULONG PhysicalSectorSizeInBytes;
            const WCHAR *ParentPath;
            const WCHAR *SourcePath;
            OPEN_VIRTUAL_DISK_FLAG OpenFlags;
            VIRTUAL_STORAGE_TYPE ParentVirtualStorageType;
            VIRTUAL_STORAGE_TYPE SourceVirtualStorageType;
            GUID ResiliencyGuid;
        } Version2;
        struct {
            GUID UniqueId;
            ULONGLONG MaximumSize;
            ULONG BlockSizeInBytes;
            ULONG SectorSizeInBytes;
            ULONG PhysicalSectorSizeInBytes;
            const WCHAR *ParentPath;
            const WCHAR *SourcePath;
            OPEN_VIRTUAL_DISK_FLAG OpenFlags;
            VIRTUAL_STORAGE_TYPE ParentVirtualStorageType;
            VIRTUAL_STORAGE_TYPE SourceVirtualStorageType;
            GUID ResiliencyGuid;
            const WCHAR *SourceLimitPath;
            VIRTUAL_STORAGE_TYPE BackingStorageType;
        } Version3;
        struct {
            GUID UniqueId;
            ULONGLONG MaximumSize;
            ULONG BlockSizeInBytes;
            ULONG SectorSizeInBytes;
            ULONG PhysicalSectorSizeInBytes;
            const WCHAR *ParentPath;
            const WCHAR *SourcePath;
            OPEN_VIRTUAL_DISK_FLAG OpenFlags;
            VIRTUAL_STORAGE_TYPE ParentVirtualStorageType;
            VIRTUAL_STORAGE_TYPE SourceVirtualStorageType;
            GUID ResiliencyGuid;
            const WCHAR *SourceLimitPath;
            VIRTUAL_STORAGE_TYPE BackingStorageType;
            GUID PmemAddressAbstractionType;
            ULONGLONG DataAlignment;
        } Version4;
    };
} CREATE_VIRTUAL_DISK_PARAMETERS;

/* ---- attach / detach --------------------------------------------------- */

typedef uint32_t ATTACH_VIRTUAL_DISK_FLAG;
#define ATTACH_VIRTUAL_DISK_FLAG_NONE 0x00000000
#define ATTACH_VIRTUAL_DISK_FLAG_READ_ONLY 0x00000001
#define ATTACH_VIRTUAL_DISK_FLAG_NO_DRIVE_LETTER 0x00000002
#define ATTACH_VIRTUAL_DISK_FLAG_PERMANENT_LIFETIME 0x00000004
#define ATTACH_VIRTUAL_DISK_FLAG_NO_LOCAL_HOST 0x00000008
#define ATTACH_VIRTUAL_DISK_FLAG_NO_SECURITY_DESCRIPTOR 0x00000010
#define ATTACH_VIRTUAL_DISK_FLAG_BYPASS_DEFAULT_ENCRYPTION_POLICY 0x00000020
#define ATTACH_VIRTUAL_DISK_FLAG_NON_PNP 0x00000040
#define ATTACH_VIRTUAL_DISK_FLAG_RESTRICTED_RANGE 0x00000080
#define ATTACH_VIRTUAL_DISK_FLAG_SINGLE_PARTITION 0x00000100
#define ATTACH_VIRTUAL_DISK_FLAG_REGISTER_VOLUME 0x00000200
#define ATTACH_VIRTUAL_DISK_FLAG_AT_BOOT 0x00000400

typedef int32_t ATTACH_VIRTUAL_DISK_VERSION;
#define ATTACH_VIRTUAL_DISK_VERSION_UNSPECIFIED 0
#define ATTACH_VIRTUAL_DISK_VERSION_1 1
#define ATTACH_VIRTUAL_DISK_VERSION_2 2

typedef struct _ATTACH_VIRTUAL_DISK_PARAMETERS {
    ATTACH_VIRTUAL_DISK_VERSION Version;
    union {
        struct {
            ULONG Reserved;
        } Version1;
        struct {
            ULONGLONG RestrictedOffset;
            ULONGLONG RestrictedLength;
        } Version2;
    };
} ATTACH_VIRTUAL_DISK_PARAMETERS;

typedef uint32_t DETACH_VIRTUAL_DISK_FLAG;
#define DETACH_VIRTUAL_DISK_FLAG_NONE 0x00000000

/* ---- storage dependency ------------------------------------------------ */

typedef uint32_t DEPENDENT_DISK_FLAG;
#define DEPENDENT_DISK_FLAG_NONE 0x00000000
#define DEPENDENT_DISK_FLAG_MULT_BACKING_FILES 0x00000001
#define DEPENDENT_DISK_FLAG_FULLY_ALLOCATED 0x00000002
#define DEPENDENT_DISK_FLAG_READ_ONLY 0x00000004
#define DEPENDENT_DISK_FLAG_REMOTE 0x00000008
#define DEPENDENT_DISK_FLAG_SYSTEM_VOLUME 0x00000010
#define DEPENDENT_DISK_FLAG_SYSTEM_VOLUME_PARENT 0x00000020
#define DEPENDENT_DISK_FLAG_REMOVABLE 0x00000040
#define DEPENDENT_DISK_FLAG_NO_DRIVE_LETTER 0x00000080
#define DEPENDENT_DISK_FLAG_PARENT 0x00000100
#define DEPENDENT_DISK_FLAG_NO_HOST_DISK 0x00000200
#define DEPENDENT_DISK_FLAG_PERMANENT_LIFETIME 0x00000400
#define DEPENDENT_DISK_FLAG_SUPPORT_COMPRESSED_VOLUMES 0x00000800
#define DEPENDENT_DISK_FLAG_ALWAYS_ALLOW_SPARSE 0x00001000
#define DEPENDENT_DISK_FLAG_SUPPORT_ENCRYPTED_FILES 0x00002000

typedef int32_t STORAGE_DEPENDENCY_INFO_VERSION;
#define STORAGE_DEPENDENCY_INFO_VERSION_UNSPECIFIED 0
#define STORAGE_DEPENDENCY_INFO_VERSION_1 1
#define STORAGE_DEPENDENCY_INFO_VERSION_2 2

typedef struct _STORAGE_DEPENDENCY_INFO_TYPE_1 {
    DEPENDENT_DISK_FLAG DependencyTypeFlags;
    ULONG ProviderSpecificFlags;
    VIRTUAL_STORAGE_TYPE VirtualStorageType;
} STORAGE_DEPENDENCY_INFO_TYPE_1;

typedef struct _STORAGE_DEPENDENCY_INFO_TYPE_2 {
    DEPENDENT_DISK_FLAG DependencyTypeFlags;
    ULONG ProviderSpecificFlags;
    VIRTUAL_STORAGE_TYPE VirtualStorageType;
    ULONG AncestorLevel;
    WCHAR *DependencyDeviceName;
    WCHAR *HostVolumeName;
    WCHAR *DependentVolumeName;
    WCHAR *DependentVolumeRelativePath;
} STORAGE_DEPENDENCY_INFO_TYPE_2;

/* The SDK's entry arrays are flexible ([]), which C allows in no union: [0]
   is GNU C's (and MSVC's) spelling of the same thing, so that the Linux
   provider compiles this file and the layout is the SDK's (sizeof 8, entries
   at offset 8).  build_virtdisk.py hands them to cffi as [] again: cffi then
   asks the compiler for their offset but never for a sizeof, which MSVC
   refuses or answers 0 for the SDK's flexible arrays.  Size buffers from
   NumberEntries. */
typedef struct _STORAGE_DEPENDENCY_INFO {
    STORAGE_DEPENDENCY_INFO_VERSION Version;
    ULONG NumberEntries;
    union {
        STORAGE_DEPENDENCY_INFO_TYPE_1 Version1Entries[0];
        STORAGE_DEPENDENCY_INFO_TYPE_2 Version2Entries[0];
    };
} STORAGE_DEPENDENCY_INFO;

typedef uint32_t GET_STORAGE_DEPENDENCY_FLAG;
#define GET_STORAGE_DEPENDENCY_FLAG_NONE 0x00000000
#define GET_STORAGE_DEPENDENCY_FLAG_HOST_VOLUMES 0x00000001
#define GET_STORAGE_DEPENDENCY_FLAG_PARENTS 0x00000001
#define GET_STORAGE_DEPENDENCY_FLAG_DISK_HANDLE 0x00000002

/* ---- information ------------------------------------------------------- */

typedef int32_t GET_VIRTUAL_DISK_INFO_VERSION;
#define GET_VIRTUAL_DISK_INFO_UNSPECIFIED 0
#define GET_VIRTUAL_DISK_INFO_SIZE 1
#define GET_VIRTUAL_DISK_INFO_IDENTIFIER 2
#define GET_VIRTUAL_DISK_INFO_PARENT_LOCATION 3
#define GET_VIRTUAL_DISK_INFO_PARENT_IDENTIFIER 4
#define GET_VIRTUAL_DISK_INFO_PARENT_TIMESTAMP 5
#define GET_VIRTUAL_DISK_INFO_VIRTUAL_STORAGE_TYPE 6
#define GET_VIRTUAL_DISK_INFO_PROVIDER_SUBTYPE 7
#define GET_VIRTUAL_DISK_INFO_IS_4K_ALIGNED 8
#define GET_VIRTUAL_DISK_INFO_PHYSICAL_DISK 9
#define GET_VIRTUAL_DISK_INFO_VHD_PHYSICAL_SECTOR_SIZE 10
#define GET_VIRTUAL_DISK_INFO_SMALLEST_SAFE_VIRTUAL_SIZE 11
#define GET_VIRTUAL_DISK_INFO_FRAGMENTATION 12
#define GET_VIRTUAL_DISK_INFO_IS_LOADED 13
#define GET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID 14
#define GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE 15

typedef struct _GET_VIRTUAL_DISK_INFO {
    GET_VIRTUAL_DISK_INFO_VERSION Version;
    union {
        struct {
            ULONGLONG VirtualSize;
            ULONGLONG PhysicalSize;
            ULONG BlockSize;
            ULONG SectorSize;
        } Size;
        GUID Identifier;
        struct {
            BOOL ParentResolved;
            WCHAR ParentLocationBuffer[1];
        } ParentLocation;
        GUID ParentIdentifier;
        ULONG ParentTimestamp;
        VIRTUAL_STORAGE_TYPE VirtualStorageType;
        ULONG ProviderSubtype;
        BOOL Is4kAligned;
        BOOL IsLoaded;
        struct {
            ULONG LogicalSectorSize;
            ULONG PhysicalSectorSize;
            BOOL IsRemote;
        } PhysicalDisk;
        ULONG VhdPhysicalSectorSize;
        ULONGLONG SmallestSafeVirtualSize;
        ULONG FragmentationPercentage;
        GUID VirtualDiskId;
        struct {
            BOOL Enabled;
            BOOL NewerChanges;
            WCHAR MostRecentId[1];
        } ChangeTrackingState;
    };
} GET_VIRTUAL_DISK_INFO;

typedef int32_t SET_VIRTUAL_DISK_INFO_VERSION;
#define SET_VIRTUAL_DISK_INFO_UNSPECIFIED 0
#define SET_VIRTUAL_DISK_INFO_PARENT_PATH 1
#define SET_VIRTUAL_DISK_INFO_IDENTIFIER 2
#define SET_VIRTUAL_DISK_INFO_PARENT_PATH_WITH_DEPTH 3
#define SET_VIRTUAL_DISK_INFO_PHYSICAL_SECTOR_SIZE 4
#define SET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID 5
#define SET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE 6
#define SET_VIRTUAL_DISK_INFO_PARENT_LOCATOR 7

typedef struct _SET_VIRTUAL_DISK_INFO {
    SET_VIRTUAL_DISK_INFO_VERSION Version;
    union {
        const WCHAR *ParentFilePath;
        GUID UniqueIdentifier;
        struct {
            ULONG ChildDepth;
            const WCHAR *ParentFilePath;
        } ParentPathWithDepthInfo;
        ULONG VhdPhysicalSectorSize;
        GUID VirtualDiskId;
        BOOL ChangeTrackingEnabled;
        struct {
            GUID LinkageId;
            const WCHAR *ParentFilePath;
        } ParentLocator;
    };
} SET_VIRTUAL_DISK_INFO;

/* ---- progress ---------------------------------------------------------- */

typedef struct _VIRTUAL_DISK_PROGRESS {
    DWORD OperationStatus;
    ULONGLONG CurrentValue;
    ULONGLONG CompletionValue;
} VIRTUAL_DISK_PROGRESS;

/* ---- compact / merge / expand / resize / mirror ------------------------ */

typedef int32_t COMPACT_VIRTUAL_DISK_VERSION;
#define COMPACT_VIRTUAL_DISK_VERSION_UNSPECIFIED 0
#define COMPACT_VIRTUAL_DISK_VERSION_1 1

typedef struct _COMPACT_VIRTUAL_DISK_PARAMETERS {
    COMPACT_VIRTUAL_DISK_VERSION Version;
    union {
        struct {
            ULONG Reserved;
        } Version1;
    };
} COMPACT_VIRTUAL_DISK_PARAMETERS;

typedef uint32_t COMPACT_VIRTUAL_DISK_FLAG;
#define COMPACT_VIRTUAL_DISK_FLAG_NONE 0x00000000
#define COMPACT_VIRTUAL_DISK_FLAG_NO_ZERO_SCAN 0x00000001
#define COMPACT_VIRTUAL_DISK_FLAG_NO_BLOCK_MOVES 0x00000002

#define MERGE_VIRTUAL_DISK_DEFAULT_MERGE_DEPTH 1

typedef int32_t MERGE_VIRTUAL_DISK_VERSION;
#define MERGE_VIRTUAL_DISK_VERSION_UNSPECIFIED 0
#define MERGE_VIRTUAL_DISK_VERSION_1 1
#define MERGE_VIRTUAL_DISK_VERSION_2 2

typedef struct _MERGE_VIRTUAL_DISK_PARAMETERS {
    MERGE_VIRTUAL_DISK_VERSION Version;
    union {
        struct {
            ULONG MergeDepth;
        } Version1;
        struct {
            ULONG MergeSourceDepth;
            ULONG MergeTargetDepth;
        } Version2;
    };
} MERGE_VIRTUAL_DISK_PARAMETERS;

typedef uint32_t MERGE_VIRTUAL_DISK_FLAG;
#define MERGE_VIRTUAL_DISK_FLAG_NONE 0x00000000

typedef int32_t EXPAND_VIRTUAL_DISK_VERSION;
#define EXPAND_VIRTUAL_DISK_VERSION_UNSPECIFIED 0
#define EXPAND_VIRTUAL_DISK_VERSION_1 1

typedef struct _EXPAND_VIRTUAL_DISK_PARAMETERS {
    EXPAND_VIRTUAL_DISK_VERSION Version;
    union {
        struct {
            ULONGLONG NewSize;
        } Version1;
    };
} EXPAND_VIRTUAL_DISK_PARAMETERS;

typedef uint32_t EXPAND_VIRTUAL_DISK_FLAG;
#define EXPAND_VIRTUAL_DISK_FLAG_NONE 0x00000000
#define EXPAND_VIRTUAL_DISK_FLAG_NOTIFY_CHANGE 0x00000001

typedef int32_t RESIZE_VIRTUAL_DISK_VERSION;
#define RESIZE_VIRTUAL_DISK_VERSION_UNSPECIFIED 0
#define RESIZE_VIRTUAL_DISK_VERSION_1 1

typedef struct _RESIZE_VIRTUAL_DISK_PARAMETERS {
    RESIZE_VIRTUAL_DISK_VERSION Version;
    union {
        struct {
            ULONGLONG NewSize;
        } Version1;
    };
} RESIZE_VIRTUAL_DISK_PARAMETERS;

typedef uint32_t RESIZE_VIRTUAL_DISK_FLAG;
#define RESIZE_VIRTUAL_DISK_FLAG_NONE 0x00000000
#define RESIZE_VIRTUAL_DISK_FLAG_ALLOW_UNSAFE_VIRTUAL_SIZE 0x00000001
#define RESIZE_VIRTUAL_DISK_FLAG_RESIZE_TO_SMALLEST_SAFE_VIRTUAL_SIZE 0x00000002

typedef int32_t MIRROR_VIRTUAL_DISK_VERSION;
#define MIRROR_VIRTUAL_DISK_VERSION_UNSPECIFIED 0
#define MIRROR_VIRTUAL_DISK_VERSION_1 1

typedef struct _MIRROR_VIRTUAL_DISK_PARAMETERS {
    MIRROR_VIRTUAL_DISK_VERSION Version;
    union {
        struct {
            const WCHAR *MirrorVirtualDiskPath;
        } Version1;
    };
} MIRROR_VIRTUAL_DISK_PARAMETERS;

typedef uint32_t MIRROR_VIRTUAL_DISK_FLAG;
#define MIRROR_VIRTUAL_DISK_FLAG_NONE 0x00000000
#define MIRROR_VIRTUAL_DISK_FLAG_EXISTING_FILE 0x00000001
#define MIRROR_VIRTUAL_DISK_FLAG_SKIP_MIRROR_ACTIVATION 0x00000002
#define MIRROR_VIRTUAL_DISK_FLAG_ENABLE_SMB_COMPRESSION 0x00000004
#define MIRROR_VIRTUAL_DISK_FLAG_IS_LIVE_MIGRATION 0x00000008

/* ---- change tracking and VHD Sets -------------------------------------- */

typedef uint32_t QUERY_CHANGES_VIRTUAL_DISK_FLAG;
#define QUERY_CHANGES_VIRTUAL_DISK_FLAG_NONE 0x00000000

typedef struct _QUERY_CHANGES_VIRTUAL_DISK_RANGE {
    ULONG64 ByteOffset;
    ULONG64 ByteLength;
    ULONG64 Reserved;
} QUERY_CHANGES_VIRTUAL_DISK_RANGE;

#define VIRTUAL_DISK_MAXIMUM_CHANGE_TRACKING_ID_LENGTH 256

typedef int32_t TAKE_SNAPSHOT_VHDSET_VERSION;
#define TAKE_SNAPSHOT_VHDSET_VERSION_UNSPECIFIED 0
#define TAKE_SNAPSHOT_VHDSET_VERSION_1 1

typedef struct _TAKE_SNAPSHOT_VHDSET_PARAMETERS {
    TAKE_SNAPSHOT_VHDSET_VERSION Version;
    union {
        struct {
            GUID SnapshotId;
        } Version1;
    };
} TAKE_SNAPSHOT_VHDSET_PARAMETERS;

typedef uint32_t TAKE_SNAPSHOT_VHDSET_FLAG;
#define TAKE_SNAPSHOT_VHDSET_FLAG_NONE 0x00000000
#define TAKE_SNAPSHOT_VHDSET_FLAG_WRITEABLE 0x00000001

typedef int32_t DELETE_SNAPSHOT_VHDSET_VERSION;
#define DELETE_SNAPSHOT_VHDSET_VERSION_UNSPECIFIED 0
#define DELETE_SNAPSHOT_VHDSET_VERSION_1 1

typedef struct _DELETE_SNAPSHOT_VHDSET_PARAMETERS {
    DELETE_SNAPSHOT_VHDSET_VERSION Version;
    union {
        struct {
            GUID SnapshotId;
        } Version1;
    };
} DELETE_SNAPSHOT_VHDSET_PARAMETERS;

typedef uint32_t DELETE_SNAPSHOT_VHDSET_FLAG;
#define DELETE_SNAPSHOT_VHDSET_FLAG_NONE 0x00000000
#define DELETE_SNAPSHOT_VHDSET_FLAG_PERSIST_RCT 0x00000001

typedef int32_t MODIFY_VHDSET_VERSION;
#define MODIFY_VHDSET_UNSPECIFIED 0
#define MODIFY_VHDSET_SNAPSHOT_PATH 1
#define MODIFY_VHDSET_REMOVE_SNAPSHOT 2
#define MODIFY_VHDSET_DEFAULT_SNAPSHOT_PATH 3

typedef struct _MODIFY_VHDSET_PARAMETERS {
    MODIFY_VHDSET_VERSION Version;
    union {
        struct {
            GUID SnapshotId;
            const WCHAR *SnapshotFilePath;
        } SnapshotPath;
        GUID SnapshotId;
        const WCHAR *DefaultFilePath;
    };
} MODIFY_VHDSET_PARAMETERS;

typedef uint32_t MODIFY_VHDSET_FLAG;
#define MODIFY_VHDSET_FLAG_NONE 0x00000000
#define MODIFY_VHDSET_FLAG_WRITEABLE_SNAPSHOT 0x00000001

typedef int32_t APPLY_SNAPSHOT_VHDSET_VERSION;
#define APPLY_SNAPSHOT_VHDSET_VERSION_UNSPECIFIED 0
#define APPLY_SNAPSHOT_VHDSET_VERSION_1 1

typedef struct _APPLY_SNAPSHOT_VHDSET_PARAMETERS {
    APPLY_SNAPSHOT_VHDSET_VERSION Version;
    union {
        struct {
            GUID SnapshotId;
            GUID LeafSnapshotId;
        } Version1;
    };
} APPLY_SNAPSHOT_VHDSET_PARAMETERS;

typedef uint32_t APPLY_SNAPSHOT_VHDSET_FLAG;
#define APPLY_SNAPSHOT_VHDSET_FLAG_NONE 0x00000000
#define APPLY_SNAPSHOT_VHDSET_FLAG_WRITEABLE 0x00000001

/* ---- raw SCSI and fork (not in Debian mingw-w64 10) ------------------- */

typedef int32_t RAW_SCSI_VIRTUAL_DISK_VERSION;
#define RAW_SCSI_VIRTUAL_DISK_VERSION_UNSPECIFIED 0
#define RAW_SCSI_VIRTUAL_DISK_VERSION_1 1

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
} RAW_SCSI_VIRTUAL_DISK_PARAMETERS;

typedef struct _RAW_SCSI_VIRTUAL_DISK_RESPONSE {
    RAW_SCSI_VIRTUAL_DISK_VERSION Version;
    union {
        struct {
            UCHAR ScsiStatus;
            UCHAR SenseInfoLength;
            ULONG DataTransferLength;
        } Version1;
    };
} RAW_SCSI_VIRTUAL_DISK_RESPONSE;

typedef uint32_t RAW_SCSI_VIRTUAL_DISK_FLAG;
#define RAW_SCSI_VIRTUAL_DISK_FLAG_NONE 0x00000000

typedef int32_t FORK_VIRTUAL_DISK_VERSION;
#define FORK_VIRTUAL_DISK_VERSION_UNSPECIFIED 0
#define FORK_VIRTUAL_DISK_VERSION_1 1

typedef struct _FORK_VIRTUAL_DISK_PARAMETERS {
    FORK_VIRTUAL_DISK_VERSION Version;
    union {
        struct {
            const WCHAR *ForkedVirtualDiskPath;
        } Version1;
    };
} FORK_VIRTUAL_DISK_PARAMETERS;

typedef uint32_t FORK_VIRTUAL_DISK_FLAG;
#define FORK_VIRTUAL_DISK_FLAG_NONE 0x00000000
#define FORK_VIRTUAL_DISK_FLAG_EXISTING_FILE 0x00000001

/* ---- functions (VirtDisk.dll) ------------------------------------------ */

DWORD WINAPI OpenVirtualDisk(VIRTUAL_STORAGE_TYPE *VirtualStorageType, const WCHAR *Path,
                             VIRTUAL_DISK_ACCESS_MASK VirtualDiskAccessMask,
                             OPEN_VIRTUAL_DISK_FLAG Flags,
                             OPEN_VIRTUAL_DISK_PARAMETERS *Parameters, HANDLE *Handle);

DWORD WINAPI CreateVirtualDisk(VIRTUAL_STORAGE_TYPE *VirtualStorageType, const WCHAR *Path,
                               VIRTUAL_DISK_ACCESS_MASK VirtualDiskAccessMask,
                               PSECURITY_DESCRIPTOR SecurityDescriptor,
                               CREATE_VIRTUAL_DISK_FLAG Flags, ULONG ProviderSpecificFlags,
                               CREATE_VIRTUAL_DISK_PARAMETERS *Parameters,
                               OVERLAPPED *Overlapped, HANDLE *Handle);

DWORD WINAPI AttachVirtualDisk(HANDLE VirtualDiskHandle, PSECURITY_DESCRIPTOR SecurityDescriptor,
                               ATTACH_VIRTUAL_DISK_FLAG Flags, ULONG ProviderSpecificFlags,
                               ATTACH_VIRTUAL_DISK_PARAMETERS *Parameters,
                               OVERLAPPED *Overlapped);

DWORD WINAPI DetachVirtualDisk(HANDLE VirtualDiskHandle, DETACH_VIRTUAL_DISK_FLAG Flags,
                               ULONG ProviderSpecificFlags);

DWORD WINAPI GetVirtualDiskPhysicalPath(HANDLE VirtualDiskHandle, ULONG *DiskPathSizeInBytes,
                                        WCHAR *DiskPath);

DWORD WINAPI GetAllAttachedVirtualDiskPhysicalPaths(ULONG *PathsBufferSizeInBytes,
                                                    WCHAR *PathsBuffer);

DWORD WINAPI GetStorageDependencyInformation(HANDLE ObjectHandle,
                                             GET_STORAGE_DEPENDENCY_FLAG Flags,
                                             ULONG StorageDependencyInfoSize,
                                             STORAGE_DEPENDENCY_INFO *StorageDependencyInfo,
                                             ULONG *SizeUsed);

DWORD WINAPI GetVirtualDiskInformation(HANDLE VirtualDiskHandle, ULONG *VirtualDiskInfoSize,
                                       GET_VIRTUAL_DISK_INFO *VirtualDiskInfo, ULONG *SizeUsed);

DWORD WINAPI SetVirtualDiskInformation(HANDLE VirtualDiskHandle,
                                       SET_VIRTUAL_DISK_INFO *VirtualDiskInfo);

DWORD WINAPI EnumerateVirtualDiskMetadata(HANDLE VirtualDiskHandle, ULONG *NumberOfItems,
                                          GUID *Items);

DWORD WINAPI GetVirtualDiskMetadata(HANDLE VirtualDiskHandle, const GUID *Item,
                                    ULONG *MetaDataSize, PVOID MetaData);

DWORD WINAPI SetVirtualDiskMetadata(HANDLE VirtualDiskHandle, const GUID *Item,
                                    ULONG MetaDataSize, const void *MetaData);

DWORD WINAPI DeleteVirtualDiskMetadata(HANDLE VirtualDiskHandle, const GUID *Item);

DWORD WINAPI GetVirtualDiskOperationProgress(HANDLE VirtualDiskHandle, OVERLAPPED *Overlapped,
                                             VIRTUAL_DISK_PROGRESS *Progress);

DWORD WINAPI CompactVirtualDisk(HANDLE VirtualDiskHandle, COMPACT_VIRTUAL_DISK_FLAG Flags,
                                COMPACT_VIRTUAL_DISK_PARAMETERS *Parameters,
                                OVERLAPPED *Overlapped);

DWORD WINAPI MergeVirtualDisk(HANDLE VirtualDiskHandle, MERGE_VIRTUAL_DISK_FLAG Flags,
                              MERGE_VIRTUAL_DISK_PARAMETERS *Parameters, OVERLAPPED *Overlapped);

DWORD WINAPI ExpandVirtualDisk(HANDLE VirtualDiskHandle, EXPAND_VIRTUAL_DISK_FLAG Flags,
                               EXPAND_VIRTUAL_DISK_PARAMETERS *Parameters,
                               OVERLAPPED *Overlapped);

DWORD WINAPI ResizeVirtualDisk(HANDLE VirtualDiskHandle, RESIZE_VIRTUAL_DISK_FLAG Flags,
                               RESIZE_VIRTUAL_DISK_PARAMETERS *Parameters,
                               OVERLAPPED *Overlapped);

DWORD WINAPI MirrorVirtualDisk(HANDLE VirtualDiskHandle, MIRROR_VIRTUAL_DISK_FLAG Flags,
                               MIRROR_VIRTUAL_DISK_PARAMETERS *Parameters,
                               OVERLAPPED *Overlapped);

DWORD WINAPI BreakMirrorVirtualDisk(HANDLE VirtualDiskHandle);

DWORD WINAPI AddVirtualDiskParent(HANDLE VirtualDiskHandle, const WCHAR *ParentPath);

DWORD WINAPI QueryChangesVirtualDisk(HANDLE VirtualDiskHandle, const WCHAR *ChangeTrackingId,
                                     ULONG64 ByteOffset, ULONG64 ByteLength,
                                     QUERY_CHANGES_VIRTUAL_DISK_FLAG Flags,
                                     QUERY_CHANGES_VIRTUAL_DISK_RANGE *Ranges,
                                     ULONG *RangeCount, ULONG64 *ProcessedLength);

DWORD WINAPI TakeSnapshotVhdSet(HANDLE VirtualDiskHandle,
                                const TAKE_SNAPSHOT_VHDSET_PARAMETERS *Parameters,
                                TAKE_SNAPSHOT_VHDSET_FLAG Flags);

DWORD WINAPI DeleteSnapshotVhdSet(HANDLE VirtualDiskHandle,
                                  const DELETE_SNAPSHOT_VHDSET_PARAMETERS *Parameters,
                                  DELETE_SNAPSHOT_VHDSET_FLAG Flags);

DWORD WINAPI ModifyVhdSet(HANDLE VirtualDiskHandle, const MODIFY_VHDSET_PARAMETERS *Parameters,
                          MODIFY_VHDSET_FLAG Flags);

DWORD WINAPI ApplySnapshotVhdSet(HANDLE VirtualDiskHandle,
                                 const APPLY_SNAPSHOT_VHDSET_PARAMETERS *Parameters,
                                 APPLY_SNAPSHOT_VHDSET_FLAG Flags);

DWORD WINAPI RawSCSIVirtualDisk(HANDLE VirtualDiskHandle,
                                const RAW_SCSI_VIRTUAL_DISK_PARAMETERS *Parameters,
                                RAW_SCSI_VIRTUAL_DISK_FLAG Flags,
                                RAW_SCSI_VIRTUAL_DISK_RESPONSE *Response);

DWORD WINAPI ForkVirtualDisk(HANDLE VirtualDiskHandle, FORK_VIRTUAL_DISK_FLAG Flags,
                             const FORK_VIRTUAL_DISK_PARAMETERS *Parameters,
                             OVERLAPPED *Overlapped);

DWORD WINAPI CompleteForkVirtualDisk(HANDLE VirtualDiskHandle);

/* ---- kernel32 ---------------------------------------------------------- */

BOOL WINAPI CloseHandle(HANDLE hObject);
DWORD WINAPI GetLastError(void);

/* Asynchronous calls: an event for OVERLAPPED.hEvent (manual reset), a wait
   for it, and cancellation of the operation an OVERLAPPED started.  On
   Linux the provider implements them: the event is an eventfd (no
   attributes, no name), WaitForSingleObject waits for it without resetting
   it (a manual-reset event), and CancelIoEx cancels the provider's
   operation.  Like CloseHandle they report failure through GetLastError. */
#define WAIT_TIMEOUT 258
HANDLE WINAPI CreateEventW(PVOID lpEventAttributes, BOOL bManualReset, BOOL bInitialState,
                           const WCHAR *lpName);
DWORD WINAPI WaitForSingleObject(HANDLE hHandle, DWORD dwMilliseconds);
BOOL WINAPI CancelIoEx(HANDLE hFile, OVERLAPPED *lpOverlapped);
