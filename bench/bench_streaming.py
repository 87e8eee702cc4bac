"""Streaming benchmark: N concurrent chats through the app vs the raw OpenAI client.

    .venv/bin/python bench/bench_streaming.py [--counts 1,8,32,64,96] [--path both|api|ui] [--full]

It starts two subprocesses on 127.0.0.1: the fake OpenAI server
(``tests/fakes/openai_server.py``: every request gets ``--tokens`` tokens at
``--rate`` tokens/s) and the app (``ChuanhuStyleChat.py`` with a generated
config pointing at it). For each N it runs N chats at once

* ``raw``: the openai ``AsyncOpenAI`` client straight to the fake server (the baseline),
* ``api``: the app's ``/chat`` endpoint through Gradio's queue (``/gradio_api/queue/join`` +
  ``/gradio_api/queue/data`` SSE, as ``gradio_client`` does),
* ``ui``: what the page does: ``add_message`` (``queue=False``: ``POST /gradio_api/run/predict``),
  then ``respond`` through the queue in the same session; the chatbot arrives as diffs,

and prints time to first token, gaps between updates, the app's CPU per 1000 tokens,
bytes per reply and whether the streams kept pace. The load generator is one asyncio
process speaking the protocol with httpx (no gradio_client), so it stays light.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.procs import (  # noqa: E402
    child_env, cpu_seconds, free_port, machine_busy, pct, stop_process, tail, terminated)
from tests.fakes.openai_server import words  # noqa: E402  (the text the fake server sends)

HOST = "127.0.0.1"
API_KEY = "sk-bench-0123456789"
MESSAGE = "Write a long answer about streaming."
CHILDREN: list[subprocess.Popen] = []  # stopped in main() whatever happens


# -- small helpers ---------------------------------------------------------------------------


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def ms(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 1000:.0f}"


def secs(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


# -- results ----------------------------------------------------------------------------------
@dataclass
class Chat:
    """One reply as the client saw it."""

    ok: bool = False
    error: str = ""
    started: float = 0.0
    joined: float = 0.0  # gradio: the queue/join answer arrived
    processing: float = 0.0  # gradio: the process_starts message arrived
    updates: list[float] = field(default_factory=list)  # arrival of each update that changed the reply text
    ended: float = 0.0
    text: str = ""
    bytes: int = 0  # response bodies received for this chat

    @property
    def ttft(self) -> float | None:
        return self.updates[0] - self.started if self.updates else None

    @property
    def duration(self) -> float:
        return self.ended - self.started


@dataclass
class Round:
    path: str
    n: int
    chats: list[Chat]
    wall: float
    app_cpu: float
    fake_cpu: float
    client_cpu: float
    machine_cpu: float  # every process on the machine, these three included
    tokens: int  # tokens delivered (whole tokens of the expected text the clients received)


class Expected:
    """The reply the fake server sends, to check replies and count delivered tokens."""

    def __init__(self, tokens: int, seed: int):
        self.tokens = words(tokens, seed)
        self.text = "".join(self.tokens)
        self.ends: list[int] = []
        total = 0
        for token in self.tokens:
            total += len(token)
            self.ends.append(total)

    def mismatch(self, text: str) -> str:
        at = next((i for i, (a, b) in enumerate(zip(text, self.text)) if a != b), min(len(text), len(self.text)))
        return (f"reply differs from the expected text at char {at} (got {len(text)} chars, expected "
                f"{len(self.text)}): got {text[at - 10:at + 30]!r}, expected {self.text[at - 10:at + 30]!r}")

    def delivered(self, text: str) -> int:
        if text == self.text:
            return len(self.tokens)
        common = 0
        for a, b in zip(text, self.text):
            if a != b:
                break
            common += 1
        return sum(1 for end in self.ends if end <= common)


# -- Gradio's queue protocol (sse_v3), by hand ---------------------------------------------
@dataclass
class AppInfo:
    base: str  # http://127.0.0.1:PORT/gradio_api
    chat_fn: int
    add_fn: int
    respond_fn: int
    trigger_id: int | None
    respond_data: list[Any]  # the page's values for respond's inputs (state: None)
    done_fn: int | None = None  # the page's ``.then()`` after respond (queue=False), if any
    done_data: list[Any] = field(default_factory=list)
    add_data: list[Any] = field(default_factory=list)  # the page's values for add_message's inputs
    load_fn: int | None = None  # the page's load event (on_load): it opens the session, as a browser does
    load_data: list[Any] = field(default_factory=list)


async def discover(client: httpx.AsyncClient, url: str) -> AppInfo:
    """fn indices and default inputs from /config, as the page knows them."""
    config = (await client.get(f"{url}/config")).json()
    components = {c["id"]: c for c in config["components"]}
    deps = {d.get("api_name"): d for d in config["dependencies"]}
    for name in ("chat", "add_message", "respond"):
        if name not in deps:
            raise SystemExit(f"the app has no event with api_name {name!r}: is modules/web/page.py up to date?")
    add, respond = deps["add_message"], deps["respond"]

    def defaults(dep: dict[str, Any]) -> list[Any]:
        return [None if components[cid]["type"] == "state" else components[cid].get("props", {}).get("value")
                for cid in dep["inputs"]]

    trigger = add["targets"][0][0] if add.get("targets") else None
    done = next((d for d in config["dependencies"] if d.get("trigger_after") == respond["id"]), None)
    prefix = config.get("api_prefix", "/gradio_api")
    load = deps.get("on_load")
    return AppInfo(f"{url}{prefix}", deps["chat"]["id"], add["id"], respond["id"], trigger, defaults(respond),
                   done["id"] if done else None, defaults(done) if done else [], defaults(add),
                   load["id"] if load else None, defaults(load) if load else [])


def apply_diff(value: Any, diff: list[list[Any]]) -> Any:
    """Gradio's streaming diff (``gradio.utils.diff``), applied in place."""
    for action, path, item in diff:
        if not path:
            if action == "replace":
                value = item
            elif action == "append":
                value = value + item
            else:
                raise ValueError(f"unsupported root action {action!r}")
            continue
        target = value
        for key in path[:-1]:
            target = target[key]
        key = path[-1]
        if action == "replace":
            target[key] = item
        elif action == "append":
            target[key] += item
        elif action == "add":
            if isinstance(target, list):
                target.insert(int(key), item)
            else:
                target[key] = item
        elif action == "delete":
            del target[int(key) if isinstance(target, list) else key]
        else:
            raise ValueError(f"unknown diff action {action!r}")
    return value


