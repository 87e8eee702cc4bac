"""Continue a reply that was stopped, cut by max tokens or interrupted: the reply grows in place.

The layers: ``ChatModel.can_continue`` (the embedded model and OpenAI-compatible servers with
``continuation: prefill`` continue a final assistant message; the rest are asked to in words),
``ChatService.continuation`` (the request), ``fit`` (the partial answer and the instruction stay
with their question), ``start(continuing=)`` and ``settle`` (the new part on top of the earlier
counts). HTTP goes to the real fake server (tests/fakes/openai_server.py); the embedded model
is the real SmolLM2-135M. Every wait is on an event or a run's end, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Iterator

import pytest

from modules.core import accounting, context, tokens
from modules.core.chat import CONTINUE_INSTRUCTION, ChatService
from modules.core.streaming import Counts, Reply, ReplyRun
from modules.i18n import Translator
from modules.providers import (ChatModel, Delta, GenerationOptions, Message, Usage, create, errors, provider_class,
                               validate_entry)
from modules.providers.base import Price
from modules.providers.embedded import EmbeddedChatModel, continuation_prompt
from modules.providers.openai_compat import OpenAIChatModel
from tests.conftest import fake_model_entry
from tests.fakes.openai_server import FakeOpenAIServer
from tests.fakes.scripted_model import ScriptedModel

STEP = 30.0  # seconds: the most any one step may take before the test fails
OPTIONS = GenerationOptions()
QUESTION = [Message("system", "Be brief."), Message("user", "Tell me a story.")]
PRICE = {"input": 2.0, "output": 8.0}  # USD per million tokens
PRICED = Price(**PRICE)
UPSTREAM = "gpt-4o"  # an OpenAI model id: tiktoken counts exactly


# -- helpers ----------------------------------------------------------------------------------------
@functools.cache
def translator() -> Translator:
    return Translator("auto")


@pytest.fixture
async def services():
    """``make(model)`` -> a ChatService for it; what still runs is stopped after the test."""
    made: list[ChatService] = []

    def make(model: ChatModel, **kwargs: Any) -> ChatService:
        svc = ChatService({model.name: model}, translator=translator(), **kwargs)
        made.append(svc)
        return svc

    yield make
    live = [run for svc in made for run in svc.runs.live()]
    for run in live:
        run.stop()
    await asyncio.wait_for(asyncio.gather(*(run.wait() for run in live), return_exceptions=True), STEP)
    for svc in made:
        for model in svc.models.values():
            await model.aclose()


def http_model(server: FakeOpenAIServer, **extra: Any) -> OpenAIChatModel:
    model = create(validate_entry(fake_model_entry(server, model=UPSTREAM, **extra)))
    assert isinstance(model, OpenAIChatModel)
    return model


async def reply_to(svc: ChatService, model: ChatModel, messages: list[Message], *,
                   continuing: Reply | None = None) -> tuple[context.Fit, Reply]:
    """Fit ``messages``, run the reply to its end (settled), and return both."""
    fit, _ = await asyncio.wait_for(svc.fit(model, messages, OPTIONS), STEP)
    assert not fit.overflows
    run = svc.start(model, fit, OPTIONS, continuing=continuing)
    return fit, await asyncio.wait_for(run.wait(), STEP)


def dicts(messages: list[Message]) -> list[dict[str, str]]:
    return [m.as_dict() for m in messages]


# -- the capability -----------------------------------------------------------------------------------
def test_who_continues(fake_openai):
    assert ScriptedModel().can_continue is False  # the default
    assert http_model(fake_openai).can_continue is False  # continuation: request, the default
    assert http_model(fake_openai, continuation="prefill").can_continue is True
    azure = create(validate_entry({"provider": "azure", "name": "az", "endpoint": fake_openai.endpoint,
                                   "deployment": "d", "api_key": "k", "continuation": "prefill"}))
    assert azure.can_continue is True
    embedded = create(validate_entry({"provider": "embedded", "name": "local"}))
    assert embedded.can_continue is True
    for provider in ("langchain", "promptflow"):
        assert provider_class(provider).can_continue is ChatModel.can_continue, provider
    with pytest.raises(ValueError):
        validate_entry(fake_model_entry(fake_openai, continuation="sometimes"))


def test_continuation_request_prefill_and_fallback():
    partial = "Once upon a time"
    scripted = ScriptedModel()
    assert ChatService.continuation(scripted, QUESTION, partial) == [
        *QUESTION, Message("assistant", partial), Message("user", CONTINUE_INSTRUCTION)]

    class Continuing(ScriptedModel):
        can_continue = True  # type: ignore[assignment]

    assert ChatService.continuation(Continuing(), QUESTION, partial) == [*QUESTION, Message("assistant", partial)]
    assert "continue" in CONTINUE_INSTRUCTION.lower() and "repeat" in CONTINUE_INSTRUCTION.lower()


# -- fitting a continuation ---------------------------------------------------------------------------------
def sizes(messages: list[Message]) -> dict[int, int]:
    """Each message's tokens in a request (the per-request priming left out), by id."""
    return {id(m): tokens.count_messages([m.as_dict()], UPSTREAM)[0] - 3 for m in messages}


