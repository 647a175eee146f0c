/* libFuzzer target: VHD: footer, dynamic header, BAT, parent locators, parent chain. */
#include "harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    vd_fuzz_one(data, size, VIRTUAL_STORAGE_TYPE_DEVICE_VHD);
    return 0;
}
