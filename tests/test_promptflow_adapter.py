"""The Promptflow adapter against a real HTTP server (tests/fakes/promptflow_server.py).

The first part checks the fake itself against ``../shared/PROTOCOLS.md`` §4 with
plain httpx, row by row of the negotiation table (tests/test_promptflow_real.py
checks the same rows against a real ``pf flow serve``). The rest runs the
adapter, and the streaming layer and rendering where a user sees the result,
against the fake. Nothing in httpx or the adapter is patched.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import traceback
from contextlib import aclosing
from typing import Any, Callable, Iterator

import httpx
import pytest
from pydantic import ValidationError

from modules.config import build_config
from modules.history.conversation import Conversation
from modules.i18n import Translator
from modules.providers import Delta, GenerationOptions, Message, create, errors, provider_class, validate_entry
from modules.providers.promptflow import PromptflowChatModel, from_chat_history, to_chat_history
from modules.core.sentences import error_message
from modules.web.render import reply_messages
from modules.core.streaming import Reply, stream_reply
from tests.adapter_helpers import collect_deltas, final_reply, texts
from tests.fakes.promptflow_server import FakePromptflowServer, Script

KEY = "pf-endpoint-key-0123456789abcdef"
TIMEOUT = 30.0  # upper bound on any one stream, so that a hang fails instead of blocking
MESSAGES = [Message("system", "You are terse."), Message("user", "Say hello.")]
URLS = ["https://en.wikipedia.org/w/index.php?search=ChatGPT", "https://en.wikipedia.org/w/index.php?search=GPT-4"]
T = Translator("en_US")

SSE_OR_JSON = "text/event-stream, application/json"  # what PROTOCOLS.md §4 says a client sends

# PROTOCOLS.md §4's negotiation table, one row per Accept header:
# (Accept or None for no header, answer of a flow with a streamed output, answer of a flow without).
NEGOTIATION = [
    ("text/event-stream, application/json", "sse", "json"),  # what the adapter sends
    ("text/event-stream", "sse", "406"),
    ("application/json, text/event-stream", "sse", "json"),
    ("text/event-stream;q=0.1, application/json;q=0.9", "sse", "json"),  # q-values ignored
    ("text/html, text/event-stream", "sse", "406"),
    ("application/json", "json", "json"),
    ("application/*", "json", "json"),
    ("*/*", "json", "json"),
    ("text/html, */*;q=0.8", "json", "json"),
    ("", "json", "json"),  # empty means */*
    (None, "json", "json"),  # missing means */*
    ("text/html", "406", "406"),
    ("text/*", "406", "406"),
    ("text/plain", "406", "406"),
]


@pytest.fixture
def pf_server() -> Iterator[FakePromptflowServer]:
    """A fake endpoint with a streamed chat output that wants ``KEY``."""
    with FakePromptflowServer(api_key=KEY, deployments={"blue", "green"}) as server:
        yield server


def entry(server: FakePromptflowServer, **extra: Any) -> dict[str, Any]:
    # max_retries 0: one request per reply (retries: tests/test_timeouts.py), as conftest's OpenAI entry
    return {"provider": "promptflow", "name": "flow", "url": server.url, "api_key": KEY, "max_retries": 0, **extra}


@pytest.fixture
async def make_model(pf_server: FakePromptflowServer):
    """``make_model(**entry_overrides)``: an adapter pointed at the fake server."""
    models: list[PromptflowChatModel] = []

    def make(server: FakePromptflowServer | None = None, **extra: Any) -> PromptflowChatModel:
        model = create(validate_entry(entry(server or pf_server, **extra)))
        assert isinstance(model, PromptflowChatModel)
        models.append(model)
        return model

    yield make
    for model in models:
        await model.aclose()


async def run(model: PromptflowChatModel, messages: list[Message] | None = None) -> tuple[list[Delta], BaseException | None]:
    return await collect_deltas(model, messages or MESSAGES, None, TIMEOUT)


async def reply_of(model: PromptflowChatModel, messages: list[Message] | None = None) -> Reply:
    """The final Reply of the streaming layer, as the app gets it."""
    return await final_reply(model, messages or MESSAGES, None, TIMEOUT)


def shown(reply: Reply) -> str:
    return "\n".join(m["content"] for m in reply_messages(reply, T, "en_US"))


def sse_events(body: str) -> list[dict[str, Any]]:
    """The data of each event in an SSE body (as the fake writes them: one data line each)."""
    return [json.loads(block.removeprefix("data: ")) for block in body.split("\n\n") if block.startswith("data: ")]


# -- the fake itself, against PROTOCOLS.md §4 ------------------------------------------------------------
@pytest.fixture(scope="module")
def table_servers() -> Iterator[dict[bool, FakePromptflowServer]]:
    """A fake flow with a streamed output (True) and one without (False), for the table's rows."""
    script = Script(pieces=["Hel", "lo"], outputs={"url": URLS})
    with FakePromptflowServer(streamed=True, default_script=script) as streamed, \
            FakePromptflowServer(streamed=False, default_script=script) as whole:
        yield {True: streamed, False: whole}


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed-flow", "whole-flow"])
@pytest.mark.parametrize("accept, with_stream, without_stream", NEGOTIATION,
                         ids=[repr(row[0]) for row in NEGOTIATION])
