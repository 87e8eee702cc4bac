"""The retrieval core of knowledge bases (issue #14): chunks, tokens, BM25, fusion, recall@5."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from modules.core.documents import Document
from modules.core.retrieval import (Chunk, Embeddings, EmbeddingsError, IndexDamaged, LexicalIndex, VectorIndex,
                                    chunk_document, chunk_text, rrf, tokenize)
from tests.fakes.embeddings_server import FakeEmbeddingsServer

EVAL = Path(__file__).parent / "fixtures" / "kb_eval"


def words(n: int, topic: str = "river") -> str:
    return " ".join(f"{topic}{i}" for i in range(n))


# -- chunking --------------------------------------------------------------------------------------
def test_chunks_are_spans_of_the_text_within_the_size_on_sentence_boundaries():
    text = "\n\n".join(" ".join(f"Sentence {p}-{s} tells about item{p}x{s} at length." for s in range(12))
                       for p in range(6))
    chunks = chunk_text("a.txt", text, size=60, overlap=15)
    assert len(chunks) > 6
    for c in chunks:
        assert text[c.start:c.end] == c.text
        assert len(tokenize_count(c.text)) <= 60
        assert c.text.startswith("Sentence") and c.text.endswith(".")  # whole sentences
        assert c.page is None and c.section is None
    assert [c.index for c in chunks] == list(range(len(chunks)))
    # every sentence is in some chunk, and consecutive chunks inside a paragraph overlap
    for p in range(6):
        for s in range(12):
            assert any(f"item{p}x{s} " in c.text for c in chunks)
    assert any(b.start < a.end for a, b in zip(chunks, chunks[1:]))


def tokenize_count(text: str) -> list[int]:
    from modules.core.tokens import encoding
    return encoding("cl100k_base").encode(text)


def test_chunks_prefer_paragraph_boundaries_and_do_not_overlap_across_them():
    para = lambda p: " ".join(f"Para{p} sentence {s} is here." for s in range(5))  # ~40 tokens
    text = "\n\n".join(para(p) for p in range(4))
    chunks = chunk_text("a.txt", text, size=100, overlap=20)
    assert [c.text for c in chunks] == ["\n\n".join([para(0), para(1)]), "\n\n".join([para(2), para(3)])]


def test_pages_and_sections_are_kept():
    text = ("# Introduction\n\nThe intro talks about apples. More about apples.\n\n## Method\n\nWe measured pears."
            "\fStill the method, on page two: plums.\n\n# Results\n\nCherries won.")
    chunks = chunk_text("r.pdf", text, size=300)
    where = {c.text.split()[-1].strip("."): (c.page, c.section) for c in chunks}
    assert where == {"apples": (1, "Introduction"), "pears": (1, "Method"), "plums": (2, "Method"),
                     "Cherries won" .split()[-1]: (2, "Results")}
    pages = chunk_text("p.pdf", "", pages=["First page text.", "Second page text."])
    assert [(c.page, c.text) for c in pages] == [(1, "First page text."), (2, "Second page text.")]
    assert pages[1].start == len("First page text.") + 1


def test_document_kinds_decide_headings_and_one_page_pdfs():
    code = Document("x.py", "# not a heading\nprint(1)\n", None, "code")
    assert chunk_document(code)[0].section is None
    md = Document("x.md", "# Title\n\nBody.", None, "markdown")
    assert chunk_document(md)[0].section == "Title"
    pdf = Document("x.pdf", "Only page.", 1, "pdf")
    assert chunk_document(pdf)[0].page == 1


def test_chinese_and_japanese_are_cut_on_their_full_stops():
    zh = "".join(f"第{i}句话讲的是北京的历史和文化。" for i in range(40))
    chunks = chunk_text("zh.txt", zh, size=80, overlap=0)
    assert len(chunks) > 3
    assert all(c.text.endswith("。") and c.text.startswith("第") for c in chunks)
    assert "".join(c.text for c in chunks) == zh
    ja = "".join(f"これは{i}番目の文です！" for i in range(60))
    chunks = chunk_text("ja.txt", ja, size=50, overlap=0)
    assert len(chunks) > 2 and all(c.text.endswith("！") for c in chunks)
    assert "".join(c.text for c in chunks) == ja


def test_a_sentence_longer_than_the_size_is_cut():
    long = words(500)
    chunks = chunk_text("l.txt", long, size=100, overlap=0)
    assert len(chunks) >= 5
    assert all(len(tokenize_count(c.text)) <= 100 for c in chunks)
    assert " ".join(c.text for c in chunks) == long
    cjk = "汉" * 1000
    chunks = chunk_text("c.txt", cjk, size=100, overlap=0)
    assert "".join(c.text for c in chunks) == cjk and all(len(tokenize_count(c.text)) <= 100 for c in chunks)


# -- tokenisation ----------------------------------------------------------------------------------
def test_english_is_lowercased_stemmed_without_stop_words():
    assert tokenize("The Running dogs were running to the parks!") == ["run", "dog", "run", "park"]
    assert tokenize("connection") == tokenize("connected")[:1] == ["connect"]


def test_chinese_is_cut_into_words_by_jieba():
    terms = tokenize("北京是中华人民共和国的首都")
    assert {"北京", "首都", "中华人民共和国", "人民"} <= set(terms)
    assert "的" not in terms and "是" not in terms
    assert set(tokenize("中国的首都")) <= set(tokenize("北京是中国的首都"))


def test_japanese_is_cut_into_bigrams_and_mixed_text_per_script():
    assert tokenize("東京の天気") == ["東京", "京の", "の天", "天気"]
    terms = tokenize("Pythonで機械学習をする")
    assert terms[0] == "python" and "機械" in terms and "学習" in terms
    mixed = tokenize("用Python写的asyncio服务器")
    assert "python" in mixed and "asyncio" in mixed and "服务器" in mixed


# -- BM25 ------------------------------------------------------------------------------------------
CORPUS = ["The cat sat on the mat.", "Dogs chase cats in the garden.", "北京是中国的首都。", "",
          "上海是中国的金融中心。", "Stock markets fell sharply today."]


def test_search_ranks_and_leaves_out_passages_without_the_terms():
    index = LexicalIndex.build(CORPUS)
    assert len(index) == 6
    hits = index.search("cats", 5)
    assert {i for i, _ in hits} == {0, 1} and all(s > 0 for _, s in hits)
    assert index.search("中国的首都", 5)[0][0] == 2
    assert index.search("unknownword", 5) == [] and index.search("", 5) == []
    assert len(index.search("中国", 1)) == 1
    assert LexicalIndex.build([]).search("cat", 5) == []


def test_save_load_round_trip_and_add(tmp_path):
    index = LexicalIndex.build(CORPUS)
    index.save(tmp_path / "ix")
    loaded = LexicalIndex.load(tmp_path / "ix")
    for q in ("cat", "中国", "markets fell", "金融"):
        assert loaded.search(q, 5) == pytest.approx(index.search(q, 5))
    loaded.add(["A cat and another cat.", "金融危机"])
    assert len(loaded) == 8 and loaded.search("cat", 1)[0][0] == 6 and loaded.search("金融危机", 1)[0][0] == 7
    assert loaded.search("cat", 5) == pytest.approx(LexicalIndex.build(CORPUS + ["A cat and another cat.", "金融危机"])
                                                    .search("cat", 5))
    loaded.save(tmp_path / "ix")
    assert len(LexicalIndex.load(tmp_path / "ix")) == 8


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest", "no-manifest"])
def test_a_damaged_index_raises_a_clear_error(tmp_path, damage):
    folder = tmp_path / "ix"
    LexicalIndex.build(CORPUS).save(folder)
    data = folder / "bm25s" / "data.csc.index.npy"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:-7])
    elif damage == "flip":
        raw = bytearray((folder / "terms.npy").read_bytes())
        raw[-1] ^= 0xFF
        (folder / "terms.npy").write_bytes(bytes(raw))
    elif damage == "delete":
        (folder / "vocab.json").unlink()
    elif damage == "manifest":
        (folder / "manifest.json").write_text("{not json")
    else:
        (folder / "manifest.json").unlink()
    with pytest.raises(IndexDamaged) as caught:
        LexicalIndex.load(folder)
    assert caught.value.folder == folder and "rebuild" in str(caught.value) and caught.value.reason


# -- fusion ----------------------------------------------------------------------------------------
def test_rrf_math():
    fused = rrf([["a", "b", "c"], [("c", 9.0), ("d", 1.0)]], k=60)
    assert [i for i, _ in fused] == ["c", "a", "b", "d"]
    assert dict(fused)["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert dict(fused)["a"] == pytest.approx(1 / 61) and dict(fused)["d"] == pytest.approx(1 / 62)
    assert rrf([["x", "x", "y"]], k=1) == [("x", 0.5), ("y", pytest.approx(1 / 4))]  # once a list, best rank
    assert rrf([]) == []


def test_cosine_search():
    index = VectorIndex(np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32))
    assert [i for i, _ in index.search([1, 0.1], 2)] == [0, 2]
    assert index.search([0, 3], 1)[0] == (1, pytest.approx(1.0))
    index.add(np.array([[-1, 0]]))
    assert index.search([-1, 0], 1)[0][0] == 3
    with pytest.raises(ValueError):
        index.search([1, 0, 0], 1)
    assert VectorIndex().search([1.0], 3) == []


def test_fusion_of_bm25_and_fake_embeddings_puts_a_passage_found_by_both_first():
    texts = ["Bake the sourdough loaf in a Dutch oven.", "Sourdough starter needs flour and water.",
             "A Dutch oven is a heavy cast iron pot.", "Loaf tins are for sandwich bread.",
             "Cast iron must be seasoned with oil.", "The oven temperature for bread is high."]
    query = "sourdough loaf oven"
    lexical = LexicalIndex.build(texts)
    with FakeEmbeddingsServer() as server, Embeddings(server.base_url, "fake-embed", "sk-x", batch=4) as client:
        vectors = client.embed(texts)
        assert vectors.shape == (6, 256) and np.allclose(np.linalg.norm(vectors, axis=1), 1)
        assert len(server.requests) == 2 and server.requests[0]["auth"] == "Bearer sk-x"
        assert server.requests[0]["body"] == {"model": "fake-embed", "input": texts[:4]}
        dense = VectorIndex(vectors).search(client.embed([query])[0], 3)
    bm25 = lexical.search(query, 3)
    fused = rrf([bm25, dense])
    both = {i for i, _ in bm25} & {i for i, _ in dense}
    assert both and fused[0][0] in both
    ranks = [i for i, _ in fused]
    assert all(ranks.index(b) < ranks.index(o) for b in both for o in set(ranks) - both)
    assert fused[0][0] == 0  # the passage with all three words


@pytest.mark.parametrize("mode, message", [("error", "HTTP 500"), ("garbage", "not 1 embeddings"),
                                           ("stall", "did not answer in time")])
def test_embeddings_failures_are_clear(mode, message):
    with FakeEmbeddingsServer(mode) as server, Embeddings(server.base_url, "m", timeout=0.3) as client:
        with pytest.raises(EmbeddingsError, match=message):
            client.embed(["hello"])


def test_embeddings_endpoint_unreachable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        with Embeddings(f"http://127.0.0.1:{port}/v1", "m", timeout=2) as client:
            with pytest.raises(EmbeddingsError, match="cannot be reached"):
                client.embed(["hello"])


# -- evaluation: recall@5 --------------------------------------------------------------------------
@pytest.mark.parametrize("size", [300, 60])
def test_bm25_recall_at_5_on_the_evaluation_set(size):
    chunks: list[Chunk] = []
    for path in sorted(EVAL.glob("*.md")):
        doc = Document(path.name, path.read_text("utf-8"), None, "markdown")
        chunks += chunk_document(doc, size=size, overlap=10)
    questions = json.loads((EVAL / "questions.json").read_text("utf-8"))
    assert len(questions) >= 40 and len({q["document"] for q in questions}) >= 30
    index = LexicalIndex.build(chunks)
    hits = {"en": [], "zh": []}
    for q in questions:
        top = [chunks[i] for i, _ in index.search(q["question"], 5)]
        hits[q["language"]].append(any(c.document == q["document"] and q["answer"] in c.text for c in top))
    allhits = hits["en"] + hits["zh"]
    recall = sum(allhits) / len(allhits)
    print(f"\nBM25 recall@5 (chunks of {size} tokens, {len(chunks)} chunks): {recall:.3f} "
          f"(en {sum(hits['en'])}/{len(hits['en'])}, zh {sum(hits['zh'])}/{len(hits['zh'])})")
    assert recall >= 0.8


def test_a_pdf_read_by_the_documents_reader_gives_chunks_their_pages() -> None:
    """The whole way for a real PDF: pypdf's text, its page breaks, then the chunker's pages."""
    from fpdf import FPDF

    from modules.core.documents import read_document

    pdf = FPDF()
    for n in (1, 2, 3):
        pdf.add_page()
        pdf.set_font("Helvetica", size=12)
        pdf.multi_cell(0, 8, f"Page {n} is about topic number {n}. " * 5)
    doc = read_document("three.pdf", bytes(pdf.output()), max_chars=100_000, max_pages=10)
    chunks = chunk_document(doc, size=40, overlap=0)
    assert {c.page for c in chunks} == {1, 2, 3}
    assert all(f"topic number {c.page}" in c.text for c in chunks)
