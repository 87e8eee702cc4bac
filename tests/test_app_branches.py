"""Edit and branches end to end through gradio_client: the real app on a real port, the fake
OpenAI server as the upstream (it records every request, so what the model was sent is known).

A session edits a message with ``/edit`` (what the chatbot's edit control does), follows the
chatbot's links with ``/act`` ("v:<id>:±1" the versions, "continue:<id>", "fork:<id>") and
asks for the answer with ``/respond``, as the page's event chains do.
"""

from __future__ import annotations

import json
import re
from typing import Any

from modules.web.render import body_of
from tests.conftest import fake_model_entry
from tests.fakes.openai_server import FakeOpenAIServer
from tests.test_app_history import Session, message_text, sessions  # noqa: F401 (a fixture)

MODEL = "fake"


def links(content: str) -> list[str]:
    return re.findall(r"\(#chuanhu:([^ )|]+)", content)


def bodies(chatbot: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], body_of(message_text(m))) for m in chatbot]


def sent(fake: FakeOpenAIServer, request: int = -1) -> list[tuple[str, str]]:
    """The messages of a chat request the fake received (the last by default)."""
    chats = [r for r in fake.requests if r.path.endswith("/chat/completions")]
    return [(m["role"], m["content"]) for m in chats[request].body["messages"]]


def start(fake: FakeOpenAIServer, launch_app, **config: Any) -> str:
    return launch_app({"models": [fake_model_entry(fake, MODEL)], "history": {"mode": "shared"}, **config})


def say(session: Session, fake: FakeOpenAIServer, question: str, answer: str) -> list[dict[str, Any]]:
    fake.enqueue(answer)
    session.add(question)
    return session.respond()


def act(session: Session, action: str) -> tuple[Any, ...]:
    """A link of the chatbot: (chatbot, send, stop, status, usage, history, title)."""
    return session.client.predict(action + "|1", session.model, "", api_name="/act")


def edit(session: Session, index: int, text: str) -> tuple[Any, ...]:
    return session.client.predict(index, text, session.model, session.system_prompt, "", api_name="/edit_message")


def versions_link(chatbot: list[dict[str, Any]], index: int, step: int) -> str:
    found = [a for a in links(message_text(chatbot[index])) if a.startswith("v:") and a.endswith(f":{step}")]
    assert found, f"no {step:+d} version link on message {index}: {message_text(chatbot[index])!r}"
    return found[0]


def test_edit_a_middle_question_then_switch_back(launch_app, sessions) -> None:
    with FakeOpenAIServer() as fake:
        page = sessions(start(fake, launch_app))
        for n in (1, 2, 3):
            say(page, fake, f"question {n}", f"answer {n}")
        edited = edit(page, 2, "question 2, better")  # message 2: the second question
        assert bodies(edited[0]) == [("user", "question 1"), ("assistant", "answer 1"),
                                     ("user", "question 2, better")]
        fake.enqueue("answer 2, better")
        chatbot = page.respond()
        # The model saw the branch: round 1, then the edited question; not rounds 2 and 3.
        assert sent(fake) == [("system", page.system_prompt), ("user", "question 1"), ("assistant", "answer 1"),
                              ("user", "question 2, better")]
        assert bodies(chatbot)[-1] == ("assistant", "answer 2, better")
        assert "2 / 2" in message_text(chatbot[2])
        back = act(page, versions_link(chatbot, 2, -1))[0]
        assert bodies(back) == [("user", "question 1"), ("assistant", "answer 1"), ("user", "question 2"),
                                ("assistant", "answer 2"), ("user", "question 3"), ("assistant", "answer 3")]
        assert "1 / 2" in message_text(back[2])
        # What comes next is asked on the branch shown.
        say(page, fake, "question 4", "answer 4")
        assert [c for _, c in sent(fake)][-3:] == ["question 3", "answer 3", "question 4"]
        # Reopened (another session), the conversation shows the branch last viewed.
        other = sessions(page.client.src)
        [conversation_id] = other.ids()
        reopened = other.open(conversation_id)[0]
        assert [c for _, c in bodies(reopened)][-2:] == ["question 4", "answer 4"]