def test_fake_negotiates_as_the_protocol_table(table_servers, accept, with_stream, without_stream, streamed):
    expected = with_stream if streamed else without_stream
    server = table_servers[streamed]
    with httpx.Client() as client:
        client.headers.pop("accept")  # httpx sends */* by default; a row decides
        headers = {} if accept is None else {"Accept": accept}
        response = client.post(server.url, json={"question": "hi", "chat_history": []}, headers=headers)
    seen = server.requests[-1]
    assert ("accept" in seen.headers) == (accept is not None)
    content_type = response.headers["content-type"]
    if expected == "sse":
        assert response.status_code == 200
        assert content_type == "text/event-stream; charset=utf-8"
        # Non-streamed outputs first, then the deltas starting and ending with "".
        assert sse_events(response.text) == [{"url": URLS}, {"answer": ""}, {"answer": "Hel"}, {"answer": "lo"},
                                             {"answer": ""}]
        assert "event:" not in response.text and "id:" not in response.text and "[DONE]" not in response.text
    elif expected == "json":
        assert response.status_code == 200
        assert content_type == "application/json"
        assert response.json() == {"answer": "Hello", "url": URLS}  # the stream joined
    else:
        assert response.status_code == 406
        assert content_type == "application/json"
        error = response.json()["error"]
        assert error["code"] == "UserError"
        assert "Accept header is not acceptable" in error["message"]
    assert seen.answered == expected


def test_fake_health_and_pf_json_style():
    with FakePromptflowServer(default_script=Script(pieces=["你好"])) as server:
        health = httpx.get(f"http://127.0.0.1:{server.port}/health")
        sse = httpx.post(server.url, json={"question": "q"}, headers={"Accept": "text/event-stream"})
        whole = httpx.post(server.url, json={"question": "q"}, headers={"Accept": "application/json"})
    assert health.status_code == 200 and health.json()["status"] == "Healthy"
    # pf writes json.dumps' ASCII escapes, in both forms.
    assert '{"answer": "\\u4f60\\u597d"}' in sse.text
    assert whole.text == '{"answer":"\\u4f60\\u597d"}\n'


def test_fake_cuts_the_stream_without_an_error_event():
    with FakePromptflowServer(default_script=Script(pieces=["a", "b", "c"], cut_after=2)) as server:
        with httpx.stream("POST", server.url, json={"question": "q"}, headers={"Accept": SSE_OR_JSON}) as response:
            assert response.status_code == 200
            received = b""
            with pytest.raises(httpx.RemoteProtocolError):
                for chunk in response.iter_bytes():
                    received += chunk
    assert sse_events(received.decode()) == [{"answer": ""}, {"answer": "a"}]


