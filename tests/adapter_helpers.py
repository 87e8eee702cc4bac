"""Helpers shared by the adapter tests: drive an adapter or the streaming layer to its end."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

from modules.providers import ChatModel, Delta, GenerationOptions, Message, errors
from modules.core.streaming import Pacer, Reply, stream_reply


async def collect_deltas(model: ChatModel, messages: list[Message], options: GenerationOptions | None = None,
                         timeout: float = 15.0) -> tuple[list[Delta], errors.ModelError | None]:
    """Every delta the adapter yielded, and the ModelError it raised (None on success)."""
    deltas: list[Delta] = []

    async def drain() -> None:
        async for delta in model.stream(messages, options or GenerationOptions()):
            deltas.append(delta)

    try:
        await asyncio.wait_for(drain(), timeout)
    except errors.ModelError as exc:
        return deltas, exc
    return deltas, None


async def final_reply(model: ChatModel, messages: list[Message], options: GenerationOptions | None = None,
                      timeout: float = 15.0) -> Reply:
    """The Reply once the streaming layer has run to its end, as the app gets it."""
    reply = Reply(model=model.name)

    async def drain() -> None:
        async with aclosing(stream_reply(model, messages, options or GenerationOptions(), pacer=Pacer(0.01),
                                         reply=reply)) as replies:
            async for _ in replies:
                pass

    await asyncio.wait_for(drain(), timeout)
    return reply


def texts(deltas: list[Delta]) -> list[str]:
    return [d.text for d in deltas if d.text]
