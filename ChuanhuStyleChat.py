"""ChuanhuStyleChat: start the chat app.

    python ChuanhuStyleChat.py [--config config.yaml] [--host 127.0.0.1] [--port 7860] [--share]
    python ChuanhuStyleChat.py hash-password     # a password hash for auth.users in config.yaml
    python ChuanhuStyleChat.py backup PATH [--config config.yaml] [--force]   # copy the history, even while it runs
    python ChuanhuStyleChat.py usage --since 7d [--csv] [--config config.yaml]  # tokens and cost per user and model

With no config file and no key, the embedded local model answers. Ctrl+C or
SIGTERM stops the app cleanly: the history is checkpointed and closed.
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import signal
import sys
import threading
import time
from datetime import datetime, timezone
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


_SPANS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """``7d``, ``24h``, ``30m``, ``2w`` (that long before ``now``) or a UTC date ``2025-01-31`` (its
    midnight) as epoch seconds; ValueError otherwise."""
    now = time.time() if now is None else now
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*", text.lower())
    if found:
        return now - float(found.group(1)) * _SPANS[found.group(2)]
    try:
        day = datetime.strptime(text.strip(), "%Y-%m-%d")
    except ValueError:
        raise ValueError(f"{text!r} is not a span (7d, 24h, 30m, 2w) or a date (YYYY-MM-DD)") from None
    return day.replace(tzinfo=timezone.utc).timestamp()


def usage_main(argv: list[str], out=None) -> int:
    """``usage --since 7d``: tokens in and out and cost per user (owner) and model since then, from
    the history's database (SQLite or PostgreSQL); a table, or CSV with ``--csv``. Exit code 0, or
    2 with one line saying why not."""
    out = sys.stdout if out is None else out
    parser = argparse.ArgumentParser(
        prog="ChuanhuStyleChat.py usage",
        description="Tokens in and out and cost per user and model since a time, from the usage the app "
                    "records for every reply (the per-user limits count the same).")
    parser.add_argument("--since", default="7d", help="7d, 24h, 30m, 2w (before now) or a UTC date YYYY-MM-DD "
                                                      "(default: 7d)")
    parser.add_argument("--csv", action="store_true", help="CSV instead of a table")
    parser.add_argument("--config", help="YAML config file whose history to read (default: config.yaml if present)")
    args = parser.parse_args(argv)
    try:
        since = parse_since(args.since)
    except ValueError as exc:
        print(f"ChuanhuStyleChat usage: --since: {exc}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"ChuanhuStyleChat: invalid configuration: {exc}", file=sys.stderr)
        return 2
    from modules.history.store import FILENAME, HistoryUnavailable, SQLiteStore

    try:
        if config.history.url is not None:
            from modules.history.pg_store import open_postgres

            store = open_postgres(config.history.url.get_secret_value(), min_size=0, max_size=1,
                                  connect_timeout=config.history.connect_timeout_seconds)
        else:
            path = Path(config.history.data_dir).expanduser().resolve() / FILENAME
            if not path.exists():
                print(f"ChuanhuStyleChat usage: there is no history at {path}", file=sys.stderr)
                return 2
            store = SQLiteStore(path)
    except HistoryUnavailable as exc:
        print(f"ChuanhuStyleChat usage: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a damaged or unknown file: said in one line, left as it is
        print(f"ChuanhuStyleChat usage: the history cannot be read: {exc}", file=sys.stderr)
        return 2
    try:
        rows = [row for row in store.usage_since(since) if row.replies]
    finally:
        store.close()
    write_usage(rows, since, args.csv, out)
    return 0


def write_usage(rows: list, since: float, as_csv: bool, out) -> None:
    """The usage rows as CSV (``owner,model,replies,prompt_tokens,completion_tokens,cost_usd,
    replies_without_price``) or as a table with a total line."""
    if as_csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["owner", "model", "replies", "prompt_tokens", "completion_tokens", "cost_usd",
                         "replies_without_price"])
        for r in rows:
            writer.writerow([r.owner, r.model, r.replies, r.prompt_tokens, r.completion_tokens,
                             f"{r.cost:.6f}", r.cost_unknown])
        return
    start = datetime.fromtimestamp(since, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if not rows:
        print(f"No replies since {start}.", file=out)
        return
    head = ("owner", "model", "replies", "tokens in", "tokens out", "cost")

    def line(r) -> tuple[str, ...]:
        return (r.owner, r.model, f"{r.replies:,}", f"{r.prompt_tokens:,}", f"{r.completion_tokens:,}",
                f"${r.cost:,.4f}" + (f" (+{r.cost_unknown} unpriced)" if r.cost_unknown else ""))

    body = [line(r) for r in rows]
    total = ("total", "", f"{sum(r.replies for r in rows):,}", f"{sum(r.prompt_tokens for r in rows):,}",
             f"{sum(r.completion_tokens for r in rows):,}", f"${sum(r.cost for r in rows):,.4f}")
    widths = [max(len(cells[i]) for cells in (head, *body, total)) for i in range(len(head))]

    def show(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(f"Usage since {start}:", file=out)
    print(show(head), file=out)
    for cells in body:
        print(show(cells), file=out)
    print(show(total), file=out)


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
    if argv[:1] == ["usage"]:
        return usage_main(argv[1:])
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
