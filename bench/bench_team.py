"""One app process against two behind nginx: concurrent streams held before time to first token doubles.

    .venv/bin/python bench/bench_team.py [--counts 4,8,16,...] [--path ui|api] [--json FILE]

On this machine, all on 127.0.0.1: the fake upstream (``python -m tests.fakes.openai_server``:
every request gets ``--tokens`` tokens at ``--rate`` tokens/s, as bench_streaming.py uses it), a
throwaway PostgreSQL cluster (tests/pg_cluster.py) holding the history of every app process, and

* ``1 proc``: one app process (``ChuanhuStyleChat.py``), asked directly;
* ``2 procs``: two more app processes behind nginx (deploy/nginx.conf rendered by
  deploy/nginx_conf.py: cookie-hashed sticky sessions), asked through nginx.

All three app processes run the whole time; one set-up is loaded at a time, alternating at each
N (1 proc N, 2 procs N, 1 proc next N, ...), so both see the same machine. A round at N: N
"held" streams start, spread over ``--ramp`` s (each one a browser of its own: its own
``chuanhu_route`` cookie, its own page session), then, while all N stream, ``--probes`` more
chats start one by one, ``--probe-gap`` s apart. A probe's figure is its time to first token
(TTFT: from the page's add_message POST to the first reply text); then it leaves, and the app
stops its reply (``runs.unwatched: stop``, no grace), so the load stays N streams, not N plus the
probes. A set-up's sweep ends at the first N whose probes' TTFT p50 reaches ``--factor`` (2)
times its p50 at the first N; the streams it held is where the p50 crossed that line,
interpolated linearly between that N and the one before (and, coarser, the last N below it).
``--repeat`` sweeps (3) run one after another; the figure is the median of their ratios (target
>= 1.8).

The load generator is bench_streaming.py's (one asyncio process, httpx, Gradio's queue protocol by
hand); it shares the machine's cores with everything else, as bench_streaming.py's does. It
decodes a held stream's updates only until its first text and then its completion (whose whole
text is checked against the fake's), so that its own CPU stays small next to the apps'.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.bench_streaming import (  # noqa: E402
    API_KEY, CHILDREN, Chat, Expected, discover, gradio_chat, load_average, ms, open_session, spawn, wait_ready)
from bench.procs import child_env, cpu_seconds, free_port, machine_busy, pct, stop_process, tail, terminated  # noqa: E402
from deploy.nginx_conf import render  # noqa: E402
from tests.pg_cluster import Cluster, find_bindir  # noqa: E402

HOST = "127.0.0.1"


class Browser:
    """What gradio_chat needs of an httpx client (post, stream), with one browser's route cookie
    on every request: nginx hashes it to that browser's process."""

    def __init__(self, client: httpx.AsyncClient, route: str | None = None):
        self.client = client
        self.headers = {"Cookie": f"chuanhu_route={route or secrets.token_hex(16)}"}

    def post(self, url: str, **kwargs: Any):
        return self.client.post(url, headers=self.headers, **kwargs)

    def stream(self, method: str, url: str, **kwargs: Any):
        return self.client.stream(method, url, headers=self.headers, **kwargs)

    def get(self, url: str, **kwargs: Any):
        return self.client.get(url, headers=self.headers, **kwargs)


