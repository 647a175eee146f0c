#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz_vhd, fuzz_vhdx, fuzz_iso, fuzz_probe) into
# fuzz/build/, with the image parsers compiled under AddressSanitizer and
# UndefinedBehaviorSanitizer (every UB check fatal).  Needs clang (Debian's
# clang 14 or newer).  CC overrides the compiler; EXTRA_CFLAGS adds flags
# (e.g. -fprofile-instr-generate -fcoverage-mapping for a coverage report).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="$here/build"
mkdir -p "$out"
cc="${CC:-clang}"

# The format modules and what they use; not api.c and the loop-device code,
# which the targets do not reach.
provider=(image.c vhd.c vhdx.c vhdx-ondisk.c vhdx-log.c vhdx-open.c vhdx-io.c vhdx-discard.c vhdx-create.c vhdx-meta.c vhdx-compact.c iso.c crc32c.c bytes.c utf16.c errors.c reserve.c)
sources=("$root/src/_cffi_src/messages.c" "$here/harness.c")
for f in "${provider[@]}"; do sources+=("$root/src/provider/$f"); done

flags=(-std=gnu11 -g -O1 -fno-omit-frame-pointer
       -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
       -Wall -Wextra -Wno-unused-parameter
       -I"$root/src/provider" -I"$root/src/_cffi_src"
       -DVD_FUZZ_DEFAULT_PARENTS="\"$here/corpus/parents\"")
# shellcheck disable=SC2206
flags+=(${EXTRA_CFLAGS:-})

for target in vhd vhdx iso probe; do
    "$cc" "${flags[@]}" "${sources[@]}" "$here/fuzz_$target.c" -lpthread -o "$out/fuzz_$target"
done
echo "built: $(cd "$out" && echo fuzz_*)"