@pytest.mark.parametrize("status, code", [(400, "UserError"), (500, "SystemError"), (424, "SystemError")])
def test_fake_errors_before_the_stream_have_the_promptflow_body(status, code):
    with FakePromptflowServer(default_script=Script(status=status, error={"message": "boom"})) as server:
        response = httpx.post(server.url, json={"question": "q"}, headers={"Accept": SSE_OR_JSON})
    assert response.status_code == status
    assert response.json() == {"error": {"code": code, "message": "boom"}}


# -- a good answer -------------------------------------------------------------------------------------------
async def test_sse_pieces_arrive_complete_and_in_order(pf_server, make_model):
    pieces = [f"piece{i} " for i in range(40)]
    pf_server.enqueue(*pieces)
    deltas, exc = await run(make_model())
    assert exc is None
    assert pf_server.requests[0].answered == "sse"
    assert texts(deltas) == pieces  # the "" edges make no delta
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]
    assert deltas[-1].finish_reason == "stop"


async def test_request_headers_and_body(pf_server, make_model):
    pf_server.enqueue("ok")
    _, exc = await run(make_model())
    assert exc is None
    [seen] = pf_server.requests
    assert seen.path == "/score"
    assert seen.headers["accept"] == SSE_OR_JSON
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert "azureml-model-deployment" not in seen.headers
    # One key per flow input; the system prompt is not one (see the adapter's docstring).
    assert seen.body == {"question": "Say hello.", "chat_history": []}


async def test_deployment_header_routes_to_a_deployment(pf_server, make_model):
    pf_server.enqueue("from blue")
    deltas, exc = await run(make_model(deployment="blue"))
    assert exc is None
    assert pf_server.requests[0].headers["azureml-model-deployment"] == "blue"
    assert texts(deltas) == ["from blue"]


async def test_unknown_deployment_is_not_found(pf_server, make_model):
    _, exc = await run(make_model(deployment="purple"))
    assert type(exc) is errors.NotFoundError
    assert exc.status == 404


async def test_no_key_sends_no_authorization():
    with FakePromptflowServer() as server:  # pf flow serve: no auth
        server.enqueue("ok")
        model = create(validate_entry({"provider": "promptflow", "name": "local", "url": server.url}))
        try:
            deltas, exc = await run(model)
        finally:
            await model.aclose()
    assert exc is None and texts(deltas) == ["ok"]
    assert "authorization" not in server.requests[0].headers


async def test_custom_field_names(make_model):
    with FakePromptflowServer(input_field="query", history_field="history", output_field="reply") as server:
        server.enqueue("custom", outputs={"docs": ["d1"]})
        server.enqueue("again")
        model = make_model(server, input_field="query", history_field="history", output_field="reply")
        deltas, exc = await run(model)
        assert exc is None
        _, exc2 = await run(model, [Message("user", "first"), Message("assistant", "custom", {"docs": ["d1"]}),
                                    Message("user", "second")])
    assert exc2 is None
    assert texts(deltas) == ["custom"]
    assert [d.outputs for d in deltas if d.outputs] == [{"docs": ["d1"]}]
    assert server.requests[1].body == {
        "query": "second",
        "history": [{"inputs": {"query": "first"}, "outputs": {"reply": "custom", "docs": ["d1"]}}],
    }


# -- the two kinds of flow ---------------------------------------------------------------------------------
@pytest.mark.parametrize("streamed, form", [(True, "sse"), (False, "json")])
async def test_each_kind_of_flow_gives_the_same_answer_and_sources(streamed, form):
    pieces = ["Chat", "G", "PT", " was", " launched", " on", " November", " 30", ",", " 2022", "."]
    with FakePromptflowServer(streamed=streamed) as server:
        server.enqueue(*pieces, outputs={"url": URLS})
        model = create(validate_entry({"provider": "promptflow", "name": "f", "url": server.url}))
        try:
            deltas, exc = await run(model)
        finally:
            await model.aclose()
    assert exc is None
    assert server.requests[0].answered == form
    assert "".join(texts(deltas)) == "".join(pieces)
    # streamed: one delta per piece; whole: the answer in one delta
    assert texts(deltas) == (pieces if streamed else ["".join(pieces)])
    outputs = [d.outputs for d in deltas if d.outputs]
    assert outputs == [{"url": URLS}]
    if streamed:  # the non-streamed outputs come first, before any text
        assert deltas[0].outputs == {"url": URLS} and not deltas[0].text


