"""The chat pipeline (issue #11): ChatService fits, starts, settles and saves; replies are runs.

Everything is driven in process by :class:`ScriptedModel` (a delta arrives exactly when the
test pushes it), without Gradio or HTTP. Every wait is on an event, a generator step or a
condition, bounded by a timeout; time is measured with the event loop's clock. The only
waits for time itself are where time is the feature (a grace, ``max_seconds``, the pacer,
``keep_seconds``), and there the test measures that it passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import pytest

from modules.config import ContextConfig, RunsConfig
from modules.core import context, tokens
from modules.core.chat import ChatService
from modules.core.runs import ReplyRuns, RunLimitError
from modules.core.streaming import Counts, Pacer, Reply, ReplyRun
from modules.i18n import Translator
from modules.providers import Delta, GenerationOptions, Message, Usage, errors
from modules.providers.base import Price
from tests.fakes.scripted_model import ScriptedModel

STEP = 5.0  # seconds: the most any single step may take before the test fails
OPTIONS = GenerationOptions()
MESSAGES = [Message("system", "Be brief."), Message("user", "Hi")]
PRICE = Price(input=2.0, output=8.0)  # USD per million tokens
SLACK = 0.02  # seconds a timer may fire early (the loop's clock resolution), or late for "at once"


# -- helpers ------------------------------------------------------------------------------------------
@functools.cache
def translator() -> Translator:
    return Translator("auto")


_registries: list[ReplyRuns] = []  # of this test, for the clean-up
_keepers: list["Keeper"] = []


@pytest.fixture(autouse=True)
async def _clean_up():
    """A failed test must end, not hang: hand back what a keeper holds, stop what still runs."""
    yield
    try:
        for keeper in _keepers:
            keeper.release()
        live = [run for runs in _registries for run in runs.live()]
        for run in live:
            run.stop()
        await asyncio.wait_for(asyncio.gather(*(run.wait() for run in live), return_exceptions=True), STEP)
    finally:
        _registries.clear()
        _keepers.clear()


def service(model: ScriptedModel, **kwargs: Any) -> ChatService:
    svc = ChatService({model.name: model}, translator=translator(), **kwargs)
    _registries.append(svc.runs)
    return svc


def now() -> float:
    return asyncio.get_running_loop().time()


async def fitted(svc: ChatService, model: ScriptedModel, messages: list[Message] = MESSAGES) -> context.Fit:
    fit, _ = await asyncio.wait_for(svc.fit(model, messages, OPTIONS), STEP)
    assert not fit.overflows
    return fit


async def wait_until(condition: Callable[[], Any], what: str, timeout: float = STEP) -> Any:
    """Poll ``condition`` (for what only a timer changes) until truthy; fail after ``timeout``."""
    deadline = now() + timeout
    while not (value := condition()):
        if now() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.005)
    return value


async def does_not_happen(event: asyncio.Event, within: float) -> bool:
    """True when ``event`` stays unset for ``within`` seconds (for what must *not* happen)."""
    try:
        await asyncio.wait_for(event.wait(), within)
    except TimeoutError:
        return True
    return False


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}w{i}" for i in range(n))


def n_tokens(messages: list[Message], model_id: str) -> int:
    return tokens.count_messages([m.as_dict() for m in messages], model_id)[0]


class Keeper:
    """A front end's ``save`` and ``checkpoint``: records every call and what it saw, and
    every broken rule (a checkpoint during another one, during the save or after it; a save
    during a checkpoint). ``save_gate`` / ``checkpoint_gate`` hold the call until set."""

    def __init__(self) -> None:
        self.saves: list[Reply] = []  # snapshots of the reply, taken when save was called
        self.save_returned = False
        self.save_entered = asyncio.Event()
        self.save_gate = asyncio.Event()
        self.save_gate.set()
        self.checkpoints: list[tuple[str, str]] = []  # (status, text) when each was called
        self.in_checkpoint = 0
        self.in_save = 0
        self.broken: list[str] = []
        self.checkpoint_gate = asyncio.Event()
        self.checkpoint_gate.set()
        _keepers.append(self)

    def release(self) -> None:
        self.save_gate.set()
        self.checkpoint_gate.set()

    async def save(self, run: ReplyRun) -> None:
        if self.in_checkpoint:
            self.broken.append("save while a checkpoint runs")
        if self.in_save:
            self.broken.append("two saves at once")
        self.in_save += 1
        reply = run.reply
        self.saves.append(Reply(model=reply.model, text=reply.text, status=reply.status, error=reply.error,
                                counts=reply.counts, cost=reply.cost, dropped_rounds=reply.dropped_rounds))
        self.save_entered.set()
        try:
            await self.save_gate.wait()
            await asyncio.sleep(0)  # a real save awaits a worker thread: other tasks run meanwhile
        finally:
            self.in_save -= 1
            self.save_returned = True

    async def checkpoint(self, run: ReplyRun) -> None:
        if self.saves:
            self.broken.append("checkpoint after the save")
        if self.in_checkpoint:
            self.broken.append("two checkpoints at once")
        if self.in_save:
            self.broken.append("checkpoint while the save runs")
        self.in_checkpoint += 1
        self.checkpoints.append((run.reply.status, run.reply.text))
        try:
            await self.checkpoint_gate.wait()
            await asyncio.sleep(0)
        finally:
            self.in_checkpoint -= 1


@dataclass
class Seen:
    """One update a viewer got, as it was when it got it."""

    at: float
    status: str
    text: str
    active: bool
    done: bool  # the run was over (finished included)
    counts: Counts | None
    saved: bool | None  # the save had returned (None: no keeper)


class Viewer:
    """One ``run.watch()``, stepped by the test; every update recorded as :class:`Seen`."""

    def __init__(self, run: ReplyRun, *, pacer: Pacer | None = None, at_once: bool = True,
                 keeper: Keeper | None = None):
        self.run, self.keeper = run, keeper
        self.gen = run.watch(pacer=pacer if pacer is not None else Pacer(0.0), at_once=at_once)
        self.seen: list[Seen] = []
        self.ended = False
        self._pending: asyncio.Task[Any] | None = None

    async def begin(self) -> None:
        """Start watching without waiting for an update (for ``at_once=False``: a viewer sees
        only what changes after it started): until the run counts this viewer."""
        before = self.run.viewers
        self._pending = asyncio.create_task(anext(self.gen))
        deadline = now() + STEP
        while self.run.viewers == before:  # a few scheduling turns
            assert now() < deadline and not self._pending.done(), "the viewer did not start"
            await asyncio.sleep(0)

    async def next(self, timeout: float = STEP) -> Seen:
        # The reply is read as soon as it is yielded, in the generator's own task (a consumer must
        # read the live object at once: the run goes on changing it afterwards).
        step, self._pending = (self._pending or anext(self.gen)), None
        async with asyncio.timeout(timeout):
            reply = await step
        assert reply is not None  # no heartbeat asked for
        seen = Seen(now(), reply.status, reply.text, reply.active, self.run.done, reply.counts,
                    None if self.keeper is None else self.keeper.save_returned)
        self.seen.append(seen)
        return seen

    async def until(self, condition: Callable[[Seen], bool]) -> Seen:
        async def go() -> Seen:
            while not condition(seen := await self.next()):
                pass
            return seen

        return await asyncio.wait_for(go(), STEP)

    async def drain(self) -> list[Seen]:
        async def go() -> None:
            with contextlib.suppress(StopAsyncIteration):
                while True:
                    await self.next()

        await asyncio.wait_for(go(), STEP)
        self.ended = True
        return self.seen

    async def leave(self) -> None:
        await asyncio.wait_for(self.gen.aclose(), STEP)

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.seen]


def assert_never_shrinks(texts: list[str]) -> None:
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before), f"text went from {before!r} to {after!r}"


async def feed_until(model: ScriptedModel, condition: Callable[[], bool], what: str, piece: str = "x ",
                     at_least: float = 0.0) -> None:
    """Push one delta at a time (each taken by the reader before the next) until ``condition``
    holds and ``at_least`` seconds of the loop's clock have passed."""
    start = now()

    async def go() -> None:
        while not condition() or now() - start < at_least:
            model.enqueue(piece)
            await model.drained()

    try:
        await asyncio.wait_for(go(), STEP)
    except TimeoutError:
        pytest.fail(f"timed out feeding deltas until {what}")


