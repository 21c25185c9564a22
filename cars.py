"""cars-api: a small REST service for a catalogue of cars.

One file on purpose: a Bottle app served by Waitress, storing cars in MySQL through PyMySQL,
or in an embedded SQLite file when MYSQL_HOST is unset. Run it with `make run` or
`python cars.py`; every setting comes from the environment (see load_settings).

Two parts, each under its own banners: the "Service plumbing" sections (configuration, logging,
storage, requests and responses, serving) serve any resource; the "The cars resource" sections,
one run in the middle, are the model, schema, queries, routes and OpenAPI document of the cars.
To serve another resource, replace that run (docs/how-to/adapt-for-your-own-service.md).
"""

import collections
import datetime
import functools
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import re
import signal
import sqlite3
import ssl
import sys
import threading
import time
import urllib.parse
import uuid
from contextlib import closing, contextmanager, suppress
from typing import NamedTuple

import bottle
import pymysql
import waitress
from bottle import request, response
from waitress import wasyncore
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask
from waitress.utilities import Error as WaitressError
from waitress.utilities import RequestEntityTooLarge

# -- Service plumbing: configuration -------------------------------------------------------------

MAX_BODY = 64 * 1024
# Visible ASCII but quote and backslash, bare or as the draft's structured-field string.
IDEMPOTENCY_KEY = r'^(?:[!#-\[\]-~]{1,255}|"[!#-\[\]-~]{1,255}")$'
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON_TYPES = frozenset({"application/json"})
PATCH_TYPES = frozenset({"application/json", "application/merge-patch+json"})
MIN_TOKEN = 32  # characters: a shorter API_TOKEN can be guessed
# The shutdown budget. The longest request waits MAX_QUEUE_TIMEOUT for a worker, then DB_TIMEOUT
# (capped at MAX_DB_TIMEOUT) for the database, twice when a deadlock is retried; the drain waits
# that long at most, then THREAD_JOIN for the workers. StopTimeout in service.yaml is above the
# sum, so ECS never kills a process that is still finishing accepted requests (a test checks).
MAX_DB_TIMEOUT = 10.0
MAX_QUEUE_TIMEOUT = 1.0
SHUTDOWN_GRACE = 2 * MAX_DB_TIMEOUT + MAX_QUEUE_TIMEOUT + 1
THREAD_JOIN = 1.0
SETTLE = 0.2  # seconds the drain keeps reading, so that requests already sent are served
STREAM_HELP = 64 * 1024  # bytes queued by a busy worker past which the event loop helps send
# Slow and hostile clients. No connection holds a worker, a slot or the shutdown for long: the
# event loop sweeps every connection each SWEEP_INTERVAL and closes those past a bound.
CONNECTION_LIMIT = 500  # open connections Waitress accepts (each is a descriptor, no thread)
EVICT_HEADROOM = 20  # nearer the limit than this, the longest-quiet connections without a
# request in a worker are closed, so the listener never stops accepting (a /health probe too)
REQUEST_TIMEOUT = 10.0  # seconds from a request's first byte to its last (headers and body)
IDLE_TIMEOUT = 65.0  # seconds a keep-alive connection may idle: above the ALB's 60 s idle timeout
OUTBUF_HIGH_WATERMARK = 1024 * 1024  # bytes queued per connection past which its worker waits
SEND_WAIT = 1.0  # seconds a worker waits for the client to take output past the mark, then drops
# the connection (one page is far below the mark: only a client that pipelines requests and
# leaves megabytes unread ever makes a worker wait)
SEND_TIMEOUT = 10.0  # seconds a finished answer may go untaken (no byte sent) before closing
DRAIN_UPLOAD = 2.0  # seconds a request half-sent at SIGTERM gets to arrive whole
SWEEP_INTERVAL = 0.25  # seconds between sweeps of the connections
CHUNKED_FRAMING = 7 * MAX_BODY  # bytes of chunk framing a chunked body may add to MAX_BODY
log = logging.getLogger("cars")


class Settings(NamedTuple):
    """Everything cars.py reads from the environment, checked."""

    host: str
    port: int
    threads: int
    mysql_host: str | None
    mysql_port: int
    mysql_user: str
    mysql_password: str
    mysql_database: str
    mysql_ssl_ca: str | None
    sqlite_path: str
    api_token: str | None
    api_token_previous: str | None
    log_level: str
    db_timeout: float
    queue_timeout: float
    anonymous_writes: bool
    auto_migrate: bool
    allow_unverified_mysql: bool


def env_number(environ, name, default, kind, low, high):
    """Read a number from the environment, or stop with one line saying what is wrong."""
    raw = environ.get(name, "").strip() or str(default)
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        sys.exit(f"cars-api: {name} must be a number from {low} to {high}, got {raw!r}")
    return value


def env_switch(environ, name, default):
    """Read true or false from the environment (empty: the default), or stop with one line."""
    raw = environ.get(name, "").strip().lower()
    if raw not in ("", "true", "false"):
        sys.exit(f"cars-api: {name} must be true or false, got {raw!r}")
    return default if not raw else raw == "true"


def load_settings(environ, serving=True):
    """Build the settings from environment variables (serving: the API_TOKEN rule applies)."""
    level = environ.get("LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        sys.exit(
            f"cars-api: LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {level!r}"
        )
    mysql_host = environ.get("MYSQL_HOST", "").strip() or None
    local_store = mysql_host is None or loopback(mysql_host)
    settings = Settings(
        host=environ.get("HOST", "").strip() or "127.0.0.1",
        port=env_number(environ, "PORT", 8080, int, 1, 65535),
        threads=env_number(environ, "THREADS", 8, int, 1, 256),
        mysql_host=mysql_host,
        mysql_port=env_number(environ, "MYSQL_PORT", 3306, int, 1, 65535),
        mysql_user=environ.get("MYSQL_USER", "").strip() or "root",
        mysql_password=environ.get("MYSQL_PASSWORD", ""),
        mysql_database=environ.get("MYSQL_DATABASE", "").strip() or "cars",
        mysql_ssl_ca=environ.get("MYSQL_SSL_CA", "").strip() or None,
        sqlite_path=environ.get("SQLITE_PATH", "").strip() or "cars.db",
        api_token=api_token(environ, "API_TOKEN"),
        api_token_previous=api_token(environ, "API_TOKEN_PREVIOUS"),
        log_level=level,
        db_timeout=env_number(environ, "DB_TIMEOUT", 5, float, 0.5, MAX_DB_TIMEOUT),
        queue_timeout=env_number(environ, "QUEUE_TIMEOUT", 0.5, float, 0.05, MAX_QUEUE_TIMEOUT),
        anonymous_writes=environ.get("ALLOW_ANONYMOUS_WRITES", "").strip().lower() == "true",
        auto_migrate=env_switch(environ, "AUTO_MIGRATE", local_store),
        allow_unverified_mysql=env_switch(environ, "ALLOW_UNVERIFIED_MYSQL", False),
    )
    if settings.api_token_previous is not None and settings.api_token is None:
        sys.exit("cars-api: API_TOKEN_PREVIOUS is accepted only besides API_TOKEN; set both")
    if not (local_store or settings.mysql_ssl_ca or settings.allow_unverified_mysql):
        sys.exit(
            f"cars-api: MYSQL_HOST {mysql_host} is not loopback, so MYSQL_SSL_CA is required to "
            "verify its certificate; set ALLOW_UNVERIFIED_MYSQL=true to connect unverified anyway"
        )
    if (
        serving
        and settings.api_token is None
        and not (loopback(settings.host) or settings.anonymous_writes)
    ):
        sys.exit(
            f"cars-api: API_TOKEN is required when listening on {settings.host}, which is not "
            "loopback; set ALLOW_ANONYMOUS_WRITES=true to accept anonymous writes anyway"
        )
    return settings


