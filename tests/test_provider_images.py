"""Images attached to a user message, through every adapter, against the real HTTP fakes.

Which models see images (``ChatModel.vision``: the entry's ``vision``, else the provider's
default), and what each upstream receives: OpenAI content parts (OpenAI, Azure, LangChain's
``ChatOpenAI`` and ``AzureChatOpenAI``), Promptflow's ``{"data:image/<type>;base64": ...}`` image
input. The fakes check the shapes on arrival as the real servers do (a wrong one is a 400), and
``Seen.images()`` / ``Seen.images`` give back what they decoded, compared here byte for byte.
A model that does not see images refuses them itself, before any request.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Iterator

import httpx
import pytest

from modules.config import ConfigError, build_config
from modules.providers import ChatModel, GenerationOptions, Image, Message, create, errors, validate_entry
from tests.adapter_helpers import collect_deltas, texts
from tests.conftest import FAKE_KEY, fake_model_entry
from tests.fakes.openai_server import FakeOpenAIServer, ReceivedImage
from tests.fakes.promptflow_server import FakePromptflowServer

TIMEOUT = 30.0
API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt-4o-prod"


def picture(n: int, mime: str = "image/png") -> Image:
    """An image whose bytes are every byte value (so base64 is tested whole), told apart by ``n``."""
    return Image(mime, bytes(range(256)) + bytes([n]) * (n + 1), 16 + n, 9, f"picture-{n}.png")


CAT, DOG, BIRD = picture(1), picture(2, "image/jpeg"), picture(3, "image/webp")


def parts(text: str, *images: Image) -> list[dict[str, Any]]:
    """What OpenAI should get for a user message: its text (unless empty), then its images."""
    out: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    return out + [{"type": "image_url", "image_url": {
        "url": f"data:{i.mime};base64," + base64.b64encode(i.data).decode(), "detail": "auto"}} for i in images]


async def run(model: ChatModel, messages: list[Message]):
    try:
        return await collect_deltas(model, messages, GenerationOptions(), TIMEOUT)
    finally:
        await model.aclose()


def model(entry: dict[str, Any]) -> ChatModel:
    return create(validate_entry(entry))


# -- which models see images -------------------------------------------------------------------------
@pytest.mark.parametrize("model_id, sees", [
    ("gpt-4o", True), ("gpt-4o-mini", True), ("gpt-4.1-mini", True), ("gpt-4-turbo", True),
    ("gpt-5", True), ("gpt-5-mini", True), ("o1", True), ("o3", True), ("o4-mini", True),
    ("openai/gpt-4o", True), ("GPT-4o", True),
    ("o1-mini", False), ("o3-mini", False), ("gpt-4-turbo-preview", False), ("gpt-4", False),
    ("gpt-3.5-turbo", False), ("llama3.1:8b", False), ("fake-model", False),
])
def test_openai_default_vision_by_model_id(model_id, sees):
    assert model({"provider": "openai", "name": "m", "model": model_id}).vision is sees


def test_every_built_in_openai_model_sees_images():
    config = build_config({"openai": {"api_key": "sk-test-000000"}}, env={})
    built_in = [create(m) for m in config.models if m.provider == "openai"]
    assert [m.name for m in built_in] == ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o4-mini"]
    assert all(m.vision for m in built_in)
    assert not create(config.models[0]).vision  # the embedded model


@pytest.mark.parametrize("entry, sees", [
    ({"provider": "openai", "name": "llava", "model": "llava:13b", "vision": True}, True),
    ({"provider": "openai", "name": "gpt-4o", "vision": False}, False),
    ({"provider": "azure", "name": "a", "endpoint": "http://127.0.0.1:9", "deployment": "gpt-4o-prod",
      "api_key": "k" * 10}, True),
    ({"provider": "azure", "name": "a", "endpoint": "http://127.0.0.1:9", "deployment": "prod-chat",
      "api_key": "k" * 10}, False),
    ({"provider": "azure", "name": "a", "endpoint": "http://127.0.0.1:9", "deployment": "prod-chat",
      "api_key": "k" * 10, "vision": True}, True),
    ({"provider": "langchain", "name": "lc", "chat_model": "ChatOpenAI", "args": {"model": "gpt-4o"}}, False),
    ({"provider": "langchain", "name": "lc", "chat_model": "ChatOpenAI", "args": {"model": "gpt-4o"},
      "vision": True}, True),
    ({"provider": "promptflow", "name": "pf", "url": "http://127.0.0.1:9/score"}, False),
    ({"provider": "promptflow", "name": "pf", "url": "http://127.0.0.1:9/score", "image_input": "image"}, True),
    ({"provider": "promptflow", "name": "pf", "url": "http://127.0.0.1:9/score", "image_input": "image",
      "vision": False}, False),
    ({"provider": "embedded", "name": "e"}, False),
    ({"provider": "embedded", "name": "e", "vision": False}, False),
], ids=["openai-set", "openai-unset", "azure-by-name", "azure-other-name", "azure-set", "langchain",
        "langchain-set", "promptflow", "promptflow-image-input", "promptflow-off", "embedded", "embedded-false"])
def test_vision_from_the_entry_or_the_providers_default(entry, sees):
    assert model(entry).vision is sees


@pytest.mark.parametrize("entry, key, words", [
    ({"provider": "embedded", "name": "e", "vision": True}, "models[0].vision", "cannot see images"),
    ({"provider": "langchain", "name": "lc", "chat_model": "ChatOpenAI", "input": "text", "vision": True},
     "models[0]", "input: messages"),
    ({"provider": "promptflow", "name": "pf", "url": "http://127.0.0.1:9/score", "vision": True},
     "models[0]", "image_input"),
    ({"provider": "promptflow", "name": "pf", "url": "http://127.0.0.1:9/score", "image_input": "question"},
     "models[0]", "image_input"),
], ids=["embedded", "langchain-text-input", "promptflow-no-image-input", "promptflow-image-input-is-the-question"])
def test_vision_that_cannot_work_is_a_config_error(entry, key, words):
    with pytest.raises(ConfigError) as info:
        build_config({"models": [entry]}, env={})
    assert info.value.key == key, info.value
    assert words in info.value.problem


# -- OpenAI and Azure: content parts ---------------------------------------------------------------
@pytest.fixture
def azure_fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(api_key=FAKE_KEY, azure_deployments={DEPLOYMENT: API_VERSION}) as server:
        yield server


def openai_model(server: FakeOpenAIServer, **extra: Any) -> ChatModel:
    return model(fake_model_entry(server, model="gpt-4o", **extra))


def azure_model(server: FakeOpenAIServer, **extra: Any) -> ChatModel:
    return model({"provider": "azure", "name": "Azure GPT-4o", "endpoint": server.endpoint, "deployment": DEPLOYMENT,
                  "api_version": API_VERSION, "api_key": FAKE_KEY, "max_retries": 0, **extra})


SERVERS = {"openai": ("fake_openai", openai_model), "azure": ("azure_fake", azure_model)}


@pytest.fixture(params=list(SERVERS))
def http_model(request) -> tuple[FakeOpenAIServer, Any]:
    """(fake server, make(**entry)) for the OpenAI adapter and for the Azure one (the fake in Azure mode)."""
    fixture, make = SERVERS[request.param]
    server = request.getfixturevalue(fixture)
    return server, lambda **extra: make(server, **extra)


async def test_images_go_as_parts_after_the_text_in_order_with_their_exact_bytes(http_model):
    server, make = http_model
    server.enqueue("A cat and a dog.")
    messages = [Message("system", "You are terse."), Message("user", "What is in these?", images=(CAT, DOG))]
    deltas, exc = await run(make(), messages)
    assert exc is None, exc
    assert texts(deltas) == ["A cat and a dog."]
    [seen] = server.requests
    assert seen.body["messages"] == [{"role": "system", "content": "You are terse."},
                                     {"role": "user", "content": parts("What is in these?", CAT, DOG)}]
    assert seen.images() == [ReceivedImage(1, 1, "image/png", CAT.data, "auto"),
                             ReceivedImage(1, 2, "image/jpeg", DOG.data, "auto")]


async def test_only_messages_with_images_become_parts(http_model):
    server, make = http_model
    server.enqueue("A bird.")
    messages = [Message("user", "And this one?", images=(CAT,)), Message("assistant", "A cat."),
                Message("user", "Thanks. Now without a picture: hello."), Message("assistant", "Hello."),
                Message("user", "Last:", images=(BIRD,))]
    _, exc = await run(make(), messages)
    assert exc is None, exc
    sent = server.requests[0].body["messages"]
    assert sent == [{"role": "user", "content": parts("And this one?", CAT)},
                    {"role": "assistant", "content": "A cat."},
                    {"role": "user", "content": "Thanks. Now without a picture: hello."},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": parts("Last:", BIRD)}]
    assert [(i.message, i.part, i.data) for i in server.requests[0].images()] == [(0, 1, CAT.data), (4, 1, BIRD.data)]


async def test_an_image_without_text_has_no_text_part(http_model):
    server, make = http_model
    server.enqueue("A webp bird.")
    _, exc = await run(make(), [Message("user", "", images=(BIRD,))])
    assert exc is None, exc
    [message] = server.requests[0].body["messages"]
    assert message["content"] == parts("", BIRD)
    assert [part["type"] for part in message["content"]] == ["image_url"]


async def test_the_rest_of_the_request_is_unchanged(http_model):
    server, make = http_model
    server.enqueue("ok", usage={"prompt_tokens": 900, "completion_tokens": 1})
    deltas, exc = await run(make(), [Message("user", "See?", images=(CAT,))])
    assert exc is None, exc
    body = server.requests[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert [(d.usage.prompt_tokens, d.usage.completion_tokens) for d in deltas if d.usage] == [(900, 1)]


async def test_prefill_continuation_keeps_the_images_of_the_question(fake_openai):
    fake_openai.enqueue(" and a dog.")
    messages = [Message("user", "What is here?", images=(CAT, DOG)), Message("assistant", "A cat")]
    deltas, exc = await run(openai_model(fake_openai, continuation="prefill"), messages)
    assert exc is None, exc
    assert fake_openai.requests[0].body["messages"] == [{"role": "user", "content": parts("What is here?", CAT, DOG)},
                                                        {"role": "assistant", "content": "A cat"}]


# -- a model that does not see images refuses them, before any request ----------------------------------
@pytest.fixture
def pf_server() -> Iterator[FakePromptflowServer]:
    with FakePromptflowServer(image_input="image") as server:
        yield server


def pf_model(server: FakePromptflowServer, **extra: Any) -> ChatModel:
    return model({"provider": "promptflow", "name": "flow", "url": server.url, "max_retries": 0, **extra})


@pytest.mark.parametrize("kind", ["openai", "azure", "langchain", "promptflow", "embedded"])
async def test_a_model_that_does_not_see_images_refuses_them_naming_itself(kind, fake_openai, azure_fake, pf_server):
    made = {
        "openai": lambda: model(fake_model_entry(fake_openai, name="Text Only", model="fake-model")),
        "azure": lambda: azure_model(azure_fake, name="Text Only", vision=False),
        "langchain": lambda: model({"provider": "langchain", "name": "Text Only", "chat_model": "ChatOpenAI",
                                    "api_key": FAKE_KEY, "args": {"model": "gpt-4o", "base_url": fake_openai.base_url,
                                                                  "max_retries": 0}}),
        "promptflow": lambda: pf_model(pf_server, name="Text Only"),  # no image_input
        "embedded": lambda: model({"provider": "embedded", "name": "Text Only"}),
    }[kind]()
    assert made.vision is False
    deltas, exc = await run(made, [Message("user", "What is this?", images=(CAT,))])
    assert deltas == []
    assert isinstance(exc, errors.BadRequestError)
    assert "'Text Only' cannot see images" in exc.detail
    assert fake_openai.requests == [] and azure_fake.requests == [] and pf_server.requests == []


async def test_the_same_model_answers_text_without_images(fake_openai):
    fake_openai.enqueue("Hi.")
    deltas, exc = await run(model(fake_model_entry(fake_openai, model="fake-model")), [Message("user", "Hello")])
    assert exc is None and texts(deltas) == ["Hi."]


# -- LangChain: the parts in the HumanMessage content, through ChatOpenAI / AzureChatOpenAI -------------------
@pytest.mark.parametrize("streaming", ["stream", "callbacks"])
async def test_chat_openai_sends_the_parts_it_gets_in_the_human_message(fake_openai, streaming):
    fake_openai.enqueue("A cat", " and a dog.")
    lc = model({"provider": "langchain", "name": "lc", "chat_model": "ChatOpenAI", "streaming": streaming,
                "api_key": FAKE_KEY, "vision": True,
                "args": {"model": "fake-model", "base_url": fake_openai.base_url, "max_retries": 0}})
    messages = [Message("system", "You are terse."), Message("user", "Earlier", images=(BIRD,)),
                Message("assistant", "A bird."), Message("user", "What is in these?", images=(CAT, DOG))]
    deltas, exc = await run(lc, messages)
    assert exc is None, exc
    assert "".join(texts(deltas)) == "A cat and a dog."
    [seen] = fake_openai.requests
    assert seen.body["messages"] == [{"role": "system", "content": "You are terse."},
                                     {"role": "user", "content": parts("Earlier", BIRD)},
                                     {"role": "assistant", "content": "A bird."},
                                     {"role": "user", "content": parts("What is in these?", CAT, DOG)}]
    assert [(i.mime, i.data, i.detail) for i in seen.images()] == [
        ("image/webp", BIRD.data, "auto"), ("image/png", CAT.data, "auto"), ("image/jpeg", DOG.data, "auto")]


async def test_azure_chat_openai_sends_the_parts(azure_fake):
    azure_fake.enqueue("A cat.")
    lc = model({"provider": "langchain", "name": "lc", "chat_model": "AzureChatOpenAI", "api_key": FAKE_KEY,
                "vision": True, "args": {"azure_endpoint": azure_fake.endpoint, "azure_deployment": DEPLOYMENT,
                                         "api_version": API_VERSION, "max_retries": 0}})
    _, exc = await run(lc, [Message("user", "", images=(CAT,))])
    assert exc is None, exc
    assert azure_fake.requests[0].path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert azure_fake.requests[0].body["messages"] == [{"role": "user", "content": parts("", CAT)}]
    assert [i.data for i in azure_fake.requests[0].images()] == [CAT.data]


# -- Promptflow: the image input, in the flow-input form ---------------------------------------------------
def pf_form(image: Image) -> dict[str, str]:
    return {f"data:{image.mime};base64": base64.b64encode(image.data).decode()}


async def test_one_image_goes_in_the_image_input_as_promptflows_dict(pf_server):
    pf_server.enqueue("A cat.")
    deltas, exc = await run(pf_model(pf_server, image_input="image"), [Message("user", "What is it?", images=(CAT,))])
    assert exc is None, exc
    assert "".join(texts(deltas)) == "A cat."
    [seen] = pf_server.requests
    assert seen.body == {"question": "What is it?", "chat_history": [], "image": pf_form(CAT)}
    assert seen.images == [("image/png", CAT.data)]


async def test_several_images_go_as_a_list_and_history_keeps_only_text(pf_server):
    pf_server.enqueue("Two pets.")
    messages = [Message("system", "Be brief."), Message("user", "Look", images=(BIRD,)), Message("assistant", "A bird."),
                Message("user", "And these?", images=(CAT, DOG))]
    _, exc = await run(pf_model(pf_server, image_input="image"), messages)
    assert exc is None, exc
    [seen] = pf_server.requests
    assert seen.body["image"] == [pf_form(CAT), pf_form(DOG)]
    assert seen.images == [("image/png", CAT.data), ("image/jpeg", DOG.data)]
    assert seen.body["chat_history"] == [{"inputs": {"question": "Look"}, "outputs": {"answer": "A bird."}}]
    assert base64.b64encode(BIRD.data).decode() not in json.dumps(seen.body)


async def test_a_question_without_images_leaves_the_image_input_out(pf_server):
    pf_server.enqueue("Hello.")
    messages = [Message("user", "Look", images=(BIRD,)), Message("assistant", "A bird."), Message("user", "Hi")]
    _, exc = await run(pf_model(pf_server, image_input="image"), messages)
    assert exc is None, exc
    assert set(pf_server.requests[0].body) == {"question", "chat_history"}
    assert pf_server.requests[0].images == []


async def test_the_image_input_takes_its_configured_name(pf_server):
    with FakePromptflowServer(image_input="photos") as other:
        other.enqueue("ok")
        _, exc = await run(pf_model(other, image_input="photos"), [Message("user", "?", images=(DOG,))])
        assert exc is None, exc
        assert other.requests[0].images == [("image/jpeg", DOG.data)]
        assert "image" not in other.requests[0].body


# -- the fakes check what they receive (so that a wrong shape fails the tests above) ------------------------
@pytest.mark.parametrize("content, role", [
    ([{"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}}], "user"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%not-base64"}}], "user"),
    ([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}], "user"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk=", "detail": "huge"}}], "user"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}], "assistant"),
    ([{"type": "image", "data": "aGk="}], "user"),
    ([{"type": "text"}], "user"),
], ids=["remote-url", "bad-base64", "not-an-image", "bad-detail", "on-an-assistant-message", "unknown-part",
        "text-without-text"])
def test_the_fake_openai_server_refuses_malformed_parts(fake_openai, content, role):
    body = {"model": "m", "stream": False, "messages": [{"role": role, "content": content}]}
    answer = httpx.post(fake_openai.base_url + "/chat/completions", json=body,
                        headers={"Authorization": f"Bearer {FAKE_KEY}"}, timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    assert "messages[0].content" in answer.json()["error"]["message"]


def test_the_fake_openai_server_takes_well_formed_parts(fake_openai):
    body = {"model": "m", "stream": False, "messages": [{"role": "user", "content": parts("Hi", CAT)}]}
    answer = httpx.post(fake_openai.base_url + "/chat/completions", json=body,
                        headers={"Authorization": f"Bearer {FAKE_KEY}"}, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    assert fake_openai.requests[0].images() == [ReceivedImage(0, 1, "image/png", CAT.data, "auto")]


@pytest.mark.parametrize("value", [
    "data:image/png;base64," + base64.b64encode(CAT.data).decode(),  # a data URL string is not pf's dict
    {"data:image/png;base64": "not base64!"},
    {"image/png;base64": base64.b64encode(CAT.data).decode()},
    {"data:image/png;base64": base64.b64encode(CAT.data).decode(), "name": "cat.png"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}},  # OpenAI's form, not pf's
], ids=["string", "bad-base64", "bad-key", "two-keys", "openai-part"])
def test_the_fake_flow_refuses_what_pf_would_not_load(pf_server, value):
    answer = httpx.post(pf_server.url, json={"question": "?", "chat_history": [], "image": value},
                        headers={"Accept": "application/json"}, timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["message"].startswith("Failed to load image for input 'image'")