async def ended(run: ReplyRun) -> Reply:
    return await asyncio.wait_for(run.wait(), STEP)


# -- fitting ------------------------------------------------------------------------------------------
MODEL_ID = "gpt-4o"  # exact tiktoken counts


def long_history(n: int = 8) -> tuple[Message, list[list[Message]], Message]:
    system = Message("system", "You are terse.")
    rounds = [[Message("user", f"question {i} " + words(f"q{i}", 20)), Message("assistant", f"answer {i} " + words(f"a{i}", 30))]
              for i in range(n)]
    return system, rounds, Message("user", "And the last question?")


def flat(rounds: list[list[Message]]) -> list[Message]:
    return [m for r in rounds for m in r]


async def test_a_history_too_long_is_trimmed_oldest_rounds_first():
    model = ScriptedModel(MODEL_ID, context_size=512)  # reserve 128 (a quarter): 384 tokens for the prompt
    system, rounds, question = long_history()
    messages = [system, *flat(rounds), question]
    assert n_tokens(messages, MODEL_ID) > 384  # the whole history cannot be sent
    svc = service(model)
    keeper = Keeper()
    fit = await fitted(svc, model, messages)
    run = svc.start(model, fit, OPTIONS, save=keeper.save)
    model.enqueue("ok").end()
    reply = await ended(run)

    [(sent, options)] = model.calls
    assert options == OPTIONS
    assert sent[0] == system and sent[-1] == question  # the system prompt and the question stay
    dropped = reply.dropped_rounds
    assert 0 < dropped < len(rounds)
    assert sent[1:-1] == flat(rounds[dropped:])  # the oldest rounds left out, the rest in order
    assert n_tokens(sent, MODEL_ID) <= 384
    # ... and no fewer rounds than needed: with one more round the prompt would not fit.
    assert n_tokens([system, *flat(rounds[dropped - 1:]), question], MODEL_ID) > 384
    assert not reply.summarized
    assert keeper.saves[0].dropped_rounds == dropped
    assert reply.counts is not None and reply.counts.prompt == n_tokens(sent, MODEL_ID)


