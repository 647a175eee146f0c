/*
 * Linux only: information in one call, for the facade's DiskInfo.  Like
 * shim.h this file is both a cffi cdef and a C header, so it holds
 * prototypes only.  Windows has no such call: the facade asks
 * GetVirtualDiskInformation once per version there.
 */

/* GetVirtualDiskInformation for count versions on one handle, in one call
   (a dozen calls through cffi cost more than the answers): answers[i] gets
   the answer to versions[i] and codes[i] its code, each exactly what
   GetVirtualDiskInformation answers given sizeof(GET_VIRTUAL_DISK_INFO)
   bytes for it, ERROR_INSUFFICIENT_BUFFER included.  The thread's error
   detail (vd_last_error_detail) is not kept per answer: a caller that
   reports a failure asks that version again on its own. */
void vd_get_information_batch(HANDLE handle, ULONG count, const GET_VIRTUAL_DISK_INFO_VERSION *versions,
                              GET_VIRTUAL_DISK_INFO *answers, DWORD *codes);
