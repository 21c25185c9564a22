"""`make up` / `make down` on Docker or Podman: the curl walk-through, and the data kept.

The test marked `compose` runs the real stack; `make compose-test` runs it (it is left out of
`make test`: it builds images). The others need no engine: they check how scripts/compose.sh
picks the compose tool, with stand-ins for docker, podman and podman-compose that record their
arguments, and what `make up` refuses. Each test works in a copy of the working tree, so that it
makes its own `.env` as a fresh clone does and never touches the developer's; the real stack runs
under a project name and port of its own. Its database is a MySQL-compatible MariaDB image built
here from Debian packages (tests/compose/mariadb.Dockerfile) unless MYSQL_IMAGE names one; the
engine is CONTAINER (docker, podman, or a path to either), and PYTHON_IMAGE the API image's base
where no registry is reachable.
"""

import json
import os
import re
import shutil
import stat
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from conftest import IN_CI, ROOT, free_port

DB_IMAGE = "localhost/cars-api-mariadb:test"
UP_TIMEOUT = 900  # seconds for one `make up`, a cold build included, on a loaded 2-core machine
STEP_TIMEOUT = 300

# The walk-through as the README prints it after `make up` (its port replaced by the test's),
# each curl line run after the line that reads the token from .env.
FROM_ENV = "TOKEN=$(grep ^API_TOKEN= .env | cut -d= -f2)"
POST_GOLF = (
    'curl -X POST http://127.0.0.1:8080/cars -H "Authorization: Bearer $TOKEN" \\\n'
    "     -H 'Content-Type: application/json' "
    '-d \'{"brand": "Volkswagen", "model": "Golf", "year": 2018}\''
)
POST_TCROSS = (
    'curl -X POST http://127.0.0.1:8080/cars -H "Authorization: Bearer $TOKEN" \\\n'
    "     -H 'Content-Type: application/json' "
    '-d \'{"brand": "Volkswagen", "model": "T-cross", "year": 2021}\''
)
LIST = "curl http://127.0.0.1:8080/cars"
PUT_POLO = (
    'curl -X PUT http://127.0.0.1:8080/cars/1 -H "Authorization: Bearer $TOKEN" \\\n'
    "     -H 'Content-Type: application/json' "
    '-d \'{"brand": "Volkswagen", "model": "Polo", "year": 2019}\''
)
GOLF = {"id": 1, "brand": "Volkswagen", "model": "Golf", "year": 2018}
TCROSS = {"id": 2, "brand": "Volkswagen", "model": "T-cross", "year": 2021}
POLO = {"id": 1, "brand": "Volkswagen", "model": "Polo", "year": 2019}


