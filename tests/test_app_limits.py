"""Per-user limits in the real app, through gradio_client and HTTP, with the real fake upstream:
the page refuses at the boundary and keeps the question, its usage line says what is left; two
apps on one PostgreSQL database count one owner's messages and live replies together; the HTTP
API answers 429 with the sentence and Retry-After. Waits are on conditions; nothing sleeps."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import httpx
import pytest
from gradio_client.exceptions import AppError

from modules.config import build_config
from modules.history.ownership import SHARED_OWNER
from tests.conftest import free_port, running_app
from tests.test_app_api import LONG, SLOW, wait_until
from tests.test_app_history import config, sessions, transcript  # noqa: F401,F811  (sessions: a fixture)
from tests.test_store import refuse_answers, usage_state


def start(fake_openai: Any, url: str, data_dir: Any, **sections: Any) -> tuple[Any, str]:
    """An app on the PostgreSQL database ``url`` (one process's worth: its own pool and runs)."""
    from modules.app import ChatApp

    data = {**config(fake_openai, history={"data_dir": str(data_dir), "url": url}, **sections),
            "server": {"port": free_port()}}
    app = ChatApp(build_config(data, env={}))
    app.build()
    _, address, _ = app.launch(prevent_thread_lock=True, quiet=True)
    return app, address


def stop(app: Any) -> None:
    app.demo.close()
    app.store.close()

TOKENS_SENTENCE = re.compile(r"You have used your 100 tokens for today; the limit resets at 00:00 UTC "
                             r"\(in (\d+ h \d+ min|\d+ min|\d+ s)\)\.")
API_KEY = "test-api-key-0123456789"


def refusal(call: Any) -> str:
    with pytest.raises(AppError) as caught:
        call()
    return str(caught.value)


def test_the_page_refuses_at_the_token_limit_keeps_the_question_and_shows_what_is_left(
        fake_openai, launch_app, sessions, tmp_path):
    url = launch_app(config(fake_openai, limits={"per_user": {"tokens_per_day": 100}},
                            history={"data_dir": str(tmp_path)}))
    session = sessions(url)
    fake_openai.enqueue("First answer.", usage={"prompt_tokens": 60, "completion_tokens": 39})
    assert "First answer." in session.say("first question")
    conversation_id = session.ids()[0]
    usage = session.open(conversation_id)[2]
    assert "Today: 1 of 100 tokens left" in usage, usage

    fake_openai.enqueue("Second answer.", usage={"prompt_tokens": 1, "completion_tokens": 0})
    assert "Second answer." in session.say("second question")  # 99 used: allowed (and it reaches 100)
    assert "Today: 0 of 100 tokens left" in session.open(conversation_id)[2]

    session.add("third question")
    message = refusal(session.respond)
    assert TOKENS_SENTENCE.search(message), message
    assert "Your message is kept" in message
    stopped = session.stop()
    status = next(v for v in stopped if isinstance(v, str) and "tokens for today" in v)  # the status line says it too
    assert TOKENS_SENTENCE.search(status), status
    chatbot = session.open(conversation_id)[0]
    assert transcript(chatbot)[-1] == ("user", "third question")  # the question stays
    assert len(fake_openai.requests) == 2  # no model was called for it


def test_two_apps_on_one_database_count_one_users_replies_and_messages_together(
        fake_openai, sessions, pg_url, tmp_path):
    limits = {"per_user": {"concurrent_replies": 2, "messages_per_minute": 3}}
    data = {"limits": limits}
    one, one_address = start(fake_openai, pg_url, tmp_path / "one", **data)
    two, two_address = start(fake_openai, pg_url, tmp_path / "two", **data)
    try:
        # shared mode: every session of both apps is the one owner "local"
        first, second = sessions(one_address), sessions(one_address)
        for s in (first, second):  # two long replies streaming on the first app
            fake_openai.enqueue(*LONG, delay=SLOW)
            s.add("a long story")
        jobs = [first.submit_respond()]
        wait_until(lambda: fake_openai.chunks_sent >= 1, "the first reply to stream")
        jobs.append(second.submit_respond())
        wait_until(lambda: len(fake_openai.requests) == 2, "the second reply to start")
        other = sessions(two_address)
        other.add("asked on the second app")
        message = refusal(other.respond)
        assert message.startswith("You already have the most replies streaming at once (2); send again when "
                                  "one of them ends."), message
        for s in (first, second):
            s.stop()
        for job in jobs:
            wait_until(job.done, "a stopped reply's job to end")

        fake_openai.enqueue("Now it may.")  # the third message of the minute, on the second app
        assert "Now it may." in message_of(other.respond())
        fake_openai.enqueue("Never sent.")
        first.add("a fourth message")
        message = refusal(first.respond)  # on the first app: three were sent in all
        assert re.match(r"You have sent 3 messages in the last minute, the most allowed per minute; you can send "
                        r"again at \d\d:\d\d:\d\d UTC \(in \d+ s\)\.", message), message
        assert len(fake_openai.requests) == 3
    finally:
        stop(one)
        stop(two)


def message_of(chatbot: list[dict[str, Any]]) -> str:
    return transcript(chatbot)[-1][1]


def test_the_api_answers_429_with_the_sentence_and_retry_after(fake_openai, tmp_path):
    data = {**config(fake_openai, history={"data_dir": str(tmp_path)}),
            "api": {"enabled": True, "keys": [API_KEY]},
            "limits": {"per_user": {"tokens_per_day": 100, "models": {"fake": {"tokens_per_day": 10}}}}}
    with running_app(data) as (app, url):
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}
        fake_openai.enqueue("Hello.", usage={"prompt_tokens": 6, "completion_tokens": 5})
        ok = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert ok.status_code == 200, ok.text
        refused = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert re.fullmatch(r"You have used your 10 tokens of fake for today; the limit resets at 00:00 UTC "
                            r"\(in (\d+ h \d+ min|\d+ min|\d+ s)\)\.", error["message"]), error
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["Retry-After"]) <= 86400
        assert len(fake_openai.requests) == 1
        # counted against the key, by a hash of it (never the key itself)
        [row] = app.store.usage_since(0)
        assert row.owner == "api:" + hashlib.sha256(API_KEY.encode()).hexdigest()[:16]
        assert (row.model, row.replies, row.prompt_tokens, row.completion_tokens) == ("fake", 1, 6, 5)
        assert API_KEY not in row.owner


