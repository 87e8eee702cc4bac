"""Runs across processes: a reply streaming in another app process, seen and stopped from this one.

A page's run belongs to the process that started it (:class:`~modules.core.runs.ReplyRuns`). When
several processes share one history database, a second device of the same owner may be served by
another process; :class:`RemoteRuns` lets it see the run grow and stop it, through a
:class:`RunBus`:

- the owning process *publishes* its keyed runs: ``begun``, then ``ended`` once the reply's
  final state is saved; and, from the moment a viewer in another process asks (``watch``), ``grew``
  (paced: at most one per ``pace`` seconds, carrying the text added since the last one and where
  it starts; the first one the whole text so far). A run nobody watches elsewhere costs the other
  processes two events, not one per update: each process's work grows with its own streams, not
  with the team's;
- every process *mirrors* the runs of the others as :class:`RemoteRun` objects (the text so far,
  watched like a local run; the first viewer sends ``watch``, and starts from the stored
  checkpoint until the whole text comes); a gap in the text (a notification lost, or one too
  large to carry text) is filled from the store (``RunBus.read``: the last checkpoint);
- Stop on a remote run publishes ``stop``; the owning process stops its local run, which is then
  saved as stopped as usual, and its ``ended`` ends the remote one;
- a process that dies ends its runs through the bus too (``ended``, after the bus has marked its
  replies interrupted in the store).

:class:`RunBus` itself is the single-process bus (SQLite: nothing to share); the PostgreSQL one
(LISTEN/NOTIFY, a heartbeat per process) is ``modules/history/pg_runs.py``. This module never
imports the history layer: the bus is given to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Literal

from modules.core.runs import ReplyRuns
from modules.core.streaming import Pacer, Reply, ReplyRun

log = logging.getLogger(__name__)

RunKey = tuple[str, str, str, str]  # (owner, conversation id, question id, answer id): a page run's key
# Characters of text in one ``grew`` at most: a notification carries up to 8000 bytes (PostgreSQL's),
# and 1000 characters take 6000 at worst in JSON.
PIECE = 1000
Kind = Literal["begun", "grew", "ended", "stop", "live", "watch"]


@dataclass(frozen=True, slots=True)
class RunEvent:
    """What a bus carries. ``begun``/``grew``/``ended``: a run of ``process``; ``grew`` adds ``text``
    at character ``at`` (``text`` None: it grew, read the store). ``stop``: stop the run of ``key``,
    wherever it is. ``live``: the runs live in other processes now (``keys``; sent by the bus when
    it (re)connects: a run not listed has ended). ``watch``: ``process`` has a viewer of the run
    of ``key``: its owner sends ``grew`` from now on, starting with the whole text."""

    kind: Kind
    key: RunKey = ("", "", "", "")
    process: str = ""
    at: int = 0
    text: str | None = None
    keys: tuple[tuple[RunKey, str], ...] = ()  # ``live``: (key, process) pairs


class RunBus:
    """The bus of a single process (nothing to share: every run is local). A bus for several
    processes overrides these; ``open`` gives it ``deliver`` (called from any thread, never
    blocking), ``publish`` never blocks, ``read`` may (the caller runs it off the event loop)."""

    process_id = "local"

    def open(self, deliver: Callable[[RunEvent], None]) -> None:
        """Start delivering the other processes' events to ``deliver``."""

    def publish(self, event: RunEvent) -> None:
        """Send ``event`` to the other processes (queued: returns at once)."""

    def read(self, key: RunKey) -> str | None:
        """The stored text of the answer of ``key`` (its last checkpoint), None if unknown."""
        return None

    def close(self) -> None:
        """Stop listening and publishing; a second call does nothing."""