@dataclass
class Setup:
    name: str
    url: str  # where the load generator asks
    pids: list[int]  # the app processes (their CPU is measured)
    app: Any = None  # bench_streaming.AppInfo
    baseline: float = math.nan  # the probes' TTFT p50 at the first N (of this sweep)
    held: int = 0  # the largest N whose probes' TTFT p50 stayed below factor x baseline
    crossing: float = math.nan  # the N where the p50 reaches factor x baseline (interpolated)
    done: bool = False
    last: tuple[int, float] | None = None  # (N, p50) of the previous round
    routes: list[list[str]] | None = None  # --spread even: route cookies by the process nginx sends them to

    def route(self, i: int, offset: int = 0) -> str | None:
        """The route cookie of the i-th browser of a round (None: a random one). With ``routes``,
        browsers take the processes in turn: i = 0, 1, 2, ... on process 0, 1, 0, ..."""
        if not self.routes:
            return None
        pool = self.routes[i % len(self.routes)]
        return pool[(offset + i // len(self.routes)) % len(pool)]

    def reset(self) -> None:
        self.baseline, self.held, self.crossing, self.done, self.last = math.nan, 0, math.nan, False, None

    def record(self, n: int, p50: float, failed: bool, factor: float) -> float:
        """One round's p50 at N; its ratio to the baseline. Ends the set-up at the first N whose p50
        reaches factor x baseline (the crossing: between this N and the last, linearly) or whose
        chats failed (the crossing: the last N)."""
        if math.isnan(self.baseline):
            self.baseline = p50
        ratio = p50 / self.baseline
        target = factor * self.baseline
        if failed or ratio >= factor:
            self.done = True
            if self.last is None:
                self.crossing = float(n) if not failed else math.nan
            elif failed:
                self.crossing = float(self.last[0])
            else:
                n0, t0 = self.last
                self.crossing = n0 + (n - n0) * (target - t0) / (p50 - t0) if p50 > t0 else float(n)
        else:
            self.held = n
        self.last = (n, p50)
        return ratio


def no_cookies() -> httpx.Cookies:
    """A cookie jar that keeps nothing: each Browser sends its own cookie, nginx's Set-Cookie is dropped."""
    return httpx.Cookies(CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])))


