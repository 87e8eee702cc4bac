"""ChuanhuStyleChat: start the chat app.

    python ChuanhuStyleChat.py [--config config.yaml] [--host 127.0.0.1] [--port 7860] [--share]
    python ChuanhuStyleChat.py hash-password     # a password hash for auth.users in config.yaml
    python ChuanhuStyleChat.py backup PATH [--config config.yaml] [--force]   # copy the history, even while it runs

With no config file and no key, the embedded local model answers. Ctrl+C or
SIGTERM stops the app cleanly: the history is checkpointed and closed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from modules.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ChuanhuStyleChat", description="A streaming chat app on Gradio.")
    parser.add_argument("--config", help="YAML config file (default: config.yaml if present)")
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", default=None, help="create a public gradio.live link")
    return parser.parse_args(argv)


def backup_main(argv: list[str]) -> int:
    """``backup PATH``: copy the history (the data folder of the config) to PATH, with SQLite's
    online backup API; exit code 0, or 2 with one line saying why not."""
    parser = argparse.ArgumentParser(
        prog="ChuanhuStyleChat.py backup",
        description="Copy the conversation history to PATH, safely even while the app runs. The copy "
                    "is one SQLite file; to restore it, stop the app and put it in place of history.sqlite3, "
                    "with no history.sqlite3-wal or -shm left beside it.",
    )
    parser.add_argument("path", metavar="PATH",
                        help="the file to write; in an existing folder, history-<YYYYmmdd-HHMMSS>.sqlite3")
    parser.add_argument("--config", help="YAML config file whose history.data_dir to back up "
                                         "(default: config.yaml if present; CHUANHU_DATA_DIR overrides)")
    parser.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"ChuanhuStyleChat: invalid configuration: {exc}", file=sys.stderr)
        return 2
    from modules.history.store import FILENAME, BackupError, backup, backup_path

    if config.history.url is not None:
        print("ChuanhuStyleChat backup: history.url is set: the history is in PostgreSQL; back it up with "
              "pg_dump (this command copies the SQLite file)", file=sys.stderr)
        return 2
    source = Path(config.history.data_dir).expanduser().resolve() / FILENAME
    target = backup_path(Path(args.path)).absolute()
    try:
        count = backup(source, target, force=args.force)
    except BackupError as exc:
        print(f"ChuanhuStyleChat backup: {exc}", file=sys.stderr)
        return 2
    print(f"Wrote {target}: {count} conversation{'' if count == 1 else 's'}, copied from {source}.")
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (a service manager, Docker, a Space stopping the app) as Ctrl+C: Gradio closes its
    server on a KeyboardInterrupt in the main thread, and main() then closes the history."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hash-password"]:
        from modules.auth import main as hash_password

        return hash_password(argv[1:])
    if argv[:1] == ["backup"]:
        return backup_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, overrides={"host": args.host, "port": args.port, "share": args.share})
    except ConfigError as exc:
        print(f"ChuanhuStyleChat: invalid configuration: {exc}", file=sys.stderr)
        return 2

    from modules.app import ChatApp  # gradio is slow to import: only once the config is good
    from modules.history.store import HistoryUnavailable

    try:
        app = ChatApp(config)
    except HistoryUnavailable as exc:  # one line, naming history.url, without the password
        print(f"ChuanhuStyleChat: cannot start: {exc}", file=sys.stderr)
        return 2
    in_main_thread = threading.current_thread() is threading.main_thread()  # signals can be set only there
    if in_main_thread:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        app.launch()  # blocks until Ctrl+C or SIGTERM
    except KeyboardInterrupt:  # one that came before Gradio was ready to take it
        if app.demo is not None:
            app.demo.close(verbose=False)
    finally:
        if in_main_thread:  # a second Ctrl+C or SIGTERM must not cut the last checkpoint short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        app.chat.remote.close()  # (PostgreSQL: this process's replies still streaming marked interrupted)
        app.store.close()  # checkpointed: history.sqlite3 alone holds every conversation (or the pool closed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