def runs_ended(app: Any) -> bool:
    """Every run of the app has ended and finished (settled, saved): nothing writes for it any more."""
    return all(run.done for run in list(app.chat.runs._runs.values()))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_replys_tokens_count_once_and_its_lease_goes_whether_or_not_it_can_be_saved(
        fake_openai, sessions, tmp_path, backend, request):
    """A reply saved to the history is counted with it (one transaction); one whose save fails (the
    database refuses it: a trigger) or is skipped (it cannot be placed) is counted all the same,
    once, and its lease dropped: the next message of a user allowed one reply at a time is not
    refused."""
    history = {"data_dir": str(tmp_path)}
    if backend == "postgresql":
        history["url"] = request.getfixturevalue("pg_url")
    data = config(fake_openai, history=history,
                  limits={"per_user": {"concurrent_replies": 1, "tokens_per_day": 1000}})
    with running_app(data) as (app, url):
        alone: list[Any] = []  # the settlements written on their own, not with a reply
        settle_usage = app.store.settle_usage
        app.store.settle_usage = lambda settlement: (alone.append(settlement), settle_usage(settlement))[1]
        session = sessions(url)
        fake_openai.enqueue("Saved answer.", usage={"prompt_tokens": 60, "completion_tokens": 39})
        assert "Saved answer." in session.say("first question")
        wait_until(lambda: runs_ended(app), "the first reply's run to finish")
        assert usage_state(app.store) == (0, [(60, 39)])
        assert alone == []  # written by the transaction that saved the reply
        [conversation_id] = session.ids()
        record = app.store.load(SHARED_OWNER, conversation_id)
        assert record is not None and [m.content for m in record.messages] == ["first question", "Saved answer."]

        refuse_answers(app.store, "Never saved.")
        fake_openai.enqueue("Never saved.", usage={"prompt_tokens": 7, "completion_tokens": 3})
        assert "Never saved." in session.say("second question")  # admitted: the first lease is gone
        wait_until(lambda: runs_ended(app), "the second reply's run to finish")
        assert usage_state(app.store) == (0, [(60, 39), (7, 3)])  # counted once, its lease gone
        assert [s.event.prompt_tokens for s in alone] == [7]  # on its own, the save having failed
        record = app.store.load(SHARED_OWNER, conversation_id)
        assert record is not None and "Never saved." not in [m.content for m in record.messages]

        # The next question follows that answer, which the history does not have: neither it nor its
        # answer can be saved (the save is skipped), and the answer is counted on its own, once.
        fake_openai.enqueue("Third answer.", usage={"prompt_tokens": 1, "completion_tokens": 1})
        assert "Third answer." in session.say("third question")
        wait_until(lambda: runs_ended(app), "the third reply's run to finish")
        assert usage_state(app.store) == (0, [(60, 39), (7, 3), (1, 1)])
        assert [s.event.prompt_tokens for s in alone] == [7, 1]
        assert [row.replies for row in app.store.usage_since(0)] == [3]
        record = app.store.load(SHARED_OWNER, conversation_id)
        assert record is not None
        assert [m.content for m in record.messages] == ["first question", "Saved answer.", "second question"]
