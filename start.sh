#!/usr/bin/env bash
# Install (the first time; llama.cpp compiles for about 4 minutes) and start ChuanhuStyleChat
# on http://127.0.0.1:7860. Arguments go to the app: --config, --host, --port, --share.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
exec .venv/bin/python ChuanhuStyleChat.py "$@"
