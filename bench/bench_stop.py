"""How fast Stop reaches the upstream: time from the client's Stop to the upstream's disconnect.

    .venv/bin/python bench/bench_stop.py [--rounds 20]

Runs the app in this process against the fake OpenAI server (both on 127.0.0.1) and
measures when the fake server's request handler saw the app go away, for:

- ``/chat``: a slow reply cancelled once text has arrived (``job.cancel()``: the client leaves);
- the page: a reply started by ``add_message`` + ``respond``, stopped with the page's Stop
  (``/stop``) from a second session that opened the same conversation (a second tab), once
  text has arrived, and before the first token (the fake holds it back).

Prints p50 / p95 / max over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gradio_client import Client  # noqa: E402

from modules.config import build_config  # noqa: E402
from bench.procs import free_port  # noqa: E402
from modules.app import ChatApp  # noqa: E402
from tests.fakes.openai_server import FakeOpenAIServer  # noqa: E402


def summary(name: str, latencies: list[float]) -> str:
    latencies = sorted(latencies)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    return (f"{name}: Stop -> upstream disconnect over {len(latencies)} rounds: p50 {statistics.median(latencies):.1f} ms, "
            f"p95 {p95:.1f} ms, max {latencies[-1]:.1f} ms")


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():  # bounded: a condition of the app or the fake
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within 30 s")
        time.sleep(0.005)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    tokens = [f" w{i}" for i in range(400)]
    defaults = ("fake", "", 1.0, 1.0, 0, "", 0, 0, -1)  # model, system prompt, the neutral parameters

    with FakeOpenAIServer(api_key="sk-bench") as fake:
        entry = {"provider": "openai", "name": "fake", "base_url": fake.base_url, "api_key": "sk-bench",
                 "max_retries": 0}
        app = ChatApp(build_config({"models": [entry], "server": {"port": free_port()},
                                    "history": {"mode": "shared", "data_dir": tempfile.mkdtemp()}}, env={}))
        app.build()
        _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
        client, writer, other = (Client(url, verbose=False) for _ in range(3))
        results: dict[str, list[float]] = {"/chat, mid-reply": [], "page, second tab, mid-reply": [],
                                           "page, second tab, before the first token": []}
        try:
            for _ in range(args.rounds):
                fake.reset_events()
                fake.enqueue(*tokens, delay=0.02)
                job = client.submit("go", api_name="/chat")
                wait_for(job.outputs, "text on /chat")
                stopped_at = time.monotonic()
                job.cancel()
                if not fake.disconnected.wait(timeout=10):
                    raise SystemExit("the upstream never saw /chat's client go away")
                results["/chat, mid-reply"].append((fake.disconnected_at - stopped_at) * 1000)
                for case, first_delay in (("page, second tab, mid-reply", 0.0),
                                          ("page, second tab, before the first token", 30.0)):
                    fake.reset_events()
                    fake.enqueue(*tokens, delay=0.02, first_delay=first_delay)
                    writer.predict("fake", "", api_name="/new_chat")
                    writer.predict({"text": "go", "files": []}, "fake", "", "", api_name="/add_message")
                    job = writer.submit(*defaults, api_name="/respond")
                    wait_for(lambda: len(fake.requests) and (first_delay or job.outputs()), "the reply under way")
                    listed = other.predict("", api_name="/search")["choices"]
                    other.predict(listed[0][1], "", api_name="/open")  # the second tab opens it
                    stopped_at = time.monotonic()
                    other.predict("fake", "", api_name="/stop")
                    if not fake.disconnected.wait(timeout=10):
                        raise SystemExit(f"{case}: the upstream never saw the app go away")
                    results[case].append((fake.disconnected_at - stopped_at) * 1000)
                    job.result(timeout=10)
        finally:
            for c in (client, writer, other):
                c.close()
            app.demo.close()
    for name, latencies in results.items():
        print(summary(name, latencies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
