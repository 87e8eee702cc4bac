"""The history's durability: checkpoints, a clean close, damaged -wal files, backups, stopping the app.

What a user sees: ``history.sqlite3`` alone (what they copy to back it up) must
hold every conversation a few seconds after the last write and once the app has
stopped; a damaged ``-wal`` must be moved aside and reported, not silently
dropped; ``python ChuanhuStyleChat.py backup PATH`` must copy everything, also
while the app writes. Every test uses real files and real SQLite; the app and
the backup command run as real processes. Waits are bounded polls on conditions.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from modules.history import store as store_module
from modules.i18n import Translator
from modules.history.records import ConversationMeta, ConversationRecord, MessageRecord
from modules.history.store import FILENAME, BackupError, SQLiteStore, StoreProblem, backup, backup_path, open_store
from tests.conftest import fake_model_entry, free_port
from tests.test_app_api import wait_until

ROOT = Path(__file__).resolve().parent.parent
OWNER = "local"
WAL, SHM = FILENAME + "-wal", FILENAME + "-shm"
TEXT = "一段相当长的历史记录, with some ASCII too. " * 40  # ~2 KB an answer: a few pages of log per write


# -- helpers ------------------------------------------------------------------------------------
def meta(conversation_id: str, title: str = "") -> ConversationMeta:
    return ConversationMeta(conversation_id, OWNER, title or conversation_id, "fake", "", {}, 1.0, 2.0)


def round_of(n: int, user: str) -> list[MessageRecord]:
    """Round ``n`` of a conversation: a question (after the answer of round n - 1) and its answer."""
    return [MessageRecord(f"q{n}", f"a{n - 1}" if n else None, "user", user, created_at=1.0),
            MessageRecord(f"a{n}", f"q{n}", "assistant", TEXT, created_at=1.0, finished_at=2.0)]


def save_round(store: SQLiteStore, conversation_id: str, n: int, user: str) -> None:
    """As the app saves a round: the question, then the reply (two writes)."""
    question, answer = round_of(n, user)
    assert store.save_message(meta(conversation_id), question)
    assert store.save_reply(meta(conversation_id), answer)


def one_write(conversation_id: str, user: str) -> ConversationRecord:
    """A conversation of one round, to import: one write."""
    messages = round_of(0, user)
    return ConversationRecord(**vars(meta(conversation_id)), messages=messages, leaf=messages[-1].id)


def write(store: SQLiteStore, conversations: int, turns: int = 3, prefix: str = "c") -> dict[str, list[str]]:
    """Save ``conversations`` x ``turns`` rounds; what a reader should find: {id: [user texts]}."""
    expected = {}
    for c in range(conversations):
        cid = f"{prefix}{c}"
        expected[cid] = [f"{cid}/{t} {TEXT}" for t in range(turns)]
        for t, user in enumerate(expected[cid]):
            save_round(store, cid, t, user)
    return expected


def contents(path: Path, owner: str = OWNER) -> dict[str, list[str]]:
    """Every conversation of ``owner`` in the history file ``path`` (opened as it is, with its -wal
    if it has one): {id: [user texts]}."""
    s = SQLiteStore(path, checkpoint_seconds=3600)
    try:
        return {c.id: [t.user for t in s.load(owner, c.id).turns] for c in s.list(owner)}
    finally:
        s.close()


_copies = iter(range(10**6))


def main_file_alone(path: Path, workdir: Path, store: SQLiteStore | None = None) -> dict[str, list[str]]:
    """What a user gets who copies ``history.sqlite3`` alone (no -wal, no -shm) to another folder and
    opens it. With ``store``, copied under its lock: never in the middle of one of its checkpoints."""
    folder = workdir / f"copy-{next(_copies)}"
    folder.mkdir()
    if store is None:
        shutil.copyfile(path, folder / FILENAME)
    else:
        with store._lock:
            shutil.copyfile(path, folder / FILENAME)
    assert sorted(p.name for p in folder.iterdir()) == [FILENAME]
    return contents(folder / FILENAME)


def wal_is_empty(path: Path) -> bool:
    wal = Path(str(path) + "-wal")
    return not wal.exists() or wal.stat().st_size == 0


def checkpointers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("history-checkpoint:")]


# -- checkpoints and close -------------------------------------------------------------------------
def test_after_close_the_main_file_alone_holds_every_conversation(tmp_path: Path) -> None:
    path = tmp_path / "data" / FILENAME
    path.parent.mkdir()
    before = set(checkpointers())
    s = SQLiteStore(path, checkpoint_seconds=3600)  # no scheduled checkpoint in this test: only close()
    [thread] = set(checkpointers()) - before
    # Another connection (a second process, a backup tool) stays open: SQLite's own checkpoint when
    # the last connection closes cannot happen, so only the store's close() can do it.
    other = sqlite3.connect(path)
    other.execute("SELECT count(*) FROM conversations").fetchall()
    expected = write(s, conversations=20)
    assert not wal_is_empty(path)
    assert main_file_alone(path, tmp_path) == {}  # it is all in the log so far

    s.close()
    s.close()  # a second close is harmless
    try:
        assert wal_is_empty(path)
        assert main_file_alone(path, tmp_path) == expected
        thread.join(timeout=5)
        assert not thread.is_alive()  # the checkpointer stopped with the store
        with pytest.raises(sqlite3.ProgrammingError):
            s.list(OWNER)
    finally:
        other.close()
    assert contents(path) == expected


def test_the_main_file_alone_holds_a_write_within_checkpoint_seconds_with_no_further_write(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    seconds = 1.0
    s = SQLiteStore(path, checkpoint_seconds=seconds)
    opened = time.monotonic()
    try:
        save_round(s, "only", 0, "the last write before a long pause")
        written = time.monotonic()
        early = main_file_alone(path, tmp_path, s)
        if time.monotonic() - opened < 0.8 * seconds:  # surely before the checkpoint was due
            assert early == {}, "the write itself should not have checkpointed yet"
        found = wait_until(lambda: main_file_alone(path, tmp_path, s), "the write to reach the main file",
                           timeout=10 * seconds)
        took = time.monotonic() - written
        assert found == {"only": ["the last write before a long pause"]}
        assert took < 5 * seconds, f"reached the main file only after {took:.2f} s"
        # a second pause, after more writes: checkpointed again, with no close
        expected = write(s, conversations=3)
        wait_until(lambda: main_file_alone(path, tmp_path, s) == {"only": found["only"], **expected},
                   "the later writes to reach the main file", timeout=10 * seconds)
    finally:
        s.close()


class WithoutCheckpointer(SQLiteStore):
    """The store with its background checkpointer doing nothing: only writes checkpoint."""

    @staticmethod
    def _checkpoint_loop(*args: object) -> None:
        return


def test_a_write_checkpoints_when_the_last_checkpoint_is_old_enough(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    s = WithoutCheckpointer(path, checkpoint_seconds=0)  # every write finds the last checkpoint old enough
    try:
        for i in range(3):
            save_round(s, f"c{i}", 0, f"question {i}")
            assert main_file_alone(path, tmp_path, s) == {f"c{j}": [f"question {j}"] for j in range(i + 1)}
    finally:
        s.close()


def test_checkpoints_while_many_threads_write_and_read(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    s = SQLiteStore(path, checkpoint_seconds=0)  # a checkpoint after every write, and the thread racing them

    def work(worker: int) -> None:
        for position in range(15):
            save_round(s, f"w{worker}", position, f"{worker}/{position}")
            s.list(OWNER, query=f"{worker}/")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    expected = {f"w{w}": [f"{w}/{p}" for p in range(15)] for w in range(8)}
    assert main_file_alone(path, tmp_path, s) == expected
    s.close()
    assert wal_is_empty(path)


def test_a_store_dropped_without_close_is_still_collected_and_its_checkpointer_ends(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    before = set(checkpointers())
    s = SQLiteStore(path, checkpoint_seconds=0.5)
    save_round(s, "c1", 0, "dropped")
    [thread] = set(checkpointers()) - before
    ref = weakref.ref(s)
    del s
    wait_until(lambda: gc.collect() is not None and ref() is None, "the store to be collected")
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert wal_is_empty(path)  # its connection was closed, and SQLite checkpointed then
    assert contents(path) == {"c1": ["dropped"]}


def test_checkpoint_seconds_must_not_be_negative(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SQLiteStore(tmp_path / FILENAME, checkpoint_seconds=-1)
    assert not (tmp_path / FILENAME).exists()


# -- damaged write-ahead logs ---------------------------------------------------------------------
@pytest.fixture
def crashed(tmp_path: Path) -> Path:
    """A history as a crash leaves it: the main file holds conversation "old"; the -wal alone holds
    "new1" and then "new2" (two transactions), and a -shm lies beside them. The path of the main file."""
    live = tmp_path / "live"
    live.mkdir()
    s = SQLiteStore(live / FILENAME)
    s.import_record(one_write("old", "saved long ago"))
    s.close()  # checkpointed: "old" is in the main file
    s = SQLiteStore(live / FILENAME, checkpoint_seconds=3600)
    s.import_record(one_write("new1", "saved a second ago"))
    s.import_record(one_write("new2", "saved just now"))
    folder = tmp_path / "crashed"
    folder.mkdir()
    with s._lock:  # the files as they are on disk while the app runs, i.e. when it is killed
        for name in (FILENAME, WAL, SHM):
            shutil.copyfile(live / name, folder / name)
    s.close()
    assert (folder / WAL).stat().st_size > 32 + 24 + 4096
    return folder / FILENAME


ALL = {"old": ["saved long ago"], "new1": ["saved a second ago"], "new2": ["saved just now"]}


def page_size(wal: bytes) -> int:
    return struct.unpack(">I", wal[8:12])[0]


def test_a_crashed_history_opens_whole_and_reports_nothing(crashed: Path) -> None:
    s, problem = open_store(crashed.parent)
    s.close()
    assert problem is None
    assert contents(crashed) == ALL


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x5A]) + data[offset + 1:]


@pytest.mark.parametrize("damage, reason", [
    (lambda wal: b"these are not the bytes of a write-ahead log!\x00\xff" * 4 + wal[200:], "not a SQLite write-ahead log"),
    (lambda wal: wal[:10], "shorter than a write-ahead log header"),
    (lambda wal: wal[:4] + struct.pack(">I", 3007001) + wal[8:], "unknown write-ahead log format"),
    (lambda wal: wal[:8] + struct.pack(">I", 3000) + wal[12:], "invalid page size"),
    (lambda wal: flip(wal, 17), "checksum of its header"),  # a byte of the header's salt
    (lambda wal: flip(wal, 32 + 24 + 100), "checksum of its first frame"),  # a byte of the first page
    (lambda wal: flip(wal, 32 + 24 + page_size(wal) - 1), "checksum of its first frame"),  # its last byte
    (lambda wal: flip(wal, 32 + 5), "checksum of its first frame"),  # the frame header's commit size
    (lambda wal: flip(wal, 32 + 9), "salts differ"),  # the frame header's salt
], ids=["garbage header", "cut inside the header", "unknown version", "bad page size", "header checksum",
        "flipped byte in the first page", "last byte of the first page", "frame header", "frame salt"])
def test_a_damaged_wal_is_moved_aside_and_reported(crashed: Path, damage: Callable[[bytes], bytes],
                                                   reason: str) -> None:
    folder = crashed.parent
    damaged = damage((folder / WAL).read_bytes())
    (folder / WAL).write_bytes(damaged)
    shm = (folder / SHM).read_bytes()
    main = crashed.read_bytes()

    s, problem = open_store(folder)
    try:
        assert problem is not None and problem.kind == "wal_moved", problem
        assert reason in problem.reason
        assert problem.path == folder / WAL
        assert problem.moved_to is not None and problem.moved_to.parent == folder
        assert problem.moved_to.name.startswith(WAL + ".corrupt-")
        assert problem.moved_to.read_bytes() == damaged  # moved, untouched
        stamp = problem.moved_to.name.removeprefix(WAL)
        assert (folder / (SHM + stamp)).read_bytes() == shm
        assert str(problem.path) in str(problem) and str(problem.moved_to) in str(problem)
        # the main file was opened as it was: what it holds is there, what only the log held is not
        assert {c.id for c in s.list(OWNER)} == {"old"}
        save_round(s, "after", 0, "works")
    finally:
        s.close()
    assert crashed.read_bytes() != main  # written to since, normally
    again, problem = open_store(folder)
    again.close()
    assert problem is None  # reported once: the moved log is left alone
    assert set(contents(crashed)) == {"old", "after"}
    assert sorted(p.name for p in folder.iterdir()) == sorted([FILENAME, WAL + stamp, SHM + stamp])


def test_a_wal_cut_in_its_last_frame_is_a_crash_not_damage(crashed: Path) -> None:
    wal = (crashed.parent / WAL).read_bytes()
    (crashed.parent / WAL).write_bytes(wal[:len(wal) - page_size(wal) // 2])  # the last write, cut mid-frame

    s, problem = open_store(crashed.parent)
    s.close()
    assert problem is None
    found = contents(crashed)
    assert found["old"] == ALL["old"] and found["new1"] == ALL["new1"]
    assert "new2" not in found  # its commit frame was the one cut: as if it never happened


def test_a_wal_with_no_whole_frame_is_not_reported(crashed: Path) -> None:
    wal = (crashed.parent / WAL).read_bytes()
    (crashed.parent / WAL).write_bytes(wal[:32 + 24 + 100])

    s, problem = open_store(crashed.parent)
    s.close()
    assert problem is None
    assert contents(crashed) == {"old": ALL["old"]}


HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
assert conn.execute("SELECT count(*) FROM conversations").fetchall() == [(3,)]  # it read the log
print("open", flush=True)
sys.stdin.readline()
conn.close()
"""


