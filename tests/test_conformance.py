"""The declarations against the Windows SDK, without Windows.

Three independent sources stand in for a Windows machine:

* tests/data/sdk_layouts.json and sdk_api.json: the SDK's layouts, constants,
  prototypes and error codes, transcribed from the project's reference;
* zig's Windows targets (x64, x86, ARM64), which compile our declarations and
  the Windows shim and link them against VirtDisk's import library (on x86 the
  stdcall decoration carries each function's argument size, so a link checks
  every argument's width);
* MinGW-w64's headers, where they are not stale (reference section 7).

Tests that need zig, gcc or MinGW-w64 skip without them, and fail under CI=true
on Linux, where .ci/run installs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from virtdisk._native import ffi, lib

IN_CI = os.environ.get("CI", "").lower() == "true"
DATA = Path(__file__).parent / "data"
LAYOUTS = json.loads((DATA / "sdk_layouts.json").read_text(encoding="utf-8"))
API = json.loads((DATA / "sdk_api.json").read_text(encoding="utf-8"))
FUNCTIONS = API["functions"]

# zig target -> column of sdk_layouts.json (ARM64 lays structs out as x64).
ZIG_TARGETS = {
    "x86_64-windows-gnu": "x64",
    "x86-windows-gnu": "x86",
    "aarch64-windows-gnu": "x64",
}


def _missing(what: str) -> None:
    # .ci/run provisions the toolchains on Linux; elsewhere (the Windows
    # wheel builds) these tests skip.
    if IN_CI and sys.platform.startswith("linux"):
        pytest.fail(f"{what} (CI must provide it: see .ci/run)")
    pytest.skip(what)


def _sources() -> Path:
    """src/_cffi_src of the tree under test: the checkout, or (for a test run
    against an installed wheel) the unpacked sdist named by VIRTDISK_SOURCE_DIR."""
    root = Path(os.environ.get("VIRTDISK_SOURCE_DIR", Path(__file__).resolve().parents[1]))
    cffi_src = root / "src" / "_cffi_src"
    if not (cffi_src / "virtdisk_api.h").is_file():
        _missing(f"no sources at {root} (set VIRTDISK_SOURCE_DIR)")
    return cffi_src


def _zig() -> list[str]:
    # VIRTDISK_ZIG_PYTHON: an interpreter with ziglang, when this one (say, a
    # fresh venv testing a wheel) has none; reusing one also reuses zig's
    # cache of built Windows C libraries (a minute per target when cold).
    python = os.environ.get("VIRTDISK_ZIG_PYTHON", sys.executable)
    if python == sys.executable and importlib.util.find_spec("ziglang") is None:
        _missing("ziglang is not installed (pip install -e '.[conformance]')")
    return [python, "-m", "ziglang", "cc"]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        _missing(f"{name} is not installed")
    return str(path)


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # LC_ALL=C: gcc quotes names with ASCII quotes, which the parsing expects.
    env = {**os.environ, "LC_ALL": "C"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def _check(command: list[str], cwd: Path) -> None:
    result = _run(command, cwd)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"


# ---- the cdef, read as text ------------------------------------------------


def _api_header() -> str:
    return (_sources() / "virtdisk_api.h").read_text(encoding="utf-8")


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


# kernel32 functions the cdef declares next to VirtDisk's (the last three for
# asynchronous calls), and kernel32's constants, with winerror.h's values.
KERNEL32 = {"CloseHandle", "GetLastError", "CreateEventW", "WaitForSingleObject", "CancelIoEx"}
KERNEL32_DEFINES = {"WAIT_TIMEOUT": 258}


def _cdef_functions(header: str) -> dict[str, str]:
    """Name -> parameter list text of every VirtDisk function the cdef declares."""
    found = re.findall(r"\bWINAPI\s+(\w+)\s*\(([^;]*?)\)\s*;", _strip_comments(header))
    return {name: " ".join(params.split()) for name, params in found if name not in KERNEL32}


def _cdef_defines(header: str) -> dict[str, int]:
    found = re.findall(r"^#define\s+(\w+)\s+(\S+)\s*$", _strip_comments(header), flags=re.M)
    return {name: int(value, 0) for name, value in found}


VIRTDISK_FUNCTIONS = sorted(FUNCTIONS)


# ---- (a) cffi's layout of the cdef on this host = the SDK's ---------------------


def _field(ctype: object, path: str) -> tuple[int, int]:
    """(offset, size) of a dotted member path, through anonymous unions."""
    offset = 0
    for name in path.split("."):
        fields = dict(ctype.fields)  # type: ignore[attr-defined]
        member = fields[name]
        offset += member.offset
        ctype = member.type
    # The SDK's flexible arrays (STORAGE_DEPENDENCY_INFO) take no room.
    if ctype.kind == "array" and ctype.length is None:  # type: ignore[attr-defined]
        return offset, 0
    return offset, ffi.sizeof(ctype)


def _struct_ids(arch: str) -> list[str]:
    return sorted(LAYOUTS[arch])


# The table this build must match: x64 (also ARM64) for 64-bit builds, x86
# for 32-bit Windows.  32-bit Linux (i386 aligns 64-bit integers to 4) has no
# Windows counterpart.
HOST_ARCH = "x64" if ffi.sizeof("void *") == 8 else "x86" if sys.platform == "win32" else None


@pytest.mark.skipif(HOST_ARCH is None, reason="no Windows layout to match on 32-bit Linux")
@pytest.mark.parametrize("struct", _struct_ids("x64"))
def test_cffi_layout_equals_the_sdk_layout(struct: str) -> None:
    expected = LAYOUTS[str(HOST_ARCH)][struct]
    ctype = ffi.typeof(struct)
    actual = {path: list(_field(ctype, path)) for path in expected["fields"]}
    assert (ffi.sizeof(ctype), ffi.alignof(ctype)) == (expected["size"], expected["align"])
    assert actual == expected["fields"]


def test_the_layout_table_covers_every_struct_of_the_cdef() -> None:
    structs = set(re.findall(r"^\}\s*(\w+)\s*;", _strip_comments(_api_header()), flags=re.M))
    assert structs == set(LAYOUTS["x64"]) == set(LAYOUTS["x86"])


# ---- (b) + (c) zig: our C for every Windows target ---------------------------


def _layout_asserts(arch: str) -> str:
    lines = []
    for struct, layout in sorted(LAYOUTS[arch].items()):
        lines.append(f"VD_SIZE({struct}, {layout['size']}, {layout['align']})")
        for path, (offset, size) in layout["fields"].items():
            lines.append(f"VD_FIELD({struct}, {path}, {offset}, {size})")
    return "\n".join(lines)


def _call_every_function(functions: dict[str, str]) -> str:
    calls = []
    for name, params in functions.items():
        count = 0 if params == "void" else len(params.split(","))
        calls.append(f"    status |= {name}({', '.join(['0'] * count)});")
    return "\n".join(calls)


ABI_CHECK = """\
/* Our declarations compiled as Windows C: layouts asserted, every function
   called through our own prototypes (on x86 their stdcall sizes must match
   the import library's and the thunks' decorations, or the link fails). */
