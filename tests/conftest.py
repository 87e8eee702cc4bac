"""Shared fixtures: fake upstream servers and the app launched on a real port."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Callable, Iterator

import pytest

from modules.config import build_config
from tests.fakes.openai_server import FakeOpenAIServer

FAKE_KEY = "sk-fake-test-key-0123456789"


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    """A fake OpenAI-compatible server that wants ``FAKE_KEY``."""
    with FakeOpenAIServer(api_key=FAKE_KEY) as server:
        yield server


def fake_model_entry(server: FakeOpenAIServer, name: str = "fake", **extra: Any) -> dict[str, Any]:
    return {"provider": "openai", "name": name, "model": "fake-model", "base_url": server.base_url,
            "api_key": FAKE_KEY, "max_retries": 0, **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def launch_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., str]]:
    """``launch_app(config_dict) -> url``: the real app on a free port, closed after the test.

    Its history goes to a fresh temporary folder unless the config names one.
    """
    from modules.app import ChatApp

    apps: list[ChatApp] = []

    def launch(data: dict[str, Any]) -> str:
        data = {**data, "server": {**data.get("server", {}), "port": free_port()}}
        history = data.get("history", {})
        if "data_dir" not in history:
            data["history"] = {**history, "data_dir": str(tmp_path_factory.mktemp("data"))}
        app = ChatApp(build_config(data, env={}))
        app.build()
        _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
        apps.append(app)
        return url

    yield launch
    for app in apps:
        if app.demo is not None:
            app.demo.close()


# -- headless Chromium (Debian's package; Playwright's own browser download does not work offline) --
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium for the page tests: skipped where it is not installed, except in CI."""
    if not os.path.exists(CHROMIUM):
        reason = f"{CHROMIUM} is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(reason + ": CI must run the browser tests")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


BROWSER_TIMEOUT_MS = 15_000


@pytest.fixture
def contexts(browser: Any) -> Iterator[Callable[..., Any]]:
    """``contexts(init_script=None)`` -> a new browser context (its own localStorage, English, a
    desktop viewport; ``init_script`` runs in each of its pages first), closed after the test."""
    made: list[Any] = []

    def make(init_script: str | None = None, **kwargs: Any) -> Any:
        context = browser.new_context(locale="en-US", viewport={"width": 1280, "height": 800}, **kwargs)
        context.set_default_timeout(BROWSER_TIMEOUT_MS)
        if init_script:
            context.add_init_script(init_script)
        made.append(context)
        return context

    yield make
    for context in made:
        context.close()


@contextlib.contextmanager
def running_app(data: dict[str, Any], env: dict[str, str] | None = None) -> Iterator[tuple[Any, str]]:
    """``(app, url)``: the real app of the config ``data`` on a free port, closed on leaving (for
    tests that need the app itself, or to stop and start it again)."""
    from modules.app import ChatApp

    app = ChatApp(build_config({**data, "server": {**data.get("server", {}), "port": free_port()}}, env=env or {}))
    app.build()
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
    try:
        yield app, url.rstrip("/")
    finally:
        app.close()

# -- a throwaway PostgreSQL cluster (Debian's postgresql package) ---------------------------------
def _postgres_required() -> bool:
    return bool(os.environ.get("CHUANHU_PG_REQUIRED") or os.environ.get("CI"))


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """One PostgreSQL cluster for the session (``tests/pg_cluster.py``), started at the first test
    that needs it and stopped at the end: skipped where PostgreSQL is not installed, except in CI
    (``CI`` or ``CHUANHU_PG_REQUIRED`` set), where that fails."""
    from tests.pg_cluster import Cluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        reason = "PostgreSQL's server programs (initdb, pg_ctl) are not installed (apt-get install postgresql)"
        if _postgres_required():
            pytest.fail(reason + ": CI must run the PostgreSQL tests")
        pytest.skip(reason)
    cluster = Cluster(bindir)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_database(pg_cluster: Any) -> Iterator[str]:
    """The name of a fresh, empty database of the session's cluster, dropped after the test."""
    name = pg_cluster.new_database()
    yield name
    pg_cluster.drop_database(name)


@pytest.fixture
def pg_url(pg_cluster: Any, pg_database: str) -> str:
    """``postgresql://chuanhu:<password>@127.0.0.1:<port>/<fresh database>``."""
    return pg_cluster.url(pg_database)