async def test_the_summarize_strategy_asks_for_a_summary_first_and_sends_it_as_a_system_message():
    # Reserve 1024: 3072 tokens for the prompt, which 20 rounds overflow; the rounds left out
    # fit the summary request whole (a smaller context would summarise only their newest part).
    model = ScriptedModel(MODEL_ID, context_size=4096)
    system, rounds, question = long_history(20)
    messages = [system, *flat(rounds), question]
    svc = service(model, context_config=ContextConfig(strategy="summarize"))
    model.enqueue("The user asked eight numbered questions.").end()  # the summary request's answer
    fit, cache = await asyncio.wait_for(svc.fit(model, messages, OPTIONS), STEP)
    assert len(model.calls) == 1  # the summary was asked for while fitting, before any run
    summary_request = model.calls[0][0]
    assert summary_request[0].role == "system" and summary_request[0].content == context.SUMMARY_INSTRUCTION
    assert fit.summarized and fit.dropped_rounds > 0 and not fit.overflows
    # What gets summarised: the rounds left out, and only those.
    assert summary_request[1].content == context.transcript(flat(rounds[:fit.dropped_rounds]))
    assert cache == (fit.dropped_rounds, "The user asked eight numbered questions.")

    run = svc.start(model, fit, OPTIONS)
    model.enqueue("ok").end()
    reply = await ended(run)
    assert reply.status == "done" and reply.text == "ok"
    assert len(model.calls) == 2
    sent = model.calls[1][0]
    assert sent[0] == system
    assert sent[1] == Message("system", context.SUMMARY_PREFIX + "The user asked eight numbered questions.")
    assert sent[2:-1] == flat(rounds[fit.dropped_rounds:]) and sent[-1] == question
    assert not any("question 0 " in m.content for m in sent)  # the summarised rounds themselves are left out
    assert reply.summarized and reply.dropped_rounds == fit.dropped_rounds


async def test_a_question_too_long_alone_overflows_with_a_clear_sentence():
    model = ScriptedModel(MODEL_ID, context_size=256)  # reserve 64: 192 tokens for the prompt
    svc = service(model)
    messages = [Message("system", "Be brief."), Message("user", words("long", 400))]
    fit, _ = await asyncio.wait_for(svc.fit(model, messages, OPTIONS), STEP)
    assert fit.overflows
    assert fit.budget == 192 and fit.prompt_tokens > 192
    error = svc.overflow(fit)
    assert isinstance(error, errors.ContextOverflowError)
    assert (error.tokens, error.limit) == (fit.prompt_tokens, fit.budget)
    sentence = svc.sentence("en_US", error)
    assert f"{fit.prompt_tokens:,}" in sentence and f"{fit.budget:,}" in sentence
    assert "context" in sentence and "{" not in sentence and "error." not in sentence
    assert sentence.endswith(".")
    assert model.calls == []  # nothing was sent


# -- settling -----------------------------------------------------------------------------------------
async def test_a_finished_reply_is_settled_with_the_models_usage_and_priced_before_save():
    model = ScriptedModel(price=PRICE)
    svc = service(model)
    keeper = Keeper()
    run = svc.start(model, await fitted(svc, model), OPTIONS, save=keeper.save)
    model.enqueue("Hello", " world", Delta(usage=Usage(prompt_tokens=1234, completion_tokens=56))).end()
    reply = await ended(run)
    [saved] = keeper.saves
    assert saved.status == "done" and saved.text == "Hello world"
    assert saved.counts == Counts(1234, 56, True)  # the model's own numbers, exactly
    assert saved.cost == pytest.approx((1234 * 2.0 + 56 * 8.0) / 1_000_000)
    assert (reply.counts, reply.cost) == (saved.counts, saved.cost)


@pytest.mark.parametrize("model_id, exact", [("scripted", False), (MODEL_ID, True)])
async def test_without_usage_the_counts_are_tiktokens_and_priced_before_save(model_id, exact):
    model = ScriptedModel(model_id, price=PRICE)
    svc = service(model)
    keeper = Keeper()
    fit = await fitted(svc, model)
    run = svc.start(model, fit, OPTIONS, save=keeper.save)
    model.enqueue("Hello", " world,", " and again").end()
    await ended(run)
    [saved] = keeper.saves
    completion = tokens.count("Hello world, and again", model_id)[0]
    assert saved.counts == Counts(n_tokens(MESSAGES, model_id), completion, exact)
    assert saved.counts.prompt == fit.prompt_tokens
    assert saved.cost == pytest.approx((saved.counts.prompt * 2.0 + completion * 8.0) / 1_000_000)


