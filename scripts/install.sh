#!/usr/bin/env bash
# Create .venv (or $VENV) and install everything ChuanhuStyleChat needs. Idempotent:
# a second run with unchanged requirements returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.installed-$(cat requirements.txt requirements-nodeps.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  # llama.cpp's native build crashes on CPUs with AMX; a portable build works everywhere.
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps -r requirements-nodeps.txt
  touch "$stamp"
fi
