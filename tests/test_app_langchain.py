"""A LangChain model in callbacks mode, end to end: the real app on a real port,
gradio_client on ``/chat``, LangChain talking to the fake OpenAI server over HTTP.

This is the path seed 001 broke: tokens reported only through
``on_llm_new_token`` must reach the chat as they come, not all at the end.
"""

from __future__ import annotations

from typing import Any

import pytest
from gradio_client import Client

from tests.conftest import FAKE_KEY
from tests.fakes.openai_server import FakeOpenAIServer

WAIT = 30.0  # upper bound for the whole reply


def builtin_chat_openai(server: FakeOpenAIServer) -> dict[str, Any]:
    return {"chat_model": "ChatOpenAI", "args": {"model": "fake-model", "base_url": server.base_url,
                                                 "max_retries": 0}}


def user_chain(server: FakeOpenAIServer) -> dict[str, Any]:
    """``ChatPromptTemplate | ChatOpenAI(streaming=True) | StrOutputParser``, run with ``ainvoke``."""
    return {"factory": "tests.fakes.chains:prompt_chat_openai", "input": "dict", "history_key": "chat_history",
            "args": {"model": "fake-model", "base_url": server.base_url, "streaming": True,
                     "history_key": "chat_history"}}


@pytest.mark.parametrize("source", [builtin_chat_openai, user_chain], ids=["ChatOpenAI", "user-chain"])
def test_callbacks_mode_model_streams_growing_text_through_chat_api(fake_openai, launch_app, source):
    url = launch_app({"models": [{"provider": "langchain", "name": "LangChain (callbacks)", "streaming": "callbacks",
                                  "api_key": FAKE_KEY, **source(fake_openai)}]})
    tokens = [f" lc{i}" for i in range(30)]
    fake_openai.enqueue(*tokens, delay=0.02)  # the server paces its tokens; the test waits on the job
    client = Client(url, verbose=False)
    try:
        job = client.submit("Hello", "", "", api_name="/chat")
        outputs = list(job)  # every streamed value, in order
        result = job.result(timeout=WAIT)
    finally:
        client.close()

    full = "".join(tokens)
    assert len(outputs) > 1, f"not streamed: {outputs!r}"
    assert outputs[-1] == full
    assert result == full
    for before, after in zip(outputs, outputs[1:]):
        assert after.startswith(before) and len(after) > len(before), (before, after)
    assert all(FAKE_KEY not in str(o) for o in outputs)
    body = fake_openai.requests[-1].body
    assert body["stream"] is True
    assert body["messages"][-1] == {"role": "user", "content": "Hello"}
