"""The bytes of attached files, kept once each by content hash in the data folder.

A question's :class:`~modules.history.records.Attachment` names its file by the SHA-256 of its
bytes; :class:`AttachmentFiles` keeps those bytes under ``<data_dir>/attachments/<sha256[:2]>/<sha256>``.
The same bytes attached twice, by one owner or by two, are one file: who may see it is the store's
question (``HistoryStore.owns_attachment``: some message of the owner's references it), never the
file's.

A file is written under a temporary name beside its place, synced, then renamed into place, so a
reader never sees half a file and two writers of the same bytes never harm each other. Files no
message references any more are removed by :func:`collect` (after a conversation or messages are
deleted), except those written in the last ``grace_seconds``: a file is put before the message that
names it is saved, and a save in progress must not lose its file. ``put`` of bytes already kept
makes their file fresh again, so the app puts a question's files again when it saves it. Other
keepers of files (the knowledge bases' documents) are registered once with
:meth:`AttachmentFiles.keep_referenced_by`; the collector keeps what any of them names too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

FOLDER = "attachments"  # in the data folder
GRACE_SECONDS = 600.0  # a file this fresh is never collected: attached (or imported), its message not yet saved
IMAGE_MIMES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})
# Documents: any text/<subtype>, and these (what a document reader may turn into text).
DOCUMENT_MIMES = frozenset({
    "application/pdf", "application/json", "application/xml", "application/yaml", "application/x-yaml",
    "application/toml", "application/rtf", "application/x-tex", "application/javascript", "application/sql",
    "application/epub+zip", "application/vnd.oasis.opendocument.text",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/msword", "application/vnd.ms-excel", "application/vnd.ms-powerpoint",
})
_DIGEST = re.compile(r"[0-9a-f]{64}")
_TEXT_MIME = re.compile(r"text/[a-z0-9][a-z0-9.+-]{0,100}")
_TEMPORARY = re.compile(r"\.[0-9a-f]{64}\.[A-Za-z0-9_]+\.tmp")  # put()'s, before the rename


def is_digest(value: object) -> bool:
    """True for a SHA-256 hex digest as attachments are named: 64 lowercase hex digits, nothing else."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def known_mime(kind: str, mime: str) -> bool:
    """True if ``mime`` is a type of file history keeps as ``kind`` ("image" or "document")."""
    if kind == "image":
        return mime in IMAGE_MIMES
    return kind == "document" and (mime in DOCUMENT_MIMES or _TEXT_MIME.fullmatch(mime) is not None)


class _References(Protocol):
    def referenced_attachments(self) -> set[str]: ...


class Keepers:
    """The other keepers of files a collector asks (both stores of bytes: this folder, and the
    table of ``pg_attachments.PostgresFiles``)."""

    def __init__(self) -> None:
        # (Also orders a put() of bytes already kept against the collector's look at them.)
        self._lock = threading.Lock()
        self._referencers: list[_References] = []

    def keep_referenced_by(self, source: _References) -> None:
        """From now on the collector also keeps every file ``source.referenced_attachments()``
        names (asked at each collection; an error there stops it, removing nothing). Registered
        once at wiring time; the same source again changes nothing."""
        with self._lock:
            if not any(known is source for known in self._referencers):
                self._referencers.append(source)

    def _kept(self, referenced: set[str]) -> set[str]:
        """``referenced`` and every digest a registered source names (asked now)."""
        keep = set(referenced)
        with self._lock:
            sources = list(self._referencers)
        for source in sources:
            keep |= source.referenced_attachments()
        return keep