class RemoteRun:
    """A run of another process, as this one sees it: :attr:`reply` grows with the events, viewers
    :meth:`watch` it like a :class:`ReplyRun`; :meth:`stop` asks its process to stop it. ``done``
    once it ended (the final state is then the store's: the viewer reloads it)."""

    remote = True

    def __init__(self, key: RunKey, process: str, stop: Callable[[], None],
                 follow: Callable[[], None] = lambda: None):
        self.key, self.process, self.id = key, process, "remote:" + key[3]
        self._follow = follow  # (asks the owner for the text as it grows: the first viewer's)
        self._asked = False  # watch sent (the owner then sends grew until the run ends)
        self._synced = asyncio.Event()  # the whole text came (a grew from character 0), or the end
        self.reply = Reply(status="streaming")
        self.reply.first_token_at = self.reply.started_at
        self.done = False
        self.viewers = 0
        self._stop = stop
        self._changed = asyncio.Event()
        self._ended = asyncio.Event()
        self.reading = False  # a read of the store is under way (one at a time)
        self.read_at = 0.0

    def seed(self, stored: Reply | None) -> None:
        """Start from the stored checkpoint ``stored`` when it has more text than arrived so far."""
        if stored is not None:
            self.reply.model = self.reply.model or stored.model
            if len(stored.text) > len(self.reply.text):
                self.reply.text = stored.text
            if len(stored.reasoning) > len(self.reply.reasoning):
                self.reply.reasoning = stored.reasoning

    def grow(self, at: int, text: str) -> bool:
        """Add ``text`` at character ``at``; False when it leaves a gap (the store fills it)."""
        have = len(self.reply.text)
        if at == 0:
            self._synced.set()
        if at > have:
            return False
        if at + len(text) > have:
            self.reply.text = self.reply.text[:at] + text
            self.wake()
        return True

    def end(self) -> None:
        if not self.done:
            self.done = True
            self._ended.set()
            self._synced.set()
            self.wake()

    def wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def follow(self) -> None:
        """Ask the process that runs it for the text as it grows (once; the first time, the whole
        text so far)."""
        if not self._asked and not self.done:
            self._asked = True
            self._follow()

    async def sync(self, timeout: float = 1.0) -> None:
        """:meth:`follow`, then wait (``timeout`` seconds at most) for the whole text so far."""
        self.follow()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._synced.wait()

    def stop(self) -> None:
        """Ask the process that runs it to stop it (its reply is saved there as stopped)."""
        if not self.done:
            self._stop()

    async def wait(self, timeout: float | None = 15.0) -> Reply:
        """The reply once the run ended, or after ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._ended.wait()
        return self.reply

    async def watch(self, *, pacer: Pacer | None = None, heartbeat: float | None = None,
                    at_once: bool = True) -> AsyncIterator[Reply | None]:
        """As :meth:`ReplyRun.watch`: the reply now (unless ``at_once`` is False), then each time it
        grew (at most once per ``pacer.interval()``), the last time once it ended; ``None`` after
        ``heartbeat`` seconds without a change."""
        self.viewers += 1
        self.follow()
        pacer = pacer if pacer is not None else Pacer(0.0)
        try:
            with pacer.streaming():
                changed = self._changed
                if at_once or self.done:
                    yield self.reply
                    if self.done:
                        return
                while True:
                    try:
                        async with asyncio.timeout(heartbeat):
                            await changed.wait()
                    except TimeoutError:
                        if not self.done:
                            self._follow()  # (again: a watch lost on the way is asked for anew)
                        yield None
                        continue
                    changed = self._changed
                    final = self.done
                    yield self.reply
                    if final:
                        return
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pacer.interval()):
                            await self._ended.wait()
        finally:
            self.viewers -= 1


class RemoteRuns:
    """This process's side of the bus: it publishes the keyed runs of ``runs`` (see
    :meth:`share`), stops the local run another process asks to stop, and mirrors the runs live
    in the other processes (:meth:`of`, :meth:`live_keys`). Events are applied on the event loop
    (the first local run or viewer binds it); ``pace``: seconds between two ``grew`` of a run;
    ``read_seconds``: the least time between two reads of the store for one remote run."""

    def __init__(self, runs: ReplyRuns, bus: RunBus | None = None, *, pace: float = 0.2,
                 read_seconds: float = 0.5, keep_seconds: float = 30.0):
        self.runs, self.bus = runs, bus or RunBus()
        self.pace, self.read_seconds, self.keep_seconds = pace, read_seconds, keep_seconds
        self._remote: dict[RunKey, RemoteRun] = {}
        self._shared: dict[RunKey, Callable[[], None]] = {}  # this process's runs: start sending grew
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def connect(self, bus: RunBus) -> None:
        """Use ``bus`` (once, at start-up) and start receiving its events."""
        self.bus = bus
        bus.open(self._deliver)

    def close(self) -> None:
        self.bus.close()

    # -- the loop ---------------------------------------------------------------------------------
    def bind(self) -> None:
        """Apply events on the running loop from now on (called on the loop: a run starts, a page
        looks for runs). Before, with no loop, there are no local runs and no viewers."""
        if self._loop is None:
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
                with self._lock:
                    self._loop = loop

    def _deliver(self, event: RunEvent) -> None:
        """From the bus's thread: the event applied on the loop (or here, when there is none yet)."""
        with self._lock:
            loop = self._loop
            if loop is None:
                self._apply(event)
                return
        with contextlib.suppress(RuntimeError):  # (the loop is closed: the app is stopping)
            loop.call_soon_threadsafe(self._apply, event)

    def _apply(self, event: RunEvent) -> None:
        if event.kind == "stop":
            run = self.runs.of(event.key)
            if run is not None:
                log.info("stopping the reply of conversation %s: asked by another process", event.key[1])
                run.stop()
            return
        if event.kind == "live":
            listed = dict(event.keys)
            for key, remote in list(self._remote.items()):
                if key not in listed:
                    self._end(key, remote)
            for key, process in listed.items():
                if process != self.bus.process_id:
                    self._mirror(key, process, None)
            return
        if event.kind == "watch":  # (a viewer elsewhere of one of this process's runs, if it is one)
            follow = self._shared.get(event.key)
            if follow is not None:
                follow()
            return
        if event.process == self.bus.process_id:
            return  # (its own, echoed)
        if event.kind == "ended":
            remote = self._remote.get(event.key)
            if remote is not None:
                self._end(event.key, remote)
            return
        remote = self._mirror(event.key, event.process, event)
        if event.kind == "grew" and (event.text is None or not remote.grow(event.at, event.text)):
            self._fill(remote)

    def _mirror(self, key: RunKey, process: str, event: RunEvent | None) -> RemoteRun:
        remote = self._remote.get(key)
        if remote is None or remote.done:
            remote = RemoteRun(key, process, lambda: self.bus.publish(RunEvent("stop", key)),
                               lambda: self.bus.publish(RunEvent("watch", key, self.bus.process_id)))
            self._remote[key] = remote
        return remote

    def _end(self, key: RunKey, remote: RemoteRun) -> None:
        remote.end()
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_later(self.keep_seconds, self._forget, key, remote)
        else:
            self._forget(key, remote)

    def _forget(self, key: RunKey, remote: RemoteRun) -> None:
        if self._remote.get(key) is remote:
            del self._remote[key]

    def _fill(self, remote: RemoteRun) -> None:
        """Fill a gap in ``remote``'s text from the store (off the loop; at most one read at a time,
        one per ``read_seconds``: the store's checkpoint is at most a second old anyway)."""
        loop = self._loop
        if loop is None or remote.reading or time.monotonic() - remote.read_at < self.read_seconds:
            return
        remote.reading, remote.read_at = True, time.monotonic()

        async def read() -> None:
            try:
                text = await asyncio.to_thread(self.bus.read, remote.key)
            except Exception:
                log.exception("reading the reply of conversation %s failed", remote.key[1])
                text = None
            finally:
                remote.reading = False
            if text is not None and len(text) > len(remote.reply.text) and not remote.done:
                remote.reply.text = text
                remote.wake()

        loop.create_task(read())

    # -- this process's runs ----------------------------------------------------------------------
    def share(self, run: ReplyRun, key: RunKey) -> None:
        """Publish ``run`` (a page run, of ``key``): begun now, ended once it is finished (its final
        state saved); once another process watches it, grew as it grows (paced), the first time
        with the whole text (and again at each new ``watch``)."""
        self.bind()
        if type(self.bus) is RunBus:  # one process: nobody to tell
            return
        loop = asyncio.get_running_loop()
        self.bus.publish(RunEvent("begun", key, self.bus.process_id))
        sent = 0
        watched = False
        pending: asyncio.TimerHandle | None = None

        def flush() -> None:
            nonlocal sent, pending
            pending = None
            text = run.reply.text
            if watched and not run.done and len(text) != sent:
                at = min(sent, len(text))
                for start in range(at, len(text), PIECE):  # (the whole text, after a watch: in pieces)
                    self.bus.publish(RunEvent("grew", key, self.bus.process_id, at=start,
                                              text=text[start:start + PIECE]))
                sent = len(text)

        def changed() -> None:
            nonlocal pending
            if watched and pending is None and not run.done:
                pending = loop.call_later(self.pace, flush)

        def follow() -> None:  # (on the loop: a viewer in another process)
            nonlocal watched, sent, pending
            watched, sent = True, 0  # the whole text next: that viewer has the checkpoint at most
            if pending is not None:
                pending.cancel()
            pending = None
            flush()

        def ended(_: object) -> None:
            if pending is not None:
                pending.cancel()
            if self._shared.get(key) is follow:
                del self._shared[key]
            self.bus.publish(RunEvent("ended", key, self.bus.process_id))

        self._shared[key] = follow
        run.on_change(changed)
        run.task.add_done_callback(ended)

    # -- the others' runs -------------------------------------------------------------------------
    def of(self, key: RunKey) -> RemoteRun | None:
        """The run of ``key`` live in another process, if any."""
        self.bind()
        remote = self._remote.get(key)
        return remote if remote is not None and not remote.done else None

    def live_keys(self) -> set[RunKey]:
        self.bind()
        return {key for key, remote in self._remote.items() if not remote.done}
