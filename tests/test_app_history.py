"""History end to end through gradio_client: the real app on a real port, the real fake upstream.

Each test launches ``ChatApp`` (``launch_app``, or by hand for a restart) and
drives the page's own endpoints (``/add_message``, ``/respond``, ``/search``,
``/open``, ``/rename``, ``/delete``, ``/new_chat``, ``/export_*``, ``/import``)
the way the page does, one ``Client`` per browser session. Waits are on
conditions with deadlines; nothing sleeps.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, AuthenticationError

from modules.auth import hash_password
from modules.web.render import body_of
from modules.config import build_config
from tests.conftest import fake_model_entry, free_port
from tests.fakes.openai_server import FakeOpenAIServer
from tests.test_app_api import LONG, SLOW, wait_until

MODEL = "fake"
SYSTEM = "You are terse."
NEUTRAL = (1.0, 1.0, 0, "", 0, 0, -1)  # temperature, top_p, max_tokens, stop, presence, frequency, seed


# -- helpers ------------------------------------------------------------------------------
def message_text(message: dict[str, Any]) -> str:
    """The text of one chatbot message as gradio_client returns it (a string or a list of parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def transcript(chatbot: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], message_text(m)) for m in chatbot]


class Session:
    """One page session (one gradio_client ``Client``), calling the page's endpoints."""

    def __init__(self, client: Client, model: str = MODEL, system_prompt: str = SYSTEM):
        self.client, self.model, self.system_prompt = client, model, system_prompt

    def add(self, text: str, query: str = "") -> tuple[Any, ...]:
        return self.client.predict({"text": text, "files": []}, self.model, self.system_prompt, query,
                                   api_name="/add_message")

    def respond(self, model: str | None = None) -> list[dict[str, Any]]:
        return self.client.predict(model or self.model, self.system_prompt, *NEUTRAL, api_name="/respond")

    def stop(self) -> tuple[Any, ...]:
        """The Stop button: (send, stop, status, usage_html, history, chatbot)."""
        return self.client.predict(self.model, "", api_name="/stop")

    def submit_respond(self):
        return self.client.submit(self.model, self.system_prompt, *NEUTRAL, api_name="/respond")

    def say(self, text: str, model: str | None = None) -> str:
        """Send ``text`` and wait for the whole reply; the text of the last bot message."""
        self.add(text)
        chatbot = self.respond(model)
        assert chatbot and chatbot[-1]["role"] == "assistant", chatbot
        return message_text(chatbot[-1])

    def search(self, query: str = "") -> list[tuple[str, str]]:
        """The history list: (title, id) pairs, newest first."""
        update = self.client.predict(query, api_name="/search")
        return [tuple(choice) for choice in update["choices"]]

    def ids(self, query: str = "") -> list[str]:
        return [cid for _, cid in self.search(query)]

    def open(self, conversation_id: str) -> tuple[Any, ...]:
        """Click ``conversation_id`` in the unfiltered list, as on the page (Gradio checks a Radio's
        value against the choices the session was last sent); (chatbot, status, usage_html, model,
        system_prompt, title, send, stop, history, open conversation id)."""
        self.search("")
        return self.client.predict(conversation_id, "", api_name="/open")

    def rename(self, title: str) -> dict[str, Any]:
        return self.client.predict(title, "", api_name="/rename")

    def delete(self) -> tuple[Any, ...]:
        return self.client.predict(self.model, "", api_name="/delete")

    def new_chat(self) -> tuple[Any, ...]:
        return self.client.predict(self.model, "", api_name="/new_chat")

    def export(self, fmt: str) -> Path:
        """Export the open conversation; the downloaded file."""
        update = self.client.predict(api_name="/export_markdown" if fmt == "md" else "/export_json")
        assert isinstance(update, dict) and update.get("value"), f"no file exported: {update!r}"
        return Path(update["value"])

    def export_json(self) -> dict[str, Any]:
        return json.loads(self.export("json").read_text(encoding="utf-8"))

    def import_file(self, path: Path) -> tuple[Any, ...]:
        return self.client.predict(handle_file(str(path)), "", api_name="/import")


