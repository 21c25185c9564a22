"""Shared fixtures: the app over both stores, a throwaway MySQL database, real server processes."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import pymysql
import pytest
import webtest
from cfnlint.decode import decode

import cars

ROOT = Path(__file__).resolve().parent.parent
MYSQL = {
    "host": os.environ.get("MYSQL_TEST_HOST", "127.0.0.1"),
    "port": int(os.environ.get("MYSQL_TEST_PORT", "3306")),
    "user": os.environ.get("MYSQL_TEST_USER", "root"),
    "password": os.environ.get("MYSQL_TEST_PASSWORD", ""),
}
TOKEN = "test-token-for-writes-0123456789abcdef"  # noqa: S105 -- a made-up token that only the tests use
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
TEMPLATES = ROOT / "cloudformation"
VENV_BIN = ROOT / ".venv" / "bin"
MOTO = ROOT / "tests" / "moto_fixes.py"  # moto's server with the gaps data.yaml meets filled
REGION = "eu-west-1"
# The settings the Makefile exports to its recipes (and so to the pytest that make test runs).
MAKEFILE_EXPORTS = frozenset(
    " ".join(re.findall(r"^export (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)).split()
)
MOTO_KEY = "testing"  # pragma: allowlist secret -- moto's placeholder credential


def free_port():
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scope(key, token=None):
    """Return an Idempotency-Key as cars.py stores it for POST /cars by this caller."""
    caller = token.encode() if token else cars.ANONYMOUS
    return cars.scoped_key(key, caller, "POST /cars")


def mysql_env(database):
    """Return the environment that points cars.py at the test MySQL server."""
    return {
        "MYSQL_HOST": MYSQL["host"],
        "MYSQL_PORT": str(MYSQL["port"]),
        "MYSQL_USER": MYSQL["user"],
        "MYSQL_PASSWORD": MYSQL["password"],
        "MYSQL_DATABASE": database,
    }


def image_manifest(config_digest):
    """Return the JSON text of an OCI image manifest (Docker v2) whose config has this digest."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": 7023,
                "digest": config_digest,
            },
            "layers": [],
        }
    )


@pytest.fixture(scope="session")
def mysql_database():
    """Create a throwaway database on the real MySQL server and drop it afterwards."""
    try:
        conn = pymysql.connect(**MYSQL, autocommit=True, connect_timeout=5)
    except pymysql.err.OperationalError as exc:
        where = f"{MYSQL['host']}:{MYSQL['port']}"
        if IN_CI:
            pytest.fail(f"CI needs MySQL at {where}: {exc}")
        pytest.skip(f"MySQL tests need a server at {where} ({exc}); CI always runs them")
    name = f"cars_test_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    yield name
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


@pytest.fixture(scope="session", params=["sqlite", "mysql"])
def store_env(request, tmp_path_factory):
    """Return the environment of each store the suite runs on."""
    if request.param == "mysql":
        return mysql_env(request.getfixturevalue("mysql_database"))
    return {"SQLITE_PATH": str(tmp_path_factory.mktemp("sqlite") / "cars.db")}


@pytest.fixture(scope="session")
def app(store_env):
    """Configure the one WSGI app on a store and create its table."""
    application = cars.configure(cars.load_settings(store_env))
    application.config["cars.db"].create_schema()
    return application


@pytest.fixture
def db(app):
    """Return the app's database, emptied so that each test starts clean."""
    database = app.config["cars.db"]
    database.execute("DELETE FROM cars")
    return database


@pytest.fixture
def testapp(app, db):
    """Drive the WSGI app with WebTest over an empty table."""
    return webtest.TestApp(app)


@pytest.fixture
def api_token(app):
    """Require a bearer token for writes while the test runs."""
    settings = app.config["cars.settings"]
    app.config["cars.settings"] = settings._replace(api_token=TOKEN)
    yield TOKEN
    app.config["cars.settings"] = settings


@pytest.fixture
def mysql_app(mysql_database):
    """Point the one WSGI app at the real MySQL for one test; put the old store back after."""
    saved = cars.app.config.get("cars.settings"), cars.app.config.get("cars.db")
    cars.configure(cars.load_settings(mysql_env(mysql_database)))
    database = cars.app.config["cars.db"]
    database.execute("DELETE FROM cars")
    yield webtest.TestApp(cars.app), database
    database.discard()
    cars.app.config["cars.settings"], cars.app.config["cars.db"] = saved


