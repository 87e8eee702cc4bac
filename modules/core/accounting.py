"""What a reply cost: its final token counts (the API's usage, else tiktoken's) and its price in USD."""

from __future__ import annotations

from modules.core import tokens
from modules.core.streaming import Counts, Reply
from modules.providers import ChatModel
from modules.providers.base import Price


def cost(price: Price | None, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
    """The cost of one reply in USD, or None when the price (or a count) is unknown."""
    if price is None or prompt_tokens is None or completion_tokens is None:
        return None
    return price.cost(prompt_tokens, completion_tokens)


def format_cost(value: float, significant: int = 2) -> str:
    """$0.012 / $0.000045 / $1.23: ``significant`` digits below a dollar, cents above.

    The page shows two; the Markdown export, a record, shows three ($0.000123).
    """
    if value == 0:
        return "$0"
    if value >= 1:
        return f"${value:,.2f}"
    digits = 2  # the place of the first significant digit, cents at least (at most 8: $0.00000001 shows)
    while value < 10 ** -digits and digits < 8:
        digits += 1
    return f"${value:.{digits + significant - 1}f}"


def settle(reply: Reply, model: ChatModel) -> None:
    """Final token counts and cost of a reply that ended: the API's usage when present, else tiktoken."""
    if reply.status == "error":  # nothing came back: nothing to count or pay
        reply.counts, reply.cost = None, None
        return
    if reply.usage is not None:
        counts = Counts(reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.exact)
    else:
        completion, exact = tokens.count(reply.reasoning + reply.text, model.model_id)
        prompt, prompt_exact = reply.prompt_estimate or (0, False)
        counts = Counts(prompt, completion, exact and prompt_exact)
    reply.counts = counts
    reply.cost = cost(model.config.price, counts.prompt, counts.completion)
