/*
 * The Linux provider's <virtdisk.h>: the very declarations cffi sees
 * (../_cffi_src/virtdisk_api.h), made compilable as C.
 */
#ifndef VD_PROVIDER_VIRTDISK_H
#define VD_PROVIDER_VIRTDISK_H

#include <stddef.h>
#include <stdint.h>
#include <uchar.h>

/* One calling convention on Linux; cffi's generated code spells WINAPI as
   __stdcall, so both must vanish. */
#define WINAPI
#define __stdcall

#include "virtdisk_api.h"
#include "shim.h"

#endif
