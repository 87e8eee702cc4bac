"""Two app processes behind a real nginx (deploy/nginx.conf, rendered by deploy/nginx_conf.py),
their history in one PostgreSQL database: a browser's page loads and chats through nginx, and
every request of that browser (the page, /config, queue/join, the queue/data and heartbeat
streams, ...) reaches one process; a second browser gets a cookie of its own and sticks to its
process too, and sees the first one's conversation there; many browsers are spread over both.

Which process served a request is read from nginx's own access log (``$upstream_addr``, the
template's JSON ``chuanhu`` log format), not from anything the app adds. nginx is Debian's
package: skipped where it is not installed, except in CI (``CI`` or ``CHUANHU_NGINX_REQUIRED``),
where that fails. Nothing sleeps: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import yaml
from playwright.sync_api import BrowserContext, Page, expect

from deploy.nginx_conf import ACCESS_LOG, render
from tests.conftest import FAKE_KEY, fake_model_entry, free_port
from tests.test_app_api import wait_until
from tests.test_browser import RECORD_GROWTH
from tests.fakes.openai_server import FakeOpenAIServer, Script

ROOT = Path(__file__).resolve().parent.parent
BOTS = '#chatbot [data-testid="bot"]'
USERS = '#chatbot [data-testid="user"]'
HISTORY = "#history-list label"
TOKENS = [f" w{i}" for i in range(40)]
DELAY = 0.03  # 40 tokens in ~1.2 s: several updates of the page
COOKIE = "chuanhu_route"
TIMEOUT_MS = 20_000
expect.set_options(timeout=TIMEOUT_MS)


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        reason = "nginx is not installed (apt-get install nginx)"
        if os.environ.get("CHUANHU_NGINX_REQUIRED") or os.environ.get("CI"):
            pytest.fail(reason + ": CI must run the nginx tests")
        pytest.skip(reason)
    return found


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Team:
    """The fake upstream, two app processes on one PostgreSQL database, nginx in front."""

    def __init__(self, root: Path, nginx: str, history_url: str, **config: Any):
        self.root = root
        self.config = config  # more of the apps' config (e.g. runs.lease_seconds)
        self.fake = FakeOpenAIServer(api_key=FAKE_KEY, default_script=Script(tokens=TOKENS, delay=DELAY))
        self.apps: list[subprocess.Popen] = []
        self.app_logs: list[Path] = []
        self.ports = [free_port(), free_port()]
        self.nginx_bin = nginx
        self.history_url = history_url
        self.nginx: subprocess.Popen | None = None
        # nginx's prefix: its own folder, readable by its workers (as root they run as nobody).
        self.run = Path(tempfile.mkdtemp(prefix="chuanhu-nginx-"))
        self.run.chmod(0o755)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.run / "logs" / ACCESS_LOG

    def start(self) -> None:
        self.fake.__enter__()
        config = {
            "models": [fake_model_entry(self.fake)],
            # Every page is the one owner of a shared history: what one process saves, the other lists.
            "history": {"mode": "shared", "data_dir": str(self.root / "data"), "url": self.history_url},
            "runs": {"max_per_owner": 100, **self.config.get("runs", {})},
        }
        (self.root / "config.yaml").write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items()
               if k not in ("OPENAI_API_KEY", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "CHUANHU_HISTORY_URL",
                            "CHUANHU_DATA_DIR")}
        env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        for port in self.ports:
            log = self.root / f"app-{port}.log"
            with open(log, "wb") as out:
                self.apps.append(subprocess.Popen(
                    [sys.executable, str(ROOT / "ChuanhuStyleChat.py"), "--config", str(self.root / "config.yaml"),
                     "--port", str(port)], cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL))
            self.app_logs.append(log)
        for proc, port, log in zip(self.apps, self.ports, self.app_logs):
            self._ready(f"http://127.0.0.1:{port}/config", proc, log, f"the app on port {port}", 120)
        conf = self.run / "nginx.conf"
        conf.write_text(render(self.run, f"127.0.0.1:{self.port}", [f"127.0.0.1:{p}" for p in self.ports]))
        check = subprocess.run([self.nginx_bin, "-t", "-q", "-p", str(self.run), "-c", str(conf)],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.nginx = subprocess.Popen([self.nginx_bin, "-p", str(self.run), "-c", str(conf), "-g", "daemon off;"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=open(self.run / "logs" / "stderr.log", "wb"))
        self._ready(f"{self.url}/config", self.nginx, self.run / "logs" / "error.log", "nginx", 30)

    @staticmethod
    def _ready(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
        def answers() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with status {proc.returncode}:\n{tail(log)}")
            try:
                return httpx.get(url, timeout=2, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, f"{what} answering {url}", timeout, interval=0.2)

    def stop(self) -> None:
        for proc in [self.nginx, *self.apps]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in [self.nginx, *self.apps]:
            if proc is not None:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self.fake.__exit__(None, None, None)
        shutil.rmtree(self.run, ignore_errors=True)

    # -- nginx's access log ------------------------------------------------------------------
    def offset(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def entries(self, since: int = 0) -> list[dict[str, Any]]:
        with open(self.log, "rb") as f:
            f.seek(since)
            data = f.read()
        # (a line being written may be cut: only whole lines)
        return [json.loads(line) for line in data.split(b"\n") if line.strip() and line.endswith(b"}")]

    def requests_of(self, route: str, since: int, *, wanted: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """The log's entries of ``route`` since ``since``, once each of ``wanted`` (URI prefixes) is
        there: nginx logs a request when it ends, a stream when it closes."""
        def logged() -> list[dict[str, Any]] | None:
            mine = [e for e in self.entries(since) if e["route"] == route]
            return mine if all(any(e["uri"].startswith(w) for e in mine) for w in wanted) else None

        try:
            return wait_until(logged, f"nginx's log with {wanted} for route {route[:8]}…", 20)
        except pytest.fail.Exception as exc:
            seen = sorted({e["uri"].split("?")[0] for e in self.entries(since) if e["route"] == route})
            raise AssertionError(f"{exc}; logged for it: {seen}") from None


@pytest.fixture(scope="module")
def team(pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    """One team for the module (two processes take ~10 s to start): a database of its own on the
    session's cluster (as ``pg_url`` makes one per test), dropped at the end."""
    nginx = nginx_binary()
    database = pg_cluster.new_database()
    team = Team(tmp_path_factory.mktemp("team"), nginx, pg_cluster.url(database))
    try:
        team.start()
        yield team
    finally:
        team.stop()
        pg_cluster.drop_database(database)