def test_regenerate_three_times_and_step_through(launch_app, sessions) -> None:
    with FakeOpenAIServer() as fake:
        page = sessions(start(fake, launch_app))
        say(page, fake, "pick a number", "one")
        for word in ("two", "three", "four"):
            fake.enqueue(word)
            page.client.predict(MODEL, page.system_prompt, api_name="/regenerate")
            chatbot = page.respond()
        assert body_of(message_text(chatbot[-1])) == "four" and "4 / 4" in message_text(chatbot[-1])
        seen = []
        for _ in range(3):
            chatbot = act(page, versions_link(chatbot, 1, -1))[0]
            seen.append(body_of(message_text(chatbot[-1])))
        assert seen == ["three", "two", "one"]
        assert "1 / 4" in message_text(chatbot[-1])
        # The usage line counts what was generated on every branch (4 answers); each ~1 token.
        update = act(page, versions_link(chatbot, 1, 1))
        assert "2 / 4" in message_text(update[0][-1])


def test_edit_an_answer_keeps_the_original(launch_app, sessions) -> None:
    with FakeOpenAIServer() as fake:
        page = sessions(start(fake, launch_app))
        say(page, fake, "capital of France?", "Lyon")
        say(page, fake, "and of Italy?", "Rome")
        chatbot = edit(page, 1, "Paris")[0]
        assert bodies(chatbot) == [("user", "capital of France?"), ("assistant", "Paris")]
        assert "Edited" in message_text(chatbot[1])
        say(page, fake, "and of Spain?", "Madrid")
        assert sent(fake)[1:] == [("user", "capital of France?"), ("assistant", "Paris"), ("user", "and of Spain?")]
        back = act(page, versions_link(page.open(page.ids()[0])[0], 1, -1))[0]
        assert [c for _, c in bodies(back)] == ["capital of France?", "Lyon", "and of Italy?", "Rome"]


def test_continue_a_reply_cut_by_the_token_limit(launch_app, sessions) -> None:
    with FakeOpenAIServer() as fake:
        page = sessions(start(fake, launch_app))
        fake.enqueue("one", " two", finish_reason="length")
        page.add("count")
        chatbot = page.respond()
        [go_on] = [a for a in links(message_text(chatbot[-1])) if a.startswith("continue:")]
        fake.enqueue(" three", " four")
        act(page, go_on)
        chatbot = page.respond()
        assert body_of(message_text(chatbot[-1])).startswith("one two three four")
        # Not a continuation-capable upstream (continuation: request): the partial answer is sent,
        # then a request to go on from it.
        roles = [role for role, _ in sent(fake)]
        assert roles[-2:] == ["assistant", "user"] and sent(fake)[-2][1] == "one two"
        assert not [a for a in links(message_text(chatbot[-1])) if a.startswith("continue:")]


def test_fork_copies_the_branch_into_a_new_conversation(launch_app, sessions) -> None:
    with FakeOpenAIServer() as fake:
        page = sessions(start(fake, launch_app))
        say(page, fake, "first", "one")
        chatbot = say(page, fake, "second", "two")
        [fork] = [a for a in links(message_text(chatbot[1])) if a.startswith("fork:")]
        update = act(page, fork)
        assert bodies(update[0]) == [("user", "first"), ("assistant", "one")]
        assert update[-1].endswith("(branch)")  # the title box (the open conversation, a BrowserState, is not sent)
        titles = [title for title, _ in page.search("")]
        assert len(titles) == 2 and any(t.endswith("(branch)") for t in titles)
        say(page, fake, "third", "three")  # goes on in the fork
        assert [c for _, c in sent(fake)][1:] == ["first", "one", "third"]
        original = [cid for title, cid in page.search("") if not title.endswith("(branch)")][0]
        assert [c for _, c in bodies(page.open(original)[0])] == ["first", "one", "second", "two"]