def loopback(host):
    """Tell whether a listen address is reachable from this machine only."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_token(environ, name):
    """Read a bearer token setting, stripped once; stop if it is too short to be a secret."""
    token = environ.get(name, "").strip()
    if not token:
        return None
    if len(token) < MIN_TOKEN or not token.isascii() or not token.isprintable() or " " in token:
        sys.exit(
            f"cars-api: {name} must be at least {MIN_TOKEN} printable ASCII characters "
            "without spaces (for example: openssl rand -hex 32)"
        )
    return token


# -- Service plumbing: logging -------------------------------------------------------------------

LOG_FLUSH_INTERVAL = 0.1  # seconds between batched writes: the most of the log a SIGKILL can lose
LOG_PENDING_LIMIT = 1000  # queued lines at which the caller writes them itself (bounded memory)
# Audit fields of the access line: (field, WSGI environ key, most characters kept).
AUDIT_FIELDS = (
    ("peer", "REMOTE_ADDR", 64),
    ("forwarded_for", "HTTP_X_FORWARDED_FOR", 512),
    ("trace_id", "HTTP_X_AMZN_TRACE_ID", 256),
    ("user_agent", "HTTP_USER_AGENT", 256),
)
to_json = json.JSONEncoder(default=str).encode  # ASCII out: every control and non-ASCII escaped
quote = json.encoder.encode_basestring_ascii  # one string as to_json writes it (the C function)


@functools.lru_cache(maxsize=4)
def utc_second(second):
    """Format a whole Unix second as ISO 8601 UTC; every line in that second reuses it."""
    return datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def log_time(timestamp):
    """Format a Unix time as ISO 8601 UTC with milliseconds."""
    second = int(timestamp)
    return f"{utc_second(second)}.{int((timestamp - second) * 1000):03d}+00:00"


class JsonFormatter(logging.Formatter):
    """Render each log record as one JSON object per line."""

    def format(self, record):
        entry = {
            "time": log_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return to_json(entry)


class JsonLineHandler(logging.Handler):
    """Write JSON lines to stdout, whole and in order; access lines in batches.

    An access line only appends to a deque: no lock, no system call, nothing that lets go of the
    GIL. A thread writes what has queued every LOG_FLUSH_INTERVAL; any other record, and flush()
    (at exit, on SIGTERM), writes the queue at once. One lock serialises every write of the
    process, so no line is torn.
    """

    active = None  # the handler configure_logging installed; the access line writes to it

    def __init__(self):
        super().__init__()
        self.pending = collections.deque()
        self.write_lock = threading.Lock()
        self.closed = threading.Event()
        threading.Thread(target=self.keep_writing, name="log-writer", daemon=True).start()

    def emit(self, record):
        """Write one record now, after the queued lines: only the access line waits for a batch."""
        try:
            self.pending.append(self.format(record))
            self.flush()
        except Exception:  # logging's contract: a broken record must not break the caller
            self.handleError(record)

    def put(self, line):
        """Queue one line; write at once when the writer falls behind or has stopped."""
        self.pending.append(line)
        if len(self.pending) >= LOG_PENDING_LIMIT or self.closed.is_set():
            self.flush()

    def keep_writing(self):
        """Write the queued lines every LOG_FLUSH_INTERVAL until closed."""
        while not self.closed.wait(LOG_FLUSH_INTERVAL):
            self.flush()

    def flush(self):
        """Write every queued line to stdout."""
        self.write_now(1, "")

    def write_now(self, fd, line):
        """Write the queued lines to stdout, then line (if any) to fd, under the one lock."""
        with self.write_lock:
            count = len(self.pending)
            batch = [self.pending.popleft() for _ in range(count)]
            write_all(1, "".join(f"{entry}\n" for entry in batch))
            write_all(fd, line)

    def close(self):
        """Stop the writer thread and write what is left."""
        self.closed.set()
        self.flush()
        super().close()


def write_all(fd, text):
    """Write text to a file descriptor completely; drop it if the descriptor is gone."""
    data = memoryview(text.encode())
    with suppress(OSError):  # stdout closed or broken: there is nowhere left to report it
        while data:
            data = data[os.write(fd, data) :]


class JsonStream(io.TextIOBase):
    """Stand in for sys.stdout or sys.stderr: turn whatever other code prints into JSON lines."""

    encoding = "utf-8"

    def __init__(self, handler, fd, name, level):
        super().__init__()
        self.handler, self.fd, self.name, self.level = handler, fd, name, level
        self.partial, self.lock = "", threading.Lock()

    def writable(self):
        """Say that this stream takes writes."""
        return True

    def fileno(self):
        """Return the real descriptor, for C code such as faulthandler."""
        return self.fd

    def write(self, text):
        """Log each write's complete lines as one entry (a traceback stays one entry)."""
        with self.lock:
            whole, newline, self.partial = (self.partial + text).rpartition("\n")
        if newline:
            self.emit(whole)
        return len(text)

    def flush(self):
        """Log what is left of an unfinished line."""
        with self.lock:
            rest, self.partial = self.partial, ""
        if rest:
            self.emit(rest)

    def emit(self, text):
        """Write text as one JSON entry: stdout's queued with the log, stderr's at once."""
        entry = {"time": log_time(time.time()), "level": self.level, "logger": self.name}
        lines = text.rstrip("\n").splitlines() or [""]
        entry["message"] = lines[-1] if lines[0].startswith("Traceback") else "\n".join(lines)
        if lines[0].startswith("Traceback"):
            entry["traceback"] = text
        if self.fd == 1:
            self.handler.put(to_json(entry))
        else:
            self.handler.write_now(self.fd, to_json(entry) + "\n")


def log_uncaught(kind, value, traceback, thread=None):
    """Log an exception nothing caught as one JSON line instead of a bare traceback."""
    where = f" in thread {thread.name}" if thread is not None else ""
    level = logging.CRITICAL if thread is None else logging.ERROR
    log.log(level, f"uncaught exception{where}", exc_info=(kind, value, traceback))


def configure_logging(level):
    """Make every line the process writes, to stdout or stderr, one JSON object."""
    handler = JsonLineHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    JsonLineHandler.active = handler
    # No format here shows the caller, thread or process: skip collecting them on every record
    # (the "Optimization" advice of the logging docs).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    sys.excepthook = log_uncaught
    threading.excepthook = lambda args: log_uncaught(
        args.exc_type, args.exc_value, args.exc_traceback, args.thread
    )
    # Whatever still prints (Bottle's tracebacks to wsgi.errors, a library) becomes JSON too.
    sys.stdout = JsonStream(handler, 1, "stdout", "INFO")
    sys.stderr = JsonStream(handler, 2, "stderr", "ERROR")
    return handler


# -- Service plumbing: storage -------------------------------------------------------------------


class Migration(NamedTuple):
    """One schema change, applied once and in order, and recorded in schema_migrations."""

    version: int
    description: str
    mysql: tuple  # statements, run in order
    sqlite: tuple
    oldest_code: int  # the oldest code (named by its SCHEMA_VERSION) that still works after it


SCHEMA_TABLE = {
    True: "CREATE TABLE IF NOT EXISTS schema_migrations (version INT UNSIGNED NOT NULL PRIMARY KEY,"
    " description VARCHAR(255) NOT NULL, oldest_code INT UNSIGNED NOT NULL,"
    " applied_at BIGINT NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    False: "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER NOT NULL PRIMARY KEY,"
    " description TEXT NOT NULL, oldest_code INTEGER NOT NULL, applied_at INTEGER NOT NULL)",
}
SELECT_SCHEMA = "SELECT MAX(version), MAX(oldest_code) FROM schema_migrations"
SELECT_DATABASE = "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s"
INSERT_MIGRATION = (
    "INSERT INTO schema_migrations (version, description, oldest_code, applied_at)"
    " VALUES (%s, %s, %s, %s)"
)
MIGRATION_LOCK_WAIT = 60.0  # seconds `migrate` waits for another run's lock (serving: DB_TIMEOUT)
MIGRATION_READ_TIMEOUT = 900.0  # seconds one DDL statement may run (an ALTER of a big table)
SCHEMA_RECHECK = 1.0  # seconds a refused schema is trusted before the database is asked again
# Identities that bootstrap creates: the migration one changes the schema of the application's
# database only; the application one reads and writes its rows only. Neither has GRANT OPTION.
GRANTS = {
    "MIGRATION": "SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, DROP, INDEX, REFERENCES,"
    " LOCK TABLES",
    "APP": "SELECT, INSERT, UPDATE, DELETE",
}
CLONE_SUFFIX = "_clone"  # the second user of an alternating-users password rotation
SELECT_KEY = "SELECT fingerprint, car_id, created_at FROM idempotency_keys WHERE idem_key = %s"
# MySQL's plain SELECT reads a snapshot: a key another process replaced since would look expired.
# The locking read waits for that process and sees its row; SQLite's BEGIN IMMEDIATE serialises.
SELECT_KEY_FOR_UPDATE = SELECT_KEY + " FOR UPDATE"
DELETE_KEY = "DELETE FROM idempotency_keys WHERE idem_key = %s AND created_at = %s"
INSERT_KEY = (
    "INSERT INTO idempotency_keys (idem_key, fingerprint, car_id, created_at)"
    " VALUES (%s, %s, %s, %s)"
)
# SQLite has no DELETE ... LIMIT unless compiled for it; both delete the oldest batch first.
DELETE_EXPIRED_KEYS = {
    True: "DELETE FROM idempotency_keys WHERE created_at < %s ORDER BY created_at LIMIT %s",
    False: "DELETE FROM idempotency_keys WHERE idem_key IN (SELECT idem_key FROM idempotency_keys"
    " WHERE created_at < %s ORDER BY created_at LIMIT %s)",
}
KEY_LIFETIME = 24 * 3600  # seconds an Idempotency-Key is remembered
KEY_CLEANUP_BATCH = 100  # expired keys each keyed POST deletes: bounded, and more than it adds
ANONYMOUS = b"anonymous"  # the caller of a write when no API_TOKEN is set
# MySQL error numbers by meaning. Anything not named here is a bug or a schema problem: 500.
# The connection is unusable; 2026: TLS failed (MYSQL_SSL_CA set and a server without TLS).
MYSQL_LINK_LOST = frozenset({2002, 2003, 2006, 2013, 2014, 2026, 2055})
MYSQL_BUSY = frozenset(
    {
        1040,  # too many connections
        1053,  # server shutdown in progress
        1203,  # too many connections for this user
        1205,  # lock wait timeout
        1290,  # --read-only (or another option) forbids the statement
        1317,  # query interrupted (KILL QUERY)
        1792,  # read-only transaction
        1836,  # read-only mode
        1927,  # connection killed (MariaDB)
    }
)
MYSQL_DENIED = frozenset({1044, 1045})  # credentials refused: a rotation half done, or a bad secret
MYSQL_DEADLOCK = 1213
MYSQL_DUPLICATE = 1062
MYSQL_NO_TABLE = 1146
MYSQL_NO_DATABASE = 1049
# SQLite reports by message only; these mean "not now", not "never".
SQLITE_BUSY = ("locked", "readonly database", "unable to open", "disk i/o error", "disk is full")


class UnavailableError(Exception):
    """The database cannot serve the request now; the same request may succeed later."""


class LinkLostError(UnavailableError):
    """The connection broke; timed_out tells a silent database from a closed socket."""

    def __init__(self, message, timed_out):
        super().__init__(message)
        self.timed_out = timed_out


class DeadlockError(UnavailableError):
    """The database rolled the transaction back to break a deadlock."""


class ConflictError(Exception):
    """A row with the same unique key exists already."""


class StoreError(Exception):
    """A database error that retrying cannot fix: a bug, or a schema that does not match."""


class SchemaError(Exception):
    """The database's schema version is one this code does not support (yet, or any more)."""


class MigrationError(Exception):
    """A migration failed; the schema version stays where the last good one left it."""

    def __init__(self, migration, cause):
        super().__init__(str(cause))
        self.migration = migration


def missing(exc):
    """Tell whether a database error says that a table does not exist (yet)."""
    if isinstance(exc, sqlite3.Error):
        return "no such table" in str(exc)
    return bool(exc.args) and exc.args[0] == MYSQL_NO_TABLE


def supported(version, oldest_code):
    """Tell whether this code works on a schema at version, which needs code oldest_code."""
    return version >= SCHEMA_VERSION and oldest_code <= SCHEMA_VERSION