def open_page(context: BrowserContext, url: str) -> Page:
    page = context.new_page()
    page.goto(url)
    expect(page.locator("#user-input textarea")).to_be_editable()
    return page


def route_cookie(context: BrowserContext) -> dict[str, Any]:
    cookies = [c for c in context.cookies() if c["name"] == COOKIE]
    assert len(cookies) == 1, context.cookies()
    return cookies[0]




def failed(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The requests nginx answered with an error. 499 is not one: nginx's code for a client that
    went away first (the test closing its browser while the page's last event is in flight)."""
    return [e for e in entries if e["status"] >= 400 and e["status"] != 499]


def chat(page: Page, text: str) -> None:
    """Send ``text``; the reply streams (seen at three lengths or more) and completes."""
    users = page.locator(USERS).count()
    box = page.locator("#user-input textarea")
    box.fill(text)
    box.press("Enter")
    expect(page.locator(USERS)).to_have_count(users + 1)
    lengths = page.wait_for_function(RECORD_GROWTH, arg=3, polling="raf", timeout=TIMEOUT_MS).json_value()
    assert lengths == sorted(lengths), lengths
    expect(page.locator(BOTS).last).to_contain_text("w0 w1 w2")
    expect(page.locator(BOTS).last).to_contain_text(TOKENS[-1].strip())  # the whole reply
    expect(page.locator("#send-btn")).to_be_visible()
    expect(page.locator("#stop-btn")).to_be_hidden()


# The requests of a page session that must reach the page's process (besides GET /, which
# carries the config: the page does not ask /config): its load event and other quick events, a
# reply's queue/join and its queue/data stream, the heartbeat stream it keeps open.
SESSION_REQUESTS = ("/gradio_api/run/predict", "/gradio_api/queue/join", "/gradio_api/queue/data", "/gradio_api/heartbeat/")


def test_a_page_chats_through_nginx_and_every_request_goes_to_one_process(team, contexts):
    since = team.offset()
    context = contexts()
    page = open_page(context, team.url)
    cookie = route_cookie(context)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/", cookie
    assert len(cookie["value"]) == 32  # nginx's $request_id of the first request

    chat(page, "hello through nginx")
    page.reload()  # the reload carries the cookie: same process, no new cookie
    expect(page.locator("#user-input textarea")).to_be_editable()
    assert route_cookie(context)["value"] == cookie["value"]
    context.close()  # ends the heartbeat stream, so that nginx logs it

    mine = team.requests_of(cookie["value"], since, wanted=SESSION_REQUESTS)
    every = team.entries(since)
    # Nothing else ran meanwhile: every request of this page carried its route (the cookie, or
    # for the very first one the $request_id that became the cookie) ...
    assert [e for e in every if e["route"] != cookie["value"]] == [], every
    # ... and went to one process.
    upstreams = {e["upstream"] for e in mine}
    assert len(upstreams) == 1 and upstreams <= {f"127.0.0.1:{p}" for p in team.ports}, mine
    assert sum(e["uri"] == "/" and e["method"] == "GET" for e in mine) == 2  # the load and the reload
    assert not failed(mine), failed(mine)
    streams = [e for e in mine if e["uri"].startswith("/gradio_api/queue/data")]
    # the reply's stream was one response open while the reply streamed (the page saw it grow, above)
    assert streams and max(e["request_time"] for e in streams) >= len(TOKENS) * DELAY * 0.8, streams


def test_a_second_browser_gets_its_own_cookie_and_sticks_to_its_process(team, contexts):
    first_since = team.offset()
    first = contexts()
    page = open_page(first, team.url)
    first_route = route_cookie(first)["value"]
    chat(page, "asked by the first browser")
    first.close()
    first_upstream = {e["upstream"] for e in team.requests_of(first_route, first_since, wanted=SESSION_REQUESTS)}
    assert len(first_upstream) == 1

    # Browsers until one lands on the other process (each has a one-in-two chance; 16 tries).
    for _ in range(16):
        since = team.offset()
        second = contexts()
        page = open_page(second, team.url)
        route = route_cookie(second)["value"]
        assert route != first_route
        logged = team.requests_of(route, since, wanted=("/",))
        if {e["upstream"] for e in logged} != first_upstream:
            break
        second.close()
    else:
        pytest.fail(f"16 browsers in a row all went to {first_upstream}")

    # On the other process the first browser's conversation is there (PostgreSQL), and it chats.
    expect(page.locator(HISTORY).filter(has_text="asked by the first browser").first).to_be_visible()
    chat(page, "asked by the second browser")
    page.locator(HISTORY).filter(has_text="asked by the first browser").first.click()
    expect(page.locator(USERS).first).to_contain_text("asked by the first browser")
    second.close()

    mine = team.requests_of(route, since, wanted=SESSION_REQUESTS)
    upstreams = {e["upstream"] for e in mine}
    assert len(upstreams) == 1 and upstreams != first_upstream, mine
    assert not failed(mine), failed(mine)


def test_many_browsers_are_spread_over_both_processes(team, contexts):
    since = team.offset()
    routes = []
    for _ in range(12):
        context = contexts()
        open_page(context, team.url)
        routes.append(route_cookie(context)["value"])
        context.close()
    assert len(set(routes)) == len(routes)
    by_route = {route: {e["upstream"] for e in team.requests_of(route, since, wanted=("/gradio_api/heartbeat/",))}
                for route in routes}
    assert all(len(upstreams) == 1 for upstreams in by_route.values()), by_route  # each browser sticks
    served = [next(iter(u)) for u in by_route.values()]
    counts = {f"127.0.0.1:{p}": served.count(f"127.0.0.1:{p}") for p in team.ports}
    assert all(count >= 1 for count in counts.values()), counts  # both processes serve (1 - 2^-11)


# -- a reply seen from the other process (runs across processes, through PostgreSQL) ----------------
LONG = [f" s{i}" for i in range(400)]  # ~20 s at LONG_DELAY: far longer than any step below
LONG_DELAY = 0.05


def on_process(team: Team, contexts: Callable[[], BrowserContext], *, other_than: str | None = None,
               tries: int = 16) -> tuple[BrowserContext, Page, str]:
    """A browser whose page landed on a process (on another than ``other_than`` if given): its
    context, page and upstream address (from nginx's log of its first request)."""
    for _ in range(tries):
        since = team.offset()
        context = contexts()
        page = open_page(context, team.url)
        route = route_cookie(context)["value"]
        [upstream] = {e["upstream"] for e in team.requests_of(route, since, wanted=("/",)) if e["uri"] == "/"}
        if other_than is None or upstream != other_than:
            return context, page, upstream
        context.close()
    pytest.fail(f"{tries} browsers in a row all went to {other_than}")


def start_long_reply(team: Team, page: Page, text: str) -> None:
    team.fake.enqueue(*LONG, delay=LONG_DELAY)
    box = page.locator("#user-input textarea")
    box.fill(text)
    box.press("Enter")
    expect(page.locator(BOTS).last).to_contain_text("s0 s1 s2 s3")


def watch_from(page: Page, title: str) -> None:
    """Open the conversation ``title`` (marked ⏳ in the sidebar) and see its reply grow."""
    entry = page.locator(HISTORY).filter(has_text=title).first
    expect(entry).to_contain_text("⏳")
    entry.click()
    expect(page.locator(USERS).last).to_contain_text(title)
    page.evaluate("() => { window.__lengths = []; }")
    lengths = page.wait_for_function(RECORD_GROWTH, arg=3, polling="raf", timeout=TIMEOUT_MS).json_value()
    assert lengths == sorted(lengths), lengths  # it grows here, on the other process
    expect(page.locator("#stop-btn")).to_be_visible()


def test_a_browser_on_the_other_process_sees_the_reply_grow_and_stops_it(team, contexts):
    writer, page, upstream = on_process(team, contexts)
    start_long_reply(team, page, "a long story for two browsers")
    viewer, other, other_upstream = on_process(team, contexts, other_than=upstream)
    watch_from(other, "a long story for two browsers")
    other.locator("#stop-btn").click()
    assert team.fake.disconnected.wait(timeout=10), "the process writing the reply did not close its upstream"
    for shown in (other, page):  # both browsers: the partial reply, marked stopped
        expect(shown.locator(BOTS).last).to_contain_text("Stopped.")
        expect(shown.locator("#send-btn")).to_be_visible()
    text = other.locator(BOTS).last.inner_text()
    assert "s3" in text and LONG[-1].strip() not in text
    writer.close()
    viewer.close()


@pytest.fixture
def own_team(pg_cluster: Any, tmp_path: Path) -> Iterator[Team]:
    """A team of its own (one of its processes is killed), with a short lease."""
    database = pg_cluster.new_database()
    team = Team(tmp_path, nginx_binary(), pg_cluster.url(database), runs={"lease_seconds": 2})
    try:
        team.start()
        yield team
    finally:
        team.stop()
        pg_cluster.drop_database(database)


def test_a_killed_process_leaves_the_others_serving_and_its_reply_interrupted(own_team, contexts):
    team = own_team
    writer, page, upstream = on_process(team, contexts)
    start_long_reply(team, page, "a story whose writer dies")
    viewer, other, other_upstream = on_process(team, contexts, other_than=upstream)
    watch_from(other, "a story whose writer dies")
    victim = team.apps[team.ports.index(int(upstream.rsplit(":", 1)[1]))]
    victim.kill()  # SIGKILL: no chance to say goodbye
    victim.wait(timeout=10)
    # The other process notices the lease expire and marks the reply interrupted, with its text so far.
    expect(other.locator(BOTS).last).to_contain_text("The app process writing this reply stopped",
                                                     timeout=TIMEOUT_MS * 2)
    expect(other.locator(BOTS).last).to_contain_text("s0 s1 s2 s3")
    expect(other.locator("#send-btn")).to_be_visible()
    # ... and it keeps serving: a new chat there streams to its end.
    other.locator("#new-chat-btn").click()
    expect(other.locator(USERS)).to_have_count(0)  # (the new chat shown before chat() counts)
    chat(other, "still here after the other process died")
    writer.close()
    viewer.close()
