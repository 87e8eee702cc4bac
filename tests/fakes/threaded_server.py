"""The life cycle every fake upstream shares: a Starlette app served by uvicorn on a thread.

The socket is bound and listening before the thread starts, so a client may connect
at once (the kernel queues the connection until uvicorn's loop accepts it): nothing
has to wait for the server to be "ready".
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette

S = TypeVar("S", bound="ThreadedServer")


class ThreadedServer:
    log_level = "warning"
    backlog = 512

    def __init__(self) -> None:
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        # Clients that went away before the end of their answer, and requests left unanswered.
        self.disconnected = threading.Event()
        self.disconnected_at: float | None = None
        self.disconnects = 0
        self.stalled = threading.Event()  # a request the script says to leave unanswered has arrived
        self._left_changed = threading.Condition()

    def _left(self) -> None:
        """A client went away before the end of its answer."""
        with self._left_changed:
            self.disconnects += 1
            self.disconnected_at = time.monotonic()
            self.disconnected.set()
            self._left_changed.notify_all()

    def wait_disconnects(self, count: int, timeout: float) -> bool:
        """Block until ``count`` clients have gone away before the end (False after ``timeout`` s)."""
        with self._left_changed:
            return self._left_changed.wait_for(lambda: self.disconnects >= count, timeout)

    async def _silence(self) -> Any:
        """A body that never comes (after the headers), until the client goes away."""
        self.stalled.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self._left()
            raise
        yield b""  # never reached: makes this an async generator

    def app(self) -> Starlette:
        raise NotImplementedError

    def start(self: S) -> S:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(self.backlog)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app(), log_level=self.log_level, lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
