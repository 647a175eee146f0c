/* libFuzzer target: the probe of image.c (device type UNKNOWN), then whichever format claims the file. */
#include "harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    vd_fuzz_one(data, size, VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN);
    return 0;
}
