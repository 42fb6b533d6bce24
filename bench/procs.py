"""Child processes of a bench run: start, wait until ready, measure RSS, stop.

Every wait is bounded; every child is started in its own session so that stopping it by its
own process-group id also stops what it spawned (uvicorn workers, nginx workers).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the child binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout_s: float = 1.0, headers: dict[str, str] | None = None) -> int | None:
    """Status of a GET, or None when nothing answered."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


class ProcessDied(RuntimeError):
    """A child exited while we waited for it."""


class Proc:
    """One child process with its output in ``<log_dir>/<name>.log``."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdout_pipe: bool = False,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._pending = b""
        self.popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def rss_mb(self) -> float:
        """Resident set size of the process itself (VmRSS from /proc), in MiB."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def readline(self, timeout_s: float) -> str:
        """The next line of the child's stdout (``stdout_pipe=True``), waiting at most ``timeout_s``.

        Returns '' at end of file; raises TimeoutError when no full line came in time.
        """
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name} printed no line within {timeout_s:g}s:\n{self.tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    line, self._pending = self._pending, b""
                    return line.decode(errors="replace")
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode(errors="replace") + "\n"

    def cpu_s(self) -> float:
        """User + system CPU seconds used so far by the process itself (from /proc)."""
        return cpu_seconds(self.pid)

    def wait_http(self, url: str, timeout_s: float, headers: dict[str, str] | None = None) -> None:
        """Poll ``url`` until it answers with a status below 500 (bounded by ``timeout_s``).

        On failure the process is stopped before the error is raised, so that a start-up
        that goes wrong never leaves a child behind.
        """
        try:
            self._wait_http(url, timeout_s, headers)
        except BaseException:
            self.stop()
            raise

    def _wait_http(self, url: str, timeout_s: float, headers: dict[str, str] | None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise ProcessDied(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            status = http_status(url, 1.0, headers)
            if status is not None and status < 500:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not answer {url} within {timeout_s:g}s:\n{self.tail()}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """TERM the child's process group, then KILL it if it is still there after ``timeout_s``."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout_s)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()
