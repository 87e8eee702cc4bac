"""The Promptflow adapter against a real ``pf flow serve`` of tests/pf_flow/.

promptflow-devkit is heavy and pins its own dependencies, so it lives in a
virtual environment of its own (``.ci/run`` creates ``.venv-pf``); this test
finds its ``pf`` executable through ``CHUANHU_PF_BIN`` and is skipped where that
is not set (unless ``CHUANHU_PF_REQUIRED`` is set, as in CI: then it fails). Set up by hand::

    python3 -m venv .venv-pf && .venv-pf/bin/pip install promptflow-devkit==1.18.5
    CHUANHU_PF_BIN=$PWD/.venv-pf/bin/pf .venv/bin/python -m pytest tests/test_promptflow_real.py

The server runs on a free port on 127.0.0.1, with its home (``PF_HOME_DIRECTORY``)
in a temporary folder and its telemetry off, so it neither touches ``~/.promptflow``
nor tries to reach the network. Besides the adapter's behaviour, these tests hold
the fake server (tests/fakes/promptflow_server.py) to what the real one sends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from modules.history.conversation import Conversation
from modules.providers import Delta, GenerationOptions, Message, create, errors, validate_entry
from modules.providers.promptflow import PromptflowChatModel
from modules.core.streaming import Reply, stream_reply
from tests.adapter_helpers import collect_deltas
from tests.fakes.promptflow_server import FakePromptflowServer, Script
from tests.test_promptflow_adapter import NEGOTIATION, SSE_OR_JSON

FLOW = Path(__file__).resolve().parent / "pf_flow"
PF_BIN_ENV = "CHUANHU_PF_BIN"
PF_REQUIRED_ENV = "CHUANHU_PF_REQUIRED"  # set by .ci/run: fail rather than skip
STARTUP_TIMEOUT = 120.0  # seconds for the server to answer /health (about 2 s here)
TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pf_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The scoring URL of a running ``pf flow serve`` of tests/pf_flow/."""
    pf_bin = os.environ.get(PF_BIN_ENV, "")
    if not pf_bin:
        if os.environ.get(PF_REQUIRED_ENV):  # CI: running this test is part of the job
            pytest.fail(f"{PF_REQUIRED_ENV} is set but {PF_BIN_ENV} is not")
        pytest.skip(f"{PF_BIN_ENV} is not set: no promptflow-devkit to serve tests/pf_flow/ "
                    "(.ci/run installs it in .venv-pf and sets it)")
    if not (os.path.isfile(pf_bin) and os.access(pf_bin, os.X_OK)):
        pytest.fail(f"{PF_BIN_ENV}={pf_bin!r} is not an executable file")
    home = tmp_path_factory.mktemp("pf_home")
    (home / "pf.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    env = {
        **os.environ,
        "PF_HOME_DIRECTORY": str(home),  # pf's config, connections database and logs
        "PF_DISABLE_TRACING": "true",
        # The Azure Monitor exporter pf loads would otherwise call home for its settings.
        "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
        "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
    }
    port = _free_port()
    log_path = home / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [pf_bin, "flow", "serve", "--source", str(FLOW), "--host", "127.0.0.1", "--port", str(port),
             "--skip-open-browser"],
            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:  # bounded polling of the readiness URL
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"pf flow serve did not answer /health in {STARTUP_TIMEOUT:g} s:\n"
                            + log_path.read_text(errors="replace")[-3000:])
            try:  # waits between polls, and notices a server that died
                code = process.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"pf flow serve exited with {code}:\n" + log_path.read_text(errors="replace")[-3000:])
        yield f"{base}/score"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
async def model(pf_url: str):
    models: list[PromptflowChatModel] = []

    def make(**extra: Any) -> PromptflowChatModel:
        made = create(validate_entry({"provider": "promptflow", "name": "pf", "url": pf_url, **extra}))
        assert isinstance(made, PromptflowChatModel)
        models.append(made)
        return made

    yield make
    for made in models:
        await made.aclose()


async def run(model: PromptflowChatModel, messages: list[Message]) -> tuple[list[Delta], BaseException | None]:
    return await collect_deltas(model, messages, None, TIMEOUT)


def urls(question: str) -> list[str]:
    """What tests/pf_flow/sources.py returns for ASCII words."""
    return [f"https://example.org/search?q={word}" for word in question.split()[:2]]


def post(url: str, accept: str | None, question: str) -> httpx.Response:
    with httpx.Client(timeout=TIMEOUT) as client:
        client.headers.pop("accept")
        headers = {} if accept is None else {"Accept": accept}
        return client.post(url, json={"question": question, "chat_history": []}, headers=headers)


# -- the adapter ------------------------------------------------------------------------------------------
async def test_streams_several_deltas_and_the_url_output(pf_url, model):
    question = "What is streaming anyway"
    deltas, exc = await run(model(), [Message("system", "ignored"), Message("user", question)])
    assert exc is None
    pieces = [d.text for d in deltas if d.text]
    assert pieces == ["Echo:", " What", " is", " streaming", " anyway", " [history: 0", "]"]
    assert [d.outputs for d in deltas if d.outputs] == [{"url": urls(question)}]
    assert deltas[0].outputs  # the non-streamed output came first
    assert deltas[-1].finish_reason == "stop"


