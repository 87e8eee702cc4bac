"""A process that writes big turns into a history store until it is killed.

    python -m tests.fakes.store_writer DATA_DIR

Opens the store in DATA_DIR with ``open_store`` and, for positions 0, 1, 2...
saves each turn twice, as the app does: first the user's message ("pending"),
then the finished reply. After each ``save_turn`` has returned (committed) it
prints ``saved <position> <status>`` and flushes, so a test reading the pipe
knows exactly which writes were acknowledged before it kills the process.
Each text is a few hundred kilobytes, so a kill usually lands mid-write.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from modules.history.records import ConversationMeta, TurnRecord
from modules.history.store import open_store

OWNER = "user:writer"
CONVERSATION_ID = "killed-mid-write"
SIZE = 100_000  # characters of each text; CJK, so three bytes each in UTF-8


def user_text(position: int) -> str:
    return f"<q{position}>" + "问题" * (SIZE // 2) + f"</q{position}>"


def reply_text(position: int) -> str:
    return f"<a{position}>" + "回答" * (SIZE // 2) + f"</a{position}>"


def main(data_dir: Path) -> None:
    store, problem = open_store(data_dir)
    if problem is not None:
        sys.exit(f"store_writer: {problem}")
    created = time.time()
    position = 0
    while True:
        meta = ConversationMeta(CONVERSATION_ID, OWNER, "Killed mid-write", "fake", "", {},
                                created, time.time())
        turn = TurnRecord(user=user_text(position), created_at=time.time())
        store.save_turn(meta, position, turn)
        print(f"saved {position} pending", flush=True)
        turn.reply, turn.status, turn.finished_at = reply_text(position), "done", time.time()
        store.save_turn(meta, position, turn)
        print(f"saved {position} done", flush=True)
        position += 1


if __name__ == "__main__":
    main(Path(sys.argv[1]))