def test_search_finds_text_in_any_branch_and_export_carries_the_tree(launch_app, sessions, tmp_path) -> None:
    with FakeOpenAIServer() as fake:
        page = sessions(start(fake, launch_app))
        say(page, fake, "tell me about apples", "apples are red")
        edit(page, 0, "tell me about pears")
        fake.enqueue("pears are green")
        page.respond()
        assert len(page.ids("apples")) == 1  # on the branch not shown
        document = page.export_json()
        assert document["version"] == 3
        assert len(document["messages"]) == 4 and document["leaf"]
        parents = {m["id"]: m["parent"] for m in document["messages"]}
        assert list(parents.values()).count(None) == 2  # two versions of the first question
        markdown = page.export("md").read_text(encoding="utf-8")
        assert "pears are green" in markdown and "apples are red" not in markdown
        assert "branch" in markdown.lower()
        path = tmp_path / "tree.json"
        path.write_text(json.dumps(document), encoding="utf-8")
        page.import_file(path)
        again = page.export_json()
        assert [(m["id"], m["parent"], m["content"]) for m in again["messages"]] == \
            [(m["id"], m["parent"], m["content"]) for m in document["messages"]]
        assert again["leaf"] == document["leaf"]


def test_editing_the_question_being_answered_stops_its_run_first(launch_app, sessions) -> None:
    """(The page hides the chatbot's edit control while the reply it shows streams; an API caller
    can still edit the question a run answers.)"""
    with FakeOpenAIServer() as fake:
        page = sessions(start(fake, launch_app))
        fake.enqueue(*[f" s{i}" for i in range(400)], delay=0.02, pace=True)
        page.add("tell a story")
        job = page.submit_respond()
        assert fake.wait_chunks(5, 10)
        fake.enqueue("a short one")
        edited = edit(page, 0, "tell a short story")
        assert fake.disconnected.is_set()  # stopped before the edit returned
        assert any("was stopped" in str(value) for value in edited), edited  # the status line says so
        chatbot = page.respond()
        job.result()
        assert bodies(chatbot) == [("user", "tell a short story"), ("assistant", "a short one")]
        back = act(page, versions_link(chatbot, 0, -1))[0]
        old = message_text(back[1])
        assert body_of(old).startswith("s0 s1 s2 s3") and "Stopped" in old


def test_delete_last_round_takes_only_the_answer_shown(launch_app, sessions) -> None:
    with FakeOpenAIServer() as fake:
        page = sessions(start(fake, launch_app))
        say(page, fake, "a word?", "first")
        fake.enqueue("second")
        page.client.predict(MODEL, page.system_prompt, api_name="/regenerate")
        page.respond()
        chatbot = page.client.predict(MODEL, "", api_name="/delete_last")[0]
        assert bodies(chatbot) == [("user", "a word?"), ("assistant", "first")]  # the other version
        assert "/ " not in message_text(chatbot[1])  # no versions left
        other = sessions(page.client.src)
        assert bodies(other.open(other.ids()[0])[0]) == bodies(chatbot)  # as the history has it
        chatbot = page.client.predict(MODEL, "", api_name="/delete_last")[0]
        assert chatbot == []


def test_continue_with_the_embedded_model_grows_the_reply_in_place(launch_app, sessions) -> None:
    """The model a fresh install chats with continues truly: cut at 8 tokens, then continued, the
    reply is the one the model writes at once with room for 16 (greedy)."""
    url = launch_app({"models": [{"provider": "embedded", "name": "local"}], "history": {"mode": "shared"}})
    page = sessions(url, model="local")
    greedy = (0.0, 1.0)  # temperature 0, top_p 1

    def respond(max_tokens: int) -> list[dict[str, Any]]:
        return page.client.predict("local", page.system_prompt, *greedy, max_tokens, "", 0, 0, -1, api_name="/respond")

    page.add("Write one sentence about the sea.")
    whole = body_of(message_text(respond(16)[-1]))
    page.client.predict("local", page.system_prompt, api_name="/regenerate")
    cut = respond(8)[-1]
    [go_on] = [a for a in links(message_text(cut)) if a.startswith("continue:")]
    act(page, go_on)
    grown = respond(8)
    assert len(grown) == 2  # in place: still one question and one answer
    text = body_of(message_text(grown[-1]))
    assert text.startswith(body_of(message_text(cut)).rstrip()) and len(text) > len(body_of(message_text(cut)))
    assert text == whole