def works(*command):
    """Return whether a command runs and exits 0."""
    try:
        return subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def is_podman(engine):
    """Return whether the engine is podman (or a wrapper of it)."""
    try:
        out = subprocess.run([engine, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "podman" in out.stdout.lower()


def find_engine():
    """Return the engine `make up` will use (as scripts/compose.sh picks it), or skip or fail."""
    engine = os.environ.get("CONTAINER") or "docker"
    if not is_podman(engine):
        if works(engine, "compose", "version") and works(engine, "info"):
            return engine
        engine = "podman"
    path = shutil.which(engine)
    if path and works(path, "info"):
        return path
    if IN_CI:
        pytest.fail(f"CI needs a container engine for the compose test (CONTAINER={engine})")
    pytest.skip(f"no container engine ({engine}, or docker with compose); CI always runs this test")


@pytest.fixture(scope="module")
def engine():
    """The container engine that `make up` will use."""
    return find_engine()


@pytest.fixture(scope="module")
def mysql_image(engine):
    """MYSQL_IMAGE, or the MariaDB stand-in built here (cached by the engine between runs)."""
    if os.environ.get("MYSQL_IMAGE"):
        return os.environ["MYSQL_IMAGE"]
    command = [engine, "build", "--tag", DB_IMAGE, "--file", "tests/compose/mariadb.Dockerfile"]
    if os.environ.get("PYTHON_IMAGE"):  # a local Debian 13 base where no registry is reachable
        command += ["--build-arg", f"BASE_IMAGE={os.environ['PYTHON_IMAGE']}"]
    built = subprocess.run(
        [*command, "tests/compose"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert built.returncode == 0, f"the MariaDB image did not build:\n{built.stderr[-3000:]}"
    return DB_IMAGE


@pytest.fixture
def clone(tmp_path):
    """A copy of the working tree's files as git knows them (tracked or new), without .env."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    copy = tmp_path / "cars-api"
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    assert not (copy / ".env").exists()
    return copy


class Stack:
    """The compose stack of one clone: make up/down there, requests to its published port."""

    def __init__(self, engine, clone, mysql_image):
        self.engine, self.dir = engine, clone
        self.project = f"cars-api-test-{os.getpid()}"
        self.port = free_port()
        self.env = {
            **os.environ,
            "CONTAINER": engine,
            "MYSQL_IMAGE": mysql_image,
            "PORT": str(self.port),
            "COMPOSE_PROJECT_NAME": self.project,
        }
        # The clone has no .venv: point at the podman-compose that `make compose-tool` installs.
        tool = ROOT / ".venv" / "compose" / "bin" / "podman-compose"
        if tool.exists():
            self.env["PODMAN_COMPOSE"] = str(tool)

    def make(self, target):
        """Run `make TARGET` in the clone; return its duration in seconds."""
        began = time.monotonic()
        done = subprocess.run(
            ["make", target],
            cwd=self.dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=UP_TIMEOUT if target == "up" else STEP_TIMEOUT,
        )
        output = f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
        assert done.returncode == 0, f"make {target} failed:\n{output}"
        return time.monotonic() - began

    def shell(self, command):
        """Run a walk-through line as printed (after the token line) in the clone; return JSON."""
        script = f"{FROM_ENV}\n{command.replace(':8080/', f':{self.port}/')}"
        done = subprocess.run(
            ["bash", "-c", script], cwd=self.dir, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"{command}:\n{done.stderr}"
        return json.loads(done.stdout)

    def post_anonymously(self):
        """POST a car without the token; return the HTTP status."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/cars",
            data=json.dumps({"brand": "Volkswagen", "model": "Golf", "year": 2018}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=5) as res:
                return res.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def status(self, path):
        """Return the HTTP status of GET path, or None when nothing answers."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.port}{path}", timeout=5) as res:
                return res.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def containers(self):
        """Return the names of the project's containers, running or not."""
        label = f"label=com.docker.compose.project={self.project}"
        listed = subprocess.run(
            [self.engine, "ps", "--all", "--filter", label, "--format", "{{.Names}}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return listed.stdout.split()

    def volume_exists(self):
        """Return whether the project's MySQL data volume exists."""
        return works(self.engine, "volume", "inspect", f"{self.project}_mysql-data")

    def remove(self):
        """Remove whatever the test left: containers, network, pod and the data volume."""
        subprocess.run(["make", "down"], cwd=self.dir, env=self.env, capture_output=True)
        for name in self.containers():
            subprocess.run([self.engine, "rm", "--force", name], capture_output=True)
        subprocess.run(
            [self.engine, "volume", "rm", "--force", f"{self.project}_mysql-data"],
            capture_output=True,
        )


@pytest.fixture
def stack(engine, clone, mysql_image):
    """A Stack in the clone; everything it made is removed afterwards, the images excepted."""
    made = Stack(engine, clone, mysql_image)
    yield made
    made.remove()


@pytest.mark.compose
def test_make_up_serves_the_walk_through_and_a_restart_keeps_the_cars(stack):
    first_up = stack.make("up")
    # `make up` returns only once the API answers /ready: no retry here.
    assert stack.status("/ready") == 200
    env_file = stack.dir / ".env"
    env_text = env_file.read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert re.search(r"^API_TOKEN=[0-9a-f]{64}$", env_text, re.M)
    assert re.search(r"^MYSQL_PASSWORD=[0-9a-f]{48}$", env_text, re.M)
    assert "ALLOW_ANONYMOUS_WRITES" not in env_text

    assert stack.post_anonymously() == 401
    assert stack.shell(POST_GOLF) == GOLF
    assert stack.shell(POST_TCROSS) == TCROSS
    assert stack.shell(LIST) == [GOLF, TCROSS]
    assert stack.shell(PUT_POLO) == POLO

    stack.make("down")
    assert stack.containers() == []
    assert stack.status("/ready") is None
    assert stack.volume_exists()

    second_up = stack.make("up")
    assert env_file.read_text() == env_text, "make up changed an existing .env"
    assert stack.shell(LIST) == [POLO, TCROSS]

    stack.make("down")
    assert stack.containers() == []
    print(f"make up: first {first_up:.0f} s, again {second_up:.0f} s")


# Stand-ins for the engines: each appends its arguments to $CALLS; docker and podman answer
# --version, and `compose`/`info` succeed only when the test says so.
FAKE_DOCKER = """#!/bin/sh
echo "docker $*" >>"$CALLS"
case $1 in
  --version) echo 'Docker version 27.5.1, build 9f9e405' ;;
  compose) [ "$FAKE_DOCKER_COMPOSE" = yes ] ;;
  info) [ "$FAKE_DOCKER_ENGINE" = yes ] ;;
esac
"""
FAKE_PODMAN = """#!/bin/sh
echo "podman $*" >>"$CALLS"
case $1 in
  --version) echo 'podman version 4.3.1' ;;
  compose) [ "$FAKE_PODMAN_COMPOSE" = yes ] || { echo "Error: unknown command" >&2; exit 125; } ;;
esac
"""
# Like every compose tool, it refuses to run while a variable the file requires has no value.
FAKE_PODMAN_COMPOSE = """#!/bin/sh
echo "podman-compose $*" >>"$CALLS"
for name in MYSQL_USER MYSQL_PASSWORD API_TOKEN; do
  eval "value=\\${$name:-}"
  if [ -z "$value" ] && ! grep -q "^$name=." .env 2>/dev/null; then
    echo "required variable $name is missing a value" >&2
    exit 1
  fi
done
"""


@pytest.fixture
def fake_engines(tmp_path):
    """Return run(target, **settings) -> (result, calls): make TARGET in a clone, fakes on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (
        ("docker", FAKE_DOCKER),
        ("podman", FAKE_PODMAN),
        ("podman-compose", FAKE_PODMAN_COMPOSE),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"

    def run(clone, target, **settings):
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("CONTAINER", "PODMAN_COMPOSE", "MAKEFLAGS", "MAKELEVEL")
        }
        env.update(PATH=f"{bin_dir}:/usr/bin:/bin", CALLS=str(calls), **settings)
        calls.write_text("")
        done = subprocess.run(
            ["make", target], cwd=clone, env=env, capture_output=True, text=True, timeout=120
        )
        compose_calls = [
            line
            for line in calls.read_text().splitlines()
            if "--version" not in line and " version" not in line and " info" not in line
        ]
        return done, compose_calls

    return run, bin_dir


def test_make_down_uses_the_docker_compose_plugin_when_it_works(clone, fake_engines):
    run, _ = fake_engines
    done, calls = run(clone, "down", FAKE_DOCKER_COMPOSE="yes", FAKE_DOCKER_ENGINE="yes")
    assert done.returncode == 0, done.stderr
    assert calls == ["docker compose down"]


def test_make_down_falls_back_to_podman_compose_without_the_docker_plugin(clone, fake_engines):
    run, bin_dir = fake_engines
    done, calls = run(clone, "down", FAKE_DOCKER_ENGINE="yes")
    assert done.returncode == 0, done.stderr
    assert "using podman" in done.stderr
    assert calls == [f"podman-compose --podman-path {bin_dir}/podman down"]


def test_make_down_stops_the_stack_even_without_an_env(clone, fake_engines):
    run, bin_dir = fake_engines
    done, calls = run(clone, "down", CONTAINER="podman")
    assert done.returncode == 0, done.stderr
    assert calls == [f"podman-compose --podman-path {bin_dir}/podman down"]
    assert not (clone / ".env").exists()


def test_make_down_with_podman_prefers_its_own_compose(clone, fake_engines):
    run, _ = fake_engines
    done, calls = run(
        clone, "down", CONTAINER="podman", FAKE_PODMAN_COMPOSE="yes", FAKE_DOCKER_COMPOSE="yes"
    )
    assert done.returncode == 0, done.stderr
    assert calls == ["podman compose down"]


def test_make_up_gives_up_when_ready_never_answers_and_points_at_the_logs(clone, fake_engines):
    run, bin_dir = fake_engines
    done, calls = run(clone, "up", CONTAINER="podman", PORT=str(free_port()), UP_TIMEOUT="2")
    assert done.returncode != 0
    assert "did not answer" in done.stderr
    assert "within 2 s" in done.stderr
    assert f"{bin_dir}/podman logs" in done.stderr
    tool = f"podman-compose --podman-path {bin_dir}/podman"
    assert calls == [f"{tool} up --build --detach", f"{tool} logs --tail 20"]
    assert re.search(r"^API_TOKEN=[0-9a-f]{64}$", (clone / ".env").read_text(), re.M)
    assert sorted(p.name for p in clone.glob(".env*")) == [".env", ".env.example"]


def test_make_up_never_overwrites_an_existing_env(clone, fake_engines):
    run, _ = fake_engines
    mine = "MYSQL_USER=me\nMYSQL_PASSWORD=mine\nAPI_TOKEN=" + "t" * 40 + "\n"
    (clone / ".env").write_text(mine)
    done, calls = run(clone, "up", CONTAINER="podman", PORT=str(free_port()), UP_TIMEOUT="1")
    assert "wrote .env" not in done.stderr
    assert calls[0].endswith(" up --build --detach")
    assert (clone / ".env").read_text() == mine


def test_make_up_refuses_an_env_without_a_token_and_starts_nothing(clone, fake_engines):
    run, _ = fake_engines
    template = (clone / ".env.example").read_text()
    (clone / ".env").write_text(template)  # the old habit: cp .env.example .env
    done, calls = run(clone, "up", CONTAINER="podman")
    assert done.returncode != 0
    assert "API_TOKEN in .env is empty" in done.stderr
    assert (clone / ".env").read_text() == template
    assert calls == []


def test_the_walk_through_the_compose_test_runs_is_the_one_the_readme_prints():
    readme = (ROOT / "README.md").read_text()
    printed = [
        FROM_ENV,
        POST_GOLF,
        POST_TCROSS,
        LIST,
        PUT_POLO,
        json.dumps(GOLF, separators=(",", ":")),
        json.dumps([POLO, TCROSS], separators=(",", ":")),
    ]
    missing = [line for line in printed if line not in readme]
    assert not missing, f"the README no longer prints {missing}: change the test with it"
