"""Answers grounded in retrieved passages (issue #14): the passages are counted and fitted with the
rest of the request, cited by number, kept as the reply's ``sources`` output, and never make a
request overflow. Driven in process by :class:`ScriptedModel`; counting is tiktoken's, for real."""

from __future__ import annotations

import asyncio
import logging

import pytest

from modules.config import ContextConfig, KnowledgeConfig
from modules.core import context, grounding, tokens
from modules.core.chat import ChatService
from modules.i18n import Translator
from modules.providers import GenerationOptions, Message
from tests.fakes.scripted_model import ScriptedModel

MODEL_ID = "gpt-4o-mini"  # exact counts (o200k)
OPTIONS = GenerationOptions()
STEP = 5.0


def passage(n: int, words: int = 60, document: str = "notes.md") -> grounding.Passage:
    text = " ".join(f"fact{n}w{i}" for i in range(words))
    return grounding.Passage(text, document, "Base", page=n, section=f"Part {n}")


class Listed:
    """A retriever that hands out a fixed list, and records what it was asked."""

    def __init__(self, passages: list[grounding.Passage]):
        self.passages = passages
        self.queries: list[tuple[str, int]] = []

    def retrieve(self, query: str, k: int) -> list[grounding.Passage]:
        self.queries.append((query, k))
        return self.passages[:k]


class Broken:
    def retrieve(self, query: str, k: int) -> list[grounding.Passage]:
        raise RuntimeError("the index exploded")


def service(model: ScriptedModel, **knowledge) -> ChatService:
    return ChatService({model.name: model}, translator=Translator("auto"),
                       context_config=ContextConfig(reserve_output_tokens=64),
                       knowledge_config=KnowledgeConfig(**knowledge))


# -- the block the model reads -----------------------------------------------------------------------
def test_ground_numbers_the_passages_before_the_question_and_keeps_its_images():
    question = Message("user", "What is fact2?", images=())
    grounded = grounding.ground(question, [passage(1, 3), passage(2, 3)])
    lines = grounded.content.splitlines()
    assert lines[0] == grounding.INSTRUCTION
    assert "[1] notes.md, p. 1, Part 1" in lines and "[2] notes.md, p. 2, Part 2" in lines
    assert grounded.content.endswith("Question: What is fact2?")
    assert grounding.ground(question, []) is question


def test_sources_round_trip_into_the_same_passages():
    passages = [passage(1, 5), grounding.Passage("只有中文。", "说明.md", "", None, None)]
    sources = grounding.sources(passages)
    assert [s["n"] for s in sources] == [1, 2]
    again = grounding.from_sources(sources)
    assert [(p.text, p.document, p.page, p.section) for p in again] == \
        [(p.text, p.document, p.page, p.section) for p in passages]
    assert grounding.from_sources([{"n": 1}, "junk", {"text": 3}]) == []  # (junk from an old export: nothing)


def test_several_retrievers_are_fused_by_rank_with_duplicates_once():
    a = Listed([passage(1), passage(2), passage(3)])
    b = Listed([passage(3), passage(4)])
    fused = grounding.Retrievers([a, b]).retrieve("q", 3)
    assert [p.page for p in fused][0] == 3  # in both lists: first
    assert len({p.page for p in fused}) == 3


# -- fitting -----------------------------------------------------------------------------------------
def test_passages_take_at_most_their_share_and_the_rest_are_left_out():
    messages = [Message("system", "Be brief."), Message("user", "What is fact3?")]
    passages = [passage(n) for n in range(1, 6)]
    one = tokens.count(grounding.block([passages[0]]), MODEL_ID)[0]
    context_size, reserve = 2000, 200
    budget = context_size - reserve
    share = (2.5 * one) / budget  # room for two passages, not three
    fit = context.fit_grounded(messages, passages, MODEL_ID, context_size, reserve, share)
    assert [p.page for p in fit.passages] == [1, 2]
    assert fit.passages_left_out == 3
    assert not fit.overflows
    question = fit.messages[-1].content
    assert "[1] notes.md, p. 1" in question and "[2] notes.md, p. 2" in question and "p. 3" not in question
    assert fit.prompt_tokens == context.count(fit.messages, MODEL_ID)[0]  # counted as sent


