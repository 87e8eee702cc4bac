"""What a stopped app leaves on disk: is history.sqlite3 alone a full copy of the history?

Starts ``ChuanhuStyleChat.py`` as a process (a fake OpenAI upstream, a fresh data folder),
has 30 conversations through gradio_client (the page's own endpoints), stops it with
SIGTERM as a service manager would, and prints the exit code, the sizes of history.sqlite3
and its -wal/-shm, and how many conversations history.sqlite3 holds when copied alone
(what a user does to back it up).

    .venv/bin/python bench/bench_durability.py     # about half a minute
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402
from gradio_client import Client  # noqa: E402

from tests.conftest import free_port  # noqa: E402
from tests.fakes.openai_server import FakeOpenAIServer  # noqa: E402

CONVERSATIONS = 30


def main() -> int:
    with FakeOpenAIServer(api_key="sk-bench") as fake, tempfile.TemporaryDirectory() as folder:
        port, data = free_port(), Path(folder) / "data"
        config = Path(folder) / "config.yaml"
        config.write_text(yaml.safe_dump({
            "models": [{"provider": "openai", "name": "fake", "model": "m", "base_url": fake.base_url,
                        "api_key": "sk-bench", "max_retries": 0}],
            "server": {"port": port}, "history": {"data_dir": str(data), "mode": "shared"}}))
        app = subprocess.Popen([sys.executable, str(ROOT / "ChuanhuStyleChat.py"), "--config", str(config)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/config", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or app.poll() is not None:
                    print("the app did not start")
                    return 1
                time.sleep(0.2)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for i in range(CONVERSATIONS):
            client.predict({"text": f"Question {i}: " + "words " * 300, "files": []}, "fake", "You are terse.", "",
                           api_name="/add_message")
            client.predict("fake", "You are terse.", 1.0, 1.0, 0, "", 0, 0, -1, api_name="/respond")
            client.predict("fake", "", api_name="/new_chat")
        client.close()
        app.send_signal(signal.SIGTERM)
        code = app.wait(60)
        sizes = {f.name: f.stat().st_size for f in sorted(data.glob("history.sqlite3*"))}
        alone = Path(folder) / "alone.sqlite3"
        shutil.copy(data / "history.sqlite3", alone)
        try:
            held = f"{sqlite3.connect(alone).execute('SELECT count(*) FROM conversations').fetchone()[0]}"
        except sqlite3.Error as exc:
            held = f"none ({exc})"
        print(f"exit code {code}; files: {', '.join(f'{k} {v:,} B' for k, v in sizes.items())}; "
              f"history.sqlite3 copied alone holds {held} of {CONVERSATIONS} conversations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
