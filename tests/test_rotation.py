"""Rotating the database password and the API token without a failed request, for real.

The alternating-users scheme of the published MySQLMultiUser function: the application identity
exists twice (A and A_clone, which the first rotation creates with A's grants). A rotation sets
a new password on the user no server runs as, starts servers with it, moves the traffic, stops
the old servers, and only then may the other user's password change.
The API token rotates alongside: the new servers accept the previous token too.
"""

import json
import secrets
import signal
import threading
import time

import pytest
from conftest import mysql_env
from test_drills import call, car
from test_identities import Identities, bootstrap, migrate_as, root

import cars

T1, T2 = secrets.token_hex(24), secrets.token_hex(24)  # made up per run: guard nothing


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def access_lines(server):
    """Return the server's access lines."""
    entries = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    return [e for e in entries if e.get("message") == "request"]


# -- API_TOKEN_PREVIOUS -------------------------------------------------------------------------


def test_the_previous_token_is_accepted_beside_the_current_one_and_the_audit_says_which(
    run_server,
):
    server = run_server({"API_TOKEN": T2, "API_TOKEN_PREVIOUS": T1})
    sent = [
        (bearer(T2), 201),
        (bearer(T1), 201),
        (bearer(T1[:-1] + "x"), 401),
        ({}, 401),
        ({"Authorization": f"Basic {T1}"}, 401),
    ]
    for headers, status in sent:
        assert call(server.port, "POST", "/cars", car("token"), headers=headers).status == status
    assert server.stop() == 0  # and its log is complete
    audit = [e["auth"] for e in access_lines(server) if e["method"] == "POST"]
    assert audit == ["ok", "ok-previous", "failed", "failed", "failed"]
    assert not any(token in server.log() for token in (T1, T2))


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"API_TOKEN_PREVIOUS": "p" * 40}, "API_TOKEN_PREVIOUS is accepted only besides API_TOKEN"),
        ({"API_TOKEN": "t" * 40, "API_TOKEN_PREVIOUS": "short"}, "API_TOKEN_PREVIOUS must be"),
    ],
    ids=["without_api_token", "too_short"],
)
def test_a_previous_token_alone_or_too_short_stops_start_up(environ, says):
    with pytest.raises(SystemExit) as stopped:
        cars.load_settings(environ)
    assert says in str(stopped.value)


# -- The rotation drill -------------------------------------------------------------------------


class Balancer:
    """Client threads with valid reads and writes, sent where and with what a balancer says."""

    def __init__(self, port, token, clients=4):
        self.port, self.token = port, token
        self.lock = threading.Lock()
        self.outcomes = []  # (port, token, method, outcome)
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(n,)) for n in range(clients)]

    def route(self, port=None, token=None):
        """Send new requests to another server, or with another token."""
        with self.lock:
            self.port, self.token = port or self.port, token or self.token

    def send(self, method, path, body=None):
        with self.lock:
            port, token = self.port, self.token
        outcome = call(port, method, path, body, headers=bearer(token))
        with self.lock:
            self.outcomes.append((port, token, method, outcome))
        return outcome

    def client(self, number):
        for seq in range(100_000):  # bounded; stop() ends it long before
            if self.stopping.is_set():
                return
            created = self.send("POST", "/cars", car(f"r{number}-{seq}"))
            if created.status != 201:
                continue
            path = f"/cars/{created.body['id']}"
            self.send("GET", path)
            self.send("PUT", path, car(f"r{number}-{seq}-changed"))
            self.send("GET", "/cars?limit=5")
            if seq % 2:
                self.send("DELETE", path)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)
        assert not any(t.is_alive() for t in self.threads), "a client is stuck"

    def count(self):
        with self.lock:
            return len(self.outcomes)


@pytest.fixture
def app_users(mysql_database):
    """Bootstrapped identities, the schema migrated, no clone yet; all dropped at the end."""
    made = Identities()
    made.clone = made.users["APP"] + "_clone"
    try:
        assert bootstrap(made.env())[0] == 0
        assert migrate_as(made, "MIGRATION")[0] == 0
        yield made
    finally:
        with root() as conn, conn.cursor() as cur:
            for user in (*made.users.values(), made.clone):
                cur.execute("DROP USER IF EXISTS %s@'%%'", (user,))
            cur.execute(f"DROP DATABASE IF EXISTS `{made.database}`")


def server_env(users, user, password, **more):
    """Run a server as one application user, without DDL."""
    env = mysql_env(users.database)
    return {**env, "MYSQL_USER": user, "MYSQL_PASSWORD": password, "AUTO_MIGRATE": "false", **more}