USAGE_FOOTER = re.compile(r"\n\n<sub>[^<]*</sub>$")  # a finished reply's tokens and cost (modules/web/render.py)
ADDED = re.compile(r"(?:\n\n)?<!--chuanhu-->[\s\S]*$")  # what the page adds after a reply's text (render.FOOTER)


def chatbot_reply(messages: Any) -> str:
    """The text of the last assistant message of a chatbot value, without its usage footer."""
    for message in reversed(messages or []):
        if message.get("role") == "assistant" and not message.get("metadata"):
            content = message.get("content")
            if not isinstance(content, str):
                content = "".join(part.get("text", "") for part in content or () if isinstance(part, dict))
            return ADDED.sub("", content)
    return ""


async def open_session(client: httpx.AsyncClient, app: AppInfo) -> str:
    """A page's session, opened by its load event (on_load) as a browser does before the user can
    type; the session hash."""
    session = secrets.token_hex(6)
    r = await client.post(f"{app.base}/run/predict", json={
        "data": app.load_data, "event_data": None, "fn_index": app.load_fn, "trigger_id": None,
        "session_hash": session})
    r.raise_for_status()
    return session


async def gradio_chat(client: httpx.AsyncClient, app: AppInfo, path: str, max_events: int,
                      session: str | None = None, *, light: bool = False, first_text_only: bool = False) -> Chat:
    """One chat by Gradio's queue protocol. ``light``: once the first text has come, the updates
    after it are counted, not decoded (the completion carries the whole value, which is checked):
    a load generator holding many streams then costs little CPU of its own. ``first_text_only``:
    the stream is left at the first text (``ok``, its ``text`` that first text; a page that goes,
    whose reply the app stops if runs.unwatched says so)."""
    chat = Chat(started=time.perf_counter())
    session = session or secrets.token_hex(6)
    try:
        if path == "ui":
            r = await client.post(f"{app.base}/run/predict", json={
                "data": [{"text": MESSAGE, "files": []}, *app.add_data[1:]], "event_data": None, "fn_index": app.add_fn,
                "trigger_id": app.trigger_id, "session_hash": session})
            chat.bytes += len(r.content)
            if r.status_code != 200:
                chat.error = f"add_message HTTP {r.status_code}"
                return chat
            fn, data, trigger = app.respond_fn, app.respond_data, app.trigger_id
        else:
            fn, data, trigger = app.chat_fn, [MESSAGE, "", ""], None
        r = await client.post(f"{app.base}/queue/join", json={
            "data": data, "event_data": None, "fn_index": fn, "trigger_id": trigger, "session_hash": session})
        chat.bytes += len(r.content)
        chat.joined = time.perf_counter()
        if r.status_code != 200:
            chat.error = f"queue/join HTTP {r.status_code}: {r.text[:100]}"
            return chat
        value: Any = None
        first = True
        completed = False
        events = 0
        async with client.stream("GET", f"{app.base}/queue/data", params={"session_hash": session}) as resp:
            if resp.status_code != 200:
                chat.error = f"queue/data HTTP {resp.status_code}"
                return chat
            buf = b""
            async for piece in resp.aiter_raw():
                now = time.perf_counter()
                chat.bytes += len(piece)
                buf += piece
                while (end := buf.find(b"\n\n")) >= 0:
                    event, buf = buf[:end], buf[end + 2:]
                    events += 1
                    if events > max_events:
                        chat.error = "too many events"
                        return chat
                    if not event.startswith(b"data:"):
                        continue
                    if light and chat.updates and b'"process_generating"' in event[:100]:
                        continue  # (counted, not decoded)
                    msg = orjson.loads(event[5:])
                    kind = msg.get("msg")
                    if kind in ("process_generating", "process_completed"):
                        if not msg.get("success"):
                            chat.error = f"{kind}: {str(msg.get('output'))[:100]}"
                            return chat
                        out = msg["output"]["data"][0]
                        if kind == "process_generating" and not first:
                            value = apply_diff(value, out)
                        else:  # the first chunk of a run, and the completion, carry whole values
                            value = out
                        first = False
                        text = value if path == "api" else chatbot_reply(value)
                        if text and text != chat.text:
                            chat.text = text
                            chat.updates.append(now)
                            if first_text_only:
                                chat.ok, chat.ended = True, now
                                return chat
                        if kind == "process_completed":
                            completed = True
                            chat.ended = now
                    elif kind == "process_starts":
                        chat.processing = now
                    elif kind == "close_stream":
                        chat.ok = completed
                        if not completed:
                            chat.error = "stream closed before completion"
                        elif path == "ui" and app.done_fn is not None:  # the page's .then() after the reply
                            r = await client.post(f"{app.base}/run/predict", json={
                                "data": app.done_data, "event_data": None, "fn_index": app.done_fn,
                                "trigger_id": app.trigger_id, "session_hash": session})
                            chat.bytes += len(r.content)
                            if r.status_code != 200:
                                chat.ok, chat.error = False, f"after-reply event HTTP {r.status_code}"
                        return chat
                    elif kind == "unexpected_error":
                        chat.error = f"unexpected_error: {msg.get('message')}"
                        return chat
        chat.ok = completed
        if not completed:
            chat.error = "stream ended before completion"
        return chat
    except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as exc:
        chat.error = f"{type(exc).__name__}: {exc}"
        return chat
    finally:
        if not chat.ended:
            chat.ended = time.perf_counter()


