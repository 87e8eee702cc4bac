"""The Azure OpenAI adapter against a real HTTP server in Azure mode.

``FakeOpenAIServer(azure_deployments=...)`` serves
``/openai/deployments/{deployment}/chat/completions``, wants the deployment's
``api-version`` query and the key in an ``api-key`` header (PROTOCOLS.md §3).
The official openai SDK (``AsyncAzureOpenAI``, inside our adapter) makes real
requests; nothing in it is patched. Waits are on events or generator steps,
each bounded.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any, AsyncIterator, Iterator

import pytest

from modules.config import ConfigError, build_config
from modules.i18n import Translator
from modules.providers import Delta, GenerationOptions, Message, Usage, create, errors, validate_entry
from modules.providers.azure import AzureChatModel
from modules.core.sentences import error_message
from modules.core.streaming import Pacer, Reply, stream_reply
from tests.adapter_helpers import collect_deltas, final_reply as shared_final_reply, texts
from tests.conftest import FAKE_KEY
from tests.fakes.openai_server import FakeOpenAIServer

API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt-4o-prod"
OTHER_DEPLOYMENT = "gpt-4o-mini-eu"
MESSAGES = [Message("system", "You are terse."), Message("user", "Say hello.")]
TIMEOUT = 30.0  # upper bound on any one stream
STEP = 10.0  # upper bound on any one yield or event


@pytest.fixture
def azure_fake() -> Iterator[FakeOpenAIServer]:
    """A fake Azure OpenAI resource with two deployments, wanting ``FAKE_KEY`` in ``api-key``."""
    deployments = {DEPLOYMENT: API_VERSION, OTHER_DEPLOYMENT: API_VERSION}
    with FakeOpenAIServer(api_key=FAKE_KEY, azure_deployments=deployments) as server:
        yield server


def azure_entry(server: FakeOpenAIServer, name: str = "Azure GPT-4o", **extra: Any) -> dict[str, Any]:
    return {"provider": "azure", "name": name, "endpoint": server.endpoint, "deployment": DEPLOYMENT,
            "api_version": API_VERSION, "api_key": FAKE_KEY, "max_retries": 0, **extra}


@pytest.fixture
async def make_model(azure_fake: FakeOpenAIServer):
    models: list[AzureChatModel] = []

    def make(**extra: Any) -> AzureChatModel:
        model = create(validate_entry(azure_entry(azure_fake, **extra)))
        assert isinstance(model, AzureChatModel)
        models.append(model)
        return model

    yield make
    for model in models:
        await model.aclose()


async def run(model: AzureChatModel, options: GenerationOptions | None = None) -> tuple[list[Delta], BaseException | None]:
    return await collect_deltas(model, MESSAGES, options, TIMEOUT)


async def final_reply(model: AzureChatModel) -> Reply:
    """The reply after stream_reply has run to its end."""
    return await shared_final_reply(model, MESSAGES, None, TIMEOUT)


# -- the request ---------------------------------------------------------------------------------
async def test_request_uses_deployment_path_api_version_and_api_key_header(azure_fake, make_model):
    azure_fake.enqueue("ok")
    deltas, exc = await run(make_model(headers={"X-Trace": "abc"}))
    assert exc is None
    assert texts(deltas) == ["ok"]
    [seen] = azure_fake.requests
    assert seen.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert seen.query == {"api-version": API_VERSION}
    assert seen.headers["api-key"] == FAKE_KEY
    assert seen.headers["x-trace"] == "abc"
    # The key goes in api-key only: never as a Bearer token, nor in any other header.
    assert f"Bearer {FAKE_KEY}" not in seen.headers.get("authorization", "")
    assert [k for k, v in seen.headers.items() if FAKE_KEY in v] == ["api-key"]
    assert seen.body["stream"] is True
    assert seen.body["messages"] == [m.as_dict() for m in MESSAGES]


async def test_model_id_is_the_deployment(make_model):
    model = make_model(name="Shown name")
    assert model.name == "Shown name"
    assert model.model_id == DEPLOYMENT


# -- the stream ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fragment", [None, 5])
async def test_prompt_filter_chunk_is_skipped_and_text_is_complete_in_order(azure_fake, make_model, fragment):
    tokens = [f"tok{i} " for i in range(40)] + ["你好", "。"]
    azure_fake.enqueue(*tokens, prompt_filter_chunk=True, fragment=fragment)
    deltas, exc = await run(make_model())
    assert exc is None
    assert texts(deltas) == tokens
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]


async def test_usage_arrives(azure_fake, make_model):
    azure_fake.enqueue("a", "b", prompt_filter_chunk=True, usage={"prompt_tokens": 11, "completion_tokens": 2})
    deltas, exc = await run(make_model())
    assert exc is None
    assert azure_fake.requests[0].body["stream_options"] == {"include_usage": True}
    assert [d.usage for d in deltas if d.usage] == [Usage(prompt_tokens=11, completion_tokens=2)]


async def test_usage_reaches_the_reply(azure_fake, make_model):
    azure_fake.enqueue("a", "b", prompt_filter_chunk=True, usage={"prompt_tokens": 11, "completion_tokens": 2})
    reply = await final_reply(make_model())
    assert (reply.status, reply.text) == ("done", "ab")
    assert reply.usage == Usage(prompt_tokens=11, completion_tokens=2)


# -- content filter ------------------------------------------------------------------------------
async def test_finish_reason_content_filter_interrupts_and_keeps_the_text(azure_fake, make_model):
    azure_fake.enqueue("The ", "first ", "part", prompt_filter_chunk=True, finish_reason="content_filter")
    reply = await final_reply(make_model())
    assert reply.status == "interrupted"
    assert isinstance(reply.error, errors.ContentFilterError)
    assert reply.text == "The first part"


async def test_prompt_rejected_by_the_content_filter_is_a_clear_content_filter_error(azure_fake, make_model):
    upstream = ("The response was filtered due to the prompt triggering Azure OpenAI's content management "
                "policy.")
    azure_fake.enqueue(status=400, error={"message": upstream, "code": "content_filter"})
    model = make_model()
    deltas, exc = await run(model)
    assert isinstance(exc, errors.ContentFilterError)
    assert exc.status == 400
    assert texts(deltas) == []
    message = error_message(Translator("en_US"), "en_US", exc, model.secrets())
    assert "content filter" in message.lower()
    assert "Traceback" not in message and "\n" not in message
    assert FAKE_KEY not in message


# -- failures before the stream ----------------------------------------------------------------------
async def test_wrong_key_is_an_authentication_error(azure_fake, make_model):
    deltas, exc = await run(make_model(api_key="sk-wrong-key-9876543210"))
    assert isinstance(exc, errors.AuthenticationError)
    assert exc.status == 401
    assert deltas == []


async def test_wrong_deployment_is_not_found(azure_fake, make_model):
    deltas, exc = await run(make_model(deployment="no-such-deployment"))
    assert type(exc) is errors.NotFoundError
    assert exc.status == 404
    assert "deployment" in exc.detail.lower()
    assert azure_fake.requests[0].path == "/openai/deployments/no-such-deployment/chat/completions"
    assert deltas == []


async def test_wrong_api_version_is_not_found(azure_fake, make_model):
    deltas, exc = await run(make_model(api_version="2023-03-15-preview"))
    assert type(exc) is errors.NotFoundError
    assert exc.status == 404
    assert azure_fake.requests[0].query == {"api-version": "2023-03-15-preview"}
    assert deltas == []


# -- Stop -------------------------------------------------------------------------------------------
async def test_stop_closes_the_upstream_connection(azure_fake, make_model):
    azure_fake.enqueue(*[f" w{i}" for i in range(400)], delay=0.05, prompt_filter_chunk=True)
    reply = Reply()
    gen: AsyncIterator[Reply] = stream_reply(make_model(), MESSAGES, GenerationOptions(), pacer=Pacer(0.01),
                                             reply=reply)
    first = await asyncio.wait_for(anext(gen), STEP)
    assert first.text  # streaming has begun
    assert not azure_fake.disconnected.is_set()
    await asyncio.wait_for(gen.aclose(), STEP)
    assert reply.status == "stopped"
    assert reply.text.startswith(" w0")
    disconnected = await asyncio.to_thread(azure_fake.disconnected.wait, STEP)
    assert disconnected, "the fake server never saw the client go away"
    assert not azure_fake.completed.is_set()


# -- config -------------------------------------------------------------------------------------
def azure_identity_missing() -> bool:
    try:
        return importlib.util.find_spec("azure.identity") is None
    except ModuleNotFoundError:  # no "azure" package at all
        return True


async def test_several_deployments_in_one_config_are_several_models(azure_fake):
    config = build_config({"models": [
        azure_entry(azure_fake, name="GPT-4o (prod)"),
        azure_entry(azure_fake, name="GPT-4o mini (EU)", deployment=OTHER_DEPLOYMENT),
    ]}, env={})
    assert config.model_names() == ["GPT-4o (prod)", "GPT-4o mini (EU)"]
    models = [create(entry) for entry in config.models]
    try:
        for model, deployment in zip(models, [DEPLOYMENT, OTHER_DEPLOYMENT]):
            azure_fake.enqueue("from ", deployment)
            deltas, exc = await run(model)
            assert exc is None
            assert "".join(texts(deltas)) == f"from {deployment}"
            assert azure_fake.requests[-1].path == f"/openai/deployments/{deployment}/chat/completions"
    finally:
        for model in models:
            await model.aclose()


def test_api_key_auth_without_a_key_is_a_config_error_naming_the_entry(azure_fake):
    entry = azure_entry(azure_fake, name="keyless")
    del entry["api_key"]
    with pytest.raises(ConfigError) as info:
        build_config({"models": [azure_entry(azure_fake), entry]}, file="config.yaml", env={})
    assert info.value.file == "config.yaml"
    assert info.value.key == "models[1]"
    assert "api_key" in info.value.problem


@pytest.mark.skipif(not azure_identity_missing(), reason="azure-identity is installed")
def test_entra_id_without_azure_identity_is_a_config_error(azure_fake):
    entry = azure_entry(azure_fake, auth="entra_id")
    del entry["api_key"]
    with pytest.raises(ConfigError) as info:
        build_config({"models": [entry]}, env={})
    assert info.value.key == "models[0]"
    assert "azure-identity" in info.value.problem


async def test_api_key_env_reads_the_key_from_the_environment(azure_fake):
    entry = azure_entry(azure_fake, api_key_env="AZURE_OPENAI_API_KEY")
    del entry["api_key"]
    config = build_config({"models": [entry]}, env={"AZURE_OPENAI_API_KEY": FAKE_KEY})
    [model_config] = config.models
    assert model_config.api_key is not None and model_config.api_key.get_secret_value() == FAKE_KEY
    model = create(model_config)
    try:
        azure_fake.enqueue("authorised")
        deltas, exc = await run(model)
    finally:
        await model.aclose()
    assert exc is None
    assert texts(deltas) == ["authorised"]
    assert azure_fake.requests[-1].headers["api-key"] == FAKE_KEY
    assert FAKE_KEY in model.secrets()  # so that an echoed key is scrubbed


def test_api_key_env_naming_an_unset_variable_is_a_config_error(azure_fake):
    entry = azure_entry(azure_fake, api_key_env="AZURE_OPENAI_API_KEY")
    del entry["api_key"]
    with pytest.raises(ConfigError) as info:
        build_config({"models": [entry]}, env={"SOMETHING_ELSE": "x"})
    assert info.value.key == "models[0]"
    assert "api_key_env" in info.value.problem
