"""Release verification over recorded AWS responses: completed, rolled back, stuck, wrong image.

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
from conftest import ROOT

RECORDED = ROOT / "tests" / "aws"
HELPER = ROOT / "scripts" / "deploy_state.py"
REPOSITORY = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/cars-api-base-repository-7kq2xv9lmd3a"
NEW = "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0"
OLD = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a"
TD_OLD = "arn:aws:ecs:eu-west-1:123456789012:task-definition/cars-api-service:4"
TD_NEW = "arn:aws:ecs:eu-west-1:123456789012:task-definition/cars-api-service:5"

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

CFN_FAILED = {
    "exit": 255,
    "stdout": "\nWaiting for changeset to be created..\n"
    "Waiting for stack create/update to complete\n",
    "stderr": "\nFailed to create/update the stack. Run the following command\nto fetch the list"
    " of events leading up to the failure\naws cloudformation describe-stack-events"
    " --stack-name cars-api-service\n",
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
        "cloudformation describe-stacks cars-api-service": [recorded(f) for f in service_stack],
        "cloudformation deploy cars-api-service": [deploy or CFN_OK],
        "cloudformation describe-stack-events cars-api-service": [
            recorded("events-circuit-breaker.json")
        ],
        "ecs describe-services": [recorded(f) for f in services],
        f"ecs describe-task-definition {TD_OLD}": [recorded("taskdef-old.json")],
        f"ecs describe-task-definition {TD_NEW}": [recorded("taskdef-new.json")],
    }


@pytest.fixture
def replay(tmp_path, ready_server):
    """Run a make target with `aws` answering from a plan of recorded responses."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    aws = bin_dir / "aws"
    aws.write_text(f"#!{sys.executable}\n{REPLAY}")
    aws.chmod(0o755)

    def run(target, plan, **env):
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        (tmp_path / "calls.log").write_text("")
        for counter in tmp_path.glob("count-*"):
            counter.unlink()
        environment = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "REPLAY_DIR": str(tmp_path),
            "SERVICE_URL": f"http://127.0.0.1:{ready_server.server_port}",
            "POLL_SECONDS": "0",
            "READY_INTERVAL": "0",
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
        return result

    return run