async def test_json_answer_is_shown_whole_with_its_sources():
    with FakePromptflowServer(streamed=False) as server:
        server.enqueue("The whole ", "answer.", outputs={"url": URLS})
        model = create(validate_entry({"provider": "promptflow", "name": "f", "url": server.url}))
        try:
            reply = await reply_of(model)
        finally:
            await model.aclose()
    assert reply.status == "done"
    assert reply.text == "The whole answer."
    assert reply.outputs == {"url": URLS}
    text = shown(reply)
    assert text.startswith("The whole answer.")
    assert "**Sources**" in text and f"<{URLS[0]}>" in text and f"<{URLS[1]}>" in text


async def test_sources_of_a_streamed_answer_are_shown_with_it(pf_server, make_model):
    pf_server.enqueue("Chat", "GPT", outputs={"url": URLS})
    reply = await reply_of(make_model())
    assert reply.status == "done"
    assert reply.text == "ChatGPT"
    assert reply.outputs == {"url": URLS}
    assert f"<{URLS[0]}>" in shown(reply)


async def test_unicode_split_across_writes_and_heartbeats(pf_server, make_model):
    pieces = ["你好", "，世界", " 🎉", " naïve café", "\nline two", " data: not a field", " end"]
    pf_server.enqueue(*pieces, outputs={"url": ["https://例子.测试/路径"]}, raw_utf8=True, fragment=1, comments=True)
    deltas, exc = await run(make_model())
    assert exc is None
    assert texts(deltas) == pieces
    assert [d.outputs for d in deltas if d.outputs] == [{"url": ["https://例子.测试/路径"]}]


@pytest.mark.parametrize("outputs", [{}, {"url": URLS}])
async def test_a_flow_that_streams_nothing_gives_an_empty_answer(pf_server, make_model, outputs):
    pf_server.enqueue(pieces=[], edges=False, outputs=outputs)  # the flow's generator yielded nothing
    deltas, exc = await run(make_model())
    assert exc is None
    assert texts(deltas) == []
    assert [d.outputs for d in deltas if d.outputs] == ([outputs] if outputs else [])
    assert deltas[-1].finish_reason == "stop"


async def test_answer_under_another_output_name_is_a_clear_configuration_error(pf_server, make_model):
    pf_server.enqueue("Hel", "lo", outputs={"url": URLS})
    _, exc = await run(make_model(output_field="reply"))
    assert type(exc) is errors.BadRequestError
    assert "'reply'" in exc.detail and "answer" in exc.detail and "output_field" in exc.detail


async def test_json_answer_under_another_output_name_is_a_clear_configuration_error():
    with FakePromptflowServer(streamed=False) as server:
        server.enqueue("whole")
        model = create(validate_entry({"provider": "promptflow", "name": "f", "url": server.url,
                                       "output_field": "reply"}))
        try:
            _, exc = await run(model)
        finally:
            await model.aclose()
    assert type(exc) is errors.BadRequestError
    assert "'reply'" in exc.detail and "answer" in exc.detail


async def test_wrong_input_field_shows_the_flows_own_message(pf_server, make_model):
    _, exc = await run(make_model(input_field="query"))
    assert type(exc) is errors.BadRequestError
    assert exc.status == 400
    assert "Required input fields ['question'] are missing" in exc.detail
    assert exc.detail in error_message(T, "en_US", exc)