def test_passages_never_make_a_request_overflow_even_with_a_large_share():
    question = Message("user", "word " * 300)
    messages = [Message("system", "Be brief."), question]
    passages = [passage(n, 40) for n in range(1, 6)]
    fit = context.fit_grounded(messages, passages, MODEL_ID, 700, 64, 0.9)
    assert not fit.overflows
    assert 0 < len(fit.passages) < 5 and fit.passages_left_out == 5 - len(fit.passages)
    none_fit = context.fit_grounded(messages, passages, MODEL_ID, 380, 64, 0.9)  # the question alone nearly fills it
    assert none_fit.passages == [] and none_fit.passages_left_out == 5 and not none_fit.overflows
    assert none_fit.messages[-1] == question


def test_earlier_rounds_make_room_for_the_question_and_its_passages():
    history = []
    for i in range(10):
        history += [Message("user", f"old question {i} " + "pad " * 60), Message("assistant", "old answer " + "pad " * 60)]
    messages = [Message("system", "Be brief."), *history, Message("user", "What is fact1?")]
    passages = [passage(n) for n in range(1, 4)]
    fit = context.fit_grounded(messages, passages, MODEL_ID, 2000, 100, 0.5)
    assert len(fit.passages) == 3 and fit.passages_left_out == 0
    assert fit.dropped_rounds > 0 and not fit.overflows
    assert fit.messages[0].content == "Be brief." and fit.messages[-1].content.endswith("Question: What is fact1?")


def test_a_continuation_grounds_its_question_not_the_partial_answer():
    messages = [Message("user", "Explain fact1."), Message("assistant", "Fact1 is"),
                Message("user", context.CONTINUE_INSTRUCTION)]
    fit = context.fit_grounded(messages, [passage(1, 5)], MODEL_ID, 4000, 100, 0.5)
    assert fit.messages[0].content.endswith("Question: Explain fact1.")
    assert fit.messages[1:] == messages[1:]


# -- the chat service --------------------------------------------------------------------------------
async def test_the_service_searches_the_models_bases_and_the_conversations_and_keeps_the_sources():
    model = ScriptedModel(MODEL_ID, context_size=8000)
    chat = service(model, top_k=3)
    bound = Listed([passage(1), passage(2)])
    picked = Listed([passage(7, document="picked.md")])
    chat.bind(model.name, bound)
    messages = [Message("system", "Be brief."), Message("user", "What is fact7?\n\n<document text>")]
    fit, _ = await chat.fit(model, messages, OPTIONS, retriever=picked, query="What is fact7?")
    assert bound.queries == [("What is fact7?", 3)] and picked.queries == [("What is fact7?", 3)]
    assert {p.document for p in fit.passages} == {"notes.md", "picked.md"}
    run = chat.start(model, fit, OPTIONS)
    assert run.reply.outputs[grounding.SOURCES] == grounding.sources(fit.passages)  # before any token
    model.enqueue("It is [1].").end()
    reply = await asyncio.wait_for(run.wait(), STEP)
    assert reply.text == "It is [1]." and reply.outputs[grounding.SOURCES][0]["n"] == 1
    sent = model.calls[0][0][-1].content
    assert sent.startswith(grounding.INSTRUCTION) and sent.endswith("Question: What is fact7?\n\n<document text>")


async def test_a_continuation_cites_the_same_passages_without_searching_again():
    model = ScriptedModel(MODEL_ID, context_size=8000)
    chat = service(model)
    bound = Listed([passage(9)])
    chat.bind(model.name, bound)
    sources = grounding.sources([passage(1), passage(2)])
    fit, _ = await chat.fit(model, [Message("user", "Q")], OPTIONS, sources=sources)
    assert bound.queries == [] and [p.page for p in fit.passages] == [1, 2]
    fit, _ = await chat.fit(model, [Message("user", "Q")], OPTIONS, sources=[])
    assert fit.passages == [] and bound.queries == []


