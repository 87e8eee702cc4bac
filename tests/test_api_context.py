"""The HTTP API fits a request to the model's context as the page does: the oldest rounds are left
out (the fake upstream receives the trimmed request), and a question too long alone is refused
with a 400 in the protocol's own shape (OpenAI: ``context_length_exceeded``). Real app, real port,
the official openai SDK and raw HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import fake_model_entry

API_KEY = "ctx-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONTEXT = 512  # tokens; the reply keeps a quarter of it (128)
ROUND = "lorem ipsum dolor sit amet " * 12  # about 60 tokens a message


@pytest.fixture
def api_url(fake_openai, launch_app) -> str:
    entry = fake_model_entry(fake_openai, "small", context_size=CONTEXT)
    return launch_app({"models": [entry], "api": {"enabled": True, "keys": [API_KEY]}}).rstrip("/")


def history(rounds: int) -> list[dict[str, str]]:
    out = []
    for i in range(rounds):
        out += [{"role": "user", "content": f"question {i}: {ROUND}"}, {"role": "assistant", "content": f"answer {i}"}]
    return out


def test_a_history_longer_than_the_context_is_trimmed_oldest_first(fake_openai, api_url):
    sdk = openai.OpenAI(base_url=api_url + "/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, *history(10), {"role": "user", "content": "And now?"}]
    reply = sdk.chat.completions.create(model="small", messages=messages)
    assert reply.choices[0].message.content == "Hello from the fake server."
    sent = fake_openai.requests[-1].body["messages"]
    assert sent[0] == {"role": "system", "content": "Be brief."}  # the system prompt stays
    assert sent[-1] == {"role": "user", "content": "And now?"}  # the question stays
    assert 3 <= len(sent) < len(messages)  # the oldest rounds went
    kept = [m["content"] for m in sent if m["content"].startswith("question ")]
    assert kept and kept == [m["content"] for m in messages[1:-1] if m["content"].startswith("question ")][-len(kept):]


def test_a_question_too_long_alone_is_refused_in_each_protocols_shape(fake_openai, api_url):
    long = "word " * 2000
    sdk = openai.OpenAI(base_url=api_url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="small", messages=[{"role": "user", "content": long}])
    assert refused.value.body["code"] == "context_length_exceeded" and refused.value.body["param"] == "messages"
    assert "tokens" in refused.value.body["message"]
    score = httpx.post(api_url + "/score", json={"question": long}, headers={**AUTH, "Accept": "application/json"})
    assert score.status_code == 400 and score.json()["error"]["code"] == "UserError"
    deep = httpx.post(api_url + "/deepchat", json={"messages": [{"role": "user", "text": long}]}, headers=AUTH)
    assert deep.status_code == 400 and "tokens" in deep.json()["error"]
    assert not fake_openai.requests
