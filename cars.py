"""cars-api: a small REST service for a catalogue of cars.

One file on purpose: a Bottle app served by Waitress, storing cars in MySQL through PyMySQL,
or in an embedded SQLite file when MYSQL_HOST is unset. Run it with `make run` or
`python cars.py`; every setting comes from the environment (see load_settings).
"""

import datetime
import functools
import hmac
import ipaddress
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
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask
from waitress.utilities import Error as WaitressError

# -- Configuration -------------------------------------------------------------------------------

MAX_BODY = 64 * 1024
MAX_ID = 2**63 - 1
FIRST_CAR_YEAR = 1886
FIELDS = ("brand", "model", "year")
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
    queue_timeout: float
    anonymous_writes: bool


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
    settings = Settings(
        host=environ.get("HOST", "").strip() or "127.0.0.1",
        port=env_number(environ, "PORT", 8080, int, 1, 65535),
        threads=env_number(environ, "THREADS", 8, int, 1, 256),
        mysql_host=environ.get("MYSQL_HOST", "").strip() or None,
        mysql_port=env_number(environ, "MYSQL_PORT", 3306, int, 1, 65535),
        mysql_user=environ.get("MYSQL_USER", "").strip() or "root",
        mysql_password=environ.get("MYSQL_PASSWORD", ""),
        mysql_database=environ.get("MYSQL_DATABASE", "").strip() or "cars",
        sqlite_path=environ.get("SQLITE_PATH", "").strip() or "cars.db",
        api_token=api_token(environ),
        log_level=level,
        db_timeout=env_number(environ, "DB_TIMEOUT", 5, float, 0.5, MAX_DB_TIMEOUT),
        queue_timeout=env_number(environ, "QUEUE_TIMEOUT", 0.5, float, 0.05, MAX_QUEUE_TIMEOUT),
        anonymous_writes=environ.get("ALLOW_ANONYMOUS_WRITES", "").strip().lower() == "true",
    )
    if settings.api_token is None and not (loopback(settings.host) or settings.anonymous_writes):
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


def api_token(environ):
    """Read API_TOKEN, stripped once; stop if it is too short to be a secret."""
    token = environ.get("API_TOKEN", "").strip()
    if not token:
        return None
    if len(token) < MIN_TOKEN or not token.isascii() or not token.isprintable() or " " in token:
        sys.exit(
            f"cars-api: API_TOKEN must be at least {MIN_TOKEN} printable ASCII characters "
            "without spaces (for example: openssl rand -hex 32)"
        )
    return token


