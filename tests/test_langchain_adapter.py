"""The LangChain adapter through LangChain's own classes, against real HTTP fakes.

``ChatOpenAI`` and ``AzureChatOpenAI`` (built in, ``chat_model:``) and user
chains (``factory: tests.fakes.chains:NAME``) talk to ``FakeOpenAIServer`` over
real HTTP, or, for the custom LLMs of ``tests/fakes/chains.py``, produce tokens
the test releases one at a time. Nothing in LangChain, the openai SDK or httpx
is patched. Both ways of streaming are covered: ``streaming: stream``
(``.astream()``) and ``streaming: callbacks`` (the ``on_llm_new_token`` bridge
whose absence lost every Azure token in ChuanhuChatGPT: seed 001).

No test sleeps: each wait is on a generator step or an event, with a bound.
"""

from __future__ import annotations

import asyncio
import traceback
import uuid
from typing import Any, AsyncIterator, Callable, Iterator

import pytest

from modules.config import ConfigError, build_config
from modules.i18n import Translator
from modules.providers import Delta, GenerationOptions, Message, Usage, create, errors, validate_entry
from modules.providers.langchain_runnable import LangChainChatModel
from modules.core.sentences import error_message
from modules.core.streaming import Pacer, Reply, stream_reply
from tests.adapter_helpers import collect_deltas, final_reply as shared_final_reply, texts
from tests.conftest import FAKE_KEY
from tests.fakes import chains
from tests.fakes.openai_server import FakeOpenAIServer

MESSAGES = [Message("system", "You are terse."), Message("user", "Say hello.")]
OPTIONS = GenerationOptions()
TIMEOUT = 30.0  # upper bound on any one stream
STEP = 10.0  # upper bound on any one yield or event
API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt-4o-prod"
MODES = ["stream", "callbacks"]
CHAINS = "tests.fakes.chains"


# -- fixtures and helpers ----------------------------------------------------------------------
@pytest.fixture
def azure_fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(api_key=FAKE_KEY, azure_deployments={DEPLOYMENT: API_VERSION}) as server:
        yield server


@pytest.fixture
def gate() -> Iterator[chains.TokenGate]:
    """A token gate for ``callback_only_llm``; ended afterwards so no worker thread is left waiting."""
    made = chains.new_gate(timeout=TIMEOUT)
    yield made
    made.end()
    chains.GATES.pop(made.name, None)


@pytest.fixture
def lc_model() -> Iterator[Callable[..., LangChainChatModel]]:
    def make(**entry: Any) -> LangChainChatModel:
        model = create(validate_entry({"provider": "langchain", "name": "lc", **entry}))
        assert isinstance(model, LangChainChatModel)
        return model

    yield make


def chat_openai(server: FakeOpenAIServer, streaming: str = "stream", **extra: Any) -> dict[str, Any]:
    """A built-in ``ChatOpenAI`` entry pointed at the fake server."""
    return {"chat_model": "ChatOpenAI", "streaming": streaming, "api_key": FAKE_KEY,
            "args": {"model": "fake-model", "base_url": server.base_url, "max_retries": 0}, **extra}


def azure_chat_openai(server: FakeOpenAIServer, streaming: str = "stream", **extra: Any) -> dict[str, Any]:
    return {"chat_model": "AzureChatOpenAI", "streaming": streaming, "api_key": FAKE_KEY,
            "args": {"azure_endpoint": server.endpoint, "azure_deployment": DEPLOYMENT,
                     "api_version": API_VERSION, "max_retries": 0}, **extra}


def factory(name: str, streaming: str = "stream", **extra: Any) -> dict[str, Any]:
    return {"factory": f"{CHAINS}:{name}", "streaming": streaming, **extra}


async def run(model: LangChainChatModel, options: GenerationOptions | None = None,
              messages: list[Message] | None = None) -> tuple[list[Delta], BaseException | None]:
    return await collect_deltas(model, messages or MESSAGES, options or OPTIONS, TIMEOUT)


