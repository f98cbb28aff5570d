"""The embedded S3 server's ports: a port taken between choosing and binding costs a restart, not the run.

CI once failed the demo pipeline test because weed's filer could not bind its gRPC port ("address
already in use"): its ports were chosen one at a time, so two of them, or another process's, could
coincide."""

from __future__ import annotations

import io
import socket

import pytest

from dhad_trainer.storage import embedded_s3
from dhad_trainer.storage.embedded_s3 import PORT_FLAGS, EmbeddedS3, free_ports


def test_ports_chosen_together_are_distinct():
    for _ in range(20):
        ports = free_ports(len(PORT_FLAGS))
        assert len(set(ports)) == len(ports)


@pytest.fixture
def taken_port():
    """A port another process holds, as the one that took the filer's gRPC port in CI."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def first_choice_includes(monkeypatch, port: int, flag: str) -> list[list[int]]:
    """The first set of ports has `port` at `flag`; later sets are chosen for real. Returns every set chosen."""
    chosen: list[list[int]] = []

    def choose(count: int) -> list[int]:
        ports = free_ports(count)
        if not chosen:
            ports[PORT_FLAGS.index(flag)] = port
        chosen.append(ports)
        return ports

    monkeypatch.setattr(embedded_s3, "free_ports", choose)
    return chosen


@pytest.mark.s3
def test_a_taken_port_is_chosen_again_and_the_server_serves(tmp_path, monkeypatch, taken_port):
    chosen = first_choice_includes(monkeypatch, taken_port, "filer.port.grpc")
    with EmbeddedS3(tmp_path) as s3:
        assert len(chosen) == 2
        assert taken_port not in s3.ports.values() and s3.ports == dict(zip(PORT_FLAGS, chosen[1], strict=True))
        s3.ensure_bucket("after-a-restart")
        s3.client().put_object("after-a-restart", "k", io.BytesIO(b"v"), 1)
        assert s3.client().get_object("after-a-restart", "k").read() == b"v"
    assert "address already in use" in (tmp_path / "seaweedfs.log").read_text()


@pytest.mark.s3
def test_a_port_taken_on_every_start_fails_with_the_log_tail(tmp_path, monkeypatch, taken_port):
    def always_taken(count: int) -> list[int]:
        ports = free_ports(count)
        ports[PORT_FLAGS.index("master.port")] = taken_port
        return ports

    monkeypatch.setattr(embedded_s3, "free_ports", always_taken)
    with pytest.raises(RuntimeError, match=r"(?s)SeaweedFS exited \d+ \(start 2 of 2\).*address already in use"):
        EmbeddedS3(tmp_path).start(attempts=2)