async def test_a_flow_without_a_streamed_output_answers_json_in_one_delta(model):
    deltas, exc = await run(model(), [Message("user", "whole answer please")])
    assert exc is None
    assert [d.text for d in deltas if d.text] == ["Echo: whole answer please [history: 0]"]
    assert [d.outputs for d in deltas if d.outputs] == [{"url": urls("whole answer please")}]


async def test_chat_history_with_a_previous_turn_is_accepted(model):
    pf = model()
    conversation = Conversation()
    for question in ("first question here", "second one"):
        turn = conversation.add_user(question)
        conversation.answer(turn, Reply(model=pf.name))
        messages = conversation.messages("You are helpful.")
        async with aclosing(stream_reply(pf, messages, GenerationOptions(), reply=turn.reply)) as replies:
            async for _ in replies:
                pass
        assert turn.reply.status == "done", turn.reply.error
    first, second = (t.reply for t in conversation.turns)
    assert first.outputs == {"url": urls("first question here")}
    # The flow read the history the adapter sent: one turn, and its question.
    assert second.text == "Echo: second one [history: 1, last: first question here]"
    assert second.outputs == {"url": urls("second one")}


async def test_a_flow_error_before_the_stream_shows_the_flows_message(model):
    deltas, exc = await run(model(), [Message("user", "fail now please")])
    assert type(exc) is errors.BadRequestError
    assert exc.status == 400
    assert "the flow failed before answering" in exc.detail
    assert deltas == []


async def test_a_flow_error_mid_stream_keeps_the_partial_answer_interrupted(model):
    pf = model()
    reply = Reply(model=pf.name)
    async with aclosing(stream_reply(pf, [Message("user", "fail later please")], GenerationOptions(),
                                     reply=reply)) as replies:
        async for _ in replies:
            pass
    assert reply.status == "interrupted"
    assert type(reply.error) is errors.InterruptedError
    assert reply.text == "Echo: fail later please"
    assert reply.outputs == {"url": urls("fail later please")}


async def test_a_wrong_input_field_shows_pfs_message(model):
    _, exc = await run(model(input_field="query"), [Message("user", "hello")])
    assert type(exc) is errors.BadRequestError
    assert "Required input fields ['question'] are missing" in exc.detail


# -- the server itself, and the fake held to it --------------------------------------------------------------
def test_health(pf_url):
    response = httpx.get(pf_url.replace("/score", "/health"))
    assert response.status_code == 200
    assert response.json()["status"] == "Healthy"


def test_json_only_accept_gives_json(pf_url):
    response = post(pf_url, "application/json", "plain json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"answer": "Echo: plain json [history: 0]", "url": urls("plain json")}


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed-flow", "whole-flow"])
@pytest.mark.parametrize("accept, with_stream, without_stream", NEGOTIATION,
                         ids=[repr(row[0]) for row in NEGOTIATION])
def test_negotiation_table_row(pf_url, accept, with_stream, without_stream, streamed):
    # The flow streams its answer, except for questions starting "whole" (see tests/pf_flow/chat.py).
    response = post(pf_url, accept, "hello table" if streamed else "whole table")
    expected = with_stream if streamed else without_stream
    kind = {200: {"text/event-stream; charset=utf-8": "sse", "application/json": "json"}.get(
        response.headers["content-type"]), 406: "406"}.get(response.status_code)
    assert kind == expected, (response.status_code, response.headers["content-type"], response.text[:200])


@pytest.mark.parametrize("accept, question, script", [
    (SSE_OR_JSON, "hello fake", Script(pieces=["Echo:", " hello", " fake", " [history: 0", "]"],
                                  outputs={"url": urls("hello fake")})),
    ("application/json", "hello fake", Script(pieces=["Echo:", " hello", " fake", " [history: 0", "]"],
                                              outputs={"url": urls("hello fake")})),
    ("text/event-stream", "whole thing", Script(streamed=False)),  # 406
    ("text/html", "hello fake", Script()),  # 406
    (SSE_OR_JSON, "你好 世界", Script(pieces=["Echo:", " 你好", " 世界", " [history: 0", "]"],
                                outputs={"url": ["https://example.org/search?q=%E4%BD%A0%E5%A5%BD",
                                                 "https://example.org/search?q=%E4%B8%96%E7%95%8C"]})),
])
def test_the_fake_sends_what_pf_sends(pf_url, accept, question, script):
    real = post(pf_url, accept, question)
    with FakePromptflowServer(default_script=script) as server:
        fake = post(server.url, accept, question)
    assert fake.status_code == real.status_code
    assert fake.headers["content-type"] == real.headers["content-type"]
    assert fake.content == real.content


@pytest.mark.parametrize("server", ["pf", "fake"])
def test_a_failure_mid_stream_cuts_the_body_in_both(pf_url, server):
    with FakePromptflowServer(default_script=Script(pieces=["a", "b", "c"], cut_after=2)) as fake:
        url = pf_url if server == "pf" else fake.url
        with httpx.stream("POST", url, json={"question": "fail later now"}, headers={"Accept": SSE_OR_JSON},
                          timeout=TIMEOUT) as response:
            assert response.status_code == 200
            received = b""
            with pytest.raises(httpx.RemoteProtocolError):  # no error event: the chunked body never ends
                for chunk in response.iter_bytes():
                    received += chunk
    assert received.endswith(b"\n\n") and b"error" not in received