class JsonFormatter(logging.Formatter):
    """Render each log record as one JSON object per line."""

    def format(self, record):
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level):
    """Send JSON log lines to stdout; keep Waitress's per-request queue warnings out."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # No format here shows the caller, thread or process: skip collecting them on every record
    # (the "Optimization" advice of the logging docs; it cuts the access line's cost by a third).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


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


def header(name):
    """Return a request header as the WSGI server passed it (one byte per character), or "".

    The one place that reads headers: Bottle's get_header() decodes values as UTF-8 and raises on
    other bytes, so a header a client controls could turn into a 500. Compared with ASCII tokens
    and tags, the raw text matches exactly what it should and nothing else.
    """
    return request.environ.get("HTTP_" + name.upper().replace("-", "_"), "")


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
    """Note when the request began and its id; refuse a path that is not UTF-8; answer OPTIONS."""
    request.environ["cars.start"] = time.perf_counter()
    given = header("X-Request-Id")
    valid = 0 < len(given) <= 128 and given.isascii() and given.isprintable()
    request.environ["cars.request_id"] = given if valid else uuid.uuid4().hex
    try:
        request.environ["bottle.raw_path"].encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise problem(400, "The path is not valid UTF-8.") from None
    if request.method == "OPTIONS":
        allowed = allowed_methods(request.path)
        if not allowed:
            raise problem(404, "No such resource.")
        raise bottle.HTTPResponse(status=204, Allow=", ".join(allowed))


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
    """Echo the request id and write the access log line."""
    request_id = request.environ.get("cars.request_id", "")
    response.set_header("X-Request-Id", request_id)
    started = request.environ.get("cars.start", time.perf_counter())
    fields = {
        "method": request.method,
        "path": request.path,
        "status": response.status_code,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        "request_id": request_id,
    }
    log.info("request", extra={"fields": fields})


def authorize():
    """Demand the bearer token on writes when API_TOKEN is set."""
    token = app.config["cars.settings"].api_token
    if token is None:
        return
    scheme, _, given = header("Authorization").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("latin-1"), token.encode()
    ):
        raise problem(
            401, "A valid bearer token is required.", WWW_Authenticate='Bearer realm="cars-api"'
        )


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


draining = threading.Event()  # set at SIGTERM: every response from then on closes its connection


class QueueTimeoutError(WaitressError):
    """A request that waited longer than QUEUE_TIMEOUT for a worker."""

    code = 503
    reason = "Service Unavailable"


class ProblemTask(ErrorTask):
    """Answer what Waitress refuses itself (bad framing, 413, 431, overload) as problem+json."""

    def execute(self):
        error = self.request.error
        detail = {
            413: f"The body is larger than {MAX_BODY} bytes.",
            503: "The service is overloaded; retry shortly.",
        }.get(error.code, str(error.body)[:200])
        body = json.dumps(problem(error.code, detail).body).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/problem+json"))
        if error.code == 503:
            self.response_headers.append(("Retry-After", "1"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)
        method = getattr(self.request, "command", None)  # unset when the request line was bad
        fields = {"method": method, "status": error.code, "error": error.reason}
        log.info("request refused", extra={"fields": fields})


class Task(WSGITask):
    """Waitress's WSGI task; while the server drains, each response closes its connection."""

    def build_response_header(self):
        if draining.is_set():
            self.set_close_on_finish()  # says Connection: close, so no client sends another
        return super().build_response_header()


class Channel(waitress.channel.HTTPChannel):
    """Waitress's HTTP connection, with the two task classes above."""

    task_class = Task
    error_task_class = ProblemTask


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
        channel_timeout=30,
        connection_limit=200,
        max_request_header_size=16 * 1024,
        max_request_body_size=MAX_BODY + 1,  # Waitress refuses a body of this size or more
    )
    sockets = getattr(server, "map", None) or server._map  # several listeners, or one
    listeners = [d for d in sockets.values() if isinstance(d, waitress.server.BaseWSGIServer)]
    for listener in listeners:
        listener.channel_class = Channel
    signals = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: signals.append(number))
    log.info("listening", extra={"fields": {"url": f"http://{settings.host}:{settings.port}"}})
    while not signals:
        wasyncore.loop(timeout=0.05, map=sockets, use_poll=True, count=1)
        dispatcher.answer_now()
    log.info("stopping: finishing accepted requests")
    draining.set()
    for listener in listeners:
        accept_backlog(listener)
        wasyncore.dispatcher.close(listener)
    now = time.monotonic()
    settle, deadline = now + SETTLE, now + SHUTDOWN_GRACE
    channels = [d for d in sockets.values() if isinstance(d, Channel)]
    while len(signals) < 2 and now < deadline and (now < settle or busy(channels)):
        wasyncore.loop(timeout=0.05, map=sockets, use_poll=True, count=1)
        dispatcher.answer_now()
        channels = [d for d in sockets.values() if isinstance(d, Channel)]
        now = time.monotonic()
    if len(signals) > 1:
        log.warning("second signal: stopping now, without waiting for requests in flight")
    elif busy(channels):
        log.warning("shutdown grace ran out with requests in flight")
    dispatcher.shutdown(timeout=0 if len(signals) > 1 else THREAD_JOIN)
    wasyncore.close_all(sockets)
    log.info("stopped")


def main():
    """Read the environment, prepare the database and serve."""
    settings = load_settings(os.environ)
    configure_logging(settings.log_level)
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


if __name__ == "__main__":
    main()
