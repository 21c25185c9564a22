"""cars-api: a small REST service for a catalogue of cars.

One file on purpose: a Bottle app served by Waitress, storing cars in MySQL through PyMySQL,
or in an embedded SQLite file when MYSQL_HOST is unset. Run it with `make run` or
`python cars.py`; every setting comes from the environment (see load_settings).
"""

import collections
import datetime
import functools
import hmac
import io
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
import urllib.parse
import uuid
from contextlib import contextmanager, suppress
from typing import NamedTuple

import bottle
import pymysql
import waitress
from bottle import request, response
from waitress import wasyncore

# -- Configuration -------------------------------------------------------------------------------

MAX_BODY = 64 * 1024
MAX_ID = 2**63 - 1
FIRST_CAR_YEAR = 1886
FIELDS = ("brand", "model", "year")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON_TYPES = frozenset({"application/json"})
PATCH_TYPES = frozenset({"application/json", "application/merge-patch+json"})
SHUTDOWN_GRACE = 10.0  # seconds to finish in-flight requests; ECS waits 30 s by default

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
    sqlite_path: str
    api_token: str | None
    log_level: str
    db_timeout: float


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


def load_settings(environ):
    """Build the settings from environment variables."""
    level = environ.get("LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        sys.exit(
            f"cars-api: LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {level!r}"
        )
    return Settings(
        host=environ.get("HOST", "").strip() or "127.0.0.1",
        port=env_number(environ, "PORT", 8080, int, 1, 65535),
        threads=env_number(environ, "THREADS", 8, int, 1, 256),
        mysql_host=environ.get("MYSQL_HOST", "").strip() or None,
        mysql_port=env_number(environ, "MYSQL_PORT", 3306, int, 1, 65535),
        mysql_user=environ.get("MYSQL_USER", "").strip() or "root",
        mysql_password=environ.get("MYSQL_PASSWORD", ""),
        mysql_database=environ.get("MYSQL_DATABASE", "").strip() or "cars",
        sqlite_path=environ.get("SQLITE_PATH", "").strip() or "cars.db",
        api_token=environ.get("API_TOKEN") or None,
        log_level=level,
        db_timeout=env_number(environ, "DB_TIMEOUT", 5, float, 0.1, 300),
    )


# -- Logging -------------------------------------------------------------------------------------

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


# -- Storage -------------------------------------------------------------------------------------

