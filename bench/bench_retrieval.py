"""Retrieval at knowledge-base size: 1,000 generated pages (EN and ZH, fixed seed) chunked and
indexed with BM25; index size on disk; query latency and CPU per query over 200 queries.

    /work/main/.venv/bin/python bench/bench_retrieval.py [--pages 1000] [--queries 200]
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.core.retrieval import LexicalIndex, chunk_text, tokenize, warm_up  # noqa: E402

EN = ("system data river market energy policy garden engine protein network castle harvest climate museum "
      "software battery journey theory glacier festival mineral orchestra satellite vaccine harbor library "
      "algorithm volcano cathedral currency bridge forest reactor telescope tribe desert violin kernel").split()
EN_VERBS = "measures builds explains changes protects reveals supports reduces connects describes".split()
ZH = ("数据 系统 河流 市场 能源 政策 花园 发动机 蛋白质 网络 城堡 收获 气候 博物馆 软件 电池 旅程 理论 冰川 节日 "
      "矿物 乐团 卫星 疫苗 港口 图书馆 算法 火山 教堂 货币 桥梁 森林 反应堆 望远镜 部落 沙漠 小提琴 内核").split()
ZH_VERBS = "测量 建设 解释 改变 保护 揭示 支持 减少 连接 描述".split()


def sentence(rng: random.Random, zh: bool) -> str:
    if zh:
        a, b = rng.sample(ZH, 2)
        return f"{a}{rng.choice(ZH_VERBS)}{b}的{rng.choice(ZH)}，编号{rng.randint(1, 5000)}。"
    a, b, c = rng.sample(EN, 3)
    return f"The {a} {rng.choice(EN_VERBS)} the {b} of {c}{rng.randint(1, 5000)} in a careful way."


def pages(n: int, rng: random.Random) -> list[tuple[str, str]]:
    docs = []
    for i in range(n):
        zh = i % 2 == 1
        paragraphs = ["".join(sentence(rng, zh) for _ in range(rng.randint(3, 6))) if zh else
                      " ".join(sentence(rng, zh) for _ in range(rng.randint(3, 6))) for _ in range(rng.randint(30, 40))]
        docs.append((f"page{i:04}.{'zh' if zh else 'en'}.md", f"# Page {i}\n\n" + "\n\n".join(paragraphs)))
    return docs


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--size", type=int, default=300, help="tokens a chunk (pages are long enough for ~10,000)")
    args = ap.parse_args()
    rng = random.Random(14)
    docs = pages(args.pages, rng)
    t = time.perf_counter()
    warm_up()
    warm = time.perf_counter() - t

    t = time.perf_counter()
    chunks = [c for name, text in docs for c in chunk_text(name, text, size=args.size, overlap=10)]
    t_chunk = time.perf_counter() - t
    t = time.perf_counter()
    index = LexicalIndex.build(chunks)
    t_index = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        index.save(tmp)
        t_save = time.perf_counter() - t
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        t = time.perf_counter()
        LexicalIndex.load(tmp)
        t_load = time.perf_counter() - t
    extra = [c.text for c in chunks[:100]]
    t = time.perf_counter()
    index.add(extra)
    t_add = time.perf_counter() - t

    queries = []
    for i in range(args.queries):
        zh = i % 2 == 1
        queries.append("".join(rng.sample(ZH, 2)) + "的" + rng.choice(ZH) + "是什么" if zh else
                       f"how does the {' '.join(rng.sample(EN, 3))} work")
    for q in queries[:5]:
        index.search(q, 5)  # warm
    lat, cpus, hits = [], [], 0
    for q in queries:
        c0, t0 = cpu(), time.perf_counter()
        hits += bool(index.search(q, 5))
        lat.append((time.perf_counter() - t0) * 1000)
        cpus.append((cpu() - c0) * 1000)
    lat.sort()
    tok = sum(len(tokenize(q)) for q in queries) / len(queries)
    rows = [
        ("pages (EN/ZH alternating)", f"{len(docs):,}"),
        ("characters", f"{sum(len(t) for _, t in docs):,}"),
        ("chunks", f"{len(chunks):,} (size {args.size} tokens)"),
        ("jieba + stemmer warm-up", f"{warm:.2f} s"),
        ("chunking", f"{t_chunk:.2f} s"),
        ("tokenising + BM25 index", f"{t_index:.2f} s"),
        ("save / load", f"{t_save:.2f} s / {t_load:.2f} s"),
        ("index size on disk", f"{size / 1e6:.1f} MB"),
        ("add 100 chunks (refit)", f"{t_add * 1000:.0f} ms"),
        (f"query latency p50 / p95 ({len(queries)} q, k=5)", f"{lat[len(lat) // 2]:.2f} / {lat[int(len(lat) * .95)]:.2f} ms"),
        ("CPU per query (mean)", f"{statistics.mean(cpus):.2f} ms"),
        ("queries with a hit / terms a query", f"{hits}/{len(queries)} / {tok:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
