"""Render deploy/nginx.conf for a run folder: its listen address, its upstream servers, and pid,
logs and temp folders under the run folder (so nginx runs as `nginx -p RUN -c RUN/nginx.conf`
without touching /etc, /run or /var). Used by deploy/team.sh, tests/test_team_nginx.py and
bench/bench_team.py.

    python deploy/nginx_conf.py --run RUN --listen 127.0.0.1:8080 --server 127.0.0.1:7861 \
        --server 127.0.0.1:7862 [--config config.yaml] > RUN/nginx.conf

Every directive it rewrites must be in the template once (else it says which is missing), so a
template edited by hand still renders or fails loudly.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "nginx.conf"
ACCESS_LOG = "access.log"  # under RUN/logs/


class TemplateError(ValueError):
    pass


def body_limit_mb(max_mb: float = 20, max_files: int = 10) -> int:
    """client_max_body_size in MB: all of one message's files in one upload, plus 1 MB of framing."""
    return int(math.ceil(max_mb * max_files)) + 1


def _sub(text: str, pattern: str, replacement: str, what: str) -> str:
    new, count = re.subn(pattern, lambda _m: replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise TemplateError(f"{TEMPLATE.name}: expected one {what}, found {count}")
    return new


def render(run: Path, listen: str, servers: list[str], *, body_mb: int | None = None,
           template: str | None = None, user: str | None = None) -> str:
    """The config text. ``run``: the prefix folder (made here with logs/ and temp/); ``user``:
    the workers' user (None: nginx's built-in default, so that as root they drop to nobody)."""
    if not servers:
        raise ValueError("at least one upstream server")
    text = TEMPLATE.read_text() if template is None else template
    run = run.resolve()
    for sub in ("logs", "temp"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    text = _sub(text, r"^user [^;]*;.*$", f"user {user};" if user else "# user: nginx's default", "user directive")
    text = _sub(text, r"^pid [^;]*;.*$", f"pid {run / 'logs' / 'nginx.pid'};", "pid directive")
    text = _sub(text, r"^error_log [^;]*;.*$", f"error_log {run / 'logs' / 'error.log'} warn;", "error_log directive")
    text = _sub(text, r"^(\s*)access_log [^;]* chuanhu;.*$", "", "access_log ... chuanhu directive")
    text = text.replace("    upstream chuanhu {",
                        f"    access_log {run / 'logs' / ACCESS_LOG} chuanhu;\n\n    upstream chuanhu {{", 1)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        text = _sub(text, rf"^(\s*){kind}_temp_path [^;]*;.*$", f"    {kind}_temp_path {run / 'temp' / kind};",
                    f"{kind}_temp_path")
    lines = "\n".join(f"        server {s} max_fails=1 fail_timeout=10s;" for s in servers)
    new, count = re.subn(r"(?:^\s*server \d[^;]*;\n)+", lambda _m: lines + "\n", text, flags=re.MULTILINE)
    if count != 1:
        raise TemplateError(f"{TEMPLATE.name}: expected one block of upstream server lines, found {count}")
    text = new
    text = _sub(text, r"^(\s*)listen [^;]*;.*$", f"        listen {listen};", "listen directive")
    if body_mb is not None:
        text = _sub(text, r"^(\s*)client_max_body_size [^;]*;.*$", f"        client_max_body_size {body_mb}m;",
                    "client_max_body_size")
    return text


def body_mb_of_config(path: str | None) -> int:
    """client_max_body_size for the attachments section of an app config (the defaults without one)."""
    if not path:
        return body_limit_mb()
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    section = data.get("attachments") or {}
    return body_limit_mb(float(section.get("max_mb", 20)), int(section.get("max_files", 10)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the run folder (nginx's -p prefix)")
    parser.add_argument("--listen", default="127.0.0.1:8080")
    parser.add_argument("--server", action="append", required=True, help="an app process, host:port (repeat)")
    parser.add_argument("--config", help="the app's config: client_max_body_size from its attachments section")
    parser.add_argument("--user", default=None, help="the workers' user (default: nginx's own)")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(render(Path(args.run), args.listen, args.server, body_mb=body_mb_of_config(args.config),
                                user=args.user))
    except (TemplateError, OSError, ValueError) as exc:
        print(f"nginx_conf: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
