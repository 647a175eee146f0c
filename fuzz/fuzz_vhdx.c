/* libFuzzer target: VHDX: file identifier, headers, log, region tables, metadata, BAT, parent locator. */
#include "harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    vd_fuzz_one(data, size, VIRTUAL_STORAGE_TYPE_DEVICE_VHDX);
    return 0;
}