# -- chat_history across a conversation ------------------------------------------------------------------
async def test_chat_history_follows_the_conversation_in_the_flows_shape():
    """Three turns as the app runs them: Conversation.messages -> stream_reply -> the turn's Reply."""
    urls2 = ["https://en.wikipedia.org/w/index.php?search=Generative pre-trained transformer "]
    with FakePromptflowServer() as server:
        server.enqueue("ChatGPT was", " launched", " in 2022.", outputs={"url": URLS})
        server.enqueue("GPT-4:", " March 2023.", outputs={"url": urls2}, streamed=False)  # a JSON answer
        server.enqueue("Four", " months", " apart.")
        model = create(validate_entry({"provider": "promptflow", "name": "f", "url": server.url}))
        conversation = Conversation()
        try:
            for question in ("When was ChatGPT launched?", "And GPT-4?", "How far apart?"):
                turn = conversation.add_user(question)
                messages = conversation.messages("You are a helpful assistant.")
                conversation.answer(turn, Reply(model=model.name))
                async with aclosing(stream_reply(model, messages, GenerationOptions(), reply=turn.reply)) as replies:
                    async for _ in replies:
                        pass
                assert turn.reply.status == "done", turn.reply.error
        finally:
            await model.aclose()
    assert [r.answered for r in server.requests] == ["sse", "json", "sse"]
    assert [seen.body["question"] for seen in server.requests] == ["When was ChatGPT launched?", "And GPT-4?",
                                                                   "How far apart?"]
    first = {"inputs": {"question": "When was ChatGPT launched?"},
             "outputs": {"answer": "ChatGPT was launched in 2022.", "url": URLS}}
    second = {"inputs": {"question": "And GPT-4?"}, "outputs": {"answer": "GPT-4: March 2023.", "url": urls2}}
    assert server.histories == [[], [first], [first, second]]
    assert "You are a helpful assistant." not in json.dumps([seen.body for seen in server.requests])
    assert conversation.turns[2].reply.text == "Four months apart."


async def test_chat_history_keeps_unanswered_and_interrupted_turns(pf_server, make_model):
    pf_server.enqueue(status=500, error={"message": "flow down"})  # turn 1: no text at all
    pf_server.enqueue("partial", " answer", " lost", cut_after=2)  # turn 2: interrupted after "partial"
    pf_server.enqueue("fine")
    model = make_model()
    conversation = Conversation()
    for question in ("one", "two", "three"):
        turn = conversation.add_user(question)
        conversation.answer(turn, await reply_of(model, conversation.messages("")))
    assert [t.reply.status for t in conversation.turns] == ["error", "interrupted", "done"]
    assert pf_server.histories[2] == [
        {"inputs": {"question": "one"}, "outputs": {"answer": ""}},  # what the user said stays
        {"inputs": {"question": "two"}, "outputs": {"answer": "partial"}},  # as it was shown
    ]


def test_request_body_pairs_turns_and_drops_the_system_message():
    model = PromptflowChatModel(PromptflowChatModel.Config(name="f", url="http://127.0.0.1:1/score"))
    body = model.request_body([
        Message("system", "be brief"),
        Message("user", "q1"), Message("assistant", "a1", {"url": ["u1"], "answer": "stale"}),
        Message("user", "q2"), Message("assistant", "a2"),
        Message("user", "q3"),
    ])
    assert body == {"question": "q3", "chat_history": [
        {"inputs": {"question": "q1"}, "outputs": {"answer": "a1", "url": ["u1"]}},  # the answer shown wins
        {"inputs": {"question": "q2"}, "outputs": {"answer": "a2"}},
    ]}
    with pytest.raises(errors.BadRequestError):
        model.request_body([Message("system", "only a system prompt")])


def test_chat_history_read_back_is_the_conversation_it_was_written_from():
    """The shape the adapter writes is the one /score reads: one pair of functions."""
    earlier = [Message("user", "q1"), Message("assistant", "a1", {"url": ["u1"]}),
               Message("user", "unanswered"),
               Message("user", "q3"), Message("assistant", "", {"url": ["u3"]})]  # only outputs
    history = to_chat_history(earlier, question="query", answer="reply")
    assert history == [
        {"inputs": {"query": "q1"}, "outputs": {"reply": "a1", "url": ["u1"]}},
        {"inputs": {"query": "unanswered"}, "outputs": {"reply": ""}},
        {"inputs": {"query": "q3"}, "outputs": {"reply": "", "url": ["u3"]}},
    ]
    assert from_chat_history(history, question="query", answer="reply") == earlier
    # a client's turns: a non-text answer as JSON, missing parts as empty
    assert from_chat_history([{"inputs": {"question": "q"}, "outputs": {"answer": {"n": 1}}}, {}]) == [
        Message("user", "q"), Message("assistant", '{"n": 1}'), Message("user", "")]


