"""Rendering session state for the page: chatbot messages, marks, errors, the status line.

Pure functions of a :class:`Conversation` and a language, so that they can be
tested without a browser and reused by the ``/chat`` API.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal

from modules.core import grounding
from modules.core.accounting import format_cost
from modules.core.sentences import error_message
from modules.core.streaming import Counts, Reply
from modules.history.conversation import Conversation, Node, Turn
from modules.history.records import Attachment
from modules.i18n import Translator


def _passages(sources: Any, t: Translator, lang: str) -> str:
    """A grounded reply's Sources: one line each, "[1] report.pdf, p. 3 · Section", the passage
    itself shown when the line is clicked."""
    lines = []
    for source in sources if isinstance(sources, list) else []:
        if not isinstance(source, dict):
            continue
        where = grounding.from_sources([source])
        if not where:
            continue
        passage = where[0]
        label = html.escape(f"[{source.get('n', len(lines) + 1)}] {passage.where()}", quote=False)
        if passage.base:
            label += f" <small>· {html.escape(passage.base, quote=False)}</small>"
        text = "<br>".join(html.escape(line, quote=False) for line in passage.text.strip().splitlines() if line.strip())
        lines.append(f"<details><summary>{label}</summary><blockquote>{text}</blockquote></details>")
    if not lines:
        return ""
    return f"**{t.text(lang, 'mark.sources')}**\n\n" + "\n".join(lines)


def _sources(outputs: dict[str, Any], label: str) -> str:
    lines = []
    for key, value in outputs.items():
        if key in (grounding.SOURCES, grounding.LEFT_OUT):
            continue
        items = value if isinstance(value, list) else [value]
        for item in items:
            text = str(item)
            lines.append(f"- <{text}>" if text.startswith(("http://", "https://")) else f"- {key}: {text}")
    return f"\n\n**{label}**\n" + "\n".join(lines) if lines else ""


FOOTER = "<!--chuanhu-->"  # what follows it in a message is the page's (marks, links), not the message's
ACTION = "#chuanhu:"  # links the page's script turns into actions (versions, continue, fork)
Part = Literal["user", "thinking", "answer"]


def link(label: str, action: str, title: str) -> str:
    """A markdown link the page's script catches (``#chuanhu:<action>``); ``title`` is its tooltip."""
    title = title.replace('"', "'")
    return f'[{label}]({ACTION}{action} "{title}")'


def body_of(content: str) -> str:
    """A message's own words, without what the page added after them (an edited message)."""
    body, marker, _ = content.partition(FOOTER)
    return body.removesuffix("\n\n") if marker else body


@dataclass
class Marks:
    """What the chatbot shows about the tree: the versions of each message, where replies stream."""

    groups: dict[tuple[str | None, str], list[str]]  # (parent, role) -> sibling ids, in the order made
    streaming: dict[str, set[str]]  # node id -> the streaming answers below it (itself included)
    last: str | None  # the last answer on the branch (where Continue applies)

    @classmethod
    def of(cls, conversation: Conversation, live: Iterable[str] = ()) -> Marks:
        groups: dict[tuple[str | None, str], list[str]] = {}
        for node in conversation.nodes.values():
            groups.setdefault((node.parent, node.role), []).append(node.id)
        streaming: dict[str, set[str]] = {}
        for answer in live:
            node, seen = conversation.nodes.get(answer), 0
            while node is not None and seen < len(conversation.nodes):
                streaming.setdefault(node.id, set()).add(answer)
                node = conversation.nodes.get(node.parent) if node.parent is not None else None
                seen += 1
        last = conversation.turns[-1].reply_id if conversation.turns else None
        return cls(groups, streaming, last)

    def versions(self, node: Node, t: Translator, lang: str) -> str:
        """"‹ 2 / 3 ›" (each arrow a link when there is a version that way), and "⏳ 1" for the
        versions where a reply streams, other than this one; "" for a message with no siblings."""
        ids = self.groups.get((node.parent, node.role), [])
        if len(ids) < 2 or node.id not in ids:
            return ""
        position = ids.index(node.id) + 1
        back = link("‹", f"v:{node.id}:-1", t.text(lang, "action.previous_version")) if position > 1 else "‹"
        ahead = link("›", f"v:{node.id}:1", t.text(lang, "action.next_version")) if position < len(ids) else "›"
        text = f"{back} {position} / {len(ids)} {ahead}"
        elsewhere = [str(i + 1) for i, other in enumerate(ids) if other != node.id and other in self.streaming]
        if elsewhere:
            text += " · " + t.text(lang, "mark.streaming_in", versions=", ".join(elsewhere))
        return text


def _decorated(body: str, marks: list[str], footer: list[str]) -> str:
    """``body``, then (after the FOOTER marker) the marks, then one small line of ``footer`` items."""
    extra = [m for m in marks if m]
    items = [f for f in footer if f]
    if items:
        extra.append("<sub>" + " · ".join(items) + "</sub>")
    if not extra:
        return body
    return (body + "\n\n" if body else "") + FOOTER + "\n\n" + "\n\n".join(extra)


