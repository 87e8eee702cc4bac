#!/usr/bin/env bash
# A quick try of the team set-up on this machine, on loopback only: a throwaway PostgreSQL cluster,
# N app processes sharing it, nginx in front with sticky sessions. Ctrl-C (or SIGTERM) stops all
# of it and removes the run folder (the cluster with it: its conversations are gone).
#
#   deploy/team.sh [-n 2] [--listen 127.0.0.1:8080] [--first-port 7861] [--config config.yaml]
#                  [--run FOLDER] [--keep]
#
# Needs Debian's `postgresql` and `nginx` packages (apt-get install postgresql nginx) and the
# app's venv (bash start.sh makes .venv; PYTHON=... names another interpreter).
#
#   -n N            app processes (default 2), on ports FIRST-PORT, FIRST-PORT+1, ...
#   --listen A:P    where nginx listens (default 127.0.0.1:8080): open that URL in a browser
#   --config FILE   the app's config (models, login, limits...); default: ./config.yaml if present.
#                   history.url and history.data_dir are set by this script (CHUANHU_HISTORY_URL,
#                   CHUANHU_DATA_DIR), the same for every process.
#   --run FOLDER    the run folder (default: a new one under /tmp): PostgreSQL's cluster, the
#                   shared data folder, nginx's config, pid, logs and temp files, each app's log
#   --keep          keep the run folder at the end (the logs, the cluster's files)
#
# Log files: RUN/app-PORT.log, RUN/nginx/logs/{access,error}.log (the access log says which
# process served each request: "upstream"), RUN/pg/server.log.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=2
LISTEN=127.0.0.1:8080
FIRST_PORT=7861
CONFIG=""
RUN=""
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n) N=$2; shift 2 ;;
    --listen) LISTEN=$2; shift 2 ;;
    --first-port) FIRST_PORT=$2; shift 2 ;;
    --config) CONFIG=$(realpath "$2"); shift 2 ;;
    --run) RUN=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "team.sh: unknown option $1 (--help)" >&2; exit 2 ;;
  esac
