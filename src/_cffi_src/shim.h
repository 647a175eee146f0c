/*
 * Helpers the Python facade needs on both platforms, beyond VirtDisk itself.
 * Like virtdisk_api.h this file is both the cffi cdef and a C header, so it
 * holds prototypes only.  Implemented by messages.c (both platforms), by
 * shim_windows.c on Windows and by the Linux provider.
 */

/* Message text for a Win32 or VirtDisk error code, UTF-8, without a trailing
   newline: the system's text where the system has one (Windows), else the
   project's table (errors.def).  Writes at most size bytes including the NUL;
   returns the length of the whole text, 0 when nobody knows the code. */
size_t vd_error_message(DWORD code, char *buffer, size_t size);

/* The SDK name of a code ("ERROR_NOT_READY"), or NULL when it is not in the
   project's table. */
const char *vd_error_name(DWORD code);

/* The project's table, for the conformance tests: its length, and the code
   of entry index (< vd_error_table_size()). */
size_t vd_error_table_size(void);
DWORD vd_error_table_code(size_t index);

/* What the last failing call on this thread knew beyond its code (which
   structure, which offset, which device), UTF-8, or "" when nothing.
   Always "" on Windows, where VirtDisk keeps no such thing. */
const char *vd_last_error_detail(void);

/* The volume-management privilege that attaching and detaching need:
   SeManageVolumePrivilege in this process's token on Windows; on Linux its
   counterpart, CAP_SYS_ADMIN in the effective set (which is either there or
   not: never "disabled"). */
#define VD_PRIVILEGE_ABSENT 0
#define VD_PRIVILEGE_DISABLED 1
#define VD_PRIVILEGE_ENABLED 2

/* Stores one of VD_PRIVILEGE_* in *state; returns a Win32 code. */
DWORD vd_manage_volume_privilege_state(int *state);

/* Enables the privilege for the rest of the process's life; returns
   ERROR_PRIVILEGE_NOT_HELD when the token does not hold it at all. */
DWORD vd_enable_manage_volume_privilege(void);