@pytest.fixture
def sessions() -> Iterator[Callable[..., Session]]:
    made: list[Client] = []

    def make(url: str, **kwargs: Any) -> Session:
        auth = kwargs.pop("auth", None)
        client = Client(url, verbose=False, auth=auth) if auth else Client(url, verbose=False)
        made.append(client)
        return Session(client, **kwargs)

    yield make
    # Client.close() waits up to 1 s for its heartbeat thread: close them all at once
    closing = [threading.Thread(target=client.close) for client in made]
    for thread in closing:
        thread.start()
    for thread in closing:
        thread.join()


def config(server: FakeOpenAIServer, mode: str = "shared", **sections: Any) -> dict[str, Any]:
    history = {"mode": mode, **sections.pop("history", {})}
    models = sections.pop("models", None) or [fake_model_entry(server, MODEL)]
    return {"models": models, "history": history, **sections}


def strip_times(document: dict[str, Any]) -> dict[str, Any]:
    """An export without what an import may change: timestamps and the title."""
    drop = {"created_at", "updated_at", "finished_at", "title"}
    out = {k: v for k, v in document.items() if k not in drop}
    out["messages"] = [{k: v for k, v in m.items() if k not in drop} for m in document["messages"]]
    return out


# -- whose history --------------------------------------------------------------------------
def test_each_logged_in_user_sees_only_their_own(fake_openai, launch_app, sessions):
    users = {"alice": hash_password("alice-secret"), "bob": hash_password("bob-secret")}
    url = launch_app(config(fake_openai, auth={"users": users}))
    alice = sessions(url, auth=("alice", "alice-secret"))
    bob = sessions(url, auth=("bob", "bob-secret"))

    fake_openai.enqueue("Alice's reply about zebras.")
    alice.say("alice asks about zebras")
    fake_openai.enqueue("Bob's reply about penguins.")
    bob.say("bob asks about penguins")

    alice_list, bob_list = alice.search(), bob.search()
    assert [title for title, _ in alice_list] == ["alice asks about zebras"]
    assert [title for title, _ in bob_list] == ["bob asks about penguins"]
    assert bob.search("zebras") == [] and alice.search("penguins") == []

    # bob knows alice's id: opening it gives him nothing of hers (Gradio may refuse it first)
    alice_id = alice_list[0][1]
    try:
        seen: Any = bob.open(alice_id)
    except AppError as exc:
        seen = str(exc)
    for what in (seen, bob.search(), bob.export_json()):
        assert "zebra" not in json.dumps(what, default=str), f"bob saw alice's conversation: {what!r}"
    # alice's conversation is untouched
    assert transcript(alice.open(alice_id)[0])[0] == ("user", "alice asks about zebras")

    # a wrong password or an unknown user is refused at login (Gradio answers 400: a ValueError here)
    for wrong in (("alice", "bob-secret"), ("mallory", "alice-secret"), ("alice", "")):
        with pytest.raises((AuthenticationError, ValueError), match="login"):
            Client(url, verbose=False, auth=wrong)
    with pytest.raises(AuthenticationError):  # and nobody gets in without logging in
        Client(url, verbose=False)


def test_per_browser_mode_without_login_keeps_sessions_apart(fake_openai, launch_app, sessions):
    url = launch_app(config(fake_openai, mode="per_browser"))
    one, two = sessions(url), sessions(url)
    fake_openai.enqueue("One.")
    one.say("first browser question")
    fake_openai.enqueue("Two.")
    two.say("second browser question")
    fake_openai.enqueue("Three.")
    one.new_chat()
    one.say("first browser again")

    assert [t for t, _ in one.search()] == ["first browser again", "first browser question"]
    assert [t for t, _ in two.search()] == ["second browser question"]
    assert two.search("first") == []
    assert sessions(url).search() == [], "a new session sees someone else's history"


