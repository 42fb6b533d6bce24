"""Reading what our command-line programs print."""

from __future__ import annotations

import re
import subprocess
import time


def listening_port(proc: subprocess.Popen[str]) -> int:
    """The port a CLI says it bound (it logs 'listening on http://host:port'); reads stderr."""
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if found:
            return int(found.group(1))
    raise AssertionError("the CLI never said where it listens")