async def one_chat(browser: Browser, setup: Setup, path: str, max_events: int, timeout: float, *,
                   probe: bool = False) -> Chat:
    """A held stream (read to its end, its updates counted, not decoded) or a probe (left at its
    first text: the app stops its reply, so that probes add no load of their own)."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            session = await open_session(browser, setup.app) if path == "ui" and setup.app.load_fn is not None else None
            return await gradio_chat(browser, setup.app, path, max_events, session,  # type: ignore[arg-type]
                                     light=not probe, first_text_only=probe)
    except TimeoutError:
        return Chat(error=f"timeout after {timeout:.0f} s", started=started, ended=time.perf_counter())
    except httpx.HTTPError as exc:
        return Chat(error=f"{type(exc).__name__}: {exc}", started=started, ended=time.perf_counter())


async def run_round(client: httpx.AsyncClient, setup: Setup, n: int, args: argparse.Namespace,
                    expected: Expected, ours: Any) -> dict[str, Any]:
    """``ours()``: our processes (every app, the fake, nginx, PostgreSQL's): what is left of
    the machine's CPU besides them and this one is someone else's (``foreign_cpu_pct``)."""
    ideal = args.tokens / args.rate
    timeout = ideal * 3 + 30
    max_events = len(expected.tokens) * 4 + 200
    held_chats: list[asyncio.Task] = []
    cpu0 = [cpu_seconds(pid) for pid in setup.pids]
    groups = ours()  # {"fake": [pid], "nginx": [...], "postgres": [...], "apps": [every app's pid]}
    others = [pid for pids in groups.values() for pid in pids]
    other0 = [_cpu(pid) for pid in others]
    machine0, client0 = machine_busy(), time.process_time()
    t0 = time.perf_counter()
    for i in range(n):  # the held streams, spread over the ramp
        await asyncio.sleep(max(0.0, t0 + args.ramp * i / n - time.perf_counter()))
        held_chats.append(asyncio.create_task(one_chat(Browser(client, setup.route(i)), setup, args.path,
                                                       max_events, timeout)))
    await asyncio.sleep(max(0.0, t0 + args.ramp + args.settle - time.perf_counter()))
    # The probes, one every probe_gap seconds, while every held stream is still streaming (a reply
    # lasts ideal seconds: main() checks that the last probe starts well before the first ends).
    probe_tasks: list[asyncio.Task] = []
    p0 = time.perf_counter()
    for k in range(args.probes):
        await asyncio.sleep(max(0.0, p0 + k * args.probe_gap - time.perf_counter()))
        route = setup.route(k, offset=(n + 1) // 2)  # (after the held streams' cookies)
        probe_tasks.append(asyncio.create_task(one_chat(Browser(client, route), setup, args.path, max_events,
                                                        timeout, probe=True)))
    held = await asyncio.gather(*held_chats)
    probes = list(await asyncio.gather(*probe_tasks))
    wall = time.perf_counter() - t0
    cpu = sum(cpu_seconds(pid) - c for pid, c in zip(setup.pids, cpu0))
    used = {pid: max(0.0, _cpu(pid) - c) for pid, c in zip(others, other0)}  # (a backend that ended: 0)
    other = sum(used.values())
    # Besides the set-up's apps, where the machine's CPU went: each helper of the benchmark (and the
    # other set-up's apps: paused, so none).
    parts = {name: 100 * sum(used[pid] for pid in pids if pid not in setup.pids) / wall
             for name, pids in groups.items()}
    machine = machine_busy() - machine0
    client = time.process_time() - client0
    for chat in held:
        if chat.ok and chat.text != expected.text:
            chat.ok, chat.error = False, expected.mismatch(chat.text)
    for chat in probes:  # (a probe's text is the reply's beginning)
        if chat.ok and not expected.text.startswith(chat.text):
            chat.ok, chat.error = False, f"a probe's first text is not the reply's beginning: {chat.text[:60]!r}"
    ttfts = [c.ttft for c in probes if c.ttft is not None]
    held_ttfts = [c.ttft for c in held if c.ttft is not None]
    last_probe_start = max((c.started for c in probes), default=t0)
    still = sum(1 for c in held if c.ended > last_probe_start)
    durations = [c.duration for c in held if c.ok]
    return {
        "setup": setup.name, "n": n, "ok": sum(c.ok for c in held), "probes_ok": sum(c.ok for c in probes),
        "errors": sorted({c.error for c in [*held, *probes] if not c.ok})[:5],
        "ttft_p50": pct(ttfts, 50), "ttft_p95": pct(ttfts, 95),
        # Where a probe's time to first token goes: the queue's join answer, its process_starts, the first text.
        "join_p50": pct([c.joined - c.started for c in probes if c.joined], 50),
        "starts_p50": pct([c.processing - c.started for c in probes if c.processing], 50),
        "held_ttft_p50": pct(held_ttfts, 50), "held_ttft_p95": pct(held_ttfts, 95),
        "dur_max": max(durations) if durations else math.nan, "streaming_at_last_probe": still,
        "wall": wall, "app_cpu_pct": 100 * cpu / wall, "ours_cpu_pct": 100 * other / wall,
        **{f"{name}_cpu_pct": value for name, value in parts.items()},
        "client_cpu_pct": 100 * client / wall, "machine_cpu_pct": 100 * machine / wall,
        "foreign_cpu_pct": max(0.0, 100 * (machine - other - client) / wall),
    }


class CpuQuota:
    """Each app process held to ``cpus`` of a core (a Linux cgroup's CPU quota, as ``docker
    --cpus`` does), so that on a small machine the load generator, the fake upstream, nginx and
    PostgreSQL keep cores of their own: ``1 proc`` then has one such "core" and ``2 procs`` two,
    and the ratio measures the app's scaling, not the machine's. cgroup v1 (``/sys/fs/cgroup/cpu``)
    or v2; needs root. :meth:`release` moves the processes back and removes the groups."""

    PERIOD_US = 20_000  # a short period: a process over its quota waits at most this long

    def __init__(self, cpus: float):
        self.cpus = cpus
        v1 = Path("/sys/fs/cgroup/cpu")
        self.root = v1 if (v1 / "cpu.cfs_quota_us").exists() or (v1 / "tasks").exists() else Path("/sys/fs/cgroup")
        self.groups: list[Path] = []

    def limit(self, pid: int) -> None:
        group = self.root / f"chuanhu-bench-{pid}"
        group.mkdir(exist_ok=True)
        self.groups.append(group)
        quota = max(1000, int(self.cpus * self.PERIOD_US))
        if (group / "cpu.cfs_quota_us").exists():
            (group / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        (group / "cgroup.procs").write_text(str(pid))  # (every thread of it, and those it starts)

    def release(self) -> None:
        for group in self.groups:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self.root / "cgroup.procs").write_text(pid)
                group.rmdir()
        self.groups.clear()


async def routes_by_process(client: httpx.AsyncClient, url: str, ports: list[int], each: int) -> list[list[str]]:
    """Route cookies sorted by the process nginx sends them to (asked once each: the response's
    X-Bench-Upstream), ``each`` for every process: browsers that spread over the processes evenly,
    as a team's many users do (with a few dozen, hashing alone leaves one process a few more)."""
    pools: dict[str, list[str]] = {f"{HOST}:{port}": [] for port in ports}
    for _ in range(each * len(ports) * 20):
        if all(len(pool) >= each for pool in pools.values()):
            break
        route = secrets.token_hex(16)
        r = await client.get(f"{url}/chuanhu-bench-route", headers={"Cookie": f"chuanhu_route={route}"})
        upstream = r.headers.get("X-Bench-Upstream", "")
        if upstream in pools and len(pools[upstream]) < each:
            pools[upstream].append(route)
    if not all(len(pool) >= each for pool in pools.values()):
        raise SystemExit(f"could not find {each} route cookies for each process: {[len(p) for p in pools.values()]}")
    return list(pools.values())


def pause_others(setups: list[Setup], loaded: Setup) -> None:
    """Only ``loaded``'s app processes run: the other set-up's are paused (SIGSTOP), so that idle
    processes (Gradio's queue wakes every millisecond) take nothing from the one measured."""
    for setup in setups:
        for pid in setup.pids:
            if setup is not loaded:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
    for pid in loaded.pids:
        resume(pid)


def resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def postgres_pids(cluster: Cluster) -> list[int]:
    """The cluster's server processes (its postmaster and backends, as they are now)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(cluster.data) in (entry / "cmdline").read_bytes().decode(errors="replace") or \
                        _ppid(entry) == _postmaster(cluster):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except (OSError, IndexError, ValueError):
        return 0.0


def nginx_workers(master: int) -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _ppid(e) == str(master)]


def _ppid(entry: Path) -> str:
    try:
        return entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return ""


def _postmaster(cluster: Cluster) -> str:
    try:
        return (cluster.data / "postmaster.pid").read_text().split()[0]
    except (OSError, IndexError):
        return "-"


def start_app(tmp: Path, name: str, port: int, fake_port: int, history_url: str, args: argparse.Namespace
              ) -> tuple[subprocess.Popen, Path]:
    config = {
        "server": {"host": HOST, "port": port, "concurrency": args.concurrency},
        "ui": {"update_interval_ms": args.interval_ms},
        # (with --history-mode shared every page is one owner); a probe leaves at its first text and
        # its reply stops at once, so that the load is the N held streams, not N + the probes.
        # The set-up not being measured is paused (SIGSTOP) meanwhile: a lease longer than the
        # benchmark keeps the others from taking a paused process for dead.
        "runs": {"max_per_owner": 1000, "unwatched": "stop", "unwatched_grace_seconds": 0, "lease_seconds": 600},
        # per_browser: each simulated browser is a user of its own, with its own (short) history,
        # as a team's users are; shared would make every page list every conversation of the run.
        "history": {"mode": args.history_mode, "data_dir": str(tmp / "data"), "url": history_url,
                    "pool_size": args.pool_size},
        "models": [{"provider": "openai", "name": "fake", "model": "fake-model",
                    "base_url": f"http://{HOST}:{fake_port}/v1", "api_key": API_KEY, "max_retries": 0}],
    }
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config))
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        proc = spawn([sys.executable, str(ROOT / "ChuanhuStyleChat.py"), "--config", str(tmp / f"{name}.yaml")],
                     cwd=tmp, env={k: v for k, v in child_env().items()
                                   if k not in ("CHUANHU_HISTORY_URL", "CHUANHU_DATA_DIR")},
                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, log


async def bench(args: argparse.Namespace, counts: list[int]
                ) -> tuple[list[dict[str, Any]], list[dict[str, dict[str, Any]]]]:
    expected = Expected(args.tokens, args.seed)
    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL's server programs are not installed (apt-get install postgresql)")
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx_bin, os.X_OK):
        raise SystemExit("nginx is not installed (apt-get install nginx)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-team-"))
    tmp.chmod(0o755)  # nginx's workers (nobody, as root) reach their temp folders through it
    cluster = Cluster(bindir)
    nginx = None
    rows: list[dict[str, Any]] = []
    sweeps: list[dict[str, dict[str, Any]]] = []
    apps: list[tuple[subprocess.Popen, Path]] = []
    quota = CpuQuota(args.cpus_per_app) if args.cpus_per_app > 0 else None
    try:
        cluster.start()
        database = cluster.new_database()
        history_url = cluster.url(database)
        fake_port = free_port()
        with open(tmp / "fake.log", "wb") as out:
            fake = spawn([sys.executable, "-m", "tests.fakes.openai_server", "--port", str(fake_port), "--tokens",
                          str(args.tokens), "--rate", str(args.rate), "--first-token-ms", str(args.first_token_ms),
                          "--usage", "--api-key", API_KEY,
                          "--seed", str(args.seed)], cwd=ROOT, env=child_env(), stdout=out,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ports = [free_port() for _ in range(3)]
        apps = [start_app(tmp, name, port, fake_port, history_url, args)
                for name, port in zip(("solo", "team-a", "team-b"), ports)]
        if quota is not None:
            try:
                for proc, _ in apps:
                    quota.limit(proc.pid)
            except OSError as exc:
                raise SystemExit(f"--cpus-per-app needs root and cgroups' cpu controller: {exc}") from None
        nginx_port = free_port()
        run = tmp / "nginx"
        conf = run / "nginx.conf"
        conf_text = render(run, f"{HOST}:{nginx_port}", [f"{HOST}:{p}" for p in ports[1:]])
        conf_text = conf_text.replace(  # (a log line per request would cost the team only)
            "access_log " + str(run.resolve() / "logs" / "access.log") + " chuanhu;", "access_log off;")
        conf.write_text(conf_text.replace(  # (which process answered: routes_by_process reads it)
            "add_header X-Accel-Buffering no always;",
            "add_header X-Accel-Buffering no always; add_header X-Bench-Upstream $upstream_addr always;"))
        limits = httpx.Limits(max_connections=4000, max_keepalive_connections=1000)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0, read=120.0), trust_env=False,
                                     cookies=no_cookies()) as client:
            await wait_ready(client, f"http://{HOST}:{fake_port}/v1/models", fake, tmp / "fake.log", 30, "the fake server")
            for (proc, log), port in zip(apps, ports):
                await wait_ready(client, f"http://{HOST}:{port}/config", proc, log, args.startup_timeout, "an app")
            nginx = spawn([nginx_bin, "-p", str(run), "-c", str(conf), "-g", "daemon off;"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(run / "stderr.log", "wb"))
            await wait_ready(client, f"http://{HOST}:{nginx_port}/config", nginx, run / "logs" / "error.log", 30, "nginx")
            setups = [Setup("1 proc", f"http://{HOST}:{ports[0]}", [apps[0][0].pid]),
                      Setup("2 procs", f"http://{HOST}:{nginx_port}", [apps[1][0].pid, apps[2][0].pid])]
            for setup in setups:
                setup.app = await discover(client, setup.url)
            if args.spread == "even":
                setups[1].routes = await routes_by_process(client, setups[1].url, ports[1:],
                                                           (max(counts) + args.probes) // 2 + 1)
            def ours() -> dict[str, list[int]]:
                return {"fake": [fake.pid], "nginx": [nginx.pid, *nginx_workers(nginx.pid)],
                        "postgres": postgres_pids(cluster), "apps": [p.pid for p, _ in apps]}

            print(f"# ready: 1 proc pid {apps[0][0].pid}; 2 procs pids {apps[1][0].pid}, {apps[2][0].pid} behind "
                  f"nginx pid {nginx.pid}; fake pid {fake.pid}; PostgreSQL {cluster.port}", flush=True)
            # Warm up each process (first-call imports, pools): a few chats through each set-up.
            for setup in setups:
                pause_others(setups, setup)
                warm = await run_round(client, setup, 4, argparse.Namespace(**{**vars(args), "probes": 2}),
                                       expected, ours)
                if warm["ok"] < 4:
                    raise SystemExit(f"warm-up of {setup.name} failed: {warm['errors']}\n{tail(apps[0][1])}")
            for sweep in range(args.repeat):
                for setup in setups:
                    setup.reset()
                for n in counts:
                    for setup in setups:
                        if setup.done:
                            continue
                        pause_others(setups, setup)
                        await asyncio.sleep(args.pause)
                        row = await run_round(client, setup, n, args, expected, ours)
                        row["sweep"] = sweep
                        rows.append(row)
                        failed = row["ok"] < n or row["probes_ok"] < args.probes
                        row["ratio"] = setup.record(n, row["ttft_p50"], failed, args.factor)
                        print(f"# {sweep + 1}/{args.repeat} {setup.name:<7} N={n:<4} probes TTFT p50 "
                              f"{ms(row['ttft_p50']):>5} ms (x{row['ratio']:.2f})  p95 {ms(row['ttft_p95']):>5}  "
                              f"held ok {row['ok']}/{n}, {row['streaming_at_last_probe']} streaming at the last "
                              f"probe  app CPU {row['app_cpu_pct']:.0f}%  load generator {row['client_cpu_pct']:.0f}%"
                              f"  fake {row['fake_cpu_pct']:.0f}%  PostgreSQL {row['postgres_cpu_pct']:.0f}%  nginx "
                              f"{row['nginx_cpu_pct']:.0f}%  idle apps {row['apps_cpu_pct']:.0f}%"
                              f"  machine {row['machine_cpu_pct']:.0f}% (others' {row['foreign_cpu_pct']:.0f}%)"
                              + (f"  errors: {row['errors']}" if row["errors"] else ""), flush=True)
                        for proc, log in apps:
                            if proc.poll() is not None:
                                raise SystemExit(f"an app exited ({proc.returncode}):\n{tail(log)}")
                    if all(s.done for s in setups):
                        break
                sweeps.append({s.name: {"baseline": s.baseline, "held": s.held, "crossing": s.crossing,
                                        "reached": s.done} for s in setups})
                solo, team = sweeps[-1].values()
                print(f"# sweep {sweep + 1}: doubling at N = {solo['crossing']:.1f} (1 proc) and "
                      f"{team['crossing']:.1f} (2 procs): x{team['crossing'] / solo['crossing']:.2f}", flush=True)
    finally:
        for proc, _ in apps:
            resume(proc.pid)  # (a paused process would not hear SIGTERM)
        if quota is not None:
            quota.release()
        stop_process(nginx)
        for proc in list(CHILDREN):
            stop_process(proc)
        cluster.stop()
        if args.keep_logs:
            print(f"# logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows, sweeps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="2,8,12,14,16,18,20,22,24,26,28,30,32,34,36,40,44,48,56,64,80,96,128",
                        help="held streams per round, increasing, comma-separated")
    parser.add_argument("--path", choices=["ui", "api"], default="ui",
                        help="ui: what the page does (default); api: the /chat endpoint")
    parser.add_argument("--tokens", type=int, default=600, help="tokens per reply (default 600)")
    parser.add_argument("--rate", type=float, default=40.0, help="upstream tokens per second (default 40: 15 s)")
    parser.add_argument("--first-token-ms", type=float, default=250.0,
                        help="the fake's time to first token, as a hosted model's (default 250 ms): TTFT doubles "
                             "once the app adds as much, near a process's saturation")
    parser.add_argument("--ramp", type=float, default=3.0, help="seconds over which the held streams start")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after the ramp before the probes")
    parser.add_argument("--probes", type=int, default=16, help="probe chats per round (default 16)")
    parser.add_argument("--probe-gap", type=float, default=0.4,
                        help="seconds between probe starts (default 0.4: the probes' own load stays small)")
    parser.add_argument("--repeat", type=int, default=3, help="sweeps over the counts (default 3): the median ratio")
    parser.add_argument("--factor", type=float, default=2.0, help="TTFT p50 growth that ends a set-up (default 2)")
    parser.add_argument("--interval-ms", type=int, default=40, help="the apps' ui.update_interval_ms")
    parser.add_argument("--concurrency", type=int, default=1000, help="the apps' server.concurrency")
    parser.add_argument("--pool-size", type=int, default=20, help="each app's history.pool_size")
    parser.add_argument("--history-mode", choices=("per_browser", "shared"), default="per_browser",
                        help="history.mode of the apps (default per_browser: each browser its own user)")
    parser.add_argument("--spread", choices=("even", "hash"), default="even",
                        help="even (default): the browsers of a round take the two processes in turn (their "
                             "cookies picked by where nginx sends them), as a large team's users spread; hash: "
                             "random cookies, as nginx's hash spreads a few dozen browsers (unevenly)")
    parser.add_argument("--cpus-per-app", type=float, default=0.0, metavar="CPUS",
                        help="hold each app process to CPUS of a core (a cgroup quota, root only; 0: no limit, "
                             "the default): on a 2-core machine 0.5 leaves a core to the load generator, the "
                             "fake, nginx and PostgreSQL")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of rest before each round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    counts = sorted({int(c) for c in args.counts.split(",") if c.strip()})
    if args.probes < 1 or args.repeat < 1 or not counts or counts[0] < 1:
        parser.error("--counts, --probes and --repeat must be positive")
    ideal = args.tokens / args.rate
    if args.ramp + args.settle + args.probes * args.probe_gap >= ideal * 0.8:
        parser.error("the probes must start while the held streams stream: raise --tokens or lower --ramp/--probes")
    print(f"# ChuanhuStyleChat team benchmark: 1 app process vs 2 behind nginx; {args.tokens} tokens at "
          f"{args.rate:g}/s ({ideal:.0f} s a reply, the first after {args.first_token_ms:g} ms), path {args.path}, held streams {counts}, {args.probes} probes "
          f"a round, stop at TTFT p50 x{args.factor:g}")
    if args.cpus_per_app > 0:
        print(f"# each app process held to {args.cpus_per_app:g} of a core (cgroup CPU quota)")
    print(f"# Python {platform.python_version()}, gradio {version('gradio')}, httpx {httpx.__version__}, "
          f"{os.cpu_count()} CPUs, load average {load_average()}", flush=True)
    signal.signal(signal.SIGTERM, terminated)
    try:
        rows, sweeps = asyncio.run(bench(args, counts))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for proc in CHILDREN:
            stop_process(proc)
    print()
    print(f"{'sweep':>5} {'set-up':<7} {'N':>4} | {'probe TTFT p50':>14} {'p95':>6} {'x base':>6} | {'held TTFT p50':>13} "
          f"{'p95':>6} | {'ok':>9} {'dur max':>7} | {'app CPU':>7} {'machine':>7} {'others':>6}")
    for row in rows:
        print(f"{row['sweep'] + 1:>5} {row['setup']:<7} {row['n']:>4} | {ms(row['ttft_p50']):>11} ms {ms(row['ttft_p95']):>6} "
              f"{row['ratio']:>6.2f} | {ms(row['held_ttft_p50']):>10} ms {ms(row['held_ttft_p95']):>6} | "
              f"{str(row['ok']) + '/' + str(row['n']):>9} {row['dur_max']:>6.1f}s | {row['app_cpu_pct']:>6.0f}% "
              f"{row['machine_cpu_pct']:>6.0f}% {row['foreign_cpu_pct']:>5.0f}%")
    print()
    ratios, held_ratios = [], []
    for k, sweep in enumerate(sweeps):
        solo, team = sweep["1 proc"], sweep["2 procs"]
        ratio = team["crossing"] / solo["crossing"]
        ratios.append(ratio)
        held_ratios.append(team["held"] / solo["held"] if solo["held"] else math.nan)
        print(f"sweep {k + 1}: TTFT p50 doubles at N = {solo['crossing']:.1f} for 1 proc (baseline "
              f"{ms(solo['baseline'])} ms; held {solo['held']}) and N = {team['crossing']:.1f} for 2 procs "
              f"(baseline {ms(team['baseline'])} ms; held {team['held']}): {ratio:.2f}x"
              + ("" if solo["reached"] and team["reached"] else f" (not reached by N = {counts[-1]})"))
    median = statistics.median(ratios) if ratios else math.nan
    print("CPU in % of one core: app: the set-up's app processes; machine: all of it; others: what no process "
          "of this benchmark used (other work on the machine: above ~20% the figures are noisy)")
    print(f"ratio 2 procs / 1 proc, streams held before TTFT p50 doubles (interpolated N), median of "
          f"{len(ratios)} sweep(s): {median:.2f}x (target >= 1.8x); by the last N below the doubling: "
          f"{statistics.median(held_ratios) if held_ratios else math.nan:.2f}x. On {os.cpu_count()} cores "
          "shared with the load generator, the fake upstream, nginx and PostgreSQL")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "rows": rows, "sweeps": sweeps, "ratios": ratios,
                                   "ratio": median}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
