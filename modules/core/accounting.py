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
    """Final token counts and cost of a reply that ended: the API's usage when present, else tiktoken.

    A reply that continues an earlier one counts its new part only (the usage of its own request,
    else tiktoken on the text after the earlier one's) and adds the earlier counts: exact only if
    both are; the cost is the sum, None when either is unknown. Without earlier counts, the new
    part's counts stand, as an estimate of the whole.
    """
    new = _counts(reply, model)
    new_cost = None if new is None else cost(model.config.price, new.prompt, new.completion)
    if not reply.continued:
        reply.counts, reply.cost = new, new_cost
        return
    earlier = reply.earlier_counts
    if new is None:  # the continuation failed before anything came: the earlier reply is what was counted
        reply.counts, reply.cost = earlier, reply.earlier_cost
        return
    if earlier is None:
        reply.counts, reply.cost = Counts(new.prompt, new.completion, False), None
        return
    reply.counts = Counts(earlier.prompt + new.prompt, earlier.completion + new.completion,
                          earlier.exact and new.exact)
    reply.cost = None if new_cost is None or reply.earlier_cost is None else reply.earlier_cost + new_cost


def _counts(reply: Reply, model: ChatModel) -> Counts | None:
    """The counts of what this run produced; None when nothing came back (it failed first)."""
    if reply.status == "error" or (reply.error is not None and not (reply.new_text or reply.new_reasoning)):
        return None  # (a continuation that failed so is "interrupted": the earlier text is there)
    if reply.usage is not None:
        return Counts(reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.exact)
    completion, exact = tokens.count(reply.new_reasoning + reply.new_text, model.model_id)
    prompt, prompt_exact = reply.prompt_estimate or (0, False)
    return Counts(prompt, completion, exact and prompt_exact)
