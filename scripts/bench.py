#!/usr/bin/env python3
"""Measure cars.py against the ceiling of its own stack and against its peers, with wrk.

Run it with `make bench`. It starts a bare "hello" app and cars.py (on MySQL and on SQLite), seeds
rows, drives each scenario with wrk from a separate process at 16 connections for a fixed time,
samples the server's CPU and memory from /proc/<pid>, prints the tables and checks the targets.
On MySQL it also runs GET /cars/{id} in interleaved rounds against cars.py with LOG_LEVEL=warning,
Flask on gunicorn and FastAPI on uvicorn (scripts/bench_peers.py), all on the same table.
Every process listens on 127.0.0.1 and is stopped before the script exits.

Environment: BENCH_DURATION (seconds per scenario, default 10), BENCH_ROUNDS (rounds of the peer
comparison, default 3), THREADS (server threads, default 8), MYSQL_HOST / MYSQL_PORT / MYSQL_USER /
MYSQL_PASSWORD (default 127.0.0.1:3306 root, no password).
Exit status: 0 when every target is met, 1 when one is missed, 2 when it cannot run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess  # nosec B404  # runs wrk and the servers under test, argv fixed here
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 16
WRK_THREADS = 2
SEED_ROWS = 1_000
BIG_ROWS = 100_000
LIST_LIMIT = 50
PY_SPY = Path(sys.executable).parent / "py-spy"
TICKS = os.sysconf("SC_CLK_TCK")
TARGETS = {
    "access_line": 0.95,  # point reads, LOG_LEVEL=info vs LOG_LEVEL=warning, same rounds
    "vs_flask": 1.2,  # point reads on MySQL with the access line on, vs Flask + gunicorn
    "vs_fastapi": 0.8,  # the same vs FastAPI + uvicorn + aiomysql
    "point_ratio": 0.50,  # GET /cars/{id} requests/s vs the ceiling's
    "list_ratio": 0.30,  # GET /cars?limit=50 requests/s vs the ceiling's
    "point_p99_ms": 10.0,
    "rss_mb": 60.0,  # server resident memory after the run
    "first_page_growth": 1.3,  # first page at 100,000 rows vs at 1,000 rows
}

# wrk runs this in each of its threads: one request shape per run, ids drawn from [lo, hi], and a
# machine-readable summary line at the end. The token comes from the environment, not argv.
WRK_SCRIPT = r"""
local method, path, lo, hi = "GET", "/", 1, 1
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
end
function init(args)
  method, path, lo, hi = args[1], args[2], tonumber(args[3]), tonumber(args[4])
  math.randomseed(os.time() * 100 + (seed or 0))
  wrk.headers["Content-Type"] = "application/json"
  local token = os.getenv("BENCH_TOKEN")
  if token and token ~= "" then wrk.headers["Authorization"] = "Bearer " .. token end