async def test_without_a_price_there_is_no_cost_but_there_are_counts():
    model = ScriptedModel()
    svc = service(model)
    keeper = Keeper()
    run = svc.start(model, await fitted(svc, model), OPTIONS, save=keeper.save)
    model.enqueue("Hello").end()
    await ended(run)
    assert keeper.saves[0].counts is not None and keeper.saves[0].cost is None


async def test_a_failed_reply_with_no_text_has_no_counts_and_is_still_saved():
    model = ScriptedModel(price=PRICE)
    svc = service(model)
    keeper = Keeper()
    run = svc.start(model, await fitted(svc, model), OPTIONS, save=keeper.save)
    model.enqueue(Delta(), errors.ServerError("boom", status=502))
    reply = await ended(run)
    [saved] = keeper.saves
    assert saved.status == "error" and isinstance(saved.error, errors.ServerError)
    assert saved.counts is None and saved.cost is None
    assert reply.counts is None
    sentence = svc.sentence("en_US", reply.error)
    assert sentence.startswith("The model server failed (HTTP 502).") and "boom" in sentence


async def test_a_reply_cut_after_some_text_is_counted():
    model = ScriptedModel(price=PRICE)
    svc = service(model)
    keeper = Keeper()
    run = svc.start(model, await fitted(svc, model), OPTIONS, save=keeper.save)
    model.enqueue("Half an answer", errors.InterruptedError("peer closed connection"))
    await ended(run)
    [saved] = keeper.saves
    assert saved.status == "interrupted" and saved.text == "Half an answer"
    assert saved.counts is not None and saved.counts.completion == tokens.count("Half an answer", "scripted")[0]
    assert saved.cost is not None


# -- saving -------------------------------------------------------------------------------------------
ENDINGS = ["done", "stopped", "failed", "timed out"]


async def run_to(ending: str, *, strict: bool) -> None:
    """Start a run watched by a viewer, end it as ``ending`` says while ``save`` is held, and
    check what the viewer got. ``strict``: no update may show an ended reply before the save
    returned (else: the viewer's last update, the final state, comes after it)."""
    model = ScriptedModel(price=PRICE)
    max_seconds = 0.2 if ending == "timed out" else 1800.0
    svc = service(model, runs_config=RunsConfig(unwatched="continue", max_seconds=max_seconds))
    keeper = Keeper()
    keeper.save_gate.clear()
    run = svc.start(model, await fitted(svc, model), OPTIONS, owner="alice", save=keeper.save)
    viewer = Viewer(run, keeper=keeper)
    watching = asyncio.create_task(viewer.drain())
    model.enqueue("Hel")
    await asyncio.wait_for(model.drained(), STEP)
    if ending == "done":
        model.enqueue("lo").end()
    elif ending == "stopped":
        run.stop()
    elif ending == "failed":
        model.enqueue(errors.ServerError("boom", status=500))
    await asyncio.wait_for(keeper.save_entered.wait(), STEP)  # (timed out: after max_seconds)
    assert model.closed.is_set()
    # The save is held: the run is not over, and its viewer does not get the final state.
    assert not run.done
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(watching), 0.1)
    keeper.save_gate.set()
    seen = await asyncio.wait_for(watching, STEP)
    reply = await ended(run)
    run.stop()  # (after the end: nothing more happens)
    await ended(run)

    # A reply cut by runs.max_seconds keeps its text, with a sentence that says why.
    status = {"done": "done", "stopped": "stopped", "failed": "interrupted", "timed out": "interrupted"}[ending]
    assert reply.status == status and run.timed_out == (ending == "timed out")
    if ending == "timed out":
        assert isinstance(reply.error, errors.TimeLimitError)
        assert "runs.max_seconds" in svc.sentence("en_US", reply.error)
    assert len(keeper.saves) == 1  # exactly once, whatever the ending
    assert keeper.saves[0].status == status and keeper.saves[0].counts is not None  # settled before save
    assert keeper.broken == []
    last = seen[-1]
    assert last.done and last.saved and last.status == status and last.counts == reply.counts
    assert last.text == ("Hello" if ending == "done" else "Hel")
    assert_never_shrinks([s.text for s in seen])
    if strict:
        early = [s for s in seen if not s.active and not s.saved]
        assert early == [], f"a viewer saw the reply ended ({early[0].status}) before it was settled and saved"


@pytest.mark.parametrize("ending", ENDINGS)
async def test_save_is_awaited_once_and_viewers_get_the_final_state_after_it(ending):
    await run_to(ending, strict=False)


