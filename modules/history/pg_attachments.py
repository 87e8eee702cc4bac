"""The bytes of attached files in PostgreSQL, when the history is there (``history.url``).

:class:`PostgresFiles` is :class:`~modules.history.attachments.AttachmentFiles`'s interface for
what the app uses of it (``put``, ``read``, ``exists``, ``hashes``, ``keep_referenced_by``,
``remove_unreferenced``, ``close``) on the table ``attachment_files`` of the history's database
(``pg_store.ATTACHMENT_FILES``: the bytes as bytea by SHA-256, their size and when they were last
put), so that every app process on every machine reads what any of them kept: a question's
files, a knowledge base's documents. Nothing is written to the data folder. No caller needs a
path on disk: the page serves a file's bytes (``web/files.py``), and documents are read from bytes.

The same rules as the folder: bytes are kept once, whoever puts them; ``put`` of bytes already
kept makes them fresh again, and the collector never removes what was put in the last
``grace_seconds`` (the database's clock, one for every machine), nor what a message or another
keeper (``keep_referenced_by``: the knowledge bases) names. A put and a collection meet in one
row: the collector's ``DELETE ... WHERE touched_at < limit`` is decided on the row as the put
left it (either it sees the put's time and spares it, or the put finds no row and writes it
again). A file's size is bounded before it gets here (``attachments.max_mb``; bytea holds 1 GB).
"""

from __future__ import annotations

import hashlib
import logging

from modules.history.attachments import GRACE_SECONDS, Keepers, is_digest
from modules.history.pg_store import DB_NOW, PostgresStore

log = logging.getLogger(__name__)



class PostgresFiles(Keepers):
    """Attached files' bytes in the table ``attachment_files`` of ``database`` (a
    :class:`PostgresStore`, whose pool it uses and which made the table). Thread-safe."""

    def __init__(self, database: PostgresStore, *, grace_seconds: float = GRACE_SECONDS) -> None:
        if not grace_seconds >= 0:
            raise ValueError(f"grace_seconds must be >= 0, not {grace_seconds}")
        super().__init__()
        self.database = database
        self.grace_seconds = float(grace_seconds)

    def close(self) -> None:
        """Nothing: the pool is the history store's."""

    @staticmethod
    def _digest(sha256: str) -> str:
        if not is_digest(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {str(sha256)[:80]!r}")
        return sha256

    def exists(self, sha256: str) -> bool:
        """True if the bytes of ``sha256`` are kept (False for a name that is no digest)."""
        if not is_digest(sha256):
            return False
        with self.database.connection() as conn:
            return conn.execute("SELECT 1 FROM attachment_files WHERE sha256 = %s", (sha256,)).fetchone() is not None

    def hashes(self) -> set[str]:
        """The digests of every file kept."""
        with self.database.connection() as conn:
            return {row[0] for row in conn.execute("SELECT sha256 FROM attachment_files").fetchall()}

    def put(self, data: bytes) -> str:
        """Keep ``data``; its SHA-256 hex digest. Idempotent: bytes already kept are not sent again,
        only made fresh (the collector spares them for ``grace_seconds``); writers of the same bytes
        at once, in any process, leave one whole row."""
        data = bytes(data)
        sha256 = hashlib.sha256(data).hexdigest()
        with self.database.connection() as conn:
            if conn.execute(f"UPDATE attachment_files SET touched_at = {DB_NOW} WHERE sha256 = %s AND size = %s",
                            (sha256, len(data))).rowcount:
                return sha256
            conn.execute(f"INSERT INTO attachment_files (sha256, data, size, touched_at) VALUES (%s, %s, %s, {DB_NOW}) "
                         "ON CONFLICT (sha256) DO UPDATE SET data = excluded.data, size = excluded.size, "
                         "touched_at = excluded.touched_at", (sha256, data, len(data)))
        return sha256

    def read(self, sha256: str) -> bytes:
        """The bytes of ``sha256``; FileNotFoundError if they are not kept (ValueError: not a digest)."""
        with self.database.connection() as conn:
            row = conn.execute("SELECT data FROM attachment_files WHERE sha256 = %s",
                               (self._digest(sha256),)).fetchone()
        if row is None:
            raise FileNotFoundError(f"no attached file {sha256} in the history database")
        return bytes(row[0])

    def remove_unreferenced(self, referenced: set[str], *, now: float | None = None) -> int:
        """Remove every file whose digest is neither in ``referenced`` nor named by a source given
        to :meth:`keep_referenced_by`, and that was last put more than ``grace_seconds`` before
        ``now`` (default: the database's time); how many went."""
        keep = sorted(self._kept(referenced))
        with self.database.connection() as conn:
            removed = conn.execute(
                "DELETE FROM attachment_files WHERE touched_at < coalesce(%(now)s::double precision, " + DB_NOW + ") - %(grace)s "
                "AND NOT (sha256 = ANY(%(keep)s))", {"now": now, "grace": self.grace_seconds, "keep": keep}).rowcount
        if removed:
            log.info("Removed %d attached file(s) no message refers to any more from %s", removed,
                     self.database.where)
        return removed
