"""Crash consistency through an attached disk: ext4 on a served dynamic VHDX,
its server killed while a writer fills the file system.  Each time, the
image must open again (a VHDX log left mid-update is replayed), pass
`qemu-img check`, mount (ext4 replays its journal), hold every file that
was fsynced before the kill with its checksum, and pass `e2fsck -fn`.
Files written after the last sync may be lost or cut short; nothing else."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import virtdisk

from .conftest import require_tool, unmount
from .test_attach_served import record_of, record_path, server_of, wait_ended, wait_unbound

pytestmark = pytest.mark.loop

MiB = 1 << 20
ROUNDS = 3

# Attaches, makes the file system on the first round, mounts it, writes
# files and fsyncs them (and their folder), says which with their sha256,
# then writes on without syncing until it is killed.
WRITER = """
import hashlib, os, subprocess, sys, virtdisk
image, folder, round_, mkfs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
disk = virtdisk.open(image)
disk.attach()
device = disk.physical_path
if mkfs != "-":
    subprocess.run([mkfs, "-q", "-F", device], check=True)
subprocess.run(["mount", device, folder], check=True)
print("device", device, open(f"/sys/block/{os.path.basename(device)}/diskseq").read().strip(), flush=True)
synced = []
for i in range(4):
    data = os.urandom((256 << 10) + i * 4096 + round_)
    name = f"r{round_}-synced{i}.bin"
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    synced.append((name, hashlib.sha256(data).hexdigest()))
d = os.open(folder, os.O_RDONLY)
os.fsync(d)
os.close(d)
for name, digest in synced:
    print("synced", name, digest, flush=True)
i = 0
while True:
    with open(os.path.join(folder, f"r{round_}-unsynced{i % 8}.bin"), "wb") as f:
        f.write(os.urandom(1 << 20))
    i += 1
    if i == 4:
        print("writing", flush=True)
"""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killing_the_server_under_mounted_ext4_loses_nothing_synced(images: Path, mount_point: Path) -> None:
    mkfs, e2fsck, qemu_img = require_tool("mkfs.ext4"), require_tool("e2fsck"), require_tool("qemu-img")
    path = images / "fs.vhdx"
    # Small blocks, allocated in the order ext4 first touches them: never
    # all present in order, which would attach directly, without a server.
    virtdisk.create(path, 256 * MiB, block_size=MiB).close()
    expected: dict[str, str] = {}
    replays = 0
    deadline = time.monotonic() + 180
    for round_ in range(ROUNDS):
        if time.monotonic() > deadline:
            break
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(mount_point), str(round_), "-" if round_ else mkfs],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            words = writer.stdout.readline().split()
            assert words[:1] == ["device"], f"the writer did not attach: {words}"
            device, seq = words[1], int(words[2])
            assert record_path(path).exists(), "the disk must be served (its blocks are not flat)"
            helper = record_of(path)["pid"]
            server = server_of(helper)
            assert server is not None
            for _ in range(4):
                words = writer.stdout.readline().split()
                assert words[:1] == ["synced"], f"the writer stopped: {words}"
                expected[words[1]] = words[2]
            assert writer.stdout.readline().strip() == "writing"
            os.kill(server, signal.SIGKILL)  # mid-write: the writer is filling the page cache and the device
        finally:
            writer.kill()
            writer.wait(timeout=30)
        # The file system on a device whose server is gone: only unmounting is left.
        subprocess.run(["umount", str(mount_point)], check=True, timeout=60)
        wait_unbound(device, seq)
        wait_ended(helper)

        # The image opens (replaying its log if the kill left one) and is sound.
        check = [qemu_img, "check", "-q", "-f", "vhdx", str(path)]
        before = subprocess.run(check, capture_output=True, text=True)
        replays += "log that needs to be replayed" in before.stderr
        virtdisk.open(path).close()
        subprocess.run([qemu_img, "check", "-q", "-f", "vhdx", str(path)], check=True)
        with virtdisk.open(path) as disk:
            disk.attach()
            device = disk.physical_path
            subprocess.run(["mount", device, str(mount_point)], check=True)  # replays the journal
            try:
                for name, digest in expected.items():
                    assert sha256_of(mount_point / name) == digest, f"{name} was synced before the kill"
            finally:
                unmount(mount_point, device)
            fsck = subprocess.run([e2fsck, "-f", "-n", device], capture_output=True, text=True)
            assert fsck.returncode == 0, f"e2fsck after round {round_}:\n{fsck.stdout}{fsck.stderr}"
            disk.detach()
        subprocess.run([qemu_img, "check", "-q", "-f", "vhdx", str(path)], check=True)
    assert len(expected) >= 4 * 2, "fewer than two rounds ran"
    print(f"{round_ + 1} kills, {replays} of them left a VHDX log to replay")
