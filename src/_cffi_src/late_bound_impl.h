/*
 * The thunks of late_bound.h and their resolver.  Included by exactly one C
 * file per program: shim_windows.c on Windows, and the native test program of
 * tests/test_conformance.py on Linux, which is why nothing here names a
 * Windows API.  The includer first defines
 *
 *     static void *vd_late_lookup(const char *name);
 *
 * returning the address of VirtDisk's export `name`, or NULL when there is
 * none (GetProcAddress on Windows, a fake in the test).
 */
#ifndef VD_LATE_BOUND_IMPL_H
#define VD_LATE_BOUND_IMPL_H

#include "late_bound.h"

/* Each slot is filled once per process; racing threads look up the same name
   and store the same answer, so plain atomic loads and stores suffice. */
#if defined(_MSC_VER)
#define VD_LATE_LOAD(p) InterlockedCompareExchangePointer((void *volatile *)(p), NULL, NULL)
#define VD_LATE_STORE(p, v) InterlockedExchangePointer((void *volatile *)(p), (v))
#else
#define VD_LATE_LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define VD_LATE_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#endif

struct vd_late_slot {
    const char *name;
    void *address; /* NULL: not looked up yet; &vd_late_missing: no such export */
};

static const char vd_late_missing;

#define VD_LATE_INDEX(name, params, args) VD_LATE_INDEX_##name,
enum { VD_LATE_FUNCTIONS(VD_LATE_INDEX) VD_LATE_COUNT };
#undef VD_LATE_INDEX

#define VD_LATE_SLOT(name, params, args) {#name, NULL},
static struct vd_late_slot vd_late_slots[VD_LATE_COUNT] = {VD_LATE_FUNCTIONS(VD_LATE_SLOT)};
#undef VD_LATE_SLOT

/* The export's address, or NULL when missing; looks each name up once. */
static void *vd_late_resolve(struct vd_late_slot *slot)
{
    void *address = VD_LATE_LOAD(&slot->address);
    if (address == NULL) {
        address = vd_late_lookup(slot->name);
        if (address == NULL)
            address = (void *)&vd_late_missing;
        VD_LATE_STORE(&slot->address, address);
    }
    return address == (void *)&vd_late_missing ? NULL : address;
}

#define VD_LATE_THUNK(name, params, args)                                                      \
    DWORD WINAPI vd_late_##name params                                                         \
    {                                                                                          \
        typedef DWORD(WINAPI * vd_late_fn) params;                                             \
        vd_late_fn fn = (vd_late_fn)vd_late_resolve(&vd_late_slots[VD_LATE_INDEX_##name]);     \
        return fn ? fn args : ERROR_CALL_NOT_IMPLEMENTED;                                      \
    }
VD_LATE_FUNCTIONS(VD_LATE_THUNK)
#undef VD_LATE_THUNK

#endif
