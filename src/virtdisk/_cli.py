"""The ``virtdisk`` command line: create, info, attach, detach, list, merge, compact, convert,
mirror, resize, set, demo."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Any, NoReturn

from . import _disk
from ._disk import DiskInfo
from ._enums import Access, DiskType, StorageType
from ._errors import VirtualDiskError, WinError
from ._progress import ProgressBar

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# The largest virtual disk any supported format holds (VHDX).
_MAX_SIZE = 64 << 40
# The layout of `info --json` and `list --json` (README, "Command line"):
# raised when a key changes meaning or goes away, not when one is added.
JSON_VERSION = 1

_DESCRIPTION = """\
Create, inspect, attach and detach virtual disks (VHD, VHDX, ISO).

Sizes take binary units: 64M, 1.5G, 2TiB, or a byte count.
Errors print one line on stderr and exit with status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and status 1, like
    every other error of the command (argparse's own: usage lines, status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def parse_size(text: str) -> int:
    """``64M``, ``1.5G``, ``4096`` (bytes); binary units, an optional ``iB``/``B``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (try 64M, 1G or a byte count)")
    number, unit = match.groups()
    size = Fraction(number) * _UNITS[unit.upper()]
    if size.denominator != 1:
        raise argparse.ArgumentTypeError(f"size {text!r} is not a whole number of bytes")
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be more than 0")
    if size > _MAX_SIZE:
        raise argparse.ArgumentTypeError(f"size {text!r} is more than 64T, the largest virtual disk (VHDX)")
    return int(size)


def _kind(info: DiskInfo) -> str:
    """'VHD fixed', 'ISO'."""
    return (
        f"{info.storage_type.name} {info.disk_type.name.lower()}"
        if info.disk_type
        else info.storage_type.name
    )


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:g} {unit}" if unit == "B" else f"{size:.4g} {unit}"
        size /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


class _UsageError(Exception):
    """A mistake on the command line that argparse cannot see alone."""


def _create(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if args.size is None and args.parent is None and args.source is None:
        raise _UsageError("create needs --size (or --parent, or --source)")
    if args.parent is not None and args.size is not None:
        raise _UsageError("--size does not go with --parent: a differencing disk has its parent's size")
    kind = StorageType[args.format.upper()] if args.format else None
    if kind is None and path.suffix.lower() not in (".vhd", ".vhdx"):
        raise _UsageError(
            f"cannot tell the format of {path} from its suffix: give --format vhd or --format vhdx"
        )
    # A fixed disk's allocation and a copy take time: a bar on a terminal.
    bar = ProgressBar(f"creating {path}", quiet=args.quiet or args.json)
    try:
        with _disk.create(
            path,
            args.size or 0,
            storage_type=kind,
            fixed=args.type == "fixed",
            block_size=args.block_size or 0,
            sector_size=args.sector_size or 0,
            parent=args.parent,
            source=args.source,
            progress=bar,
        ) as disk:
            info = disk.info
    finally:
        bar.finish()
    if args.json:
        print(json.dumps(info_json(info, None), indent=2))
        return 0
    print(f"created {path} ({_kind(info)}, {_human(info.virtual_size)})")
    return 0


def info_json(info: DiskInfo, physical_path: str | None) -> dict[str, Any]:
    """What ``info --json`` prints (README, "Command line")."""
    data: dict[str, Any] = {"version": JSON_VERSION}
    data.update(info.to_dict())
    data["path"] = str(_absolute(info.path))
    data["physical_path"] = physical_path
    return data


def _absolute(path: Path) -> Path:
    # Absolute, not resolved: a symbolic link the user named stays named.
    return Path(os.path.abspath(path))


def _info(args: argparse.Namespace) -> int:
    with _disk.open(args.path, read_only=True) as disk:
        info = disk.info
        physical = disk.physical_path if info.attached else None
    data = info_json(info, physical)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    del data["version"]
    for key, value in data.items():
        if value in (None, []):
            continue
        if key in ("virtual_size", "physical_size") and isinstance(value, int):
            value = f"{value} ({_human(value)})"
        print(f"{key.replace('_', ' '):>24}: {value}")
    return 0


_NOT_WRITABLE = frozenset(
    {WinError.ERROR_ACCESS_DENIED, WinError.ERROR_WRITE_PROTECT, WinError.ERROR_PRIVILEGE_NOT_HELD}
)


def _attach(args: argparse.Namespace) -> int:
    # An ISO opens read-only and so attaches read-only without --read-only.
    read_only = True if args.read_only else None
    try:
        disk = _disk.open(args.path, read_only=bool(args.read_only))
    except VirtualDiskError as error:
        # Refused for writing: EACCES, EROFS, or EPERM (an immutable file),
        # which the provider answers with ERROR_PRIVILEGE_NOT_HELD.
        if error.winerror in _NOT_WRITABLE and not args.read_only:
            error.hint = "the image is not writable for you: attach it with --read-only"
        raise
    with disk:
        disk.attach(read_only=read_only, permanent=True)
        print(disk.physical_path)
    return 0


def _detach(args: argparse.Namespace) -> int:
    _disk.detach(args.path)
    return 0


def list_json(disks: list[_disk.AttachedDisk]) -> dict[str, Any]:
    """What ``list --json`` prints (README, "Command line")."""
    return {
        "version": JSON_VERSION,
        "disks": [
            {
                "physical_path": d.physical_path,
                "image_path": str(d.image_path) if d.image_path else None,
                "read_only": d.read_only,
                "permanent": d.permanent,
                "served": d.served,
            }
            for d in disks
        ],
    }


def _list(args: argparse.Namespace) -> int:
    disks = _disk.attached_disks()
    if args.json:
        print(json.dumps(list_json(disks), indent=2))
        return 0

    def yes_no(value: bool | None) -> str:
        return "-" if value is None else "yes" if value else "no"

    rows = [("DEVICE", "READ-ONLY", "PERMANENT", "SERVED", "IMAGE")]
    rows += [
        (
            d.physical_path,
            yes_no(d.read_only),
            yes_no(d.permanent),
            yes_no(d.served),
            str(d.image_path or "-"),
        )
        for d in disks
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Create a small fixed VHD, attach it, show it, detach it: the whole job once."""
    with tempfile.TemporaryDirectory(prefix="virtdisk-demo-") as folder:
        path = Path(folder, "demo.vhd")
        with _disk.create(path, args.size, fixed=True) as disk:
            print(f"created   {path} ({_human(args.size)} fixed VHD)")
            disk.attach()
            print(f"attached  {disk.physical_path}")
            info = disk.info
            print(f"info      {_kind(info)}, id {info.identifier}, attached={info.attached}")
            disk.detach()
            print(f"detached  attached={disk.attached}")
    return 0


def _add_job_output_options(command: argparse.ArgumentParser) -> None:
    """--quiet and --json, for the commands that may run long and end in a result."""
    command.add_argument("--quiet", action="store_true", help="no progress bar")
    command.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="virtdisk", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"virtdisk {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    create = commands.add_parser(
        "create",
        help="create a VHD or VHDX image",
        description="Create a VHD or VHDX image; never overwrites an existing file.",
    )
    create.add_argument("path")
    create.add_argument(
        "--size", type=parse_size, help="virtual size, e.g. 64M (with --source: default the source's)"
    )
    create.add_argument(
        "--format",
        type=str.lower,
        choices=["vhd", "vhdx"],
        help="image format (default: from the suffix, .vhd or .vhdx)",
    )
    create.add_argument(
        "--type",
        choices=["fixed", "dynamic"],
        default="dynamic",
        help="fixed: allocate the whole size now; dynamic: grow as data is written (default)",
    )
    create.add_argument(
        "--block-size", type=parse_size, help="allocation unit of a dynamic disk (default: the format's)"
    )
    create.add_argument(
        "--sector-size",
        type=int,
        choices=[512, 4096],
        help="logical sector size (default 512; 4096: VHDX only)",
    )
    origin = create.add_mutually_exclusive_group()
    origin.add_argument("--parent", help="make a differencing disk over this image (no --size)")
    origin.add_argument("--source", help="copy the contents of this image, raw file or block device")
    create.add_argument("--quiet", action="store_true", help="no progress bar")
    create.add_argument(
        "--json", action="store_true", help="print the new image's information as 'info --json' does"
    )
    create.set_defaults(run=_create)

    info = commands.add_parser("info", help="describe an image", description="Describe an image.")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print one JSON object (keys: see the README)")
    info.set_defaults(run=_info)

    attach = commands.add_parser(
        "attach",
        help="attach an image until 'detach' (prints the device)",
        description="Attach an image until 'virtdisk detach', and print its device. "
        "An ISO image attaches read-only without --read-only.",
    )
    attach.add_argument("path")
    attach.add_argument("--read-only", action="store_true", help="attach read-only")
    attach.set_defaults(run=_attach)

    detach = commands.add_parser(
        "detach",
        help="detach an attached image, by image or device",
        description="Detach a disk, named by its image or by its device (/dev/loop3 on Linux).",
    )
    detach.add_argument("path", metavar="IMAGE_OR_DEVICE")
    detach.set_defaults(run=_detach)

    listing = commands.add_parser(
        "list", help="list attached virtual disks", description="List the attached virtual disks."
    )
    listing.add_argument("--json", action="store_true", help="print one JSON object (keys: see the README)")
    listing.set_defaults(run=_list)

    demo = commands.add_parser(
        "demo",
        help="create, attach and detach a small temporary VHD",
        description="Create a fixed VHD in a temporary directory, attach it, show it, detach it.",
    )
    demo.add_argument("--size", type=parse_size, default=16 << 20, help="default: 16M")
    demo.set_defaults(run=_demo)
    _add_long_operations(commands)
    _add_offline_changes(commands)
    return parser