def test_a_log_another_process_has_open_is_never_moved(crashed: Path) -> None:
    """A second app started on the same folder must not take the log of a running one, whatever it reads
    there (it may be a write in progress): only a log nobody has open is judged damaged."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(crashed)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "open\n"
        wal = (crashed.parent / WAL).read_bytes()
        (crashed.parent / WAL).write_bytes(b"\x00" * 32 + wal[32:])  # looks damaged to a newcomer

        s, problem = open_store(crashed.parent)
        try:
            assert problem is None
            assert sorted(p.name for p in crashed.parent.iterdir()) == sorted([FILENAME, WAL, SHM])
            assert {c.id for c in s.list(OWNER)} == set(ALL)  # read through the holder's index
        finally:
            s.close()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert contents(crashed) == ALL


def to_big_endian(wal: bytes) -> bytes:
    """The same log with big-endian checksums (magic 0x377f0683), as a big-endian machine writes it."""
    size = page_size(wal)
    header = struct.pack(">I", 0x377F0683) + wal[4:24]
    s0, s1 = store_module._wal_checksum(header, big_endian=True)
    out = [header, struct.pack(">2I", s0, s1)]
    for offset in range(32, len(wal) - (len(wal) - 32) % (24 + size), 24 + size):
        frame = wal[offset:offset + 24 + size]
        if frame[8:16] != wal[16:24]:
            break  # an old frame of a previous cycle of the log: not part of it
        s0, s1 = store_module._wal_checksum(frame[:8] + frame[24:], True, s0, s1)
        out += [frame[:16], struct.pack(">2I", s0, s1), frame[24:]]
    return b"".join(out)


def test_a_big_endian_wal_is_checked_with_big_endian_checksums(crashed: Path) -> None:
    folder = crashed.parent
    wal = (folder / WAL).read_bytes()
    assert struct.unpack(">I", wal[:4])[0] == 0x377F0682  # SQLite writes little-endian checksums here
    (folder / WAL).write_bytes(to_big_endian(wal))
    (folder / SHM).unlink()  # the index of the old log: SQLite rebuilds it from the new one

    s, problem = open_store(folder)
    s.close()
    assert problem is None
    assert contents(crashed) == ALL  # SQLite itself read the converted log: the conversion is right

    (folder / WAL).write_bytes(flip(to_big_endian(wal), 32 + 24 + 100))
    s, problem = open_store(folder)
    s.close()
    assert problem is not None and problem.kind == "wal_moved" and "first frame" in problem.reason


@pytest.mark.parametrize("lang", ["en_US", "zh_CN", "zh_TW", "ja_JP"])
def test_the_page_has_a_sentence_for_a_moved_wal_in_every_language(lang: str, tmp_path: Path) -> None:
    problem = StoreProblem("wal_moved", tmp_path / WAL, tmp_path / (WAL + ".corrupt-20240501-120000"),
                           "the checksum of its first frame is wrong")
    text = Translator().text(lang, "history.wal_moved", path=problem.path, moved_to=problem.moved_to,
                             reason=problem.reason)
    assert str(problem.path) in text and str(problem.moved_to) in text and problem.reason in text
    assert text != "history.wal_moved"


# -- backups ----------------------------------------------------------------------------------------
def test_a_backup_holds_every_conversation_even_with_the_log_unchecked_and_a_writer_busy(tmp_path: Path) -> None:
    path = tmp_path / "data" / FILENAME
    path.parent.mkdir()
    s = SQLiteStore(path, checkpoint_seconds=3600)
    expected = write(s, conversations=12)
    assert main_file_alone(path, tmp_path) == {}  # everything is still in the log only
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another connection in the middle of a write
    writer.execute("INSERT INTO conversations (id, owner, created_at, updated_at) VALUES ('open', ?, 1, 1)",
                   (OWNER,))
    target = tmp_path / "backups" / "history-copy.sqlite3"
    target.parent.mkdir()
    try:
        assert backup(path, target) == 12
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    save_round(s, "later", 0, "after the backup")  # the store goes on working
    s.close()

    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # one file, no temporary left
    with closing(sqlite3.connect(target)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # needs no -wal
        assert conn.execute("PRAGMA user_version").fetchone() == (store_module.SCHEMA_VERSION,)
    alone = tmp_path / "restored"
    alone.mkdir()
    shutil.copyfile(target, alone / FILENAME)
    assert contents(alone / FILENAME) == expected  # the uncommitted "open" is not in it, "later" neither


def test_a_backup_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    s = SQLiteStore(path)
    write(s, conversations=2)
    target = tmp_path / "mine.sqlite3"
    target.write_bytes(b"something precious")
    with pytest.raises(BackupError, match="already exists"):
        backup(path, target)
    assert target.read_bytes() == b"something precious"
    write(s, conversations=3)
    assert backup(path, target, force=True) == 3
    s.close()
    assert set(contents(target)) == {"c0", "c1", "c2"}


def test_a_backup_says_why_it_cannot_be_made(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="no history file"):
        backup(tmp_path / FILENAME, tmp_path / "out.sqlite3")
    (tmp_path / FILENAME).write_bytes(b"not a database at all" * 50)
    with pytest.raises(BackupError, match="not a history file"):
        backup(tmp_path / FILENAME, tmp_path / "out.sqlite3")
    (tmp_path / FILENAME).unlink()
    with closing(sqlite3.connect(tmp_path / FILENAME)) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.commit()
    with pytest.raises(BackupError, match="not a history file"):
        backup(tmp_path / FILENAME, tmp_path / "out.sqlite3")
    (tmp_path / FILENAME).unlink()
    SQLiteStore(tmp_path / FILENAME).close()
    with pytest.raises(BackupError, match="cannot write in"):
        backup(tmp_path / FILENAME, tmp_path / "no such folder" / "out.sqlite3")
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]  # nothing half-written left behind


def test_backup_path_names_a_file_in_a_folder(tmp_path: Path) -> None:
    from datetime import datetime

    assert backup_path(tmp_path, datetime(2024, 5, 1, 12, 3, 4)) == tmp_path / "history-20240501-120304.sqlite3"
    assert backup_path(tmp_path / "x.sqlite3") == tmp_path / "x.sqlite3"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "CHUANHU_DATA_DIR")}
    return {**env, "GRADIO_ANALYTICS_ENABLED": "False", **extra}


def run_backup(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "ChuanhuStyleChat.py"), "backup", *args], cwd=cwd,
                          env=cli_env(**env), capture_output=True, text=True, timeout=60)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_the_backup_command(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "my.yaml"
    config.write_text(yaml.safe_dump({"history": {"data_dir": str(data)}}), encoding="utf-8")
    s = SQLiteStore(data / FILENAME, checkpoint_seconds=3600)  # the app running: everything in the log
    expected = write(s, conversations=3)
    try:
        target = tmp_path / "backup.sqlite3"
        done = run_backup(str(target), "--config", str(config), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        line = one_line(done.stdout)
        assert str(target) in line and "3 conversations" in line and str(data / FILENAME) in line
        assert contents(target) == expected

        again = run_backup(str(target), "--config", str(config), cwd=tmp_path)
        assert again.returncode == 2
        assert "already exists" in one_line(again.stderr) and "Traceback" not in again.stderr
        assert again.stdout == ""
        write(s, conversations=4)
        forced = run_backup(str(target), "--config", str(config), "--force", cwd=tmp_path)
        assert forced.returncode == 0, forced.stderr
        assert "4 conversations" in one_line(forced.stdout)

        folder = tmp_path / "backups"
        folder.mkdir()
        into = run_backup(str(folder), "--config", str(config), cwd=tmp_path)
        assert into.returncode == 0, into.stderr
        [made] = folder.iterdir()
        assert made.name.startswith("history-") and made.suffix == ".sqlite3" and len(made.name) == 31
        assert str(made) in one_line(into.stdout)
        assert len(contents(made)) == 4
    finally:
        s.close()

    # CHUANHU_DATA_DIR overrides the config, as for the app; the default config is ./config.yaml
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = run_backup("from-env.sqlite3", cwd=elsewhere, CHUANHU_DATA_DIR=str(data))
    assert relative.returncode == 0, relative.stderr
    assert len(contents(elsewhere / "from-env.sqlite3")) == 4

    for args, env, message in [
        (["x.sqlite3"], {"CHUANHU_DATA_DIR": str(tmp_path / "empty")}, "no history file"),
        ([str(tmp_path / "missing" / "x.sqlite3"), "--config", str(config)], {}, "cannot write in"),
        (["x.sqlite3", "--config", str(tmp_path / "nope.yaml")], {}, "invalid configuration"),
    ]:
        failed = run_backup(*args, cwd=elsewhere, **env)
        assert failed.returncode == 2, failed.stderr
        assert message in one_line(failed.stderr) and "Traceback" not in failed.stderr
    usage = run_backup(cwd=elsewhere)
    assert usage.returncode == 2 and "PATH" in usage.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == ["from-env.sqlite3"]


# -- the real app, stopped by a signal -----------------------------------------------------------------
@pytest.fixture
def app_process(tmp_path: Path, fake_openai: Any) -> Iterator[Callable[[], tuple[subprocess.Popen[bytes], str]]]:
    """``start() -> (process, url)``: ``python ChuanhuStyleChat.py`` on a free port, its history in
    ``tmp_path / "data"``, answering with the fake OpenAI server; killed at the end if still running."""
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({
            "models": [fake_model_entry(fake_openai, "fake")],
            "history": {"data_dir": str(tmp_path / "data"), "mode": "shared"},
            "server": {"port": port},
        }), encoding="utf-8")
        log = open(tmp_path / "app.log", "wb")
        proc = subprocess.Popen([sys.executable, str(ROOT / "ChuanhuStyleChat.py"), "--config", str(config)],
                                cwd=tmp_path, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        log.close()
        processes.append(proc)
        url = f"http://127.0.0.1:{port}/"

        def answers() -> bool:
            assert proc.poll() is None, f"the app exited early:\n{(tmp_path / 'app.log').read_text()}"
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, "the app to answer HTTP", timeout=60)
        return proc, url

    yield start
    for proc in processes:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_app_stopped_by_a_signal_leaves_every_conversation_in_the_main_file(
        app_process: Callable[[], tuple[subprocess.Popen[bytes], str]], fake_openai: Any, tmp_path: Path,
        signum: signal.Signals) -> None:
    from gradio_client import Client

    from tests.test_app_history import Session

    proc, url = app_process()
    path = tmp_path / "data" / FILENAME
    client = Client(url, verbose=False)
    try:
        fake_openai.enqueue("Kept after the signal.")
        reply = Session(client, model="fake").say("will this survive a stop?")
        assert "Kept after the signal." in reply
    finally:
        client.close()
    # while it runs, the backup command copies what it has (the page's conversation included)
    during = run_backup(str(tmp_path / "during.sqlite3"), cwd=tmp_path, CHUANHU_DATA_DIR=str(path.parent))
    assert during.returncode == 0, during.stderr
    assert "1 conversation," in one_line(during.stdout)

    proc.send_signal(signum)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the app did not exit after {signum.name}:\n{(tmp_path / 'app.log').read_text()}")
    log = (tmp_path / "app.log").read_text()
    assert code == 0, log
    assert "Traceback" not in log, log
    assert wal_is_empty(path), log
    folder = tmp_path / "alone"  # history.sqlite3 alone, as a user copies it
    folder.mkdir()
    shutil.copyfile(path, folder / FILENAME)
    with closing(sqlite3.connect(folder / FILENAME)) as conn:
        [owner] = {o for (o,) in conn.execute("SELECT owner FROM conversations")}
    s = SQLiteStore(folder / FILENAME)
    try:
        [summary] = s.list(owner)
        found = [(t.user, t.reply, t.status) for t in s.load(owner, summary.id).turns]
    finally:
        s.close()
    assert found == [("will this survive a stop?", "Kept after the signal.", "done")]
    assert len(contents(tmp_path / "during.sqlite3", owner)) == 1


def test_a_crash_mid_reply_loses_at_most_a_second_and_the_reply_says_the_app_stopped(
        app_process: Callable[[], tuple[subprocess.Popen[bytes], str]], fake_openai: Any, tmp_path: Path) -> None:
    """kill -9 while a reply streams; after a restart the reply is there as far as it had come
    (checkpointed every second), marked "the app stopped before this reply ended", with counts."""
    from gradio_client import Client

    from tests.test_app_history import NEUTRAL, Session, message_text

    tokens = [f" w{i}" for i in range(400)]
    proc, url = app_process()
    path = tmp_path / "data" / FILENAME
    client = Client(url, verbose=False)
    fake_openai.enqueue(*tokens, delay=0.05)  # 20 s: the crash comes long before the end
    page = Session(client, model="fake")
    page.add("Tell me a long story")
    client.submit("fake", page.system_prompt, *NEUTRAL, api_name="/respond")

    def checkpointed() -> str:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT content FROM messages WHERE role = 'assistant' AND status = 'interrupted'"
                               ).fetchone()
        return row[0] if row and len(row[0]) > 20 else ""

    wait_until(checkpointed, "a checkpoint of the streaming reply", timeout=30)
    proc.kill()  # SIGKILL: no finally, no shutdown, no last save
    proc.wait()
    assert not fake_openai.completed.is_set()
    client.close()
    _, url = app_process()  # the same data folder
    client = Client(url, verbose=False)
    try:
        page = Session(client, model="fake")
        [(_, conversation_id)] = page.search()
        chatbot = page.open(conversation_id)[0]
    finally:
        client.close()
    shown = message_text(chatbot[-1])
    streamed = "".join(tokens)
    partial = shown.split("\n\n")[0]
    assert len(partial) > 20 and streamed.lstrip().startswith(partial.strip()), shown  # the text so far
    assert "The app stopped before this reply ended." in shown
    s = SQLiteStore(path)
    try:
        [summary] = s.list("local")
        [turn] = s.load("local", summary.id).turns
    finally:
        s.close()
    assert turn.status == "interrupted" and turn.completion_tokens and turn.prompt_tokens
