/* libFuzzer target: ISO: size checks and the volume descriptor sequence. */
#include "harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    vd_fuzz_one(data, size, VIRTUAL_STORAGE_TYPE_DEVICE_ISO);
    return 0;
}
