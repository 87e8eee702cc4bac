"""A process that writes big messages into a history store until it is killed.

    python -m tests.fakes.store_writer DATA_DIR
    python -m tests.fakes.store_writer postgresql://...

Opens the store in DATA_DIR with ``open_store`` (or the PostgreSQL store at the URL) and, for rounds 0, 1, 2... saves each round as
the app does: first the question (``save_message``, following the previous answer), then its
answer (``save_reply``, which moves the branch viewed from the question to it). After each
write has returned (committed) it prints ``saved <round> question`` or ``saved <round> answer``
and flushes, so a test reading the pipe knows exactly which writes were acknowledged before it
kills the process. Each text is a few hundred kilobytes, so a kill usually lands mid-write.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from modules.history.records import ConversationMeta, MessageRecord
from modules.history.store import open_store

OWNER = "user:writer"
CONVERSATION_ID = "killed-mid-write"
SIZE = 100_000  # characters of each text; CJK, so three bytes each in UTF-8


def question_id(n: int) -> str:
    return f"q{n}"


def answer_id(n: int) -> str:
    return f"a{n}"


def user_text(n: int) -> str:
    return f"<q{n}>" + "问题" * (SIZE // 2) + f"</q{n}>"


def reply_text(n: int) -> str:
    return f"<a{n}>" + "回答" * (SIZE // 2) + f"</a{n}>"


def main(target: str) -> None:
    if target.startswith("postgresql:"):
        from modules.history.pg_store import PostgresStore

        store, problem = PostgresStore(target), None
    else:
        store, problem = open_store(Path(target))
    if problem is not None:
        sys.exit(f"store_writer: {problem}")
    created = time.time()
    n = 0
    while True:
        meta = ConversationMeta(CONVERSATION_ID, OWNER, "Killed mid-write", "fake", "", {}, created, time.time())
        question = MessageRecord(question_id(n), answer_id(n - 1) if n else None, "user", user_text(n))
        if not store.save_message(meta, question):
            sys.exit(f"store_writer: question {n} was refused")
        print(f"saved {n} question", flush=True)
        answer = MessageRecord(answer_id(n), question.id, "assistant", reply_text(n), finished_at=time.time())
        if not store.save_reply(meta, answer):
            sys.exit(f"store_writer: answer {n} was refused")
        print(f"saved {n} answer", flush=True)
        n += 1


if __name__ == "__main__":
    main(sys.argv[1])
