"""How long one pathological message stalls everybody else (issue: token counting on the event loop).

Starts the app with its HTTP API and a fake upstream that reports no usage (so the app
counts the tokens itself), sends one message of N megabytes of a single repeated
character to /v1/chat/completions, and meanwhile times GET /v1/models every 20 ms from
another client. Prints the big request's status and duration, and the slowest and median
latency of the small requests while it ran.

    .venv/bin/python bench/bench_counting.py [--mb 5] [--char a]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from modules.config import AppConfig, build_config  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.fakes.openai_server import FakeOpenAIServer  # noqa: E402

KEY = "bench-counting-key-0123456789"


async def measure(url: str, text: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    latencies: list[float] = []
    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=300) as client:
        async def ping() -> None:
            while not done.is_set():
                started = time.perf_counter()
                await client.get(f"{url}/v1/models", headers=headers)
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)

        pinger = asyncio.create_task(ping())
        await asyncio.sleep(0.2)
        started = time.perf_counter()
        answer = await client.post(f"{url}/v1/chat/completions", headers=headers, json={
            "model": "fake", "messages": [{"role": "user", "content": text}]})
        took = time.perf_counter() - started
        done.set()
        await pinger
    print(f"big request: HTTP {answer.status_code} in {took * 1000:.0f} ms; {answer.text[:120]!r}")
    print(f"other requests meanwhile: {len(latencies)}, median {statistics.median(latencies) * 1000:.1f} ms, "
          f"slowest {max(latencies) * 1000:.0f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=5.0)
    parser.add_argument("--char", default="a")
    args = parser.parse_args()
    text = args.char * int(args.mb * 1024 * 1024)
    from modules.app import ChatApp

    with FakeOpenAIServer(api_key="sk-bench") as fake, tempfile.TemporaryDirectory() as data:
        settings = {"models": [{"provider": "openai", "name": "fake", "model": "gpt-4o", "base_url": fake.base_url,
                                "api_key": "sk-bench", "max_retries": 0, "context_size": 10_000_000}],
                    "api": {"enabled": True, "keys": [KEY]}, "server": {"port": free_port()},
                    "history": {"data_dir": data}}
        if "limits" in AppConfig.model_fields:  # let the message through: what is measured is its counting
            settings["limits"] = {"max_request_bytes": len(text) * 4 + 65536, "max_message_chars": len(text) + 1}
        app = ChatApp(build_config(settings, env={}))
        app.build()
        _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
        try:
            asyncio.run(measure(url.rstrip("/"), text))
        finally:
            app.demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
