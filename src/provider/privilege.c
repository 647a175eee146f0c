/*
 * shim.h's volume-management privilege on Linux: setting up loop devices
 * needs CAP_SYS_ADMIN, the counterpart of Windows' SeManageVolumePrivilege.
 * A capability that is only permitted is not reported as "disabled": raising
 * it is the caller's business (it is what running as root already does).
 */
#include <errno.h>
#include <linux/capability.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "errors.h"

/* glibc has no capget() wrapper and libcap is not worth a dependency for
   one bit of the effective set. */
static DWORD vd_sys_admin_effective(int *effective)
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {{0}};
    if (syscall(SYS_capget, &header, data) != 0)
        return vd_win32_from_errno(errno);
    *effective = (data[CAP_TO_INDEX(CAP_SYS_ADMIN)].effective & CAP_TO_MASK(CAP_SYS_ADMIN)) != 0;
    return ERROR_SUCCESS;
}

DWORD vd_manage_volume_privilege_state(int *state)
{
    int effective = 0;
    DWORD error = vd_sys_admin_effective(&effective);
    if (error == ERROR_SUCCESS)
        *state = effective ? VD_PRIVILEGE_ENABLED : VD_PRIVILEGE_ABSENT;
    return error;
}

DWORD vd_enable_manage_volume_privilege(void)
{
    int effective = 0;
    DWORD error = vd_sys_admin_effective(&effective);
    if (error == ERROR_SUCCESS && !effective)
        error = ERROR_PRIVILEGE_NOT_HELD;
    return error;
}