def test_shared_mode_is_one_history_for_every_session(fake_openai, launch_app, sessions):
    url = launch_app(config(fake_openai, mode="shared"))
    one, two = sessions(url), sessions(url)
    fake_openai.enqueue("Shared reply.")
    one.say("a desktop question")

    listed = two.search()
    assert [t for t, _ in listed] == ["a desktop question"]
    chatbot = two.open(listed[0][1])[0]
    assert transcript(chatbot)[0] == ("user", "a desktop question")
    assert "Shared reply." in transcript(chatbot)[1][1]


def test_history_survives_a_restart(fake_openai, sessions, tmp_path):
    from modules.app import ChatApp

    def start() -> tuple[ChatApp, str]:
        """The app on ``tmp_path``, shared mode (launch_app would keep it running to the end)."""
        data = {**config(fake_openai, history={"data_dir": str(tmp_path)}), "server": {"port": free_port()}}
        app = ChatApp(build_config(data, env={}))
        app.build()
        _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
        return app, url

    def stop(app: ChatApp) -> None:
        app.demo.close()
        app.store.close()

    app, url = start()
    try:
        fake_openai.enqueue("Kept across restarts.")
        sessions(url).say("will you remember this?")
    finally:
        stop(app)

    app, url = start()
    try:
        session = sessions(url)
        listed = session.search()
        assert [t for t, _ in listed] == ["will you remember this?"]
        chatbot, _, _, _, _, title, *_ = session.open(listed[0][1])
        assert transcript(chatbot)[0] == ("user", "will you remember this?")
        assert "Kept across restarts." in transcript(chatbot)[1][1]
        assert title == "will you remember this?"
    finally:
        stop(app)


# -- what is saved ----------------------------------------------------------------------------
def test_a_reply_stopped_mid_stream_is_saved_as_stopped(fake_openai, launch_app, sessions):
    url = launch_app(config(fake_openai))
    writer, reader = sessions(url), sessions(url)
    fake_openai.enqueue(*LONG, delay=SLOW)
    writer.add("Tell me a long story")
    job = writer.submit_respond()

    def shown() -> str:
        outputs = job.outputs()
        last = outputs[-1] if outputs else []
        return message_text(last[-1]) if len(last) == 2 else ""

    wait_until(lambda: "word3" in shown() or job.done(), "a few tokens of the reply")
    assert not job.done(), f"the reply ended before it could be stopped: {job.status()}"
    partial = shown()
    writer.stop()
    assert fake_openai.disconnected.wait(timeout=5), "the upstream was not closed"

    conversation_id = reader.ids()[0]

    def saved_stopped() -> Any:
        chatbot = reader.open(conversation_id)[0]
        return chatbot if len(chatbot) == 2 and "Stopped." in message_text(chatbot[-1]) else None

    chatbot = wait_until(saved_stopped, "the stopped reply in the history")
    text = message_text(chatbot[-1])
    assert partial.strip() in text, (partial, text)
    assert "word199" not in text

    document = reader.export_json()
    assert [m["role"] for m in document["messages"]] == ["user", "assistant"]
    reply = document["messages"][-1]
    assert reply["status"] == "stopped"
    assert reply["content"].startswith(" word0 word1 word2 word3")
    assert "word199" not in reply["content"]
    assert not fake_openai.completed.is_set()


def test_the_question_is_saved_even_when_the_upstream_fails(fake_openai, launch_app, sessions):
    url = launch_app(config(fake_openai))
    writer, reader = sessions(url), sessions(url)
    fake_openai.enqueue(status=500, error={"message": "the GPU caught fire"})

    writer.add("Will this fail?")
    # saved at once, before any reply
    listed = reader.search()
    assert [t for t, _ in listed] == ["Will this fail?"]

    shown = message_text(writer.respond()[-1])
    assert "500" in shown

    chatbot = reader.open(listed[0][1])[0]
    assert transcript(chatbot)[0] == ("user", "Will this fail?")
    assert "500" in message_text(chatbot[-1])
    reply = reader.export_json()["messages"][-1]
    assert reply["status"] == "error"
    assert "500" in reply["error"] and reply["content"] == ""


