"""A conversation as a tree (``modules/history/conversation.py``) and how the chatbot shows it
(``modules/web/render.py``): edits and regenerations make versions, switching shows another
branch, nothing is lost; the request is the branch shown."""

from __future__ import annotations

import re

import pytest

from modules.core.streaming import Counts, Reply
from modules.history.conversation import Conversation
from modules.i18n import Translator
from modules.web import render

T = Translator("en_US")


def done(text: str, counts: Counts | None = None, cost: float | None = None) -> Reply:
    reply = Reply(model="m", text=text, status="done")
    reply.counts, reply.cost = counts, cost
    return reply


def chat(*rounds: str) -> Conversation:
    """A conversation of questions q1.. with answers a1.."""
    conversation = Conversation(id="c", owner="o")
    for n in rounds:
        conversation.answer(conversation.add_user(f"q{n}"), done(f"a{n}"))
    return conversation


def shown(conversation: Conversation) -> list[tuple[str, str | None]]:
    return [(t.user, t.reply.text if t.reply else None) for t in conversation.turns]


def links(content: str) -> list[str]:
    return re.findall(r"\(#chuanhu:([^ )]+)", content)


def test_editing_a_middle_question_keeps_the_old_branch() -> None:
    conversation = chat("1", "2", "3", "4")
    original = conversation.turns[1].question
    edited = conversation.edit_question(1, "q2 again")
    assert shown(conversation) == [("q1", "a1"), ("q2 again", None)]
    assert conversation.pending is edited
    # The request is the branch shown: the first round, then the new question.
    assert [m.content for m in conversation.messages("")] == ["q1", "a1", "q2 again"]
    conversation.answer(edited, done("a2'"))
    assert conversation.versions(edited.question).position == 2
    assert conversation.switch(edited.id, -1)
    assert shown(conversation) == [("q1", "a1"), ("q2", "a2"), ("q3", "a3"), ("q4", "a4")]
    assert conversation.turns[1].question is original
    assert conversation.switch(original.id, 1)
    assert shown(conversation) == [("q1", "a1"), ("q2 again", "a2'")]
    assert not conversation.switch(edited.id, 1)  # no third version
    assert len(conversation.nodes) == 10  # 8 + the new question and its answer: nothing removed


def test_regenerate_makes_sibling_answers_to_step_through() -> None:
    conversation = chat("1", "2")
    for n in range(3):
        turn = conversation.forget_last_reply()
        assert turn is conversation.pending and turn.replaced is not None
        conversation.answer(turn, done(f"again {n}"))
    last = conversation.turns[-1]
    versions = conversation.versions(last.answer)
    assert (versions.position, versions.count) == (4, 4)
    texts = [conversation.turns[-1].reply.text]
    while conversation.switch(conversation.turns[-1].reply_id, -1):  # ‹ back to the first
        texts.append(conversation.turns[-1].reply.text)
    assert texts == ["again 2", "again 1", "again 0", "a2"]
    assert shown(conversation) == [("q1", "a1"), ("q2", "a2")]


def test_a_regenerate_that_could_not_start_puts_the_answer_back() -> None:
    conversation = chat("1")
    turn = conversation.forget_last_reply()
    assert conversation.pending is turn and conversation.leaf == turn.id
    assert conversation.restore_replaced(turn)
    assert shown(conversation) == [("q1", "a1")] and conversation.pending is None


def test_editing_an_answer_keeps_the_original_and_what_followed() -> None:
    conversation = chat("1", "2", "3")
    conversation.edit_answer(0, "a1, corrected")
    assert shown(conversation) == [("q1", "a1, corrected")]
    assert conversation.turns[0].answer.edited
    conversation.switch(conversation.turns[0].reply_id, -1)
    assert shown(conversation) == [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]


def test_switching_goes_down_to_the_newest_message_of_the_branch() -> None:
    conversation = chat("1", "2")
    q2 = conversation.turns[1].question
    conversation.edit_question(1, "q2 v2")
    conversation.answer(conversation.turns[-1], done("a2 v2"))
    conversation.answer(conversation.add_user("q3 v2"), done("a3 v2"))
    conversation.switch(conversation.turns[1].id, -1)
    assert conversation.turns[1].question is q2
    conversation.switch(q2.id, 1)
    assert shown(conversation) == [("q1", "a1"), ("q2 v2", "a2 v2"), ("q3 v2", "a3 v2")]


