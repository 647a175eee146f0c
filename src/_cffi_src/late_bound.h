/*
 * The VirtDisk functions newer than Windows 7, which the Windows module must
 * not import (an import that VirtDisk.dll lacks stops the module from loading):
 * it calls vd_late_<Name> instead, a thunk that looks <Name> up at run time
 * and answers ERROR_CALL_NOT_IMPLEMENTED when this Windows has no such export.
 *
 * VD_LATE_FUNCTIONS(X) lists them as X(Name, (parameters), (arguments)), the
 * parameters spelled as virtdisk_api.h spells them (plain pointers, no SAL),
 * so that the same list compiles with the SDK's <virtdisk.h>, with
 * MinGW-w64's, and with the Linux provider's, where tests exercise the
 * resolver (late_bound_impl.h).  tests/test_conformance.py checks the list
 * against the cdef and against the SDK's minimum Windows versions.
 *
 * Needs DWORD, WINAPI and the VirtDisk types in scope.
 */
#ifndef VD_LATE_BOUND_H
#define VD_LATE_BOUND_H

#define VD_LATE_FUNCTIONS(X)                                                                   \
    /* Windows 8 / Server 2012 */                                                              \
    X(EnumerateVirtualDiskMetadata, (HANDLE VirtualDiskHandle, ULONG *NumberOfItems, GUID *Items), \
      (VirtualDiskHandle, NumberOfItems, Items))                                               \
    X(GetVirtualDiskMetadata,                                                                  \
      (HANDLE VirtualDiskHandle, const GUID *Item, ULONG *MetaDataSize, PVOID MetaData),       \
      (VirtualDiskHandle, Item, MetaDataSize, MetaData))                                       \
    X(SetVirtualDiskMetadata,                                                                  \
      (HANDLE VirtualDiskHandle, const GUID *Item, ULONG MetaDataSize, const void *MetaData),  \
      (VirtualDiskHandle, Item, MetaDataSize, MetaData))                                       \
    X(DeleteVirtualDiskMetadata, (HANDLE VirtualDiskHandle, const GUID *Item),                 \
      (VirtualDiskHandle, Item))                                                               \
    X(ResizeVirtualDisk,                                                                       \
      (HANDLE VirtualDiskHandle, RESIZE_VIRTUAL_DISK_FLAG Flags,                               \
       RESIZE_VIRTUAL_DISK_PARAMETERS *Parameters, OVERLAPPED *Overlapped),                    \
      (VirtualDiskHandle, Flags, Parameters, Overlapped))                                      \
    X(MirrorVirtualDisk,                                                                       \
      (HANDLE VirtualDiskHandle, MIRROR_VIRTUAL_DISK_FLAG Flags,                               \
       MIRROR_VIRTUAL_DISK_PARAMETERS *Parameters, OVERLAPPED *Overlapped),                    \
      (VirtualDiskHandle, Flags, Parameters, Overlapped))                                      \
    X(BreakMirrorVirtualDisk, (HANDLE VirtualDiskHandle), (VirtualDiskHandle))                 \
    X(AddVirtualDiskParent, (HANDLE VirtualDiskHandle, const WCHAR *ParentPath),               \
      (VirtualDiskHandle, ParentPath))                                                         \
    /* undocumented; exported since Windows 8 as far as anyone has seen */                     \
    X(GetAllAttachedVirtualDiskPhysicalPaths, (ULONG *PathsBufferSizeInBytes, WCHAR *PathsBuffer), \
      (PathsBufferSizeInBytes, PathsBuffer))                                                   \
    /* Windows 10 1507 / Server 2016 */                                                        \
    X(QueryChangesVirtualDisk,                                                                 \
      (HANDLE VirtualDiskHandle, const WCHAR *ChangeTrackingId, ULONG64 ByteOffset,            \
       ULONG64 ByteLength, QUERY_CHANGES_VIRTUAL_DISK_FLAG Flags,                              \
       QUERY_CHANGES_VIRTUAL_DISK_RANGE *Ranges, ULONG *RangeCount, ULONG64 *ProcessedLength), \
      (VirtualDiskHandle, ChangeTrackingId, ByteOffset, ByteLength, Flags, Ranges, RangeCount, \
       ProcessedLength))                                                                       \
    X(TakeSnapshotVhdSet,                                                                      \
      (HANDLE VirtualDiskHandle, const TAKE_SNAPSHOT_VHDSET_PARAMETERS *Parameters,            \
       TAKE_SNAPSHOT_VHDSET_FLAG Flags),                                                       \
      (VirtualDiskHandle, Parameters, Flags))                                                  \
    X(DeleteSnapshotVhdSet,                                                                    \
      (HANDLE VirtualDiskHandle, const DELETE_SNAPSHOT_VHDSET_PARAMETERS *Parameters,          \
       DELETE_SNAPSHOT_VHDSET_FLAG Flags),                                                     \
      (VirtualDiskHandle, Parameters, Flags))                                                  \
    X(ModifyVhdSet,                                                                            \
      (HANDLE VirtualDiskHandle, const MODIFY_VHDSET_PARAMETERS *Parameters,                   \
       MODIFY_VHDSET_FLAG Flags),                                                              \
      (VirtualDiskHandle, Parameters, Flags))                                                  \
    X(ApplySnapshotVhdSet,                                                                     \
      (HANDLE VirtualDiskHandle, const APPLY_SNAPSHOT_VHDSET_PARAMETERS *Parameters,           \
       APPLY_SNAPSHOT_VHDSET_FLAG Flags),                                                      \
      (VirtualDiskHandle, Parameters, Flags))                                                  \
    X(RawSCSIVirtualDisk,                                                                      \
      (HANDLE VirtualDiskHandle, const RAW_SCSI_VIRTUAL_DISK_PARAMETERS *Parameters,           \
       RAW_SCSI_VIRTUAL_DISK_FLAG Flags, RAW_SCSI_VIRTUAL_DISK_RESPONSE *Response),            \
      (VirtualDiskHandle, Parameters, Flags, Response))                                        \
    /* Windows 10 1809 (RS5) */                                                                \
    X(ForkVirtualDisk,                                                                         \
      (HANDLE VirtualDiskHandle, FORK_VIRTUAL_DISK_FLAG Flags,                                 \
       const FORK_VIRTUAL_DISK_PARAMETERS *Parameters, OVERLAPPED *Overlapped),                \
      (VirtualDiskHandle, Flags, Parameters, Overlapped))                                      \
    X(CompleteForkVirtualDisk, (HANDLE VirtualDiskHandle), (VirtualDiskHandle))

#define VD_LATE_DECLARE(name, params, args) DWORD WINAPI vd_late_##name params;
VD_LATE_FUNCTIONS(VD_LATE_DECLARE)
#undef VD_LATE_DECLARE

#endif