def long_history() -> tuple[Message, list[list[Message]], Message, Message]:
    system = Message("system", "Be brief.")
    rounds = [[Message("user", f"question {i} " + "word " * 20), Message("assistant", f"answer {i} " + "word " * 30)]
              for i in range(4)]
    return system, rounds, Message("user", "Tell me a story."), Message("assistant", "Once upon a time " * 40)


@pytest.mark.parametrize("instructed", [False, True], ids=["prefill", "request"])
def test_fit_drops_the_oldest_rounds_and_keeps_the_partial_answer(instructed: bool):
    system, rounds, question, partial = long_history()
    tail = [question, partial] + ([Message("user", CONTINUE_INSTRUCTION)] if instructed else [])
    messages = [system, *(m for r in rounds for m in r), *tail]
    n = sizes(messages)
    kept_rounds = rounds[2:]  # a budget that fits exactly the last two rounds with the tail
    budget = 3 + sum(n[id(m)] for m in [system, *(m for r in kept_rounds for m in r), *tail])
    result = context.fit(messages, UPSTREAM, context_size=budget + 100, reserve=100)
    assert not result.overflows
    assert result.messages == [system, *(m for r in kept_rounds for m in r), *tail]
    assert result.dropped == rounds[:2] and result.dropped_rounds == 2
    assert result.prompt_tokens == budget == tokens.count_messages(dicts(result.messages), UPSTREAM)[0]


@pytest.mark.parametrize("instructed", [False, True], ids=["prefill", "request"])
def test_fit_never_drops_or_splits_the_tail_even_when_it_overflows(instructed: bool):
    system, rounds, question, partial = long_history()
    tail = [question, partial] + ([Message("user", CONTINUE_INSTRUCTION)] if instructed else [])
    messages = [system, *(m for r in rounds for m in r), *tail]
    n = sizes(messages)
    budget = 3 + n[id(system)] + n[id(question)]  # room for the question, not for the partial answer
    result = context.fit(messages, UPSTREAM, context_size=budget + 100, reserve=100)
    assert result.overflows  # so the front end says so, instead of sending half a continuation
    assert result.messages == [system, *tail]
    assert result.dropped == rounds


def test_fit_a_continuation_without_a_question_keeps_every_message():
    partial = Message("assistant", "Once upon a time " * 40)
    for tail in ([partial], [partial, Message("user", CONTINUE_INSTRUCTION)]):
        result = context.fit([Message("system", "Be brief."), *tail], UPSTREAM, context_size=300, reserve=100)
        assert result.messages[1:] == tail and result.dropped_rounds == 0


