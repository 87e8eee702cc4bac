"""Reload benchmark: how soon a reloaded page shows its streaming reply again, and whether it is whole.

    .venv/bin/python bench/bench_reload.py [--pages 8] [--tokens 500] [--rate 50] [--seed 0]

The fake OpenAI server (``tests/fakes/openai_server.py``, in this process, on a thread) answers
every request with ``--tokens`` tokens at ``--rate`` tokens/s on a fixed schedule, and counts
the requests. The app (``ChuanhuStyleChat.py``, a subprocess) runs with a generated config:
history shared, ``runs.max_per_owner`` at least N (on localhost every page is one owner).
N pages in headless Chromium, one browser context each, send a message at the same moment;
each reloads once at a random point of its reply (seeded), then follows it to the end.

Every page records, from before Gradio's scripts run, each distinct content of its last bot
message (its ``aria-label``: the message's raw text) with ``performance.now()``. Per page:

* resume: the reloaded document's load event (``loadEventEnd``) to the first chatbot update
  showing reply text (the reply so far, reopened by the page's load event); also from
  ``DOMContentLoaded``, and from the ``page.reload()`` call (wall clock, page load included);
* live: the load event to the first update that grew the text (the run followed);
* lost / extra: characters of the fake's exact text missing from the final reply, and
  characters in it that the fake did not send there (repeated ones); both must be 0. Every
  update after the reload must also be a prefix of the fake's text.

Exit status 1 if a page failed, a character was lost or repeated, or the fake saw other than
N generations. The target: resume within 300 ms p50 (``--target-ms``).
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402  (Debian's Chromium, as the page tests use it)
from bench.procs import (  # noqa: E402
    child_env, cpu_seconds, free_port, machine_busy, pct, stop_process, tail, terminated, wait_ready)
from tests.fakes.openai_server import FakeOpenAIServer, Script, words  # noqa: E402

HOST = "127.0.0.1"
API_KEY = "sk-bench-0123456789"
MESSAGE = "Write a long answer about streaming."
USAGE_FOOTER = re.compile(r"\n\n<sub>[^<]*</sub>$")  # a finished reply's tokens and cost (modules/web/render.py)
ADDED = re.compile(r"(?:\n\n)?<!--chuanhu-->[\s\S]*$")  # what the page adds after a reply's text (render.FOOTER)
CHILDREN: list[subprocess.Popen] = []

# Each distinct raw content of the last bot message (Gradio's aria-label "bot's message: ..."),
# with the page's own clock; installed in every document before its scripts.
RECORDER = """
(() => {
  const seen = (window.__replies = []);
  const record = () => {
    const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
    const last = bots[bots.length - 1];
    const label = last ? last.getAttribute('aria-label') || '' : '';
    const at = label.indexOf("'s message: ");
    const text = at >= 0 ? label.slice(at + 12) : '';
    if (text && (!seen.length || seen[seen.length - 1].text !== text)) seen.push({text, at: performance.now()});
  };
  new MutationObserver(record).observe(document, {subtree: true, childList: true, characterData: true,
                                                  attributes: true, attributeFilter: ['aria-label']});
})();
"""
STATE = """() => {
  const r = window.__replies || [], last = r.length ? r[r.length - 1].text : '';
  const send = document.querySelector('#send-btn'), status = document.querySelector('#status-line');
  return {updates: r.length, chars: last.length, tail: last.slice(-60),
          send: !!send && send.offsetParent !== null, status: status ? status.innerText.trim() : null};
}"""
# The reloaded document's timings, on its performance.now() clock: its load events, and the first
# request of the page's load event (POST .../run/predict: on_load, which reopens the conversation).
NAVIGATION = """() => {
  const n = performance.getEntriesByType('navigation')[0];
  const predict = performance.getEntriesByType('resource').find(r => r.name.includes('/run/predict'));
  return {load: n.loadEventEnd, dcl: n.domContentLoadedEventEnd, origin: performance.timeOrigin,
          predict_start: predict ? predict.startTime : null, predict_end: predict ? predict.responseEnd : null};
}"""


# -- small helpers ---------------------------------------------------------------------------


def ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def answer(content: str) -> str:
    """The reply's text in a chatbot message: without the usage footer (and Gradio's trimming)."""
    return ADDED.sub("", content).rstrip()


def lost_and_extra(got: str, want: str) -> tuple[int, int]:
    """Characters of ``want`` missing from ``got``, and characters of ``got`` not in ``want`` there."""
    lost = extra = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, got, want, autojunk=False).get_opcodes():
        if tag in ("delete", "replace"):
            extra += i2 - i1
        if tag in ("insert", "replace"):
            lost += j2 - j1
    return lost, extra



# -- one page ---------------------------------------------------------------------------------
@dataclass
class PageResult:
    page: int
    point: int  # characters shown when the page was reloaded (at least the seeded point)
    ok: bool = False
    error: str = ""
    first_chars: int = 0  # characters in the first update after the reload
    resume_ms: float | None = None  # load event -> first update with reply text
    resume_dcl_ms: float | None = None  # DOMContentLoaded -> the same
    reload_to_text_ms: float | None = None  # page.reload() called -> the same (wall clock)
    live_ms: float | None = None  # load event -> first update that grew the text
    asked_ms: float | None = None  # load event -> the page sent on_load (the page's own start-up before it)
    answered_ms: float | None = None  # on_load sent -> its answer arrived (the server)
    drawn_ms: float | None = None  # on_load's answer -> the text on screen (the page draws it)
    updates: int = 0  # distinct reply texts after the reload
    not_prefix: int = 0  # of those, how many were not a prefix of the fake's text
    lost: int = 0
    extra: int = 0
    final_chars: int = 0
    notes: list[str] = field(default_factory=list)


async def one_page(browser: Any, url: str, index: int, point: int, want: str, timeout_s: float) -> PageResult:
    result = PageResult(index, point)
    timeout_ms = timeout_s * 1000
    context = await browser.new_context(locale="en-US", viewport={"width": 1280, "height": 800})
    context.set_default_timeout(timeout_ms)
    await context.add_init_script(RECORDER)
    step = "page load"
    try:
        page = await context.new_page()
        await page.goto(url)
        box = page.locator("#user-input textarea")
        await box.wait_for(state="visible")
        await page.wait_for_function("() => !document.querySelector('#user-input textarea').disabled")
        await box.fill(MESSAGE)
        await box.press("Enter")
        step = "the reply up to the reload point"
        await page.wait_for_function(
            "(n) => { const r = window.__replies; return r.length > 0 && r[r.length - 1].text.length >= n; }",
            arg=point, polling="raf")
        shown_before = await page.evaluate("() => window.__replies[window.__replies.length - 1].text")
        before = answer(shown_before)
        result.point = len(before)
        if USAGE_FOOTER.search(shown_before):
            result.notes.append("the reply had ended before the reload")
        step = "reload"
        reload_at = time.time() * 1000
        await page.reload(wait_until="load")
        step = "the first update after the reload"
        await page.wait_for_function("() => window.__replies.length > 0", polling="raf")
        nav = await page.evaluate(NAVIGATION)
        step = "the end of the reply"  # the usage footer comes once the reply is settled and saved
        await page.wait_for_function(
            r"() => { const r = window.__replies; return r.length > 0 && /\n\n<sub>[^<]*<\/sub>$/.test(r[r.length - 1].text); }",
            polling=100)
        entries = await page.evaluate("() => window.__replies")
        first = entries[0]
        result.first_chars = len(answer(first["text"]))
        result.resume_ms = first["at"] - nav["load"]
        result.resume_dcl_ms = first["at"] - nav["dcl"]
        result.reload_to_text_ms = nav["origin"] + first["at"] - reload_at
        if nav["predict_start"] is not None:
            result.asked_ms = nav["predict_start"] - nav["load"]
            result.answered_ms = nav["predict_end"] - nav["predict_start"]
            result.drawn_ms = first["at"] - nav["predict_end"]
        if len(entries) > 1:  # (none when the reply had ended by the time the page was back)
            result.live_ms = entries[1]["at"] - nav["load"]
        if result.first_chars < len(before):
            result.notes.append(f"first update after the reload had {result.first_chars} chars, "
                                f"{len(before)} were shown before it")
        if USAGE_FOOTER.search(first["text"]):
            result.notes.append("the reply had ended when the page was back")
        texts = [answer(entry["text"]) for entry in entries]
        result.updates = len(texts)
        result.not_prefix = sum(1 for text in texts if not want.startswith(text))
        final = texts[-1]
        result.final_chars = len(final)
        result.lost, result.extra = lost_and_extra(final, want)
        result.ok = True
    except Exception as exc:  # one page's failure is reported with the others'
        result.error = f"waiting for {step}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        try:  # what the page showed then
            state = await page.evaluate(STATE)
            result.error += (f"; the page showed {state['updates']} updates, the last {state['chars']} chars "
                             f"ending {state['tail']!r}; Send visible: {state['send']}, status {state['status']!r}")
        except Exception:
            pass
    finally:
        await context.close()
    return result


# -- the benchmark ------------------------------------------------------------------------
async def run_pages(url: str, args: argparse.Namespace, want: str, app_pid: int) -> tuple[list[PageResult], dict]:
    from playwright.async_api import async_playwright

    rng = random.Random(args.seed)
    lo, hi = args.window
    points = [int(len(want) * rng.uniform(lo, hi)) for _ in range(args.pages)]
    timeout_s = args.tokens / args.rate * 3 + 30
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # warm-up: one page load (the app's first /config and page assets), no chat
            context = await browser.new_context()
            page = await context.new_page()
            await page.goto(url)
            await page.locator("#user-input textarea").wait_for(state="visible", timeout=timeout_s * 1000)
            await context.close()
            started, app_cpu, busy = time.monotonic(), cpu_seconds(app_pid), machine_busy()
            results = await asyncio.gather(*(one_page(browser, url, i, point, want, timeout_s)
                                             for i, point in enumerate(points)))
            wall = time.monotonic() - started
            usage = {"wall": wall, "app_cpu_pct": 100 * (cpu_seconds(app_pid) - app_cpu) / wall,
                     "machine_cpu_pct": 100 * (machine_busy() - busy) / wall}
            return list(results), usage
        finally:
            await browser.close()


def report(results: list[PageResult], generations: int, args: argparse.Namespace, usage: dict, want: str) -> bool:
    print(f"{'page':>4} {'reload at':>9} {'1st after':>9} {'resume':>7} {'from DCL':>8} {'reload→text':>11} "
          f"{'asked':>6} {'answer':>6} {'drawn':>6} {'live':>6} {'upd':>4} {'bad':>3} {'lost':>4} {'extra':>5}  final")
    for r in results:
        if not r.ok:
            print(f"{r.page:>4} {r.point:>9}  FAILED: {r.error}")
            continue
        print(f"{r.page:>4} {r.point:>9} {r.first_chars:>9} {ms(r.resume_ms):>7} {ms(r.resume_dcl_ms):>8} "
              f"{ms(r.reload_to_text_ms):>11} {ms(r.asked_ms):>6} {ms(r.answered_ms):>6} {ms(r.drawn_ms):>6} "
              f"{ms(r.live_ms):>6} {r.updates:>4} {r.not_prefix:>3} {r.lost:>4} "
              f"{r.extra:>5}  {r.final_chars}/{len(want)}" + ("  " + "; ".join(r.notes) if r.notes else ""))
    ok = [r for r in results if r.ok]

    def stat(name: str, values: list[float]) -> str:
        if not values:
            return "-"
        return f"{name} p50 {ms(pct(values, 50))} ms, p95 {ms(pct(values, 95))} ms, max {ms(max(values, default=math.nan))} ms"

    print()
    print(f"pages ok {len(ok)}/{len(results)}; wall {usage['wall']:.1f} s; app CPU {usage['app_cpu_pct']:.0f}% of a core, "
          f"whole machine {usage['machine_cpu_pct']:.0f}% of {os.cpu_count()} cores (browser, app, fake and others)")
    lines = [("resume (load event -> first update with text)", [r.resume_ms for r in ok]),
             ("resume from DOMContentLoaded", [r.resume_dcl_ms for r in ok]),
             ("reload() called -> first update with text", [r.reload_to_text_ms for r in ok]),
             ("  page start-up: load event -> on_load sent", [r.asked_ms for r in ok]),
             ("  server: on_load sent -> answered", [r.answered_ms for r in ok]),
             ("  drawing: answered -> text on screen", [r.drawn_ms for r in ok]),
             ("live (load event -> first update that grew)", [r.live_ms for r in ok])]
    for name, values in lines:
        print(f"{name + ':':<50} " + stat("", [v for v in values if v is not None]).strip())
    lost, extra = sum(r.lost for r in ok), sum(r.extra for r in ok)
    bad = sum(r.not_prefix for r in ok)
    print(f"characters lost {lost}, repeated/extra {extra}; updates not a prefix of the fake's text: {bad}")
    print(f"generations the fake saw: {generations} (pages: {len(results)})")
    p50 = pct([r.resume_ms for r in ok], 50)
    met = not math.isnan(p50) and p50 <= args.target_ms
    print(f"target: resume p50 <= {args.target_ms:g} ms: {'met' if met else 'NOT met'} ({ms(p50)} ms)")
    return len(ok) == len(results) and lost == 0 and extra == 0 and bad == 0 and generations == len(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=8, help="pages, one browser context each (default 8)")
    parser.add_argument("--tokens", type=int, default=500, help="tokens per reply (default 500)")
    parser.add_argument("--rate", type=float, default=50.0, help="upstream tokens per second (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reload points and the fake's text")
    parser.add_argument("--window", default="0.1,0.8",
                        help="reload between these fractions of the reply's length (default 0.1,0.8)")
    parser.add_argument("--target-ms", type=float, default=300.0, help="the resume p50 target (default 300)")
    parser.add_argument("--startup-timeout", type=float, default=90.0, help="seconds for the app to start")
    parser.add_argument("--app-script", default=str(ROOT / "ChuanhuStyleChat.py"),
                        help="the app's launcher (same CLI as ChuanhuStyleChat.py)")
    parser.add_argument("--json", metavar="FILE", help="also write the per-page results as JSON")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with config and app log")
    args = parser.parse_args(argv)
    try:
        args.window = tuple(float(x) for x in args.window.split(","))
        assert len(args.window) == 2 and 0 <= args.window[0] < args.window[1] <= 1
    except (ValueError, AssertionError):
        parser.error("--window: two fractions lo,hi with 0 <= lo < hi <= 1")
    if not 1 <= args.pages <= 100 or args.tokens < 10 or args.rate <= 0:
        parser.error("--pages 1..100, --tokens >= 10, --rate > 0")
    if not os.path.exists(CHROMIUM):
        raise SystemExit(f"{CHROMIUM} is not installed (apt-get install chromium)")

    tokens = words(args.tokens, args.seed)
    want = "".join(tokens).rstrip()
    print(f"# ChuanhuStyleChat reload benchmark: {args.pages} pages, {args.tokens} tokens at {args.rate:g}/s "
          f"(ideal {args.tokens / args.rate:.1f} s), reload at {args.window[0]:g}-{args.window[1]:g} of the reply "
          f"(seed {args.seed})")
    print(f"# Python {platform.python_version()}, gradio {version('gradio')}, playwright {version('playwright')}, "
          f"{os.cpu_count()} CPUs, load average {' '.join(open('/proc/loadavg').read().split()[:3])}", flush=True)
    signal.signal(signal.SIGTERM, terminated)

    script = Script(tokens=tokens, delay=1.0 / args.rate, pace=True,
                    usage={"prompt_tokens": 24, "completion_tokens": args.tokens})
    tmp = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    app_log = tmp / "app.log"
    app = None
    try:
        with FakeOpenAIServer(api_key=API_KEY, default_script=script) as fake:
            port = free_port()
            config = {
                "server": {"host": HOST, "port": port},
                "history": {"mode": "shared", "data_dir": str(tmp / "data")},
                "runs": {"max_per_owner": max(4, args.pages)},
                "models": [{"provider": "openai", "name": "fake", "model": "fake-model", "base_url": fake.base_url,
                            "api_key": API_KEY, "max_retries": 0}],
            }
            (tmp / "config.yaml").write_text(yaml.safe_dump(config))
            with open(app_log, "wb") as log:
                app = subprocess.Popen([sys.executable, str(Path(args.app_script).resolve()),
                                        "--config", str(tmp / "config.yaml")],
                                       cwd=tmp, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
            CHILDREN.append(app)
            url = f"http://{HOST}:{port}/"
            wait_ready(url + "config", app, app_log, args.startup_timeout)
            print(f"# app ready (pid {app.pid}); fake upstream on {fake.base_url}", flush=True)
            results, usage = asyncio.run(run_pages(url, args, want, app.pid))
            generations = sum(1 for r in fake.requests if r.path.endswith("/chat/completions"))
            if app.poll() is not None:
                print(f"the app exited ({app.returncode}):\n{tail(app_log)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for proc in CHILDREN:
            stop_process(proc)
        if args.keep_logs:
            print(f"# logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    good = report(results, generations, args, usage, want)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "generations": generations, "usage": usage,
                                   "pages": [asdict(r) for r in results]}, indent=2, default=str))
        print(f"# results written to {out}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
