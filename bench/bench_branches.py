"""Branch benchmark: the app's CPU to open a conversation of 200 messages in 5 branches, and to
switch between its branches.

    .venv/bin/python bench/bench_branches.py [--rounds 50] [--target-ms 50]

A history file is written beforehand (the store's own ``import_record``): a first branch of 40
rounds (a question and a ~600-character Markdown answer each), and four more branches made by
editing the questions of rounds 8, 16, 24 and 32, each going on for 15 rounds: 200 messages.
The app (``ChuanhuStyleChat.py``, a subprocess, history shared) is driven through its real
HTTP surface with ``gradio_client``, as the page does: ``/open`` the conversation, then
``/act`` "v:<id>:±1" (the "‹ ›" links under a question) to switch its branch, back and forth.

The app's CPU (utime + stime of its process, ``/proc``) is read around ``--rounds`` calls of each
kind; per call it is their mean (the clock ticks every 10 ms: one call alone cannot be timed).
Also shown: the wall time per call (p50/p95, client included), and the render alone (the
chatbot's messages from the session's tree, in this process). Exit status 1 when either mean
exceeds ``--target-ms``.
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
import time
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.procs import child_env, cpu_seconds, free_port, pct, stop_process, terminated, wait_ready  # noqa: E402
from modules.history.conversation import Conversation  # noqa: E402
from modules.history.ownership import SHARED_OWNER  # noqa: E402
from modules.history.records import ConversationRecord, MessageRecord, new_message_id  # noqa: E402
from modules.history.store import FILENAME, SQLiteStore  # noqa: E402
from modules.i18n import Translator  # noqa: E402
from modules.web import render  # noqa: E402

HOST = "127.0.0.1"
OWNER = SHARED_OWNER  # history.mode shared: every session's owner
ANSWER = ("Here is a **clear** answer with a list:\n\n- first point, explained in a sentence or two\n"
          "- second point, with `code` and a [link](https://example.com)\n\n```python\nprint('hello')\n```\n\n")
BASE_ROUNDS, FORK_AT, FORK_ROUNDS = 40, (8, 16, 24, 32), 15


def build(conversation_id: str) -> tuple[ConversationRecord, list[tuple[str, str]]]:
    """The conversation, and where its branches part: (original question id, edited question id)."""
    messages: list[MessageRecord] = []
    clock = [time.time() - 86400.0]

    def add(parent: str | None, role: str, content: str) -> MessageRecord:
        clock[0] += 1.0
        message = MessageRecord(id=new_message_id(), parent=parent, role=role, content=content,  # type: ignore[arg-type]
                                status="done", model="fake", created_at=clock[0], finished_at=clock[0])
        if role == "assistant":
            message.prompt_tokens, message.completion_tokens, message.tokens_exact = 900, 150, True
        messages.append(message)
        return message

    def rounds(parent: str | None, count: int, label: str) -> list[MessageRecord]:
        made = []
        for n in range(count):
            question = add(parent, "user", f"Question {label}.{n}: tell me more about point {n}?")
            answer = add(question.id, "assistant", f"Answer {label}.{n}. " + ANSWER * 2)
            made += [question, answer]
            parent = answer.id
        return made

    base = rounds(None, BASE_ROUNDS, "main")
    forks = []
    for k, at in enumerate(FORK_AT):
        parent = base[2 * at].parent  # the question of round ``at``: an edit is its sibling
        branch = rounds(parent, FORK_ROUNDS, f"edit{k}")
        forks.append((base[2 * at].id, branch[0].id))
    record = ConversationRecord(id=conversation_id, owner=OWNER, title="Branch benchmark", model="fake",
                                created_at=clock[0], updated_at=clock[0], messages=messages, leaf=base[-1].id)
    return record, forks



def measure(pid: int, calls: int, call) -> tuple[float, list[float]]:
    """(the app's mean CPU ms per call, each call's wall ms)."""
    walls = []
    before = cpu_seconds(pid)
    for i in range(calls):
        start = time.perf_counter()
        call(i)
        walls.append((time.perf_counter() - start) * 1000)
    return (cpu_seconds(pid) - before) * 1000 / calls, walls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="calls of each kind (default 50)")
    parser.add_argument("--target-ms", type=float, default=50.0, help="app CPU per call, the target (default 50)")
    parser.add_argument("--startup-timeout", type=float, default=90.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, terminated)
    from gradio_client import Client

    tmp = Path(tempfile.mkdtemp(prefix="bench-branches-"))
    record, forks = build("bench-branches")
    print(f"# ChuanhuStyleChat branch benchmark: {len(record.messages)} messages, "
          f"{1 + len(FORK_AT)} branches, {args.rounds} calls of each kind")
    print(f"# Python {platform.python_version()}, gradio {version('gradio')}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}", flush=True)
    (tmp / "data").mkdir()
    store = SQLiteStore(tmp / "data" / FILENAME)
    store.import_record(record)
    loaded = store.load(OWNER, record.id)
    store.close()
    assert loaded is not None and len(loaded.messages) == len(record.messages)

    # The render alone, in this process: the chatbot of the branch shown (the first, 80 messages).
    t = Translator("en_US")
    conversation = Conversation.from_record(loaded)
    start = time.process_time()
    for _ in range(args.rounds):
        render.chatbot(conversation, t, "en_US")
    render_ms = (time.process_time() - start) * 1000 / args.rounds

    port = free_port()
    config = {"server": {"host": HOST, "port": port},
              "history": {"mode": "shared", "data_dir": str(tmp / "data")},
              "models": [{"provider": "openai", "name": "fake", "model": "fake", "max_retries": 0,
                          "base_url": f"http://{HOST}:{free_port()}/v1", "api_key": "sk-unused-0000"}]}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    log = tmp / "app.log"
    app = None
    client = None
    try:
        with open(log, "wb") as out:
            app = subprocess.Popen([sys.executable, str(ROOT / "ChuanhuStyleChat.py"), "--config",
                                    str(tmp / "config.yaml")], cwd=tmp, env=child_env(), stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_ready(f"http://{HOST}:{port}/config", app, log, args.startup_timeout)
        client = Client(f"http://{HOST}:{port}/", verbose=False)
        client.predict("", api_name="/search")
        shown = client.predict(record.id, "", api_name="/open")
        chatbot = shown[0]
        assert len(chatbot) == 2 * BASE_ROUNDS, f"opened {len(chatbot)} messages"

        def open_it(_: int) -> None:
            client.predict(record.id, "", api_name="/open")

        open_cpu, open_walls = measure(app.pid, args.rounds, open_it)
        original, edited = forks[1]  # round 16: the question as first asked, and its edit

        def switch(i: int) -> None:
            # "‹ ›" under the question of round 16: to the edit's branch, and back.
            action = f"v:{original}:1" if i % 2 == 0 else f"v:{edited}:-1"
            result = client.predict(f"{action}|{i}", "fake", "", api_name="/act")
            assert result[0], "the switch showed nothing"

        switch_cpu, switch_walls = measure(app.pid, args.rounds, switch)
    finally:
        if client is not None:
            client.close()
        stop_process(app)
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("| what | app CPU per call (mean) | wall p50 | wall p95 |")
    print("|---|---|---|---|")
    print(f"| open the conversation (80 messages shown) | {open_cpu:.1f} ms | {pct(open_walls, 50):.1f} ms | "
          f"{pct(open_walls, 95):.1f} ms |")
    print(f"| switch a branch (‹ ›) | {switch_cpu:.1f} ms | {pct(switch_walls, 50):.1f} ms | "
          f"{pct(switch_walls, 95):.1f} ms |")
    print(f"| render alone (in process) | {render_ms:.1f} ms | | |")
    good = open_cpu <= args.target_ms and switch_cpu <= args.target_ms
    print(f"\ntarget: ≤ {args.target_ms:g} ms of app CPU each: {'met' if good else 'MISSED'}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
