"""The app CPU one image adds to a message: N messages with a photo against N without, sent
through the app's real HTTP surface (gradio_client: ``/add_message`` then ``/respond``, as the page
does), to a fake OpenAI upstream that answers at once.

    .venv/bin/python bench/bench_image_message.py [--messages 20] [--megapixels 12]

The photo is a JPEG of ``--megapixels`` (noise, so that it does not compress to nothing), made
once. The app's CPU (utime + stime of its process, ``/proc``) is read around each series; the
difference of the means is what one image costs: receiving the upload, checking it (decoded in
full), keeping it by its hash, then for the request scaling it to OpenAI's limit and encoding it
as a data URL. The client's upload time is not the app's and is not counted.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.procs import child_env, cpu_seconds, free_port, stop_process, terminated, wait_ready  # noqa: E402
from tests.fakes.openai_server import FakeOpenAIServer, Script  # noqa: E402

HOST = "127.0.0.1"
NEUTRAL = (1.0, 1.0, 0, "", 0, 0, -1)


def photo(path: Path, megapixels: float) -> Path:
    import numpy as np
    from PIL import Image

    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    noise = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, "JPEG", quality=85)
    return path



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20, help="messages in each series (default 20)")
    parser.add_argument("--megapixels", type=float, default=12.0, help="the photo's size (default 12)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, terminated)
    from gradio_client import Client, handle_file

    tmp = Path(tempfile.mkdtemp(prefix="bench-image-"))
    image = photo(tmp / "photo.jpg", args.megapixels)
    print(f"# ChuanhuStyleChat: the app CPU of one image in a message ({args.megapixels:g} MP JPEG, "
          f"{image.stat().st_size / 1e6:.1f} MB), {args.messages} messages a series")
    print(f"# Python {platform.python_version()}, gradio {version('gradio')}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}", flush=True)
    app = client = None
    try:
        with FakeOpenAIServer(default_script=Script(tokens=["Fine."])) as fake:
            port = free_port()
            config = {"server": {"host": HOST, "port": port},
                      "history": {"mode": "shared", "data_dir": str(tmp / "data")},
                      "models": [{"provider": "openai", "name": "fake", "model": "gpt-4o", "base_url": fake.base_url,
                                  "api_key": "sk-bench-0000", "max_retries": 0, "vision": True}]}
            (tmp / "config.yaml").write_text(yaml.safe_dump(config))
            log = tmp / "app.log"
            with open(log, "wb") as out:
                app = subprocess.Popen([sys.executable, str(ROOT / "ChuanhuStyleChat.py"), "--config",
                                        str(tmp / "config.yaml")], cwd=tmp, env=child_env(), stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            wait_ready(f"http://{HOST}:{port}/config", app, log, 90)
            client = Client(f"http://{HOST}:{port}/", verbose=False)

            def series(with_image: bool) -> float:
                total = 0.0
                for i in range(args.messages):
                    client.predict("fake", "", api_name="/new_chat")
                    files = [handle_file(str(image))] if with_image else []
                    # The upload itself (the client sending 4 MB to Gradio's /upload) happens in predict;
                    # the app's share of it is counted, as it is work the app does for the image.
                    before = cpu_seconds(app.pid)
                    client.predict({"text": f"Question {i}", "files": files}, "fake", "", "", api_name="/add_message")
                    client.predict("fake", "", *NEUTRAL, api_name="/respond")
                    total += cpu_seconds(app.pid) - before
                return total * 1000 / args.messages

            series(False)  # warm-up: first requests, imports
            plain = series(False)
            pictured = series(True)
            parts = [r for r in fake.requests if isinstance(r.body.get("messages", [{}])[-1].get("content"), list)]
            assert len(parts) == args.messages, f"{len(parts)} requests carried the image"
    finally:
        if client is not None:
            client.close()
        stop_process(app)
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("| message | app CPU per message (mean) |")
    print("|---|---|")
    print(f"| text only | {plain:.1f} ms |")
    print(f"| with one {args.megapixels:g} MP photo | {pictured:.1f} ms |")
    print(f"| the image's share | **{pictured - plain:.1f} ms** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
