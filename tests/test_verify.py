"""Release verification over recorded AWS responses: migration, rollout done, rolled back, stuck.

No emulator can make ECS roll a deployment back, so these tests replay AWS answers recorded in the
shapes the APIs document (tests/aws/*.json) through a stand-in `aws` command, and drive the real
scripts (make deploy / rollback / status / history) and their decision helper. /ready is a real
HTTP server on 127.0.0.1.
"""

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
from conftest import ROOT, image_manifest, pem_bundle

RECORDED = ROOT / "tests" / "aws"
HELPER = ROOT / "scripts" / "deploy_state.py"
REPOSITORY = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/cars-api-base-repository-7kq2xv9lmd3a"
NEW = "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0"
OLD = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a"
TD_OLD = "arn:aws:ecs:eu-west-1:123456789012:task-definition/cars-api-service:4"
TD_NEW = "arn:aws:ecs:eu-west-1:123456789012:task-definition/cars-api-service:5"
NEW_DIGEST = "sha256:b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0a1b2c3d4e5f60718293a4b5c"
OLD_DIGEST = "sha256:0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a3f9c2a7e5b1d4c6f8a0e2b4d"
SHORT_NEW = f"cars-api-base-repository-7kq2xv9lmd3a@{NEW_DIGEST}"
SHORT_OLD = f"cars-api-base-repository-7kq2xv9lmd3a@{OLD_DIGEST}"

# The stand-in `aws`: answers each call with the next recorded response planned for it (the last
# one repeats), logs every call, and fails loudly on a call nobody planned.
REPLAY = """\
import json, os, sys
args = sys.argv[1:]
for flag in ("--region", "--endpoint-url", "--output", "--max-items"):
    while flag in args:
        i = args.index(flag)
        del args[i : i + 2]
key = " ".join(args[:2])
for flag in ("--stack-name", "--task-definition"):
    if flag in args:
        key += " " + args[args.index(flag) + 1]
home = os.environ["REPLAY_DIR"]
with open(os.path.join(home, "calls.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
for arg in args:  # keep the files a call reads (the scripts delete theirs on exit)
    if arg.startswith("file://"):
        os.makedirs(os.path.join(home, "inputs"), exist_ok=True)
        with open(os.path.join(home, "inputs", os.path.basename(arg)), "w") as copy:
            copy.write(open(arg[7:]).read())
plan = json.load(open(os.path.join(home, "plan.json")))
if key not in plan:
    sys.stderr.write("replay: no recorded response for: " + key + "\\n")
    sys.exit(255)
count_file = os.path.join(home, "count-" + "".join(c if c.isalnum() else "_" for c in key))
count = int(open(count_file).read()) if os.path.exists(count_file) else 0
open(count_file, "w").write(str(count + 1))
answer = plan[key][min(count, len(plan[key]) - 1)]
if "file" in answer:
    sys.stdout.write(open(os.path.join(answer["dir"], answer["file"])).read())
sys.stdout.write(answer.get("stdout", ""))
sys.stderr.write(answer.get("stderr", ""))
sys.exit(answer.get("exit", 0))
"""

# The stand-in container engine and gh: no registry or GitHub is reachable from the tests. The
# engine reports the image ID and revision label it is told (STUB_IMAGE_ID, STUB_LABEL) and logs
# every call; gh exits with STUB_GH_EXIT.
ENGINE = """\
import os, sys
args = sys.argv[1:]
with open(os.path.join(os.environ["REPLAY_DIR"], "engine.log"), "a") as log:
    log.write(" ".join(args) + "\\n")
if args[:1] == ["login"]:
    sys.stdin.read()
if args[:2] == ["image", "inspect"]:
    wanted = os.environ["STUB_LABEL"] if "Labels" in args[3] else os.environ["STUB_IMAGE_ID"]
    print(wanted)
"""
GH = """\
import os, sys
with open(os.path.join(os.environ["REPLAY_DIR"], "gh.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
code = int(os.environ.get("STUB_GH_EXIT", "0"))
if code:
    sys.stderr.write("Error: no attestations found for subject\\n")
sys.exit(code)
"""

CFN_FAILED = {
    "exit": 255,
    "stdout": "\nWaiting for changeset to be created..\n"
    "Waiting for stack create/update to complete\n",
    "stderr": "\nFailed to create/update the stack. Run the following command\nto fetch the list"
    " of events leading up to the failure\naws cloudformation describe-stack-events"
    " --stack-name cars-api-service\n",
}
ACCESS_DENIED = {
    "exit": 254,
    "stderr": "\nAn error occurred (AccessDenied) when calling the DescribeStackResources"
    " operation:"
    " User: arn:aws:sts::123456789012:assumed-role/cars-api-deploy/ci is not authorized\n",
}
CFN_OK = {"stdout": "\nSuccessfully created/updated stack - cars-api-service\n"}


class ReadyHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.server.ready_status if self.path == "/ready" else 404)
        self.end_headers()

    def log_message(self, *args):
        """Keep the test output quiet."""


