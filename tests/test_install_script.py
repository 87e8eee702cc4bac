"""scripts/install.sh tells a new user what it is doing, above all during the long llama.cpp build.

The script runs for real against a stand-in interpreter: ``$VENV/bin/python`` is a small
shell script that records how it was called and prints what pip prints (for the llama.cpp
package: the build's ninja lines, as ``pip install -v`` shows them).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUB = r"""#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls.log"
case "$*" in
  *llama-cpp-python*)
    [ -n "$FAIL_LLAMA" ] && { echo "ERROR: Failed building wheel for llama-cpp-python"; exit 1; }
    echo "  Running command Building wheel for llama-cpp-python"
    echo "  [1/193] /usr/bin/cc -DGGML_USE_CPU -O3 -MD -o vendor/llama.cpp/ggml/src/ggml.c.o -c vendor/ggml.c"
    echo "  [193/193] Linking CXX shared library vendor/llama.cpp/bin/libllama.so"
    echo "Successfully installed llama-cpp-python-0.3.36" ;;
  *) echo "pip noise that stays quiet" > /dev/null ;;
esac
"""


def run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    stub = venv / "bin" / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    return subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "VENV": str(venv), **env})


def test_install_says_what_it_does_and_shows_the_build_progress(tmp_path):
    done = run(tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    steps = [out.index(f"Step {n}/3") for n in (1, 2, 3)]
    assert steps == sorted(steps)
    assert "about 4 minutes" in out  # said before the long step starts
    assert out.index("about 4 minutes") < out.index("[1/193] ggml.c.o")
    assert "[193/193] Linking CXX shared library" in out
    assert "Done in" in out
    calls = (tmp_path / "venv" / "bin" / "calls.log").read_text()
    llama = next(line for line in calls.splitlines() if "llama-cpp-python" in line)
    assert " -v " in f" {llama} " and "--quiet" not in llama  # pip's progress is shown for this step
    again = run(tmp_path)  # installed: a second run returns at once, silently
    assert again.returncode == 0 and again.stdout == ""


def test_a_failed_build_says_so_and_fails(tmp_path):
    done = run(tmp_path, FAIL_LLAMA="1")
    assert done.returncode == 1
    assert "could not build llama-cpp-python" in done.stdout and "ERROR: Failed building wheel" in done.stdout