async def test_chat_service_fits_the_fallback_request(services):
    system, rounds, question, partial = long_history()
    model = ScriptedModel(context_size=512)
    svc = services(model)
    history = [system, *(m for r in rounds for m in r), question]
    request = svc.continuation(model, history, partial.content)
    fit, _ = await asyncio.wait_for(svc.fit(model, request, OPTIONS), STEP)
    assert not fit.overflows and fit.dropped_rounds >= 1
    assert fit.messages[-3:] == [question, Message("assistant", partial.content), Message("user", CONTINUE_INSTRUCTION)]
    assert fit.dropped == rounds[:fit.dropped_rounds]  # the oldest first


# -- through the fake HTTP server ---------------------------------------------------------------------
async def first_reply(svc: ChatService, model: ChatModel, server: FakeOpenAIServer, *,
                      usage: dict[str, int] | None) -> Reply:
    """The reply to QUESTION, cut by max tokens."""
    server.enqueue("Once", " upon", " a", " time", finish_reason="length", usage=usage)
    _, earlier = await reply_to(svc, model, QUESTION)
    assert (earlier.text, earlier.status, earlier.finish_reason) == ("Once upon a time", "done", "length")
    return earlier


async def test_prefill_sends_the_partial_answer_last_and_the_reply_grows_in_place(fake_openai, services):
    model = http_model(fake_openai, continuation="prefill", price=PRICE)
    svc = services(model)
    earlier = await first_reply(svc, model, fake_openai, usage={"prompt_tokens": 10, "completion_tokens": 4})
    fake_openai.enqueue(" there", " was", " a", " cat.", usage={"prompt_tokens": 15, "completion_tokens": 4})
    fit, reply = await reply_to(svc, model, svc.continuation(model, QUESTION, earlier.text), continuing=earlier)

    assert fake_openai.requests[-1].body["messages"] == [
        *dicts(QUESTION), {"role": "assistant", "content": "Once upon a time"}]
    assert "continue_final_message" not in fake_openai.requests[-1].body  # nothing asked for, nothing sent
    assert reply.text == "Once upon a time there was a cat."
    assert reply.new_text == " there was a cat." and reply.deltas == 4
    assert (reply.status, reply.finish_reason) == ("done", "stop")  # the new run's, not the earlier "length"
    assert reply.counts == Counts(10 + 15, 4 + 4, True)
    assert reply.cost == pytest.approx(PRICED.cost(10, 4) + PRICED.cost(15, 4))
    assert reply.cost == pytest.approx(earlier.cost + PRICED.cost(15, 4))
    assert earlier.text == "Once upon a time" and earlier.counts == Counts(10, 4, True)  # left as it was


async def test_prefill_with_vllm_fields(fake_openai, services):
    body = {"continue_final_message": True, "add_generation_prompt": False}
    model = http_model(fake_openai, continuation="prefill", continuation_body=body)
    svc = services(model)
    earlier = await first_reply(svc, model, fake_openai, usage=None)
    assert "continue_final_message" not in fake_openai.requests[-1].body  # not a continuation
    fake_openai.enqueue(" there", " was")
    await reply_to(svc, model, svc.continuation(model, QUESTION, earlier.text), continuing=earlier)
    seen = fake_openai.requests[-1].body
    assert (seen["continue_final_message"], seen["add_generation_prompt"]) == (True, False)
    assert seen["messages"][-1] == {"role": "assistant", "content": "Once upon a time"}


async def test_request_mode_asks_in_words_and_counts_without_usage(fake_openai, services):
    model = http_model(fake_openai, price=PRICE, stream_usage=False)
    svc = services(model)
    earlier = await first_reply(svc, model, fake_openai, usage=None)
    new = [" there", " was", " a", " cat", " who", " liked", " long", " stories."]
    fake_openai.enqueue(*new)
    fit, reply = await reply_to(svc, model, svc.continuation(model, QUESTION, earlier.text), continuing=earlier)

    assert fake_openai.requests[-1].body["messages"] == [
        *dicts(QUESTION), {"role": "assistant", "content": "Once upon a time"},
        {"role": "user", "content": CONTINUE_INSTRUCTION}]
    assert reply.text == earlier.text + "".join(new) and reply.deltas == len(new)
    # tiktoken on the new text only, the prompt of the continuation's own fit; plus the earlier counts
    completion, exact = tokens.count("".join(new), UPSTREAM)
    assert earlier.counts is not None and earlier.cost is not None
    assert reply.counts == Counts(earlier.counts.prompt + fit.prompt_tokens, earlier.counts.completion + completion,
                                  earlier.counts.exact and exact and fit.exact)
    assert completion != tokens.count(reply.text, UPSTREAM)[0]  # (so that counting the prefix again would show)
    assert reply.cost == pytest.approx(earlier.cost + PRICED.cost(fit.prompt_tokens, completion))


