/*
 * shim.h for Windows: system error messages, the volume-management
 * privilege, and the run-time lookup of VirtDisk functions newer than
 * Windows 7 (late_bound.h).
 */
#include "windows_sdk.h"

#include <stdlib.h>

#include "late_bound.h"
#include "messages.h"
#include "shim.h"

/* The vendor GUIDs the cdef exports are only declared by <virtdisk.h>, and
   <initguid.h> cannot make it define them: MinGW-w64's <windows.h> has
   already included <virtdisk.h> by then.  So they are defined here, once,
   with the SDK's values (tests/test_conformance.py compares them). */
#include <initguid.h>
DEFINE_GUID(VIRTUAL_STORAGE_TYPE_VENDOR_UNKNOWN, 0x00000000, 0x0000, 0x0000, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00);
DEFINE_GUID(VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT, 0xEC984AEC, 0xA0F9, 0x47E9, 0x90, 0x1F, 0x71,
            0x41, 0x5A, 0x66, 0x34, 0x5B);

/* ---- late-bound VirtDisk functions ------------------------------------ */

/* VirtDisk.dll is already loaded by the Windows 7 functions the module
   imports; LoadLibraryExW only takes a reference to it, from System32 alone
   so that no DLL planted next to the application can stand in for it. */
static void *vd_late_lookup(const char *name)
{
    HMODULE module = LoadLibraryExW(L"virtdisk.dll", NULL, LOAD_LIBRARY_SEARCH_SYSTEM32);
    return module ? (void *)GetProcAddress(module, name) : NULL;
}

#include "late_bound_impl.h"

/* ---- error messages ----------------------------------------------------- */

/* The facility of the VirtDisk codes (0xC03A0001...), FACILITY_USERMODE_VHD
   in the SDK's winerror.h; MinGW-w64's lacks the name. */
#define VD_FACILITY_USERMODE_VHD 0x3A

/* The system's text for code, trailing CR/LF and spaces removed, as
   LocalAlloc'd UTF-16; NULL when the system has none. */
static WCHAR *vd_system_message(DWORD code)
{
    DWORD flags = FORMAT_MESSAGE_ALLOCATE_BUFFER | FORMAT_MESSAGE_FROM_SYSTEM |
                  FORMAT_MESSAGE_IGNORE_INSERTS;
    HMODULE module = NULL;
    WCHAR *text = NULL;
    DWORD length;

    /* With both FROM_HMODULE and FROM_SYSTEM, FormatMessage tries the
       module's message table first, then the system's. */
    if (HRESULT_FACILITY(code) == VD_FACILITY_USERMODE_VHD) {
        module = GetModuleHandleW(L"virtdisk.dll");
        if (module)
            flags |= FORMAT_MESSAGE_FROM_HMODULE;
    }
    length = FormatMessageW(flags, module, code, 0, (LPWSTR)&text, 0, NULL);
    if (length == 0)
        return NULL;
    while (length > 0 && (text[length - 1] == L'\r' || text[length - 1] == L'\n' ||
                          text[length - 1] == L' '))
        text[--length] = L'\0';
    if (length == 0) {
        LocalFree(text);
        return NULL;
    }
    return text;
}

size_t vd_error_message(DWORD code, char *buffer, size_t size)
{
    WCHAR *wide = vd_system_message(code);
    if (wide) {
        int bytes = WideCharToMultiByte(CP_UTF8, 0, wide, -1, NULL, 0, NULL, NULL);
        char *utf8 = bytes > 0 ? malloc((size_t)bytes) : NULL;
        if (utf8 && WideCharToMultiByte(CP_UTF8, 0, wide, -1, utf8, bytes, NULL, NULL) > 0) {
            size_t length = vd_copy_message(utf8, buffer, size);
            free(utf8);
            LocalFree(wide);
            return length;
        }
        free(utf8);
        LocalFree(wide);
    }
    const char *text = vd_error_table_text(code);
    return vd_copy_message(text ? text : "", buffer, size);
}

/* VirtDisk's return code is all there is to know on Windows. */
const char *vd_last_error_detail(void)
{
    return "";
}

/* ---- SeManageVolumePrivilege ------------------------------------------- */

/* The process token, not the thread's: the module never impersonates, and
   enabling a privilege is meant to last for the process. */
static DWORD vd_open_token(DWORD access, HANDLE *token, LUID *luid)
{
    if (!OpenProcessToken(GetCurrentProcess(), access, token))
        return GetLastError();
    /* SE_MANAGE_VOLUME_NAME is TEXT(...), narrow unless UNICODE is defined. */
    if (!LookupPrivilegeValueW(NULL, L"SeManageVolumePrivilege", luid)) {
        DWORD error = GetLastError();
        CloseHandle(*token);
        return error;
    }
    return ERROR_SUCCESS;
}

DWORD vd_manage_volume_privilege_state(int *state)
{
    HANDLE token;
    LUID luid;
    DWORD size = 0;
    DWORD error = vd_open_token(TOKEN_QUERY, &token, &luid);
    if (error != ERROR_SUCCESS)
        return error;

    /* The first call only sizes the list (it fails with
       ERROR_INSUFFICIENT_BUFFER by design). */
    GetTokenInformation(token, TokenPrivileges, NULL, 0, &size);
    TOKEN_PRIVILEGES *privileges = size ? malloc(size) : NULL;
    if (!privileges) {
        CloseHandle(token);
        return size ? ERROR_OUTOFMEMORY : GetLastError();
    }
    if (!GetTokenInformation(token, TokenPrivileges, privileges, size, &size)) {
        error = GetLastError();
    } else {
        *state = VD_PRIVILEGE_ABSENT;
        for (DWORD i = 0; i < privileges->PrivilegeCount; i++) {
            const LUID_AND_ATTRIBUTES *entry = &privileges->Privileges[i];
            if (entry->Luid.LowPart == luid.LowPart && entry->Luid.HighPart == luid.HighPart) {
                *state = (entry->Attributes & SE_PRIVILEGE_ENABLED) ? VD_PRIVILEGE_ENABLED
                                                                    : VD_PRIVILEGE_DISABLED;
                break;
            }
        }
    }
    free(privileges);
    CloseHandle(token);
    return error;
}

DWORD vd_enable_manage_volume_privilege(void)
{
    HANDLE token;
    TOKEN_PRIVILEGES privileges = {1, {{{0, 0}, SE_PRIVILEGE_ENABLED}}};
    DWORD error =
        vd_open_token(TOKEN_ADJUST_PRIVILEGES | TOKEN_QUERY, &token, &privileges.Privileges[0].Luid);
    if (error != ERROR_SUCCESS)
        return error;

    /* AdjustTokenPrivileges "succeeds" when the token lacks the privilege:
       only GetLastError() == ERROR_NOT_ALL_ASSIGNED tells, so it is read on
       success too. */
    if (!AdjustTokenPrivileges(token, FALSE, &privileges, 0, NULL, NULL))
        error = GetLastError();
    else if (GetLastError() == ERROR_NOT_ALL_ASSIGNED)
        error = ERROR_PRIVILEGE_NOT_HELD;
    CloseHandle(token);
    return error;
}