@pytest.mark.parametrize("ending", ENDINGS)
async def test_no_viewer_sees_an_ended_reply_before_it_is_saved(ending):
    await run_to(ending, strict=True)


async def test_a_failure_before_any_text_is_saved_once_too():
    model = ScriptedModel()
    svc = service(model)
    keeper = Keeper()
    run = svc.start(model, await fitted(svc, model), OPTIONS, save=keeper.save)
    model.enqueue(errors.AuthenticationError("no", status=401))
    reply = await ended(run)
    assert reply.status == "error" and len(keeper.saves) == 1 and keeper.saves[0].status == "error"


@pytest.mark.parametrize("ending", ["done", "stopped"])
async def test_checkpoints_while_the_reply_grows_never_overlap_and_never_follow_the_save(ending):
    model = ScriptedModel()
    svc = service(model, runs_config=RunsConfig(unwatched="continue"), checkpoint_seconds=0.01)
    keeper = Keeper()
    run = svc.start(model, await fitted(svc, model), OPTIONS, owner="alice", save=keeper.save,
                    checkpoint=keeper.checkpoint)
    await feed_until(model, lambda: len(keeper.checkpoints) >= 2 and not keeper.in_checkpoint, "two checkpoints")
    # A slow checkpoint: the reply goes on growing past several checkpoint times meanwhile.
    keeper.checkpoint_gate.clear()
    before = len(keeper.checkpoints)
    await feed_until(model, lambda: keeper.in_checkpoint == 1, "a third checkpoint")
    await feed_until(model, lambda: True, "the reply grew for 5 checkpoint times", at_least=0.05)
    assert len(keeper.checkpoints) == before + 1  # no second one while the first is held
    # The reply ends while that checkpoint is held: the save waits for it.
    if ending == "done":
        model.end()
    else:
        run.stop()
    await asyncio.wait_for(model.closed.wait(), STEP)
    assert await does_not_happen(keeper.save_entered, 0.1)
    keeper.checkpoint_gate.set()
    reply = await ended(run)

    assert reply.status == ending
    assert keeper.broken == []
    assert len(keeper.saves) == 1 and keeper.saves[0].text == reply.text
    assert len(keeper.checkpoints) == before + 1 >= 3
    assert all(status == "streaming" for status, _ in keeper.checkpoints)
    texts = [text for _, text in keeper.checkpoints]
    assert all(a != b and b.startswith(a) for a, b in zip(texts, texts[1:]))  # each one later in the reply
    assert all(text and reply.text.startswith(text) and text != reply.text for text in texts)


# -- cancellation -------------------------------------------------------------------------------------
async def test_stop_closes_the_models_stream_at_once_and_keeps_the_partial_text():
    model = ScriptedModel()
    svc = service(model)
    keeper = Keeper()
    run = svc.start(model, await fitted(svc, model), OPTIONS, save=keeper.save)
    viewer = Viewer(run, keeper=keeper)
    model.enqueue("Partial ", "answer")
    await viewer.until(lambda s: s.text == "Partial answer")
    assert not model.closed.is_set()
    t0 = now()
    run.stop()
    await asyncio.wait_for(model.closed.wait(), STEP)
    assert now() - t0 < 0.5
    assert model.cancelled and not model.finished
    seen = await viewer.drain()
    reply = await ended(run)
    assert (reply.status, reply.text, reply.error) == ("stopped", "Partial answer", None)
    assert seen[-1].status == "stopped" and seen[-1].text == "Partial answer" and seen[-1].done
    assert [(s.status, s.text) for s in keeper.saves] == [("stopped", "Partial answer")]


async def test_stop_before_the_first_token_closes_the_models_stream():
    model = ScriptedModel()
    svc = service(model)
    keeper = Keeper()
    run = svc.start(model, await fitted(svc, model), OPTIONS, save=keeper.save)
    await asyncio.wait_for(model.started.wait(), STEP)  # the model is asked, and says nothing yet
    model.enqueue(Delta())  # (a role-only chunk)
    await asyncio.wait_for(model.drained(), STEP)
    t0 = now()
    run.stop()
    await asyncio.wait_for(model.closed.wait(), STEP)
    assert now() - t0 < 0.5
    assert model.cancelled
    reply = await ended(run)
    assert (reply.status, reply.text) == ("stopped", "")
    assert [s.status for s in keeper.saves] == ["stopped"]