# ---- long operations: merge, compact, convert, mirror -------------------


def _merge(args: argparse.Namespace) -> int:
    # Named before the merge: afterwards a VHDX child no longer opens.
    target = _ancestor(Path(args.path), args.depth)
    bar = ProgressBar(f"merging {args.path}", quiet=args.quiet or args.json)
    copied = [0]

    def progress(current: int, total: int) -> None:
        copied[0] = current
        bar(current, total)

    try:
        _disk.merge(args.path, args.depth, progress=progress)
    finally:
        bar.finish()
    result = {
        "path": str(Path(args.path)),
        "depth": args.depth,
        "target": str(target),
        "bytes_copied": copied[0],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"merged {args.path} into {target} ({_human(copied[0])} copied)")
    return 0


def _ancestor(path: Path, depth: int) -> Path | None:
    """The disk ``depth`` levels above ``path`` in its chain, as the chain names
    it; None when the chain is shorter (the merge then says what is wrong)."""
    current = path
    for _ in range(depth):
        with _disk.open(current, read_only=True) as disk:
            parent = disk.info.parent_path
        if parent is None:
            return None
        current = Path(parent)
    return current


def _compact(args: argparse.Namespace) -> int:
    path = Path(args.path)
    before = path.stat().st_size
    bar = ProgressBar(f"compacting {args.path}", quiet=args.quiet or args.json)
    try:
        _disk.compact(
            path, zero_scan=not args.no_zero_scan, block_moves=not args.no_block_moves, progress=bar
        )
    finally:
        bar.finish()
    after = path.stat().st_size
    result = {"path": str(path), "size_before": before, "size_after": after, "bytes_returned": before - after}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"compacted {args.path}: {_human(before)} -> {_human(after)} ({_human(before - after)} returned)"
        )
    return 0