# -- the baseline: the openai SDK straight to the fake server -----------------------------
class _CountingStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, counter: list[int]):
        self.inner, self.counter = inner, counter

    async def __aiter__(self):
        async for piece in self.inner:
            self.counter[0] += len(piece)
            yield piece

    async def aclose(self) -> None:
        await self.inner.aclose()


class CountingTransport(httpx.AsyncBaseTransport):
    """Counts response body bytes (as received, before decoding)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200))
        self.counter = [0]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        response.stream = _CountingStream(response.stream, self.counter)  # type: ignore[arg-type]
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def raw_chat(client: openai.AsyncOpenAI) -> Chat:
    chat = Chat(started=time.perf_counter())
    try:
        stream = await client.chat.completions.create(
            model="fake-model", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": MESSAGE}])
        parts: list[str] = []
        async with stream:  # closes the connection on a timeout too
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                    chat.updates.append(time.perf_counter())
        chat.text = "".join(parts)
        chat.ok = True
    except openai.OpenAIError as exc:
        chat.error = f"{type(exc).__name__}: {exc}"
    chat.ended = time.perf_counter()
    return chat


# -- subprocesses -------------------------------------------------------------------------


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, **kwargs)
    CHILDREN.append(proc)
    return proc


async def wait_ready(client: httpx.AsyncClient, url: str, proc: subprocess.Popen, log: Path, timeout: float,
                     what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}:\n{tail(log)}")
        try:
            if (await client.get(url, timeout=2)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit(f"{what} not ready after {timeout:.0f} s:\n{tail(log)}")


# -- the benchmark ------------------------------------------------------------------------
async def run_round(path: str, n: int, *, app: AppInfo | None, gclient: httpx.AsyncClient | None,
                    raw: tuple[openai.AsyncOpenAI, CountingTransport] | None, app_pid: int, fake_pid: int,
                    expected: Expected, timeout: float, ramp: float = 0.0, cold: bool = False) -> Round:
    """N chats; with ``ramp`` > 0 their starts are spread evenly over that many seconds."""
    max_events = len(expected.tokens) * 4 + 200
    if path == "raw":
        assert raw is not None
        oai, transport = raw
        bytes_before = transport.counter[0]
        make = lambda i: raw_chat(oai)  # noqa: E731
    else:
        assert app is not None and gclient is not None
        sessions: list[str | None] = [None] * n
        if path == "ui" and app.load_fn is not None and not cold:  # the pages are open before they send
            sessions = list(await asyncio.gather(*(open_session(gclient, app) for _ in range(n))))
        make = lambda i: gradio_chat(gclient, app, path, max_events, sessions[i])  # noqa: E731

    async def bounded(i: int) -> Chat:
        if ramp > 0:
            await asyncio.sleep(ramp * i / n)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                return await make(i)
        except TimeoutError:
            return Chat(error=f"timeout after {timeout:.0f} s", started=started, ended=time.perf_counter())

    app_cpu, fake_cpu, client_cpu = cpu_seconds(app_pid), cpu_seconds(fake_pid), time.process_time()
    machine = machine_busy()
    t0 = time.perf_counter()
    chats = await asyncio.gather(*(bounded(i) for i in range(n)))
    wall = time.perf_counter() - t0
    app_cpu = cpu_seconds(app_pid) - app_cpu
    fake_cpu = cpu_seconds(fake_pid) - fake_cpu
    client_cpu = time.process_time() - client_cpu
    machine = machine_busy() - machine
    if path == "raw":
        total = transport.counter[0] - bytes_before
        for chat in chats:
            chat.bytes = total // n
    for chat in chats:
        if chat.ok and chat.text != expected.text:
            chat.ok, chat.error = False, expected.mismatch(chat.text)
    tokens = sum(expected.delivered(c.text) for c in chats)
    return Round(path, n, list(chats), wall, app_cpu, fake_cpu, client_cpu, machine, tokens)


def summarize(r: Round, ideal: float, text_len: int, tolerance: float, idle: float) -> dict[str, Any]:
    """``idle``: the app's CPU seconds per second with nothing to do (subtracted for ``cpu_net_per_1k``)."""
    ok = [c for c in r.chats if c.ok]
    ttfts = [c.ttft for c in r.chats if c.ttft is not None]
    gaps = [b - a for c in ok for a, b in zip(c.updates, c.updates[1:])]
    durations = [c.duration for c in ok]
    joins = [c.joined - c.started for c in r.chats if c.joined]
    starts = [c.processing - c.started for c in r.chats if c.processing]
    firsts = [c.updates[0] - c.processing for c in r.chats if c.processing and c.updates]
    dur_max = max(durations) if durations else math.nan
    return {
        "path": r.path, "n": r.n, "ok": len(ok),
        "errors": sorted({c.error for c in r.chats if not c.ok}),
        "ttft_p50": pct(ttfts, 50), "ttft_p95": pct(ttfts, 95),
        "gap_p50": pct(gaps, 50), "gap_p95": pct(gaps, 95), "gap_max": max(gaps) if gaps else math.nan,
        "updates": sum(len(c.updates) for c in ok) / len(ok) if ok else math.nan,
        "cpu_per_1k": (r.app_cpu / (r.tokens / 1000)) if r.tokens and r.path != "raw" else math.nan,
        "cpu_net_per_1k": (max(0.0, r.app_cpu - idle * r.wall) / (r.tokens / 1000))
        if r.tokens and r.path != "raw" else math.nan,
        "bytes": sum(c.bytes for c in r.chats) / len(r.chats) if r.chats else math.nan,
        "bytes_ratio": (sum(c.bytes for c in r.chats) / len(r.chats)) / text_len if r.chats else math.nan,
        "dur_p50": pct(durations, 50), "dur_max": dur_max,
        "paced": bool(ok) and len(ok) == r.n and dur_max <= ideal * (1 + tolerance),
        "join_p50": pct(joins, 50), "join_p95": pct(joins, 95),
        "start_p50": pct(starts, 50), "start_p95": pct(starts, 95),
        "first_p50": pct(firsts, 50), "first_p95": pct(firsts, 95),
        "wall": r.wall, "tokens": r.tokens,
        "app_cpu_pct": 100 * r.app_cpu / r.wall, "fake_cpu_pct": 100 * r.fake_cpu / r.wall,
        "client_cpu_pct": 100 * r.client_cpu / r.wall,
        "other_cpu_pct": max(0.0, 100 * (r.machine_cpu - r.app_cpu - r.fake_cpu - r.client_cpu) / r.wall),
    }