# -- errors before the stream ----------------------------------------------------------------------------
@pytest.mark.parametrize("status, code, kind", [
    (400, "UserError", errors.BadRequestError),
    (500, "SystemError", errors.ServerError),
    (424, "SystemError", errors.ServerError),  # Azure ML: the flow (model) failed
    (424, "UserError", errors.BadRequestError),
])
async def test_promptflow_errors_show_the_flows_message(pf_server, make_model, status, code, kind):
    message = "Execution failure in 'chat': (ValueError) the index is empty"
    pf_server.enqueue(status=status, error={"code": code, "message": message})
    deltas, exc = await run(make_model())
    assert type(exc) is kind
    assert exc.status == status
    assert exc.detail == message
    assert deltas == []
    assert message in error_message(T, "en_US", exc)  # the flow's message may be shown to users


async def test_406_is_explained_as_a_configuration_problem(pf_server, make_model):
    pf_server.enqueue(status=406, error={"message": "Media type text/event-stream, application/json in Accept "
                                                    "header is not acceptable. Supported media type(s) - text/html"})
    reply = await reply_of(make_model())
    assert type(reply.error) is errors.NotAcceptableError
    assert reply.status == "error"
    assert "configuration problem" in shown(reply)


async def test_406_wrapped_by_azure_ml_as_424_is_still_not_acceptable(pf_server, make_model):
    pf_server.enqueue(status=424, error={"code": "UserError", "message": "Media type text/html in Accept header is "
                                                                        "not acceptable. Supported media type(s) - application/json"})
    _, exc = await run(make_model())
    assert type(exc) is errors.NotAcceptableError
    assert exc.status == 424


@pytest.mark.parametrize("status, kind, words", [
    (401, errors.AuthenticationError, "API key"),
    (403, errors.AuthenticationError, "API key"),
    (404, errors.NotFoundError, "404"),
    (408, errors.TimeoutError, "in time"),
    (429, errors.RateLimitError, "429"),
    (502, errors.ServerError, "502"),
    (503, errors.ServerError, "503"),
    (504, errors.ServerError, "504"),
])
async def test_gateway_statuses_get_their_error_kind_and_a_clear_message(pf_server, make_model, status, kind, words):
    pf_server.enqueue(status=status, gateway_body=f"upstream said {status}")
    reply = await reply_of(make_model())
    assert type(reply.error) is kind
    assert reply.error.status == status
    assert reply.status == "error"
    assert words in shown(reply)


async def test_wrong_key_is_an_authentication_error(pf_server, make_model):
    _, exc = await run(make_model(api_key="not-the-key-0000"))
    assert type(exc) is errors.AuthenticationError
    assert exc.status == 401
    assert pf_server.requests[0].answered == "401"


@pytest.mark.parametrize("header, seconds", [("7", 7.0), ("0.5", 0.5), (None, None)])
async def test_429_carries_retry_after(pf_server, make_model, header, seconds):
    pf_server.enqueue(status=429, retry_after=header, gateway_body="Too many requests")
    _, exc = await run(make_model())
    assert type(exc) is errors.RateLimitError
    assert exc.retry_after == seconds
    if seconds:
        assert f"Try again in {seconds:g} s" in error_message(T, "en_US", exc)


async def test_429_retry_after_as_an_http_date(pf_server, make_model):
    from email.utils import formatdate

    pf_server.enqueue(status=429, retry_after=formatdate(time.time() + 30, usegmt=True))
    _, exc = await run(make_model())
    assert type(exc) is errors.RateLimitError
    assert 20 < exc.retry_after <= 31


# -- failures during the answer ------------------------------------------------------------------------------
async def test_cut_mid_stream_is_interrupted_with_the_partial_answer(pf_server, make_model):
    pf_server.enqueue("Half", " of", " it", " never", " comes", outputs={"url": URLS}, cut_after=4)
    deltas, exc = await run(make_model())
    assert type(exc) is errors.InterruptedError
    assert texts(deltas) == ["Half", " of", " it"]  # "" then three pieces were sent
    assert [d.outputs for d in deltas if d.outputs] == [{"url": URLS}]


