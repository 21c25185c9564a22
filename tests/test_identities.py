"""Three database identities on the real MySQL: `python cars.py bootstrap` and what each may do.

The test server's root stands for the master (people only). Bootstrap creates the migration
and the application identities, with uniquely named users and databases dropped at the end.
"""

import os
import secrets
import subprocess
import sys
import uuid

import pymysql
import pytest
from conftest import MYSQL, ROOT, mysql_env
from test_migrations import call, command_env, log_lines

DENIED = {1044, 1045, 1142, 1227}  # access denied: to a database, login, a command, a privilege


class Identities:
    """The names and passwords of one bootstrap, and connections as each identity."""

    def __init__(self):
        tag = uuid.uuid4().hex[:8]
        self.database, self.other = f"dataapp_{tag}", f"dataapp_{tag}_other"
        # The name is made here from hex digits: nothing outside the test reaches this SQL.
        self.read_other = f"SELECT value FROM `{self.other}`.secrets"  # noqa: S608
        self.users = {"MIGRATION": f"dataapp_{tag}_mig", "APP": f"dataapp_{tag}_app"}
        self.passwords = {kind: secrets.token_hex(16) for kind in self.users}

    def env(self, **changes):
        """The bootstrap environment: master credentials, then the two identities."""
        env = mysql_env(self.database)
        for kind, user in self.users.items():
            env[f"{kind}_USER"], env[f"{kind}_PASSWORD"] = user, self.passwords[kind]
        return {**env, **changes}

    def connect(self, kind, password=None, database=None):
        """Connect as one identity."""
        return pymysql.connect(
            host=MYSQL["host"],
            port=MYSQL["port"],
            user=self.users[kind],
            password=password or self.passwords[kind],
            database=database or self.database,
            autocommit=True,
            connect_timeout=5,
        )


def root():
    return pymysql.connect(**MYSQL, autocommit=True, connect_timeout=5)


