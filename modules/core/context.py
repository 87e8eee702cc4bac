"""Fitting a conversation into a model's context window, and what it costs.

Before each request, :func:`fit` counts the messages (tiktoken; exact for
OpenAI-family models, an estimate for the rest) and, when the history plus the
tokens reserved for the reply would overflow the context, leaves out the
oldest rounds. The system prompt and the question being asked always stay; so
does, in a request that continues a reply, the answer so far after it (and the
:data:`CONTINUE_INSTRUCTION` asking to continue it, for models that cannot).
With the "summarize" strategy the rounds left out are replaced by a summary
the model writes (:func:`summarize`), one system message after the prompt.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Literal

from modules.core import grounding, images, tokens
from modules.providers import ChatModel, GenerationOptions, Message, errors

SUMMARY_INSTRUCTION = (
    "Summarise the conversation below for your own later reference: keep facts, names, numbers, decisions, "
    "the user's preferences and open questions. Be brief. Write in the conversation's language."
)
# The user message that asks a model which cannot continue a message of its own (``can_continue``
# False) to continue its last, partial answer; ``ChatService.continuation`` sends it after that answer.
CONTINUE_INSTRUCTION = (
    "Your last message was cut off. Continue it exactly where it stopped, from the next character: "
    "do not repeat any of it, do not restart or summarise it, and add no preamble."
)
SUMMARY_PREFIX = "Summary of the earlier conversation (older rounds were left out to fit the context):\n"

log = logging.getLogger(__name__)


@dataclass
class Fit:
    """The messages to send and what was left out."""

    messages: list[Message]
    dropped: list[list[Message]]  # the rounds left out (user and assistant messages), oldest first
    dropped_rounds: int
    prompt_tokens: int
    exact: bool
    budget: int  # tokens the prompt may use: context size minus the reserve for the reply
    summarized: bool = False  # the dropped rounds are replaced by a summary (a system message)
    passages: list[grounding.Passage] = field(default_factory=list)  # the passages sent with the question
    passages_left_out: int = 0  # passages found but left out to fit

    @property
    def overflows(self) -> bool:
        """Even with every earlier round left out, the request is too long."""
        return self.prompt_tokens > self.budget


def reserve_for_reply(context_size: int, options: GenerationOptions, default: int) -> int:
    """Tokens kept free for the reply: Max output tokens if set, else the configured reserve (≤ a quarter)."""
    if options.max_tokens:
        return min(options.max_tokens, context_size - 16)
    return min(default, context_size // 4)


def _rounds(messages: list[Message]) -> tuple[list[Message], list[list[Message]], list[Message]]:
    """Split into (leading system messages, earlier rounds, the current question's messages).

    The current question's messages are the last user message and what follows it (a partial
    answer being continued); when the last message is :data:`CONTINUE_INSTRUCTION`, they start
    at the user message before it: question, partial answer and instruction stay together
    (without a question, a continuation keeps every message after the system prompt)."""
    head = 0
    while head < len(messages) and messages[head].role == "system":
        head += 1
    system, rest = messages[:head], messages[head:]
    users = [i for i, m in enumerate(rest) if m.role == "user"]
    instructed = bool(rest) and rest[-1].role == "user" and rest[-1].content == CONTINUE_INSTRUCTION
    if instructed:
        users.pop()
    continuing = instructed or (bool(rest) and rest[-1].role == "assistant")
    last_user = users[-1] if users else (0 if continuing else len(rest))
    rounds: list[list[Message]] = []
    for message in rest[:last_user]:
        if message.role == "user" or not rounds:
            rounds.append([message])
        else:
            rounds[-1].append(message)
    return system, rounds, rest[last_user:]


def count(messages: list[Message], model_id: str) -> tuple[int, bool]:
    """Prompt tokens of ``messages``, their images included (``images.image_tokens`` each)."""
    return tokens.count_messages(messages, model_id)


def fit(messages: list[Message], model_id: str, context_size: int, reserve: int) -> Fit:
    """Leave out the fewest oldest rounds so that prompt + reserve fits ``context_size``."""
    system, rounds, current = _rounds(messages)
    budget = context_size - reserve
    # Per-message cost without the reply priming; a message's images are part of it, so a round left
    # out takes its images with it.
    enc_count = [count([m], model_id)[0] - 3 for m in messages]
    per_message = dict(zip(map(id, messages), enc_count))
    exact = count([], model_id)[1]

    def total(kept: list[list[Message]]) -> int:
        return 3 + sum(per_message[id(m)] for m in [*system, *(m for r in kept for m in r), *current])

    dropped = 0
    used = total(rounds)
    while used > budget and dropped < len(rounds):
        used -= sum(per_message[id(m)] for m in rounds[dropped])
        dropped += 1
    kept = rounds[dropped:]
    sent = [*system, *(m for r in kept for m in r), *current]
    if exact and any(m.images for m in sent):  # an image of a model whose rule is unknown: an estimate
        exact = all(images.images_tokens(model_id, m.images)[1] for m in sent)
    return Fit(
        messages=sent,
        dropped=rounds[:dropped],
        dropped_rounds=dropped,
        prompt_tokens=used,
        exact=exact,
        budget=budget,
    )


def with_summary(result: Fit, summary: str, model_id: str) -> Fit:
    """``result`` with a summary of its dropped rounds as a system message after the prompt."""
    system, _, _ = _rounds(result.messages)
    note = Message("system", SUMMARY_PREFIX + summary.strip())
    messages = [*system, note, *result.messages[len(system):]]
    prompt, exact = count(messages, model_id)
    return replace(result, messages=messages, prompt_tokens=prompt, exact=exact, summarized=True)


def fit_grounded(messages: list[Message], passages: list[grounding.Passage], model_id: str, context_size: int,
                 reserve: int, max_share: float) -> Fit:
    """:func:`fit` with ``passages`` put into the question (:func:`grounding.ground`), best first,
    as many as fit: together they take at most ``max_share`` of the prompt's budget, and never
    what the system prompt and the question need (so they cannot make it overflow); the rest are
    left out (``passages_left_out``). Earlier rounds then make room as usual."""
    system, _, current = _rounds(messages)
    at = len(messages) - len(current)  # the question's place
    if not passages or not current or current[0].role != "user":
        return fit(messages, model_id, context_size, reserve)
    budget = context_size - reserve
    needed = count([*system, *current], model_id)[0]
    room = min(int(budget * max_share), budget - needed)
    framing = tokens.count(f"{grounding.INSTRUCTION}\n\n\n\n{grounding.QUESTION} ", model_id)[0]
    kept: list[grounding.Passage] = []
    used = framing
    for passage in passages:
        cost = tokens.count(grounding.block([passage]) + "\n\n", model_id)[0]
        if used + cost > room:
            break  # (lower-ranked ones are left out too: the order is the retriever's)
        kept.append(passage)
        used += cost
    while True:
        grounded = [*messages[:at], grounding.ground(messages[at], kept), *messages[at + 1:]]
        result = fit(grounded, model_id, context_size, reserve)
        if not result.overflows or not kept:  # (token counts of joined texts may differ by a few)
            return replace(result, passages=kept, passages_left_out=len(passages) - len(kept))
        kept.pop()


async def fit_request(messages: list[Message], model: ChatModel, options: GenerationOptions, *,
                      reserve_default: int, strategy: Literal["trim", "summarize"] = "trim",
                      summary: tuple[int, str] | None = None, passages: list[grounding.Passage] | None = None,
                      max_share: float = 0.5) -> tuple[Fit, tuple[int, str] | None]:
    """The request for the last question, fitted to ``model``'s context: what every front end sends.

    Counting runs off the event loop for long histories. With the "summarize" strategy the
    rounds left out are summarised by the model; ``summary`` is a cache, ``(rounds covered,
    text)``, extended only when more rounds drop (a conversation keeps it; a one-off request
    passes None). ``passages``: retrieved for the question, fitted with it (:func:`fit_grounded`).
    Returns the fit (``overflows`` when the question alone is too long) and the summary cache to
    keep. A failed summary leaves the rounds simply out.
    """
    reserve = reserve_for_reply(model.context_size, options, reserve_default)
    chars = sum(len(m.content) for m in messages) + sum(len(p.text) for p in passages or ())
    result = await tokens.off_loop(fit_grounded, messages, list(passages or ()), model.model_id, model.context_size,
                                   reserve, max_share, chars=chars)
    if not result.dropped_rounds or strategy != "summarize":
        return result, summary
    covered, text = summary or (0, "")
    try:
        if covered != result.dropped_rounds:
            if covered > result.dropped_rounds:  # the history got shorter: summarise afresh
                covered, text = 0, ""
            text = await summarize(model, result.dropped[covered:], text)
            summary = (result.dropped_rounds, text)
    except errors.ModelError as exc:  # no summary: the rounds are simply left out
        log.warning("could not summarise %d rounds with %r: %s", result.dropped_rounds, model.name, exc)
        return result, summary
    summarized = with_summary(result, text, model.model_id)
    return (summarized if not summarized.overflows else result), summary


def transcript(messages: list[Message]) -> str:
    return "\n\n".join(f"{m.role.upper()}: {m.content}" for m in messages)


async def summarize(model: ChatModel, rounds: list[list[Message]], previous: str = "", max_tokens: int = 400) -> str:
    """Ask ``model`` for a summary of ``rounds`` (and of an earlier summary, if any)."""
    text = transcript([m for r in rounds for m in r])
    if previous:
        text = f"EARLIER SUMMARY: {previous}\n\n{text}"
    # Keep the request itself inside the model's context: cut the transcript's oldest part
    # (on a small context, the summary gets at most a quarter of it).
    enc, _ = tokens.encoding_for_model(model.model_id)
    max_tokens = min(max_tokens, model.context_size // 4)
    room = max(64, model.context_size - max_tokens - 200)
    ids = enc.encode(text, disallowed_special=())
    if len(ids) > room:
        text = enc.decode(ids[-room:])
    request = [Message("system", SUMMARY_INSTRUCTION), Message("user", text)]
    parts: list[str] = []
    async with aclosing(model.stream(request, GenerationOptions(max_tokens=max_tokens, temperature=0.2))) as deltas:
        async for delta in deltas:
            parts.append(delta.text)
    return "".join(parts).strip()


TITLE_INSTRUCTION = (
    "Write a short title (at most six words) for the conversation below, in its language. "
    "Answer with the title only: no quotes, no punctuation at the end."
)


async def write_title(model: ChatModel, question: str, answer: str) -> str:
    """A title for a conversation, written by ``model`` from its first round."""
    request = [Message("system", TITLE_INSTRUCTION),
               Message("user", transcript([Message("user", question[:2000]), Message("assistant", answer[:2000])]))]
    parts: list[str] = []
    async with aclosing(model.stream(request, GenerationOptions(max_tokens=24, temperature=0.2))) as deltas:
        async for delta in deltas:
            parts.append(delta.text)
    return next((line.strip() for line in "".join(parts).splitlines() if line.strip()), "")