async def test_stop_during_a_continuation_keeps_the_prefix_and_the_new_part(fake_openai, services):
    model = http_model(fake_openai, continuation="prefill")
    svc = services(model)
    earlier = await first_reply(svc, model, fake_openai, usage={"prompt_tokens": 10, "completion_tokens": 4})
    fake_openai.reset_events()
    new = [f" w{i}" for i in range(200)]
    fake_openai.enqueue(*new, delay=0.02, usage={"prompt_tokens": 15, "completion_tokens": 200})
    fit, _ = await svc.fit(model, svc.continuation(model, QUESTION, earlier.text), OPTIONS)
    run = svc.start(model, fit, OPTIONS, continuing=earlier)

    async def until_two_new_deltas(run: ReplyRun) -> None:
        async for reply in run.watch():
            if reply is not None and reply.deltas >= 2:
                return

    await asyncio.wait_for(until_two_new_deltas(run), STEP)
    run.stop()
    reply = await asyncio.wait_for(run.wait(), STEP)
    assert await asyncio.to_thread(fake_openai.disconnected.wait, STEP), "the upstream was not closed"
    assert reply.status == "stopped" and 2 <= reply.deltas < len(new)
    assert reply.text == earlier.text + "".join(new[:reply.deltas])
    completion, _ = tokens.count(reply.new_text, UPSTREAM)  # no usage came: tiktoken on the new part
    assert reply.counts == Counts(10 + fit.prompt_tokens, 4 + completion, fit.exact)


# -- settle -----------------------------------------------------------------------------------------------
def continued(earlier: Reply, **fields: Any) -> Reply:
    reply = Reply(prompt_estimate=(20, True), **fields)
    reply.continue_from(earlier)
    return reply


def test_settle_adds_the_new_part_to_the_earlier_counts_and_cost():
    model = ScriptedModel(name=UPSTREAM, price=PRICED)
    earlier = Reply(text="Once upon a time", reasoning="think", outputs={"sources": ["a.md"]},
                    counts=Counts(10, 5, True), cost=0.5)
    reply = continued(earlier)
    assert (reply.text, reply.reasoning, reply.outputs) == ("Once upon a time", "think", {"sources": ["a.md"]})
    reply.apply(Delta(text=" there", reasoning=" more"))
    reply.status = "done"
    accounting.settle(reply, model)
    completion, _ = tokens.count(" more there", UPSTREAM)
    assert reply.counts == Counts(10 + 20, 5 + completion, True)
    assert reply.cost == pytest.approx(0.5 + PRICED.cost(20, completion))


@pytest.mark.parametrize(
    "earlier_counts, earlier_cost, usage, counts, cost_known",
    [
        (Counts(10, 5, False), 0.5, Usage(20, 3, True), Counts(30, 8, False), True),  # exact only if both are
        (Counts(10, 5, True), 0.5, Usage(20, 3, False), Counts(30, 8, False), True),
        (Counts(10, 5, True), None, Usage(20, 3, True), Counts(30, 8, True), False),  # cost unknown: None
        (None, None, Usage(20, 3, True), Counts(20, 3, False), False),  # earlier unknown: an estimate
    ],
)
def test_settle_exactness_and_unknown_parts(earlier_counts, earlier_cost, usage, counts, cost_known):
    earlier = Reply(text="Once", counts=earlier_counts, cost=earlier_cost)
    reply = continued(earlier, usage=usage, status="done")
    accounting.settle(reply, ScriptedModel(price=PRICED))
    assert reply.counts == counts
    assert (reply.cost is not None) == cost_known
    if cost_known:
        assert reply.cost == pytest.approx(earlier_cost + PRICED.cost(20, 3))