def print_tables(rows: list[dict[str, Any]], ideal: float) -> None:
    raw = {row["n"]: row for row in rows if row["path"] == "raw"}
    head = (f"{'path':<4} {'N':>3} {'ok':>7} | {'TTFT p50':>8} {'p95':>5} {'Δp50':>5} {'Δp95':>5} | "
            f"{'gap p50':>7} {'p95':>5} {'max':>5} {'upd':>4} | {'CPU s/1k':>8} {'net':>5} | {'B/reply':>8} {'×text':>5} | "
            f"{'dur p50':>7} {'max':>6} {'paced':>5}")
    print(head)
    print(f"{'':<4} {'':>3} {'':>7} | {'ms':>8} {'ms':>5} {'ms':>5} {'ms':>5} | {'ms':>7} {'ms':>5} {'ms':>5} "
          f"{'':>4} | {'tok':>8} {'':>5} | {'':>8} {'':>5} | {'s':>7} {'s':>6} {'':>5}")
    print("-" * len(head))
    last_n = None
    for row in rows:
        if last_n is not None and row["n"] != last_n:
            print()
        last_n = row["n"]
        base = raw.get(row["n"])
        d50 = d95 = "-"
        if base is not None and row["path"] != "raw":
            d50 = ms(row["ttft_p50"] - base["ttft_p50"])
            d95 = ms(row["ttft_p95"] - base["ttft_p95"])
        cpu = "-" if math.isnan(row["cpu_per_1k"]) else f"{row['cpu_per_1k']:.3f}"
        net = "-" if math.isnan(row["cpu_net_per_1k"]) else f"{row['cpu_net_per_1k']:.3f}"
        print(f"{row['path']:<4} {row['n']:>3} {str(row['ok']) + '/' + str(row['n']):>7} | "
              f"{ms(row['ttft_p50']):>8} {ms(row['ttft_p95']):>5} {d50:>5} {d95:>5} | "
              f"{ms(row['gap_p50']):>7} {ms(row['gap_p95']):>5} {ms(row['gap_max']):>5} {row['updates']:>4.0f} | "
              f"{cpu:>8} {net:>5} | {row['bytes']:>8.0f} {row['bytes_ratio']:>5.1f} | "
              f"{secs(row['dur_p50']):>7} {secs(row['dur_max']):>6} {'yes' if row['paced'] else 'NO':>5}")
    print()
    print(f"CPU during each round (% of one core; {os.cpu_count()} cores; other: every other process on the machine), "
          "and where the app's first token went (ms, p50/p95):")
    print(f"{'path':<4} {'N':>3} | {'wall s':>6} | {'app':>5} {'fake':>5} {'client':>6} {'other':>5} | "
          f"{'joined':>11} {'started':>11} {'start→1st':>11}")
    for row in rows:
        split = ["-" if math.isnan(row[f"{k}_p50"]) else f"{ms(row[f'{k}_p50'])}/{ms(row[f'{k}_p95'])}"
                 for k in ("join", "start", "first")]
        print(f"{row['path']:<4} {row['n']:>3} | {row['wall']:>6.2f} | {row['app_cpu_pct']:>5.0f} "
              f"{row['fake_cpu_pct']:>5.0f} {row['client_cpu_pct']:>6.0f} {row['other_cpu_pct']:>5.0f} | "
              f"{split[0]:>11} {split[1]:>11} {split[2]:>11}")
    busy = [row for row in rows if row["other_cpu_pct"] > 25]
    if busy:
        worst = max(busy, key=lambda row: row["other_cpu_pct"])
        print(f"\nWARNING: other processes used the CPUs during {len(busy)} of {len(rows)} rounds (up to "
              f"{worst['other_cpu_pct']:.0f}% of a core, {worst['path']} N={worst['n']}): those figures are noisy.")
    errors = [(row["path"], row["n"], e) for row in rows for e in row["errors"]]
    if errors:
        print("\nErrors:")
        for path, n, error in errors[:20]:
            print(f"  {path} N={n}: {error}")