def _convert(args: argparse.Namespace) -> int:
    destination = Path(args.destination)
    kind = StorageType[args.format.upper()] if args.format else None
    if kind is None and destination.suffix.lower() not in (".vhd", ".vhdx"):
        raise _UsageError(
            f"cannot tell the format of {destination} from its suffix: give --format vhd or --format vhdx"
        )
    fixed = args.type == "fixed" if args.type else _is_fixed(Path(args.source))
    bar = ProgressBar(f"converting {args.source}", quiet=args.quiet or args.json)
    try:
        with _disk.create(
            destination,
            0,
            storage_type=kind,
            fixed=fixed,
            block_size=args.block_size or 0,
            source=args.source,
            progress=bar,
        ) as disk:
            info = disk.info
    finally:
        bar.finish()
    if args.json:
        print(json.dumps({"source": args.source, **info.to_dict()}, indent=2, default=str))
    else:
        print(f"converted {args.source} to {destination} ({_kind(info)}, {_human(info.virtual_size)})")
    return 0


def _mirror(args: argparse.Namespace) -> int:
    target = Path(args.target)
    bar = ProgressBar(f"mirroring {args.image}", quiet=args.quiet or args.json)
    copied = [0]

    def progress(current: int, total: int) -> None:
        copied[0] = current
        bar(current, total)

    # A handle for reading is enough to mirror, and the only kind an
    # attached image lets others open.
    with _disk.open(args.image, read_only=True) as disk:
        try:
            disk.mirror(target, existing=args.existing, progress=progress)
        finally:
            bar.finish()
        # Asked before the break: after it the device is the target's, and
        # this handle's image is no longer attached.
        device = disk.physical_path
        disk.break_mirror()
    result = {
        "image": str(Path(args.image)),
        "target": str(target),
        "device": device,
        "bytes_copied": copied[0],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{device} now uses {target} ({_human(copied[0])} copied); {args.image} is no longer attached")
    return 0


def _is_fixed(source: Path) -> bool:
    """Whether the source is a fixed VHD or VHDX (Convert-VHD keeps the type);
    a raw file, a device or an ISO is not."""
    if source.suffix.lower() not in (".vhd", ".vhdx"):
        return False
    with _disk.open(source, read_only=True) as disk:
        return disk.info.disk_type == DiskType.FIXED


def _add_long_operations(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    merge = commands.add_parser(
        "merge", help="merge a differencing disk into its parent (Merge-VHD); nothing is deleted"
    )
    merge.add_argument("path", help="the differencing disk (the child)")
    merge.add_argument(
        "--depth",
        type=int,
        default=1,
        help="how many disks to merge: 1 into the parent, 2 into the grandparent",
    )
    _add_job_output_options(merge)
    merge.set_defaults(run=_merge)

    compact = commands.add_parser(
        "compact",
        help="shrink a dynamic or differencing image: drop zero blocks, close the gaps (Optimize-VHD)",
    )
    compact.add_argument("path", help="the image (detached, or attached read-only)")
    compact.add_argument(
        "--no-zero-scan", action="store_true", help="drop only blocks already marked unmapped or zero"
    )
    compact.add_argument(
        "--no-block-moves", action="store_true", help="move no blocks: only free space at the end is returned"
    )
    _add_job_output_options(compact)
    compact.set_defaults(run=_compact)

    convert = commands.add_parser(
        "convert", help="copy any image, raw file or block device into a new VHD or VHDX (Convert-VHD)"
    )
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument(
        "--format",
        type=str.lower,
        choices=["vhd", "vhdx"],
        help="image format (default: from the destination's suffix, .vhd or .vhdx)",
    )
    convert.add_argument(
        "--type",
        choices=["fixed", "dynamic"],
        help="fixed: allocate the whole size now; dynamic: grow as data is written "
        "(default: fixed for a fixed VHD or VHDX source, else dynamic)",
    )
    convert.add_argument(
        "--block-size", type=parse_size, help="allocation unit of a dynamic disk (default: the format's)"
    )
    _add_job_output_options(convert)
    convert.set_defaults(run=_convert)

    mirror = commands.add_parser(
        "mirror",
        help="move an attached disk to a new image while it is in use (Mirror + BreakMirrorVirtualDisk)",
        description="Copy an attached, served (dynamic or differencing) disk to TARGET while it stays in "
        "use, its writes going to both, then switch the disk to TARGET: from then on the device reads and "
        "writes TARGET, and IMAGE no longer changes.  The disk stays attached (and is detached) under "
        "IMAGE's name.",
    )
    mirror.add_argument("image", help="the attached image")
    mirror.add_argument("target", help="the new image (same format, type and size)")
    mirror.add_argument(
        "--existing",
        action="store_true",
        help="mirror onto an existing image of the same size, overwriting it",
    )
    _add_job_output_options(mirror)
    mirror.set_defaults(run=_mirror)


# ---- offline changes: resize, set ---------------------------------------


def _resize(args: argparse.Namespace) -> int:
    if args.size is None and not args.to_minimum_size:
        raise _UsageError("resize needs --size or --to-minimum-size")
    bar = ProgressBar(f"resizing {args.path}", quiet=args.quiet or args.json)
    with _disk.open(args.path, Access.METAOPS | Access.GET_INFO) as disk:
        old = disk.info.virtual_size
        try:
            disk.resize(args.size or 0, allow_unsafe=args.allow_unsafe, progress=bar)
        finally:
            bar.finish()
        new = disk.info.virtual_size
    if args.json:
        print(
            json.dumps(
                {"path": str(_absolute(Path(args.path))), "old_size": old, "virtual_size": new}, indent=2
            )
        )
    else:
        print(f"resized {args.path} from {_human(old)} to {_human(new)}")
    return 0


def _set(args: argparse.Namespace) -> int:
    if args.parent is None and args.identifier is None and args.physical_sector_size is None:
        raise _UsageError("set needs --parent, --identifier or --physical-sector-size")
    changes = []
    # Without its parents: a disk whose parent moved opens only so.
    with _disk.open(args.path, Access.METAOPS | Access.GET_INFO, no_parents=True) as disk:
        # In the order a failure leaves the least half done: the checks of
        # each change run before it writes, and a parent is the likeliest refusal.
        if args.parent is not None:
            disk.set_parent_path(args.parent)
            changes.append(f"parent {args.parent}")
        if args.identifier is not None:
            disk.set_identifier(args.identifier)
            changes.append(f"identifier {args.identifier}")
        if args.physical_sector_size is not None:
            disk.set_physical_sector_size(args.physical_sector_size)
            changes.append(f"physical sector size {args.physical_sector_size}")
    if args.json:
        with _disk.open(args.path, read_only=True) as disk:
            info = disk.info
        print(json.dumps(info_json(info, None), indent=2))
    else:
        print(f"set {args.path}: {', '.join(changes)}")
    return 0


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid identifier {text!r} (a UUID, e.g. {uuid.uuid4()})"
        ) from None


def _add_offline_changes(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    resize = commands.add_parser(
        "resize",
        help="change the virtual size of a detached image (Resize-VHD)",
        description="Change the virtual size of a detached image (Resize-VHD). Both formats grow; "
        "a VHDX also shrinks, but not below the end of its last partition unless --allow-unsafe.",
    )
    resize.add_argument("path")
    size = resize.add_mutually_exclusive_group()
    size.add_argument("--size", type=parse_size, help="the new virtual size, e.g. 20G")
    size.add_argument(
        "--to-minimum-size",
        action="store_true",
        help="shrink a VHDX to the end of its last partition (Resize-VHD -ToMinimumSize)",
    )
    resize.add_argument(
        "--allow-unsafe", action="store_true", help="shrink even below the end of a partition (may cut data)"
    )
    _add_job_output_options(resize)
    resize.set_defaults(run=_resize)

    setting = commands.add_parser(
        "set",
        help="change a detached image's parent path, identifier or sector size (Set-VHD)",
        description="Change what a detached image records about itself (Set-VHD).",
    )
    setting.add_argument("path")
    setting.add_argument(
        "--parent", help="the moved or renamed parent of this differencing disk (it must be the same disk)"
    )
    setting.add_argument(
        "--identifier", type=_uuid, help="a new unique identifier (children no longer match)"
    )
    setting.add_argument(
        "--physical-sector-size", type=int, choices=[512, 4096], help="the physical sector size to report"
    )
    setting.add_argument(
        "--json", action="store_true", help="print the image's information as 'info --json' does"
    )
    setting.set_defaults(run=_set)


# What a command-line user can do about an error, in options rather than
# the facade's keyword arguments.
_CLI_HINTS: dict[tuple[str, int], str] = {
    ("AttachVirtualDisk", WinError.ERROR_ACCESS_DENIED): "the image is read-only: attach it with --read-only",
}


# The command-line option of each facade parameter that has one.
_OPTIONS = {
    "size": "--size",
    "block_size": "--block-size",
    "sector_size": "--sector-size",
    "parent": "--parent",
    "source": "--source",
}


def _fail(message: str) -> int:
    print(f"virtdisk: error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = int(args.run(args))
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # The reader went away (`virtdisk list | head -1`): nothing more to
        # say, and Python must not report the failed flush at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except _UsageError as error:
        return _fail(f"{error} (see 'virtdisk {args.command} --help')")
    except VirtualDiskError as error:
        parameter = _disk.refused_parameter(error)
        if parameter in _OPTIONS:
            error.hint = f"see {_OPTIONS[parameter]}"
        error.hint = _CLI_HINTS.get((error.function, error.winerror), error.hint)
        if error.hint.startswith(("attach(", "open the disk")):  # the facade's terms, not the CLI's
            error.hint = ""
        return _fail(str(error))
    except (OSError, ValueError) as error:
        return _fail(str(error))
