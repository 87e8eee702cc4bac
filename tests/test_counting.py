"""Token counting that no text can turn into a stall: linear in the text, and off the event loop.

tiktoken's BPE takes seconds on megabytes of one repeated character and fails outright on
a long run of spaces ("Max stack size exceeded for backtracking"); the app counts long
texts piece by piece at word boundaries (so the count is still exact) and on a worker
thread. Nothing here measures time: the checks are on counts, on exceptions, and on which
thread did the work.
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from hypothesis import given, settings, strategies as st

from modules.core import tokens

WORDS = ["hello", " world", " the", "  ", "\n", ", ", "é", "123", " 你好", "'s", "!!", "\t", " ", "ab"]


@pytest.mark.parametrize("char", ["a", " ", "你", "!", "\n"])
def test_megabytes_of_one_character_are_counted(char):
    n, exact = tokens.count(char * 2_000_000, "gpt-4o")
    assert n > 0
    assert not exact or char == "\n"  # cut inside a run: an estimate, and said so


def test_a_long_text_is_counted_exactly_piece_by_piece():
    rng = random.Random(7)
    text = "".join(rng.choice(WORDS) for _ in range(60_000))
    assert len(text) > 4 * tokens.PIECE
    enc, _ = tokens.encoding_for_model("gpt-4o")
    assert tokens.count(text, "gpt-4o") == (len(enc.encode(text, disallowed_special=())), True)
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": text[::-1]}]
    whole = 3 + sum(3 + sum(len(enc.encode(v, disallowed_special=())) for v in m.values()) for m in messages)
    assert tokens.count_messages(messages, "gpt-4o") == (whole, True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=400), st.integers(min_value=64, max_value=512))
def test_pieces_cut_at_word_boundaries_add_up_to_the_whole(words, piece):
    text = "".join(words)
    enc, _ = tokens.encoding_for_model("gpt-4o")
    saved = tokens.PIECE
    tokens.PIECE = piece
    try:
        n, exact = tokens._encoded_length(enc, text)
    finally:
        tokens.PIECE = saved
    if exact:
        assert n == len(enc.encode(text, disallowed_special=()))
    assert "".join(p for p, _ in tokens._pieces(text)) == text


def test_long_texts_are_counted_on_a_worker_thread_short_ones_inline():
    seen: list[bool] = []

    def probe(text: str) -> int:
        seen.append(threading.current_thread() is threading.main_thread())
        return len(text)

    async def main() -> None:
        assert await tokens.off_loop(probe, "short", chars=5) == 5
        assert await tokens.off_loop(probe, "x" * 100_000, chars=100_000) == 100_000

    asyncio.run(main())
    assert seen == [True, False]