# -- the sidebar ------------------------------------------------------------------------------
def test_search_rename_delete_and_new_chat(fake_openai, launch_app, sessions):
    url = launch_app(config(fake_openai))
    session = sessions(url)
    fake_openai.enqueue("Giraffes are tall.")
    session.say("tell me about animals")
    first = session.ids()[0]
    session.new_chat()
    fake_openai.enqueue("Paris is in France.")
    session.say("where is Paris")
    second = session.ids()[0]

    # both listed, the newest first
    assert session.ids() == [second, first]
    # by title, case-insensitively; and by a word that is only in a reply
    assert session.ids("ANIMALS") == [first]
    assert session.ids("giraffes") == [first]
    assert session.ids("france") == [second]
    assert session.ids("no such words") == []

    # rename the open conversation (the second)
    update = session.rename("  Travel notes  ")
    assert {cid: t for t, cid in update["choices"]}[second] == "Travel notes"
    assert session.search("travel") == [("Travel notes", second)]
    assert {cid: t for t, cid in session.search()}[first] == "tell me about animals"

    # delete it: gone from the list, the chat emptied
    chatbot, *_ = session.delete()  # (the confirmation row is not among the API's outputs)
    assert chatbot == []
    assert session.ids() == [first]
    assert session.ids("paris") == []
    # a session never sees the deleted one again
    assert sessions(url).ids() == [first]


def test_new_chat_keeps_the_old_conversation(fake_openai, launch_app, sessions):
    url = launch_app(config(fake_openai))
    session = sessions(url)
    fake_openai.enqueue("A1.")
    session.say("question A")
    chatbot, *_ = session.new_chat()
    assert chatbot == []
    assert [t for t, _ in session.search()] == ["question A"]
    fake_openai.enqueue("B1.")
    session.say("question B")
    assert [t for t, _ in session.search()] == ["question B", "question A"]
    # the old one is whole
    chatbot = session.open(session.ids()[1])[0]
    assert transcript(chatbot)[0] == ("user", "question A")
    assert "A1." in transcript(chatbot)[1][1]


# -- export and import --------------------------------------------------------------------------
def two_rounds(fake: FakeOpenAIServer, session: Session) -> None:
    fake.enqueue("The answer is", " four.", usage={"prompt_tokens": 31, "completion_tokens": 4})
    session.say("What is 2 + 2?")
    fake.enqueue("It is", " nine.", usage={"prompt_tokens": 52, "completion_tokens": 3})
    session.say("And 3 * 3?")


def test_export_markdown_and_json_then_import_it_back(fake_openai, launch_app, sessions):
    url = launch_app(config(fake_openai))
    session = sessions(url)
    two_rounds(fake_openai, session)
    original_id = session.ids()[0]

    markdown = session.export("md").read_text(encoding="utf-8")
    for text in ("# What is 2 + 2?", "What is 2 + 2?", "The answer is four.", "And 3 * 3?", "It is nine.",
                 f"Model: {MODEL}", f"> {SYSTEM}", "tokens in 31 · out 4", "tokens in 52 · out 3"):
        assert text in markdown, f"{text!r} is not in the Markdown export:\n{markdown}"
    assert markdown.index("What is 2 + 2?") < markdown.index("The answer is four.") < markdown.index("And 3 * 3?")

    path = session.export("json")
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["format"] == "chuanhustylechat.conversation"
    assert document["model"] == MODEL and document["system_prompt"] == SYSTEM
    assert [(m["role"], m["content"]) for m in document["messages"]] == [
        ("user", "What is 2 + 2?"), ("assistant", "The answer is four."),
        ("user", "And 3 * 3?"), ("assistant", "It is nine."),
    ]
    replies = [m for m in document["messages"] if m["role"] == "assistant"]
    assert [r["usage"]["input_tokens"] for r in replies] == [31, 52]
    assert [r["usage"]["output_tokens"] for r in replies] == [4, 3]
    assert all(r["model"] == MODEL and r["status"] == "done" for r in replies)

    chatbot, *_ = session.import_file(path)
    assert [text for _, text in transcript(chatbot)][::2] == ["What is 2 + 2?", "And 3 * 3?"]
    ids = session.ids()
    assert len(ids) == 2 and original_id in ids, "the import is not a new conversation"
    imported = next(cid for cid in ids if cid != original_id)
    assert {cid: t for t, cid in session.search()}[imported] == "What is 2 + 2?"
    session.open(imported)
    again = session.export_json()
    assert strip_times(again) == strip_times(document)