def run_cars(command, env):
    """Run `python cars.py <command>` to the end; return (exit code, log lines)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "cars.py"), command],
        env=command_env(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, log_lines(done.stdout + done.stderr)


def bootstrap(env):
    """Run `python cars.py bootstrap`; return (exit code, log lines)."""
    return run_cars("bootstrap", env)


def migrate_as(identities, kind):
    """Run `python cars.py migrate` as one identity; return its exit code and log lines."""
    env = {
        **mysql_env(identities.database),
        "MYSQL_USER": identities.users[kind],
        "MYSQL_PASSWORD": identities.passwords[kind],
    }
    return run_cars("migrate", env)


@pytest.fixture
def identities(mysql_database):
    """Bootstrapped identities and a second database nobody was granted; all dropped at the end."""
    made = Identities()
    with root() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{made.other}`")
        cur.execute(f"CREATE TABLE `{made.other}`.secrets (value TEXT)")
    code, lines = bootstrap(made.env())
    assert code == 0, lines
    yield made
    with root() as conn, conn.cursor() as cur:
        for user in made.users.values():
            cur.execute("DROP USER IF EXISTS %s@'%%', %s@'%%'", (user, user + "_clone"))
        for name in (made.database, made.other):
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


def refused(conn, statement):
    """Run a statement that must be refused; return the MySQL error number."""
    with pytest.raises(pymysql.err.MySQLError) as raised, conn.cursor() as cur:
        cur.execute(statement)
    code = raised.value.args[0]
    assert code in DENIED, raised.value
    return code


def test_bootstrap_creates_the_database_and_both_identities_and_logs_no_password(mysql_database):
    made = Identities()
    try:
        code, lines = bootstrap(made.env())
        assert code == 0, lines
        (done,) = [e for e in lines if e["message"] == "bootstrap done"]
        assert sorted(done["granted"]) == sorted(f"{u}@%" for u in made.users.values())
        text = str(lines)
        assert not any(password in text for password in made.passwords.values())
        with root() as conn, conn.cursor() as cur:
            cur.execute("SHOW DATABASES LIKE %s", (made.database,))
            assert cur.fetchall() == ((made.database,),)
    finally:
        with root() as conn, conn.cursor() as cur:
            for user in made.users.values():
                cur.execute("DROP USER IF EXISTS %s@'%%'", (user,))
            cur.execute(f"DROP DATABASE IF EXISTS `{made.database}`")


def test_the_app_identity_reads_and_writes_rows_and_nothing_else(identities):
    assert migrate_as(identities, "MIGRATION")[0] == 0
    with identities.connect("APP") as conn:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO cars (brand, model, year) VALUES ('Fiat', 'Panda', 1980)")
            cur.execute("UPDATE cars SET model = 'Uno' WHERE brand = 'Fiat'")
            cur.execute("SELECT brand, model FROM cars")
            assert cur.fetchall() == (("Fiat", "Uno"),)
            cur.execute("DELETE FROM cars")
            assert cur.rowcount == 1
        refused(conn, "CREATE TABLE sneaky (id INT)")
        refused(conn, "DROP TABLE cars")
        refused(conn, "ALTER TABLE cars ADD COLUMN sneaky INT")
        refused(conn, "CREATE INDEX sneaky ON cars (model)")
        refused(conn, f"GRANT SELECT ON `{identities.database}`.* TO CURRENT_USER")
        refused(conn, "SELECT User FROM mysql.user")
        refused(conn, identities.read_other)
    code, lines = migrate_as(identities, "APP")  # nor can it migrate
    assert code == 1
    assert [e["message"] for e in lines] == ["migration failed"]


def test_the_migration_identity_changes_the_schema_of_its_database_only(identities):
    code, lines = migrate_as(identities, "MIGRATION")
    assert code == 0, lines
    with identities.connect("MIGRATION") as conn:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE scratch (id INT PRIMARY KEY)")
            cur.execute("ALTER TABLE scratch ADD COLUMN note VARCHAR(10) NULL")
            cur.execute("CREATE INDEX scratch_note ON scratch (note)")
            cur.execute("DROP TABLE scratch")
        refused(conn, "SELECT User FROM mysql.user")
        refused(conn, identities.read_other)
        refused(conn, f"CREATE TABLE `{identities.other}`.sneaky (id INT)")
        refused(conn, "CREATE USER 'dataapp_sneaky'@'%' IDENTIFIED BY 'x'")
        refused(conn, f"GRANT SELECT ON `{identities.database}`.* TO CURRENT_USER")


def test_bootstrap_again_changes_no_password_and_grants_the_clone_user(identities):
    clone = identities.users["APP"] + "_clone"
    clone_password = secrets.token_hex(16)
    with root() as conn, conn.cursor() as cur:  # what the alternating-users rotation does
        cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (clone, clone_password))
    code, lines = bootstrap(identities.env(APP_PASSWORD=secrets.token_hex(16)))
    assert code == 0, lines
    (done,) = [e for e in lines if e["message"] == "bootstrap done"]
    assert f"{clone}@%" in done["granted"]
    assert migrate_as(identities, "MIGRATION")[0] == 0
    identities.connect("APP").close()  # the first password still works
    clone_conn = pymysql.connect(
        host=MYSQL["host"],
        port=MYSQL["port"],
        user=clone,
        password=clone_password,
        database=identities.database,
        autocommit=True,
    )
    with clone_conn:
        with clone_conn.cursor() as cur:
            cur.execute("INSERT INTO cars (brand, model, year) VALUES ('Lada', 'Niva', 1977)")
            cur.execute("SELECT COUNT(*) FROM cars")
            assert cur.fetchone() == (1,)
        refused(clone_conn, "DROP TABLE cars")


def test_bootstrap_without_the_identities_is_a_usage_error(identities):
    env = identities.env()
    del env["APP_PASSWORD"]
    code, lines = bootstrap(env)
    assert code == 2
    assert len(lines) == 1
    assert "APP_PASSWORD" in lines[0]["message"]
    same = identities.env(APP_USER=identities.users["MIGRATION"])
    assert bootstrap(same)[0] == 2


def test_bootstrap_on_sqlite_is_a_usage_error(tmp_path):
    env = {"SQLITE_PATH": str(tmp_path / "x.db"), **{k: "x" for k in ("APP_USER", "APP_PASSWORD")}}
    code, lines = bootstrap(env)
    assert code == 2
    assert "MySQL" in lines[0]["message"]
    assert os.path.exists(tmp_path / "x.db") is False


def test_an_app_identity_serves_a_current_schema_with_auto_migration_on(identities, run_server):
    assert migrate_as(identities, "MIGRATION")[0] == 0
    env = {
        **mysql_env(identities.database),
        "MYSQL_USER": identities.users["APP"],
        "MYSQL_PASSWORD": identities.passwords["APP"],
    }
    server = run_server(env)  # a loopback MySQL: AUTO_MIGRATE is on by default
    assert '"auto_migrate": true' in server.log()
    assert call(server, "GET", "/ready")[0] == 200
    status, _, car = call(server, "POST", "/cars", {"brand": "Fiat", "model": "Uno", "year": 1983})
    assert status == 201
    assert call(server, "GET", f"/cars/{car['id']}")[2] == car