def classify(exc):
    """Name what a database error means: lost, busy, deadlock, conflict or broken."""
    if isinstance(exc, sqlite3.Error):
        message = str(exc).lower()
        if isinstance(exc, sqlite3.IntegrityError) and "unique" in message:
            return "conflict"
        return "busy" if any(words in message for words in SQLITE_BUSY) else "broken"
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    if isinstance(exc, pymysql.err.InterfaceError) or code in MYSQL_LINK_LOST:
        return "lost"
    if code in MYSQL_BUSY or code in MYSQL_DENIED:
        return "busy"
    if code == MYSQL_DEADLOCK:
        return "deadlock"
    return "conflict" if code == MYSQL_DUPLICATE else "broken"


def store_failure(exc):
    """Return the exception that says what a database error means for the request."""
    kind, message = classify(exc), str(exc)
    if kind == "lost":
        return LinkLostError(message, isinstance(exc.__context__, TimeoutError))
    error = {
        "busy": UnavailableError,
        "deadlock": DeadlockError,
        "conflict": ConflictError,
        "broken": StoreError,
    }[kind]
    return error(message)


def tls_context(ca):
    """Return the one TLS context of all MySQL connections.

    With a CA (a PEM file's path, or the PEM text itself, as ECS hands a secret over), TLS 1.2 or
    newer is required and the server's certificate and host name are verified: a wrong CA or name
    fails the connection. Without one, TLS is used when the server offers it, unverified.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        return context
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if ca.startswith("-----BEGIN"):
            context.load_verify_locations(cadata=ca)
        else:
            context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        sys.exit(f"cars-api: MYSQL_SSL_CA is not a readable PEM CA certificate: {exc}")
    return context


class Database:
    """Hand each worker thread one reusable connection to MySQL or SQLite."""

    def __init__(self, settings):
        self.settings = settings
        self.mysql = settings.mysql_host is not None
        self.errors = (pymysql.err.Error,) if self.mysql else (sqlite3.Error,)
        self.local = threading.local()
        # AUTO_MIGRATE checks at first use, then never again: a database dropped later is an
        # error to see (500), not one to recreate empty. Two threads checking at once is harmless.
        self.schema_ready = not settings.auto_migrate
        self.schema_lock = threading.Lock()  # guards the refusal below, so that it logs once
        self.refused, self.refused_at = None, 0.0  # the (version, oldest code) refused, and when
        # SQLite only, local and quick: switching a new file to WAL fails at once ("database is
        # locked", no busy wait) while another connection switches it too, so this process's
        # opens take turns (and switch_to_wal retries while another process holds it).
        self.sqlite_open_lock = threading.Lock()
        self.tls = tls_context(settings.mysql_ssl_ca)

    def describe(self):
        """Name the store for the start-up log, without credentials."""
        s = self.settings
        if self.mysql:
            return f"mysql://{s.mysql_user}@{s.mysql_host}:{s.mysql_port}/{s.mysql_database}"
        return f"sqlite:///{os.path.abspath(s.sqlite_path)}"

    def timeouts(self):
        """Return (lock wait in whole seconds, socket timeout) that fit in DB_TIMEOUT.

        The server's lock waits end at least half a second before the socket gives up, so that
        a lock wait ends with a clean error on a healthy connection; the socket timeout catches
        only a database that stopped answering. Below 1.5 s the socket gets the half second extra.
        """
        lock_wait = max(1, math.ceil(self.settings.db_timeout) - 1)
        return lock_wait, max(self.settings.db_timeout, lock_wait + 0.5)

    def open(self, database=True, read_timeout=None):
        """Open a new connection with the timeouts that keep requests bounded."""
        s = self.settings
        if not self.mysql:
            with self.sqlite_open_lock:
                conn = sqlite3.connect(s.sqlite_path, timeout=s.db_timeout, isolation_level=None)
                self.switch_to_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn
        lock_wait, socket_timeout = self.timeouts()
        conn = pymysql.connections.Connection(
            host=s.mysql_host,
            port=s.mysql_port,
            user=s.mysql_user,
            password=s.mysql_password,
            database=s.mysql_database if database else None,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=s.db_timeout,
            read_timeout=read_timeout or socket_timeout,
            write_timeout=socket_timeout,
            init_command=(
                f"SET SESSION lock_wait_timeout={lock_wait}, innodb_lock_wait_timeout={lock_wait}"
            ),
            defer_connect=True,
            **({"ssl": self.tls} if s.mysql_ssl_ca else {"ssl_disabled": True}),
        )
        if not s.mysql_ssl_ca:
            # PyMySQL's default (TLS if the server offers it, unverified) builds a new SSL context
            # per connection, loading the CA store while holding the GIL: 0.3 s under load, which
            # stalls every thread when an outage makes each request reconnect. Same mode, one
            # context.
            conn.ssl, conn.ctx = True, self.tls
        conn.connect()
        return conn

    def switch_to_wal(self, conn):
        """Put a SQLite file in WAL mode, retrying within DB_TIMEOUT while others hold it.

        The switch fails at once ("database is locked", SQLite's busy wait does not apply) while
        another connection, of this process or another, uses a file still in rollback mode.
        """
        deadline = time.monotonic() + self.settings.db_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)

    def on(self, conn, sql, args=None):
        """Run one statement on a given connection (migrations, bootstrap); return the cursor."""
        cur = conn.cursor()
        if self.mysql:
            cur.execute(sql, args)  # without args, PyMySQL leaves a % in the text alone
        else:
            cur.execute(sql.replace("%s", "?"), args or ())
        return cur

    def schema_version(self, conn):
        """Return (version, oldest code) that the database records; (0, 0) before migrations."""
        try:
            version, oldest_code = self.on(conn, SELECT_SCHEMA).fetchone()
        except self.errors as exc:
            if not missing(exc):
                raise
            return 0, 0
        return version or 0, oldest_code or 0

    def create_schema(self, read_timeout=None, patience=None):
        """Apply the pending migrations in order, each in its own lock; return those applied.

        patience bounds each wait for another run's lock: DB_TIMEOUT unless given (`migrate`).
        """
        applied = []
        conn = self.open(database=False, read_timeout=read_timeout)
        try:
            if self.mysql:
                self.use_database(conn)
            while True:
                with self.migration_lock(conn, patience or self.settings.db_timeout):
                    migration = self.apply_next(conn)
                if migration is None:
                    break
                applied.append(migration)
                log.info(
                    "migration applied",
                    extra={"fields": {"version": migration.version, "what": migration.description}},
                )
        finally:
            conn.close()
        return applied

    def use_database(self, conn):
        """Switch to the app's database, creating it only if missing (an app identity cannot)."""
        name = self.settings.mysql_database
        if not self.on(conn, SELECT_DATABASE, (name,)).fetchone():
            quoted = name.replace("`", "``")
            self.on(conn, f"CREATE DATABASE IF NOT EXISTS `{quoted}` CHARACTER SET utf8mb4")
        self.on(conn, f"USE `{name.replace('`', '``')}`")

    def apply_next(self, conn):
        """Apply the first migration the database lacks and record it; return it, or None."""
        self.on(conn, SCHEMA_TABLE[self.mysql])
        version, _ = self.schema_version(conn)
        migration = next((m for m in MIGRATIONS if m.version > version), None)
        if migration is None:
            return None
        try:
            for statement in migration.mysql if self.mysql else migration.sqlite:
                self.on(conn, statement)
            row = (migration.version, migration.description, migration.oldest_code, time.time())
            self.on(conn, INSERT_MIGRATION, (*row[:3], int(row[3])))
        except self.errors as exc:
            raise MigrationError(migration, exc) from exc
        return migration

    @contextmanager
    def migration_lock(self, conn, patience):
        """Hold the database's migration lock: GET_LOCK (MySQL) or an IMMEDIATE transaction.

        MySQL's lock is awaited patience seconds at most, in waits that fit the socket timeout.
        """
        if not self.mysql:
            conn.execute("BEGIN IMMEDIATE")  # SQLite's DDL is transactional: all of it or none
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return
        name = f"cars-api:migrate:{self.settings.mysql_database}"[:64]  # MySQL's longest name
        deadline = time.monotonic() + patience
        wait = self.timeouts()[0]  # inside the socket's read timeout, and within DB_TIMEOUT
        while not self.on(conn, "SELECT GET_LOCK(%s, %s)", (name, wait)).fetchone()[0]:
            if time.monotonic() + wait > deadline:
                raise UnavailableError(f"another migration held the lock past {patience} s")
        try:
            yield
        finally:
            self.on(conn, "SELECT RELEASE_LOCK(%s)", (name,))

    def check_schema(self, version, oldest_code):
        """Raise SchemaError unless this code supports the schema; log each new verdict once."""
        with self.schema_lock:
            if supported(version, oldest_code):
                if self.refused is not None:
                    log.info("schema supported", extra={"fields": {"schema_version": version}})
                self.refused = None
                return
            verdict, self.refused_at = (version, oldest_code), time.monotonic()
            if verdict != self.refused:
                fields = {
                    "schema_version": version,
                    "schema_needs_code": oldest_code,
                    "code_version": SCHEMA_VERSION,
                    "auto_migrate": self.settings.auto_migrate,
                }
                log.error("schema not supported", extra={"fields": fields})
            self.refused = verdict
        raise SchemaError(f"schema version {version} needs code {oldest_code}")

    def open_unless_missing(self):
        """Open a connection; None if the MySQL database is missing and the migration makes it."""
        try:
            return self.open()
        except self.errors as exc:
            code = exc.args[0] if exc.args else None
            if not self.schema_ready and self.mysql and code == MYSQL_NO_DATABASE:
                return None
            raise

    def recently_refused(self):
        """Raise SchemaError while a refusal is fresh, sparing the database a query per request."""
        if self.refused is not None and time.monotonic() < self.refused_at + SCHEMA_RECHECK:
            raise SchemaError("schema version {} needs code {}".format(*self.refused))

    def connection(self):
        """Return this thread's connection; a new one migrates (AUTO_MIGRATE) and checks the schema.

        Each new connection reads the schema version (migrating first if it is behind, with
        AUTO_MIGRATE on), and a refusal is asked again after SCHEMA_RECHECK: running `migrate`
        later makes the server ready without a restart, at the cost of one small query per new
        connection (connections live as long as their thread).
        """
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            return conn
        self.recently_refused()
        try:
            conn = self.open_unless_missing()
            version = self.schema_version(conn) if conn else (0, 0)
            # Migrate only when behind: a current schema needs no DDL right, so an app identity
            # with AUTO_MIGRATE on serves. The lock wait is bounded by DB_TIMEOUT.
            if not self.schema_ready and version[0] < SCHEMA_VERSION:
                self.create_schema()
                conn = conn or self.open()
                version = self.schema_version(conn)
            self.schema_ready = True
        except (MigrationError, UnavailableError, *self.errors) as exc:
            if conn is not None:
                with suppress(Exception):  # the connection may be the broken part
                    conn.close()
            if isinstance(exc, UnavailableError):  # the migration lock stayed taken
                raise
            cause = exc.__cause__ if isinstance(exc, MigrationError) else exc
            raise store_failure(cause) from exc
        try:
            self.check_schema(*version)
        except SchemaError:
            conn.close()
            raise
        self.local.conn = conn
        return conn

    def discard(self):
        """Drop this thread's connection so that the next request opens a fresh one."""
        conn = getattr(self.local, "conn", None)
        self.local.conn = None
        if conn is not None:
            with suppress(Exception):  # the connection is already broken; closing is best effort
                conn.close()

    def run(self, sql, args):
        """Run one statement on this thread's connection; translate what a failure means."""
        conn = self.connection()
        try:
            cur = self.on(conn, sql, args)
        except self.errors as exc:
            failure = store_failure(exc)
            if isinstance(failure, LinkLostError):
                self.discard()
            raise failure from exc
        return cur

    def execute(self, sql, args=()):
        """Run one parameterised statement and return the cursor.

        Outside a transaction, a reused connection found closed (the server restarted, or
        dropped it while idle) gets one more try on a fresh one; nothing ran, so that is safe.
        A silent database is not retried: that would double the wait.
        """
        reused = getattr(self.local, "conn", None) is not None
        try:
            return self.run(sql, args)
        except LinkLostError as exc:
            if not reused or exc.timed_out or getattr(self.local, "in_transaction", False):
                raise
        return self.run(sql, args)

    @contextmanager
    def transaction(self):
        """Run the enclosed statements atomically: all of them or none, on one connection."""
        self.execute("BEGIN" if self.mysql else "BEGIN IMMEDIATE")
        conn, self.local.in_transaction = self.local.conn, True
        committing = False
        try:
            yield
            committing = True
            conn.commit()
        except BaseException as exc:
            failure = store_failure(exc) if isinstance(exc, self.errors) else None
            if committing or isinstance(failure, LinkLostError):
                self.discard()  # the server rolls back what a dead or doubtful link left open
            else:
                self.rollback(conn)
            if failure is not None:
                raise failure from exc
            raise
        finally:
            self.local.in_transaction = False

    def rollback(self, conn):
        """Roll back, or drop a connection that cannot even do that."""
        if conn is not self.local.conn:
            return  # already discarded by a statement that lost its link
        try:
            conn.rollback()
        except Exception:  # a failed rollback leaves a connection we must drop
            self.discard()

    def atomically(self, work):
        """Return work() run in one transaction, run once more if a deadlock aborted it."""
        try:
            with self.transaction():
                return work()
        except DeadlockError as exc:
            log.info(
                "deadlock; retrying the transaction once", extra={"fields": {"error": str(exc)}}
            )
        with self.transaction():
            return work()


def bootstrap(database, environ):
    """Create the database and the two identities if missing, and (re)apply their grants.

    Runs with the master credentials in MYSQL_USER. A user that exists keeps its password (a
    rotation owns it from then on); its `<name>_clone` twin, if the alternating-users rotation
    made one, gets the same grants. Grants only ever add, so running it again is harmless.
    """
    names = {kind: environ.get(f"{kind}_USER", "").strip() for kind in GRANTS}
    passwords = {kind: environ.get(f"{kind}_PASSWORD", "") for kind in GRANTS}
    if not all(names.values()) or not all(passwords.values()) or len(set(names.values())) < 2:
        raise ValueError(
            "bootstrap needs MIGRATION_USER, MIGRATION_PASSWORD, APP_USER and APP_PASSWORD,"
            " with two different user names"
        )
    schema = database.settings.mysql_database.replace("`", "``")
    granted = []
    with database.open(database=False) as conn:
        database.on(conn, f"CREATE DATABASE IF NOT EXISTS `{schema}` CHARACTER SET utf8mb4")
        for kind, privileges in GRANTS.items():
            user = names[kind]
            database.on(
                conn, "CREATE USER IF NOT EXISTS %s@'%%' IDENTIFIED BY %s", (user, passwords[kind])
            )
            sql = "SELECT User, Host FROM mysql.user WHERE User IN (%s, %s) ORDER BY User, Host"
            for account in database.on(conn, sql, (user, user + CLONE_SUFFIX)).fetchall():
                database.on(conn, f"GRANT {privileges} ON `{schema}`.* TO %s@%s", account)
                granted.append("@".join(account))
    return granted


def db():
    """Return the database of the running app."""
    return app.config["cars.db"]


def query(sql, args=()):
    """Run one parameterised SQL statement and return the cursor."""
    return db().execute(sql, args)


def scoped_key(key, caller, operation):
    """Return the stored form of an Idempotency-Key: one per caller (credential) and operation.

    A hash, so that the column keeps its width and never holds a credential.
    """
    scope = hashlib.sha256(caller)
    scope.update(f"\n{operation}\n{key}".encode())
    return scope.hexdigest()


def forget_expired_keys():
    """Delete the oldest batch of Idempotency-Keys past their lifetime."""
    cutoff = int(time.time()) - KEY_LIFETIME
    query(DELETE_EXPIRED_KEYS[db().mysql], (cutoff, KEY_CLEANUP_BATCH))


in_flight_keys = set()  # Idempotency-Keys whose request this process is running
in_flight_lock = threading.Lock()


@contextmanager
def claim_key(key):
    """Hold an Idempotency-Key for one request, or raise 409 while another request holds it."""
    with in_flight_lock:
        if key in in_flight_keys:
            raise problem(409, "A request with this Idempotency-Key is still in progress.")
        in_flight_keys.add(key)
    try:
        yield
    finally:
        with in_flight_lock:
            in_flight_keys.discard(key)


# -- Service plumbing: requests and responses ----------------------------------------------------


def header(name, default=""):
    """Return a request header as the WSGI server passed it (one byte per character).

    The one place that reads headers: Bottle's get_header() decodes values as UTF-8 and raises on
    other bytes, so a header a client controls could turn into a 500. Compared with ASCII tokens
    and tags, the raw text matches exactly what it should and nothing else.
    """
    return request.environ.get("HTTP_" + name.upper().replace("-", "_"), default)


def problem(status, detail, errors=None, **headers):
    """Build an RFC 9457 problem response to raise."""
    body = {"type": "about:blank", "title": bottle.HTTP_CODES[status], "status": status}
    body["detail"] = detail
    if errors:
        body["errors"] = errors
    return bottle.HTTPError(status, body, **headers)


def render_problem(error):
    """Render any HTTP error, ours or Bottle's, as application/problem+json."""
    body = error.body
    if error.status_code == 405:
        response.set_header("Allow", ", ".join(allowed_methods(request.path)))
    if not isinstance(body, dict):
        status = error.status_code
        details = {
            404: "No such resource.",
            405: f"Allowed methods: {response.get_header('Allow')}.",
        }
        body = problem(status, details.get(status, bottle.HTTP_CODES.get(status, ""))).body
    response.content_type = "application/problem+json"
    return json.dumps(body)


def send(data, status=200, etag_version=None, **headers):
    """Serialise data as the JSON response, with an ETag when a version is given."""
    response.status = status
    response.content_type = "application/json"
    if etag_version is not None:
        response.set_header("ETag", etag(etag_version))
    for name, value in headers.items():
        response.set_header(name.replace("_", "-"), value)
    return json.dumps(data, separators=(",", ":"))


def etag(version):
    """Return the strong entity tag of a row version."""
    return f'"v{version}"'


def check_if_match(version):
    """Refuse the write with 412 when If-Match names another version."""
    given = header("If-Match")
    if not given:
        return
    tags = {tag.strip() for tag in given.split(",")}
    if "*" not in tags and etag(version) not in tags:
        raise problem(412, f"If-Match does not match the current ETag {etag(version)}.")


def read_body(types):
    """Return the raw body of a JSON request, or raise 413 or 415; parse_json reads it."""
    media, *params = request.content_type.split(";")
    charsets = [
        value.strip().strip('"').lower()
        for name, _, value in (param.partition("=") for param in params)
        if name.strip().lower() == "charset"
    ]
    if media.strip().lower() not in types or any(c != "utf-8" for c in charsets):
        raise problem(415, f"Content-Type must be {' or '.join(sorted(types))}, in UTF-8.")
    if request.content_length > MAX_BODY:
        raise problem(413, f"The body is larger than {MAX_BODY} bytes.")
    raw = request.body.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise problem(413, f"The body is larger than {MAX_BODY} bytes.")
    return raw


def parse_json(raw):
    """Return a body as a JSON object, or raise 400 or 422."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        raise problem(400, f"The body is not valid UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise problem(422, "The body must be a JSON object.")
    return data


def idempotency_key():
    """Return the request's Idempotency-Key, None without one, or raise 400."""
    raw = header("Idempotency-Key", None)
    if raw is None:
        return None
    if not re.fullmatch(IDEMPOTENCY_KEY, raw):
        raise problem(400, "Idempotency-Key must be 1 to 255 visible ASCII characters.")
    return raw.strip('"')


def reject_constant(name):
    """Refuse NaN and Infinity, which are not JSON."""
    raise ValueError(f"{name} is not a JSON value")


app = bottle.Bottle()
app.uninstall("json")  # we serialise ourselves, so problem bodies keep their shape
app.default_error_handler = render_problem


@app.hook("before_request")
def start_request():
    """Note when the request began and its id; refuse a path that is not UTF-8; answer OPTIONS."""
    request.environ["cars.start"] = time.perf_counter()
    request.environ["cars.request_id"] = request_id_of(header("X-Request-Id"))
    try:
        request.environ["bottle.raw_path"].encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise problem(400, "The path is not valid UTF-8.") from None
    if not canonical(request.environ.get("REQUEST_URI", "/")):
        raise problem(404, "No such resource.")
    if request.method == "OPTIONS":
        allowed = allowed_methods(request.path)
        if not allowed:
            raise problem(404, "No such resource.")
        raise bottle.HTTPResponse(status=204, Allow=", ".join(allowed))


def canonical(target):
    """Tell whether a raw request target spells its path the one way (one URL per car).

    No path of this API needs percent-encoding or an empty segment, while Waitress decodes both
    away: /cars%2F1, /cars/%31 and //cars/1 would all reach car 1.
    """
    path = target.partition("?")[0]
    if not path.startswith("/"):  # absolute form, http://host/path (RFC 9112 section 3.2.2)
        path = "/" + path.partition("://")[2].partition("/")[2]
    return "%" not in path and "//" not in path


def request_id_of(given):
    """Return the client's X-Request-Id if it is usable, else a new one."""
    valid = 0 < len(given) <= 128 and given.isascii() and given.isprintable()
    return given if valid else uuid.uuid4().hex


def allowed_methods(path):
    """Return the methods a path answers, HEAD and OPTIONS included; none for unknown paths."""
    methods = set()
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        with suppress(bottle.HTTPError):
            app.router.match({"PATH_INFO": path, "REQUEST_METHOD": method})
            methods.add(method)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods | {"OPTIONS"}) if methods else []