BROKEN_IMPORTS = {
    "not JSON": b"this is not JSON {",
    "not UTF-8": b"\xff\xfe\x00garbage",
    "another format": json.dumps({"format": "something.else", "version": 1, "messages": []}).encode(),
    "a reply first": json.dumps({"format": "chuanhustylechat.conversation", "version": 1,
                                 "messages": [{"role": "assistant", "content": "no question first"}]}).encode(),
    "an unknown role": json.dumps([{"role": "robot", "content": "beep boop"}]).encode(),
}


def test_importing_a_broken_file_changes_nothing(fake_openai, launch_app, sessions, tmp_path):
    url = launch_app(config(fake_openai))
    session = sessions(url)
    fake_openai.enqueue("Still here.")
    session.say("keep me")
    before = session.search()
    for what, content in BROKEN_IMPORTS.items():
        broken = tmp_path / "broken.json"
        broken.write_bytes(content)
        result = session.import_file(broken)
        shown = json.dumps(result, default=str)
        assert "no question first" not in shown and "beep boop" not in shown, f"{what}: imported {shown}"
        assert session.search() == before, f"{what}: the history changed"
        # the open conversation is still the one that was open
        assert session.export_json()["messages"][0]["content"] == "keep me", what


def test_an_export_stays_inside_the_exports_folder(fake_openai, launch_app, sessions, tmp_path):
    data_dir = tmp_path / "deep" / "a" / "b" / "c" / "data"
    url = launch_app(config(fake_openai, history={"data_dir": str(data_dir)}))
    session = sessions(url)
    fake_openai.enqueue("Fine.")
    session.say("innocent question")
    marker = f"evil-{uuid.uuid4().hex}"
    session.rename(f"../../../../tmp/{marker}")
    assert session.search()[0][0] == f"../../../../tmp/{marker}"

    exports = data_dir / "exports"
    for fmt in ("md", "json"):
        downloaded = session.export(fmt)
        assert "/" not in downloaded.name and "\\" not in downloaded.name and ".." not in downloaded.name
        assert marker in downloaded.name
    written = [p for p in exports.rglob("*") if p.is_file()]
    assert len(written) == 2, written
    for path in written:
        assert path.resolve().is_relative_to(exports.resolve()), path
        assert marker in path.name and ".." not in path.name
    # nothing written where the title points (from the exports folder, or from anywhere near it)
    assert not list(Path("/tmp").glob(f"*{marker}*"))
    outside = [p for p in tmp_path.rglob(f"*{marker}*") if not p.resolve().is_relative_to(exports.resolve())]
    assert outside == []


# -- context and cost ----------------------------------------------------------------------------
REPLY = [" hello"] * 200  # 200 tokens: one round is some 215 tokens


def long_rounds(fake: FakeOpenAIServer, session: Session, count: int) -> None:
    for i in range(1, count + 1):
        fake.enqueue(*REPLY)
        session.say(f"Round {i}: say hello many times.")


def small_context(server: FakeOpenAIServer, strategy: str) -> dict[str, Any]:
    # budget: 600 - 100 reserved = 500 tokens: the system prompt, two rounds and a question fit, three do not
    return config(server, models=[fake_model_entry(server, MODEL, context_size=600)],
                  context={"strategy": strategy, "reserve_output_tokens": 100})


