"""Running the app with uvicorn: in the foreground (`danlu serve`) or on a background thread (tests, benchmarks).

The background server binds port 0 (the OS picks a free port) on loopback and reports the port it got, so
tests never collide on a fixed port and never listen beyond 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


def _config(app: Any, host: str, port: int, **kw: Any):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=kw.pop("log_level", "warning"),
                          timeout_graceful_shutdown=2, **kw)  # fmt: skip


def serve_forever(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.Server(_config(app, host, port, log_level=log_level)).run()


class BackgroundServer:
    """`with BackgroundServer(app) as url:` — uvicorn on a free loopback port in a daemon thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1"):
        import uvicorn

        # proto named: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto is IPPROTO_TCP, and with
        # it on, each streamed chunk after the first waited ~40 ms for the client's delayed ACK
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._server = uvicorn.Server(_config(app, self.host, self.port))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