def set_password(user, password):
    with root() as conn, conn.cursor() as cur:
        cur.execute("ALTER USER %s@'%%' IDENTIFIED BY %s", (user, password))


def set_secret(current, pending, password):
    """Do what the published MySQLMultiUser function's setSecret step does, as the master.

    Create the pending user if it is missing, copy every grant of the current user to it, then
    set its password (MariaDB takes the PASSWORD() form the function uses for servers below 8).
    """
    with root() as conn, conn.cursor() as cur:
        cur.execute("SELECT User FROM mysql.user WHERE User = %s", (pending,))
        if cur.rowcount == 0:
            cur.execute("CREATE USER %s IDENTIFIED BY %s", (pending, password))
        cur.execute("SHOW GRANTS FOR %s", (current,))
        for (grant,) in cur.fetchall():
            cur.execute(grant.split(" TO ")[0].replace("%", "%%") + " TO %s", (pending,))
        cur.execute("SET PASSWORD FOR %s = PASSWORD(%s)", (pending, password))


def wait_for_more(balancer, seconds):
    """Let the load run a while and make sure it made progress."""
    before = balancer.count()
    time.sleep(seconds)
    assert balancer.count() > before, "no request completed"


def test_rotating_the_database_password_and_the_token_under_load_fails_no_request(
    run_server, app_users
):
    a, a_password = app_users.users["APP"], app_users.passwords["APP"]
    server1 = run_server(server_env(app_users, a, a_password, API_TOKEN=T1))
    started = time.monotonic()
    with Balancer(server1.port, T1) as balancer:
        wait_for_more(balancer, 1.5)
        # Rotation step 1, as the function's setSecret: the clone made with A's grants.
        clone_password = secrets.token_hex(16)
        set_secret(a, app_users.clone, clone_password)
        wait_for_more(balancer, 0.5)
        # Step 2: new servers as the clone, accepting the new token and the previous one.
        server2 = run_server(
            server_env(
                app_users,
                app_users.clone,
                clone_password,
                API_TOKEN=T2,
                API_TOKEN_PREVIOUS=T1,
            )
        )
        # Step 3: the balancer moves the traffic; clients still send T1.
        balancer.route(port=server2.port)
        wait_for_more(balancer, 1.5)  # server 1's requests in flight end (deregistration delay)
        # Step 4: the old server drains and stops.
        server1.proc.send_signal(signal.SIGTERM)
        assert server1.proc.wait(timeout=30) == 0
        # Step 5: clients pick up the new token; then the next rotation changes A's password.
        balancer.route(token=T2)
        wait_for_more(balancer, 1.5)
        # The next rotation flips back: setSecret on A, whom no server runs as any more.
        set_secret(app_users.clone, a, secrets.token_hex(16))
        wait_for_more(balancer, 1.0)
    duration = time.monotonic() - started

    outcomes = balancer.outcomes
    failed = [(p, m, o) for p, _, m, o in outcomes if o.error or not 200 <= o.status < 300]
    print(
        f"rotation drill: {len(outcomes)} requests in {duration:.1f} s, {len(failed)} non-2xx;"
        f" server 1: {sum(p == server1.port for p, *_ in outcomes)},"
        f" server 2 with T1: {sum(p == server2.port and t == T1 for p, t, *_ in outcomes)},"
        f" with T2: {sum(p == server2.port and t == T2 for p, t, *_ in outcomes)}"
    )
    assert not failed, failed[:5]
    assert {(p, t) for p, t, *_ in outcomes} == {
        (server1.port, T1),
        (server2.port, T1),
        (server2.port, T2),
    }
    assert server2.stop() == 0  # and its log is complete
    writes = [e["auth"] for e in access_lines(server2) if e["method"] != "GET"]
    assert {"ok", "ok-previous"} <= set(writes)
    assert "failed" not in writes


def test_changing_the_password_of_the_user_a_server_runs_as_fails_its_new_connections(
    run_server, app_users
):
    a, a_password = app_users.users["APP"], app_users.passwords["APP"]
    server = run_server(server_env(app_users, a, a_password, API_TOKEN=T1))
    assert call(server.port, "GET", "/ready").status == 200
    set_password(a, secrets.token_hex(16))  # the mistake the alternating users avoid
    with root() as conn, conn.cursor() as cur:  # its connections end, as they do in time
        cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s", (a,))
        for (thread_id,) in cur.fetchall():
            cur.execute("KILL %s", (thread_id,))
    outcomes = [call(server.port, "GET", "/cars") for _ in range(5)]
    assert [o.status for o in outcomes] == [503] * 5
    assert server.stop() == 0
    entries = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    denied = [e for e in entries if e.get("message") == "database unavailable"]
    assert denied
    assert all("Access denied" in e["error"] for e in denied)
