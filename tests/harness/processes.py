"""Starting and stopping real server processes on loopback for tests.

Every part is started the same way: a free port chosen at run time, a log file, a readiness
probe with a deadline, and on failure the tail of the log in the error so a broken start explains
itself. Teardown escalates from SIGTERM to SIGKILL (SeaweedFS ignores SIGTERM).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dhad_trainer.storage.embedded_s3 import free_port, free_ports  # noqa: F401 - re-exported for the harness


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


class StartError(RuntimeError):
    """A component did not become ready; the message carries its log tail."""


class Process:
    """One server process with its log file; `wait_ready` polls a probe until it passes."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def wait_ready(self, probe: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise StartError(
                    f"{self.name} exited with code {self.popen.returncode} before it was ready; "
                    f"log tail ({self.log_path}):\n{log_tail(self.log_path)}"
                )
            try:
                if probe():
                    return
            except Exception:  # noqa: BLE001 - any probe failure means "not ready yet"
                pass
            time.sleep(0.2)
        self.stop()
        raise StartError(
            f"{self.name} was not ready after {timeout:.0f} s; log tail ({self.log_path}):\n"
            f"{log_tail(self.log_path)}"
        )

    def kill(self) -> None:
        """SIGKILL, no grace: what a node crash or OOM kill does to a process."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        self._log.close()

    def stop(self, grace: float = 5.0) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=grace)
            except ProcessLookupError:
                pass
        self._log.close()


def tcp_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