async def test_nothing_is_searched_for_models_without_bases_and_a_broken_retriever_costs_only_the_passages(caplog):
    model = ScriptedModel(MODEL_ID, context_size=8000)
    chat = service(model)
    fit, _ = await chat.fit(model, [Message("user", "Q")], OPTIONS)
    assert fit.passages == [] and fit.messages == [Message("user", "Q")]
    with caplog.at_level(logging.ERROR):
        fit, _ = await chat.fit(model, [Message("user", "Q")], OPTIONS, retriever=Broken())
    assert fit.passages == [] and fit.messages == [Message("user", "Q")]
    assert "retrieval" in caplog.text and "the index exploded" in caplog.text
    run = chat.start(model, fit, OPTIONS)
    assert grounding.SOURCES not in run.reply.outputs
    run.stop()
    await asyncio.wait_for(run.wait(), STEP)


async def test_the_left_out_count_is_kept_on_the_reply():
    model = ScriptedModel(MODEL_ID, context_size=1200)
    chat = service(model, max_share=0.3)
    chat.bind(model.name, Listed([passage(n) for n in range(1, 6)]))
    fit, _ = await chat.fit(model, [Message("user", "Q")], OPTIONS)
    assert 0 < fit.passages_left_out < 5
    run = chat.start(model, fit, OPTIONS)
    assert run.reply.outputs[grounding.LEFT_OUT] == fit.passages_left_out
    run.stop()
    await asyncio.wait_for(run.wait(), STEP)


@pytest.mark.parametrize("text", ["", "   "])
async def test_an_empty_question_searches_nothing(text):
    model = ScriptedModel(MODEL_ID, context_size=8000)
    chat = service(model)
    bound = Listed([passage(1)])
    chat.bind(model.name, bound)
    await chat.fit(model, [Message("user", text)], OPTIONS)
    assert bound.queries == []


# -- what the user reads -----------------------------------------------------------------------------
def test_the_reply_shows_its_sources_with_the_passage_on_click_and_says_what_was_left_out():
    from modules.core.streaming import Reply
    from modules.web import render

    reply = Reply(model="m", text="Fact1 is a <fact> [1].", status="done", finish_reason="stop")
    reply.outputs = {grounding.SOURCES: grounding.sources([
        grounding.Passage("Line one <b>bold</b>\nline two", "report.pdf", "Team", 3, "Intro")]),
        grounding.LEFT_OUT: 2}
    content = render.reply_messages(reply, Translator("en_US"), "en_US")[-1]["content"]
    body, _, marks = content.partition(render.FOOTER)
    assert body.strip() == "Fact1 is a <fact> [1]."
    assert "**Sources**" in marks
    assert "<details><summary>[1] report.pdf, p. 3, Intro <small>· Team</small></summary>" in marks
    assert "<blockquote>Line one &lt;b&gt;bold&lt;/b&gt;<br>line two</blockquote>" in marks  # (text, not markup)
    assert "2 passage(s) found in the knowledge bases were left out" in marks
    assert "sources_left_out" not in marks and "- sources:" not in marks  # (not the generic outputs list)


def test_the_markdown_export_lists_the_sources_under_the_reply():
    from modules.history.records import ConversationRecord, MessageRecord
    from modules.history.transfer import to_markdown

    question = MessageRecord("q1", None, "user", "What is fact1?")
    answer = MessageRecord("a1", "q1", "assistant", "It is [1].", status="done",
                           outputs={grounding.SOURCES: grounding.sources([passage(1, 3)])})
    record = ConversationRecord(id="c1", owner="local", title="T", model="m", system_prompt="", created_at=0.0,
                                updated_at=0.0, messages=[question, answer], leaf="a1")
    text = to_markdown(record)
    assert "It is [1].\n\n**Sources**\n\n1. notes.md, p. 1, Part 1\n\n   > fact1w0 fact1w1 fact1w2" in text
