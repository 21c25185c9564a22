"""The supply chain of the build: every package locked with hashes, stale locks caught, updates.

Contract (docs/reference/dependencies.md and container.md): `make lock` turns each
tests/requirements*.in into a hashed lock (tests/requirements-runtime.in into requirements.txt);
every venv and the image install with pip's --require-hashes; `make lint` fails when a lock no
longer follows from its input; Dependabot watches the actions, the locks and the base image;
CODEOWNERS guard the build.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LOCKS = [ROOT / "requirements.txt", *sorted((ROOT / "tests").glob("requirements*.txt"))]
# The uv that `make lint` installs into the venv beside the one running these tests.
UV = Path(sys.prefix) / "lock" / "bin" / "uv"
# Fully qualified and pinned by digest (Podman refuses short names; Dependabot moves the digest).
BASE_IMAGE = (
    "docker.io/library/python:3.13-slim-trixie"
    "@sha256:ffb752e139c0a19692a43af8d8523b274222dd68eebad5d583b45c2201c6e30a"
)


def requirements(lock: Path) -> list[str]:
    """Return the requirement entries of a lock file, continuation lines joined."""
    text = re.sub(r"\\\n", " ", lock.read_text(encoding="utf-8"))
    lines = (line.split(" #")[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def input_of(lock: Path) -> Path:
    """Return the input a lock file is made from."""
    if lock == ROOT / "requirements.txt":
        return ROOT / "tests" / "requirements-runtime.in"
    return lock.with_suffix(".in")


@pytest.mark.parametrize("lock", LOCKS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_lock_pins_every_package_to_one_version_with_hashes(lock):
    entries = requirements(lock)
    assert entries, f"{lock} locks nothing"
    assert input_of(lock).is_file(), f"{lock} has no input {input_of(lock)}"
    for entry in entries:
        assert re.match(r"^[a-z0-9][a-z0-9._-]*==[^ ;]+", entry), f"not pinned: {entry}"
        assert "--hash=sha256:" in entry, f"no hash: {entry}"


def test_every_venv_and_the_image_install_with_hashes_required(tmp_path):
    venv = tmp_path / "venv"
    targets = [f"{venv}/.runtime-installed", f"{venv}/.dev-installed", f"{venv}/lock/.installed"]
    targets.append(f"{venv}/compose/.installed")  # podman-compose, for make up and compose-test
    plan = subprocess.run(
        ["make", "--always-make", "--dry-run", f"VENV={venv}", *targets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installs = [line for line in plan.splitlines() if "pip install" in line]
    assert installs, plan
    assert all("--require-hashes" in line for line in installs), plan
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    locks = [ROOT / "requirements.txt", *sorted((ROOT / "tests").glob("requirements*.txt"))]
    for lock in (str(path.relative_to(ROOT)) for path in locks):
        # Each lock is installed by a venv rule, or by the image build (the SBOM tool's).
        assert any(f"-r {lock}" in line for line in installs) or lock in dockerfile, lock
    image_installs = re.findall(r"pip install[^&]*", dockerfile)
    assert image_installs
    assert all("--require-hashes" in line for line in image_installs), image_installs


def test_pip_refuses_a_package_whose_file_the_lock_has_no_hash_for(tmp_path):
    entry = next(line for line in requirements(ROOT / "requirements.txt") if "bottle==" in line)
    version = entry.split()[0]
    wrong = tmp_path / "wrong.txt"
    wrong.write_text(f"{version} --hash=sha256:{'0' * 64}\n", encoding="utf-8")
    right = tmp_path / "right.txt"
    right.write_text(entry + "\n", encoding="utf-8")
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes"]
    refused = subprocess.run(
        [*download, "--dest", str(tmp_path / "a"), "-r", str(wrong)], capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert "DO NOT MATCH THE HASHES" in refused.stderr
    subprocess.run([*download, "--dest", str(tmp_path / "b"), "-r", str(right)], check=True)
    assert list((tmp_path / "b").glob("bottle-*"))


@pytest.fixture
def lock_tree(tmp_path):
    """Return a copy of lock.sh with the runtime input and lock, as a tree of its own."""
    assert UV.is_file(), f"{UV} is missing: make lint installs it"
    (tmp_path / "scripts").mkdir()
    (tmp_path / "tests").mkdir()
    shutil.copy2(ROOT / "scripts" / "lock.sh", tmp_path / "scripts")
    shutil.copy2(ROOT / "tests" / "requirements-runtime.in", tmp_path / "tests")
    shutil.copy2(ROOT / "requirements.txt", tmp_path)
    return tmp_path


def lock_check(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["scripts/lock.sh", "--check"],
        cwd=tree,
        env={**os.environ, "UV": str(UV)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_lock_check_passes_while_the_lock_follows_from_its_input(lock_tree):
    result = lock_check(lock_tree)
    assert result.returncode == 0, result.stderr
    assert "1 lock files match their inputs" in result.stderr


def test_lock_check_fails_when_an_input_gains_a_package(lock_tree):
    runtime_in = lock_tree / "tests" / "requirements-runtime.in"
    runtime_in.write_text(runtime_in.read_text(encoding="utf-8") + "six\n", encoding="utf-8")
    result = lock_check(lock_tree)
    assert result.returncode == 1
    assert "requirements.txt is stale against tests/requirements-runtime.in" in result.stderr
    assert "+six==" in result.stderr


def test_lock_check_fails_when_a_pin_is_moved_by_hand(lock_tree):
    lock = lock_tree / "requirements.txt"
    text = lock.read_text(encoding="utf-8")
    assert "waitress==3.0.2 " in text
    lock.write_text(text.replace("waitress==3.0.2 ", "waitress==3.0.1 "), encoding="utf-8")
    result = lock_check(lock_tree)
    assert result.returncode == 1
    assert "requirements.txt is stale" in result.stderr


def test_lock_check_fails_on_a_requirements_file_without_an_input(lock_tree):
    (lock_tree / "tests" / "requirements-bench.txt").write_text("flask==3.1.3\n", encoding="utf-8")
    result = lock_check(lock_tree)
    assert result.returncode == 1
    assert "tests/requirements-bench.txt has no input tests/requirements-bench.in" in result.stderr


def test_make_lint_runs_the_lock_check_and_make_lock_refreshes_every_lock():
    def plan(target):
        return subprocess.run(
            ["make", "--dry-run", target], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout

    assert re.search(r"^UV=\S+ scripts/lock.sh --check$", plan("lint"), re.MULTILINE)
    assert re.search(r"^UV=\S+ scripts/lock.sh$", plan("lock"), re.MULTILINE)


def test_dependabot_updates_the_actions_every_lock_and_the_base_image():
    config = yaml.safe_load((ROOT / ".github" / "dependabot.yml").read_text(encoding="utf-8"))
    updates = {(u["package-ecosystem"], u["directory"]) for u in config["updates"]}
    assert ("github-actions", "/") in updates
    assert ("docker", "/") in updates
    for lock in LOCKS:
        assert ("pip", "/" + str(lock.parent.relative_to(ROOT)).strip(".")) in updates, lock
    # Dependabot reads FROM lines, not build arguments: the base must be named in one.
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert f"FROM {BASE_IMAGE} AS upstream" in dockerfile.splitlines()
    assert "ARG PYTHON_IMAGE=upstream" in dockerfile.splitlines()


@pytest.mark.parametrize(
    "path",
    [".github/workflows/ci.yml", "cloudformation/base.yaml", "scripts/release.sh", "Makefile",
     "Dockerfile"],
)  # fmt: skip
def test_codeowners_own_what_builds_and_deploys(path):
    rules = []
    for line in (ROOT / ".github" / "CODEOWNERS").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            pattern, *owners = line.split()
            rules.append((pattern, owners))
    assert (ROOT / path).exists()
    # GitHub applies the last matching rule; these rules are anchored files and folders.
    matching = [owners for pattern, owners in rules if f"/{path}".startswith(pattern)]
    assert matching, f"no CODEOWNERS rule covers {path}"
    assert matching[-1], f"the rule for {path} names no owner"
    assert all(owner.startswith("@") for owner in matching[-1])


def test_the_image_and_ci_run_python_3_13_on_debian_13():
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert stages[0] == BASE_IMAGE
    # The final image is a flattened copy of the trimmed runtime stage, so nothing removed there
    # ships in a lower layer.
    assert stages[-1] == "scratch"
    assert "COPY --from=runtime / /" in dockerfile
    assert re.search(r"^USER 10001:10001$", dockerfile, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK ", dockerfile, re.MULTILINE)
    ci_run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "localhost/python-base:trixie" in ci_run
    assert "bookworm" not in ci_run