def reply_messages(reply: Reply, t: Translator, lang: str, secrets: Iterable[str] = (),
                   footer: Iterable[str] = (), edited: bool = False) -> list[dict[str, Any]]:
    """The chatbot messages for one reply: a "thinking" block, then the answer (its text, then
    its marks and a footer line: usage, then ``footer``'s items)."""
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
    body = reply.text
    marks: list[str] = []
    if reply.dropped_rounds:
        mark = "mark.summarized" if reply.summarized else "mark.dropped"
        marks.append("*" + t.text(lang, mark, rounds=reply.dropped_rounds) + "*")
    if reply.outputs:
        marks.append(_sources(reply.outputs, t.text(lang, "mark.sources")).strip())
        marks.append(_passages(reply.outputs.get(grounding.SOURCES), t, lang))
        left_out = reply.outputs.get(grounding.LEFT_OUT)
        if isinstance(left_out, int) and left_out > 0:
            marks.append("*" + t.text(lang, "mark.passages_left_out", count=left_out) + "*")
    if edited:
        marks.append("*" + t.text(lang, "mark.edited") + "*")
    if reply.status == "stopped":
        marks.append("*" + t.text(lang, "mark.stopped") + "*")
    elif reply.status == "interrupted" and reply.error is not None:
        message = error_message(t, lang, reply.error, secrets)
        marks.append("*" + t.text(lang, "mark.interrupted", message=message) + "*")
    elif reply.status == "error" and reply.error is not None:
        body = t.text(lang, "error.prefix", message=error_message(t, lang, reply.error, secrets))
    elif reply.status == "done" and reply.finish_reason == "length":
        marks.append("*" + t.text(lang, "mark.length") + "*")
    elif reply.active and reply.retrying is not None and not (body or out):  # until the first token
        body = "*" + t.text(lang, "status.retrying", attempt=reply.retrying[0], attempts=reply.retrying[1]) + "*"
    items = []
    if reply.counts is not None and not reply.active:
        items.append(usage_text(reply.counts, reply.cost, t, lang))
    content = _decorated(body, marks, [*items, *footer]) if not reply.active else _decorated(body, marks, [])
    if content or not out:
        out.append({"role": "assistant", "content": content})
    return out


def continuable(reply: Reply | None) -> bool:
    """A reply Continue can extend: stopped, interrupted with text, or cut by the token limit."""
    if reply is None or reply.active or not reply.text:
        return False
    return reply.status in ("stopped", "interrupted") or (reply.status == "done" and reply.finish_reason == "length")


def _answer_footer(turn: Turn, marks: Marks, t: Translator, lang: str) -> list[str]:
    answer = turn.answer
    if answer is None or answer.reply is None or answer.reply.active:
        return []
    items = [marks.versions(answer, t, lang)]
    if answer.id == marks.last and continuable(answer.reply):
        items.append(link(t.text(lang, "action.continue"), f"continue:{answer.id}", t.text(lang, "action.continue_title")))
    items.append(link(t.text(lang, "action.fork"), f"fork:{answer.id}", t.text(lang, "action.fork_title")))
    return items


Links = Callable[[Attachment], str]  # an attachment's URL for this session's owner


def attachment_chips(node: Node, link: Links, t: Translator, lang: str) -> str:
    """A question's files: each image as a thumbnail, each document as a link with its size."""
    chips = []
    for attachment in node.attachments:
        url = link(attachment)
        name = attachment.name.replace("[", "(").replace("]", ")")
        if attachment.kind == "image":
            chips.append(f"![{name}]({url})")
        else:
            chip = f"[{t.text(lang, 'attach.document', name=name)}]({url})"
            if attachment.tokens is not None:
                chip += " · " + t.text(lang, "attach.tokens", tokens=f"{attachment.tokens:,}")
            chips.append(chip)
    return " ".join(chips)


def entries(conversation: Conversation, t: Translator, lang: str, secrets: Iterable[str] = (),
            live: Iterable[str] = (), links: Links | None = None) -> Iterator[tuple[dict[str, Any], int, Part]]:
    """Each chatbot message with the turn it shows (its index on the branch) and which part."""
    marks = Marks.of(conversation, live)
    for index, turn in enumerate(conversation.turns):
        files = [attachment_chips(turn.question, links, t, lang)] if links and turn.question.attachments else []
        yield ({"role": "user", "content": _decorated(turn.user, files, [marks.versions(turn.question, t, lang)])},
               index, "user")
        if turn.answer is not None and turn.reply is not None:
            for message in reply_messages(turn.reply, t, lang, secrets, _answer_footer(turn, marks, t, lang),
                                          edited=turn.answer.edited):
                yield message, index, "thinking" if "metadata" in message else "answer"
        elif turn.replaced is None and len(marks.groups.get((turn.id, "assistant"), [])) > 0:
            # A question whose answers are all on other branches (none here yet): reach them.
            answers = marks.groups[(turn.id, "assistant")]
            first = conversation.nodes[answers[-1]]
            yield ({"role": "assistant", "content": _decorated("", [], [
                link(t.text(lang, "action.show_answers", count=len(answers)), f"v:{first.id}:0",
                     t.text(lang, "action.next_version"))])}, index, "answer")


def chatbot(conversation: Conversation, t: Translator, lang: str, secrets: Iterable[str] = (),
            live: Iterable[str] = (), links: Links | None = None) -> list[dict[str, Any]]:
    return [message for message, _, _ in entries(conversation, t, lang, secrets, live, links)]


def locate(conversation: Conversation, t: Translator, lang: str, index: int) -> tuple[int, Part] | None:
    """The turn and part the chatbot message ``index`` shows (an edit event names a message by it)."""
    for position, (_, turn, part) in enumerate(entries(conversation, t, lang)):
        if position == index:
            return turn, part
    return None


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


def tokens_left(left: int, limit: int, t: Translator, lang: str) -> str:
    """"Today: 12,345 of 50,000 tokens left" (HTML), under the conversation's usage."""
    text = t.text(lang, "usage.left_today", left=f"{left:,}", limit=f"{limit:,}")
    return f'<div class="usage-left" data-left="{left}">{html.escape(text)}</div>'


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
