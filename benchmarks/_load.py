"""A load running beside a benchmarked operation: a Python script in a
process of its own that prints "started", works until its standard input
closes, then prints the bytes it moved and the seconds it took."""

from __future__ import annotations

import subprocess
import sys


class Load:
    def __init__(self, script: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "started"

    def stop(self) -> float:
        """Stops it: its rate in bytes per second."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        moved, seconds = self.process.stdout.readline().split()
        self.process.wait(timeout=60)
        return int(moved) / float(seconds)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
