"""Per-session conversation state: the turns of one chat, kept in ``gr.State``.

Nothing here is shared between sessions, and nothing is secret: a turn holds
the user's words, the reply as it grew, and which model answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .models import Message
from .streaming import Reply


@dataclass
class Turn:
    user: str
    reply: Reply | None = None


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)

    def add_user(self, text: str) -> Turn:
        turn = Turn(user=text)
        self.turns.append(turn)
        return turn

    @property
    def pending(self) -> Turn | None:
        """The last turn if it still waits for a reply."""
        if self.turns and self.turns[-1].reply is None:
            return self.turns[-1]
        return None

    @property
    def streaming(self) -> Reply | None:
        """The reply being generated, if any."""
        if self.turns and self.turns[-1].reply is not None and self.turns[-1].reply.active:
            return self.turns[-1].reply
        return None

    def messages(self, system_prompt: str) -> list[Message]:
        """What the model is sent: the system prompt, then every turn up to the pending one.

        Earlier replies go back as they were shown, stopped or partial ones
        included (the marks are rendering, not content); a reply that failed
        with no text leaves only its user message.
        """
        messages = [Message("system", system_prompt)] if system_prompt.strip() else []
        for turn in self.turns:
            messages.append(Message("user", turn.user))
            if turn.reply is not None and turn.reply.text:
                messages.append(Message("assistant", turn.reply.text, dict(turn.reply.outputs) or None))
        return messages

    def forget_last_reply(self) -> Turn | None:
        """Regenerate: drop the last reply so the last question is pending again."""
        if not self.turns or self.streaming is not None:
            return None
        self.turns[-1].reply = None
        return self.turns[-1]

    def delete_last_round(self) -> Turn | None:
        if not self.turns or self.streaming is not None:
            return None
        return self.turns.pop()

    def clear(self) -> None:
        self.turns.clear()