@app.hook("after_request")
def finish_request():
    """Echo the request id and write the access line."""
    environ = request.environ
    request_id = environ.get("cars.request_id", "")
    response.set_header("X-Request-Id", request_id)
    if log.isEnabledFor(logging.INFO):
        method = environ["REQUEST_METHOD"]
        started = environ.get("cars.start", time.perf_counter())
        duration = round((time.perf_counter() - started) * 1000, 2)
        auth = environ.get("cars.auth", "none") if method in WRITE_METHODS else None
        fields = (method, request.path, response.status_code, duration, request_id, auth)
        access_line(*fields, environ)


def access_line(method, path, status, duration_ms, request_id, auth, environ):
    """Queue the access line: one f-string, no logging record, no write.

    Every answered request, those Waitress refuses too, logs the same fields (null if unknown):
    auth is the result of the token check on writes, null where none was made.
    """
    line = (
        f'{{"time": "{log_time(time.time())}", "level": "INFO", "logger": "cars", '
        f'"message": "request", "method": {quote(method) if method else "null"}, '
        f'"path": {quote(path) if path else "null"}, "status": {status}, '
        f'"duration_ms": {duration_ms}, "request_id": {quote(request_id)}'
    )
    for name, key, limit in AUDIT_FIELDS:  # environ never raises on bytes that are not UTF-8
        value = environ.get(key)
        line += f', "{name}": {quote(value[:limit]) if value else "null"}'
    line += f', "auth": {quote(auth) if auth else "null"}'
    if JsonLineHandler.active is None:  # logging not configured: the WSGI app driven in-process
        log.info("request", extra={"fields": json.loads(line + "}")})
    else:
        JsonLineHandler.active.put(line + "}")