async def test_cut_mid_stream_keeps_the_partial_reply_marked_interrupted(pf_server, make_model):
    pf_server.enqueue("Half", " of", " it", " never", " comes", cut_after=4)
    reply = await reply_of(make_model())
    assert reply.status == "interrupted"
    assert reply.text == "Half of it"
    text = shown(reply)
    assert text.startswith("Half of it")
    assert "Interrupted" in text and "connection was lost" in text


async def test_cut_before_the_first_piece_is_an_error_without_text(pf_server, make_model):
    pf_server.enqueue("never", outputs={"url": URLS}, cut_after=0)
    reply = await reply_of(make_model())
    # Nothing of the answer came: the flow failed, the connection was not "lost".
    assert type(reply.error) is errors.ServerError
    assert "the flow failed before it answered" in reply.error.detail
    assert reply.status == "error"
    assert reply.text == ""


async def test_stall_mid_stream_is_a_timeout_with_a_clear_message(pf_server, make_model):
    pf_server.enqueue("Still", " here", " gone", stall_after=3, stall=20)
    start = time.monotonic()
    reply = await reply_of(make_model(idle_timeout=0.5))
    assert time.monotonic() - start < 10  # it did not wait for the server
    assert type(reply.error) is errors.TimeoutError
    assert reply.status == "interrupted"
    assert reply.text == "Still here"
    assert "did not answer in time" in shown(reply)
    assert pf_server.disconnected.wait(5)  # the connection was closed, not left open


async def test_a_flow_slower_than_the_idle_timeout_before_answering_is_a_timeout(pf_server, make_model):
    pf_server.enqueue("late", first_delay=20)
    start = time.monotonic()
    deltas, exc = await run(make_model(idle_timeout=0.5))
    assert time.monotonic() - start < 10
    assert type(exc) is errors.TimeoutError
    assert "0.5 s" in exc.detail
    assert deltas == []
    assert pf_server.disconnected.wait(5)


async def test_pieces_slower_than_the_idle_timeout_in_total_are_fine(pf_server, make_model):
    pf_server.enqueue(*[f"p{i}" for i in range(8)], delay=0.15)  # 1.5 s in all, 0.15 s apart
    deltas, exc = await run(make_model(idle_timeout=0.6))
    assert exc is None
    assert len(texts(deltas)) == 8


@pytest.fixture
def refused_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_unreachable_endpoint(make_model, refused_port):
    _, exc = await run(make_model(url=f"http://127.0.0.1:{refused_port}/score"))
    assert type(exc) is errors.UnreachableError


async def test_a_page_instead_of_the_flow_is_a_server_error_naming_what_came(pf_server, make_model):
    pf_server.enqueue(page="<html>Sign in</html>")  # e.g. a proxy's login page
    _, exc = await run(make_model())
    assert type(exc) is errors.ServerError
    assert "text/html" in exc.detail and "scoring URL" in exc.detail


# -- Stop ------------------------------------------------------------------------------------------------------
async def test_stop_closes_the_connection(pf_server, make_model):
    pf_server.enqueue(*[f"t{i} " for i in range(400)], delay=0.02)
    reply = Reply(model="flow")
    replies = stream_reply(make_model(), MESSAGES, GenerationOptions(), reply=reply)
    async for current in replies:
        if current.text:
            break
    stopped_at = time.monotonic()
    await replies.aclose()  # what Stop (or a closed tab) does
    assert reply.status == "stopped"
    assert await asyncio.to_thread(pf_server.disconnected.wait, 5)
    assert not pf_server.completed.is_set()
    assert time.monotonic() - stopped_at < 5
    assert pf_server.pieces_sent < 400


async def test_model_is_reusable_after_aclose(pf_server, make_model):
    model = make_model()
    pf_server.enqueue("one")
    pf_server.enqueue("two")
    assert texts((await run(model))[0]) == ["one"]
    await model.aclose()
    assert texts((await run(model))[0]) == ["two"]


