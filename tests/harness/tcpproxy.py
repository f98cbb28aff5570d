"""A TCP forwarder that can go silent: a real network fault (packets dropped, connections kept) that
no real part shows on demand. `pause()` stops moving bytes both ways and holds new connections;
`resume()` lets everything buffered through, as a healed partition does."""

from __future__ import annotations

import select
import socket
import threading

from .processes import free_port


class PausableProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = free_port()
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopped = False
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def stop(self) -> None:
        self._stopped = True
        self._flowing.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        self._flowing.wait()
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        ends = {client: upstream, upstream: client}
        try:
            while not self._stopped:
                self._flowing.wait()
                readable, _, _ = select.select(list(ends), [], [], 0.2)
                for sock in readable:
                    if not self._flowing.is_set():
                        break
                    data = sock.recv(65536)
                    if not data:
                        return
                    ends[sock].sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()