def test_delete_last_round_takes_only_what_is_shown() -> None:
    conversation = chat("1", "2")
    conversation.forget_last_reply()
    conversation.answer(conversation.turns[-1], done("a2 again"))
    total = len(conversation.nodes)
    # The question has another answer: only the one shown goes, and the other shows.
    deleted = conversation.delete_last_round()
    assert conversation.nodes.get(deleted) is None and len(conversation.nodes) == total - 1
    assert shown(conversation) == [("q1", "a1"), ("q2", "a2")]
    # Now its only answer: the question goes with it; an edited version of it stays and shows.
    conversation.edit_question(1, "q2 v2")
    conversation.answer(conversation.turns[-1], done("a2 v2"))
    conversation.switch(conversation.turns[1].id, -1)
    assert shown(conversation) == [("q1", "a1"), ("q2", "a2")]
    conversation.delete_last_round()
    assert shown(conversation) == [("q1", "a1"), ("q2 v2", "a2 v2")]
    conversation.delete_last_round()
    assert shown(conversation) == [("q1", "a1")]
    assert [n.text or n.reply.text for n in conversation.nodes.values()] == ["q1", "a1"]


def test_fork_copies_the_branch_up_to_a_reply() -> None:
    conversation = chat("1", "2", "3")
    fork = conversation.fork(1)
    assert shown(fork) == [("q1", "a1"), ("q2", "a2")]
    assert fork.id == "" and fork.owner == "o"
    fork.turns[0].reply.text = "changed"
    assert conversation.turns[0].reply.text == "a1"  # a copy, not shared


def test_totals_count_every_branch() -> None:
    conversation = Conversation(id="c", owner="o")
    turn = conversation.add_user("q")
    conversation.answer(turn, done("a", Counts(10, 5, True), 0.01))
    conversation.forget_last_reply()
    conversation.answer(turn, done("b", Counts(10, 7, True), 0.02))
    assert conversation.totals == (20, 12, True, pytest.approx(0.03))


def test_records_keep_the_tree_and_the_branch_shown() -> None:
    conversation = chat("1", "2", "3")
    conversation.edit_question(1, "q2 v2")
    conversation.answer(conversation.turns[-1], done("a2 v2"))
    conversation.switch(conversation.turns[1].id, -1)
    record = conversation.record(conversation.meta("m", "", {}), lambda error: str(error))
    assert record.branched and len(record.messages) == 8
    back = Conversation.from_record(record)
    assert shown(back) == shown(conversation)
    assert [n.id for n in back.nodes.values()] == [n.id for n in conversation.nodes.values()]
    assert [t.user for t in record.turns] == ["q1", "q2", "q3"]


def test_the_chatbot_shows_versions_and_where_a_reply_streams() -> None:
    conversation = chat("1", "2")
    conversation.edit_question(1, "q2 v2")
    streaming = Reply(model="m", text="partial", status="streaming")
    conversation.answer(conversation.turns[-1], streaming)
    live = {conversation.turns[-1].reply_id}
    conversation.switch(conversation.turns[1].id, -1)
    messages = render.chatbot(conversation, T, "en_US", live=live)
    q2 = messages[2]["content"]
    assert render.body_of(q2) == "q2"
    assert "1 / 2" in q2 and links(q2) == [f"v:{conversation.turns[1].id}:1"]
    assert "⏳" in q2 and "version 2" in q2  # the reply streaming on the other branch
    assert "⏳" not in messages[0]["content"]  # the first question has one version
    # The last answer can be continued only when it was cut; every finished answer can be forked.
    assert [a for a in links(messages[3]["content"]) if a.startswith("continue")] == []
    assert f"fork:{conversation.turns[1].reply_id}" in links(messages[3]["content"])
    conversation.turns[-1].reply.finish_reason = "length"
    last = render.chatbot(conversation, T, "en_US")[-1]["content"]
    assert f"continue:{conversation.turns[-1].reply_id}" in links(last)
    assert render.body_of(last) == "a2"


def test_locate_names_the_turn_and_part_of_each_chatbot_message() -> None:
    conversation = chat("1")
    turn = conversation.add_user("q2")
    conversation.answer(turn, Reply(model="m", text="a2", reasoning="hmm", status="done"))
    parts = [render.locate(conversation, T, "en_US", i) for i in range(5)]
    assert parts == [(0, "user"), (0, "answer"), (1, "user"), (1, "thinking"), (1, "answer")]