def authorize():
    """Demand a bearer token on writes when API_TOKEN is set; note which one for the audit.

    Without API_TOKEN, a write must name a Host no DNS-rebinding page can (rebinding_safe).

    During a rotation API_TOKEN_PREVIOUS is accepted too ("ok-previous"); both are compared in
    constant time, always both, so the timing tells nothing about either.
    """
    settings = app.config["cars.settings"]
    if settings.api_token is None:
        if not rebinding_safe(header("Host")):
            raise problem(
                403,
                "Without API_TOKEN, writes are accepted only for a Host that is localhost or an"
                " IP address: another name may be a page rebinding its DNS to this service.",
            )
        return
    request.environ["cars.auth"] = "failed"
    scheme, _, given = header("Authorization").partition(" ")
    given = given.strip().encode("latin-1")
    current = hmac.compare_digest(given, settings.api_token.encode())
    previous = hmac.compare_digest(given, (settings.api_token_previous or "").encode())
    if scheme.lower() != "bearer" or not (current or (previous and given)):
        raise problem(
            401, "A valid bearer token is required.", WWW_Authenticate='Bearer realm="cars-api"'
        )
    request.environ["cars.auth"] = "ok" if current else "ok-previous"
    request.environ["cars.caller"] = given  # scopes Idempotency-Keys to this credential


def rebinding_safe(host):
    """Tell whether a Host header cannot be a DNS-rebinding page's: localhost or an IP literal.

    A browser sends the page's own host name, and a page whose origin is an address cannot
    rebind it. The port is not checked: a container's port may be published on another.
    """
    if not host:
        return True  # browsers always send Host; a client without one is not a web page
    name = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
    name = name.lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def guard(callback):
    """Wrap each route: authorize writes, turn outages into 503 and crashes into a bare 500."""

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        if request.method in WRITE_METHODS:
            authorize()
        try:
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except SchemaError:  # logged once by check_schema, not per request
            raise problem(
                503, "The database schema is not supported by this release.", Retry_After="5"
            ) from None
        except UnavailableError as exc:
            log.warning("database unavailable", extra={"fields": {"error": str(exc)}})
            raise problem(
                503, "The database is unavailable; retry shortly.", Retry_After="5"
            ) from None
        except StoreError as exc:
            log.error("database error", extra={"fields": {"path": request.path, "cause": str(exc)}})
            raise problem(500, "An unexpected error occurred.") from None
        except Exception:
            log.exception("unhandled error", extra={"fields": {"path": request.path}})
            raise problem(500, "An unexpected error occurred.") from None

    return wrapper


app.install(guard)


@app.get("/health")
def health():
    """Answer liveness checks without touching the database."""
    return send({"status": "ok"})


@app.get("/ready")
def ready():
    """Answer 200 only when the database does."""
    query("SELECT 1").fetchall()
    return send({"status": "ready"})


# -- The cars resource: model and validation -----------------------------------------------------

MAX_ID = 2**63 - 1
FIRST_CAR_YEAR = 1886
TEXT_MAX = 64  # code points of brand and model, before trimming
# Text fields are trimmed of the Unicode White_Space characters (ECMA-262's \s knows them too)
# and may not contain controls (C0, DEL, C1). Validator and OpenAPI share these. Lone surrogates
# are refused too: they are not Unicode text, and JSON Schema strings are Unicode text.
TRIMMED_RANGES = (
    (0x09, 0x0D),
    (0x20, 0x20),
    (0xA0, 0xA0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x2028, 0x2029),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
    (0xFEFF, 0xFEFF),
)
FORBIDDEN_RANGES = ((0x00, 0x1F), (0x7F, 0x9F))
FIELDS = ("brand", "model", "year")


def parse_id(raw):
    """Return the integer id in a URL, or raise 404 for anything else (one URL per car)."""
    canonical = raw.isascii() and raw.isdigit() and not raw.startswith("0") and len(raw) <= 19
    if not canonical or int(raw) > MAX_ID:
        raise problem(404, f"No car with id {raw!r}.")
    return int(raw)


def char_class(ranges):
    """Write code point ranges as the inside of a regex class, valid in Python and ECMA-262."""
    return "".join(f"\\u{lo:04x}" + (f"-\\u{hi:04x}" if hi > lo else "") for lo, hi in ranges)


TRIMMED = "".join(chr(c) for lo, hi in TRIMMED_RANGES for c in range(lo, hi + 1))
FORBIDDEN = re.compile(f"[{char_class(FORBIDDEN_RANGES)}]")
SURROGATE = re.compile(r"[\ud800-\udfff]")


def text_pattern():
    """Return the ECMA-262 pattern of a text field: what clean_text accepts, length aside.

    No counted quantifiers: minLength/maxLength count code points, while a quantifier would
    count UTF-16 units without the "u" flag. It means the same with and without that flag, and
    in Python's and Rust's engines, so it names no surrogates.
    """
    trimmed, forbidden = char_class(TRIMMED_RANGES), char_class(FORBIDDEN_RANGES)
    visible, inner = f"[^{trimmed}{forbidden}]", f"[^{forbidden}]"
    return f"^[{trimmed}]*{visible}(?:{inner}*{visible})?[{trimmed}]*$"


def clean_text(value):
    """Return a text field trimmed, or an error message; text_pattern() says the same."""
    if not isinstance(value, str):
        return None, "must be a string"
    if not 1 <= len(value) <= TEXT_MAX:
        return None, f"must be 1 to {TEXT_MAX} characters"
    value = value.strip(TRIMMED)
    if not value:
        return None, "must not be blank"
    if FORBIDDEN.search(value):
        return None, "must not contain control characters"
    if not value.isascii() and SURROGATE.search(value):
        return None, "must be Unicode text (no lone surrogates)"
    return value, None


def clean_year(value):
    """Return a plausible model year, or an error message."""
    last = datetime.datetime.now(datetime.UTC).year + 1
    if not isinstance(value, int) or isinstance(value, bool):
        return None, "must be an integer"
    if not FIRST_CAR_YEAR <= value <= last:
        return None, f"must be from {FIRST_CAR_YEAR} to {last}"
    return value, None


def validate(data, car_id=None, partial=False):
    """Check a car body; return the clean fields or raise 422 naming each bad field."""
    errors, clean = [], {}
    for name in sorted(set(data) - {*FIELDS, "id"}):
        errors.append({"field": name, "message": "is not a known field"})
    if "id" in data and (car_id is None or data["id"] != car_id or isinstance(data["id"], bool)):
        message = "must not be sent" if car_id is None else f"must equal the URL's id {car_id}"
        errors.append({"field": "id", "message": message})
    for name in FIELDS:
        if name not in data:
            if not partial:
                errors.append({"field": name, "message": "is required"})
            continue
        value, message = (clean_year if name == "year" else clean_text)(data[name])
        if message:
            errors.append({"field": name, "message": message})
        else:
            clean[name] = value
    if errors:
        raise problem(422, "The car is not valid.", errors)
    return clean


