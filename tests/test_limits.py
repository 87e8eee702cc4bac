"""Per-user limits (``limits.per_user``) on the real stores: a SQLite file and a throwaway
PostgreSQL database. Each limit is hit exactly at its boundary (the N-th allowed, the next refused,
the sentence naming the limit and its reset); two stores on one database (two processes' worth)
count together, atomically; a dead process's leases stop counting. Time is the limiter's injected
clock: nothing sleeps."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import ChuanhuStyleChat
from modules.config import ConfigError, PerUserLimits, build_config
from modules.core.limits import DAY, LimitError, Limiter, day_start
from modules.core.sentences import limit_message
from modules.core.streaming import Counts, Reply
from modules.history.pg_store import PostgresStore
from modules.history.store import FILENAME, SQLiteStore
from modules.i18n import Translator

T = Translator("en_US")
ALICE, BOB = "user:alice", "user:bob"
# 20:48 UTC: the day's limit resets at 00:00, in 3 h 12 min
EVENING = datetime(2025, 3, 14, 20, 48, tzinfo=timezone.utc).timestamp()


class Clock:
    def __init__(self, now: float = EVENING):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """``stores()`` -> one more store on the same database (each a process's worth: its own
    connection or pool), closed after the test."""
    made: list[Any] = []
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None

    def make() -> Any:
        store = PostgresStore(url, max_size=8) if url else SQLiteStore(tmp_path / FILENAME)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def limiter(store: Any, clock: Clock, **limits: Any) -> Limiter:
    return Limiter(PerUserLimits(**limits), store, clock=clock)


def reply(prompt: int, completion: int, cost: float | None = None) -> Reply:
    r = Reply(model="fake")
    r.counts, r.cost = Counts(prompt, completion, True), cost
    return r


def refused(lim: Limiter, owner: str = ALICE, model: str = "fake") -> LimitError:
    with pytest.raises(LimitError) as caught:
        lim.admit_now(owner, model)
    return caught.value


def sentence(error: LimitError) -> str:
    return limit_message(T, "en_US", error.hit)


# -- each limit at its boundary -----------------------------------------------------------------
def test_tokens_per_day_refuses_the_message_after_the_limit_is_used_and_resets_at_midnight_utc(stores):
    clock = Clock()
    lim = limiter(stores(), clock, tokens_per_day=50_000)
    lim.settle_now(lim.admit_now(ALICE, "fake"), reply(30_000, 19_999))  # 49,999: one token left
    last = lim.admit_now(ALICE, "fake")  # allowed: it may cross the limit (and it does)
    lim.settle_now(last, reply(10, 5))
    error = refused(lim)
    assert error.hit.limit == "tokens_per_day"
    assert sentence(error) == ("You have used your 50,000 tokens for today; the limit resets at 00:00 UTC "
                               "(in 3 h 12 min).")
    assert error.hit.retry_after == 3 * 3600 + 12 * 60
    lim.admit_now(BOB, "fake")  # another user's tokens are their own
    clock.now = day_start(EVENING) + DAY  # midnight UTC: a new day
    lim.admit_now(ALICE, "fake")


def test_exactly_n_tokens_used_is_the_boundary(stores):
    clock = Clock()
    lim = limiter(stores(), clock, tokens_per_day=100)
    lim.settle_now(lim.admit_now(ALICE, "fake"), reply(60, 39))
    lim.settle_now(lim.admit_now(ALICE, "fake"), reply(0, 0))  # 99 used: allowed
    lim.settle_now(lim.admit_now(ALICE, "fake"), reply(1, 0))  # 100 used now
    assert refused(lim).hit.limit == "tokens_per_day"
    assert lim.left_today(ALICE, "fake") == (0, 100)


def test_a_models_own_token_limit_counts_that_model_only(stores):
    clock = Clock()
    lim = limiter(stores(), clock, tokens_per_day=1000, models={"gpt-4o": {"tokens_per_day": 100}})
    lim.settle_now(lim.admit_now(ALICE, "gpt-4o"), reply(50, 50))  # 100 on gpt-4o
    error = refused(lim, model="gpt-4o")
    assert error.hit.limit == "model_tokens_per_day" and error.hit.model == "gpt-4o"
    assert sentence(error) == ("You have used your 100 tokens of gpt-4o for today; the limit resets at 00:00 UTC "
                               "(in 3 h 12 min).")
    lim.settle_now(lim.admit_now(ALICE, "fake"), reply(400, 400))  # other models: only the overall limit
    assert lim.left_today(ALICE, "fake") == (100, 1000)  # 900 of all models
    assert lim.left_today(ALICE, "gpt-4o") == (0, 100)  # the tighter of the two
    lim.settle_now(lim.admit_now(ALICE, "fake"), reply(50, 50))
    assert refused(lim, model="fake").hit.limit == "tokens_per_day"


def test_messages_per_minute_is_a_sliding_window(stores):
    clock = Clock()
    lim = limiter(stores(), clock, messages_per_minute=3)
    first = clock.now
    for step in range(3):  # the 3rd is allowed
        lim.settle_now(lim.admit_now(ALICE, "fake"), reply(1, 1))
        clock.now += 10
    error = refused(lim)  # the 4th, 30 s after the first
    assert error.hit.limit == "messages_per_minute" and error.hit.resets_at == first + 60
    assert sentence(error) == ("You have sent 3 messages in the last minute, the most allowed per minute; "
                               "you can send again at 20:49:00 UTC (in 30 s).")
    assert error.hit.retry_after == 30
    clock.now = first + 59.9
    refused(lim)
    clock.now = first + 60  # the first message has left the window
    lim.admit_now(ALICE, "fake")
    refused(lim)


def test_concurrent_replies_count_live_leases_until_they_end_or_expire(stores):
    clock = Clock()
    lim = limiter(stores(), clock, concurrent_replies=2)
    one = lim.admit_now(ALICE, "fake")
    lim.admit_now(ALICE, "fake")  # never renewed nor ended below: as if its process died
    error = refused(lim)
    assert error.hit.limit == "concurrent_replies" and error.hit.resets_at is None
    assert sentence(error) == ("You already have the most replies streaming at once (2); send again when one "
                               "of them ends.")
    lim.settle_now(one, reply(1, 1))  # one ended
    three = lim.admit_now(ALICE, "fake")
    refused(lim)
    clock.now += lim.lease_seconds - 1  # renewed: still live
    lim.renew_now(three)
    clock.now += 2  # _two (never renewed: its process died) has expired; three has not
    lim.admit_now(ALICE, "fake")
    refused(lim)


def test_a_reply_that_did_not_start_is_taken_back(stores):
    clock = Clock()
    lim = limiter(stores(), clock, messages_per_minute=1, concurrent_replies=1)
    lim.settle_now(lim.admit_now(ALICE, "fake"), None)  # e.g. runs.max_per_owner refused it after all
    lim.admit_now(ALICE, "fake")  # neither its message nor its lease counts


def test_no_limits_no_counting_but_usage_is_recorded(stores):
    store = stores()
    lim = Limiter(PerUserLimits(), store, clock=Clock())
    admission = lim.admit_now(ALICE, "fake")
    assert admission.message_id is None and admission.lease_id is None
    lim.settle_now(admission, reply(7, 5, 0.25))
    [row] = store.usage_since(0)
    assert (row.owner, row.model, row.replies, row.prompt_tokens, row.completion_tokens, row.cost) == \
        (ALICE, "fake", 1, 7, 5, 0.25)


def test_a_continuation_counts_its_new_part_only(stores):
    store = stores()
    lim = Limiter(PerUserLimits(tokens_per_day=1000), store, clock=Clock())
    continued = reply(100, 50, 0.5)  # the whole, as settle leaves it: the earlier (80, 20) and the new part
    continued.continued, continued.earlier_counts, continued.earlier_cost = True, Counts(80, 20, True), 0.25
    lim.settle_now(lim.admit_now(ALICE, "fake"), continued)
    [row] = store.usage_since(0)
    assert (row.prompt_tokens, row.completion_tokens, row.cost) == (20, 30, 0.25)


# -- across processes: two stores on one database --------------------------------------------------
def test_two_processes_count_together_and_atomically(stores):
    """Two stores (two processes' worth) admit 24 messages of one owner at once: exactly the limit
    gets through, whichever store each went to; the same for live replies."""
    clock = Clock()
    one, two = stores(), stores()
    per_minute = [limiter(s, clock, messages_per_minute=5) for s in (one, two)]
    start = threading.Barrier(8)

    def attempt(i: int, lims: list[Limiter], owner: str) -> bool:
        if i < 8:
            start.wait()
        try:
            lims[i % 2].admit_now(owner, "fake")
            return True
        except LimitError:
            return False

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(lambda i: attempt(i, per_minute, ALICE), range(24))) == 5
    concurrent = [limiter(s, clock, concurrent_replies=3) for s in (one, two)]
    start.reset()
    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(lambda i: attempt(i, concurrent, BOB), range(24))) == 3
    # what one process counted refuses on the other
    assert refused(concurrent[1], BOB).hit.limit == "concurrent_replies"
    assert refused(per_minute[0], ALICE).hit.limit == "messages_per_minute"


def test_tokens_used_through_one_process_count_in_the_other(stores):
    clock = Clock()
    one, two = (limiter(s, clock, tokens_per_day=10) for s in (stores(), stores()))
    one.settle_now(one.admit_now(ALICE, "fake"), reply(5, 5))
    assert refused(two).hit.limit == "tokens_per_day"
    assert two.left_today(ALICE, "fake") == (0, 10)


# -- config ---------------------------------------------------------------------------------------
def test_the_config_names_a_bad_key_and_an_unknown_model():
    models = [{"provider": "openai", "name": "fake", "model": "m", "base_url": "http://127.0.0.1:9/v1",
               "api_key": "sk-test-0123456789"}]
    config = build_config({"models": models, "limits": {"per_user": {
        "concurrent_replies": 2, "messages_per_minute": 20, "tokens_per_day": 200000,
        "models": {"fake": {"tokens_per_day": 50000}}}}}, env={})
    assert config.limits.per_user.models["fake"].tokens_per_day == 50000
    with pytest.raises(ConfigError) as caught:
        build_config({"models": models, "limits": {"per_user": {"tokens_a_day": 5}}}, file="c.yaml", env={})
    assert str(caught.value).startswith("c.yaml: limits.per_user.tokens_a_day")
    with pytest.raises(ConfigError) as caught:
        build_config({"models": models, "limits": {"per_user": {"messages_per_minute": 0}}}, file="c.yaml", env={})
    assert str(caught.value).startswith("c.yaml: limits.per_user.messages_per_minute")
    with pytest.raises(ConfigError) as caught:
        build_config({"models": models, "limits": {"per_user": {"models": {"gpt-5": {"tokens_per_day": 1}}}}},
                     file="c.yaml", env={})
    assert str(caught.value) == "c.yaml: limits.per_user.models.gpt-5: 'gpt-5' is not a configured model name"


# -- the usage command ------------------------------------------------------------------------------
def test_the_usage_command_prints_a_table_and_csv(tmp_path: Path):
    store = SQLiteStore(tmp_path / FILENAME)
    now = Clock(datetime.now(timezone.utc).timestamp())
    lim = Limiter(PerUserLimits(), store, clock=now)
    lim.settle_now(lim.admit_now(ALICE, "fake"), reply(1200, 300, 0.0125))
    lim.settle_now(lim.admit_now(ALICE, "fake"), reply(800, 200, 0.0075))
    lim.settle_now(lim.admit_now(ALICE, "other"), reply(10, 20, None))
    lim.settle_now(lim.admit_now("api:0123456789abcdef", "fake"), reply(5, 5, 0.001))
    now.now -= 8 * DAY  # older than --since 7d
    lim.settle_now(lim.admit_now(BOB, "fake"), reply(99, 99, 9.0))
    store.close()
    config = tmp_path / "config.yaml"
    config.write_text(f"history:\n  data_dir: {tmp_path}\n", encoding="utf-8")

    out = io.StringIO()
    assert ChuanhuStyleChat.usage_main(["--since", "7d", "--config", str(config)], out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Usage since ") and lines[0].endswith(" UTC:")
    assert lines[1].split() == ["owner", "model", "replies", "tokens", "in", "tokens", "out", "cost"]
    assert lines[2].split() == ["api:0123456789abcdef", "fake", "1", "5", "5", "$0.0010"]
    assert lines[3].split() == ["user:alice", "fake", "2", "2,000", "500", "$0.0200"]
    assert lines[4].split() == ["user:alice", "other", "1", "10", "20", "$0.0000", "(+1", "unpriced)"]
    assert lines[5].split() == ["total", "4", "2,015", "525", "$0.0210"]
    assert len(lines) == 6  # bob's reply is older than 7 days

    out = io.StringIO()
    assert ChuanhuStyleChat.usage_main(["--since", "30d", "--csv", "--config", str(config)], out=out) == 0
    assert out.getvalue().splitlines() == [
        "owner,model,replies,prompt_tokens,completion_tokens,cost_usd,replies_without_price",
        "api:0123456789abcdef,fake,1,5,5,0.001000,0",
        "user:alice,fake,2,2000,500,0.020000,0",
        "user:alice,other,1,10,20,0.000000,1",
        "user:bob,fake,1,99,99,9.000000,0",
    ]
    assert ChuanhuStyleChat.usage_main(["--since", "yesterday", "--config", str(config)], out=io.StringIO()) == 2