def test_old_rounds_are_left_out_to_fit_the_context(fake_openai, launch_app, sessions):
    url = launch_app(small_context(fake_openai, "trim"))
    session = sessions(url)
    long_rounds(fake_openai, session, 4)
    fake_openai.enqueue("Short answer.")
    text = session.say("Final question?")

    sent = fake_openai.requests[-1].body["messages"]
    assert sent[0] == {"role": "system", "content": SYSTEM}
    assert [m["content"] for m in sent if m["role"] == "user"] == [
        "Round 3: say hello many times.", "Round 4: say hello many times.", "Final question?"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user", "assistant", "user"]
    # earlier replies go back as they were written: the note shown with round 4 is not part of them
    assert [m["content"] for m in sent if m["role"] == "assistant"] == ["".join(REPLY)] * 2
    assert "The 2 oldest round(s) were left out" in text, text
    assert body_of(text) == "Short answer.", text  # the note follows the answer, with the page's marks
    # no summary was asked for
    assert all(r.body["messages"][0]["content"] == SYSTEM for r in fake_openai.requests)
    # the history still has every round
    document = session.export_json()
    assert len(document["messages"]) == 10
    assert document["messages"][-1]["dropped_rounds"] == 2


def test_old_rounds_are_summarised_with_the_summarize_strategy(fake_openai, launch_app, sessions):
    url = launch_app(small_context(fake_openai, "summarize"))
    session = sessions(url)
    long_rounds(fake_openai, session, 3)
    assert len(fake_openai.requests) == 3
    fake_openai.enqueue("The user wants hellos.")  # the summary
    fake_openai.enqueue("Short answer.")
    text = session.say("Final question?")

    assert len(fake_openai.requests) == 5
    summary_request = fake_openai.requests[3].body["messages"]
    assert summary_request[0]["role"] == "system"
    assert summary_request[0]["content"].startswith("Summarise the conversation")
    assert "Round 1: say hello many times." in summary_request[-1]["content"]
    assert "Round 2" not in summary_request[-1]["content"]

    sent = fake_openai.requests[4].body["messages"]
    assert sent[0] == {"role": "system", "content": SYSTEM}
    assert sent[1]["role"] == "system"
    assert sent[1]["content"].startswith("Summary of the earlier conversation")
    assert sent[1]["content"].endswith("The user wants hellos.")
    assert [m["content"] for m in sent if m["role"] == "user"] == [
        "Round 2: say hello many times.", "Round 3: say hello many times.", "Final question?"]
    assert "The 1 oldest round(s) were replaced by a summary" in text, text


def test_reply_footer_and_usage_show_counts_and_cost(fake_openai, launch_app, sessions):
    models = [fake_model_entry(fake_openai, "priced", price={"input": 1.0, "output": 2.0}),
              fake_model_entry(fake_openai, "unpriced")]
    url = launch_app(config(fake_openai, models=models))
    session = sessions(url, model="priced")

    fake_openai.enqueue("Priced answer.", usage={"prompt_tokens": 120, "completion_tokens": 45})
    text = session.say("How much?")
    # (120 * $1 + 45 * $2) per million tokens = $0.00021
    assert "tokens in 120 · out 45 · $0.00021" in text, text
    conversation_id = session.ids()[0]
    _, _, usage, model, *_ = session.open(conversation_id)
    assert model == "priced"
    assert "tokens in 120 · out 45 · $0.00021" in usage, usage
    assert "Context: 165 / 8,192 tokens" in usage, usage

    fake_openai.enqueue("Free answer.", usage={"prompt_tokens": 200, "completion_tokens": 10})
    text = session.say("And this one?", model="unpriced")
    assert "tokens in 200 · out 10 · price unknown" in text, text
    _, _, usage, *_ = session.open(conversation_id)
    assert "tokens in 320 · out 55 · price unknown" in usage, usage
    assert "Context: 210 / 8,192 tokens" in usage, usage


def test_a_rename_while_the_reply_streams_survives_the_replys_save(fake_openai, launch_app, sessions):
    """The reply is a run that saves itself when it ends: the name given meanwhile stays."""
    url = launch_app(config(fake_openai))
    page = sessions(url)
    fake_openai.enqueue(*LONG[:40], delay=SLOW)
    page.add("Tell me a long story")
    job = page.submit_respond()
    wait_until(lambda: fake_openai.chunks_sent >= 3, "the reply under way")
    page.rename("Bedtime story")
    assert not job.done(), "the reply ended before the rename could be tested"
    job.result(timeout=60)
    assert [title for title, _ in page.search()] == ["Bedtime story"]
    document = page.export_json()
    assert document["title"] == "Bedtime story" and document["messages"][-1]["status"] == "done"