end
function request()
  local id = math.random(lo, hi)
  local target = string.gsub(path, "{id}", tostring(id))
  local body = nil
  if method == "POST" or method == "PUT" then
    body = string.format('{"brand":"Bench","model":"Model %d","year":%d}', id, 1990 + id % 35)
  end
  return wrk.format(method, target, nil, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK-RESULT {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


class BenchError(Exception):
    """Something stops the run (a server that will not start, a failed seed): exit 2."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_hello(port: int, threads: int) -> None:
    """The ceiling: the smallest Bottle app on Waitress, same thread count as cars.py."""
    import bottle
    import waitress

    app = bottle.Bottle()

    @app.get("/")
    def hello() -> dict:
        return {"hello": "world"}

    waitress.serve(app, host="127.0.0.1", port=port, threads=threads, _quiet=True)


@dataclass
class Server:
    """A server process on 127.0.0.1 whose CPU time and memory are read from /proc/<pid>."""

    name: str
    proc: subprocess.Popen
    url: str
    port: int
    logfile: Path

    @classmethod
    def start(
        cls, name: str, cmd: list[str], env: dict[str, str], workdir: Path, ready: str = "/health"
    ) -> Server:
        port = int(env["PORT"])
        logfile = workdir / f"{name}.log"
        with logfile.open("wb") as out:
            proc = subprocess.Popen(  # noqa: S603  # nosec B603  # argv built by this script
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        server = cls(name, proc, f"http://127.0.0.1:{port}", port, logfile)
        server.wait_ready(ready)
        return server

    def wait_ready(self, path: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited early:\n{self.logfile.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if request(self.port, "GET", path)[0] == 200:
                    return
            time.sleep(0.1)
        raise BenchError(f"{self.name} did not answer {path} within {timeout} s")

    def pids(self) -> list[int]:
        """The process and its children: gunicorn serves from a worker under its master."""
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = stat.read_text()
                parents.setdefault(int(text[text.rindex(")") + 2 :].split()[1]), []).append(
                    int(stat.parent.name)
                )
        found, todo = [], [self.proc.pid]
        while todo:
            found.append(pid := todo.pop())
            todo += parents.get(pid, [])
        return found

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):  # a child that just exited
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()  # fields after the command name
                total += (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
        return total

    def memory_mb(self, key: str) -> float:
        """VmRSS (now) or VmHWM (peak) of the process and its children, in MiB."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(key + ":"):
                        total += int(line.split()[1]) / 1024
        return total

    def settle(self, timeout: float = 15) -> None:
        """Wait until the process is idle: requests wrk left queued have finished."""
        deadline = time.monotonic() + timeout
        last = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.cpu_seconds()
            if now - last < 0.01:
                return
            last = now

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def request(
    port: int, method: str, path: str, body: dict | None = None, token: str | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass
class Row:
    store: str
    scenario: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    peak_mb: float
    errors: int
    ratio: float | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    first_page: dict[str, dict[int, float]] = field(default_factory=dict)
    rss_after: dict[str, float] = field(default_factory=dict)
    ceilings: list[Row] = field(default_factory=list)
    unloaded: dict[str, tuple[float, float]] = field(default_factory=dict)
    peers: dict[str, list[Row]] = field(default_factory=dict)  # system -> one row per round


def run_wrk(
    server: Server, method: str, path: str, ids: range, seconds: int, connections: int, token: str
) -> dict:
    script = server.logfile.parent / "bench.lua"  # the run's private temporary directory
    script.write_text(WRK_SCRIPT)
    threads = min(WRK_THREADS, connections)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s"]
    argv += ["-s", str(script), server.url, "--", method, path, str(ids.start), str(ids.stop - 1)]
    env = {**os.environ, "BENCH_TOKEN": token or ""}
    done = subprocess.run(  # noqa: S603  # nosec B603  # wrk argv built by this script
        argv, env=env, capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("WRK-RESULT "):
            return json.loads(line.removeprefix("WRK-RESULT "))
    raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout}")


def measure(
    server: Server,
    store: str,
    scenario: str,
    method: str,
    path: str,
    ids: range,
    seconds: int,
    token: str | None = None,
    profile: Path | None = None,
) -> Row:
    server.settle()
    sampler = start_profile(server, f"{store}-{scenario}", seconds, profile)
    cpu_before = server.cpu_seconds()
    result = run_wrk(server, method, path, ids, seconds, CONNECTIONS, token)
    cpu = server.cpu_seconds() - cpu_before
    if sampler:
        summarise_profile(*sampler)
    count = max(result["requests"], 1)
    errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
    row = Row(
        store=store,
        scenario=scenario,
        rps=result["requests"] / (result["duration_us"] / 1e6),
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        cpu_us=cpu / count * 1e6,
        peak_mb=server.memory_mb("VmHWM"),
        errors=errors,
    )
    log(f"  {store} {scenario}: {row.rps:.0f} req/s, p99 {row.p99_ms:.2f} ms, {errors} errors")
    return row


def start_profile(
    server: Server, name: str, seconds: int, profile: Path | None
) -> tuple[subprocess.Popen, Path] | None:
    """Sample the server's Python stacks with py-spy while wrk runs (--profile DIR)."""
    if profile is None:
        return None
    out = profile / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".txt")
    argv = [str(PY_SPY), "record", "--pid", str(server.proc.pid), "--duration", str(seconds)]
    argv += ["--rate", "200", "--format", "raw", "--output", str(out), "--nonblocking", "--gil"]
    proc = subprocess.Popen(  # noqa: S603  # nosec B603  # py-spy argv built by this script
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return proc, out


def summarise_profile(proc: subprocess.Popen, out: Path, top: int = 12) -> None:
    """Print where the server spent its samples: self time per frame, busiest first."""
    proc.wait(timeout=60)
    own, total = Counter(), 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        if "Condition.wait" not in frames[-1] and "poll" not in frames[-1]:
            own[frames[-1]] += int(count)
    busy = sum(own.values())
    log(f"    profile {out.name}: {busy} busy samples of {total} (idle waits left out)")
    for frame, count in own.most_common(top):
        log(f"    {count / max(busy, 1):6.1%}  {frame}")


def first_page_ms(server: Server, seconds: int) -> float:
    """Median latency of the first page of GET /cars, one request at a time."""
    result = run_wrk(server, "GET", "/cars", range(1, 2), seconds, 1, "")
    if result["status"] or result["requests"] == 0:
        raise BenchError(f"GET /cars failed during the first-page measurement: {result}")
    return result["p50_us"] / 1000


def seed_api(server: Server, count: int, token: str) -> range:
    """Create cars through the API; returns the range of their ids."""

    def create(n: int) -> int:
        body = {"brand": "Seed", "model": f"Seed {n}", "year": 1990 + n % 35}
        status, payload = request(server.port, "POST", "/cars", body, token)
        if status != 201:
            raise BenchError(f"seeding failed: POST /cars -> {status} {payload[:300]!r}")
        return int(json.loads(payload)["id"])

    with ThreadPoolExecutor(8) as pool:
        ids = sorted(pool.map(create, range(count)))
    if ids != list(range(ids[0], ids[-1] + 1)):
        log("  note: seeded ids are not contiguous; random ids may miss")
    return range(ids[0], ids[-1] + 1)


class Store:
    """Where cars.py keeps its rows: the env it needs and a direct bulk insert for big seeds."""

    name = ""

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def bulk_insert(self, rows: list[tuple[str, str, int]]) -> None:
        raise NotImplementedError

    def trim(self, last_id: int) -> None:
        """Delete every car after last_id."""
        raise NotImplementedError

    def close(self) -> None:
        return None


class SqliteStore(Store):
    name = "sqlite"

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "bench.db"

    def env(self) -> dict[str, str]:
        return {"SQLITE_PATH": str(self.path)}

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def count(self) -> int:
        with contextlib.closing(self._connect()) as db:
            return db.execute("SELECT COUNT(*) FROM cars").fetchone()[0]

    def bulk_insert(self, rows: list[tuple[str, str, int]]) -> None:
        with contextlib.closing(self._connect()) as db:
            with db:
                db.executemany("INSERT INTO cars (brand, model, year) VALUES (?, ?, ?)", rows)
            # Fold the load into the main file, as SQLite's automatic checkpoints do over time.
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def trim(self, last_id: int) -> None:
        with contextlib.closing(self._connect()) as db:
            with db:
                db.execute("DELETE FROM cars WHERE id > ?", (last_id,))
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class MysqlStore(Store):
    name = "mysql"

    def __init__(self) -> None:
        import pymysql

        self.settings = {
            "host": os.environ.get("MYSQL_HOST", "127.0.0.1"),
            "port": int(os.environ.get("MYSQL_PORT", "3306")),
            "user": os.environ.get("MYSQL_USER", "root"),
            "password": os.environ.get("MYSQL_PASSWORD", ""),
        }
        self.database = f"cars_bench_{secrets.token_hex(4)}"
        try:
            self.admin = pymysql.connect(**self.settings, connect_timeout=5, autocommit=True)
        except pymysql.MySQLError as exc:
            where = f"{self.settings['host']}:{self.settings['port']}"
            raise BenchError(
                f"MySQL is not reachable at {where} ({exc}); start it, set MYSQL_HOST/MYSQL_PORT, "
                "or run `python scripts/bench.py --stores sqlite`"
            ) from exc

    def env(self) -> dict[str, str]:
        return {
            "MYSQL_HOST": self.settings["host"],
            "MYSQL_PORT": str(self.settings["port"]),
            "MYSQL_USER": self.settings["user"],
            "MYSQL_PASSWORD": self.settings["password"],
            "MYSQL_DATABASE": self.database,
        }

    def count(self) -> int:
        with self.admin.cursor() as cur:
            self.admin.select_db(self.database)
            cur.execute("SELECT COUNT(*) FROM cars")
            return cur.fetchone()[0]

    def bulk_insert(self, rows: list[tuple[str, str, int]]) -> None:
        sql = "INSERT INTO cars (brand, model, year) VALUES (%s, %s, %s)"
        self.admin.select_db(self.database)
        with self.admin.cursor() as cur:
            for start in range(0, len(rows), 5_000):
                cur.executemany(sql, rows[start : start + 5_000])

    def trim(self, last_id: int) -> None:
        self.admin.select_db(self.database)
        with self.admin.cursor() as cur:
            cur.execute("DELETE FROM cars WHERE id > %s", (last_id,))

    def close(self) -> None:
        with self.admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{self.database}`")
        self.admin.close()


def bench_store(
    store: Store, report: Report, hello: Server, args: argparse.Namespace, workdir: Path
) -> None:
    """Seed, run every scenario (each right after a ceiling run of the same length), check pages."""
    seconds = args.duration
    token = secrets.token_hex(16)  # 32 characters: cars.py refuses shorter tokens
    env = {**os.environ, **store.env(), "HOST": "127.0.0.1", "PORT": str(free_port())}
    env.update(API_TOKEN=token, LOG_LEVEL="INFO")
    log(f"cars.py on {store.name}: seeding {SEED_ROWS} cars")
    server = Server.start(f"cars-{store.name}", [sys.executable, "cars.py"], env, workdir)
    try:
        ids = seed_api(server, SEED_ROWS, token)
        if store.name == "mysql":
            compare_peers(server, env, ids, hello, report, args, workdir)
        scenarios = [
            ("GET /cars/{id}", "GET", "/cars/{id}"),
            (f"GET /cars?limit={LIST_LIMIT}", "GET", f"/cars?limit={LIST_LIMIT}"),
            ("PUT /cars/{id}", "PUT", "/cars/{id}"),
            ("POST /cars", "POST", "/cars"),
        ]
        for scenario, method, path in scenarios:
            # Pairing each scenario with a fresh ceiling run keeps the ratio honest when the
            # machine's speed drifts during the run (other load, thermal limits).
            ceiling = measure(hello, "hello", "GET /", "GET", "/", range(1, 2), seconds)
            report.ceilings.append(ceiling)
            row = measure(
                server, store.name, scenario, method, path, ids, seconds, token, args.profile
            )
            row.ratio = row.rps / ceiling.rps
            report.rows.append(row)
            if method == "GET" and "{id}" in path:  # the latency floor, without queueing
                alone = run_wrk(server, method, path, ids, max(seconds // 2, 3), 1, token)
                report.unloaded[store.name] = (alone["p50_us"] / 1000, alone["p99_us"] / 1000)
        report.rss_after[store.name] = server.memory_mb("VmRSS")
        report.first_page[store.name] = first_pages(server, store, ids, max(seconds // 2, 3))
    finally:
        server.stop()
        store.close()


PEERS = {  # system -> (command, ready path); the commands run from the repository's root
    "cars.py LOG_LEVEL=warning": ([sys.executable, "cars.py"], "/health"),
    "Flask + gunicorn": (
        [sys.executable, "-m", "gunicorn", "--chdir", "scripts", "--worker-class", "gthread"],
        "/cars/{id}",
    ),
    "FastAPI + uvicorn": (
        [sys.executable, "-m", "uvicorn", "--app-dir", "scripts", "--factory", "--no-access-log"],
        "/cars/{id}",
    ),
}
CARS_INFO = "cars.py LOG_LEVEL=info"
CEILING = "hello (ceiling, GET /)"


def peer_command(system: str, port: int, threads: str) -> list[str]:
    """The full command line of a peer: one process (one gunicorn worker), THREADS threads."""
    cmd = list(PEERS[system][0])
    bind = ["--host", "127.0.0.1", "--port", str(port)]
    if "gunicorn" in system:
        cmd += ["--workers", "1", "--threads", threads, "--bind", f"127.0.0.1:{port}"]
        cmd += ["bench_peers:flask_app()"]
    elif "uvicorn" in system:
        cmd += [*bind, "--log-level", "warning", "bench_peers:fastapi_app"]
    return cmd


def compare_peers(
    cars: Server,
    env: dict[str, str],
    ids: range,
    hello: Server,
    report: Report,
    args: argparse.Namespace,
    workdir: Path,
) -> None:
    """GET /cars/{id} on the same table: cars.py at info and warning, Flask, FastAPI, in rounds.

    Each round runs every system once for the same time, starting one place later than the last
    round, so that a machine that speeds up or slows down treats all of them alike.
    """
    threads = env.get("THREADS", "8")
    servers = {CEILING: hello, CARS_INFO: cars}
    log(f"peers on mysql: {', '.join(PEERS)}; {args.rounds} rounds of {args.duration} s")
    try:
        for system, (_, ready) in PEERS.items():
            port = free_port()
            peer_env = {**env, "PORT": str(port), "LOG_LEVEL": "WARNING"}
            name = re.sub(r"[^a-z0-9]+", "-", system.lower()).strip("-")
            cmd = peer_command(system, port, threads)
            ready_path = ready.replace("{id}", str(ids.start))
            servers[system] = Server.start(name, cmd, peer_env, workdir, ready_path)
        path = f"/cars/{ids.start}"
        answers = {
            s: json.loads(request(server.port, "GET", path)[1])
            for s, server in servers.items()
            if s != CEILING
        }
        if len({json.dumps(a, sort_keys=True) for a in answers.values()}) != 1:
            raise BenchError(f"the systems answer GET {path} differently: {answers}")
        for system in PEERS:  # open their connections and warm up, unmeasured, as cars.py did
            run_wrk(servers[system], "GET", "/cars/{id}", ids, 3, CONNECTIONS, "")
        systems = list(servers)
        for number in range(args.rounds):
            shift = number % len(systems)
            for system in systems[shift:] + systems[:shift]:
                server = servers[system]
                method, path = ("GET", "/") if system == CEILING else ("GET", "/cars/{id}")
                profile = args.profile if system.startswith("cars.py") else None
                label = f"round {number + 1}"
                row = measure(server, system, label, method, path, ids, args.duration, "", profile)
                report.peers.setdefault(system, []).append(row)
    finally:
        for system, server in servers.items():
            if system not in (CEILING, CARS_INFO):
                server.stop()


def first_pages(server: Server, store: Store, ids: range, seconds: int) -> dict[int, float]:
    """First-page latency at 1,000 rows, at 100,000, and at 1,000 again to cancel drift."""
    log(f"cars.py on {store.name}: first page at {SEED_ROWS:,}, {BIG_ROWS:,}, {SEED_ROWS:,} rows")
    server.settle()  # POSTs that wrk left queued must land before the trim
    store.trim(ids.stop - 1)  # back to the seeded cars; the POST scenario added more
    if (count := store.count()) != SEED_ROWS:
        raise BenchError(f"expected {SEED_ROWS} cars after trimming, found {count}")
    before = first_page_ms(server, seconds)
    rows = BIG_ROWS - SEED_ROWS
    store.bulk_insert([("Bulk", f"Bulk {n}", 1990 + n % 35) for n in range(rows)])
    big = first_page_ms(server, seconds)
    store.trim(ids.stop - 1)
    after = first_page_ms(server, seconds)
    return {SEED_ROWS: (before + after) / 2, BIG_ROWS: big}


def ceiling_row(runs: list[Row]) -> Row:
    """Summarise the paired ceiling runs as one row: mean throughput, median latencies."""
    return Row(
        store="hello",
        scenario=f"GET / ({len(runs)} runs)",
        rps=statistics.fmean(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        cpu_us=statistics.fmean(r.cpu_us for r in runs),
        peak_mb=max(r.peak_mb for r in runs),
        errors=sum(r.errors for r in runs),
        ratio=1.0,
    )


def print_report(report: Report, seconds: int) -> list[str]:
    ceiling = ceiling_row(report.ceilings)
    # One Markdown table, aligned for the terminal, pasted as it is into
    # docs/explanation/performance.md.
    columns = [
        ("store", 6, lambda r: r.store),
        ("scenario", 22, lambda r: r.scenario),
        ("req/s", 6, lambda r: f"{r.rps:.0f}"),
        ("vs ceiling", 10, lambda r: f"{r.ratio:.0%}"),
        ("p50 ms", 6, lambda r: f"{r.p50_ms:.2f}"),
        ("p99 ms", 6, lambda r: f"{r.p99_ms:.2f}"),
        ("CPU µs/req", 10, lambda r: f"{r.cpu_us:.0f}"),
        ("peak RSS MB", 11, lambda r: f"{r.peak_mb:.1f}"),
        ("errors", 6, lambda r: str(r.errors)),
    ]
    left = 2  # store and scenario are text; the rest are numbers, aligned right
    cells = [name.ljust(width) for name, width, _ in columns]
    print("| " + " | ".join(cells) + " |")
    rules = ["-" * w if i < left else "-" * (w - 1) + ":" for i, (_, w, _) in enumerate(columns)]
    print("| " + " | ".join(rules) + " |")
    for row in [ceiling, *report.rows]:
        values = [get(row) for _, _, get in columns]
        cells = [
            v.ljust(w) if i < left else v.rjust(w)
            for i, (v, (_, w, _)) in enumerate(zip(values, columns, strict=True))
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    for store, pages in report.first_page.items():
        small, big = pages.get(SEED_ROWS), pages.get(BIG_ROWS)
        growth = f"{big / small:.2f}x" if small and big else "-"
        print(
            f"{store:<7} first page of GET /cars: {small:.2f} ms at {SEED_ROWS:,} rows, "
            f"{big:.2f} ms at {BIG_ROWS:,} rows ({growth}; 1,000 is the mean of before and after)"
        )
    for store, (p50, p99) in report.unloaded.items():
        print(f"{store:<7} GET /cars/{{id}} at 1 connection: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    for store, rss in report.rss_after.items():
        print(f"{store:<7} server RSS after the run: {rss:.1f} MB")
    print_peers(report, seconds)
    return check_targets(report, ceiling)


def round_ratio(report: Report, top: str, bottom: str) -> float:
    """Median over the rounds of top's requests/s divided by bottom's in the same round."""
    pairs = zip(report.peers[top], report.peers[bottom], strict=True)
    return statistics.median(a.rps / b.rps for a, b in pairs)


def print_peers(report: Report, seconds: int) -> None:
    """The side-by-side table: medians over the rounds; ratios are medians of per-round ratios."""
    if not report.peers:
        return
    rounds = len(report.peers[CARS_INFO])
    print(
        f"\nGET /cars/{{id}} on MySQL, the same table for all, {CONNECTIONS} connections, "
        f"{rounds} interleaved rounds of {seconds} s (medians; ratios are medians of the "
        "per-round ratios)\n"
    )
    columns = [
        ("system", 26),
        ("req/s", 6),
        ("range", 11),
        ("cars.py info ÷ it", 17),
        ("vs ceiling", 10),
        ("p50 ms", 6),
        ("p99 ms", 6),
        ("CPU µs/req", 10),
        ("peak RSS MB", 11),
        ("errors", 6),
    ]
    print("| " + " | ".join(name.ljust(width) for name, width in columns) + " |")
    rules = ["-" * w if i == 0 else "-" * (w - 1) + ":" for i, (_, w) in enumerate(columns)]
    print("| " + " | ".join(rules) + " |")
    for system, rows in report.peers.items():
        rps = [r.rps for r in rows]
        values = [
            system,
            f"{statistics.median(rps):.0f}",
            f"{min(rps):.0f}-{max(rps):.0f}",
            f"{round_ratio(report, CARS_INFO, system):.2f}x",
            f"{round_ratio(report, system, CEILING):.0%}",
            f"{statistics.median(r.p50_ms for r in rows):.2f}",
            f"{statistics.median(r.p99_ms for r in rows):.2f}",
            f"{statistics.median(r.cpu_us for r in rows):.0f}",
            f"{max(r.peak_mb for r in rows):.1f}",
            str(sum(r.errors for r in rows)),
        ]
        cells = [
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, (_, w)) in enumerate(zip(values, columns, strict=True))
        ]
        print("| " + " | ".join(cells) + " |")


def check_targets(report: Report, ceiling: Row) -> list[str]:
    missed = []

    def check(ok: bool, text: str) -> None:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
        if not ok:
            missed.append(text)

    print("\nTargets:")
    if report.peers:
        for system, key, word in (
            ("cars.py LOG_LEVEL=warning", "access_line", "of"),
            ("Flask + gunicorn", "vs_flask", "x"),
            ("FastAPI + uvicorn", "vs_fastapi", "x"),
        ):
            ratio, target = round_ratio(report, CARS_INFO, system), TARGETS[key]
            goal = f"{target:.0%} of" if word == "of" else f"{target}x"
            text = f"mysql point reads, LOG_LEVEL=info: >= {goal} {system} ({ratio:.2f}x)"
            check(ratio >= target, text)
        for system, rows in report.peers.items():
            if errors := sum(r.errors for r in rows):
                check(False, f"{system} point reads: {errors} failed requests")
    for row in report.rows:
        if row.errors:
            check(False, f"{row.store} {row.scenario}: {row.errors} failed requests")
        if row.scenario.startswith("GET /cars/"):
            ratio = TARGETS["point_ratio"]
            check(row.ratio >= ratio, f"{row.store} point reads >= {ratio:.0%} of ceiling")
            p99 = TARGETS["point_p99_ms"]
            check(
                row.p99_ms <= p99,
                f"{row.store} point-read p99 <= {p99:g} ms at {CONNECTIONS} connections "
                f"(the ceiling's own p99 there: {ceiling.p99_ms:.1f} ms)",
            )
        elif row.scenario.startswith("GET /cars?"):
            ratio = TARGETS["list_ratio"]
            check(row.ratio >= ratio, f"{row.store} list pages >= {ratio:.0%} of ceiling")
    for store, rss in report.rss_after.items():
        limit = TARGETS["rss_mb"]
        check(rss <= limit, f"{store} server RSS after the run <= {limit:g} MB")
    for store, pages in report.first_page.items():
        growth = TARGETS["first_page_growth"]
        ok = pages[BIG_ROWS] <= growth * pages[SEED_ROWS]
        check(ok, f"{store} first page at {BIG_ROWS:,} rows <= {growth}x the one at {SEED_ROWS:,}")
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration",
        type=int,
        default=int(os.environ.get("BENCH_DURATION", "10")),
        help="seconds of load per scenario (env BENCH_DURATION, default 10)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=int(os.environ.get("BENCH_ROUNDS", "3")),
        help="interleaved rounds of the peer comparison on MySQL (env BENCH_ROUNDS, default 3)",
    )
    parser.add_argument(
        "--stores",
        default="mysql,sqlite",
        help="comma-separated stores to measure: mysql, sqlite (default both)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample cars.py with py-spy during each scenario; stacks go to DIR",
    )
    parser.add_argument(
        "--hello-server",
        nargs=2,
        type=int,
        metavar=("PORT", "THREADS"),
        help=argparse.SUPPRESS,  # internal: run the ceiling app in this process
    )
    args = parser.parse_args()
    if args.hello_server:
        serve_hello(*args.hello_server)
        return 0
    if shutil.which("wrk") is None:
        log("wrk is missing: install it with `sudo apt-get install wrk` (or `brew install wrk`)")
        return 2
    if args.profile:
        if not PY_SPY.exists():
            log(f"--profile needs py-spy: `{sys.executable} -m pip install py-spy`")
            return 2
        args.profile.mkdir(parents=True, exist_ok=True)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not stores or set(stores) - {"mysql", "sqlite"}:
        parser.error(f"--stores takes mysql, sqlite or both, not {args.stores!r}")
    threads = os.environ.get("THREADS", "8")

    report = Report()
    load = Path("/proc/loadavg").read_text().split()[0]  # other work on the box skews the numbers
    with tempfile.TemporaryDirectory(prefix="cars-bench-") as tmp:
        workdir = Path(tmp)
        # Connect to MySQL first, so that a missing server stops the run before any load.
        todo = [MysqlStore() if name == "mysql" else SqliteStore(workdir) for name in stores]
        port = free_port()
        log(f"ceiling: bare Bottle + Waitress, {threads} threads, {CONNECTIONS} connections")
        hello = Server.start(
            "hello",
            [sys.executable, __file__, "--hello-server", str(port), threads],
            {**os.environ, "PORT": str(port)},
            workdir,
            ready="/",
        )
        try:
            for store in todo:
                bench_store(store, report, hello, args, workdir)
        finally:
            hello.stop()
    print()
    print(
        f"cars-api bench: {os.cpu_count()} CPUs (load average {load} at the start), "
        f"THREADS={threads}, {CONNECTIONS} connections, {args.duration} s per scenario, "
        f"wrk {WRK_THREADS} threads\n"
    )
    missed = print_report(report, args.duration)
    if missed:
        print(f"\n{len(missed)} target(s) missed.")
        return 1
    print("\nAll targets met.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        log(f"bench: {exc}")
        sys.exit(2)
