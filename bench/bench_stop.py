"""How fast Stop reaches the upstream: time from the client's cancel to the upstream's disconnect.

    .venv/bin/python bench/bench_stop.py [--rounds 20]

Runs the app in this process against the fake OpenAI server (both on 127.0.0.1),
starts a slow reply through the Gradio API, cancels it once text has arrived
(``job.cancel()``, the same ``/cancel`` call the page makes for Stop), and
measures when the fake server's request handler saw the client go away.
Prints p50 / p95 / max over the rounds.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gradio_client import Client  # noqa: E402

from modules.config import build_config  # noqa: E402
from modules.app import ChatApp  # noqa: E402
from tests.fakes.openai_server import FakeOpenAIServer  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    with FakeOpenAIServer(api_key="sk-bench") as fake:
        entry = {"provider": "openai", "name": "fake", "base_url": fake.base_url, "api_key": "sk-bench",
                 "max_retries": 0}
        app = ChatApp(build_config({"models": [entry], "server": {"port": free_port()}}, env={}))
        app.build()
        _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
        client = Client(url, verbose=False)
        latencies = []
        try:
            for _ in range(args.rounds):
                fake.reset_events()
                fake.enqueue(*[f" w{i}" for i in range(400)], delay=0.02)
                job = client.submit("go", api_name="/chat")
                deadline = time.monotonic() + 30
                while not job.outputs() and time.monotonic() < deadline:  # bounded: text has arrived
                    time.sleep(0.005)
                if not job.outputs():
                    print("no text arrived within 30 s", file=sys.stderr)
                    return 1
                cancelled_at = time.monotonic()
                job.cancel()
                if not fake.disconnected.wait(timeout=10):
                    print("the upstream never saw the disconnect", file=sys.stderr)
                    return 1
                latencies.append((fake.disconnected_at - cancelled_at) * 1000)
        finally:
            client.close()
            app.demo.close()
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    print(f"Stop -> upstream disconnect over {len(latencies)} rounds: p50 {statistics.median(latencies):.1f} ms, "
          f"p95 {p95:.1f} ms, max {latencies[-1]:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
