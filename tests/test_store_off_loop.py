"""History writes never run on the event loop (an fsync'd commit would hold up every stream).

The real app on a real port, driven through gradio_client; its store is wrapped to record,
for each write, whether it ran in a thread with a running event loop."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from gradio_client import Client

from modules.config import build_config
from tests.conftest import fake_model_entry, free_port
from tests.test_app_history import Session

WRITES = {"save_message", "save_reply", "set_leaf", "delete_messages", "save_meta", "rename", "delete", "import_record"}


class RecordingStore:
    def __init__(self, store: Any):
        self.store = store
        self.writes: list[tuple[str, bool]] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.store, name)
        if name not in WRITES:
            return attribute

        def write(*args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop = True
            except RuntimeError:
                on_loop = False
            self.writes.append((name, on_loop))
            return attribute(*args, **kwargs)

        return write


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_every_history_write_runs_off_the_event_loop(fake_openai, tmp_path, backend, request):
    from modules.app import ChatApp
    from modules.history.backends import open_history

    history = {"data_dir": str(tmp_path), "mode": "shared"}
    if backend == "postgresql":
        history["url"] = request.getfixturevalue("pg_url")
    config = build_config({"models": [fake_model_entry(fake_openai, "fake")], "server": {"port": free_port()},
                           "history": history}, env={})
    store, _ = open_history(config.history, tmp_path)
    recording = RecordingStore(store)
    app = ChatApp(config, store=recording)
    app.build()
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        page = Session(client, model="fake")
        page.say("First question")
        page.rename("A new name")
        exported = tmp_path / "plain.json"
        exported.write_text(json.dumps([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]))
        page.import_file(exported)
        page.delete()
        client.close()
    finally:
        app.demo.close()
        store.close()
    names = {name for name, _ in recording.writes}
    assert {"save_message", "save_reply", "rename", "import_record", "delete"} <= names, recording.writes
    assert not [w for w in recording.writes if w[1]], f"writes on the event loop: {recording.writes}"