# -- secrets ------------------------------------------------------------------------------------------------------
SECRET = "pf-secret-do-not-leak-5f3a9c"


def _scenarios(refused_port: int) -> dict[str, Callable[[FakePromptflowServer], dict[str, Any]]]:
    """name -> script the server, return entry overrides. Every one of them fails."""

    def status(code: int, **kw: Any) -> Callable[[FakePromptflowServer], dict[str, Any]]:
        def script(server: FakePromptflowServer) -> dict[str, Any]:
            server.enqueue(status=code, **kw)
            return {}
        return script

    def echo(code: int) -> Callable[[FakePromptflowServer], dict[str, Any]]:  # a gateway that echoes the key
        return status(code, gateway_body=f"Invalid key Bearer {SECRET} for this endpoint")

    def cut(server: FakePromptflowServer) -> dict[str, Any]:
        server.enqueue("a", "b", cut_after=1)
        return {}

    def stall(server: FakePromptflowServer) -> dict[str, Any]:
        server.enqueue("a", "b", stall_after=1, stall=20)
        return {"idle_timeout": 0.5}

    def unreachable(server: FakePromptflowServer) -> dict[str, Any]:
        return {"url": f"http://127.0.0.1:{refused_port}/score"}

    return {"wrong-key": lambda server: {"api_key": SECRET + "-wrong"}, "401-echo": echo(401),
            "403-echo": echo(403), "400-echo": status(400, error={"message": f"bad key {SECRET}"}),
            "500-echo": status(500, error={"message": f"token {SECRET} rejected"}), "424": status(424),
            "406": status(406), "429": status(429, retry_after="3"), "503-echo": echo(503),
            "cut": cut, "stall": stall, "unreachable": unreachable}


@pytest.mark.parametrize("scenario", list(_scenarios(0)))
async def test_api_key_never_appears_in_an_error(scenario, refused_port):
    with FakePromptflowServer(api_key=SECRET) as server:
        overrides = {"api_key": SECRET, **_scenarios(refused_port)[scenario](server)}
        model = create(validate_entry(entry(server, **overrides)))
        try:
            reply = await reply_of(model)
        finally:
            await model.aclose()
    exc = reply.error
    assert isinstance(exc, errors.ModelError), scenario
    for text in (str(exc), exc.detail, repr(exc), "".join(traceback.format_exception(exc)),
                 error_message(T, "en_US", exc), shown(reply)):
        assert SECRET not in text, scenario
    if "echo" in scenario and exc.detail:
        assert "***" in exc.detail  # scrubbed, not dropped


# -- configuration ---------------------------------------------------------------------------------------------------
def test_registered_and_configured_with_defaults():
    assert provider_class("promptflow") is PromptflowChatModel
    config = validate_entry({"provider": "promptflow", "name": "My flow", "url": "http://127.0.0.1:8080/score"})
    assert (config.input_field, config.history_field, config.output_field) == ("question", "chat_history", "answer")
    assert config.api_key is None and config.deployment is None
    assert config.connect_timeout > 0 and config.idle_timeout > 0


@pytest.mark.parametrize("bad", [{"url": "127.0.0.1:8080/score"}, {"url": "ftp://x/score"}, {"idle_timeout": 0},
                                 {"input_field": ""}, {"temperature": 0.5}])
def test_bad_entries_are_rejected(bad):
    with pytest.raises(ValidationError):
        validate_entry({"provider": "promptflow", "name": "f", "url": "http://127.0.0.1:8080/score", **bad})


def test_key_from_the_environment():
    config = build_config({"models": [{"provider": "promptflow", "name": "f", "url": "https://e.example/score",
                                       "api_key_env": "PF_ENDPOINT_KEY", "deployment": "blue"}]},
                          env={"PF_ENDPOINT_KEY": KEY})
    [model_config] = config.models
    assert model_config.api_key.get_secret_value() == KEY
    model = create(model_config)
    assert model.secrets() == [KEY]
    assert model.headers()["Authorization"] == f"Bearer {KEY}"
    assert model.headers()["azureml-model-deployment"] == "blue"
    assert KEY not in repr(model_config)
