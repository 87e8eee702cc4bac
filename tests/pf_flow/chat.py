"""The flow's streamed output: an echo of the question, yielded in pieces.

The answer also says how many earlier turns ``chat_history`` held and what the
last one asked, so that a test can see the history arrive. A question that
starts with "fail now" raises before the stream (pf answers an error status);
one that starts with "fail later" raises after a few pieces (pf has already
sent 200 and cuts the stream). For a question that starts with "whole" the
tool returns a plain string: pf then serves it as a flow without a streamed
output (the other column of PROTOCOLS.md §4's negotiation table).
"""

from promptflow.core import tool


@tool
def chat(question: str, chat_history: list):
    if question.startswith("fail now"):
        raise ValueError("the flow failed before answering")
    if question.startswith("whole"):  # a flow without a streamed output
        return "".join(_pieces(question, chat_history))
    return _pieces(question, chat_history)


def _pieces(question: str, chat_history: list):
    previous = chat_history[-1]["inputs"]["question"] if chat_history else ""
    yield ""
    yield "Echo:"
    for word in question.split():
        yield " " + word
    if question.startswith("fail later"):
        raise ValueError("the flow failed while answering")
    yield f" [history: {len(chat_history)}"
    if previous:
        yield f", last: {previous}"
    yield "]"
    yield ""