#include <stddef.h>
#include <stdint.h>
#include <uchar.h>
#define WINAPI __stdcall
/* What shim_windows.h does: these names reach the run-time lookup thunks.
   Defined first, so our own prototypes declare the thunks. */
{late_defines}
#include "virtdisk_api.h"
#include "shim.h"

#define VD_SIZE(type, size, align)                                          \\
    _Static_assert(sizeof(type) == size, #type " size");                   \\
    _Static_assert(_Alignof(type) == align, #type " alignment");
#define VD_FIELD(type, member, offset, size)                                \\
    _Static_assert(offsetof(type, member) == offset, #type "." #member " offset"); \\
    _Static_assert(sizeof(((type *)0)->member) == size, #type "." #member " size");
{asserts}

int vd_call_everything(void);
int vd_call_everything(void)
{{
    DWORD status = 0;
    char message[64];
{calls}
    status |= (DWORD)vd_error_message(0, message, sizeof message);
    status |= (DWORD)vd_error_table_size() + vd_error_table_code(0);
    status |= vd_error_name(0) != NULL;
    status |= vd_last_error_detail()[0];
    status |= vd_manage_volume_privilege_state(0) + vd_enable_manage_volume_privilege();
    status |= (DWORD)CloseHandle(0) + GetLastError();
    status |= (DWORD)(CreateEventW(0, 0, 0, 0) != 0) + WaitForSingleObject(0, WAIT_TIMEOUT);
    status |= (DWORD)CancelIoEx(0, 0);
    return VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT.Data1 + VIRTUAL_STORAGE_TYPE_VENDOR_UNKNOWN.Data1
           + (int)status;
}}

int main(int argc, char **argv)
{{
    (void)argv;
    return argc > 1000 ? vd_call_everything() : 0;
}}
"""

PROTOTYPE_CHECK = """\
/* Our prototypes against the Windows headers (windows_sdk.h, as shim_windows.c
   and an SDK build see them): a function pointer of our type must accept the
   real function, or, for late-bound names, the thunk that shim_windows.h
   routes them to.  MinGW-w64's <virtdisk.h> lacks ATTACH_VIRTUAL_DISK_FLAG_AT_BOOT
   as SDKs before 10.0.26100 do: windows_sdk.h must supply it. */
#include "windows_sdk.h"
#include "late_bound.h"
{late_defines}

_Static_assert(ATTACH_VIRTUAL_DISK_FLAG_AT_BOOT == 0x400, "AT_BOOT");
{checks}
"""


def _late_defines(cffi_src: Path) -> dict[str, str]:
    text = (cffi_src / "shim_windows.h").read_text(encoding="utf-8")
    return dict(re.findall(r"^#define\s+(\w+)\s+(vd_late_\w+)\s*$", text, flags=re.M))


def _late_list(cffi_src: Path) -> list[str]:
    text = _strip_comments((cffi_src / "late_bound.h").read_text(encoding="utf-8"))
    body = text[text.index("#define VD_LATE_FUNCTIONS(X)") :]
    body = body[: body.index("#define VD_LATE_DECLARE")]
    return re.findall(r"\bX\((\w+),", body)


def _build_windows_program(target: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    zig = _zig()
    cffi_src = _sources()
    functions = _cdef_functions(_api_header())
    late = _late_defines(cffi_src)
    (tmp_path / "abi_check.c").write_text(
        ABI_CHECK.format(
            asserts=_layout_asserts(ZIG_TARGETS[target]),
            late_defines="\n".join(f"#define {name} {thunk}" for name, thunk in late.items()),
            calls=_call_every_function(functions),
        ),
        encoding="utf-8",
    )
    checks = [
        f"DWORD (WINAPI *const vd_check_{name})({params}) = &{name};" for name, params in functions.items()
    ]
    (tmp_path / "prototype_check.c").write_text(
        PROTOTYPE_CHECK.format(
            checks="\n".join(checks),
            late_defines="\n".join(f"#define {name} {thunk}" for name, thunk in late.items()),
        ),
        encoding="utf-8",
    )
    flags = ["-target", target, "-std=c11", "-Wall", "-Wextra", "-Werror", f"-I{cffi_src}"]
    sources = [
        str(tmp_path / "abi_check.c"),
        str(tmp_path / "prototype_check.c"),
        str(cffi_src / "shim_windows.c"),
        str(cffi_src / "messages.c"),
    ]
    # zig's lld does no "stdcall fixup": _Name@16 does not resolve to _Name@12.
    link = ["-lvirtdisk", "-ladvapi32", "-lkernel32"]
    return _run([*zig, *flags, *sources, "-o", str(tmp_path / "check.exe"), *link], tmp_path)


@pytest.mark.parametrize("target", sorted(ZIG_TARGETS))
def test_declarations_and_shim_build_and_link_for_windows(target: str, tmp_path: Path) -> None:
    result = _build_windows_program(target, tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    assert (tmp_path / "check.exe").stat().st_size > 0


def test_the_cdef_declares_exactly_the_sdk_functions() -> None:
    assert set(_cdef_functions(_api_header())) == set(FUNCTIONS)


# SDK spellings (reference section 2.1) -> the cdef's plain spellings (section 8.1).
_SDK_SPELLING = {
    "PCWSTR": "const WCHAR *",
    "PWSTR": "WCHAR *",
    "PULONG": "ULONG *",
    "PULONG64": "ULONG64 *",
    "PHANDLE": "HANDLE *",
    "LPOVERLAPPED": "OVERLAPPED *",
}


def _plain(sdk_type: str) -> str:
    sdk_type = sdk_type.replace("*", " *").strip()
    if sdk_type in _SDK_SPELLING:
        return _SDK_SPELLING[sdk_type]
    # `const PFOO` is a const pointer to FOO, bound as a pointer to const FOO.
    match = re.fullmatch(r"(const )?P([A-Z][A-Z0-9_]+)", sdk_type)
    if match and match[2] not in ("VOID", "SECURITY_DESCRIPTOR"):
        return f"{match[1] or ''}{match[2]} *"
    return sdk_type


@pytest.mark.parametrize("name", VIRTDISK_FUNCTIONS)
def test_prototype_equals_the_sdk_prototype(name: str) -> None:
    sdk = [_plain(param) for param in FUNCTIONS[name]["sdk_params"]]
    expected = ffi.typeof(f"DWORD(__stdcall *)({', '.join(sdk)})")
    actual = ffi.typeof(getattr(lib, name))
    assert (actual.result, actual.args, actual.abi) == (
        expected.result,
        expected.args,
        expected.abi,
    )


@pytest.mark.parametrize("name", VIRTDISK_FUNCTIONS)
def test_x86_stdcall_size_equals_the_import_library_decoration(name: str) -> None:
    """Every argument takes 4 bytes on x86 except 64-bit integers."""
    args = ffi.typeof(getattr(lib, name)).args
    size = sum(8 if arg.kind == "primitive" and ffi.sizeof(arg) == 8 else 4 for arg in args)
    assert size == FUNCTIONS[name]["x86_stdcall_bytes"]


# ---- run-time lookup of the functions newer than Windows 7 -------------------


def test_exactly_the_functions_newer_than_windows_7_are_looked_up_at_run_time() -> None:
    cffi_src = _sources()
    newer = {name for name, facts in FUNCTIONS.items() if facts["min_os"] != "win7"}
    assert set(_late_list(cffi_src)) == newer
    assert _late_defines(cffi_src) == {name: f"vd_late_{name}" for name in newer}


LATE_TEST = r"""
/* late_bound_impl.h with a fake VirtDisk: one function present, the rest
   missing; counts the lookups. */
#include <stdio.h>
#include <string.h>
#include "virtdisk.h"
#include "winerror.h"
#include "late_bound.h"

static int lookups_resize, lookups_fork, lookups_other;

static DWORD WINAPI fake_resize(HANDLE handle, RESIZE_VIRTUAL_DISK_FLAG flags,
                                RESIZE_VIRTUAL_DISK_PARAMETERS *parameters, OVERLAPPED *overlapped)
{
    return 1000 + flags + (parameters ? (DWORD)parameters->Version1.NewSize : 0)
           + (handle == (HANDLE)0x5 ? 1 : 0) + (overlapped ? 7 : 0);
}

static void *vd_late_lookup(const char *name)
{
    if (strcmp(name, "ResizeVirtualDisk") == 0) {
        lookups_resize++;
        return (void *)fake_resize;
    }
    if (strcmp(name, "ForkVirtualDisk") == 0)
        lookups_fork++;
    else
        lookups_other++;
    return NULL;
}

#include "late_bound_impl.h"

int main(void)
{
    RESIZE_VIRTUAL_DISK_PARAMETERS parameters = {RESIZE_VIRTUAL_DISK_VERSION_1, {{20}}};
    DWORD resize1 = vd_late_ResizeVirtualDisk((HANDLE)0x5, 2, &parameters, NULL);
    DWORD resize2 = vd_late_ResizeVirtualDisk((HANDLE)0x5, 2, &parameters, NULL);
    DWORD fork1 = vd_late_ForkVirtualDisk(NULL, 0, NULL, NULL);
    DWORD fork2 = vd_late_ForkVirtualDisk(NULL, 0, NULL, NULL);
    DWORD complete = vd_late_CompleteForkVirtualDisk(NULL);
    printf("{\"resize\": [%u, %u], \"fork\": [%u, %u], \"complete\": %u, "
           "\"lookups\": {\"resize\": %d, \"fork\": %d, \"other\": %d}}\n",
           resize1, resize2, fork1, fork2, complete, lookups_resize, lookups_fork, lookups_other);
    return 0;
}
"""


def test_late_bound_thunks_call_through_once_looked_up_and_report_missing_functions(
    tmp_path: Path,
) -> None:
    cc = _tool("cc")
    cffi_src = _sources()
    provider = cffi_src.parent / "provider"
    (tmp_path / "late_test.c").write_text(LATE_TEST, encoding="utf-8")
    _check(
        [
            cc,
            "-std=gnu11",
            "-Wall",
            "-Wextra",
            "-Werror",
            f"-I{provider}",
            f"-I{cffi_src}",
            "late_test.c",
            "-o",
            "late_test",
        ],
        tmp_path,
    )
    result = json.loads(
        subprocess.run([str(tmp_path / "late_test")], capture_output=True, text=True, check=True).stdout
    )
    call_not_implemented = 120
    assert result == {
        "resize": [1000 + 2 + 20 + 1, 1000 + 2 + 20 + 1],
        "fork": [call_not_implemented, call_not_implemented],
        "complete": call_not_implemented,
        # each name is looked up once, whether it was found or not
        "lookups": {"resize": 1, "fork": 1, "other": 1},
    }


# ---- (d) constants -----------------------------------------------------------


def test_every_define_equals_the_sdk_value() -> None:
    defines = _cdef_defines(_api_header())
    kernel32 = {name: defines.pop(name) for name in KERNEL32_DEFINES}
    assert kernel32 == KERNEL32_DEFINES
    assert defines == API["defines"]
    assert {name: getattr(lib, name) for name in defines} == API["defines"]


def test_vendor_guids_equal_the_sdk() -> None:
    microsoft = bytes(ffi.buffer(ffi.addressof(lib.VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT)))
    unknown = bytes(ffi.buffer(ffi.addressof(lib.VIRTUAL_STORAGE_TYPE_VENDOR_UNKNOWN)))
    assert microsoft == uuid.UUID(API["vendor_microsoft"]).bytes_le
    assert unknown == bytes(16)


def _errors_def() -> list[tuple[str, int, str]]:
    text = (_sources() / "errors.def").read_text(encoding="utf-8")
    found = re.findall(r'^VD_ERROR\((\w+), (0x[0-9A-Fa-f]+)u, "(.*)"\)$', text, flags=re.M)
    return [(name, int(code, 16), message) for name, code, message in found]


def test_error_table_codes_and_messages_equal_the_sdk() -> None:
    table = {name: (code, message) for name, code, message in _errors_def()}
    sdk = {name: (int(e["value"], 16), e["message"]) for name, e in API["errors"].items()}
    assert {name: table[name] for name in sdk if name in table} == sdk
    assert set(sdk) <= set(table)


def test_the_module_serves_the_error_table_as_written() -> None:
    codes = [lib.vd_error_table_code(i) for i in range(lib.vd_error_table_size())]
    assert codes == [code for _, code, _ in _errors_def()]
    names = [ffi.string(lib.vd_error_name(code)).decode() for code in codes]
    assert names == [name for name, _, _ in _errors_def()]


# Names Debian's MinGW-w64 10 does not define (reference section 7); newer
# MinGW-w64 (zig's) may define some, which are then checked.  A name missing
# from MinGW-w64 and absent here is a misspelling on our side.
MINGW_LACKS = re.compile(
    r"""^(
      VIRTUAL_STORAGE_TYPE_DEVICE_VHDSET | OPEN_VIRTUAL_DISK_RW_DEPTH_DEFAULT
    | CREATE_VIRTUAL_DISK_PARAMETERS_DEFAULT_(BLOCK|SECTOR)_SIZE
    | VIRTUAL_DISK_MAXIMUM_CHANGE_TRACKING_ID_LENGTH | MERGE_VIRTUAL_DISK_DEFAULT_MERGE_DEPTH
    | GET_STORAGE_DEPENDENCY_FLAG_PARENTS
    | OPEN_VIRTUAL_DISK_VERSION_3
    | OPEN_VIRTUAL_DISK_FLAG_(PARENT_CACHED_IO|VHDSET_FILE_ONLY|IGNORE_RELATIVE_PARENT_LOCATOR
        |NO_WRITE_HARDENING|SUPPORT_COMPRESSED_VOLUMES|SUPPORT_SPARSE_FILES_ANY_FS
        |SUPPORT_ENCRYPTED_FILES)
    | CREATE_VIRTUAL_DISK_VERSION_[34]
    | CREATE_VIRTUAL_DISK_FLAG_(CREATE_BACKING_STORAGE|USE_CHANGE_TRACKING_SOURCE_LIMIT
        |PRESERVE_PARENT_CHANGE_TRACKING_STATE|VHD_SET_USE_ORIGINAL_BACKING_STORAGE|SPARSE_FILE
        |PMEM_COMPATIBLE|SUPPORT_COMPRESSED_VOLUMES|SUPPORT_SPARSE_FILES_ANY_FS)
    | ATTACH_VIRTUAL_DISK_VERSION_2
    | ATTACH_VIRTUAL_DISK_FLAG_(NO_SECURITY_DESCRIPTOR|BYPASS_DEFAULT_ENCRYPTION_POLICY|NON_PNP
        |RESTRICTED_RANGE|SINGLE_PARTITION|REGISTER_VOLUME|AT_BOOT)
    | DEPENDENT_DISK_FLAG_(SUPPORT_COMPRESSED_VOLUMES|ALWAYS_ALLOW_SPARSE|SUPPORT_ENCRYPTED_FILES)
    | COMPACT_VIRTUAL_DISK_FLAG_NO_(ZERO_SCAN|BLOCK_MOVES) | EXPAND_VIRTUAL_DISK_FLAG_NOTIFY_CHANGE
    | MIRROR_VIRTUAL_DISK_FLAG_(SKIP_MIRROR_ACTIVATION|ENABLE_SMB_COMPRESSION|IS_LIVE_MIGRATION)
    | MODIFY_VHDSET_FLAG_WRITEABLE_SNAPSHOT | TAKE_SNAPSHOT_VHDSET_FLAG_WRITEABLE
    | RAW_SCSI_VIRTUAL_DISK_\w+ | FORK_VIRTUAL_DISK_\w+
    | ERROR_(VHD|VIRTDISK|CTLOG|SVHDX)_\w+ | ERROR_QUERY_STORAGE_ERROR
    | ERROR_VIRTUAL_DISK_LIMITATION | ERROR_VHDSET_BACKING_STORAGE_NOT_FOUND
    | ERROR_UNSUPPORTED_COMPRESSION | ERROR_FILE_SYSTEM_LIMITATION | ERROR_ELEVATION_REQUIRED
    )$""",
    re.X,
)

MINGW_COMPILERS = {
    "mingw-x86_64": ["x86_64-w64-mingw32-gcc"],
    "mingw-i686": ["i686-w64-mingw32-gcc"],
    "zig-x86_64": ["zig", "-target", "x86_64-windows-gnu"],
}


def _mingw_compiler(which: str) -> list[str]:
    command = MINGW_COMPILERS[which]
    if command[0] == "zig":
        return [*_zig(), *command[1:]]
    return [_tool(command[0]), *command[1:]]


def _undeclared(compiler_output: str) -> set[str]:
    found = re.findall(r"'(\w+)' undeclared|undeclared identifier '(\w+)'", compiler_output)
    return {gcc or clang for gcc, clang in found}


@pytest.mark.parametrize("which", sorted(MINGW_COMPILERS))
def test_constants_equal_mingw_where_mingw_defines_them(which: str, tmp_path: Path) -> None:
    compiler = _mingw_compiler(which)
    constants = dict(API["defines"])
    constants.update((name, code) for name, code, _ in _errors_def())
    lines = ["#include <windows.h>", "#include <virtdisk.h>"]
    lines += [
        f'_Static_assert((unsigned long long)(DWORD)({name}) == {value}ULL, "{name}");'
        for name, value in sorted(constants.items())
    ]
    (tmp_path / "constants.c").write_text("\n".join(lines) + "\n", encoding="utf-8")
    error_limit = "-ferror-limit=0" if which.startswith("zig") else "-fmax-errors=0"
    result = _run([*compiler, "-std=c11", "-fsyntax-only", error_limit, "constants.c"], tmp_path)
    output = result.stderr
    undeclared = _undeclared(output)
    wrong = re.findall(r'static assert(?:ion)? failed[^"\n]*"(\w+)"', output)
    assert wrong == []
    assert {name for name in undeclared if not MINGW_LACKS.match(name)} == set()
    # the check did look at something: MinGW-w64 has every Windows 7 name
    assert len(set(constants) - undeclared) > 100
    assert result.returncode == (1 if undeclared else 0)


def test_vendor_guid_equals_mingw(tmp_path: Path) -> None:
    compiler = _tool("x86_64-w64-mingw32-gcc")
    (tmp_path / "guid.c").write_text("#include <windows.h>\n#include <virtdisk.h>\n", encoding="utf-8")
    # INITGUID from the start: MinGW-w64's <windows.h> includes <virtdisk.h>.
    result = _run([compiler, "-DINITGUID", "-E", "guid.c"], tmp_path)
    assert result.returncode == 0, result.stderr
    match = re.search(r"VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT\s*=\s*\{([^;]*)\}\s*;", result.stdout)
    assert match, "MinGW-w64 defines no VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT"
    numbers = [int(n, 16) for n in re.findall(r"0x[0-9A-Fa-f]+", match[1])]
    fields = uuid.UUID(API["vendor_microsoft"]).fields
    data4 = uuid.UUID(API["vendor_microsoft"]).bytes[8:]
    assert numbers == [fields[0], fields[1], fields[2], *data4]


# MinGW-w64's layouts are stale for these (reference 4.1): OPEN v3, CREATE v2
# and later, ATTACH; it has no RAW_SCSI or FORK types at all; and it declares
# STORAGE_DEPENDENCY_INFO's flexible arrays as [1] (only their offsets agree).
def _mingw_layout_is_current(struct: str, path: str | None) -> bool:
    if struct in (
        "ATTACH_VIRTUAL_DISK_PARAMETERS",
        "RAW_SCSI_VIRTUAL_DISK_PARAMETERS",
        "RAW_SCSI_VIRTUAL_DISK_RESPONSE",
        "FORK_VIRTUAL_DISK_PARAMETERS",
    ):
        return False
    if struct == "STORAGE_DEPENDENCY_INFO":
        return path in ("Version", "NumberEntries")
    if struct == "OPEN_VIRTUAL_DISK_PARAMETERS":
        return path is not None and not path.startswith("Version3.")
    if struct == "CREATE_VIRTUAL_DISK_PARAMETERS":
        return path is not None and path.startswith("Version1.")
    return True


@pytest.mark.parametrize(
    ("compiler", "arch"), [("x86_64-w64-mingw32-gcc", "x64"), ("i686-w64-mingw32-gcc", "x86")]
)
def test_layout_table_equals_mingw_where_mingw_is_current(compiler: str, arch: str, tmp_path: Path) -> None:
    """Checks the transcription in sdk_layouts.json against a second source."""
    gcc = _tool(compiler)
    lines = ["#include <stddef.h>", "#include <windows.h>", "#include <virtdisk.h>"]
    checked = 0
    for struct, layout in sorted(LAYOUTS[arch].items()):
        if _mingw_layout_is_current(struct, None):
            lines.append(f'_Static_assert(sizeof({struct}) == {layout["size"]}, "{struct}");')
            lines.append(f'_Static_assert(_Alignof({struct}) == {layout["align"]}, "{struct}");')
        for path, (offset, size) in layout["fields"].items():
            if _mingw_layout_is_current(struct, path):
                lines.append(f'_Static_assert(offsetof({struct}, {path}) == {offset}, "{struct}.{path}");')
                lines.append(f'_Static_assert(sizeof((({struct} *)0)->{path}) == {size}, "{struct}.{path}");')
                checked += 1
    (tmp_path / "layouts.c").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _check([gcc, "-std=c11", "-fsyntax-only", "layouts.c"], tmp_path)
    assert checked > 80


def test_the_windows_shim_defines_the_sdk_vendor_guids() -> None:
    text = (_sources() / "shim_windows.c").read_text(encoding="utf-8")
    defined = {
        name: [int(number, 16) for number in re.findall(r"0x[0-9A-Fa-f]+", values)]
        for name, values in re.findall(r"DEFINE_GUID\((\w+),([^;]*)\);", text)
    }
    microsoft = uuid.UUID(API["vendor_microsoft"])
    assert defined == {
        "VIRTUAL_STORAGE_TYPE_VENDOR_UNKNOWN": [0] * 11,
        "VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT": [*microsoft.fields[:3], *microsoft.bytes[8:]],
    }
