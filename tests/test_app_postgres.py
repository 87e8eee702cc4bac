"""The real app with its history in PostgreSQL (``history.url``), through gradio_client: a
conversation, a restart that sees it, two processes' worth of apps on one database, and a
start-up that fails in one sentence naming history.url, never showing the password."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modules.config import build_config
from modules.history.pg_store import PostgresStore
from modules.history.store import FILENAME, HistoryUnavailable
from tests.conftest import free_port
from tests.test_app_history import config, sessions, transcript  # noqa: F401  (sessions: a fixture)
from tests.test_pg_store import unused_port

ROOT = Path(__file__).resolve().parent.parent


def start(fake_openai: Any, url: str, data_dir: Path) -> tuple[Any, str]:
    from modules.app import ChatApp

    data = {**config(fake_openai, history={"data_dir": str(data_dir), "url": url}), "server": {"port": free_port()}}
    app = ChatApp(build_config(data, env={}))
    app.build()
    _, address, _ = app.launch(prevent_thread_lock=True, quiet=True)
    return app, address


def stop(app: Any) -> None:
    app.close()


def test_a_conversation_is_kept_in_postgresql_across_a_restart(fake_openai, sessions, pg_url, tmp_path):
    app, address = start(fake_openai, pg_url, tmp_path)
    try:
        assert isinstance(app.store, PostgresStore) and app.store_problem is None
        fake_openai.enqueue("Kept in PostgreSQL.")
        session = sessions(address)
        session.say("where is this kept?")
        fake_openai.enqueue("A second answer.")
        session.say("and this one?")
        session.rename("Kept on the server")
    finally:
        stop(app)
    assert not (tmp_path / FILENAME).exists()  # nothing went to SQLite

    app, address = start(fake_openai, pg_url, tmp_path)
    try:
        session = sessions(address)
        listed = session.search()
        assert [t for t, _ in listed] == ["Kept on the server"]
        assert session.ids("SECOND ANSWER") == [listed[0][1]]  # search reads PostgreSQL too
        chatbot, *_ = session.open(listed[0][1])
        assert [text for _, text in transcript(chatbot)][0::2] == ["where is this kept?", "and this one?"]
        assert "Kept in PostgreSQL." in transcript(chatbot)[1][1]
    finally:
        stop(app)


def test_two_apps_on_one_database_see_each_others_conversations(fake_openai, sessions, pg_url, tmp_path):
    """Two app processes' worth (each its own pool) behind one database: what one saves, the other lists."""
    one, one_address = start(fake_openai, pg_url, tmp_path / "one")
    two, two_address = start(fake_openai, pg_url, tmp_path / "two")
    try:
        fake_openai.enqueue("Saved by the first.")
        sessions(one_address).say("asked on the first app")
        other = sessions(two_address)
        listed = other.search()
        assert [t for t, _ in listed] == ["asked on the first app"]
        assert "Saved by the first." in transcript(other.open(listed[0][1])[0])[1][1]
    finally:
        stop(one)
        stop(two)


def test_an_unreachable_database_stops_the_start_naming_history_url(fake_openai, tmp_path, caplog):
    from modules.app import ChatApp

    url = f"postgresql://team:Very-Secret-pw-123@127.0.0.1:{unused_port()}/chat"
    data = {**config(fake_openai, history={"data_dir": str(tmp_path), "url": url}), "server": {"port": free_port()}}
    with caplog.at_level(logging.DEBUG), pytest.raises(HistoryUnavailable) as caught:
        ChatApp(build_config(data, env={}))
    assert str(caught.value).startswith("history.url: the history database postgresql://team:***@127.0.0.1:")
    assert "Very-Secret" not in str(caught.value)
    logging.getLogger("test").warning("connecting with %s", url)  # the password is now scrubbed from the log
    assert "Very-Secret-pw-123" not in caplog.text and "team:" in caplog.text


def test_the_command_line_says_why_it_cannot_start_in_one_line(tmp_path):
    env = {**os.environ, "CHUANHU_HISTORY_URL": f"postgresql://team:Hidden-pw-987@127.0.0.1:{unused_port()}/chat",
           "CHUANHU_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "ChuanhuStyleChat.py", "--port", str(free_port())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("ChuanhuStyleChat:")]
    assert len(lines) == 1 and lines[0].startswith("ChuanhuStyleChat: cannot start: history.url: "), done.stderr
    assert "Hidden-pw" not in done.stderr + done.stdout
    backup = subprocess.run([sys.executable, "ChuanhuStyleChat.py", "backup", str(tmp_path / "copy.sqlite3")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert backup.returncode == 2 and "pg_dump" in backup.stderr and "Hidden-pw" not in backup.stderr


def test_a_knowledge_base_made_on_one_machine_answers_on_another(fake_openai, sessions, pg_url, tmp_path):
    """Two apps on one database, each its own data folder (two machines): a base created and filled
    on the first answers grounded questions on the second, and its documents' bytes are in the
    database, not in either folder."""
    from tests.test_app_knowledge import Panel

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "travel.md").write_text("# Hotels\n\nHotel rooms cost at most 120 euros a night.\n", encoding="utf-8")
    one, one_address = start(fake_openai, pg_url, tmp_path / "one")
    two, two_address = start(fake_openai, pg_url, tmp_path / "two")
    try:
        panel = Panel(sessions(one_address))
        base = panel.create("Office")[2]["value"]
        report = panel.add(base, folder / "travel.md")[0]
        assert report.startswith("Added 1: travel.md.") and "now holds 1 passage(s)" in report, report
        assert not (tmp_path / "one" / "attachments").exists() or not any((tmp_path / "one" / "attachments").rglob("*"))

        session = sessions(two_address)
        other = Panel(session)
        assert other.show()["bases"] == {"Office": base}  # listed on the other machine
        other.use(base)
        fake_openai.enqueue("At most 120 euros [1].")
        session.add("How much may a hotel room cost?")
        other.keep()
        session.respond()
        question = fake_openai.requests[-1].body["messages"][-1]["content"]
        assert "[1] travel.md, Hotels\n# Hotels\n\nHotel rooms cost at most 120 euros a night." in question
        assert (tmp_path / "two" / "knowledge-index" / str(base) / "chunks.json").is_file()  # its own cache
        assert not (tmp_path / "two" / "knowledge.sqlite3").exists()
    finally:
        stop(one)
        stop(two)


def test_apps_on_one_database_share_their_keys_and_the_first_folders_keys_are_kept(
        fake_openai, pg_url, tmp_path):
    """The key that encrypts a browser's token and the one that signs links to attached files are
    the database's, so that a browser or a link is known on every machine; a data folder that kept
    keys before the history moved to PostgreSQL gives them (its browsers stay known)."""
    before = tmp_path / "before"
    before.mkdir()
    (before / ".browser-secret").write_text("ab" * 16)
    (before / ".app-key").write_text("cd" * 32)
    apps = []
    try:
        for folder in (before, tmp_path / "other-machine"):
            data = {**config(fake_openai, history={"data_dir": str(folder), "url": pg_url, "mode": "per_browser"}),
                    "server": {"port": free_port()}}
            from modules.app import ChatApp

            app = ChatApp(build_config(data, env={}))
            apps.append(app)
            app.build()
        first, second = apps
        assert first.page.browser_secret == second.page.browser_secret == "ab" * 16
        assert first.page.links.key == second.page.links.key == bytes.fromhex("cd" * 32)
        assert not (tmp_path / "other-machine" / ".browser-secret").exists()  # (the folder keeps none)
    finally:
        for app in apps:
            app.close()
