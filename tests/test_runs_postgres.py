"""Runs across app processes on one PostgreSQL database (``modules/history/pg_runs.py``), end to
end: a reply streams on app A; a gradio_client session of the same owner (``history.mode:
shared``) on app B opens the conversation, sees the reply grow to its end, or stops it (A's
upstream connection is closed, the reply saved stopped); app A killed with SIGKILL mid-stream →
B marks the reply interrupted with its checkpointed text and keeps serving. Real PostgreSQL (the
``pg_url`` cluster), the real fake upstream; waits are on conditions with deadlines."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml

from modules.config import build_config
from modules.core.remote import RunEvent
from modules.history.pg_runs import MAX_PAYLOAD, RUNS_CHANNEL, event_of, payload
from tests.conftest import fake_model_entry, free_port
from tests.test_app_api import LONG, SLOW, wait_until
from tests.test_app_history import Session, config, message_text, sessions  # noqa: F401,F811  (sessions: a fixture)

ROOT = Path(__file__).resolve().parent.parent
LEASE = 2.0  # seconds: a killed process is taken for dead this soon


def start(fake_openai: Any, url: str, data_dir: Path) -> tuple[Any, str]:
    from modules.app import ChatApp

    data = {**config(fake_openai, history={"data_dir": str(data_dir), "url": url}),
            "runs": {"lease_seconds": LEASE}, "server": {"port": free_port()}}
    app = ChatApp(build_config(data, env={}))
    app.build()
    _, address, _ = app.launch(prevent_thread_lock=True, quiet=True)
    return app, address


def streaming_on(fake_openai: Any, session: Session, text: str = "Tell me a long story") -> Any:
    """Start a long slow reply in ``session``; the job, once a few tokens show."""
    fake_openai.enqueue(*LONG, delay=SLOW)
    session.add(text)
    job = session.submit_respond()

    def shown() -> str:
        outputs = job.outputs()
        return message_text(outputs[-1][-1]) if outputs and len(outputs[-1]) == 2 else ""

    wait_until(lambda: "word3" in shown() or job.done(), "a few tokens of the reply on A")
    assert not job.done(), job.status()
    return job


def stored_reply(url: str) -> tuple[str, str, str]:
    """(status, content, error) of the one assistant message in the database at ``url`` (three
    empty strings while there is none)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT status, content, error FROM messages WHERE role = 'assistant'").fetchall()
    assert len(rows) <= 1, rows
    return rows[0] if rows else ("", "", "")


def test_a_notification_carries_the_text_when_it_fits_else_only_that_it_grew():
    key = ("shared", "c1", "q1", "a1")
    channel, body = payload(RunEvent("grew", key, "p1", at=5, text=" word"))
    assert channel == "chuanhu_runs" and event_of(channel, body) == RunEvent("grew", key, "p1", at=5, text=" word")
    channel, body = payload(RunEvent("grew", key, "p1", at=0, text="字" * 4000))  # 12,000 bytes
    assert len(body.encode()) <= MAX_PAYLOAD and event_of(channel, body) == RunEvent("grew", key, "p1", at=0)
    assert event_of(*payload(RunEvent("stop", key))) == RunEvent("stop", key)
    assert event_of("chuanhu_runs", "not json") is None and event_of("chuanhu_runs", '{"key": [1]}') is None


def test_a_second_app_sees_the_run_of_the_first_grow_to_its_end(fake_openai, sessions, pg_url, tmp_path):
    a, a_address = start(fake_openai, pg_url, tmp_path / "a")
    b, b_address = start(fake_openai, pg_url, tmp_path / "b")
    try:
        writer = sessions(a_address)
        streaming_on(fake_openai, writer)
        viewer = sessions(b_address)
        [(title, conversation_id)] = viewer.search()
        assert title.startswith("⏳ "), title  # marked streaming in B's sidebar too
        chatbot = viewer.open(conversation_id)[0]
        assert [key[1] for key in b.chat.remote.live_keys()] == [conversation_id]  # B knows it streams on A
        assert "word0 word1" in message_text(chatbot[-1])
        follow = viewer.client.submit(api_name="/follow")
        wait_until(follow.done, "B's follow to end with the reply", timeout=30)
        lengths = [len(message_text(out[-1])) for out in follow.outputs() if out]
        assert len(lengths) >= 3 and lengths == sorted(lengths), lengths  # it grew, update by update
        final = message_text(follow.outputs()[-1][-1])
        assert "word0 word1" in final and " word199" in final, final
        assert not b.chat.runs.live(), "B ran a reply of its own"
        assert stored_reply(pg_url)[0] == "done"
        assert not viewer.search()[0][0].startswith("⏳ ")
    finally:
        a.close()
        b.close()


def test_stop_on_the_second_app_stops_the_run_of_the_first(fake_openai, sessions, pg_url, tmp_path):
    a, a_address = start(fake_openai, pg_url, tmp_path / "a")
    b, b_address = start(fake_openai, pg_url, tmp_path / "b")
    try:
        job = streaming_on(fake_openai, sessions(a_address))
        viewer = sessions(b_address)
        viewer.open(viewer.ids()[0])
        *_, chatbot = viewer.stop()
        assert fake_openai.disconnected.wait(timeout=5), "A's upstream was not closed"
        assert "Stopped." in message_text(chatbot[-1]), chatbot[-1]
        wait_until(job.done, "A's respond to end")
        status, content, _ = stored_reply(pg_url)
        assert status == "stopped" and content.startswith(" word0 word1 word2 word3") and "word199" not in content
        assert not fake_openai.completed.is_set()
    finally:
        a.close()
        b.close()