def test_settle_a_continuation_that_failed_before_anything_came_is_the_earlier_reply():
    earlier = Reply(text="Once", counts=Counts(10, 5, True), cost=0.5)
    reply = continued(earlier)
    reply.fail(errors.ServerError("boom"))
    assert reply.status == "interrupted"  # the earlier text is still there
    accounting.settle(reply, ScriptedModel(price=PRICED))
    assert (reply.counts, reply.cost) == (Counts(10, 5, True), 0.5)


# -- the embedded model (real SmolLM2-135M) ---------------------------------------------------------------
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_continuation_prompt_ends_with_the_assistant_header_and_the_partial_text():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    prompt = continuation_prompt(SMOLLM2_TEMPLATE, messages, "Red, green and")
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName three colours.<|im_end|>\n"
                      "<|im_start|>assistant\nRed, green and")
    # the template's own tokens come from the model; the partial text is kept verbatim (spaces too)
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}" \
               "{% if add_generation_prompt %}[assistant]{% endif %}"
    assert continuation_prompt(template, messages[1:], " and  ", bos_token="<s>", eos_token="</s>") == \
        "<s>[user]Name three colours.</s>[assistant] and  "


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedChatModel]:
    model = create(validate_entry({"provider": "embedded", "name": "local"}))
    assert isinstance(model, EmbeddedChatModel)
    yield model
    model._worker.shutdown(wait=True)


GREEDY = GenerationOptions(temperature=0, max_tokens=16)
SEA = [Message("user", "Write one sentence about the sea.")]


async def texts_and_usage(model: ChatModel, messages: list[Message], options: GenerationOptions) -> tuple[list[str], Usage]:
    async def drain() -> tuple[list[str], Usage]:
        deltas = [delta async for delta in model.stream(messages, options)]
        usage = deltas[-1].usage
        assert usage is not None
        return [d.text for d in deltas if d.text], usage

    return await asyncio.wait_for(drain(), STEP)


async def test_the_embedded_model_continues_where_the_partial_answer_stops(embedded):
    whole, whole_usage = await texts_and_usage(embedded, SEA, GREEDY)
    assert len(whole) == 16
    k = 6
    partial = "".join(whole[:k])
    new, usage = await texts_and_usage(embedded, [*SEA, Message("assistant", partial)],
                                       GenerationOptions(temperature=0, max_tokens=16 - k))
    # Greedy decoding from the same prefix: the continuation is the rest of the whole answer.
    assert "".join(new) == "".join(whole[k:])
    assert usage.completion_tokens == 16 - k  # the new tokens only
    assert usage.prompt_tokens == whole_usage.prompt_tokens + k  # the partial answer is part of the prompt


async def test_the_embedded_model_continues_through_the_service_and_stops(embedded, services):
    svc = services(ScriptedModel())  # (its registry; the embedded model is closed by its own fixture)
    earlier = Reply(model=embedded.name, text="The sea is a vast", counts=Counts(30, 5, True), status="stopped")
    fit, _ = await svc.fit(embedded, svc.continuation(embedded, SEA, earlier.text), GREEDY)
    assert fit.messages[-1] == Message("assistant", "The sea is a vast")  # no instruction: it continues truly
    run = svc.start(embedded, fit, GenerationOptions(temperature=0, max_tokens=200), continuing=earlier)

    async def until_a_new_delta(run: ReplyRun) -> None:
        async for reply in run.watch():
            if reply is not None and reply.deltas >= 1:
                return

    await asyncio.wait_for(until_a_new_delta(run), STEP)
    run.stop()
    reply = await asyncio.wait_for(run.wait(), STEP)
    assert reply.status == "stopped" and reply.deltas >= 1
    assert reply.text.startswith("The sea is a vast") and reply.new_text.strip()
    assert reply.counts is not None and reply.counts.completion == 5 + tokens.count(reply.new_text, embedded.model_id)[0]