def last_error(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines, result.stderr
    return lines[-1]


def deploys(result):
    return [call for call in result.calls if " cloudformation deploy " in f" {call} "]


# make deploy / rollback, end to end over recorded responses


def test_deploy_that_completes_with_the_exact_image_and_ready_200_succeeds(replay):
    plan = base_plan(
        ["stack-service.json"], ["services-in-progress.json", "services-completed.json"]
    )
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode == 0, result.stderr
    assert f"{REPOSITORY}:{NEW} is live: 2/2 tasks running" in result.stdout
    assert "/ready answered 200" in result.stdout
    assert len(deploys(result)) == 1
    assert f"ImageTag={NEW}" in deploys(result)[0]


def test_deploy_rolled_back_by_cloudformation_names_the_cause_and_what_serves(replay):
    plan = base_plan(
        ["stack-service.json", "stack-service-update-rollback-complete.json"],
        ["services-rolled-back.json"],
        deploy=CFN_FAILED,
    )
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode != 0
    line = last_error(result)
    assert line.startswith(f"error: deploy of {REPOSITORY}:{NEW} failed: ")
    assert "stack cars-api-service is UPDATE_ROLLBACK_COMPLETE" in line
    assert "ECS Deployment Circuit Breaker was triggered" in line
    assert "an older failure" not in line
    assert line.endswith(f"now serving cars-api-base-repository-7kq2xv9lmd3a:{OLD} (2 tasks)")


def test_deploy_rolled_back_by_the_circuit_breaker_after_cloudformation_is_a_failure(replay):
    plan = base_plan(["stack-service.json"], ["services-rolling-back.json"])
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode != 0
    line = last_error(result)
    assert "was rolled back by the circuit breaker/alarm" in line
    assert "tasks failed to start" in line
    assert line.endswith(f"now serving cars-api-base-repository-7kq2xv9lmd3a:{OLD} (1 task)")


def test_deploy_whose_service_runs_another_image_is_a_failure(replay):
    plan = base_plan(["stack-service.json"], ["services-rolled-back.json"])
    result = replay(f"deploy SHA={NEW}", plan)
    assert result.returncode != 0
    line = last_error(result)
    assert (
        f"wrong image: the primary deployment runs {REPOSITORY}:{OLD}, not {REPOSITORY}:{NEW}"
        in line
    )
    assert "rolling back to deployment" in line


def test_deploy_that_never_completes_is_reported_stuck(replay):
    plan = base_plan(["stack-service.json"], ["services-in-progress.json"])
    result = replay(f"deploy SHA={NEW}", plan, ROLLOUT_TIMEOUT="0")
    assert result.returncode != 0
    line = last_error(result)
    assert line.startswith("error: stuck: rollout of ")
    assert "IN_PROGRESS: 1/2 tasks running" in line
    assert f"now serving cars-api-base-repository-7kq2xv9lmd3a:{NEW} (1 task)" in line


def test_deploy_whose_ready_check_fails_is_a_failure(replay, ready_server):
    ready_server.ready_status = 503
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    result = replay(f"deploy SHA={NEW}", plan, READY_TRIES="2")
    assert result.returncode != 0
    line = last_error(result)
    assert "/ready answered 503 2 times in a row" in line
    assert f"ECS runs cars-api-base-repository-7kq2xv9lmd3a:{NEW} (2 tasks)" in line


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
    assert f"Deploying {REPOSITORY}:{OLD}" in result.stdout
    assert f"ImageTag={OLD}" in deploys(result)[0]


def test_history_lists_images_newest_first_and_marks_the_live_one(replay):
    result = replay("history", base_plan(["stack-service.json"], ["services-completed.json"]))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line[:4] in ("2025", "2026")]
    assert [row.split()[2] for row in rows[:2]] == [NEW, OLD]
    assert rows[0].endswith("live")
    assert not any(row.endswith("live") for row in rows[1:])
    assert "HIGH=1 MEDIUM=2" in rows[0]


def test_status_shows_the_live_image_counts_deployments_and_url(replay, ready_server):
    result = replay("status", base_plan(["stack-service.json"], ["services-rolling-back.json"]))
    assert result.returncode == 0, result.stderr
    assert f"live image   {REPOSITORY}:{OLD}" in result.stdout
    assert "tasks        1 running / 2 desired" in result.stdout
    assert "ECS deployment circuit breaker: tasks failed to start." in result.stdout
    assert f"url          http://127.0.0.1:{ready_server.server_port}" in result.stdout


def test_status_in_github_actions_writes_the_job_summary_and_url(replay, ready_server, tmp_path):
    summary, outputs = tmp_path / "summary.md", tmp_path / "outputs"
    plan = base_plan(["stack-service.json"], ["services-completed.json"])
    result = replay("status", plan, GITHUB_STEP_SUMMARY=str(summary), GITHUB_OUTPUT=str(outputs))
    assert result.returncode == 0, result.stderr
    url = f"http://127.0.0.1:{ready_server.server_port}"
    shown = summary.read_text()
    assert f"- Commit: `{NEW}`" in shown
    assert f"- Image: `{REPOSITORY}:{NEW}`" in shown
    assert f"- Service: {url}" in shown
    assert outputs.read_text().splitlines() == [f"url={url}"]


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
    result = helper("rollout", saved(services), f"{REPOSITORY}:{NEW}")
    assert result.returncode == code
    assert words in result.stdout


def test_rollout_of_the_previous_image_is_not_confused_with_the_new_one(saved):
    result = helper("rollout", saved("services-completed.json"), f"{REPOSITORY}:{OLD}")
    assert result.returncode == 1
    assert f"runs {REPOSITORY}:{NEW}, not {REPOSITORY}:{OLD}" in result.stdout


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
