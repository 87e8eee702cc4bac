"""Knowledge bases at size (issue #14): index 1,000 pages, then ask questions through the app.

    .venv/bin/python bench/bench_knowledge.py [--pages 1000] [--queries 200] [--questions 20]

1. In process, with the app's own ``KnowledgeIndexer``: 1,000 generated pages (English and
   Chinese alternating, fixed seed, one Markdown file each) added as a folder and indexed
   (read, chunked, saved in SQLite, BM25 index built and saved): the time, the passages made,
   the size on disk (``knowledge.sqlite3`` and the index folder), then the latency and CPU of
   ``--queries`` searches (k=5) through the retriever the chat pipeline calls, p50 / p95.
2. Through the app's real HTTP surface (gradio_client: ``/add_message`` then ``/respond``, as the
   page does), its data folder the one indexed above: the base is shared from config, and two
   model entries talk to one fake OpenAI upstream that answers at once, one with
   ``knowledge: [Bench]``, one without. The app's CPU (``/proc``) per question in each series;
   the difference is what retrieval adds to a question (search, passages fitted and counted,
   sources rendered and saved).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.bench_retrieval import EN, ZH, pages  # noqa: E402
from bench.procs import child_env, cpu_seconds, free_port, pct, stop_process, terminated, wait_ready  # noqa: E402
from tests.fakes.openai_server import FakeOpenAIServer, Script  # noqa: E402

HOST = "127.0.0.1"
NEUTRAL = (1.0, 1.0, 0, "", 0, 0, -1)
BASE = "Bench"


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def queries(n: int, rng: random.Random) -> list[str]:
    return ["".join(rng.sample(ZH, 2)) + "的" + rng.choice(ZH) + "是什么" if i % 2 else
            f"how does the {' '.join(rng.sample(EN, 3))} work" for i in range(n)]


def index_folder(folder: Path, data: Path, n_queries: int, rng: random.Random) -> list[tuple[str, str]]:
    from modules.history.attachments import open_files
    from modules.history.knowledge import SHARED, open_knowledge
    from modules.history.knowledge_index import KnowledgeIndexer

    store, problem = open_knowledge(data)
    assert problem is None, problem
    indexer = KnowledgeIndexer(store, open_files(data), data / "knowledge-index", max_chars=2_000_000, max_pages=2000)
    t0, c0 = time.perf_counter(), cpu()
    reports = indexer.sync_shared([(BASE, folder)])
    base = next(b for b in store.list_bases(SHARED) if b.name == BASE)
    report = indexer.index_pending(SHARED, base.id)
    took, took_cpu = time.perf_counter() - t0, cpu() - c0
    assert not report.failed and not reports[BASE].skipped, (report.failed, reports[BASE].skipped)
    retriever = indexer.shared_retriever([BASE])
    asked = queries(n_queries, rng)
    for q in asked[:5]:
        retriever.retrieve(q, 5)  # warm (the index loaded, jieba's dictionary read)
    latency, cpus, hits = [], [], 0
    for q in asked:
        c, t = cpu(), time.perf_counter()
        hits += bool(retriever.retrieve(q, 5))
        latency.append((time.perf_counter() - t) * 1000)
        cpus.append((cpu() - c) * 1000)
    store.close()
    disk = size_of(data / "knowledge.sqlite3") + size_of(data / "knowledge-index")
    return [
        ("pages (one file each, EN/ZH alternating)", f"{len(list(folder.iterdir())):,}"),
        ("characters", f"{sum(size_of(p) for p in folder.iterdir()) / 1e6:.1f} MB of UTF-8"),
        ("passages (chunks of ~300 tokens)", f"{report.chunks:,}"),
        ("time to index the folder (add, read, chunk, save, BM25)", f"{took:.1f} s wall, {took_cpu:.1f} s CPU"),
        ("size on disk (knowledge.sqlite3 + BM25 index)", f"{disk / 1e6:.1f} MB"),
        (f"retrieval latency p50 / p95 ({len(asked)} queries, k=5)", f"{pct(latency, 50):.2f} / {pct(latency, 95):.2f} ms"),
        ("retrieval CPU per query (mean)", f"{statistics.mean(cpus):.2f} ms"),
        ("queries with a passage found", f"{hits}/{len(asked)}"),
    ]


def through_the_app(tmp: Path, folder: Path, data: Path, questions: int, rounds: int,
                    rng: random.Random) -> list[tuple[str, str]]:
    from gradio_client import Client

    app = client = None
    try:
        with FakeOpenAIServer(default_script=Script(tokens=["It is [1]."])) as fake:
            port = free_port()
            model = {"provider": "openai", "model": "gpt-4o-mini", "base_url": fake.base_url,
                     "api_key": "sk-bench-0000", "max_retries": 0, "context_size": 16000}
            config = {"server": {"host": HOST, "port": port},
                      "history": {"mode": "shared", "data_dir": str(data)},
                      "knowledge": {"bases": [{"name": BASE, "folder": str(folder)}]},
                      "models": [{**model, "name": "plain"}, {**model, "name": "grounded", "knowledge": [BASE]}]}
            (tmp / "config.yaml").write_text(yaml.safe_dump(config))
            log = tmp / "app.log"
            started = time.perf_counter()
            with open(log, "wb") as out:
                app = subprocess.Popen([sys.executable, str(ROOT / "ChuanhuStyleChat.py"), "--config",
                                        str(tmp / "config.yaml")], cwd=tmp, env=child_env(), stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            wait_ready(f"http://{HOST}:{port}/config", app, log, 180)
            ready = time.perf_counter() - started
            client = Client(f"http://{HOST}:{port}/", verbose=False)
            asked = queries(questions * 3, rng)

            def series(name: str, offset: int) -> float:
                total = 0.0
                for i in range(questions):
                    client.predict(name, "", api_name="/new_chat")
                    before = cpu_seconds(app.pid)
                    client.predict({"text": asked[offset + i], "files": []}, name, "", "", api_name="/add_message")
                    client.predict(name, "", *NEUTRAL, api_name="/respond")
                    total += cpu_seconds(app.pid) - before
                return total * 1000 / questions

            series("grounded", 0)  # warm-up: first requests, the index loaded, jieba's dictionary read
            plains, groundeds = [], []
            for _ in range(rounds):  # alternating, so that a busy moment of the machine hits both
                plains.append(series("plain", questions))
                groundeds.append(series("grounded", 2 * questions))
            plain, grounded = statistics.mean(plains), statistics.mean(groundeds)
            cited = [r for r in fake.requests if "[1] page" in str(r.body.get("messages", [{}])[-1].get("content"))]
            assert len(cited) == (rounds + 1) * questions, f"{len(cited)} requests carried passages"
    finally:
        if client is not None:
            client.close()
        stop_process(app)
    return [
        ("app start with the base already indexed (unchanged files skipped)", f"{ready:.1f} s"),
        (f"app CPU per question, no knowledge base (mean of {rounds} series)",
         f"{plain:.1f} ms ({', '.join(f'{v:.1f}' for v in plains)})"),
        (f"app CPU per question, answering from the base (mean of {rounds} series)",
         f"{grounded:.1f} ms ({', '.join(f'{v:.1f}' for v in groundeds)})"),
        ("**what retrieval adds to a question**", f"**{grounded - plain:.1f} ms**"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=1000, help="pages to index (default 1000)")
    parser.add_argument("--queries", type=int, default=200, help="searches timed in process (default 200)")
    parser.add_argument("--questions", type=int, default=20, help="questions in each app series (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="series of each kind, alternating (default 3)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, terminated)
    rng = random.Random(14)
    tmp = Path(tempfile.mkdtemp(prefix="bench-knowledge-"))
    print(f"# ChuanhuStyleChat: knowledge bases, {args.pages:,} pages")
    print(f"# Python {platform.python_version()}, gradio {version('gradio')}, bm25s {version('bm25s')}, "
          f"{os.cpu_count()} CPUs, load average {' '.join(open('/proc/loadavg').read().split()[:3])}", flush=True)
    try:
        folder, data = tmp / "docs", tmp / "data"
        folder.mkdir()
        for name, text in pages(args.pages, rng):
            (folder / name).write_text(text, encoding="utf-8")
        rows = index_folder(folder, data, args.queries, rng)
        rows += through_the_app(tmp, folder, data, args.questions, args.rounds, rng)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("| measure | value |")
    print("|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
