"""A TCP proxy that damages one byte of a server's reply: corruption in transit, for real.

The client talks to the proxy as to the server (S3 signatures cover the Host header, which
passes through unchanged), and the proxy flips one bit of the reply stream at a chosen offset
of a connection while `damage` is set (with `once`, only for the first connection to get
there). Replies shorter than the offset pass intact, so listings and small objects arrive
whole and only a large object's body is hit.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

from support.net import free_port


@dataclass
class TamperingProxy:
    upstream: tuple[str, int]
    flip_at: int = 300_000
    damage: bool = True
    once: bool = True  # stop damaging after the first flip
    port: int = field(default_factory=free_port)
    flips: int = 0
    _server: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TamperingProxy:
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while self._server is not None:
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(self.upstream)
            self._spawn(self._pump, client, upstream, False)
            self._spawn(self._pump, upstream, client, True)

    def _pump(self, source: socket.socket, target: socket.socket, reply: bool) -> None:
        seen = 0
        try:
            while data := source.recv(65536):
                if reply and self.damage and seen <= self.flip_at < seen + len(data):
                    block = bytearray(data)
                    block[self.flip_at - seen] ^= 0x01
                    data = bytes(block)
                    with self._lock:
                        self.flips += 1
                        self.damage = not self.once
                seen += len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
