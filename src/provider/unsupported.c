/*
 * VirtDisk entry points the Linux provider does not implement (yet).  They
 * exist so that the one set of declarations links on both platforms, and they
 * answer as Windows answers a function it lacks.
 */
#include "errors.h"

#define VD_UNSUPPORTED(name) \
    vd_fail(ERROR_CALL_NOT_IMPLEMENTED, name " is not implemented by the Linux provider")

DWORD WINAPI EnumerateVirtualDiskMetadata(HANDLE VirtualDiskHandle, ULONG *NumberOfItems, GUID *Items)
{
    vd_clear_detail();
    return VD_UNSUPPORTED("EnumerateVirtualDiskMetadata");
}

DWORD WINAPI GetVirtualDiskMetadata(HANDLE VirtualDiskHandle, const GUID *Item, ULONG *MetaDataSize,
                                    PVOID MetaData)
{
    vd_clear_detail();
    return VD_UNSUPPORTED("GetVirtualDiskMetadata");
}

DWORD WINAPI SetVirtualDiskMetadata(HANDLE VirtualDiskHandle, const GUID *Item, ULONG MetaDataSize,
                                    const void *MetaData)
{
    vd_clear_detail();
    return VD_UNSUPPORTED("SetVirtualDiskMetadata");
}

DWORD WINAPI DeleteVirtualDiskMetadata(HANDLE VirtualDiskHandle, const GUID *Item)
{
    vd_clear_detail();
    return VD_UNSUPPORTED("DeleteVirtualDiskMetadata");
}

DWORD WINAPI AddVirtualDiskParent(HANDLE VirtualDiskHandle, const WCHAR *ParentPath)
{
    vd_clear_detail();
    return VD_UNSUPPORTED("AddVirtualDiskParent");
}

DWORD WINAPI QueryChangesVirtualDisk(HANDLE VirtualDiskHandle, const WCHAR *ChangeTrackingId, ULONG64 ByteOffset,
                                     ULONG64 ByteLength, QUERY_CHANGES_VIRTUAL_DISK_FLAG Flags,
                                     QUERY_CHANGES_VIRTUAL_DISK_RANGE *Ranges, ULONG *RangeCount,
                                     ULONG64 *ProcessedLength)
{
    vd_clear_detail();
    return VD_UNSUPPORTED("QueryChangesVirtualDisk");
}

DWORD WINAPI TakeSnapshotVhdSet(HANDLE VirtualDiskHandle, const TAKE_SNAPSHOT_VHDSET_PARAMETERS *Parameters,
                                TAKE_SNAPSHOT_VHDSET_FLAG Flags)
{
    vd_clear_detail();
    return VD_UNSUPPORTED("TakeSnapshotVhdSet");
}

DWORD WINAPI DeleteSnapshotVhdSet(HANDLE VirtualDiskHandle, const DELETE_SNAPSHOT_VHDSET_PARAMETERS *Parameters,
                                  DELETE_SNAPSHOT_VHDSET_FLAG Flags)
{
    vd_clear_detail();
    return VD_UNSUPPORTED("DeleteSnapshotVhdSet");
}

DWORD WINAPI ModifyVhdSet(HANDLE VirtualDiskHandle, const MODIFY_VHDSET_PARAMETERS *Parameters,
                          MODIFY_VHDSET_FLAG Flags)
{
    vd_clear_detail();
    return VD_UNSUPPORTED("ModifyVhdSet");
}

DWORD WINAPI ApplySnapshotVhdSet(HANDLE VirtualDiskHandle, const APPLY_SNAPSHOT_VHDSET_PARAMETERS *Parameters,
                                 APPLY_SNAPSHOT_VHDSET_FLAG Flags)
{
    vd_clear_detail();
    return VD_UNSUPPORTED("ApplySnapshotVhdSet");
}

DWORD WINAPI RawSCSIVirtualDisk(HANDLE VirtualDiskHandle, const RAW_SCSI_VIRTUAL_DISK_PARAMETERS *Parameters,
                                RAW_SCSI_VIRTUAL_DISK_FLAG Flags, RAW_SCSI_VIRTUAL_DISK_RESPONSE *Response)
{
    vd_clear_detail();
    return VD_UNSUPPORTED("RawSCSIVirtualDisk");
}

DWORD WINAPI ForkVirtualDisk(HANDLE VirtualDiskHandle, FORK_VIRTUAL_DISK_FLAG Flags,
                             const FORK_VIRTUAL_DISK_PARAMETERS *Parameters, OVERLAPPED *Overlapped)
{
    vd_clear_detail();
    return VD_UNSUPPORTED("ForkVirtualDisk");
}

DWORD WINAPI CompleteForkVirtualDisk(HANDLE VirtualDiskHandle)
{
    vd_clear_detail();
    return VD_UNSUPPORTED("CompleteForkVirtualDisk");
}
