"""How long a reply waits on an upstream that accepts the connection and never answers.

A raw socket on 127.0.0.1 accepts every connection and sends nothing. One model of the
given provider (its default timeouts and retries) is asked for a reply; the script prints
the error, the time it took, how many connections (attempts) the upstream saw, and when
each "retrying (n/m)" notice came.

    .venv/bin/python bench/bench_silent_upstream.py [openai|promptflow]   # about a minute each
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules import providers as registry  # noqa: E402
from modules.config import build_config  # noqa: E402
from modules.providers import GenerationOptions, Message  # noqa: E402


def main() -> int:
    provider = sys.argv[1] if len(sys.argv) > 1 else "openai"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    connections: list[socket.socket] = []

    def accept() -> None:
        while True:
            connection, _ = server.accept()
            connections.append(connection)  # kept open, never answered

    threading.Thread(target=accept, daemon=True).start()
    entry = ({"model": "m", "base_url": f"http://127.0.0.1:{port}/v1", "api_key": "k"} if provider == "openai"
             else {"url": f"http://127.0.0.1:{port}/score"})
    config = build_config({"models": [{"provider": provider, "name": "silent", **entry}]}, env={})
    model = registry.create(config.models[0])

    async def ask() -> None:
        started, notices = time.monotonic(), []
        try:
            async for delta in model.stream([Message("user", "Hello?")], GenerationOptions()):
                if delta.retrying:
                    notices.append(f"{delta.retrying[0]}/{delta.retrying[1]} at {time.monotonic() - started:.1f} s")
            outcome = "answered"
        except Exception as exc:  # the point: which error, after how long
            outcome = f"{type(exc).__name__}: {exc}"
        print(f"{provider}: {outcome}; after {time.monotonic() - started:.1f} s; {len(connections)} attempt(s); "
              f"retrying notices: {', '.join(notices) or 'none'}")

    asyncio.run(ask())
    return 0


if __name__ == "__main__":
    sys.exit(main())