done
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "team.sh: -n wants a positive number" >&2; exit 2; }
if [ -z "$CONFIG" ] && [ -f config.yaml ]; then CONFIG=$(realpath config.yaml); fi

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "team.sh: nginx is not installed (apt-get install nginx)" >&2; exit 1; }
PG_BIN=${CHUANHU_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[ -x "$PG_BIN/initdb" ] || { echo "team.sh: PostgreSQL's server programs are not installed (apt-get install postgresql)" >&2; exit 1; }

if [ -z "$RUN" ]; then RUN=$(mktemp -d /tmp/chuanhu-team.XXXXXX); fi
mkdir -p "$RUN"
RUN=$(realpath "$RUN")
chmod 755 "$RUN"  # nginx's workers (nobody, as root) reach their temp folders through it

PIDS=()
PG_STARTED=0
NGINX_PID=""
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "team.sh: stopping"
  [ -n "$NGINX_PID" ] && kill -TERM "$NGINX_PID" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}" $NGINX_PID; do wait "$pid" 2>/dev/null || true; done
  if [ "$PG_STARTED" = 1 ]; then as_pg "$PG_BIN/pg_ctl" -D "$RUN/pg/data" -m fast -w stop >/dev/null || true; fi
  if [ "$KEEP" = 1 ]; then echo "team.sh: the run folder is kept: $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# PostgreSQL refuses to run as root: as root, the cluster is the postgres user's (Debian makes it).
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
secret() { "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(18))'; }

# ---- PostgreSQL: a cluster in RUN/pg, on a unix socket there and a free loopback port ----------
PG_PORT=$(free_port)
PG_PASSWORD=$(secret)
mkdir -p "$RUN/pg/sock"
[ "$(id -u)" = 0 ] && chown -R postgres: "$RUN/pg"
secret > "$RUN/pg/superuser-password"
[ "$(id -u)" = 0 ] && chown postgres: "$RUN/pg/superuser-password"
echo "team.sh: PostgreSQL cluster in $RUN/pg (port $PG_PORT)"
as_pg "$PG_BIN/initdb" -D "$RUN/pg/data" -U postgres --pwfile "$RUN/pg/superuser-password" -E UTF8 --locale=C \
  --auth-local=trust --auth-host=scram-sha-256 >"$RUN/pg/initdb.log" 2>&1 \
  || { cat "$RUN/pg/initdb.log" >&2; exit 1; }
as_pg "$PG_BIN/pg_ctl" -D "$RUN/pg/data" -l "$RUN/pg/server.log" -w -t 60 \
  -o "-k $RUN/pg/sock -c listen_addresses=127.0.0.1 -p $PG_PORT -c max_connections=$((N * 12 + 20))" start >/dev/null \
  || { tail -n 20 "$RUN/pg/server.log" >&2; exit 1; }
PG_STARTED=1
psql_su() { as_pg "$PG_BIN/psql" -q -v ON_ERROR_STOP=1 -h "$RUN/pg/sock" -p "$PG_PORT" -U postgres -d postgres -c "$1"; }
psql_su "CREATE ROLE chuanhu LOGIN PASSWORD '$PG_PASSWORD'"
psql_su "CREATE DATABASE chuanhu OWNER chuanhu"
# The URL goes to the apps in their environment, not in a file (CHUANHU_HISTORY_URL overrides history.url).
export CHUANHU_HISTORY_URL="postgresql://chuanhu:$PG_PASSWORD@127.0.0.1:$PG_PORT/chuanhu"
export CHUANHU_DATA_DIR="$RUN/data"  # attachments' files and knowledge bases: one folder for all processes
mkdir -p "$CHUANHU_DATA_DIR"

# ---- the app processes ---------------------------------------------------------------------------
SERVERS=()
for ((i = 0; i < N; i++)); do
  port=$((FIRST_PORT + i))
  args=("$ROOT/ChuanhuStyleChat.py" --port "$port")
  [ -n "$CONFIG" ] && args+=(--config "$CONFIG")
  (cd "$RUN" && exec env GRADIO_ANALYTICS_ENABLED=False "$PYTHON" "${args[@]}") >"$RUN/app-$port.log" 2>&1 &
  PIDS+=("$!")
  SERVERS+=(--server "127.0.0.1:$port")
  echo "team.sh: app process $((i + 1)) on 127.0.0.1:$port (pid $!, log $RUN/app-$port.log)"
done

# Until every process answers /config (its page is built): polled, with a deadline.
deadline=$((SECONDS + 120))
for ((i = 0; i < N; i++)); do
  port=$((FIRST_PORT + i))
  until curl -fsS -o /dev/null "http://127.0.0.1:$port/config" 2>/dev/null; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      echo "team.sh: the app on port $port exited:" >&2; tail -n 20 "$RUN/app-$port.log" >&2; exit 1
    fi
    [ $SECONDS -lt $deadline ] || { echo "team.sh: the app on port $port is not ready after 120 s" >&2; exit 1; }
    sleep 0.3
  done
done

# ---- nginx: the template rendered for this run folder ----------------------------------------------
mkdir -p "$RUN/nginx"
"$PYTHON" "$ROOT/deploy/nginx_conf.py" --run "$RUN/nginx" --listen "$LISTEN" "${SERVERS[@]}" \
  ${CONFIG:+--config "$CONFIG"} >"$RUN/nginx/nginx.conf"
"$NGINX" -t -q -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf"
"$NGINX" -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" -g 'daemon off;' &
NGINX_PID=$!
until curl -fsS -o /dev/null "http://$LISTEN/config" 2>/dev/null; do
  kill -0 "$NGINX_PID" 2>/dev/null || { echo "team.sh: nginx exited:" >&2; tail -n 20 "$RUN/nginx/logs/error.log" >&2; exit 1; }
  [ $SECONDS -lt $deadline ] || { echo "team.sh: nginx does not answer on $LISTEN" >&2; exit 1; }
  sleep 0.2
done

echo
echo "team.sh: ready: http://$LISTEN/  ($N app processes behind nginx, history in PostgreSQL; Ctrl-C stops)"
echo "team.sh: which process served what: $RUN/nginx/logs/access.log (\"upstream\")"
# Until Ctrl-C or SIGTERM, or until a process exits (then everything stops, saying which).
wait -n "${PIDS[@]}" "$NGINX_PID" || true
echo "team.sh: a process exited; see the logs in $RUN" >&2
KEEP=1
exit 1