class AttachmentFiles(Keepers):
    """The attachments folder: each file's bytes once, named by their SHA-256. Safe from any thread.

    ``folder`` is ``<data_dir>/attachments`` (created at the first ``put``). :meth:`temporary`
    gives one in a fresh temporary folder, removed at :meth:`close`: for a history kept in memory.
    """

    def __init__(self, folder: Path, *, grace_seconds: float = GRACE_SECONDS) -> None:
        if not grace_seconds >= 0:
            raise ValueError(f"grace_seconds must be >= 0, not {grace_seconds}")
        super().__init__()
        self.folder = Path(folder)
        self.grace_seconds = float(grace_seconds)
        # self._lock orders a put() of bytes already kept (which makes their file fresh) against the
        # collector's look at that file and its removal: either the collector sees it fresh, or put() sees it gone.
        self._cleanup: weakref.finalize | None = None

    @classmethod
    def temporary(cls, *, grace_seconds: float = GRACE_SECONDS) -> AttachmentFiles:
        """Files in a new temporary folder, removed at :meth:`close` (or when collected, or at exit)."""
        files = cls(Path(tempfile.mkdtemp(prefix="chuanhu-attachments-")), grace_seconds=grace_seconds)
        files._cleanup = weakref.finalize(files, shutil.rmtree, str(files.folder), True)
        return files

    def close(self) -> None:
        """For a :meth:`temporary` folder: remove it and its files. Otherwise nothing."""
        if self._cleanup is not None:
            self._cleanup()

    # -- names -----------------------------------------------------------------------------
    def path(self, sha256: str) -> Path:
        """Where the file of ``sha256`` is (or would be) kept; ValueError unless ``sha256`` is 64
        lowercase hex digits (so never a path outside the folder)."""
        if not is_digest(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {str(sha256)[:80]!r}")
        return self.folder / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        """True if the file of ``sha256`` is kept (False for a name that is no digest)."""
        return is_digest(sha256) and self.path(sha256).is_file()

    def hashes(self) -> set[str]:
        """The digests of every file kept."""
        found: set[str] = set()
        try:
            shards = list(self.folder.iterdir())
        except FileNotFoundError:
            return found
        for shard in shards:
            if not re.fullmatch(r"[0-9a-f]{2}", shard.name) or not shard.is_dir() or shard.is_symlink():
                continue
            try:
                entries = list(shard.iterdir())
            except FileNotFoundError:
                continue
            found.update(e.name for e in entries if is_digest(e.name) and e.name.startswith(shard.name))
        return found

    # -- bytes -----------------------------------------------------------------------------
    def put(self, data: bytes) -> str:
        """Keep ``data``; its SHA-256 hex digest, by which it is read back.

        Idempotent: bytes already kept are not written again, but their file is made fresh (the
        collector spares it for ``grace_seconds``). Otherwise the bytes go to a temporary file beside
        their place, are synced, then renamed into place (and the folder synced): a crash leaves the
        whole file or none of it, and writers of the same bytes at once each rename a whole copy.
        """
        data = bytes(data)
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        with self._lock:
            if self._refresh(target, len(data)):
                return sha256
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{sha256}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(name, target)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        _sync_folder(target.parent)
        return sha256

    def _refresh(self, target: Path, size: int) -> bool:
        """True if ``target`` is kept with ``size`` bytes, and now fresh."""
        try:
            if target.stat().st_size != size:  # damaged (cut short by hand?): written again
                return False
            os.utime(target)
            return True
        except FileNotFoundError:
            return False

    def read(self, sha256: str) -> bytes:
        """The bytes of ``sha256``; FileNotFoundError if they are not kept (ValueError: not a digest)."""
        return self.path(sha256).read_bytes()

    # -- collection ------------------------------------------------------------------------
    def remove_unreferenced(self, referenced: set[str], *, now: float | None = None) -> int:
        """Remove every kept file whose digest is neither in ``referenced`` nor named by a source
        given to :meth:`keep_referenced_by`, and that was last written (or put again) more than
        ``grace_seconds`` before ``now`` (default: the time); how many went. Temporary files a
        crashed ``put`` left behind, as old, go too (not counted)."""
        limit = (time.time() if now is None else now) - self.grace_seconds
        keep = self._kept(referenced)
        removed = 0
        for sha256 in self.hashes() - keep:
            path = self.path(sha256)
            with self._lock:
                try:
                    if path.stat().st_mtime >= limit:
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue
            removed += 1
        for leftover in self.folder.glob("??/.*.tmp"):
            if _TEMPORARY.fullmatch(leftover.name):
                try:
                    if leftover.stat().st_mtime < limit:
                        leftover.unlink()
                except FileNotFoundError:
                    pass
        if removed:
            log.info("Removed %d attached file(s) no message refers to any more from %s", removed, self.folder)
        return removed


class Collectable(Protocol):
    def remove_unreferenced(self, referenced: set[str], *, now: float | None = None) -> int: ...


def collect(store: _References, files: Collectable) -> int:
    """Remove the files no message of any owner references any more (after a conversation or
    messages were deleted), nor any source given to ``files.keep_referenced_by``; how many went. Blocking (a scan of the store and the folder): call it
    off the event loop. A file put in the last ``files.grace_seconds`` stays (its question may be
    on its way to the store)."""
    return files.remove_unreferenced(store.referenced_attachments())


def open_files(data_dir: Path, *, temporary: bool = False) -> AttachmentFiles:
    """The attachments folder of the data folder ``data_dir``; with ``temporary`` (the history is
    kept in memory for this run), or when that folder cannot be made, one in a temporary folder."""
    if not temporary:
        folder = Path(data_dir) / FOLDER
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return AttachmentFiles(folder)
        except OSError as exc:
            log.warning("Attached files cannot be kept in %s (%s); they are kept for this run only", folder, exc)
    return AttachmentFiles.temporary()


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it survives a crash (where the OS allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
