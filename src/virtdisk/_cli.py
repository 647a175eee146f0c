"""The ``virtdisk`` command line: create, info, attach, detach, list, merge, convert, demo."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from . import _disk
from ._disk import DiskInfo
from ._enums import StorageType
from ._errors import VirtualDiskError
from ._progress import ProgressBar

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``64M``, ``1.5G``, ``4096`` (bytes); binary units, an optional ``iB``/``B``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (try 64M, 1G or a byte count)")
    number, unit = match.groups()
    size = float(number) * _UNITS[unit.upper()]
    if size != int(size):
        raise argparse.ArgumentTypeError(f"size {text!r} is not a whole number of bytes")
    return int(size)


def _format(text: str) -> StorageType:
    return StorageType[text.upper()]


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


def _create(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not args.size and args.parent is None and args.source is None:
        print("virtdisk: error: --size is required without --parent or --source", file=sys.stderr)
        return 2
    kind = args.format if args.format is not None else None
    if kind is None and path.suffix.lower() not in (".vhd", ".vhdx"):
        kind = StorageType.VHD
    with _disk.create(
        path,
        args.size,
        storage_type=kind,
        fixed=args.type == "fixed",
        block_size=args.block_size,
        sector_size=args.sector_size,
        parent=args.parent,
        source=args.source,
    ) as disk:
        info = disk.info
    print(f"created {path} ({_kind(info)}, {_human(info.virtual_size)})")
    return 0


def _info(args: argparse.Namespace) -> int:
    with _disk.open(args.path, read_only=True) as disk:
        info = disk.info
        physical = disk.physical_path if info.attached else None
    data = info.to_dict()
    data["physical_path"] = physical
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if value in (None, []):
            continue
        if key in ("virtual_size", "physical_size") and isinstance(value, int):
            value = f"{value} ({_human(value)})"
        print(f"{key.replace('_', ' '):>22}: {value}")
    return 0


def _attach(args: argparse.Namespace) -> int:
    with _disk.open(args.path, read_only=args.read_only) as disk:
        disk.attach(read_only=args.read_only, permanent=True)
        print(disk.physical_path)
    return 0


def _detach(args: argparse.Namespace) -> int:
    _disk.detach(args.path)
    return 0


def _list(args: argparse.Namespace) -> int:
    disks = _disk.attached_disks()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "physical_path": d.physical_path,
                        "image_path": str(d.image_path) if d.image_path else None,
                    }
                    for d in disks
                ],
                indent=2,
            )
        )
    else:
        for d in disks:
            print(f"{d.physical_path}\t{d.image_path or ''}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtdisk", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    create = commands.add_parser("create", help="create a VHD or VHDX image")
    create.add_argument("path")
    create.add_argument(
        "--size", type=parse_size, default=0, help="virtual size, e.g. 64M (default: the source's)"
    )
    create.add_argument(
        "--format",
        type=_format,
        choices=[StorageType.VHD, StorageType.VHDX],
        metavar="{vhd,vhdx}",
        help="default: from the suffix, else vhd",
    )
    create.add_argument("--type", choices=["fixed", "dynamic"], default="dynamic")
    create.add_argument("--block-size", type=parse_size, default=0, help="default: the format's")
    create.add_argument(
        "--sector-size",
        type=int,
        choices=[512, 4096],
        default=0,
        help="logical sector size (4096: VHDX only)",
    )
    origin = create.add_mutually_exclusive_group()
    origin.add_argument("--parent", help="make a differencing disk over this image (no --size)")
    origin.add_argument("--source", help="copy the contents of this image, raw file or block device")
    create.set_defaults(run=_create)

    info = commands.add_parser("info", help="describe an image")
    info.add_argument("path")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_info)

    attach = commands.add_parser("attach", help="attach an image until 'detach' (prints the device)")
    attach.add_argument("path")
    attach.add_argument("--read-only", action="store_true")
    attach.set_defaults(run=_attach)

    detach = commands.add_parser("detach", help="detach an attached image")
    detach.add_argument("path")
    detach.set_defaults(run=_detach)

    listing = commands.add_parser("list", help="list attached virtual disks")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_list)

    demo = commands.add_parser("demo", help="create, attach and detach a small temporary VHD")
    demo.add_argument("--size", type=parse_size, default=16 << 20)
    demo.set_defaults(run=_demo)
    _add_long_operations(commands)
    return parser


# ---- long operations: merge, convert ------------------------------------


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


def _convert(args: argparse.Namespace) -> int:
    destination = Path(args.destination)
    kind = args.format
    if kind is None and destination.suffix.lower() not in (".vhd", ".vhdx"):
        kind = StorageType.VHD
    bar = ProgressBar(f"converting {args.source}", quiet=args.quiet or args.json)
    try:
        with _disk.create(
            destination, 0, storage_type=kind, fixed=args.type == "fixed", source=args.source, progress=bar
        ) as disk:
            info = disk.info
    finally:
        bar.finish()
    if args.json:
        print(json.dumps({"source": args.source, **info.to_dict()}, indent=2, default=str))
    else:
        print(f"converted {args.source} to {destination} ({_kind(info)}, {_human(info.virtual_size)})")
    return 0


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
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.add_argument("--json", action="store_true")
    merge.set_defaults(run=_merge)

    convert = commands.add_parser(
        "convert", help="copy any image, raw file or block device into a new VHD or VHDX (Convert-VHD)"
    )
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument(
        "--format",
        type=_format,
        choices=[StorageType.VHD, StorageType.VHDX],
        metavar="{vhd,vhdx}",
        help="default: from the destination's suffix, else vhd",
    )
    convert.add_argument("--type", choices=["fixed", "dynamic"], default="dynamic")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.add_argument("--json", action="store_true")
    convert.set_defaults(run=_convert)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except VirtualDiskError as error:
        print(f"virtdisk: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"virtdisk: error: {error}", file=sys.stderr)
        return 1
