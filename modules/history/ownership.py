"""Whose history a session sees.

- With login (``auth.users``), the owner is the logged-in user, read from the
  request on every call: a session cannot claim another user's name.
- Without login, in ``shared`` mode (a desktop app on localhost) everyone is
  one owner, ``local``.
- In ``per_browser`` mode (a shared link, a Space) each browser keeps a random
  token in its localStorage (``gr.BrowserState``); the owner is a hash of it.
  A client without a browser (``gradio_client``) gets an owner of its own for
  its session, so it never sees anyone else's history.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
from pathlib import Path
from typing import Callable

from modules.config import AppConfig

SHARED_OWNER = "local"
STORAGE_KEY = "chuanhustylechat-browser"


def storage_mode(config: AppConfig) -> str:
    """"users", "shared" or "per_browser", resolving ``history.mode: auto``."""
    if config.auth.users:
        return "users"
    if config.history.mode != "auto":
        return config.history.mode
    on_space = bool(os.environ.get("SPACE_ID"))
    return "shared" if _loopback(config.server.host) and not config.server.share and not on_space else "per_browser"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def user_owner(username: str) -> str:
    return f"user:{username}"


def new_browser_token() -> str:
    return secrets.token_urlsafe(32)


def browser_owner(token: str) -> str:
    return "browser:" + hashlib.sha256(token.encode()).hexdigest()[:32]


def session_owner() -> str:
    return "session:" + secrets.token_hex(16)


# The keeper of secrets every process shares, when there is one (PostgresStore.app_secret: name,
# this process's proposal -> the one kept); None: each is kept in the data folder.
SharedSecrets = Callable[[str, str], str]


def browser_secret(data_dir: Path, shared: SharedSecrets | None = None) -> str:
    """The key that encrypts the browser token in localStorage, stable across restarts.

    Kept in the data directory (created once, readable by the owner only); a random one per
    start when the directory cannot be written. With ``shared`` (a history on PostgreSQL, several
    processes on several machines), the one kept there: the data folder's, if it had one, becomes
    it the first time (a browser known before the move stays known).
    """
    return _key(data_dir, "browser-secret", 16, shared)


def app_key(data_dir: Path, shared: SharedSecrets | None = None) -> bytes:
    """The key that signs the page's links to attached files (``modules/web/files.py``); kept like
    :func:`browser_secret`, in a file of its own."""
    return bytes.fromhex(_key(data_dir, "app-key", 32, shared))


def _key(data_dir: Path, name: str, size: int, shared: SharedSecrets | None) -> str:
    """The secret ``name``: ``shared``'s (proposing the data folder's ``.<name>``, else a new one),
    or the one kept in the data folder."""
    path = data_dir / f".{name}"
    if shared is not None:
        return shared(name, _kept(path) or secrets.token_hex(size))
    return _secret(path, size)


def _kept(path: Path) -> str | None:
    """The secret kept in ``path``, if there is one."""
    try:
        return path.read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _secret(path: Path, size: int = 16) -> str:
    """A random hex secret kept in ``path`` (made once, mode 0600); a new one per start when the
    folder cannot be written."""
    kept = _kept(path)
    if kept is not None:
        return kept
    value = secrets.token_hex(size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(value)
    except FileExistsError:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        pass
    return value

