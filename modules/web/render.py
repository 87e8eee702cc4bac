"""Rendering session state for the page: chatbot messages, marks, errors, the status line.

Pure functions of a :class:`Conversation` and a language, so that they can be
tested without a browser and reused by the ``/chat`` API.
"""

from __future__ import annotations

import html
from typing import Any, Iterable

from modules.core.accounting import format_cost
from modules.core.sentences import error_message
from modules.core.streaming import Counts, Reply
from modules.history.conversation import Conversation, Turn
from modules.i18n import Translator


def _sources(outputs: dict[str, Any], label: str) -> str:
    lines = []
    for key, value in outputs.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            text = str(item)
            lines.append(f"- <{text}>" if text.startswith(("http://", "https://")) else f"- {key}: {text}")
    return f"\n\n**{label}**\n" + "\n".join(lines) if lines else ""


def reply_messages(reply: Reply, t: Translator, lang: str, secrets: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The chatbot messages for one reply: a "thinking" block, then the answer."""
    out: list[dict[str, Any]] = []
    if reply.reasoning:
        thinking = reply.active and not reply.text
        out.append(
            {
                "role": "assistant",
                "content": reply.reasoning,
                "metadata": {
                    "title": t.text(lang, "mark.thinking" if thinking else "mark.thought"),
                    "status": "pending" if thinking else "done",
                },
            }
        )
    content = reply.text
    if reply.dropped_rounds:
        mark = "mark.summarized" if reply.summarized else "mark.dropped"
        content = "*" + t.text(lang, mark, rounds=reply.dropped_rounds) + "*\n\n" + content
    if reply.outputs:
        content += _sources(reply.outputs, t.text(lang, "mark.sources"))
    if reply.status == "stopped":
        content += "\n\n*" + t.text(lang, "mark.stopped") + "*"
    elif reply.status == "interrupted" and reply.error is not None:
        message = error_message(t, lang, reply.error, secrets)
        content += "\n\n*" + t.text(lang, "mark.interrupted", message=message) + "*"
    elif reply.status == "error" and reply.error is not None:
        content = t.text(lang, "error.prefix", message=error_message(t, lang, reply.error, secrets))
    elif reply.status == "done" and reply.finish_reason == "length":
        content += "\n\n*" + t.text(lang, "mark.length") + "*"
    elif reply.active and reply.retrying is not None and not (content or out):  # until the first token
        content = "*" + t.text(lang, "status.retrying", attempt=reply.retrying[0], attempts=reply.retrying[1]) + "*"
    if reply.counts is not None and not reply.active:
        content += "\n\n<sub>" + usage_text(reply.counts, reply.cost, t, lang) + "</sub>"
    if content or not out:
        out.append({"role": "assistant", "content": content})
    return out


def turn_messages(turn: Turn, t: Translator, lang: str, secrets: Iterable[str] = ()) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "user", "content": turn.user}]
    if turn.reply is not None:
        out += reply_messages(turn.reply, t, lang, secrets)
    return out


def chatbot(conversation: Conversation, t: Translator, lang: str, secrets: Iterable[str] = ()) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for turn in conversation.turns:
        messages += turn_messages(turn, t, lang, secrets)
    return messages


def tokens_text(value: int, exact: bool) -> str:
    return f"{value:,}" if exact else f"≈{value:,}"


def cost_text(cost: float | None, t: Translator, lang: str) -> str:
    return format_cost(cost) if cost is not None else t.text(lang, "usage.price_unknown")


def usage_text(counts: Counts, cost: float | None, t: Translator, lang: str) -> str:
    """"tokens in 120 · out 45 · $0.00012" for one reply (≈ marks estimates)."""
    return t.text(lang, "usage.reply", prompt=tokens_text(counts.prompt, counts.exact),
                  completion=tokens_text(counts.completion, counts.exact), cost=cost_text(cost, t, lang))


def conversation_usage(conversation: Conversation, context_size: int, t: Translator, lang: str) -> str:
    """Totals of the conversation and a gauge of the context the next request starts from (HTML)."""
    prompt, completion, exact, cost = conversation.totals
    last = next((turn.reply.counts for turn in reversed(conversation.turns)
                 if turn.reply is not None and turn.reply.counts is not None), None)
    used = last.prompt + last.completion if last is not None else 0
    percent = min(100, round(100 * used / context_size)) if context_size else 0
    level = "high" if percent >= 90 else "mid" if percent >= 70 else "low"
    totals = t.text(lang, "usage.totals", prompt=tokens_text(prompt, exact),
                    completion=tokens_text(completion, exact), cost=cost_text(cost, t, lang))
    gauge = t.text(lang, "usage.context", used=tokens_text(used, last.exact if last else True),
                   size=f"{context_size:,}", percent=percent)
    return (f'<div class="usage-totals">{html.escape(totals)}</div>'
            f'<div class="context-gauge" data-level="{level}"><progress value="{used}" max="{context_size}">'
            f'</progress><span>{html.escape(gauge)}</span></div>')


def status_line(reply: Reply, t: Translator, lang: str) -> str:
    """"Generating…" while the reply streams; then
    "model · tokens in 12 · out 40 · first token 0.21 s · 35.2 tokens/s"."""
    if reply.active:
        return t.text(lang, "status.generating")
    na = t.text(lang, "status.na")
    if reply.counts is not None:
        prompt = tokens_text(reply.counts.prompt, reply.counts.exact)
        completion = tokens_text(reply.counts.completion, reply.counts.exact)
    elif reply.usage is not None and reply.usage.exact:
        prompt, completion = str(reply.usage.prompt_tokens), str(reply.usage.completion_tokens)
    else:
        estimate = reply.prompt_estimate
        prompt = na if estimate is None else (str(estimate[0]) if estimate[1] else f"≈{estimate[0]}")
        completion = f"≈{reply.deltas}"
    ttft = reply.time_to_first_token
    tps = reply.tokens_per_second
    return t.text(
        lang,
        "status.line",
        model=reply.model,
        prompt=prompt,
        completion=completion,
        ttft=f"{ttft:.2f} s" if ttft is not None else na,
        tps=t.text(lang, "status.tps", value=f"{tps:.1f}") if tps is not None else na,
    )