MYSQL_SCHEMA = """
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
"""

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS cars (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  brand TEXT NOT NULL,
  model TEXT NOT NULL,
  year INTEGER NOT NULL,
  version INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS cars_brand ON cars (brand);
CREATE INDEX IF NOT EXISTS cars_model ON cars (model);
CREATE INDEX IF NOT EXISTS cars_year ON cars (year);
"""


SELECT_CAR = "SELECT id, brand, model, year, version FROM cars WHERE id = %s"
SELECT_PAGE = "SELECT id, brand, model, year, version FROM cars WHERE id > %s"
SELECT_CAR_FOR_UPDATE = SELECT_CAR + " FOR UPDATE"  # SQLite needs none: BEGIN IMMEDIATE locks


class UnavailableError(Exception):
    """The database cannot be reached or did not answer in time."""


class Database:
    """Hand each worker thread one reusable connection to MySQL or SQLite."""

    IDLE_CHECK = 30.0  # seconds idle after which a MySQL connection is pinged before use

    def __init__(self, settings):
        self.settings = settings
        self.mysql = settings.mysql_host is not None
        self.errors = (
            (pymysql.err.OperationalError, pymysql.err.InterfaceError)
            if self.mysql
            else (sqlite3.OperationalError,)
        )
        self.local = threading.local()
        self.schema_ready = False
        self.schema_lock = threading.Lock()

    def describe(self):
        """Name the store for the start-up log, without credentials."""
        s = self.settings
        if self.mysql:
            return f"mysql://{s.mysql_user}@{s.mysql_host}:{s.mysql_port}/{s.mysql_database}"
        return f"sqlite:///{os.path.abspath(s.sqlite_path)}"

    def open(self, database=True):
        """Open a new connection with the timeouts that keep requests bounded."""
        s = self.settings
        if not self.mysql:
            conn = sqlite3.connect(s.sqlite_path, timeout=s.db_timeout, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn
        wait = max(1, round(s.db_timeout))
        return pymysql.connect(
            host=s.mysql_host,
            port=s.mysql_port,
            user=s.mysql_user,
            password=s.mysql_password,
            database=s.mysql_database if database else None,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=s.db_timeout,
            read_timeout=s.db_timeout + 2,
            write_timeout=s.db_timeout + 2,
            init_command=f"SET SESSION lock_wait_timeout={wait}, innodb_lock_wait_timeout={wait}",
        )

    def create_schema(self):
        """Create the database (MySQL) and the table if they do not exist yet."""
        with self.schema_lock:
            if self.schema_ready:
                return
            if self.mysql:
                with self.open(database=False) as conn, conn.cursor() as cur:
                    name = self.settings.mysql_database.replace("`", "``")
                    cur.execute(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")
                    cur.execute(f"USE `{name}`")
                    cur.execute(MYSQL_SCHEMA)
            else:
                with self.open() as conn:
                    conn.executescript(SQLITE_SCHEMA)
                conn.close()
            self.schema_ready = True

    def connection(self):
        """Return this thread's connection, opening or reviving it as needed."""
        conn, last_used = getattr(self.local, "conn", None), getattr(self.local, "used", 0.0)
        now = time.monotonic()
        try:
            if conn is None:
                self.create_schema()
                conn = self.local.conn = self.open()
            elif self.mysql and now - last_used > self.IDLE_CHECK:
                conn.ping(reconnect=True)
        except self.errors as exc:
            self.discard()
            raise UnavailableError(str(exc)) from exc
        self.local.used = now
        return conn

    def discard(self):
        """Drop this thread's connection so that the next request opens a fresh one."""
        conn = getattr(self.local, "conn", None)
        self.local.conn = None
        if conn is not None:
            with suppress(Exception):  # the connection is already broken; closing is best effort
                conn.close()

    def execute(self, sql, args=()):
        """Run one parameterised statement on this thread's connection; return the cursor."""
        conn = self.connection()
        cur = conn.cursor()
        try:
            cur.execute(sql if self.mysql else sql.replace("%s", "?"), args)
        except self.errors as exc:
            self.discard()
            raise UnavailableError(str(exc)) from exc
        return cur

    @contextmanager
    def transaction(self):
        """Run the enclosed statements atomically: all of them or none."""
        self.execute("BEGIN" if self.mysql else "BEGIN IMMEDIATE")
        conn = self.local.conn
        try:
            yield
            conn.commit()
        except self.errors as exc:
            self.discard()
            raise UnavailableError(str(exc)) from exc
        except BaseException:
            try:
                conn.rollback()
            except Exception:  # a failed rollback leaves a connection we must drop
                self.discard()
            raise


def db():
    """Return the database of the running app."""
    return app.config["cars.db"]


def query(sql, args=()):
    """Run one parameterised SQL statement and return the cursor."""
    return db().execute(sql, args)


def transaction():
    """Group the statements of one write so that it is never half-applied."""
    return db().transaction()


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


# -- Validation and responses --------------------------------------------------------------------


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
    if not isinstance(body, dict):
        status = error.status_code
        details = {404: "No such resource.", 405: f"Allowed methods: {error.get_header('Allow')}."}
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
    header = request.get_header("If-Match")
    if header is None:
        return
    tags = {tag.strip() for tag in header.split(",")}
    if "*" not in tags and etag(version) not in tags:
        raise problem(412, f"If-Match does not match the current ETag {etag(version)}.")


def parse_id(raw):
    """Return the integer id in a URL, or raise 404 for anything else."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or not 0 < int(raw) <= MAX_ID:
        raise problem(404, f"No car with id {raw!r}.")
    return int(raw)


def read_json(types):
    """Return the request body as a JSON object, or raise 400, 413, 415 or 422."""
    media = request.content_type.split(";")[0].strip().lower()
    if media not in types:
        raise problem(415, f"Content-Type must be {' or '.join(sorted(types))}.")
    if request.content_length > MAX_BODY:
        raise problem(413, f"The body is larger than {MAX_BODY} bytes.")
    raw = request.body.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise problem(413, f"The body is larger than {MAX_BODY} bytes.")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        raise problem(400, f"The body is not valid UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise problem(422, "The body must be a JSON object.")
    return data


def reject_constant(name):
    """Refuse NaN and Infinity, which are not JSON."""
    raise ValueError(f"{name} is not a JSON value")


def clean_text(value):
    """Return a trimmed 1-64 character string, or an error message."""
    if not isinstance(value, str):
        return None, "must be a string"
    value = value.strip()
    if not 1 <= len(value) <= 64:
        return None, "must be 1 to 64 characters after trimming spaces"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return None, "must not contain control characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None, "must be valid Unicode text"
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
    for name in ("brand", "model"):
        if name in values and not 1 <= len(values[name]) <= 64:
            errors.append({"field": name, "message": "must be 1 to 64 characters"})
    if errors:
        raise problem(400, "The query string is not valid.", errors)
    return limit, after, values


# -- Request hooks -------------------------------------------------------------------------------

app = bottle.Bottle()
app.uninstall("json")  # we serialise ourselves, so problem bodies keep their shape
app.default_error_handler = render_problem


@app.hook("before_request")
def start_request():
    """Note when the request began and which request id it carries."""
    request.environ["cars.start"] = time.perf_counter()
    given = request.get_header("X-Request-Id", "")
    valid = 0 < len(given) <= 128 and given.isascii() and given.isprintable()
    request.environ["cars.request_id"] = given if valid else uuid.uuid4().hex


@app.hook("after_request")
def finish_request():
    """Echo the request id and write the access line."""
    environ = request.environ
    request_id = environ.get("cars.request_id", "")
    response.set_header("X-Request-Id", request_id)
    if log.isEnabledFor(logging.INFO):
        access_line(environ, request_id)


def access_line(environ, request_id):
    """Queue the access line, with its audit fields: one f-string, no logging record, no write."""
    started = environ.get("cars.start", time.perf_counter())
    method = environ["REQUEST_METHOD"]
    line = (
        f'{{"time": "{log_time(time.time())}", "level": "INFO", "logger": "cars", '
        f'"message": "request", "method": {quote(method)}, "path": {quote(request.path)}, '
        f'"status": {response.status_code}, '
        f'"duration_ms": {round((time.perf_counter() - started) * 1000, 2)}, '
        f'"request_id": {quote(request_id)}'
    )
    for name, key, limit in AUDIT_FIELDS:  # environ never raises on bytes that are not UTF-8
        value = environ.get(key)
        line += f', "{name}": {quote(value[:limit]) if value else "null"}'
    if method in WRITE_METHODS:
        line += f', "auth": "{environ.get("cars.auth", "none")}"'
    if JsonLineHandler.active is None:  # logging not configured: the WSGI app driven in-process
        log.info("request", extra={"fields": json.loads(line + "}")})
    else:
        JsonLineHandler.active.put(line + "}")


def authorize():
    """Demand the bearer token on writes when API_TOKEN is set; note the result for the audit."""
    token = app.config["cars.settings"].api_token
    if token is None:
        return
    request.environ["cars.auth"] = "failed"
    scheme, _, given = request.get_header("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise problem(
            401, "A valid bearer token is required.", WWW_Authenticate='Bearer realm="cars-api"'
        )
    request.environ["cars.auth"] = "ok"


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
        except UnavailableError as exc:
            log.warning("database unavailable", extra={"fields": {"error": str(exc)}})
            raise problem(
                503, "The database is unavailable; retry shortly.", Retry_After="5"
            ) from None
        except Exception:
            log.exception("unhandled error", extra={"fields": {"path": request.path}})
            raise problem(500, "An unexpected error occurred.") from None

    return wrapper


app.install(guard)


# -- Routes --------------------------------------------------------------------------------------


@app.get("/health")
def health():
    """Answer liveness checks without touching the database."""
    return send({"status": "ok"})


@app.get("/ready")
def ready():
    """Answer 200 only when the database does."""
    query("SELECT 1").fetchall()
    return send({"status": "ready"})


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
    """Add a car."""
    car = validate(read_json(JSON_TYPES))
    with transaction():
        sql = "INSERT INTO cars (brand, model, year) VALUES (%s, %s, %s)"
        car_id = query(sql, (car["brand"], car["model"], car["year"])).lastrowid
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
    return update_car(car_id, validate(read_json(JSON_TYPES), car_id))


@app.patch("/cars/<raw_id>")
def patch_car(raw_id):
    """Change some fields of a car (JSON merge patch)."""
    car_id = parse_id(raw_id)
    return update_car(car_id, validate(read_json(PATCH_TYPES), car_id, partial=True))


def update_car(car_id, changes):
    """Apply changes to a car under If-Match and return it with its new ETag."""
    with transaction():
        car, version = find_car(car_id, lock=True)
        check_if_match(version)
        car.update(changes)
        sql = "UPDATE cars SET brand = %s, model = %s, year = %s, version = %s WHERE id = %s"
        query(sql, (car["brand"], car["model"], car["year"], version + 1, car_id))
    return send(car, etag_version=version + 1)


@app.delete("/cars/<raw_id>")
def delete_car(raw_id):
    """Remove a car."""
    car_id = parse_id(raw_id)
    with transaction():
        _, version = find_car(car_id, lock=True)
        check_if_match(version)
        query("DELETE FROM cars WHERE id = %s", (car_id,))
    response.status = 204
    return ""


@app.get("/openapi.json")
def openapi_document():
    """Describe the API as OpenAPI 3.1."""
    return send(openapi())


def openapi():
    """Build the OpenAPI document; the year bound moves with the calendar."""
    text = {
        "type": "string",
        "minLength": 1,
        "pattern": r"^\s*[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]{0,62}[^\s\x00-\x1f\x7f])?\s*$",
    }
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

    writes = (401, 415, 413, 422, 400, 503)
    car_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
    }
    if_match = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}
    exact = [
        {"name": n, "in": "query", "required": False, "schema": s}
        for n, s in (
            ("brand", {"type": "string", "minLength": 1, "maxLength": 64}),
            ("model", {"type": "string", "minLength": 1, "maxLength": 64}),
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
                    "responses": {"200": answer("Alive", {"type": "object"})},
                }
            },
            "/ready": {
                "get": {
                    "summary": "Readiness",
                    "operationId": "ready",
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
                    "requestBody": json_body(ref["CarInput"], "application/json"),
                    "responses": {
                        "201": answer(
                            "Created",
                            ref["Car"],
                            {**tag, "Location": {"schema": {"type": "string"}}},
                        ),
                        **errors(*writes),
                    },
                },
            },
            "/cars/{id}": {
                "parameters": [car_id],
                "get": {
                    "summary": "Get a car",
                    "operationId": "getCar",
                    "responses": {"200": answer("The car", ref["Car"], tag), **errors(404, 503)},
                },
                "put": {
                    "summary": "Replace a car",
                    "operationId": "replaceCar",
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
                    "parameters": [if_match],
                    "responses": {"204": answer("Removed"), **errors(401, 404, 412, 503)},
                },
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
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


# -- Serving -------------------------------------------------------------------------------------


def configure(settings):
    """Attach the settings and a database to the app."""
    app.config["cars.settings"] = settings
    app.config["cars.db"] = Database(settings)
    return app


def busy(dispatchers):
    """Tell whether any connection still has a request to answer or bytes to send."""
    return any(
        getattr(d, "requests", None) or getattr(d, "total_outbufs_len", 0) for d in dispatchers
    )


def serve(settings):
    """Serve until SIGTERM or SIGINT, then finish in-flight requests and return.

    Waitress has no drain of its own (on an interrupt its run() leaves the event loop that sends
    responses, then cancels queued requests), so this runs that loop itself. It relies on 3.0's
    socket map and channel attributes (waitress is pinned; the shutdown tests cover them).
    """
    server = waitress.create_server(
        app,
        host=settings.host,
        port=settings.port,
        threads=settings.threads,
        ident="cars-api",
        channel_timeout=30,
        connection_limit=200,
        max_request_header_size=16 * 1024,
        max_request_body_size=1024 * 1024,
        clear_untrusted_proxy_headers=False,  # kept for the access line's audit; never trusted
    )
    sockets = getattr(server, "map", None) or server._map  # several listeners, or one
    listeners = [d for d in sockets.values() if isinstance(d, waitress.server.BaseWSGIServer)]
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stopping.set())
    log.info("listening", extra={"fields": {"url": f"http://{settings.host}:{settings.port}"}})
    while not stopping.is_set():
        wasyncore.loop(timeout=0.2, map=sockets, use_poll=True, count=1)
    log.info("stopping: finishing in-flight requests")
    for listener in listeners:
        wasyncore.dispatcher.close(listener)
    now = time.monotonic()
    settle, deadline = now + 0.2, now + SHUTDOWN_GRACE  # settle: read requests already sent
    while now < deadline and (now < settle or busy(list(sockets.values()))):
        wasyncore.loop(timeout=0.05, map=sockets, use_poll=True, count=1)
        now = time.monotonic()
    for listener in listeners:
        listener.task_dispatcher.shutdown(timeout=1)
    wasyncore.close_all(sockets)
    log.info("stopped")


def main():
    """Read the environment, prepare the database and serve."""
    handler = configure_logging("INFO")  # first, so that a bad setting is a JSON line too
    settings = load_settings(os.environ)
    logging.getLogger().setLevel(settings.log_level)
    database = configure(settings).config["cars.db"]
    log.info(
        "starting", extra={"fields": {"store": database.describe(), "threads": settings.threads}}
    )
    if settings.api_token is None:
        log.warning("API_TOKEN is not set: anyone who can reach the API can change the catalogue")
    try:
        database.create_schema()
    except database.errors as exc:
        log.warning(
            "database not reachable yet; will retry on demand",
            extra={"fields": {"error": str(exc)}},
        )
    serve(settings)
    handler.close()  # write the last lines now, not only from logging's exit hook


if __name__ == "__main__":
    main()