class Server:
    """A real `python cars.py` process listening on 127.0.0.1."""

    def __init__(self, proc, port, log_path):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self):
        """Return what the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, signal=signal.SIGTERM, timeout=15):
        """Send a signal and return the exit code once the process ends."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def run_server(tmp_path):
    """Start real server processes on free ports; kill whatever is left at the end."""
    servers = []

    def start(env=None):
        port = free_port()
        full_env = {k: v for k, v in os.environ.items() if k not in ("MYSQL_HOST", "API_TOKEN")}
        full_env.update(HOST="127.0.0.1", PORT=str(port), SQLITE_PATH=str(tmp_path / f"{port}.db"))
        full_env.update(env or {})
        log_path = tmp_path / f"server-{port}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "cars.py")],
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        server = Server(proc, port, log_path)
        servers.append(server)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{server.log()}")
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return server
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        pytest.fail(f"server did not answer /health within 15 s:\n{server.log()}")

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=10)


class Gate:
    """A TCP listener that holds connections silently, or forwards them to MySQL."""

    def __init__(self):
        self.port = free_port()
        self.open = threading.Event()
        self.closing = threading.Event()
        self.sockets = []
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.1)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.sockets.append(client)
            if self.open.is_set():
                upstream = socket.create_connection((MYSQL["host"], MYSQL["port"]), timeout=5)
                upstream.settimeout(None)
                self.sockets.append(upstream)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(source, target):
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):  # the other pump may have closed it first
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.closing.set()
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def gate():
    """A hung database in front of the real MySQL; closed at the end."""
    g = Gate()
    yield g
    g.close()


# ------------------------------------------------------------------ templates and moto


def load_template(name):
    """Parse one template of cloudformation/ as cfn-lint does; fail on any parse error."""
    template, matches = decode(str(TEMPLATES / name))
    assert not matches, f"{name} does not parse: {matches}"
    return template


@pytest.fixture(scope="module")
def base():
    return load_template("base.yaml")


@pytest.fixture(scope="module")
def data():
    return load_template("data.yaml")


@pytest.fixture(scope="module")
def service():
    return load_template("service.yaml")


@pytest.fixture(scope="module")
def ci():
    return load_template("ci-access.yaml")


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory):
    """moto's server on a free port of 127.0.0.1, for one test module."""
    yield from moto_server(tmp_path_factory, MOTO)


def moto_server(tmp_path_factory, script, env=None):
    """Run a moto server script on a free port of 127.0.0.1; yield its URL, then stop it."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "python"), str(script), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto server did not start (see {log.name})")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture(scope="module")
def aws_env(moto_url, tmp_path_factory):
    """The environment of a user pointed at moto: test credentials, no profile or config files."""
    home = tmp_path_factory.mktemp("home")
    # Under make test, pytest inherits every setting the Makefile exports (STACK_PREFIX and the
    # four stack names derived from it among them): a user's shell has none of them.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AWS_") and k not in MAKEFILE_EXPORTS
    }
    env.update(
        {
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "HOME": str(home),
            "AWS_ENDPOINT_URL": moto_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": MOTO_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": str(home / "no-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    return env


def client(service, moto_url, region=REGION):
    """A boto3 client of moto's server."""
    return boto3.client(
        service,
        region_name=region,
        endpoint_url=moto_url,
        aws_access_key_id="testing",
        aws_secret_access_key=MOTO_KEY,
    )


OPENSSL_CA = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]


def pem_bundle(path, *names):
    """A file of self-signed PEM certificates, one per name (a stand-in RDS CA bundle)."""
    parts = []
    for name in names:
        subprocess.run(
            [*OPENSSL_CA, "-subj", f"/CN={name}", "-keyout", f"{path}.key", "-out", f"{path}.one"],
            check=True,
            capture_output=True,
        )
        parts.append(Path(str(path) + ".one").read_text())
    path.write_text("".join(parts))
    return path