@pytest.fixture
def ready_server():
    """A real HTTP server on 127.0.0.1 whose /ready answers ready_server.ready_status."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ReadyHandler)
    server.ready_status = 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def recorded(name):
    return {"dir": str(RECORDED), "file": name}


def base_plan(service_stack, services, deploy=None):
    """The answers of a deploy that reaches ECS; tests replace what their scenario changes."""
    return {
        "sts get-caller-identity": [{"stdout": '{"Account": "123456789012"}'}],
        "cloudformation describe-stacks cars-api-base": [recorded("stack-base.json")],
        "ecr describe-images": [recorded("images.json")],
        "ecr describe-image-scan-findings": [recorded("scan-complete-clean.json")],
        "cloudformation describe-stacks cars-api-service": [recorded(f) for f in service_stack],
        "cloudformation deploy cars-api-service": [deploy or CFN_OK],
        "cloudformation describe-stack-events cars-api-service": [
            recorded("events-circuit-breaker.json")
        ],
        "ecs describe-services": [recorded(f) for f in services],
        f"ecs describe-task-definition {TD_OLD}": [recorded("taskdef-old.json")],
        f"ecs describe-task-definition {TD_NEW}": [recorded("taskdef-new.json")],
        # The release's migration: the data stack's family, registered with the new image, run
        # once; it exits 0 unless a test plans otherwise.
        "cloudformation describe-stacks cars-api-data": [recorded("stack-data.json")],
        "ecs describe-task-definition cars-api-data-migrate": [recorded("taskdef-migrate.json")],
        "ecs register-task-definition": [recorded("taskdef-migrate-registered.json")],
        "ecs run-task cars-api-data-migrate": [recorded("run-task-migrate.json")],
        "ecs describe-tasks": [
            recorded("tasks-migrate-pending.json"),
            recorded("tasks-migrate-running.json"),
            recorded("tasks-migrate-exit-0.json"),
        ],
        "ecs stop-task": [{"stdout": "{}"}],
        # make status in CI: the deploy role may read no secret, not even which there are.
        "cloudformation describe-stack-resources cars-api-base": [ACCESS_DENIED],
    }


@pytest.fixture(scope="module")
def ca_bundle(tmp_path_factory):
    """A stand-in RDS CA bundle: stack-deploy reads it instead of downloading AWS's."""
    return pem_bundle(tmp_path_factory.mktemp("ca") / "rds-ca.pem", "Test RDS root CA")


