"""The fake OpenAI server, counting its streams: how many are open, finished, and aborted
(the client closed the connection before the end). For tests of many clients at once."""

from __future__ import annotations

import threading
from typing import Any

from tests.fakes.openai_server import FakeOpenAIServer, Script


class CountingOpenAIServer(FakeOpenAIServer):
    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._lock = threading.Lock()
        self.started = self.open = self.aborted = self.finished = 0

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"started": self.started, "open": self.open, "aborted": self.aborted, "finished": self.finished}

    def reset_counts(self) -> None:
        with self._lock:
            self.started = self.open = self.aborted = self.finished = 0

    async def _events(self, script: Script, model: str, include_usage: bool):
        with self._lock:
            self.started += 1
            self.open += 1
        ended = False
        try:
            async for piece in super()._events(script, model, include_usage):
                yield piece
            ended = True
        finally:
            with self._lock:
                self.open -= 1
                if ended:
                    self.finished += 1
                else:
                    self.aborted += 1