async def bench(args: argparse.Namespace, counts: list[int], paths: list[str]) -> list[dict[str, Any]]:
    expected = Expected(args.tokens, args.seed)
    ideal = args.tokens / args.rate
    timeout = args.timeout or ideal * 3 + 30
    tmp = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    fake_port, app_port = free_port(), free_port()
    fake_log, app_log = tmp / "fake.log", tmp / "app.log"
    config = {
        "server": {"host": HOST, "port": app_port, "concurrency": args.concurrency},
        "ui": {"update_interval_ms": args.interval_ms},
        # On localhost every page is the desktop's one owner: let each of the N chats stream.
        "runs": {"max_per_owner": 1000},
        "models": [{"provider": "openai", "name": "fake", "model": "fake-model",
                    "base_url": f"http://{HOST}:{fake_port}/v1", "api_key": API_KEY, "max_retries": 0}],
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    fake = app_proc = None
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    http_timeout = httpx.Timeout(30.0, read=60.0)
    rows: list[dict[str, Any]] = []
    try:
        with open(fake_log, "wb") as flog:
            fake = spawn(
                [sys.executable, "-m", "tests.fakes.openai_server", "--port", str(fake_port), "--tokens",
                 str(args.tokens), "--rate", str(args.rate), "--usage", "--api-key", API_KEY, "--seed", str(args.seed)],
                cwd=ROOT, env=child_env(), stdout=flog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with open(app_log, "wb") as alog:
            app_proc = spawn(
                [sys.executable, str(Path(args.app_script).resolve()), "--config", str(tmp / "config.yaml")],
                cwd=tmp, env=child_env(), stdout=alog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        transport = CountingTransport()
        oai = openai.AsyncOpenAI(base_url=f"http://{HOST}:{fake_port}/v1", api_key=API_KEY, max_retries=0,
                                 http_client=httpx.AsyncClient(transport=transport, timeout=http_timeout,
                                                               trust_env=False))
        async with httpx.AsyncClient(limits=limits, timeout=http_timeout, trust_env=False) as gclient, oai:
            t = time.monotonic()
            await wait_ready(gclient, f"http://{HOST}:{fake_port}/v1/models", fake, fake_log, 30, "fake server")
            await wait_ready(gclient, f"http://{HOST}:{app_port}/config", app_proc, app_log, args.startup_timeout,
                             "the app")
            app = await discover(gclient, f"http://{HOST}:{app_port}")
            print(f"# app ready in {time.monotonic() - t:.1f} s (pid {app_proc.pid}); fake server pid {fake.pid}; "
                  f"fn: chat={app.chat_fn} add_message={app.add_fn} respond={app.respond_fn} then={app.done_fn}",
                  flush=True)

            idle = cpu_seconds(app_proc.pid)
            await asyncio.sleep(2.0)
            idle = (cpu_seconds(app_proc.pid) - idle) / 2.0
            idle_pct = 100 * idle
            print(f"# app idle CPU: {idle_pct:.1f}% of a core", flush=True)

            # Warm up every path once (first-call imports, connection pools), in parallel.
            warm = await asyncio.gather(*(run_round(p, 1, app=app, gclient=gclient, raw=(oai, transport),
                                                    app_pid=app_proc.pid, fake_pid=fake.pid, expected=expected,
                                                    timeout=timeout) for p in ["raw", *paths]))
            for r in warm:
                if not all(c.ok for c in r.chats):
                    raise SystemExit(f"warm-up of {r.path} failed: {r.chats[0].error}\n{tail(app_log)}")
            print(f"# warm-up done ({max(r.wall for r in warm):.1f} s)", flush=True)

            for n in counts:
                for path in ["raw", *paths]:
                    await asyncio.sleep(args.pause)
                    r = await run_round(path, n, app=app, gclient=gclient, raw=(oai, transport),
                                        app_pid=app_proc.pid, fake_pid=fake.pid, expected=expected,
                                        timeout=timeout, ramp=args.ramp, cold=args.cold)
                    row = summarize(r, ideal, len(expected.text.encode()), args.pace_tolerance, idle)
                    rows.append(row)
                    print(f"# {path:<3} N={n:<3} ok {row['ok']}/{n}  TTFT p50 {ms(row['ttft_p50'])} ms  "
                          f"dur max {secs(row['dur_max'])} s  app CPU {row['app_cpu_pct']:.0f}%  "
                          f"wall {r.wall:.1f} s", flush=True)
                    if app_proc.poll() is not None:
                        raise SystemExit(f"the app exited ({app_proc.returncode}):\n{tail(app_log)}")
    finally:
        stop_process(app_proc)
        stop_process(fake)
        if args.keep_logs:
            print(f"# logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,8,32,64,96",
                        help="concurrent chats per round, comma-separated (default 1,8,32,64,96)")
    parser.add_argument("--cold", action="store_true",
                        help="ui: each send opens its page's session itself (no load event first, as before)")
    parser.add_argument("--full", action="store_true", help="also 128 concurrent chats (the default concurrency limit)")
    parser.add_argument("--path", choices=["api", "ui", "both"], default="both", help="app paths to measure")
    parser.add_argument("--tokens", type=int, default=500, help="tokens per reply (default 500)")
    parser.add_argument("--rate", type=float, default=50.0, help="upstream tokens per second (default 50)")
    parser.add_argument("--interval-ms", type=int, default=40, help="the app's ui.update_interval_ms (default 40)")
    parser.add_argument("--concurrency", type=int, default=128, help="the app's server.concurrency (default 128)")
    parser.add_argument("--ramp", type=float, default=0.0,
                        help="spread each round's chat starts evenly over this many seconds (default 0: all at once)")
    parser.add_argument("--pace-tolerance", type=float, default=0.05,
                        help="a round kept pace if its slowest reply took at most ideal × (1 + this) (default 0.05)")
    parser.add_argument("--timeout", type=float, default=0.0, help="seconds per chat (default 3 × ideal + 30)")
    parser.add_argument("--startup-timeout", type=float, default=90.0, help="seconds for the app to start")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of rest before each round")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fake server's text")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON (e.g. bench/results/x.json)")
    parser.add_argument("--app-script", default=str(ROOT / "ChuanhuStyleChat.py"),
                        help="the app's launcher (same CLI as ChuanhuStyleChat.py), e.g. a variant for an experiment")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with config and logs")
    args = parser.parse_args(argv)
    try:
        counts = [int(c) for c in args.counts.split(",") if c.strip()]
    except ValueError:
        parser.error("--counts: comma-separated integers")
    if args.full and 128 not in counts:
        counts.append(128)
    if not counts or min(counts) < 1 or max(counts) > 1000:
        parser.error("--counts: between 1 and 1000")
    if args.tokens < 1 or args.rate <= 0:
        parser.error("--tokens and --rate must be positive")
    paths = ["api", "ui"] if args.path == "both" else [args.path]
    ideal = args.tokens / args.rate
    print(f"# ChuanhuStyleChat streaming benchmark: {args.tokens} tokens at {args.rate:g}/s (ideal {ideal:.1f} s), "
          f"update interval {args.interval_ms} ms, counts {counts}, paths raw+{'+'.join(paths)}"
          + (f", starts spread over {args.ramp:g} s" if args.ramp else ", all chats of a round start at once"))
    print(f"# Python {platform.python_version()}, gradio {version('gradio')}, openai {openai.__version__}, "
          f"httpx {httpx.__version__}, {os.cpu_count()} CPUs", flush=True)
    print(f"# load average at start: {load_average()}", flush=True)
    signal.signal(signal.SIGTERM, terminated)
    try:
        rows = asyncio.run(bench(args, counts, paths))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for proc in CHILDREN:
            stop_process(proc)
    print()
    print_tables(rows, ideal)
    print()
    print("TTFT: request start to the first update with reply text (ui: from the add_message POST). "
          "Δ: minus the raw client's.\ngap: between updates that changed the reply text; upd: such updates per reply. "
          "CPU s/1k tok: app process utime+stime per 1000 tokens delivered;\nnet: the same less the app's idle CPU over the round. B/reply: response body bytes "
          "per reply (SSE included, headers not); ×text: over the reply's UTF-8 length. "
          f"paced: every reply done within {ideal:.1f} s × {1 + args.pace_tolerance:g}.\n"
          "joined: the queue/join answer; started: the process_starts message (both from request start); "
          "start→1st: from process_starts to the first reply text.")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))
        print(f"# results written to {out}")
    return 0 if all(row["ok"] == row["n"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