async def final_reply(model: LangChainChatModel, options: GenerationOptions | None = None) -> Reply:
    return await shared_final_reply(model, MESSAGES, options or OPTIONS, TIMEOUT)


async def until(gen: AsyncIterator[Reply], condition: Callable[[Reply], bool], what: str) -> Reply:
    """Step ``gen`` until a yielded reply meets ``condition``; fail after STEP s or if the reply ends first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP
    while True:
        try:
            reply = await asyncio.wait_for(anext(gen), max(0.001, deadline - loop.time()))
        except TimeoutError:
            pytest.fail(f"timed out after {STEP:g} s waiting for {what}")
        if condition(reply):
            return reply
        if not reply.active:
            pytest.fail(f"the reply ended ({reply.status}: {reply.text!r}, {reply.error!r}) before {what}")


def assert_clear_detail(error: errors.ModelError, *must: str) -> None:
    for part in must:
        assert part in error.detail, (part, error.detail)
    assert "Traceback" not in error.detail and 'File "' not in error.detail, error.detail
    assert "\n" not in error.detail.strip(), error.detail


# -- ChatOpenAI ---------------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", MODES)
async def test_chat_openai_streams_tokens_complete_and_in_order(fake_openai, lc_model, streaming):
    tokens = [f"tok{i} " for i in range(50)] + ["你好", " 🎉"]
    fake_openai.enqueue(*tokens)
    deltas, exc = await run(lc_model(**chat_openai(fake_openai, streaming)))
    assert exc is None
    assert texts(deltas) == tokens  # one delta per token: streamed, not handed over whole at the end
    [seen] = fake_openai.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {FAKE_KEY}"
    assert seen.body["model"] == "fake-model"
    assert seen.body["stream"] is True
    assert seen.body["messages"] == [m.as_dict() for m in MESSAGES]


@pytest.mark.parametrize("streaming", MODES)
async def test_chat_openai_usage_reaches_the_reply(fake_openai, lc_model, streaming):
    fake_openai.enqueue("Hel", "lo", usage={"prompt_tokens": 17, "completion_tokens": 2})
    reply = await final_reply(lc_model(**chat_openai(fake_openai, streaming)))
    assert (reply.status, reply.text) == ("done", "Hello")
    assert reply.usage == Usage(prompt_tokens=17, completion_tokens=2)
    assert fake_openai.requests[0].body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("streaming", MODES)
async def test_sampling_options_reach_the_request_body(fake_openai, lc_model, streaming):
    fake_openai.enqueue("ok")
    options = GenerationOptions(temperature=0.25, stop=["END", "\n\n"], seed=42)
    deltas, exc = await run(lc_model(**chat_openai(fake_openai, streaming)), options)
    assert exc is None
    assert texts(deltas) == ["ok"]
    body = fake_openai.requests[0].body
    assert body["temperature"] == 0.25
    assert body["stop"] == ["END", "\n\n"]
    assert body["seed"] == 42
    assert "top_p" not in body and "presence_penalty" not in body  # unset options are not sent


async def test_wrong_key_through_chat_openai_is_an_authentication_error(fake_openai, lc_model):
    model = lc_model(**chat_openai(fake_openai, api_key="sk-wrong-key-9876543210"))
    deltas, exc = await run(model)
    assert isinstance(exc, errors.AuthenticationError)
    assert texts(deltas) == []
    assert "sk-wrong-key-9876543210" not in str(exc)


# -- AzureChatOpenAI ---------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", MODES)
async def test_azure_chat_openai_skips_the_prompt_filter_chunk(azure_fake, lc_model, streaming):
    tokens = [f" az{i}" for i in range(30)]
    azure_fake.enqueue(*tokens, prompt_filter_chunk=True, usage={"prompt_tokens": 9, "completion_tokens": 30})
    model = lc_model(**azure_chat_openai(azure_fake, streaming))
    deltas, exc = await run(model)
    assert exc is None
    assert texts(deltas) == tokens
    assert Usage(prompt_tokens=9, completion_tokens=30) in [d.usage for d in deltas if d.usage]
    [seen] = azure_fake.requests
    assert seen.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert seen.query == {"api-version": API_VERSION}
    assert seen.headers["api-key"] == FAKE_KEY
    assert model.model_id == DEPLOYMENT


@pytest.mark.parametrize("streaming", MODES)
async def test_azure_chat_openai_content_filter_finish_interrupts_after_the_text(azure_fake, lc_model, streaming):
    azure_fake.enqueue("Once ", "upon ", "a", prompt_filter_chunk=True, finish_reason="content_filter")
    reply = await final_reply(lc_model(**azure_chat_openai(azure_fake, streaming)))
    assert reply.status == "interrupted"
    assert isinstance(reply.error, errors.ContentFilterError)
    assert reply.text == "Once upon a"


# -- a chain of LangChain's own classes ------------------------------------------------------------
@pytest.mark.parametrize("streaming", MODES)
async def test_prompt_chat_openai_parser_chain_streams_token_by_token(fake_openai, lc_model, streaming):
    tokens = [f" c{i}" for i in range(25)]
    fake_openai.enqueue(*tokens)
    args: dict[str, Any] = {"model": "fake-model", "base_url": fake_openai.base_url}
    if streaming == "callbacks":
        args["streaming"] = True  # what a chain run with ainvoke needs for per-token callbacks
    model = lc_model(**factory("prompt_chat_openai", streaming, input="dict", history_key=None, args=args),
                     api_key=FAKE_KEY)
    deltas, exc = await run(model)
    assert exc is None
    assert texts(deltas) == tokens
    body = fake_openai.requests[0].body
    assert body["messages"][-1] == {"role": "user", "content": "Say hello."}
    assert fake_openai.requests[0].headers["authorization"] == f"Bearer {FAKE_KEY}"  # api_key reached the factory


async def test_dict_input_passes_question_and_history(fake_openai, lc_model):
    fake_openai.enqueue("6.")
    args = {"model": "fake-model", "base_url": fake_openai.base_url, "input_key": "query",
            "history_key": "history", "system": "Use the history."}
    model = lc_model(**factory("prompt_chat_openai", input="dict", input_key="query", history_key="history",
                               args=args), api_key=FAKE_KEY)
    conversation = [Message("system", "Be brief."), Message("user", "What is 2+2?"),
                    Message("assistant", "4."), Message("user", "And 3+3?")]
    deltas, exc = await run(model, messages=conversation)
    assert exc is None
    assert texts(deltas) == ["6."]
    assert fake_openai.requests[0].body["messages"] == [
        {"role": "system", "content": "Use the history."},  # the chain's own prompt
        {"role": "system", "content": "Be brief."},  # history: every earlier message, in order
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},  # the question, under input_key
    ]


# -- a callback-only chain, token by token ------------------------------------------------------------
async def assert_streams_token_by_token(model: LangChainChatModel, gate: chains.TokenGate,
                                        tokens: list[str]) -> Reply:
    """Release ``tokens`` one at a time; each must reach the reply while the chain still runs."""
    gen = stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(0.01))
    shown: list[str] = []
    expected = ""
    try:
        for token in tokens:
            gate.release(token)
            expected += token
            reply = await until(gen, lambda r: r.text == expected, f"token {token!r} to reach the reply")
            assert reply.status == "streaming"
            assert not gate.finished.is_set(), "the chain had already finished"
            shown.append(reply.text)
        gate.end()
        reply = await until(gen, lambda r: not r.active, "the end of the reply")
    finally:
        await asyncio.wait_for(gen.aclose(), STEP)
    assert shown == ["".join(tokens[:i + 1]) for i in range(len(tokens))]  # grew at every step
    assert (reply.status, reply.text) == ("done", "".join(tokens))
    assert reply.error is None
    assert gate.emitted == tokens
    return reply


async def test_callback_only_chain_streams_token_by_token_into_the_reply(gate, lc_model):
    model = lc_model(**factory("callback_only_llm", "callbacks", args={"gate": gate.name}))
    await assert_streams_token_by_token(model, gate, ["Azure ", "tokens ", "arrive ", "one ", "by ", "one."])
    assert "Say hello." in gate.prompts[0]  # the conversation reached the chain


async def test_seed_001_tokens_a_chain_only_logs_still_reach_the_chat(gate, lc_model, caplog):
    """Seed 001: ChuanhuChatGPT's Azure handler logged every token and never passed it
    on, so the log was full and the chat stayed empty. Here the chain carries exactly
    such a logging-only handler of its own; the bridge must still put every token
    into the reply, one at a time, as it comes. (With a bridge that only logs, the
    first ``until`` fails: nothing reaches the reply until the chain returns.)"""
    caplog.set_level("INFO", logger=chains.__name__)
    tokens = ["日志", "里有", "，界面", "也有", "。"]
    model = lc_model(**factory("callback_only_llm", "callbacks", args={"gate": gate.name, "log_tokens": True}))
    await assert_streams_token_by_token(model, gate, tokens)
    assert gate.logged == tokens  # the user's handler still ran, in order
    logged = [r.getMessage() for r in caplog.records if r.name == chains.__name__]
    assert logged == [f"Token generated: {t}" for t in tokens]


# -- failures inside a chain -------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", MODES)
async def test_chain_raising_mid_stream_is_interrupted_with_the_partial_text(lc_model, streaming):
    model = lc_model(**factory("raising_chain", streaming,
                               args={"tokens": ["Half ", "an ", "answer"], "message": "the vector store went away"}))
    reply = await final_reply(model)
    assert reply.status == "interrupted"
    assert reply.text == "Half an answer"
    assert isinstance(reply.error, errors.ModelError)
    assert_clear_detail(reply.error, "ChainFailure", "the vector store went away")
    message = error_message(Translator("en_US"), "en_US", reply.error, model.secrets())
    assert "the vector store went away" in message
    assert "Traceback" not in message and "\n" not in message


@pytest.mark.parametrize("streaming", MODES)
async def test_chain_raising_before_any_token_is_an_error_and_does_not_hang(lc_model, streaming):
    model = lc_model(**factory("raising_chain", streaming, args={"tokens": [], "message": "no index loaded"}))
    reply = await final_reply(model)  # bounded by TIMEOUT: a hang fails
    assert (reply.status, reply.text) == ("error", "")
    assert_clear_detail(reply.error, "ChainFailure", "no index loaded")


async def test_callback_bridge_ends_when_the_worker_thread_raises_before_any_token(gate, lc_model):
    model = lc_model(**factory("callback_only_llm", "callbacks", args={"gate": gate.name}))
    gate.fail(KeyError("retriever missing"))
    reply = await final_reply(model)
    assert (reply.status, reply.text) == ("error", "")
    assert_clear_detail(reply.error, "KeyError", "retriever missing")
    assert gate.finished.is_set()


async def test_callback_chain_failing_after_released_tokens_keeps_them(gate, lc_model):
    model = lc_model(**factory("callback_only_llm", "callbacks", args={"gate": gate.name}))
    gen = stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(0.01))
    try:
        gate.release("Partial ")
        await until(gen, lambda r: r.text == "Partial ", "the first token")
        gate.release("text").fail(ConnectionError("upstream reset"))
        reply = await until(gen, lambda r: not r.active, "the end of the reply")
    finally:
        await asyncio.wait_for(gen.aclose(), STEP)
    assert (reply.status, reply.text) == ("interrupted", "Partial text")
    assert_clear_detail(reply.error, "ConnectionError", "upstream reset")
    assert "Traceback" not in "".join(traceback.format_exception_only(reply.error))


# -- Stop ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", MODES)
async def test_stop_closes_the_chat_openai_upstream(fake_openai, lc_model, streaming):
    fake_openai.enqueue(*[f" w{i}" for i in range(400)], delay=0.05)
    reply = Reply()
    gen = stream_reply(lc_model(**chat_openai(fake_openai, streaming)), MESSAGES, OPTIONS, pacer=Pacer(0.01),
                       reply=reply)
    await until(gen, lambda r: bool(r.text), "the first token")
    assert not fake_openai.disconnected.is_set()
    await asyncio.wait_for(gen.aclose(), STEP)
    assert reply.status == "stopped"
    assert reply.text.startswith(" w0")
    assert await asyncio.to_thread(fake_openai.disconnected.wait, STEP), "the fake server never saw the disconnect"
    assert not fake_openai.completed.is_set()


async def test_stop_in_callbacks_mode_stops_the_blocking_chain_at_its_next_token(gate, lc_model):
    model = lc_model(**factory("callback_only_llm", "callbacks", args={"gate": gate.name}))
    reply = Reply()
    gen = stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(0.01), reply=reply)
    gate.release("one ")
    await until(gen, lambda r: r.text == "one ", "the first token")
    await asyncio.wait_for(gen.aclose(), STEP)  # Stop, while the chain waits on its worker thread
    assert reply.status == "stopped"
    assert not gate.finished.is_set()
    # The chain's next token is refused, and it ends there: the rest is never produced.
    gate.release("two ", "three ", "four")
    gate.end()
    assert await asyncio.to_thread(gate.finished.wait, STEP), "the chain kept running after Stop"
    assert gate.stopped.is_set()
    assert gate.refused == ["two "]
    assert gate.emitted == ["one "]
    assert reply.text == "one "


# -- dict chunks and outputs ---------------------------------------------------------------------------
@pytest.mark.parametrize("together", [False, True], ids=["sources-first", "sources-in-first-answer-chunk"])
async def test_dict_chunks_with_output_key_give_text_and_outputs(lc_model, together):
    sources = ["https://example.org/a", "https://example.org/b"]
    answer = ["The ", "answer ", "is ", "42."]
    model = lc_model(**factory("sources_chain", "stream", output_key="answer",
                               args={"answer": answer, "sources": sources, "together": together}))
    deltas, exc = await run(model)
    assert exc is None
    assert texts(deltas) == answer
    assert [d.outputs for d in deltas if d.outputs] == [{"sources": sources}]
    reply = await final_reply(model)
    assert (reply.status, reply.text) == ("done", "The answer is 42.")
    assert reply.outputs == {"sources": sources}


async def test_callbacks_mode_keeps_outputs_of_the_final_dict(lc_model):
    sources = ["https://example.org/doc"]
    model = lc_model(**factory("callback_answer_with_sources", "callbacks", output_key="answer",
                               args={"tokens": ["Stream", "ed ", "answer"], "sources": sources}))
    reply = await final_reply(model)
    assert (reply.status, reply.text) == ("done", "Streamed answer")
    assert reply.outputs == {"sources": sources}


# -- config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, problem", [
    ("tests.fakes.no_such_module:build", "cannot import"),
    (f"{CHAINS}:no_such_factory", "has no"),
    (CHAINS, "package.module:name"),
    (f"{CHAINS}:GATES", "not callable"),
])
def test_factory_import_errors_are_config_errors_naming_the_field(fake_openai, path, problem):
    with pytest.raises(ConfigError) as info:
        build_config({"models": [
            {"provider": "langchain", "name": "ok", **chat_openai(fake_openai)},
            {"provider": "langchain", "name": "broken", "factory": path},
        ]}, file="config.yaml", env={})
    assert info.value.file == "config.yaml"
    assert info.value.key == "models[1].factory"
    assert problem in info.value.problem


@pytest.mark.parametrize("source", [
    pytest.param("def build(:\n    pass\n", id="syntax-error"),
    pytest.param("raise RuntimeError('OPENAI_API_KEY is not set')\n", id="raises-on-import"),
])
def test_factory_module_failing_to_import_is_a_config_error(tmp_path, monkeypatch, source):
    module = f"user_chain_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        build_config({"models": [{"provider": "langchain", "name": "mine", "factory": f"{module}:build"}]}, env={})
    assert info.value.key == "models[0].factory"


def test_both_or_neither_of_chat_model_and_factory_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        build_config({"models": [{"provider": "langchain", "name": "none"}]}, env={})
    assert info.value.key == "models[0]"
    assert "chat_model or factory" in info.value.problem