# -- runs that belong to a request (owner=None) -------------------------------------------------------
async def test_the_last_viewer_leaving_stops_a_request_run_at_once():
    model = ScriptedModel()
    svc = service(model, runs_config=RunsConfig(unwatched="continue", unwatched_grace_seconds=60))
    keeper = Keeper()
    run = svc.start(model, await fitted(svc, model), OPTIONS, save=keeper.save)  # the page's policy is not its
    first, second = Viewer(run), Viewer(run)
    model.enqueue("Hel")
    await first.until(lambda s: s.text == "Hel")
    await second.until(lambda s: s.text == "Hel")
    await first.leave()  # one viewer left: the run goes on
    model.enqueue("lo")
    await asyncio.wait_for(model.drained(), STEP)
    assert run.reply.active and run.reply.text == "Hello" and not model.closed.is_set()
    t0 = now()
    await second.leave()  # the last one: stopped now
    assert run.reply.status == "stopped"
    await asyncio.wait_for(model.closed.wait(), STEP)
    assert now() - t0 < 0.5 and model.cancelled
    reply = await ended(run)
    assert (reply.status, reply.text) == ("stopped", "Hello")
    assert [(s.status, s.text) for s in keeper.saves] == [("stopped", "Hello")]


async def left_with_a_grace(grace: float) -> tuple[ScriptedModel, ReplyRun, Keeper]:
    """A request's run kept ``grace`` seconds for a reconnection, whose one viewer saw "Hel" and left."""
    model = ScriptedModel()
    svc = service(model)
    keeper = Keeper()
    run = svc.start(model, await fitted(svc, model), OPTIONS, save=keeper.save, grace=grace)
    viewer = Viewer(run)
    model.enqueue("Hel")
    await viewer.until(lambda s: s.text == "Hel")
    await viewer.leave()
    return model, run, keeper


async def test_a_request_run_with_a_grace_stops_only_after_the_grace():
    grace = 0.2
    model, run, keeper = await left_with_a_grace(grace)
    t0 = now()
    assert run.reply.active
    model.enqueue("lo")  # it goes on meanwhile
    await asyncio.wait_for(model.drained(), STEP)
    assert run.reply.text == "Hello" and run.reply.active
    await asyncio.wait_for(model.closed.wait(), STEP)
    assert now() - t0 >= grace - SLACK
    reply = await ended(run)
    assert (reply.status, reply.text) == ("stopped", "Hello")
    assert len(keeper.saves) == 1


async def test_a_viewer_back_within_the_grace_keeps_a_request_run_going():
    grace = 0.2
    model, run, keeper = await left_with_a_grace(grace)
    back = Viewer(run)  # a reconnecting EventSource
    assert (await back.next(timeout=0.5)).text == "Hel"  # the text so far, at once
    assert await does_not_happen(model.closed, 2.5 * grace)  # the grace passed: still going
    model.enqueue("lo").end()
    seen = await back.drain()
    assert (seen[-1].status, seen[-1].text) == ("done", "Hello")
    assert not model.cancelled and len(keeper.saves) == 1


# -- runs of an owner ---------------------------------------------------------------------------------
@pytest.mark.parametrize("watched", [False, True], ids=["never-watched", "viewer-left"])
async def test_an_owners_run_nobody_watches_goes_on_to_its_end_with_unwatched_continue(watched):
    model = ScriptedModel()
    svc = service(model, runs_config=RunsConfig(unwatched="continue", unwatched_grace_seconds=0.05))
    keeper = Keeper()
    run = svc.start(model, await fitted(svc, model), OPTIONS, owner="alice", key=("alice", "c1"), save=keeper.save)
    model.enqueue("Hel")
    if watched:
        viewer = Viewer(run)
        await viewer.until(lambda s: s.text == "Hel")
        await viewer.leave()  # the tab was closed
    assert await does_not_happen(model.closed, 0.2)  # well past the grace (which is for "stop" only)
    assert run.reply.active
    model.enqueue("lo, all").end()
    reply = await ended(run)
    assert (reply.status, reply.text) == ("done", "Hello, all")
    assert not model.cancelled
    assert [(s.status, s.text) for s in keeper.saves] == [("done", "Hello, all")]


@pytest.mark.parametrize("watched", [False, True], ids=["never-watched", "viewer-left"])
async def test_an_owners_run_nobody_watches_is_stopped_after_the_grace_with_unwatched_stop(watched):
    grace = 0.05
    model = ScriptedModel()
    svc = service(model, runs_config=RunsConfig(unwatched="stop", unwatched_grace_seconds=grace))
    keeper = Keeper()
    t0 = now()
    run = svc.start(model, await fitted(svc, model), OPTIONS, owner="alice", key=("alice", "c1"), save=keeper.save)
    model.enqueue("Hel")
    if watched:
        viewer = Viewer(run)
        await viewer.until(lambda s: s.text == "Hel")
        await viewer.leave()
        t0 = now()
    else:
        await asyncio.wait_for(model.drained(), STEP)
    try:
        await asyncio.wait_for(model.closed.wait(), 20 * grace)
    except TimeoutError:
        run.stop()  # (so that the test ends cleanly)
        await ended(run)
        pytest.fail(f"a run nobody watches was still going {20 * grace:g} s after its {grace:g} s grace")
    assert now() - t0 >= grace - SLACK
    reply = await ended(run)
    assert (reply.status, reply.text) == ("stopped", "Hel")
    assert [(s.status, s.text) for s in keeper.saves] == [("stopped", "Hel")]


