"""Fault drills against real processes: database outage and locks, shutdown under load, soak.

The outage and lock drills run on a private MariaDB instance (own data directory, socket and
port) that they kill and restart, so the shared server is never disturbed. Every wait and every
HTTP call is bounded; servers and the instance are stopped even when an assertion fails.
"""

import http.client
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pymysql
import pytest
from conftest import IN_CI, MYSQL, free_port, mysql_env, scope

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
MARIADBD = shutil.which("mariadbd", path=SBIN) or shutil.which("mysqld", path=SBIN)
INSTALL_DB = shutil.which("mariadb-install-db", path=SBIN) or shutil.which(
    "mysql_install_db", path=SBIN
)
DB_TIMEOUT = 2  # seconds; cars.py bounds connect, lock waits and reads with it
# The longest a request may take while the database misbehaves: cars.py keeps one request's
# database time within DB_TIMEOUT; the rest is scheduling slack on a busy host. Past it, it "hangs".
REQUEST_BOUND = 3 * DB_TIMEOUT + 4
RECOVERY_BOUND = 5.0  # the issue: writes succeed again within 5 s of the database coming back
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "180"))


# -- A private MariaDB instance -----------------------------------------------------------------


class MariaDB:
    """A MariaDB server of our own on 127.0.0.1 that a drill may SIGKILL and start again."""

    def __init__(self, base, options=()):
        self.base = base
        self.options = list(options)  # more mariadbd options, such as TLS files
        self.datadir = base / "data"
        self.port = free_port()
        self.proc = None
        # mariadbd refuses to run as root unless told to; CI and this machine run as root.
        self.user = ["--user=root"] if os.geteuid() == 0 else []

    def install(self):
        subprocess.run(
            [
                INSTALL_DB,
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                *self.user,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self, timeout=30):
        """Start the server on the same data directory and port; return once it answers."""
        log = (self.base / "mariadbd.out").open("ab")
        self.proc = subprocess.Popen(
            [
                MARIADBD,
                "--no-defaults",
                f"--datadir={self.datadir}",
                f"--socket={self.base / 'mysqld.sock'}",
                f"--pid-file={self.base / 'mysqld.pid'}",
                f"--log-error={self.base / 'error.log'}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=32M",
                *self.options,
                *self.user,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited {self.proc.returncode}: {self.error_log()}")
            try:
                self.connect().close()
                return
            except pymysql.err.OperationalError:
                time.sleep(0.1)
        raise RuntimeError(f"mariadbd did not answer within {timeout} s: {self.error_log()}")

    def kill(self):
        """SIGKILL the server, as a crashed host or a failed-over RDS instance would look."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def connect(self, database=None):
        return pymysql.connect(
            host="127.0.0.1",
            port=self.port,
            user="root",
            password="",
            database=database,
            autocommit=True,
            connect_timeout=2,
            read_timeout=30,
        )

    def error_log(self):
        path = self.base / "error.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def env(self, database):
        return {
            "MYSQL_HOST": "127.0.0.1",
            "MYSQL_PORT": str(self.port),
            "MYSQL_USER": "root",
            "MYSQL_PASSWORD": "",
            "MYSQL_DATABASE": database,
            "DB_TIMEOUT": str(DB_TIMEOUT),
        }


@contextmanager
def throwaway_mariadb(options=()):
    """Install and start a private MariaDB; kill it and delete its files at the end."""
    if not (MARIADBD and INSTALL_DB):
        reason = "a private MariaDB needs mariadbd and mariadb-install-db (Debian: mariadb-server)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(f"{reason}; CI always runs these tests")
    base = Path(tempfile.mkdtemp(prefix="cars-mdb-"))  # short: the socket path has a length cap
    server = MariaDB(base, options)
    try:
        server.install()
        server.start()
        yield server
    finally:
        if server.running():
            server.kill()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def private_mariadb():
    """A throwaway MariaDB for the drills of one module."""
    with throwaway_mariadb() as server:
        yield server


@pytest.fixture
def mariadb(private_mariadb):
    """The private instance, running (an earlier drill may have left it killed)."""
    if not private_mariadb.running():
        private_mariadb.start()
    return private_mariadb


# -- HTTP helpers (standard library only) -------------------------------------------------------


@dataclass
class Outcome:
    """What one request got: a status, or the error that replaced it; and when."""

    started: float
    ended: float
    status: int | None = None
    headers: dict | None = None
    body: object = None
    error: str | None = None
    model: str | None = None
    key: str | None = None

    @property
    def duration(self):
        return self.ended - self.started


def call(port, method, path, body=None, timeout=REQUEST_BOUND, conn=None, headers=None):
    """Send one request; return an Outcome instead of raising on network errors."""
    started = time.monotonic()
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {
            **({"Content-Type": "application/json"} if body is not None else {}),
            **(headers or {}),
        }
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        res = conn.getresponse()
        raw = res.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        return Outcome(started, time.monotonic(), res.status, dict(res.getheaders()), parsed)
    except (OSError, http.client.HTTPException) as exc:
        if not own:
            conn.close()
        return Outcome(started, time.monotonic(), error=f"{type(exc).__name__}: {exc}")
    finally:
        if own:
            conn.close()


def car(tag):
    return {"brand": "Drill", "model": tag, "year": 2020}


def is_problem_503(outcome):
    return (
        outcome.status == 503
        and outcome.headers.get("Content-Type") == "application/problem+json"
        and int(outcome.headers.get("Retry-After", "0")) > 0
    )


class Writers:
    """Threads that POST cars with unique models until stopped, recording every outcome.

    Keyed writers send an Idempotency-Key with each car and retry a POST that failed or timed
    out with the same key until it is acknowledged, as the draft tells clients to.
    """

    def __init__(self, port, count=4, prefix="w", keyed=False):
        self.port, self.prefix, self.keyed = port, prefix, keyed
        self.outcomes = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(n,)) for n in range(count)]

    def run(self, number):
        for seq in range(100_000):  # bounded; stop() ends it long before
            if self.stopping.is_set():
                return
            model = f"{self.prefix}{number}-{seq}"
            key = f"{model}-{uuid.uuid4().hex}" if self.keyed else None
            headers = {"Idempotency-Key": key} if key else {}
            while True:
                outcome = call(self.port, "POST", "/cars", car(model), headers=headers)
                outcome.model, outcome.key = model, key
                with self.lock:
                    self.outcomes.append(outcome)
                if outcome.status == 201:
                    break
                time.sleep(0.05)  # do not spin while the database is down
                if not key or self.stopping.is_set():
                    break

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=REQUEST_BOUND + 5)
        assert not any(t.is_alive() for t in self.threads), "a writer is stuck"

    def snapshot(self):
        with self.lock:
            return list(self.outcomes)

    def wait_for(self, predicate, timeout):
        """Wait until some outcome matches; return it, or None after the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = next((o for o in self.snapshot() if predicate(o)), None)
            if match:
                return match
            time.sleep(0.02)
        return None


def proc_status(pid, key):
    """Return one number from /proc/<pid>/status (Threads, or VmRSS in KiB)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(key + ":")))


# -- Database outage: killed, or frozen --------------------------------------------------------


def run_fault_drill(server, mariadb, database, fault, heal, fault_seconds, keyed=False):
    """Steady writes; fault the database; probe; heal it; check every invariant of the issue."""
    probes = []  # (path, outcome) of /ready and /health while the database is faulted
    with Writers(server.port, keyed=keyed) as writers:
        assert writers.wait_for(lambda o: o.status == 201, timeout=10), writers.snapshot()[:3]
        time.sleep(1)  # steady state before the fault
        fault()
        faulted = time.monotonic()
        while time.monotonic() < faulted + fault_seconds:
            for path in ("/ready", "/health"):
                probes.append((path, call(server.port, "GET", path)))
            time.sleep(0.2)
        healing = time.monotonic()
        heal()
        healed = time.monotonic()
        recovered = writers.wait_for(
            lambda o: o.started >= healed and o.status == 201, timeout=RECOVERY_BOUND + 1
        )
        time.sleep(1)  # a little steady traffic after recovery

    outcomes = writers.snapshot()
    failures = [o for o in outcomes if o.error]
    assert not failures, f"requests without an HTTP answer: {failures[:3]}"
    assert {o.status for o in outcomes} <= {201, 503}, [o for o in outcomes if o.status >= 500]
    assert all(is_problem_503(o) for o in outcomes if o.status == 503)
    slowest = max(outcomes, key=lambda o: o.duration)
    assert slowest.duration <= REQUEST_BOUND, slowest
    # Requests begun after the fault took hold (a signal needs a moment on a busy host) that
    # ended before the repair began can only have failed.
    during = [o for o in outcomes if o.started > faulted + 0.1 and o.ended < healing]
    assert during, "no write was attempted while the database was down"
    assert all(o.status == 503 for o in during), [o for o in during if o.status != 503][:3]
    ready = [o for path, o in probes if path == "/ready" and o.started > faulted + 0.1]
    ready = [o for o in ready if o.ended < healing]
    health = [o for path, o in probes if path == "/health"]
    assert ready
    assert all(is_problem_503(o) for o in ready), ready[:3]
    assert health
    assert all(o.status == 200 for o in health), health[:3]
    assert recovered is not None, f"no write succeeded within {RECOVERY_BOUND} s of the repair"
    assert recovered.ended - healed <= RECOVERY_BOUND
    assert server.proc.poll() is None, "the API had to be restarted"

    # A 503 leaves the outcome unknown (the commit may have landed); a 201 must have.
    acknowledged = {o.body["id"]: o.model for o in outcomes if o.status == 201}
    with mariadb.connect(database) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, model FROM cars")
        rows = cur.fetchall()
    stored = dict(rows)
    missing = {i: m for i, m in acknowledged.items() if stored.get(i) != m}
    assert not missing, f"acknowledged writes lost: {missing}"
    models = [model for _, model in rows]
    assert len(models) == len(set(models)), "a car was stored twice"
    summary = {}
    if keyed:
        summary = check_each_key_made_one_car(mariadb, database, outcomes, stored)
    return {
        **summary,
        "writes": len(outcomes),
        "503": sum(o.status == 503 for o in outcomes),
        "slowest_s": round(slowest.duration, 2),
        "recovered_after_s": round(recovered.ended - healed, 2),
    }


def check_each_key_made_one_car(mariadb, database, outcomes, stored):
    """Check that every Idempotency-Key maps to exactly one car: its own, once."""
    with mariadb.connect(database) as conn, conn.cursor() as cur:
        cur.execute("SELECT idem_key, car_id FROM idempotency_keys")
        stored_keys = dict(cur.fetchall())
    # Keys are stored scoped to the caller (anonymous here) and the operation.
    made = {key: stored_keys.get(scope(key)) for key in {o.key for o in outcomes}}
    by_model = {model: car_id for car_id, model in stored.items()}
    acknowledged = {o.key: o.body["id"] for o in outcomes if o.status == 201}
    retried = {o.key for o in outcomes if o.status != 201}
    assert acknowledged, "no keyed write succeeded"
    for key, car_id in acknowledged.items():
        assert made.get(key) == car_id, f"{key} answered {car_id}, stored {made.get(key)}"
    for key in {o.key for o in outcomes}:
        model = key.rsplit("-", 1)[0]
        # Key and car are written in one transaction: both exist, or neither does.
        assert made.get(key) == by_model.get(model), f"{key}: key and car disagree"
    return {
        "keys": len({o.key for o in outcomes}),
        "retried_keys": len(retried),
        "retried_then_201": len(retried & set(acknowledged)),
    }


def test_database_killed_gives_503_then_recovers_without_losing_a_write(run_server, mariadb):
    database = f"drill_{uuid.uuid4().hex[:8]}"
    server = run_server(mariadb.env(database))
    summary = run_fault_drill(server, mariadb, database, mariadb.kill, mariadb.start, 4, keyed=True)
    print(f"killed-database drill: {summary}")


def test_frozen_database_gives_bounded_503_then_recovers(run_server, mariadb):
    # SIGSTOP: connections open but nothing answers, like a hung host or a network partition.
    # Longer than the read timeout, so that requests in flight must time out, not hang.
    database = f"drill_{uuid.uuid4().hex[:8]}"
    server = run_server(mariadb.env(database))
    try:
        summary = run_fault_drill(
            server,
            mariadb,
            database,
            lambda: mariadb.proc.send_signal(signal.SIGSTOP),
            lambda: mariadb.proc.send_signal(signal.SIGCONT),
            DB_TIMEOUT + 4,
        )
    finally:
        mariadb.proc.send_signal(signal.SIGCONT)  # never leave the instance frozen
    print(f"frozen-database drill: {summary}")


# -- Database blocked by a lock -----------------------------------------------------------------


@pytest.mark.parametrize("lock", ["table", "row"])
def test_locked_database_gives_bounded_503_and_recovers_on_release(run_server, mariadb, lock):
    database = f"drill_{uuid.uuid4().hex[:8]}"
    threads = 4
    server = run_server({**mariadb.env(database), "THREADS": str(threads)})
    locked = call(server.port, "POST", "/cars", car("locked")).body["id"]
    other = call(server.port, "POST", "/cars", car("other")).body["id"]
    before = proc_status(server.proc.pid, "Threads")

    locker = mariadb.connect(database)
    try:
        with locker.cursor() as cur:
            if lock == "table":
                cur.execute("LOCK TABLES cars WRITE")
            else:
                cur.execute("BEGIN")
                cur.execute("SELECT id FROM cars WHERE id = %s FOR UPDATE", (locked,))
        # A table lock: three times as many blocked requests as worker threads, all at once. A
        # row lock: one worker stays free, to show that the rest of the table is still served
        # (with every worker waiting, requests are shed: see tests/test_serving.py).
        blocked = 3 * threads if lock == "table" else threads - 1
        jobs = [("PUT", f"/cars/{locked}", car("changed"))] * blocked
        if lock == "table":
            jobs += [("GET", f"/cars/{other}", None), ("POST", "/cars", car("new"))] * threads
        results = [None] * len(jobs)

        def run(index, method, path, body):
            results[index] = call(server.port, method, path, body, timeout=60)

        workers = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
        for worker in workers:
            worker.start()
        during = proc_status(server.proc.pid, "Threads")
        if lock == "row":  # a row lock must not block the rest of the table
            assert call(server.port, "GET", f"/cars/{locked}").status == 200
            assert call(server.port, "PUT", f"/cars/{other}", car("free")).status == 200
        for worker in workers:
            worker.join(timeout=90)
        assert not any(w.is_alive() for w in workers)
    finally:
        locker.close()  # releases the lock whatever happened

    assert all(r.error is None for r in results), [r for r in results if r.error][:3]
    assert all(is_problem_503(r) for r in results), [r.status for r in results]
    rounds = math.ceil(len(jobs) / threads)
    slowest = max(r.duration for r in results)
    assert slowest <= rounds * (DB_TIMEOUT + 2) + 4, f"slowest request took {slowest:.1f} s"
    print(f"{lock} lock drill: {len(results)} x 503, slowest {slowest:.2f} s, threads {during}")
    assert during <= before, "the server grew threads while requests were blocked"

    deadline = time.monotonic() + RECOVERY_BOUND
    while (put := call(server.port, "PUT", f"/cars/{locked}", car("after"))).status != 200:
        assert time.monotonic() < deadline, f"no recovery after the lock was released: {put}"
        time.sleep(0.1)
    assert call(server.port, "GET", f"/cars/{locked}").body["model"] == "after"


# -- Graceful shutdown under load ---------------------------------------------------------------


def test_sigterm_under_load_completes_accepted_requests_and_exits_0(run_server, tmp_path):
    db_path = tmp_path / "shutdown.db"
    server = run_server({"SQLITE_PATH": str(db_path), "DB_TIMEOUT": "10"})
    seed = call(server.port, "POST", "/cars", car("seed")).body["id"]
    stopping = threading.Event()
    reads = []

    def reader():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_BOUND)
        for _ in range(100_000):  # bounded; the shutdown ends it long before
            if stopping.is_set():
                break
            outcome = call(server.port, "GET", f"/cars/{seed}", conn=conn)
            reads.append(outcome)
            if outcome.error:
                break  # the server closed: this reader is done
        conn.close()

    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # POSTs below wait for this lock inside the app
    in_flight = [None] * 4

    def write(index):
        in_flight[index] = call(server.port, "POST", "/cars", car(f"inflight-{index}"), timeout=60)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    writers = [threading.Thread(target=write, args=(i,)) for i in range(len(in_flight))]
    try:
        for thread in readers + writers:
            thread.start()
        time.sleep(1.0)  # the writers are accepted and waiting on the lock; readers keep going
        assert all(o is None for o in in_flight), "the lock did not hold the writes"
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None, "the server quit with requests in flight"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    for thread in writers:
        thread.join(timeout=30)
    exit_code = server.proc.wait(timeout=20)
    stopping.set()
    for thread in readers:
        thread.join(timeout=REQUEST_BOUND + 5)

    assert [o.status for o in in_flight] == [201] * len(in_flight), in_flight
    assert exit_code == 0
    answered = [o for o in reads if o.error is None]
    assert answered, "no read completed during the drill"
    assert all(o.status == 200 for o in answered), {o.status for o in answered}
    assert all(o.started >= signalled for o in reads if o.error), "a read failed before SIGTERM"
    with sqlite3.connect(db_path) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM cars")}
    assert {o.body["id"] for o in in_flight} <= stored


# -- Soak ---------------------------------------------------------------------------------------


@pytest.mark.drill
def test_soak_of_mixed_load_has_no_errors_and_flat_memory(run_server, mysql_database):
    database = f"{mysql_database}_soak"
    server = run_server(mysql_env(database))
    deadline = time.monotonic() + SOAK_SECONDS
    warm_until = time.monotonic() + SOAK_SECONDS / 6  # RSS baseline once caches have filled
    errors, counts, lock = [], {}, threading.Lock()

    def expect(outcome, status, what):
        with lock:
            counts[what] = counts.get(what, 0) + 1
            if outcome.error or outcome.status != status:
                errors.append((what, outcome))

    def client(number):
        rng = random.Random(number)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_BOUND)
        mine = []
        for seq in range(10_000_000):  # bounded by the deadline long before
            if time.monotonic() >= deadline or len(errors) > 20:
                break
            roll = rng.random()
            if roll < 0.15 or not mine:
                outcome = call(server.port, "POST", "/cars", car(f"s{number}-{seq}"), conn=conn)
                expect(outcome, 201, "POST")
                if outcome.status == 201:
                    mine.append(outcome.body["id"])
            elif roll < 0.60:
                expect(call(server.port, "GET", f"/cars/{rng.choice(mine)}", conn=conn), 200, "GET")
            elif roll < 0.80:
                expect(call(server.port, "GET", "/cars?limit=50", conn=conn), 200, "LIST")
            elif roll < 0.95:
                path = f"/cars/{rng.choice(mine)}"
                expect(call(server.port, "PUT", path, car(f"p{seq}"), conn=conn), 200, "PUT")
            else:
                path = f"/cars/{mine.pop(rng.randrange(len(mine)))}"
                expect(call(server.port, "DELETE", path, conn=conn), 204, "DELETE")
        conn.close()

    clients = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    try:
        for thread in clients:
            thread.start()
        samples = []
        while time.monotonic() < deadline and any(t.is_alive() for t in clients):
            time.sleep(1)
            samples.append((time.monotonic(), proc_status(server.proc.pid, "VmRSS")))
        for thread in clients:
            thread.join(timeout=REQUEST_BOUND + 5)
    finally:
        server.stop()
        with pymysql.connect(**MYSQL, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")

    assert not errors, f"{len(errors)} errors, first: {errors[:3]}"
    assert sum(counts.values()) > 1000, counts
    baseline = next((rss for t, rss in samples if t >= warm_until), samples[-1][1])
    final = samples[-1][1]
    print(f"soak: {counts} in {SOAK_SECONDS:.0f} s, RSS {baseline} KiB -> {final} KiB")
    assert final <= baseline * 1.10, f"RSS grew from {baseline} KiB to {final} KiB"