@pytest.fixture
def replay(tmp_path, ready_server, ca_bundle):
    """Run a make target with `aws` answering from a plan of recorded responses."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("aws", REPLAY), ("engine", ENGINE), ("gh", GH)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{script}")
        (bin_dir / name).chmod(0o755)

    def run(target, plan, **env):
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        for log in ("calls.log", "engine.log", "gh.log"):
            (tmp_path / log).write_text("")
        for counter in tmp_path.glob("count-*"):
            counter.unlink()
        environment = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "REPLAY_DIR": str(tmp_path),
            "SERVICE_URL": f"http://127.0.0.1:{ready_server.server_port}",
            "POLL_SECONDS": "0",
            "READY_INTERVAL": "0",
            "CONTAINER": str(bin_dir / "engine"),
            "RDS_CA_BUNDLE": str(ca_bundle),  # stack-deploy checks it before any AWS call
            **env,
        }
        result = subprocess.run(
            ["make", "-C", str(ROOT), *target.split()],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        result.calls = (tmp_path / "calls.log").read_text().splitlines()
        result.engine = (tmp_path / "engine.log").read_text().splitlines()
        result.gh = (tmp_path / "gh.log").read_text().splitlines()
        return result

    return run


def last_error(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines, result.stderr
    return lines[-1]


def deploys(result):
    return [call for call in result.calls if " cloudformation deploy " in f" {call} "]


# The migration step of make deploy / release, over recorded responses


def called(result, *commands):
    """The calls among these 'service command' pairs, in the order they were made."""
    return [c for call in result.calls for c in commands if f" {c} " in f" {call} "]


def migration_calls(result):
    return called(result, "ecs run-task", "ecs stop-task")


def test_migration_that_exits_0_runs_with_the_new_image_before_the_service_changes(
    replay, tmp_path
):
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode == 0, result.stderr
    assert called(
        result, "ecs register-task-definition", "ecs run-task", "cloudformation deploy"
    ) == ["ecs register-task-definition", "ecs run-task", "cloudformation deploy"]
    run = next(call for call in result.calls if " ecs run-task " in f" {call} ")
    assert "--task-definition cars-api-data-migrate " in run
    assert "--launch-type FARGATE" in run
    assert "subnets=[subnet-0a1b2c3d4e5f60001,subnet-0a1b2c3d4e5f60002]" in run
    assert "securityGroups=[sg-0c1d2e3f4a5b60001],assignPublicIp=ENABLED" in run
    assert "--overrides" not in run, "the task reads its credentials from Secrets Manager"
    registered = json.loads((tmp_path / "inputs" / "migrate-register.json").read_text())
    assert registered["family"] == "cars-api-data-migrate"
    (container,) = registered["containerDefinitions"]
    assert container["image"] == f"{REPOSITORY}@{NEW_DIGEST}"
    assert container["command"] == ["python", "cars.py", "migrate"]
    assert {s["name"] for s in container["secrets"]} == {
        "MYSQL_USER",
        "MYSQL_PASSWORD",
        "MYSQL_SSL_CA",
    }
    assert registered["executionRoleArn"].endswith("MigrationExecutionRole-VMJ1PVI99J0S")
    assert not {"taskDefinitionArn", "revision", "status", "registeredAt"} & set(registered)
    assert "the migration task is PENDING" in result.stdout
    assert "the migration task exited 0" in result.stdout
    assert "DataStackName=cars-api-data" in deploys(result)[0]


def test_migration_that_exits_1_stops_the_deploy_and_leaves_the_service_alone(replay):
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    plan["ecs describe-tasks"] = [recorded("tasks-migrate-exit-1.json")]
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode != 0
    assert last_error(result) == (
        "error: the migration task exited 1 (Essential container in task exited); its log: make "
        "logs TASK=5f0e3c1d2b4a49e8a7c6d5e4f3a2b1c0 STREAM_PREFIX=migrate; nothing else changed"
    )
    assert deploys(result) == []
    assert called(result, "ecs describe-services") == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"ecs run-task cars-api-data-migrate": [recorded("run-task-no-capacity.json")]},
            "error: the migration task did not start: Capacity is unavailable at this time.",
        ),
        (
            {"ecs describe-tasks": [recorded("tasks-migrate-secrets-failed.json")]},
            "error: the migration task stopped before its container ran: "
            "ResourceInitializationError: unable to pull secrets",
        ),
        (
            {"ecs describe-tasks": [recorded("tasks-migrate-pending.json")]},
            "error: the migration task is PENDING after 0s: stopped it; nothing else changed",
        ),
    ],
    ids=["no-capacity", "secrets-unreadable", "never-runs"],
)
def test_migration_task_that_never_runs_stops_the_deploy(replay, change, expected):
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    plan.update(change)
    result = replay(f"deploy SHA={NEW}", plan, TASK_TIMEOUT="0")
    assert result.returncode != 0
    assert last_error(result).startswith(expected)
    assert deploys(result) == []
    stopped = called(result, "ecs stop-task")
    assert bool(stopped) is ("after 0s" in expected), "only an overrunning task is stopped"


def test_release_migrates_before_it_deploys_too(replay, archive):
    result = replay(f"release SHA={NEW}", release_plan(), **archive)
    assert result.returncode == 0, result.stderr
    assert "the migration task exited 0" in result.stdout
    assert called(result, "ecs run-task", "cloudformation deploy") == [
        "ecs run-task",
        "cloudformation deploy",
    ]


def test_rollback_runs_no_migration(replay):
    plan = base_plan(["stack-service.json"], ["services-rolled-back.json"])
    result = replay(f"rollback SHA={OLD}", plan)
    assert result.returncode == 0, result.stderr
    assert migration_calls(result) == []
    assert "Rollback: no migration runs" in result.stdout


def test_a_missing_migration_task_definition_stops_the_deploy(replay):
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    plan["ecs describe-task-definition cars-api-data-migrate"] = [
        {
            "exit": 254,
            "stderr": "\nAn error occurred (ClientException) when calling the "
            "DescribeTaskDefinition operation: Unable to describe task definition.\n",
        }
    ]
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode != 0
    assert "no migration task definition cars-api-data-migrate" in last_error(result)
    assert last_error(result).endswith("nothing changed")
    assert deploys(result) == []


# make deploy / rollback, end to end over recorded responses


def test_deploy_that_completes_with_the_exact_image_and_ready_200_succeeds(replay):
    plan = base_plan(
        ["stack-service.json"], ["services-in-progress.json", "services-completed.json"]
    )
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode == 0, result.stderr
    assert f"{REPOSITORY}@{NEW_DIGEST} is live: 2/2 tasks running" in result.stdout
    assert "/ready answered 200" in result.stdout
    assert len(deploys(result)) == 1
    assert f"ImageTag={NEW}@{NEW_DIGEST}" in deploys(result)[0]


def test_deploy_rolled_back_by_cloudformation_names_the_cause_and_what_serves(replay):
    plan = base_plan(
        ["stack-service.json", "stack-service-update-rollback-complete.json"],
        ["services-rolled-back.json"],
        deploy=CFN_FAILED,
    )
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode != 0
    line = last_error(result)
    assert line.startswith(f"error: deploy of {REPOSITORY}@{NEW_DIGEST} failed: ")
    assert "stack cars-api-service is UPDATE_ROLLBACK_COMPLETE" in line
    assert "ECS Deployment Circuit Breaker was triggered" in line
    assert "an older failure" not in line
    assert line.endswith(f"now serving {SHORT_OLD} (2 tasks)")


def test_deploy_rolled_back_by_the_circuit_breaker_after_cloudformation_is_a_failure(replay):
    plan = base_plan(["stack-service.json"], ["services-rolling-back.json"])
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode != 0
    line = last_error(result)
    assert "was rolled back by the circuit breaker/alarm" in line
    assert "tasks failed to start" in line
    assert line.endswith(f"now serving {SHORT_OLD} (1 task)")


def test_deploy_whose_service_runs_another_image_is_a_failure(replay):
    plan = base_plan(["stack-service.json"], ["services-rolled-back.json"])
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode != 0
    line = last_error(result)
    assert (
        f"wrong image: the primary deployment runs {REPOSITORY}@{OLD_DIGEST}, "
        f"not {REPOSITORY}@{NEW_DIGEST}" in line
    )
    assert "rolling back to deployment" in line


def test_deploy_that_never_completes_is_reported_stuck(replay):
    plan = base_plan(["stack-service.json"], ["services-in-progress.json"])
    result = replay(f"deploy SHA={NEW}", plan, ROLLOUT_TIMEOUT="0")
    assert result.returncode != 0
    line = last_error(result)
    assert line.startswith("error: stuck: rollout of ")
    assert "IN_PROGRESS: 1/2 tasks running" in line
    assert f"now serving {SHORT_NEW} (1 task)" in line


def test_deploy_whose_ready_check_fails_is_a_failure(replay, ready_server):
    ready_server.ready_status = 503
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    result = replay(f"deploy SHA={NEW}", plan, READY_TRIES="2")
    assert result.returncode != 0
    line = last_error(result)
    assert "/ready answered 503 2 times in a row" in line
    assert f"ECS runs {SHORT_NEW} (2 tasks)" in line


@pytest.mark.parametrize(
    ("stack", "expected"),
    [
        ("stack-service-update-in-progress.json", "is busy (UPDATE_IN_PROGRESS)"),
        ("stack-service-rollback-complete.json", "ROLLBACK_COMPLETE and cannot be updated"),
        ("stack-service-update-rollback-failed.json", "continue-update-rollback"),
    ],
)
def test_deploy_to_a_stack_in_a_failed_or_busy_state_is_refused_untouched(replay, stack, expected):
    plan = base_plan([stack], ["services-completed.json"])
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode != 0
    assert expected in last_error(result)
    assert deploys(result) == []


@pytest.mark.parametrize("target", ["rollback", "deploy"])
def test_unknown_sha_is_refused_and_changes_nothing(replay, target):
    result = replay(f"{target} SHA=1234567", base_plan(["stack-service.json"], []))
    assert result.returncode != 0
    assert last_error(result) == (
        f"error: 1234567 is not an image in {REPOSITORY}: nothing changed "
        "(make history lists the images you can deploy)"
    )
    assert deploys(result) == []


def test_rollback_to_an_ambiguous_short_sha_is_refused(replay):
    result = replay("rollback SHA=c0ffee0", base_plan(["stack-service.json"], []))
    assert result.returncode != 0
    assert "c0ffee0 is ambiguous" in last_error(result)
    assert deploys(result) == []


def test_rollback_with_a_unique_short_sha_deploys_the_full_tag(replay):
    plan = base_plan(["stack-service.json"], ["services-rolled-back.json"])
    result = replay(f"rollback SHA={OLD[:7]}", plan)
    assert result.returncode == 0, result.stderr
    assert f"Deploying {REPOSITORY}:{OLD} by digest {OLD_DIGEST}" in result.stdout
    assert f"ImageTag={OLD}@{OLD_DIGEST}" in deploys(result)[0]


def test_history_lists_images_newest_first_and_marks_the_live_one(replay):
    result = replay("history", base_plan(["stack-service.json"], ["services-completed.json"]))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line[:4] in ("2025", "2026")]
    assert [row.split()[2] for row in rows[:2]] == [NEW, OLD]
    assert rows[0].endswith("live")  # by digest: the task definition names no tag
    assert NEW_DIGEST[:19] in rows[0]
    assert not any(row.endswith("live") for row in rows[1:])
    assert "HIGH=1 MEDIUM=2" in rows[0]


def test_status_shows_the_live_image_counts_deployments_and_url(replay, ready_server):
    result = replay("status", base_plan(["stack-service.json"], ["services-rolling-back.json"]))
    assert result.returncode == 0, result.stderr
    assert f"live image   {REPOSITORY}@{OLD_DIGEST}" in result.stdout
    # The stack names NEW, which the circuit breaker is rolling back: no commit is claimed.
    assert "commit       unknown (the live image is not the one the service stack names)" in (
        result.stdout
    )
    assert "tasks        1 running / 2 desired" in result.stdout
    assert "ECS deployment circuit breaker: tasks failed to start." in result.stdout
    assert f"url          http://127.0.0.1:{ready_server.server_port}" in result.stdout
    assert "  (not readable with these credentials: run make status as an operator)" in (
        result.stdout
    ), "the deploy role reads no secret: CI's make status still succeeds"


def test_status_in_github_actions_writes_the_job_summary_and_url(replay, ready_server, tmp_path):
    summary, outputs = tmp_path / "summary.md", tmp_path / "outputs"
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    result = replay("status", plan, GITHUB_STEP_SUMMARY=str(summary), GITHUB_OUTPUT=str(outputs))
    assert result.returncode == 0, result.stderr
    url = f"http://127.0.0.1:{ready_server.server_port}"
    shown = summary.read_text()
    assert f"- Commit: `{NEW}`" in shown
    assert f"- Image: `{REPOSITORY}@{NEW_DIGEST}`" in shown
    assert f"- Service: {url}" in shown
    assert outputs.read_text().splitlines() == [f"url={url}"]


# Attestation, scan gate, freeze and the release's image hand-off, over recorded responses

IN_ACTIONS = {"GITHUB_ACTIONS": "true", "GITHUB_REPOSITORY": "acme/cars-api"}
LOGIN = {"stdout": "token-for-the-stub-engine\n"}  # pragma: allowlist secret (a placeholder)


def pushes(result):
    return [call for call in result.engine if call.startswith("push ")]


def test_a_deploy_outside_github_actions_says_it_could_not_verify_the_attestation(replay):
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode == 0, result.stderr
    assert (
        f"WARNING: could not verify the build provenance attestation of {REPOSITORY}@{NEW_DIGEST}"
        in result.stdout
    )
    assert result.gh == []


def test_a_deploy_in_github_actions_verifies_the_attestation_of_the_digest_first(replay):
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    plan["ecr get-login-password"] = [LOGIN]
    result = replay(f"deploy SHA={NEW}", plan, **IN_ACTIONS)
    assert result.returncode == 0, result.stderr
    assert result.gh == [
        f"attestation verify oci://{REPOSITORY}@{NEW_DIGEST} --repo acme/cars-api "
        "--cert-identity https://github.com/acme/cars-api/.github/workflows/ci.yml@refs/heads/main "
        "--deny-self-hosted-runners"
    ]
    assert result.engine[0].startswith("login --username AWS --password-stdin 123456789012.dkr")
    assert "verified: " in result.stdout
    assert len(deploys(result)) == 1


@pytest.mark.parametrize("target", ["deploy", "rollback"])
def test_an_image_whose_attestation_does_not_verify_is_not_deployed(replay, target):
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    plan["ecr get-login-password"] = [LOGIN]
    result = replay(f"{target} SHA={NEW}", plan, STUB_GH_EXIT="1", **IN_ACTIONS)
    assert result.returncode != 0
    assert last_error(result) == (
        f"error: the build provenance attestation of {REPOSITORY}@{NEW_DIGEST} does not verify: "
        "Error: no attestations found for subject; nothing changed"
    )
    assert deploys(result) == []


def test_a_rollback_to_an_image_with_blocking_findings_needs_the_override(replay):
    plan = base_plan(["stack-service.json"], ["services-rolled-back.json"])
    plan["ecr describe-image-scan-findings"] = [recorded("scan-critical.json")]
    refused = replay(f"rollback SHA={OLD}", plan)
    assert refused.returncode != 0
    line = last_error(refused)
    assert "2 blocking finding(s)" in line
    assert "CVE-2025-40201 (CRITICAL" in line
    assert line.endswith(
        f"nothing changed; to roll back anyway: make rollback SHA={OLD} ALLOW_VULNERABLE=true"
    )
    assert deploys(refused) == []
    allowed = replay(f"rollback SHA={OLD}", plan, ALLOW_VULNERABLE="true")
    assert allowed.returncode == 0, allowed.stderr
    assert "WARNING: ALLOW_VULNERABLE=true: deploying despite the scan gate: 2 blocking" in (
        allowed.stdout
    )
    assert len(deploys(allowed)) == 1


def test_a_deploy_cannot_use_the_rollback_override(replay):
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    result = replay(f"deploy SHA={NEW}", plan, ALLOW_VULNERABLE="true")
    assert result.returncode == 2
    assert "ALLOW_VULNERABLE=true is for make rollback only" in last_error(result)
    assert result.calls == []


def test_a_deploy_with_blocking_findings_is_refused_and_says_how_to_clear_them(replay):
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    plan["ecr describe-image-scan-findings"] = [recorded("scan-enhanced.json")]
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode != 0
    assert "CVE-2025-40301 (HIGH, libxml2 2.12.7+dfsg-3, fix YES)" in last_error(result)
    assert "excuse each in .github/scan-allowlist" in last_error(result)
    assert deploys(result) == []


def test_a_deploy_waits_for_the_scan_to_complete(replay):
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    scans = ["scan-in-progress.json", "scan-in-progress.json", "scan-complete-clean.json"]
    plan["ecr describe-image-scan-findings"] = [recorded(name) for name in scans]
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"the ECR scan of {NEW_DIGEST} is IN_PROGRESS") == 2
    assert len([c for c in result.calls if "describe-image-scan-findings" in c]) == 3


def test_a_scan_that_never_completes_stops_the_deploy(replay):
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    plan["ecr describe-image-scan-findings"] = [recorded("scan-in-progress.json")]
    result = replay(f"deploy SHA={NEW}", plan, SCAN_TIMEOUT="0")
    assert result.returncode != 0
    assert f"the ECR scan of {NEW_DIGEST} is IN_PROGRESS after 0s: nothing changed" in (
        last_error(result)
    )
    assert deploys(result) == []


def test_a_deploy_freeze_stops_deploys_and_releases_but_not_rollbacks(replay):
    plan = base_plan(["stack-service.json"], ["services-rolled-back.json"])
    for target in (f"deploy SHA={NEW}", f"release SHA={NEW}", f"push SHA={NEW}"):
        frozen = replay(target, plan, DEPLOY_FREEZE="incident 42")
        assert frozen.returncode != 0
        assert last_error(frozen).startswith(
            "error: deploys are frozen (DEPLOY_FREEZE=incident 42): nothing changed"
        )
        assert deploys(frozen) == []
        assert frozen.engine == []
    rollback = replay(f"rollback SHA={OLD}", plan, DEPLOY_FREEZE="incident 42")
    assert rollback.returncode == 0, rollback.stderr
    assert len(deploys(rollback)) == 1


TESTED_ID = "sha256:" + "7e57ed00" * 8
OTHER_ID = "sha256:" + "0dd1ce00" * 8
NOT_FOUND = {
    "exit": 254,
    "stderr": "\nAn error occurred (ImageNotFoundException) when calling the DescribeImages "
    "operation: The image with imageId {imageDigest:'null', imageTag:'b0b0'} does not exist\n",
}


def batch_image(config_digest):
    """A BatchGetImage answer for NEW whose manifest names config_digest."""
    answer = {
        "images": [
            {
                "registryId": "123456789012",
                "repositoryName": "cars-api-base-repository-7kq2xv9lmd3a",
                "imageId": {"imageDigest": NEW_DIGEST, "imageTag": NEW},
                "imageManifest": image_manifest(config_digest),
            }
        ],
        "failures": [],
    }
    return {"stdout": json.dumps(answer)}


@pytest.fixture
def archive(tmp_path):
    """The image archive the test job uploaded (its content is the stand-in engine's business)."""
    path = tmp_path / "dist" / "image.tar"
    path.parent.mkdir()
    path.write_bytes(b"an image archive")
    return {
        "IMAGE_ARCHIVE": str(path),
        "IMAGE_ID": TESTED_ID,
        "STUB_IMAGE_ID": TESTED_ID,
        "STUB_LABEL": NEW,
    }


def release_plan(existing=None):
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    if existing is None:
        plan["ecr describe-images"] = [NOT_FOUND, recorded("images.json")]
        plan["ecr get-login-password"] = [LOGIN]
    else:
        plan["ecr batch-get-image"] = [existing]
    return plan


def test_push_loads_the_tested_archive_pushes_it_and_hands_its_digest_on(replay, archive, tmp_path):
    outputs = tmp_path / "outputs"
    result = replay(f"push SHA={NEW}", release_plan(), GITHUB_OUTPUT=str(outputs), **archive)
    assert result.returncode == 0, result.stderr
    assert result.engine[0] == f"load --input {archive['IMAGE_ARCHIVE']}"
    assert not [call for call in result.engine if call.startswith("build")]
    assert pushes(result) == [f"push {REPOSITORY}:{NEW}"]
    assert "the image the test job tested" in result.stdout
    assert outputs.read_text().splitlines() == [f"repository={REPOSITORY}", f"digest={NEW_DIGEST}"]
    assert deploys(result) == []


def test_release_with_the_tested_archive_deploys_it_by_digest(replay, archive):
    result = replay(f"release SHA={NEW}", release_plan(), **archive)
    assert result.returncode == 0, result.stderr
    assert pushes(result) == [f"push {REPOSITORY}:{NEW}"]
    assert f"ImageTag={NEW}@{NEW_DIGEST}" in deploys(result)[0]
    assert "could not verify the build provenance attestation" in result.stdout


def test_an_archive_that_is_not_the_tested_image_is_not_pushed(replay, archive):
    result = replay(f"push SHA={NEW}", release_plan(), **{**archive, "STUB_IMAGE_ID": OTHER_ID})
    assert result.returncode != 0
    assert f"holds cars-api:{NEW} as {OTHER_ID}, not the tested {TESTED_ID}" in last_error(result)
    assert pushes(result) == []


def test_an_image_labelled_with_another_revision_is_not_pushed(replay, archive):
    result = replay(f"push SHA={NEW}", release_plan(), **{**archive, "STUB_LABEL": OLD})
    assert result.returncode != 0
    assert f"has the revision label '{OLD}', not {NEW}" in last_error(result)
    assert pushes(result) == []


def test_a_tag_already_in_ecr_holding_the_tested_image_is_released_without_a_push(replay, archive):
    result = replay(f"release SHA={NEW}", release_plan(batch_image(TESTED_ID)), **archive)
    assert result.returncode == 0, result.stderr
    assert "is already in ECR and is the same image" in result.stdout
    assert pushes(result) == []
    assert f"ImageTag={NEW}@{NEW_DIGEST}" in deploys(result)[0]


def test_a_tag_already_in_ecr_holding_another_image_stops_the_release(replay, archive):
    result = replay(f"release SHA={NEW}", release_plan(batch_image(OTHER_ID)), **archive)
    assert result.returncode != 0
    line = last_error(result)
    assert f"{REPOSITORY}:{NEW} is already in ECR but holds another image" in line
    assert f"config {OTHER_ID}), not {TESTED_ID}" in line
    assert pushes(result) == []
    assert deploys(result) == []


def test_a_release_waits_for_the_scan_and_stops_on_critical_findings(replay, archive):
    plan = release_plan()
    plan["ecr describe-image-scan-findings"] = [
        {"exit": 254, "stderr": "An error occurred (ScanNotFoundException): no scan yet\n"},
        recorded("scan-in-progress.json"),
        recorded("scan-critical.json"),
    ]
    result = replay(f"release SHA={NEW}", plan, **archive)
    assert result.returncode != 0
    line = last_error(result)
    assert line.startswith("error: release stopped: 2 blocking finding(s)")
    assert "nothing was deployed" in line
    assert pushes(result) == [f"push {REPOSITORY}:{NEW}"]
    assert deploys(result) == []


# The decision helper alone, on each recorded ECS state


def helper(*args):
    return subprocess.run(
        [sys.executable, str(HELPER), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def saved(tmp_path):
    """A directory laid out as the scripts save AWS answers, with both task definitions."""
    (tmp_path / "taskdefs").mkdir()
    for name in ("taskdef-old.json", "taskdef-new.json"):
        (tmp_path / "taskdefs" / name).write_text((RECORDED / name).read_text())

    def with_services(name):
        (tmp_path / "services.json").write_text((RECORDED / name).read_text())
        return tmp_path

    return with_services


@pytest.mark.parametrize(
    ("services", "code", "words"),
    [
        ("services-completed.json", 0, "is live: 2/2 tasks running"),
        ("services-in-progress.json", 3, "is IN_PROGRESS: 1/2 tasks running"),
        ("services-rolling-back.json", 1, "was rolled back by the circuit breaker/alarm"),
        ("services-rolled-back.json", 1, "wrong image"),
        ("services-failed-no-rollback.json", 1, "failed (circuit breaker/alarm, no rollback)"),
        ("services-missing.json", 1, "not found (MISSING)"),
    ],
)
def test_rollout_verdict_of_each_recorded_ecs_state(saved, services, code, words):
    result = helper("rollout", saved(services), f"{REPOSITORY}@{NEW_DIGEST}")
    assert result.returncode == code
    assert words in result.stdout


def test_rollout_of_the_previous_image_is_not_confused_with_the_new_one(saved):
    result = helper("rollout", saved("services-completed.json"), f"{REPOSITORY}@{OLD_DIGEST}")
    assert result.returncode == 1
    assert f"runs {REPOSITORY}@{NEW_DIGEST}, not {REPOSITORY}@{OLD_DIGEST}" in result.stdout


def test_the_task_definitions_to_fetch_are_those_of_every_deployment(saved):
    result = helper("taskdefs", saved("services-rolling-back.json"))
    assert result.stdout.split() == [TD_OLD, TD_NEW]


def test_timestamps_of_aws_cli_v1_and_v2_read_the_same():
    sys.path.insert(0, str(HELPER.parent))
    try:
        import deploy_state  # the helper is a script in scripts/, not an installed module
    finally:
        sys.path.pop(0)
    v1, v2 = 1764262800.0, "2025-11-27T17:00:00+00:00"
    assert deploy_state.when(v1) == deploy_state.when(v2) == "2025-11-27 17:00:00"
    assert deploy_state.sort_key(v1) == deploy_state.sort_key("2025-11-27T17:00:00Z")


# make stack-deploy: a failed first create, and a change set that would replace a stateful
# resource (moto's change sets carry no Replacement; AWS's do, as recorded here). The same paths
# on moto are in test_deploy.py (the rerun after a failed create, make plan).

GITHUB_IDS = {
    "GITHUB_REPOSITORY": "acme/cars-api",
    "GITHUB_REPOSITORY_ID": "4242",
    "GITHUB_OWNER_ID": "42",
}
MISSING = {
    "exit": 255,
    "stderr": "\nAn error occurred (ValidationError) when calling the DescribeStacks operation: "
    "Stack with id {} does not exist\n",
}
TAKEN = {
    "exit": 254,
    "stderr": "\nAn error occurred (InvalidInput) when calling the CreateServiceLinkedRole "
    "operation: Service role name AWSServiceRoleForECS has been taken in this account, please "
    "try a different suffix.\n",
}
CREATED = {
    "stdout": json.dumps({"Id": "arn:aws:cloudformation:eu-west-1:123456789012:changeSet/x/y"})
}


def missing(stack):
    return {**MISSING, "stderr": MISSING["stderr"].format(stack)}


def stack_deploy_plan(**changes):
    """The answers up to the base stack's change set; tests replace what their scenario changes."""
    plan = {
        "sts get-caller-identity": [{"stdout": '{"Account": "123456789012"}'}],
        "cloudformation describe-stacks cars-api-base": [recorded("stack-base.json")],
        "cloudformation describe-stacks cars-api-data": [recorded("stack-data.json")],
        "cloudformation describe-stacks cars-api-ci-access": [missing("cars-api-ci-access")],
        # The image of the one-off tasks, chosen before anything changes: none released yet.
        "cloudformation describe-stack-resources cars-api-base": [{"stdout": "cars-api\n"}],
        "ecr describe-repositories": [
            {"stdout": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/cars-api\n"}
        ],
        "cloudformation describe-stacks cars-api-service": [missing("cars-api-service")],
        "iam create-service-linked-role": [TAKEN],
        "cloudformation create-change-set": [CREATED],
        "cloudformation describe-change-set cars-api-base": [
            recorded("changeset-base-replace-repository.json")
        ],
        "cloudformation delete-change-set cars-api-base": [{"stdout": ""}],
        "cloudformation describe-stack-events cars-api-base": [
            recorded("events-create-failed.json")
        ],
    }
    plan.update(changes)
    return plan


def calls_of(result, command):
    return [call for call in result.calls if f" {command} " in f" {call} "]


# See before you change: a stateful replacement is refused unless ALLOW_REPLACE=true


def test_stack_deploy_refuses_a_change_set_that_replaces_the_repository(replay):
    result = replay("stack-deploy", stack_deploy_plan(), **GITHUB_IDS)
    assert result.returncode != 0, result.stderr
    assert last_error(result).startswith(
        "error: refused: this would REPLACE Repository (AWS::ECR::Repository) of cars-api-base"
    )
    assert "ALLOW_REPLACE=true" in last_error(result)
    assert "  Replace   Repository (AWS::ECR::Repository) cars-api  [RepositoryName]  STATEFUL" in (
        result.stdout
    )
    assert "  Modify    LoadBalancer" in result.stdout
    assert "  Add       RotationFailedRule (AWS::Events::Rule)" in result.stdout
    assert calls_of(result, "execute-change-set") == []
    assert len(calls_of(result, "delete-change-set")) == 1, "the refused change set is deleted"


def test_stack_deploy_with_allow_replace_executes_the_change_set(replay):
    plan = stack_deploy_plan(
        **{
            "cloudformation execute-change-set cars-api-base": [{"stdout": ""}],
            "cloudformation wait cars-api-base": [
                {"exit": 255, "stderr": "\nWaiter StackUpdateComplete failed: terminal state\n"}
            ],
        }
    )
    result = replay("stack-deploy ALLOW_REPLACE=true", plan, **GITHUB_IDS)
    assert len(calls_of(result, "execute-change-set")) == 1
    assert calls_of(result, "delete-change-set") == []
    assert last_error(result).startswith("error: stack cars-api-base was not deployed: ")


def test_stack_deploy_refuses_an_allow_replace_that_is_not_true_or_false(replay):
    result = replay("stack-deploy ALLOW_REPLACE=yes", stack_deploy_plan(), **GITHUB_IDS)
    assert result.returncode != 0
    assert "ALLOW_REPLACE must be true or false" in result.stderr
    assert result.calls == []


def decide(*args):
    return subprocess.run(
        [sys.executable, str(HELPER), *map(str, args)], capture_output=True, text=True, check=False
    )


def test_a_conditional_replacement_of_the_database_is_refused_too(tmp_path):
    page = recorded("changeset-data-conditional-database.json")
    (tmp_path / "cars-api-data.changes.1.json").write_text(
        (ROOT / "tests" / "aws" / page["file"]).read_text()
    )
    refused = decide("changes", tmp_path, "cars-api-data", "false", "UPDATE")
    assert refused.returncode == 4
    assert "  Replace?  Database (AWS::RDS::DBInstance) cars-api-data" in refused.stdout
    assert "[DBInstanceClass, StorageEncrypted]  STATEFUL" in refused.stdout
    assert "  Remove    CaBundleSecret (AWS::SecretsManager::Secret)" in refused.stdout
    assert "refused: this would REPLACE Database (AWS::RDS::DBInstance)" in refused.stdout
    allowed = decide("changes", tmp_path, "cars-api-data", "true", "UPDATE")
    assert allowed.returncode == 0
    assert "refused" not in allowed.stdout


def test_an_empty_change_set_is_no_change(tmp_path):
    (tmp_path / "cars-api-base.changes.1.json").write_text(
        (ROOT / "tests" / "aws" / "changeset-empty.json").read_text()
    )
    result = decide("changes", tmp_path, "cars-api-base", "false", "UPDATE")
    assert result.returncode == 5
    assert result.stdout.strip() == "cars-api-base: no changes"


# A fresh account: a failed first create is deleted and created again, or explained


def test_a_base_stack_left_rolled_back_by_a_failed_create_is_deleted_and_created_again(replay):
    plan = stack_deploy_plan(
        **{
            "cloudformation describe-stacks cars-api-base": [
                recorded("stack-base-rollback-complete.json"),
                recorded("stack-base-rollback-complete.json"),
                missing("cars-api-base"),
            ],
            "cloudformation describe-stacks cars-api-data": [missing("cars-api-data")],
            "cloudformation describe-stack-resources cars-api-base": [
                recorded("resources-base-rollback-complete.json")
            ],
            "cloudformation delete-stack cars-api-base": [{"stdout": ""}],
            "cloudformation wait cars-api-base": [{"stdout": ""}],
            # The run stops at the new change set: what matters is that it is a CREATE.
            "cloudformation create-change-set": [
                {"exit": 254, "stderr": "\nAn error occurred (Throttling): stop here\n"}
            ],
        }
    )
    result = replay("stack-deploy", plan, **GITHUB_IDS)
    assert "stack cars-api-base is ROLLBACK_COMPLETE from a failed first create" in result.stdout
    assert "deleting it and creating it again" in result.stdout
    assert (
        "kept by its DeletionPolicy (delete it if the create fails on its name): LogGroup "
        "(AWS::Logs::LogGroup) /ecs/cars-api"
    ) in result.stdout
    order = [
        word
        for call in result.calls
        for word in call.split()
        if word in ("delete-stack", "create-change-set")
    ]
    assert order == ["delete-stack", "create-change-set"]
    assert last_error(result).endswith("stop here")


def test_a_data_stack_whose_failed_create_left_the_database_says_exactly_what_to_do(replay):
    plan = stack_deploy_plan(
        **{
            "cloudformation describe-stacks cars-api-data": [
                recorded("stack-data-rollback-failed.json")
            ],
            "cloudformation describe-stack-events cars-api-data": [
                recorded("events-create-failed.json")
            ],
            "cloudformation describe-stack-resources cars-api-data": [
                recorded("resources-data-rollback-failed.json")
            ],
        }
    )
    result = replay("stack-deploy", plan, **GITHUB_IDS)
    assert result.returncode != 0
    error = last_error(result)
    assert error.startswith(
        "error: stack cars-api-data is ROLLBACK_FAILED from a failed first create and still holds "
        "Database (AWS::RDS::DBInstance) cars-api-data: nothing was changed."
    )
    assert (
        "aws rds modify-db-instance --db-instance-identifier cars-api-data --no-deletion-protection"
        " --apply-immediately && aws cloudformation delete-stack --stack-name cars-api-data, then "
        "make stack-deploy again"
    ) in error
    assert calls_of(result, "delete-stack") == []
    assert calls_of(result, "create-change-set") == []


@pytest.mark.parametrize("prefix", ["Staging", "1st", "a--b", "staging-", "x" * 21, "a_b"])
def test_stack_deploy_refuses_a_prefix_no_resource_name_could_take(replay, prefix):
    result = replay(f"stack-deploy STACK_PREFIX={prefix}", stack_deploy_plan(), **GITHUB_IDS)
    assert result.returncode != 0
    assert f"STACK_PREFIX '{prefix}' must be lowercase" in result.stderr
    assert result.calls == []