# -- several viewers ----------------------------------------------------------------------------------
async def test_two_viewers_get_the_same_text_and_a_late_one_the_text_so_far_at_once():
    model = ScriptedModel()
    svc = service(model, runs_config=RunsConfig(unwatched="continue"))
    run = svc.start(model, await fitted(svc, model), OPTIONS, owner="alice")
    early = Viewer(run)
    model.enqueue("Hello")
    await early.until(lambda s: s.text == "Hello")
    model.enqueue(" wor")  # while the early viewer is busy
    await asyncio.wait_for(model.drained(), STEP)
    late = Viewer(run)
    t0 = now()
    first = await late.next(timeout=1.0)
    assert first.text == "Hello wor" and first.status == "streaming"  # its first update: the text so far
    assert now() - t0 < 0.1
    model.enqueue("ld", "!").end()
    await asyncio.gather(early.drain(), late.drain())
    for viewer in (early, late):
        assert_never_shrinks(viewer.texts)
        assert (viewer.seen[-1].status, viewer.seen[-1].text) == ("done", "Hello world!")
        assert viewer.seen[-1].done
    # One after the end gets the final state once.
    after = Viewer(run)
    assert [(s.status, s.text) for s in await after.drain()] == [("done", "Hello world!")]


# -- limits and the registry --------------------------------------------------------------------------
async def stop_all(*runs: ReplyRun) -> None:
    for run in runs:
        run.stop()
    await asyncio.wait_for(asyncio.gather(*(run.wait() for run in runs)), STEP)


async def test_max_per_owner_refuses_one_more_run_of_that_owner():
    model = ScriptedModel()  # says nothing: every run stays live
    svc = service(model, runs_config=RunsConfig(max_per_owner=2, unwatched="continue"))
    fit = await fitted(svc, model)
    a1 = svc.start(model, fit, OPTIONS, owner="alice")
    a2 = svc.start(model, fit, OPTIONS, owner="alice")
    with pytest.raises(RunLimitError) as refused:
        svc.start(model, fit, OPTIONS, owner="alice")
    assert (refused.value.scope, refused.value.limit) == ("owner", 2)
    b1 = svc.start(model, fit, OPTIONS, owner="bob")  # another owner is not limited by alice's
    r1 = svc.start(model, fit, OPTIONS)  # nor a request's run
    await stop_all(a1)
    a3 = svc.start(model, fit, OPTIONS, owner="alice")  # one ended: room again
    await stop_all(a2, b1, r1, a3)


async def test_the_apps_limit_refuses_one_more_run_of_anyone():
    model = ScriptedModel()
    svc = service(model, runs_config=RunsConfig(unwatched="continue"), max_live_runs=2)
    fit = await fitted(svc, model)
    alice = svc.start(model, fit, OPTIONS, owner="alice")
    request = svc.start(model, fit, OPTIONS)  # a request's run (the API, /chat) counts too
    for owner in ("carol", None):
        with pytest.raises(RunLimitError) as refused:
            svc.start(model, fit, OPTIONS, owner=owner)
        assert (refused.value.scope, refused.value.limit) == ("app", 2)
    await stop_all(alice)
    carol = svc.start(model, fit, OPTIONS, owner="carol")  # one ended: room again
    await stop_all(request, carol)


async def test_runs_of_a_key_are_the_live_ones_and_live_keys_lists_them():
    model = ScriptedModel()
    svc = service(model, runs_config=RunsConfig(unwatched="continue"))
    fit = await fitted(svc, model)
    k1, k2 = ("alice", "c1"), ("alice", "c2")
    run1 = svc.start(model, fit, OPTIONS, owner="alice", key=k1)
    run2 = svc.start(model, fit, OPTIONS, owner="alice", key=k2)
    unkeyed = svc.start(model, fit, OPTIONS)
    assert svc.runs.of(k1) is run1 and svc.runs.of(k2) is run2 and svc.runs.of(("bob", "c1")) is None
    assert svc.runs.live_keys() == {k1, k2}
    assert svc.runs.get(run1.id) is run1 and svc.runs.get(unkeyed.id) is unkeyed
    await stop_all(run1)
    assert svc.runs.of(k1) is None  # ended: no live run for it
    assert svc.runs.live_keys() == {k2}
    assert svc.runs.get(run1.id) is run1  # still known by id for a while (keep_seconds)
    again = svc.start(model, fit, OPTIONS, owner="alice", key=k1)
    assert svc.runs.of(k1) is again and svc.runs.live_keys() == {k1, k2}
    await stop_all(run2, unkeyed, again)
    assert svc.runs.live_keys() == set()