def test_a_killed_process_leaves_its_reply_interrupted_with_its_text_and_the_others_serving(
        fake_openai, sessions, pg_url, tmp_path):
    port = free_port()
    config_file = tmp_path / "a.yaml"
    config_file.write_text(yaml.safe_dump({
        "models": [fake_model_entry(fake_openai, "fake")],
        "history": {"data_dir": str(tmp_path / "a"), "mode": "shared", "url": pg_url},
        "runs": {"lease_seconds": LEASE}, "server": {"port": port},
    }), encoding="utf-8")
    log_path = tmp_path / "a.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "ChuanhuStyleChat.py"), "--config", str(config_file)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    b, b_address = start(fake_openai, pg_url, tmp_path / "b")
    try:
        a_address = f"http://127.0.0.1:{port}/"

        def answers() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return httpx.get(a_address, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, "app A to answer HTTP", timeout=60)
        streaming_on(fake_openai, sessions(a_address))
        wait_until(lambda: stored_reply(pg_url)[1].startswith(" word0 word1 word2"), "a checkpoint of the reply")
        viewer = sessions(b_address)
        viewer.open(viewer.ids()[0])
        follow = viewer.client.submit(api_name="/follow")
        checkpointed = stored_reply(pg_url)[1]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

        wait_until(lambda: stored_reply(pg_url)[2].startswith("The app process writing this reply stopped"),
                   "B to mark the killed process's reply interrupted", timeout=LEASE * 5)
        status, content, _ = stored_reply(pg_url)
        assert status == "interrupted" and content.startswith(checkpointed) and "word199" not in content
        wait_until(follow.done, "B's follow to end")
        shown = message_text(follow.outputs()[-1][-1])
        assert "Interrupted" in shown and "text so far is kept" in shown, shown
        assert shown.startswith(content.strip()[:40]) or content.strip()[:40] in shown
        with psycopg.connect(pg_url) as conn:  # A's lease and runs are gone; B's lease stays
            assert conn.execute("SELECT count(*) FROM live_runs").fetchone()[0] == 0
            assert [r[0] for r in conn.execute("SELECT id FROM app_processes")] == [b.chat.remote.bus.process_id]

        fake_openai.enqueue("B still answers.")
        other = sessions(b_address)
        other.new_chat()
        assert "B still answers." in other.say("a new chat on B")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        b.close()


def notes(conn: psycopg.Connection[Any], seconds: float = 0.3) -> list[RunEvent]:
    """The run events ``conn`` (LISTENing) received, read for ``seconds`` at most."""
    return [event for note in conn.notifies(timeout=seconds)
            if (event := event_of(note.channel, note.payload)) is not None]


def test_a_run_nobody_watches_elsewhere_sends_no_text_and_a_viewer_asks_for_it_all(
        fake_openai, sessions, pg_url, tmp_path):
    """Each process's work grows with its own streams: a reply streaming on A costs the other
    processes its begun and ended, not a notification per update, until a viewer on B opens it:
    B asks (watch), A sends the whole text so far (from character 0) then its growth."""
    a, a_address = start(fake_openai, pg_url, tmp_path / "a")
    b, b_address = start(fake_openai, pg_url, tmp_path / "b")
    with psycopg.connect(pg_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {RUNS_CHANNEL}")
        try:
            streaming_on(fake_openai, sessions(a_address))
            [run] = a.chat.runs.live()
            shown = len(run.reply.text)
            seen: list[RunEvent] = []
            wait_until(lambda: seen.extend(notes(listener)) or len(run.reply.text) > shown + 40,
                       "A's reply to grow by several words")
            seen.extend(notes(listener))
            assert [e.kind for e in seen] == ["begun"], seen  # no grew: nobody watches it elsewhere
            viewer = sessions(b_address)
            chatbot = viewer.open(viewer.ids()[0])[0]
            assert "word0 word1 word2 word3" in message_text(chatbot[-1])  # the text so far, at once
            grown = len(run.reply.text)
            wait_until(lambda: seen.extend(notes(listener)) or len(run.reply.text) > grown + 40,
                       "A's reply to grow on")
            seen.extend(notes(listener))
            kinds = [e.kind for e in seen]
            assert kinds[:2] == ["begun", "watch"] and kinds.count("watch") == 1, kinds
            grew = [e for e in seen if e.kind == "grew"]
            assert len(grew) >= 2 and grew[0].at == 0, grew  # the whole text first, then the tail
            text = ""
            for event in grew:
                assert event.at == len(text), (event.at, len(text))  # no gap, no overlap
                text += event.text or ""
            assert run.reply.text.startswith(text), (text, run.reply.text)
        finally:
            a.close()
            b.close()


def test_a_process_that_closes_ends_its_runs_for_the_others(fake_openai, sessions, pg_url, tmp_path):
    """A closed cleanly mid-stream (SIGTERM's path): its reply is marked interrupted at once, the
    viewer on B sees it end, without waiting for the lease."""
    a, a_address = start(fake_openai, pg_url, tmp_path / "a")
    b, b_address = start(fake_openai, pg_url, tmp_path / "b")
    try:
        streaming_on(fake_openai, sessions(a_address))
        wait_until(lambda: stored_reply(pg_url)[1].startswith(" word0 word1 word2"), "a checkpoint of the reply")
        viewer = sessions(b_address)
        viewer.open(viewer.ids()[0])
        follow = viewer.client.submit(api_name="/follow")
        wait_until(lambda: len(follow.outputs()) >= 1, "B following")
        a.chat.remote.close()  # (the reader goes on in A, but it no longer counts as A's)
        wait_until(follow.done, "B's follow to end", timeout=LEASE)
        assert stored_reply(pg_url)[0] in ("interrupted", "done")
    finally:
        a.close()
        b.close()