def list_filters():
    """Parse the query string of GET /cars into (limit, after, filters)."""
    try:
        params = request.query.decode()
    except UnicodeError:
        raise problem(400, "The query string is not valid UTF-8.") from None
    allowed = {"limit", "after", *FIELDS}
    errors = [
        {"field": k, "message": "is not a known parameter"} for k in params if k not in allowed
    ]
    errors += [
        {"field": k, "message": "is given more than once"}
        for k in allowed
        if len(params.getall(k)) > 1
    ]
    values = {k: params.get(k) for k in allowed if k in params}

    def number(name, default, low, high):
        raw = values.pop(name, None)
        if raw is None:
            return default
        if raw.isascii() and raw.isdigit() and len(raw) <= 19 and low <= int(raw) <= high:
            return int(raw)
        errors.append({"field": name, "message": f"must be an integer from {low} to {high}"})
        return default

    limit = number("limit", 100, 1, 1000)
    after = number("after", 0, 0, MAX_ID)
    if "year" in values:
        values["year"] = number("year", None, 0, 9999)
    for name in ("brand", "model"):  # normalised exactly like stored values
        if name in values:
            values[name], message = clean_text(values[name])
            if message:
                errors.append({"field": name, "message": message})
    if errors:
        raise problem(400, "The query string is not valid.", errors)
    return limit, after, values


# -- The cars resource: schema and migrations ----------------------------------------------------