async def test_ended_runs_are_forgotten_keep_seconds_after_they_end():
    keep = 0.1
    runs = ReplyRuns(keep_seconds=keep)
    _registries.append(runs)
    model = ScriptedModel()
    key: Hashable = ("alice", "c1")
    old = runs.start(model, MESSAGES, OPTIONS, key=key, owner="alice")
    model.enqueue("a").end()
    await ended(old)
    t0 = now()
    assert runs.get(old.id) is old and runs.of(key) is None
    new = runs.start(model, MESSAGES, OPTIONS, key=key, owner="alice")  # the same conversation, asked again
    await wait_until(lambda: runs.get(old.id) is None, "the ended run to be forgotten")
    assert now() - t0 >= keep - SLACK
    assert runs.of(key) is new and runs.get(new.id) is new  # forgetting the old one leaves the new one's key
    assert runs.live_keys() == {key}
    new.stop()
    await ended(new)
    await wait_until(lambda: len(runs) == 0, "every ended run to be forgotten")
    assert runs.live_keys() == set()


# -- pacing -------------------------------------------------------------------------------------------
# (Not "together" with at_once=False: begin() takes the first update through a task, i.e. reads
# the live reply a turn late, after "Hi" came too, which the contract of watch() rules out: a
# consumer reads the reply it is given at once.)
@pytest.mark.parametrize("at_once, together", [(True, True), (True, False), (False, False)],
                         ids=["role-and-text-together", "role-chunk-shown-first", "role-chunk-shown-first-later-viewer"])
async def test_the_first_text_after_a_role_only_chunk_is_not_paced_later_updates_are(at_once, together):
    interval = 0.3
    model = ScriptedModel()
    svc = service(model, pacer=Pacer(interval))
    run = svc.start(model, await fitted(svc, model), OPTIONS)
    viewer = Viewer(run, pacer=svc.pacer, at_once=at_once)
    if at_once:
        assert (await viewer.next()).text == ""  # the reply as it is: waiting
    else:
        await viewer.begin()
    if together:
        t0 = now()
        model.enqueue(Delta(), "Hi")
    else:
        model.enqueue(Delta())  # the role-only chunk, shown (still no text) ...
        assert (await viewer.next()).text == ""
        t0 = now()
        model.enqueue("Hi")  # ... then the first text
    first = await viewer.until(lambda s: s.text != "")
    assert first.text == "Hi"
    assert first.at - t0 < interval / 3, f"the first text took {first.at - t0:.3f} s (interval {interval} s)"
    # Later: paced. Three deltas arrive at once after the first text; they come as one update,
    # one interval after the first text was shown.
    model.enqueue(" there", " you", " all")
    paced = await viewer.next()
    assert paced.text == "Hi there you all"
    assert paced.at - first.at >= interval - SLACK
    # The end is not held back an interval.
    t1 = now()
    model.end()
    final = await viewer.next()
    assert (final.status, final.text) == ("done", "Hi there you all") and final.done
    assert final.at - t1 < interval / 3


# -- the per-user limits' settlement: with the save, else on its own ---------------------------------
@pytest.mark.parametrize("saving", ["writes it", "returns False", "raises", "no save"])
async def test_a_replys_settlement_is_written_once_by_the_save_or_else_on_its_own(saving, tmp_path):
    """The final save gets the reply's settlement (``run.settlement``) and may write it with the
    reply (True); otherwise (not saved, failed, no save at all) the limiter writes it alone. Either
    way the tokens count once and the lease goes; its renewal stops as the reply ends, before the
    save (the save here waits for that)."""
    from modules.config import PerUserLimits
    from modules.core.limits import Limiter, Settlement
    from modules.history.store import FILENAME, SQLiteStore
    from tests.test_store import usage_state

    store = SQLiteStore(tmp_path / FILENAME)
    model = ScriptedModel(MODEL_ID)
    svc = service(model)
    svc.use_limits(Limiter(PerUserLimits(concurrent_replies=1), store))
    seen: list[Any] = []

    async def save(run: ReplyRun) -> bool:
        seen.append(run.settlement)
        await wait_until(lambda: not svc._leases, "the lease's renewal to stop")
        if saving == "raises":
            raise OSError("the disk is full")
        if saving == "writes it":
            await asyncio.to_thread(store.settle_usage, run.settlement)  # as save_reply(..., settle=) does
        return saving == "writes it"

    try:
        admission = await svc.admit("alice", model)
        assert usage_state(store)[0] == 1 and svc._leases == set()  # no run yet, no renewal
        run = svc.start(model, await fitted(svc, model), OPTIONS, owner="alice", admission=admission,
                        save=None if saving == "no save" else save)
        assert len(svc._leases) == 1
        model.enqueue("Hello there.").end()
        reply = await ended(run)
        assert reply.counts is not None
        assert usage_state(store) == (0, [(reply.counts.prompt, reply.counts.completion)])
        if saving != "no save":
            [settlement] = seen
            assert isinstance(settlement, Settlement) and settlement.lease_id == admission.lease_id
        assert run.settlement is None  # handed to the save only
        await svc.admit("alice", model)  # one reply at a time: the lease is gone
    finally:
        store.close()
