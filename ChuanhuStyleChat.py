"""ChuanhuStyleChat: start the chat app.

    python ChuanhuStyleChat.py [--config config.yaml] [--host 127.0.0.1] [--port 7860] [--share]
    python ChuanhuStyleChat.py hash-password     # a password hash for auth.users in config.yaml

With no config file and no key, the embedded local model answers.
"""

from __future__ import annotations

import argparse
import logging
import sys

from modules.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ChuanhuStyleChat", description="A streaming chat app on Gradio.")
    parser.add_argument("--config", help="YAML config file (default: config.yaml if present)")
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", default=None, help="create a public gradio.live link")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hash-password"]:
        from modules.auth import main as hash_password

        return hash_password(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, overrides={"host": args.host, "port": args.port, "share": args.share})
    except ConfigError as exc:
        print(f"ChuanhuStyleChat: invalid configuration: {exc}", file=sys.stderr)
        return 2

    from modules.ui import ChatApp  # gradio is slow to import: only once the config is good

    app = ChatApp(config)
    app.launch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