MYSQL_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS cars (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  brand VARCHAR(64) NOT NULL,
  model VARCHAR(64) NOT NULL,
  year SMALLINT NOT NULL,
  version INT UNSIGNED NOT NULL DEFAULT 1,
  INDEX cars_brand (brand),
  INDEX cars_model (model),
  INDEX cars_year (year)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin
""",
    # Keys are visible ASCII without spaces, so ascii_bin's trailing-space padding never matters.
    """
CREATE TABLE IF NOT EXISTS idempotency_keys (
  idem_key VARCHAR(255) NOT NULL PRIMARY KEY,
  fingerprint CHAR(64) NOT NULL,
  car_id BIGINT UNSIGNED NOT NULL,
  created_at BIGINT NOT NULL,
  INDEX idempotency_keys_created (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin
""",
)
SQLITE_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS cars (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  brand TEXT NOT NULL,
  model TEXT NOT NULL,
  year INTEGER NOT NULL,
  version INTEGER NOT NULL DEFAULT 1
)
""",
    "CREATE INDEX IF NOT EXISTS cars_brand ON cars (brand)",
    "CREATE INDEX IF NOT EXISTS cars_model ON cars (model)",
    "CREATE INDEX IF NOT EXISTS cars_year ON cars (year)",
    """
CREATE TABLE IF NOT EXISTS idempotency_keys (
  idem_key TEXT NOT NULL PRIMARY KEY,
  fingerprint TEXT NOT NULL,
  car_id INTEGER NOT NULL,
  created_at INTEGER NOT NULL
)
""",
    "CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at)",
)
# Expand/contract: a migration that only adds (a nullable column, a table, an index) keeps
# oldest_code, so the previous release still runs and can be rolled back to; one that removes
# or renames what older code uses raises oldest_code, and ships a release after the code that
# stopped using it. Statements are idempotent (IF NOT EXISTS) where the engine allows, because
# MySQL commits each DDL statement: a migration that fails halfway is simply run again.
MIGRATIONS = (
    # Version 1 is the schema that earlier releases created at first use: on their databases
    # it creates nothing and only records the version.
    Migration(1, "cars and idempotency_keys", MYSQL_SCHEMA, SQLITE_SCHEMA, 1),
)
SCHEMA_VERSION = MIGRATIONS[-1].version  # the schema this code is written for: its code version


# -- The cars resource: queries ------------------------------------------------------------------

SELECT_CAR = "SELECT id, brand, model, year, version FROM cars WHERE id = %s"
SELECT_PAGE = "SELECT id, brand, model, year, version FROM cars WHERE id > %s"
SELECT_CAR_FOR_UPDATE = SELECT_CAR + " FOR UPDATE"  # SQLite needs none: BEGIN IMMEDIATE locks
SELECT_CAR_ID = "SELECT id FROM cars WHERE id = %s"


def row_to_car(row):
    """Turn an (id, brand, model, year, version) row into a car and its version."""
    car_id, brand, model, year, version = row
    return {"id": car_id, "brand": brand, "model": model, "year": year}, version


def find_car(car_id, lock=False):
    """Return (car, version) for an id, or raise 404."""
    sql = SELECT_CAR_FOR_UPDATE if lock and db().mysql else SELECT_CAR
    row = query(sql, (car_id,)).fetchone()
    if row is None:
        raise problem(404, f"No car with id {car_id}.")
    return row_to_car(row)


def insert_car(car):
    """Insert a clean car and return its new id."""
    sql = "INSERT INTO cars (brand, model, year) VALUES (%s, %s, %s)"
    return query(sql, (car["brand"], car["model"], car["year"])).lastrowid


def create_once(key, fingerprint, car, bare_key):
    """Insert the car and its Idempotency-Key together, or return the id the key already made."""
    now = int(time.time())
    row = query(SELECT_KEY_FOR_UPDATE if db().mysql else SELECT_KEY, (key,)).fetchone()
    if row is None:  # a retry across the upgrade: releases before scoped keys stored bare ones
        bare = query(SELECT_KEY, (bare_key,)).fetchone()
        row = bare if bare is not None and bare[2] > now - KEY_LIFETIME else None
    if row is not None and row[2] > now - KEY_LIFETIME:
        if row[0] != fingerprint:
            raise problem(422, "This Idempotency-Key was already used with a different body.")
        if query(SELECT_CAR_ID, (row[1],)).fetchone() is None:
            raise problem(410, f"The car this Idempotency-Key created, /cars/{row[1]}, is gone.")
        return row[1]
    if row is not None and query(DELETE_KEY, (key, row[2])).rowcount != 1:  # expired
        raise ConflictError("the expired key was replaced while this request read it")
    car_id = insert_car(car)
    query(INSERT_KEY, (key, fingerprint, car_id, now))
    return car_id


# -- The cars resource: routes -------------------------------------------------------------------


@app.get("/cars")
def list_cars():
    """List cars by id, a page at a time, with optional exact filters."""
    limit, after, filters = list_filters()
    where = "".join(f" AND {name} = %s" for name in filters)
    sql = f"{SELECT_PAGE}{where} ORDER BY id LIMIT %s"  # column names come from FIELDS only
    rows = query(sql, (after, *filters.values(), limit + 1)).fetchall()
    cars = [row_to_car(row)[0] for row in rows[:limit]]
    if len(rows) > limit:
        params = urllib.parse.urlencode({**filters, "after": cars[-1]["id"], "limit": limit})
        response.set_header("Link", f'</cars?{params}>; rel="next"')
    return send(cars)


@app.post("/cars")
def create_car():
    """Add a car; with an Idempotency-Key, at most once per key."""
    raw = read_body(JSON_TYPES)
    key = idempotency_key()
    car = validate(parse_json(raw))
    if key is None:
        car_id = db().atomically(lambda: insert_car(car))
    else:
        fingerprint = hashlib.sha256(raw).hexdigest()
        scoped = scoped_key(key, request.environ.get("cars.caller", ANONYMOUS), "POST /cars")
        with claim_key(scoped):
            forget_expired_keys()
            try:
                car_id = db().atomically(lambda: create_once(scoped, fingerprint, car, key))
            except ConflictError:  # another process stored the key first
                raise problem(409, "A request with this Idempotency-Key is in progress.") from None
    return send({"id": car_id, **car}, 201, 1, Location=f"/cars/{car_id}")


@app.get("/cars/<raw_id>")
def get_car(raw_id):
    """Return one car."""
    car, version = find_car(parse_id(raw_id))
    return send(car, etag_version=version)


@app.put("/cars/<raw_id>")
def replace_car(raw_id):
    """Replace every field of a car."""
    car_id = parse_id(raw_id)
    return update_car(car_id, read_body(JSON_TYPES), partial=False)


@app.patch("/cars/<raw_id>")
def patch_car(raw_id):
    """Change some fields of a car (JSON merge patch)."""
    car_id = parse_id(raw_id)
    return update_car(car_id, read_body(PATCH_TYPES), partial=True)


def update_car(car_id, raw, partial):
    """Apply a body already read to a car: If-Match first, then validation (RFC 9110)."""

    def work():
        car, version = find_car(car_id, lock=True)
        check_if_match(version)
        car.update(validate(parse_json(raw), car_id, partial))
        sql = "UPDATE cars SET brand = %s, model = %s, year = %s, version = %s WHERE id = %s"
        query(sql, (car["brand"], car["model"], car["year"], version + 1, car_id))
        return car, version + 1

    car, version = db().atomically(work)
    return send(car, etag_version=version)


@app.delete("/cars/<raw_id>")
def delete_car(raw_id):
    """Remove a car."""
    car_id = parse_id(raw_id)

    def work():
        _, version = find_car(car_id, lock=True)
        check_if_match(version)
        query("DELETE FROM cars WHERE id = %s", (car_id,))

    db().atomically(work)
    response.status = 204
    return ""


# -- The cars resource: OpenAPI document ---------------------------------------------------------


@app.get("/openapi.json")
def openapi_document():
    """Describe the API as OpenAPI 3.1."""
    return send(openapi())


def openapi():
    """Build the OpenAPI document; the year bound moves with the calendar."""
    text = {"type": "string", "minLength": 1, "maxLength": TEXT_MAX, "pattern": text_pattern()}
    last = datetime.datetime.now(datetime.UTC).year + 1
    year = {"type": "integer", "minimum": FIRST_CAR_YEAR, "maximum": last}
    schemas = ("Car", "CarInput", "CarReplace", "CarPatch", "Problem")
    ref = {name: {"$ref": f"#/components/schemas/{name}"} for name in schemas}
    fields = {"brand": text, "model": text, "year": year}
    tag = {"ETag": {"schema": {"type": "string"}, "description": "Version of the car."}}

    def json_body(schema, *types):
        return {"required": True, "content": {t: {"schema": schema} for t in types}}

    def answer(description, schema=None, headers=None, media="application/json"):
        out = {"description": description}
        if schema is not None:
            out["content"] = {media: {"schema": schema}}
        if headers:
            out["headers"] = headers
        return out

    def errors(*codes):
        return {
            str(c): answer(bottle.HTTP_CODES[c], ref["Problem"], media="application/problem+json")
            for c in codes
        }

    writes = (401, 403, 415, 413, 422, 400, 503)
    bearer = [{"bearer": []}]  # writes need the token (when API_TOKEN is set); reads do not
    car_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
    }
    if_match = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}
    idempotency_key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Makes a retried create safe: the same caller (bearer token) with the"
        " same key and body within 24 h gets the first 201 again; another body gets 422; while"
        " the first runs, 409; once the car it created is deleted, 410. Keys of different"
        " callers never meet.",
        "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY},
    }
    exact = [
        {"name": n, "in": "query", "required": False, "schema": s}
        for n, s in (
            ("brand", text),
            ("model", text),
            ("year", {"type": "integer", "minimum": 0, "maximum": 9999}),
            ("after", {"type": "integer", "minimum": 0, "maximum": MAX_ID}),
            ("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
        )
    ]
    return {
        "openapi": "3.1.0",
        "info": {"title": "cars-api", "version": "1.0.0", "description": "A catalogue of cars."},
        "paths": {
            "/health": {
                "get": {
                    "summary": "Liveness",
                    "operationId": "health",
                    "security": [],
                    "responses": {"200": answer("Alive", {"type": "object"})},
                }
            },
            "/ready": {
                "get": {
                    "summary": "Readiness",
                    "operationId": "ready",
                    "security": [],
                    "responses": {
                        "200": answer("The database answers", {"type": "object"}),
                        **errors(503),
                    },
                }
            },
            "/cars": {
                "get": {
                    "summary": "List cars",
                    "operationId": "listCars",
                    "security": [],
                    "parameters": exact,
                    "responses": {
                        "200": answer(
                            "A page of cars by id",
                            {"type": "array", "items": ref["Car"]},
                            {"Link": {"schema": {"type": "string"}, "description": "Next page"}},
                        ),
                        **errors(400, 503),
                    },
                },
                "post": {
                    "summary": "Add a car",
                    "operationId": "createCar",
                    "security": bearer,
                    "parameters": [idempotency_key],
                    "requestBody": json_body(ref["CarInput"], "application/json"),
                    "responses": {
                        "201": answer(
                            "Created, or the first answer to this Idempotency-Key again",
                            ref["Car"],
                            {**tag, "Location": {"schema": {"type": "string"}}},
                        ),
                        **errors(*writes, 409, 410),
                    },
                },
            },
            "/cars/{id}": {
                "parameters": [car_id],
                "get": {
                    "summary": "Get a car",
                    "operationId": "getCar",
                    "security": [],
                    "responses": {"200": answer("The car", ref["Car"], tag), **errors(404, 503)},
                },
                "put": {
                    "summary": "Replace a car",
                    "operationId": "replaceCar",
                    "security": bearer,
                    "parameters": [if_match],
                    "requestBody": json_body(ref["CarReplace"], "application/json"),
                    "responses": {
                        "200": answer("Replaced", ref["Car"], tag),
                        **errors(404, 412, *writes),
                    },
                },
                "patch": {
                    "summary": "Change a car",
                    "operationId": "patchCar",
                    "security": bearer,
                    "parameters": [if_match],
                    "requestBody": json_body(
                        ref["CarPatch"], "application/json", "application/merge-patch+json"
                    ),
                    "responses": {
                        "200": answer("Changed", ref["Car"], tag),
                        **errors(404, 412, *writes),
                    },
                },
                "delete": {
                    "summary": "Remove a car",
                    "operationId": "deleteCar",
                    "security": bearer,
                    "parameters": [if_match],
                    "responses": {"204": answer("Removed"), **errors(401, 403, 404, 412, 503)},
                },
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "security": [],
                    "responses": {"200": answer("OpenAPI 3.1", {"type": "object"})},
                }
            },
        },
        "components": {
            "schemas": {
                "Car": {
                    "type": "object",
                    "required": ["id", *FIELDS],
                    "additionalProperties": False,
                    "properties": {"id": {"type": "integer", "minimum": 1}, **fields},
                },
                "CarInput": {
                    "type": "object",
                    "required": list(FIELDS),
                    "additionalProperties": False,
                    "properties": fields,
                },
                "CarReplace": {
                    "type": "object",
                    "required": list(FIELDS),
                    "additionalProperties": False,
                    "properties": {"id": {"type": "integer"}, **fields},
                },
                "CarPatch": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"id": {"type": "integer"}, **fields},
                },
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "errors": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["field", "message"],
                                "properties": {
                                    "field": {"type": "string"},
                                    "message": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


# -- Service plumbing: serving -------------------------------------------------------------------


def configure(settings):
    """Attach the settings and a database to the app."""
    app.config["cars.settings"] = settings
    app.config["cars.db"] = Database(settings)
    return app


draining = threading.Event()  # set at SIGTERM: every response from then on closes its connection


class QueueTimeoutError(WaitressError):
    """A request that waited longer than QUEUE_TIMEOUT for a worker."""

    code = 503
    reason = "Service Unavailable"


class ProblemTask(ErrorTask):
    """Answer what Waitress refuses itself (bad framing, 413, 431, overload) as problem+json.

    The answer echoes X-Request-Id and the access line has every field a served request's has.
    """

    def execute(self):
        req, error = self.request, self.request.error
        detail = {
            413: f"The body is larger than {MAX_BODY} bytes.",
            503: "The service is overloaded; retry shortly.",
        }.get(error.code, str(error.body)[:200])
        body = json.dumps(problem(error.code, detail).body).encode()
        request_id = request_id_of(req.headers.get("X_REQUEST_ID", ""))
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/problem+json"))
        self.response_headers.append(("X-Request-Id", request_id))
        if error.code == 503:
            self.response_headers.append(("Retry-After", "1"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)
        if log.isEnabledFor(logging.INFO):
            queued = getattr(req, "cars_queued", None)
            waited = round((time.monotonic() - queued) * 1000, 2) if queued else 0.0
            audit = {"HTTP_" + key: value for key, value in req.headers.items()}
            audit["REMOTE_ADDR"] = self.channel.addr[0] if self.channel.addr else None
            # command and path are unset when the request line itself was refused
            fields = (getattr(req, "command", None), getattr(req, "path", None), error.code)
            access_line(*fields, waited, request_id, None, audit)


class RequestParser(HTTPRequestParser):
    """Waitress's request parser, with two refusals it lacks.

    MAX_BODY counts a chunked body's payload, not its framing (Waitress counts the bytes on the
    wire: 65,536 bytes sent chunked were 413, with Content-Length 201). Content-Length beside
    Transfer-Encoding: chunked is refused 400 and the connection closed (RFC 9112 section 6.3).
    """

    def parse_header(self, header_plus):
        super().parse_header(header_plus)
        if self.chunked and "CONTENT_LENGTH" in self.headers:
            raise ParsingError("Content-Length and Transfer-Encoding: chunked in one request")

    def received(self, data):
        consumed = super().received(data)
        if self.error is None and (
            self.content_length > MAX_BODY or (self.chunked and len(self.body_rcv) > MAX_BODY)
        ):
            self.error = RequestEntityTooLarge(f"exceeds {MAX_BODY} bytes")
            self.completed = True
        return consumed


class Task(WSGITask):
    """Waitress's WSGI task; while the server drains, each response closes its connection."""

    def build_response_header(self):
        if draining.is_set():
            self.set_close_on_finish()  # says Connection: close, so no client sends another
        return super().build_response_header()


class Channel(waitress.channel.HTTPChannel):
    """Waitress's HTTP connection, with the classes above and a bounded wait for slow readers."""

    task_class = Task
    error_task_class = ProblemTask
    parser_class = RequestParser
    partial, partial_since = None, 0.0  # the incomplete request the sweep last saw, and since when

    def _flush_outbufs_below_high_watermark(self):
        """Wait SEND_WAIT at most for the client to take queued output, else drop the client.

        Waitress (3.0.2) waits here without a limit while more than the high-water mark is
        queued, so clients that pipeline requests and never read pinned every worker. Giving up
        marks the connection gone: write_soon raises ClientDisconnected, service() queues no
        further request, and the event loop's sweep closes the socket.
        """
        if self.total_outbufs_len <= self.adj.outbuf_high_watermark:
            return
        deadline = time.monotonic() + SEND_WAIT
        with self.outbuf_lock:
            _, failed = self._flush_exception(self._flush_some, do_close=False)
            while not failed and self.connected:
                remaining = deadline - time.monotonic()
                if self.total_outbufs_len <= self.adj.outbuf_high_watermark or remaining <= 0:
                    break
                self.server.pull_trigger()
                self.outbuf_lock.wait(remaining)
            if failed or self.total_outbufs_len > self.adj.outbuf_high_watermark:
                self.connected, self.will_close = False, True
                self.server.pull_trigger()

    def writable(self):
        """Leave a response to the worker that is still writing it, instead of polling for it.

        While a worker serves a request, Waitress (send_bytes 1) calls its channel writable as
        soon as part of the response is queued, and its event loop polls again and again without
        being able to send: a spin that holds the GIL against the very workers it waits for
        (measured: 79,000 polls in 4 s, the loop holding the GIL 92 % of the time, point reads
        at a fifth of their speed). The worker sends what it writes itself and pulls the trigger
        when it finishes, which wakes the loop for the rest. Big responses are still helped along.
        """
        if self.requests and self.total_outbufs_len < STREAM_HELP:
            return self.will_close or self.close_when_flushed
        return super().writable()


class Dispatcher(ThreadedTaskDispatcher):
    """Waitress's worker pool, with liveness and overload answered without waiting for a worker.

    /health and Waitress's own errors need no database, so the event loop answers them at once:
    a liveness probe never waits behind workers stuck on the database. A request that waits
    longer than QUEUE_TIMEOUT for a worker is answered 503 by the event loop, so a slow database
    gives fast refusals instead of a queue that grows for minutes.
    """

    def __init__(self, queue_timeout):
        super().__init__()
        self.queue_timeout = queue_timeout
        self.cheap = []  # channels whose next request the event loop answers itself

    def add_task(self, channel):
        """Queue a channel's next request for a worker, or for the event loop if it is cheap."""
        req = channel.requests[0]
        if req.error is None and not (req.command in ("GET", "HEAD") and req.path == "/health"):
            req.cars_queued = time.monotonic()
            super().add_task(channel)
            return
        with self.lock:  # the caller holds the channel's lock: answer after it lets go
            self.cheap.append(channel)
        channel.server.pull_trigger()  # wake the event loop when a worker queued it

    def answer_now(self):
        """In the event loop: answer cheap requests, and 503 to those that waited too long."""
        cutoff = time.monotonic() - self.queue_timeout
        with self.lock:
            cheap, self.cheap = self.cheap, []
            while self.queue and self.queue[0].requests[0].cars_queued < cutoff:
                expired = self.queue.popleft()
                expired.requests[0].error = QueueTimeoutError("queue timeout")
                cheap.append(expired)
        for channel in cheap:
            try:
                channel.service()
            except Exception:  # a bug here must not stop the event loop that serves everyone
                log.exception("unhandled error in the event loop")
                channel.handle_close()


def busy(channels):
    """Tell whether any connection is receiving a request, has one to answer, or bytes to send."""
    return any(c.request or c.requests or c.total_outbufs_len for c in channels)


def overdue(channel, now, cutoff):
    """Tell whether a connection broke a bound and must close (cutoff: the drain's upload end).

    A request being answered is left alone: its worker is bounded by DB_TIMEOUT and SEND_WAIT.
    """
    if channel.will_close:
        return True  # a worker gave up on it, or Waitress marked it (a socket that cannot send)
    if channel.requests:
        return False
    if channel.request is not None:  # a request still arriving
        if channel.request is not channel.partial:
            channel.partial, channel.partial_since = channel.request, now
        return now - channel.partial_since > REQUEST_TIMEOUT or now > cutoff
    if channel.total_outbufs_len:  # a finished answer the client does not take
        return now - channel.last_activity > SEND_TIMEOUT
    return now - channel.last_activity > IDLE_TIMEOUT


def sweep(sockets, cutoff=math.inf):
    """Close the connections past a bound, then the longest-quiet ones while near the limit."""
    now = time.time()  # Waitress's last_activity is wall-clock time
    channels = [d for d in sockets.values() if isinstance(d, Channel)]
    closing = [c for c in channels if overdue(c, now, cutoff)]
    excess = len(sockets) - len(closing) - (CONNECTION_LIMIT - EVICT_HEADROOM)
    if excess > 0:  # near the limit: make room for EVICT_HEADROOM more at once
        quiet = [c for c in set(channels).difference(closing) if not c.requests]
        quiet.sort(key=lambda c: c.partial_since if c.request is not None else c.last_activity)
        closing += quiet[: excess + EVICT_HEADROOM]
    for channel in closing:
        channel.handle_close()


def accept_backlog(listener):
    """Take every connection the kernel has already accepted, so that none is reset at close."""
    for _ in range(listener.adj.connection_limit):
        try:
            accepted = listener.accept()
        except OSError:
            return
        if accepted is None:
            return
        conn, addr = accepted
        listener.set_socket_options(conn)
        listener.channel_class(listener, conn, addr, listener.adj, map=listener._map)


def serve(settings):
    """Serve until SIGTERM or SIGINT, then finish every accepted request and return.

    Waitress has no drain of its own (on an interrupt its run() leaves the event loop that sends
    responses, then cancels queued requests), so this runs that loop itself. It relies on 3.0's
    socket map, dispatcher and channel attributes (waitress is pinned; the serving tests cover
    them). A second signal ends the drain at once.
    """
    dispatcher = Dispatcher(settings.queue_timeout)
    dispatcher.set_thread_count(settings.threads)
    server = waitress.create_server(
        app,
        _dispatcher=dispatcher,
        host=settings.host,
        port=settings.port,
        threads=settings.threads,
        ident="cars-api",
        channel_timeout=IDLE_TIMEOUT,  # the sweep closes idle connections on time; this too
        connection_limit=CONNECTION_LIMIT,
        outbuf_high_watermark=OUTBUF_HIGH_WATERMARK,
        max_request_header_size=16 * 1024,
        # RequestParser refuses a payload over MAX_BODY; this bounds a chunked body's framing
        max_request_body_size=MAX_BODY + CHUNKED_FRAMING + 1,
        clear_untrusted_proxy_headers=False,  # kept for the access line's audit; never trusted
    )
    sockets = getattr(server, "map", None) or server._map  # several listeners, or one
    listeners = [d for d in sockets.values() if isinstance(d, waitress.server.BaseWSGIServer)]
    for listener in listeners:
        listener.channel_class = Channel
    signals = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: signals.append(number))
    log.info("listening", extra={"fields": {"url": f"http://{settings.host}:{settings.port}"}})
    crowded, next_sweep = CONNECTION_LIMIT - EVICT_HEADROOM, 0.0
    while not signals:
        wasyncore.loop(timeout=0.05, map=sockets, use_poll=True, count=1)
        dispatcher.answer_now()
        now = time.monotonic()
        if now >= next_sweep or len(sockets) > crowded:
            sweep(sockets)
            next_sweep = now + SWEEP_INTERVAL
    log.info("stopping: finishing accepted requests")
    draining.set()
    for listener in listeners:
        accept_backlog(listener)
        wasyncore.dispatcher.close(listener)
    now = time.monotonic()
    settle, deadline = now + SETTLE, now + SHUTDOWN_GRACE
    uploads_end = time.time() + DRAIN_UPLOAD  # then a request still arriving is dropped
    channels = [d for d in sockets.values() if isinstance(d, Channel)]
    while len(signals) < 2 and now < deadline and (now < settle or busy(channels)):
        wasyncore.loop(timeout=0.05, map=sockets, use_poll=True, count=1)
        dispatcher.answer_now()
        sweep(sockets, uploads_end)
        channels = [d for d in sockets.values() if isinstance(d, Channel)]
        now = time.monotonic()
    if len(signals) > 1:
        log.warning("second signal: stopping now, without waiting for requests in flight")
    elif busy(channels):
        log.warning("shutdown grace ran out with requests in flight")
    dispatcher.shutdown(timeout=0 if len(signals) > 1 else THREAD_JOIN)
    wasyncore.close_all(sockets)
    for signum in (signal.SIGTERM, signal.SIGINT):  # one more while exiting changes nothing
        signal.signal(signum, signal.SIG_IGN)
    log.info("stopped")


def migrate_command(database):
    """Apply the pending migrations; return the exit code, after one line saying what happened."""
    try:
        applied = database.create_schema(MIGRATION_READ_TIMEOUT, MIGRATION_LOCK_WAIT)
        with closing(database.open(read_timeout=MIGRATION_READ_TIMEOUT)) as conn:
            version, oldest_code = database.schema_version(conn)
    except MigrationError as exc:
        fields = {"version": exc.migration.version, "what": exc.migration.description}
        log.error("migration failed", extra={"fields": {**fields, "error": str(exc)}})
        return 1
    except (UnavailableError, *database.errors) as exc:
        log.error("migration failed", extra={"fields": {"error": str(exc)}})
        return 1
    fields = {"schema_version": version, "schema_needs_code": oldest_code, "applied": len(applied)}
    if not supported(version, oldest_code):  # newer than this code: the server would refuse it
        fields["code_version"] = SCHEMA_VERSION
        log.error("schema not supported by this release", extra={"fields": fields})
        return 1
    log.info("schema current", extra={"fields": fields})
    return 0


def bootstrap_command(database):
    """Create the identities and grant them; return the exit code."""
    if not database.mysql:
        log.error("bootstrap needs MySQL: set MYSQL_HOST and the master credentials")
        return 2
    try:
        granted = bootstrap(database, os.environ)
    except ValueError as exc:
        log.error(str(exc))
        return 2
    except database.errors as exc:
        log.error("bootstrap failed", extra={"fields": {"error": str(exc)}})
        return 1
    log.info("bootstrap done", extra={"fields": {"store": database.describe(), "granted": granted}})
    return 0


COMMANDS = {"migrate": migrate_command, "bootstrap": bootstrap_command}


def main():
    """Read the environment and serve, or run the one command named on the command line."""
    handler = configure_logging("INFO")  # first, so that a bad setting is a JSON line too
    args = sys.argv[1:]
    if len(args) > 1 or (args and args[0] not in COMMANDS):
        log.error("usage: python cars.py [migrate | bootstrap]", extra={"fields": {"args": args}})
        handler.close()
        sys.exit(2)
    settings = load_settings(os.environ, serving=not args)
    logging.getLogger().setLevel(settings.log_level)
    database = configure(settings).config["cars.db"]
    if args:
        code = COMMANDS[args[0]](database)
        handler.close()
        sys.exit(code)
    log.info(
        "starting",
        extra={
            "fields": {
                "store": database.describe(),
                "threads": settings.threads,
                "auto_migrate": settings.auto_migrate,
                "code_version": SCHEMA_VERSION,
            }
        },
    )
    if settings.api_token is None:
        log.warning("API_TOKEN is not set: anyone who can reach the API can change the catalogue")
    if settings.mysql_host and not (loopback(settings.mysql_host) or settings.mysql_ssl_ca):
        log.warning("ALLOW_UNVERIFIED_MYSQL: the database's certificate is not verified")
    serve(settings)  # the schema is migrated or checked by the first request that needs the DB
    handler.close()  # write the last lines now, not only from logging's exit hook


if __name__ == "__main__":
    main()
