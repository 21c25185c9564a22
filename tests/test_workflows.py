"""The CI/CD workflows keep their contract, and the deploy role trusts what they present.

Contract (docs/explanation/release-pipeline.md): tests on every pull request and push, and the one
build of the image, tested and saved as an artifact; on pushes to main that artifact is pushed
(`make push`), attested and deployed by digest (`make deploy`), building nothing, first in the
staging environment, then, once a reviewer approves, the same artifact in the production
environment (each environment has its own deploy role, whose ci-access stack trusts only tokens
issued to it); `make rollback` by hand, the input checked first; the SHA reaches make through env
only; releases and rollbacks queue apart; AWS through OIDC only where a job deploys; actions pinned
to commit SHAs.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from cfnlint.decode import decode

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
DATA_TEMPLATE = ROOT / "cloudformation" / "data.yaml"  # the database's stack
CI_ACCESS_TEMPLATE = ROOT / "cloudformation" / "ci-access.yaml"

OIDC_HOST = "token.actions.githubusercontent.com"
# Any owner/name and ids: the trust policy is read with these as its GitHub parameters.
REPOSITORY = "example-org/cars-api"
OWNER_ID = "1001"
REPOSITORY_ID = "2002"
SHA_RULE = "^[0-9a-f]{7,40}$"
CONFIGURE_AWS = "aws-actions/configure-aws-credentials"


def load_workflow(path: Path) -> dict:
    workflow = yaml.safe_load(path.read_text(encoding="utf-8"))
    # YAML 1.1 reads the bare key `on` as the boolean true.
    if True in workflow:
        workflow["on"] = workflow.pop(True)
    return workflow


@pytest.fixture(scope="module")
def workflows() -> dict[str, dict]:
    return {path.name: load_workflow(path) for path in sorted(WORKFLOWS.glob("*.yml"))}


@pytest.fixture(scope="module")
def ci(workflows: dict[str, dict]) -> dict:
    return workflows["ci.yml"]


@pytest.fixture(scope="module")
def rollback(workflows: dict[str, dict]) -> dict:
    return workflows["rollback.yml"]


@pytest.fixture(scope="module")
def data_template() -> dict:
    template, matches = decode(str(DATA_TEMPLATE))
    assert template is not None, [str(match) for match in matches]
    return template


@pytest.fixture(scope="module")
def ci_access_template() -> dict:
    """The stack that holds the OIDC trust and the deploy role."""
    template, matches = decode(str(CI_ACCESS_TEMPLATE))
    assert template is not None, [str(match) for match in matches]
    return template


def as_list(value: object) -> list:
    return value if isinstance(value, list) else [value]


def jobs(workflows: dict[str, dict]) -> list[tuple[str, str, dict]]:
    return [
        (name, job_id, job)
        for name, workflow in workflows.items()
        for job_id, job in workflow["jobs"].items()
    ]


def steps_using(job: dict, action: str) -> list[dict]:
    return [step for step in job.get("steps", []) if step.get("uses", "").startswith(f"{action}@")]


def step_running(job: dict, command: str) -> dict:
    """The one step of the job whose script runs the given command."""
    found = [step for step in job.get("steps", []) if command in step.get("run", "")]
    assert len(found) == 1, f"expected one step running {command!r}, found {len(found)}"
    return found[0]


def jobs_running(workflow: dict, command: str) -> list[dict]:
    return [
        job
        for job in workflow["jobs"].values()
        if any(command in step.get("run", "") for step in job.get("steps", []))
    ]


def deploying_jobs(workflows: dict[str, dict]) -> list[tuple[str, str, dict]]:
    return [entry for entry in jobs(workflows) if steps_using(entry[2], CONFIGURE_AWS)]


def environment_name(job: dict) -> str | None:
    environment = job.get("environment")
    return environment.get("name") if isinstance(environment, dict) else environment


def test_the_test_job_runs_make_test_on_every_pull_request_and_push(ci: dict) -> None:
    assert "pull_request" in ci["on"]
    assert "push" in ci["on"]
    [test_job] = jobs_running(ci, "make test")
    assert "if" not in test_job
    # make test is make lint followed by pytest: one command covers both, as on a laptop.
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^test: lint\b", makefile, re.MULTILINE)


def mysql_service(ci: dict) -> dict:
    [test_job] = jobs_running(ci, "make test")
    [mysql] = [s for s in test_job["services"].values() if s["image"].startswith("mysql:")]
    return mysql


def test_the_test_job_has_a_healthchecked_mysql_service_on_port_3306(ci: dict) -> None:
    mysql = mysql_service(ci)
    assert "3306:3306" in mysql["ports"]
    assert "--health-cmd" in mysql["options"]
    assert "mysqladmin ping" in mysql["options"]


def test_the_tests_run_on_the_mysql_version_production_runs(ci: dict, data_template: dict) -> None:
    [database] = [
        resource["Properties"]
        for resource in data_template["Resources"].values()
        if resource["Type"] == "AWS::RDS::DBInstance"
    ]
    assert database["Engine"] == "mysql"
    tag = mysql_service(ci)["image"].removeprefix("mysql:").split("@")[0]
    assert tag == database["EngineVersion"]


def test_the_test_job_also_tests_the_image_with_mysql(ci: dict) -> None:
    [test_job] = jobs_running(ci, "make test")
    assert [step for step in test_job["steps"] if step.get("run") == "make image-test"]


def test_every_job_uses_the_images_python_and_only_the_test_job_caches_pip(
    workflows: dict[str, dict], ci: dict
) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    # The default base is named in the Dockerfile's `upstream` stage (where Dependabot reads it).
    image_python = re.search(
        r"^FROM docker\.io/library/python:(\d+\.\d+)-\S+ AS upstream$", dockerfile, re.MULTILINE
    )
    assert image_python, "the Dockerfile names its default python image"
    for name, job_id, job in jobs(workflows):
        for setup in steps_using(job, "actions/setup-python"):
            assert setup["with"]["python-version"] == image_python[1], f"{name} {job_id}"
    [test_job] = jobs_running(ci, "make test")
    [setup] = steps_using(test_job, "actions/setup-python")
    assert setup["with"]["cache"] == "pip"
    assert "requirements.txt" in setup["with"]["cache-dependency-path"]


def test_the_ci_mysql_service_image_is_pinned_by_digest(ci: dict) -> None:
    assert re.fullmatch(r"mysql:[\d.]+@sha256:[0-9a-f]{64}", mysql_service(ci)["image"])


def step_index(job: dict, predicate) -> int:
    found = [i for i, step in enumerate(job["steps"]) if predicate(step)]
    assert len(found) == 1, f"expected one matching step, found {len(found)}"
    return found[0]


def runs(command: str):
    return lambda step: step.get("run", "").strip() == command


def uses(action: str):
    return lambda step: step.get("uses", "").startswith(f"{action}@")


def test_the_test_job_builds_tests_and_saves_one_image_as_an_artifact(ci: dict) -> None:
    [test_job] = jobs_running(ci, "make test")
    order = [
        step_index(test_job, runs("make test")),
        step_index(test_job, runs("make image")),
        step_index(test_job, runs("make image-test")),
        step_index(test_job, runs("make image-save")),
        step_index(test_job, uses("actions/upload-artifact")),
    ]
    assert order == sorted(order), "build, test, save, upload: in that order"
    for index in order[1:4]:
        assert test_job["steps"][index]["env"]["SHA"] == "${{ github.sha }}"
    save = test_job["steps"][order[3]]
    assert test_job["outputs"]["image-id"] == f"${{{{ steps.{save['id']}.outputs.image-id }}}}"
    [upload] = steps_using(test_job, "actions/upload-artifact")
    paths = upload["with"]["path"].split()
    assert {"dist/image.tar", "dist/sbom.cdx.json"} <= set(paths)
    assert upload["with"]["if-no-files-found"] == "error"


RELEASES = {"staging": "staging", "production": "production"}  # job id -> environment


def release_job(ci: dict, job_id: str) -> dict:
    assert len(jobs_running(ci, "make push")) == len(RELEASES), "one release job per environment"
    job = ci["jobs"][job_id]
    assert environment_name(job) == RELEASES[job_id]
    return job


@pytest.mark.parametrize("job_id", RELEASES)
def test_the_release_job_builds_nothing_and_pushes_the_tested_artifact(
    ci: dict, job_id: str
) -> None:
    job = release_job(ci, job_id)
    [test_job] = jobs_running(ci, "make test")
    [upload] = steps_using(test_job, "actions/upload-artifact")
    for step in job["steps"]:
        assert not re.search(r"make (image|release|test)\b", step.get("run", "")), step["run"]
    download = step_index(job, uses("actions/download-artifact"))
    push = step_index(job, runs("make push"))
    assert download < push
    fetched = job["steps"][download]["with"]
    assert fetched["name"] == upload["with"]["name"]
    env = job["steps"][push]["env"]
    assert env["IMAGE_ARCHIVE"] == f"{fetched['path']}/image.tar"
    # The ID travels as a job output, apart from the archive it checks.
    assert env["IMAGE_ID"] == "${{ needs.test.outputs.image-id }}"


@pytest.mark.parametrize("job_id", RELEASES)
def test_the_release_job_attests_the_pushed_digest_before_it_deploys(ci: dict, job_id: str) -> None:
    job = release_job(ci, job_id)
    push = step_index(job, runs("make push"))
    attest = step_index(job, uses("actions/attest-build-provenance"))
    deploy = step_index(job, runs("make deploy"))
    assert push < attest < deploy
    push_id = job["steps"][push]["id"]
    settings = job["steps"][attest]["with"]
    assert settings["subject-name"] == f"${{{{ steps.{push_id}.outputs.repository }}}}"
    assert settings["subject-digest"] == f"${{{{ steps.{push_id}.outputs.digest }}}}"
    # gh attestation verify in make deploy needs a token to read the attestation.
    assert job["steps"][deploy]["env"]["GH_TOKEN"] == "${{ github.token }}"  # noqa: S105 (an expression, not a secret)
    assert job["permissions"]["attestations"] == "write"
    assert job["permissions"]["id-token"] == "write"


def test_only_the_release_job_may_write_attestations(workflows: dict[str, dict]) -> None:
    for name, job_id, job in jobs(workflows):
        grant = (job.get("permissions") or {}).get("attestations")
        if steps_using(job, "actions/attest-build-provenance"):
            assert grant == "write", f"{name} {job_id}"
        elif (name, job_id) == ("rollback.yml", "rollback"):
            assert grant == "read", "the rollback verifies the attestation"
        else:
            assert grant is None, f"{name} {job_id}"


@pytest.mark.parametrize("job_id", RELEASES)
def test_the_release_job_pushes_and_deploys_the_pushed_commit_sha_from_env(
    ci: dict, job_id: str
) -> None:
    release = release_job(ci, job_id)
    for command in ("make push", "make deploy"):
        step = step_running(release, command)
        assert step["run"].strip() == command
        assert step["env"]["SHA"] == "${{ github.sha }}"
    for command in ("make push", "make deploy", "make status"):
        # The environment's own stacks: its STACK_PREFIX variable (empty: the default prefix).
        assert step_running(release, command)["env"]["STACK_PREFIX"] == "${{ vars.STACK_PREFIX }}"


def test_the_sha_never_reaches_make_as_a_command_line_variable(workflows: dict[str, dict]) -> None:
    for name, job_id, job in jobs(workflows):
        for step in job.get("steps", []):
            for line in step.get("run", "").splitlines():
                if re.match(r"\s*make\b", line):
                    assert re.fullmatch(r"\s*make [a-z][a-z-]*\s*", line), (
                        f"{name} {job_id}: {line}"
                    )


def test_make_passes_an_environment_sha_untouched_but_expands_a_command_line_one(
    tmp_path: Path,
) -> None:
    """What the Makefile's comment says: why the workflows set SHA through env only."""
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no aws: nothing deploys
    payload = f"$(shell touch {tmp_path}/expanded)"
    from_env = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "deploy"],
        env={**environment, "SHA": payload},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert from_env.returncode == 2
    assert "is not a commit SHA" in from_env.stderr
    assert not (tmp_path / "expanded").exists()
    from_command_line = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "deploy", f"SHA={payload}"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert from_command_line.returncode == 2
    assert (tmp_path / "expanded").exists(), "make expands command-line variables"


@pytest.mark.parametrize("job_id", RELEASES)
def test_the_release_job_runs_only_after_the_tests_on_pushes_to_main(ci: dict, job_id: str) -> None:
    release = release_job(ci, job_id)
    [test_job] = jobs_running(ci, "make test")
    test_id = next(job_id for job_id, job in ci["jobs"].items() if job is test_job)
    assert test_id in as_list(release["needs"])
    condition = re.sub(r"\s+", " ", release["if"])
    assert "github.event_name == 'push'" in condition
    assert "github.ref == 'refs/heads/main'" in condition
    assert " || " not in condition


def test_production_is_a_promotion_of_what_staging_took_from_the_same_run(ci: dict) -> None:
    staging, production = release_job(ci, "staging"), release_job(ci, "production")
    assert "staging" in as_list(production["needs"]), "production only after staging succeeded"
    assert "production" not in as_list(staging["needs"])
    for job in (staging, production):
        [download] = steps_using(job, "actions/download-artifact")
        assert download["with"]["name"] == "image", "the one tested archive of this run"
        assert step_running(job, "make push")["env"]["IMAGE_ID"] == (
            "${{ needs.test.outputs.image-id }}"
        )
    assert staging["concurrency"]["group"] != production["concurrency"]["group"]


@pytest.mark.parametrize("job_id", RELEASES)
def test_the_release_job_restores_no_cache(ci: dict, job_id: str) -> None:
    release = release_job(ci, job_id)
    assert not steps_using(release, "actions/cache")
    for setup in steps_using(release, "actions/setup-python"):
        assert not setup.get("with", {}).get("cache")


def test_rollback_is_manual_and_requires_a_sha(rollback: dict) -> None:
    assert set(rollback["on"]) == {"workflow_dispatch"}
    sha_input = rollback["on"]["workflow_dispatch"]["inputs"]["sha"]
    assert sha_input["required"] is True
    assert sha_input["type"] == "string"
    assert sha_input["description"]


def test_rollback_passes_the_sha_to_make_rollback_only_through_env(rollback: dict) -> None:
    [job] = jobs_running(rollback, "make rollback")
    step = step_running(job, "make rollback")
    assert step["run"].strip() == "make rollback"
    assert step["env"]["SHA"] == "${{ inputs.sha }}"
    assert step["env"]["GH_TOKEN"] == "${{ github.token }}"  # noqa: S105 (an expression, not a secret)
    assert step["env"]["STACK_PREFIX"] == "${{ vars.STACK_PREFIX }}"


def test_rollback_targets_production_unless_staging_is_chosen(rollback: dict) -> None:
    [job] = jobs_running(rollback, "make rollback")
    assert environments_of(rollback, job) == {"production", "staging"}
    choice = rollback["on"]["workflow_dispatch"]["inputs"]["environment"]
    assert choice["default"] == "production"


def test_the_scan_gate_override_of_a_rollback_is_an_explicit_input_off_by_default(
    rollback: dict,
) -> None:
    override = rollback["on"]["workflow_dispatch"]["inputs"]["allow-vulnerable"]
    assert override["type"] == "boolean"
    assert override["default"] is False
    assert "CRITICAL" in override["description"]
    [job] = jobs_running(rollback, "make rollback")
    env = step_running(job, "make rollback")["env"]
    assert env["ALLOW_VULNERABLE"] == "${{ inputs.allow-vulnerable }}"


def test_the_deploy_freeze_variable_stops_releases_and_never_rollbacks(
    ci: dict, rollback: dict
) -> None:
    for job_id in RELEASES:
        release = release_job(ci, job_id)
        for command in ("make push", "make deploy"):
            env = step_running(release, command)["env"]
            assert env["DEPLOY_FREEZE"] == "${{ vars.DEPLOY_FREEZE }}"
    [job] = jobs_running(rollback, "make rollback")
    assert "DEPLOY_FREEZE" not in step_running(job, "make rollback")["env"]


def test_no_expression_is_pasted_into_a_shell_script(workflows: dict[str, dict]) -> None:
    for name, job_id, job in jobs(workflows):
        for step in job.get("steps", []):
            assert "${{" not in step.get("run", ""), f"{name} {job_id}: expression in run"


def sha_check_script(rollback: dict) -> str:
    """The script of the step that checks the input before the rollback job may start."""
    [job] = jobs_running(rollback, "make rollback")
    checks = [
        step
        for job_id in as_list(job["needs"])
        for step in rollback["jobs"][job_id]["steps"]
        if SHA_RULE in step.get("run", "")
    ]
    assert len(checks) == 1, "one job before the rollback checks the sha"
    assert checks[0]["env"]["SHA"] == "${{ inputs.sha }}"
    return checks[0]["run"]


@pytest.mark.parametrize("sha", ["abc1234", "a1" * 20])
def test_the_rollback_sha_check_accepts_commit_shas(rollback: dict, sha: str) -> None:
    result = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", sha_check_script(rollback)],
        env={"PATH": os.environ["PATH"], "SHA": sha},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "sha",
    [
        "",
        "abc123",  # too short
        "a1" * 20 + "a",  # 41 characters
        "ABC1234",  # image tags are lowercase
        "abc1234 ",
        "abc1234\nabc1234",
        "main",
        "v1.2.3",
        "abc1234; touch injected",
        "$(touch injected)",
    ],
)
def test_the_rollback_sha_check_rejects_anything_else(
    rollback: dict, sha: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", sha_check_script(rollback)],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "SHA": sha},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode != 0
    assert "::error" in result.stdout
    assert not (tmp_path / "injected").exists()


def test_permissions_are_empty_at_the_top_and_granted_per_job(
    workflows: dict[str, dict],
) -> None:
    for name, workflow in workflows.items():
        assert workflow["permissions"] == {}, name
    for name, job_id, job in jobs(workflows):
        assert "permissions" in job, f"{name} {job_id} states its permissions"


def test_every_permission_grant_says_why_on_its_line() -> None:
    for path in WORKFLOWS.glob("*.yml"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.match(r"\s+[a-z-]+: (read|write)\b", line):
                assert re.search(r"\s#\s\S", line), f"{path.name}:{number} grant without a comment"


def test_only_the_deploying_jobs_may_request_an_oidc_token(workflows: dict[str, dict]) -> None:
    deploying = {(name, job_id) for name, job_id, _ in deploying_jobs(workflows)}
    assert deploying, "some job deploys"
    for name, job_id, job in jobs(workflows):
        grant = (job.get("permissions") or {}).get("id-token")
        if (name, job_id) in deploying:
            assert grant == "write", f"{name} {job_id} deploys without an OIDC token"
            assert environments_of(workflows[name], job) <= {"production", "staging"}
        else:
            assert grant is None, f"{name} {job_id} does not deploy, so needs no OIDC token"


def test_aws_access_is_oidc_only_with_the_role_and_region_from_repository_variables(
    workflows: dict[str, dict],
) -> None:
    for name, job_id, job in deploying_jobs(workflows):
        [configure] = steps_using(job, CONFIGURE_AWS)
        settings = configure["with"]
        assert settings["role-to-assume"] == "${{ vars.AWS_DEPLOY_ROLE_ARN }}", f"{name} {job_id}"
        assert settings["aws-region"] == "${{ vars.AWS_REGION }}", f"{name} {job_id}"
        assert not {"aws-access-key-id", "aws-secret-access-key"} & set(settings)
    for path in WORKFLOWS.glob("*.yml"):
        assert "secrets." not in path.read_text(encoding="utf-8"), f"{path.name} reads a secret"


def test_every_action_is_pinned_to_a_full_commit_sha_with_its_version() -> None:
    uses = 0
    for path in WORKFLOWS.glob("*.yml"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            found = re.search(r"\buses:\s*(\S+)(.*)$", line)
            if not found or found.group(1).startswith("./"):
                continue
            uses += 1
            where = f"{path.name}:{number}"
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", found.group(1)), where
            assert re.fullmatch(r"\s+#\s+v\d+\.\d+\.\d+", found.group(2)), f"{where}: # vX.Y.Z"
    assert uses


def test_checkout_never_persists_the_token(workflows: dict[str, dict]) -> None:
    for name, job_id, job in jobs(workflows):
        for step in steps_using(job, "actions/checkout"):
            assert step["with"]["persist-credentials"] is False, f"{name} {job_id}"


def test_a_release_can_never_replace_a_queued_rollback(workflows: dict[str, dict]) -> None:
    # GitHub keeps one pending job per concurrency group and cancels the older one: so releases
    # and rollbacks queue in separate fixed groups, and nothing in progress is cancelled.
    groups = {}
    for name, job_id, job in deploying_jobs(workflows):
        concurrency = job["concurrency"]
        assert concurrency["cancel-in-progress"] is False, f"{name} {job_id}"
        assert "${{" not in concurrency["group"], "a fixed group across runs"
        groups.setdefault(name, set()).add(concurrency["group"])
    assert set(groups) == {"ci.yml", "rollback.yml"}
    assert not groups["ci.yml"] & groups["rollback.yml"]
    # No workflow-level group in rollback.yml that a release could share or displace.
    assert "concurrency" not in workflows["rollback.yml"]


def test_a_workflow_level_group_never_cancels_a_run_on_main(ci: dict) -> None:
    concurrency = ci["concurrency"]
    assert concurrency["cancel-in-progress"] in (False, "${{ github.ref != 'refs/heads/main' }}")


def test_the_workflows_run_make_targets_and_no_deploy_tool_directly(
    workflows: dict[str, dict],
) -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.MULTILINE))
    deploying = {(name, job_id) for name, job_id, _ in deploying_jobs(workflows)}
    for name, job_id, job in jobs(workflows):
        for step in job.get("steps", []):
            script = step.get("run", "")
            assert not re.search(r"\b(aws|docker|podman|pip|python3?|pytest)\b", script), (
                f"{name} {job_id}: {script!r} belongs in a make target"
            )
            for target in re.findall(r"\bmake (?:--silent )?([a-z][a-z-]*)", script):
                assert target in targets, f"{name} {job_id}: make {target} is not a target"
        if (name, job_id) in deploying:
            # In a deploying job every step is a pinned action or a make call.
            for step in job["steps"]:
                assert "uses" in step or re.search(r"\bmake\b", step["run"]), f"{name} {job_id}"


@pytest.mark.parametrize("job_id", ["ci.yml staging", "ci.yml production", "rollback.yml rollback"])
def test_the_deploy_summary_comes_from_make_status(workflows: dict[str, dict], job_id: str) -> None:
    name, job_id = job_id.split()
    job = workflows[name]["jobs"][job_id]
    step = step_running(job, "make status")
    assert step["run"].strip() == "make status"
    assert step["id"] == "summary"
    assert job["environment"]["url"] == "${{ steps.summary.outputs.url }}"
    assert job["steps"][-1] is step, "the summary shows what serves after the deploy"


def resolve(value: object, parameters: dict[str, str]) -> str:
    """A string value of the template, with !Sub variables taken from parameters."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and list(value) == ["Fn::Sub"]:
        text, variables = value["Fn::Sub"], {}
        if isinstance(text, list):
            text, variables = text[0], {k: resolve(v, parameters) for k, v in text[1].items()}
        names = {**parameters, **variables}

        def substitute(match: re.Match) -> str:
            assert match.group(1) in names, f"unexpected ${{{match.group(1)}}} in {text!r}"
            return names[match.group(1)]

        return re.sub(r"\$\{([\w:.]+)\}", substitute, text)
    if isinstance(value, dict) and list(value) == ["Fn::Join"]:
        separator, parts = value["Fn::Join"]
        return separator.join(resolve(part, parameters) for part in parts)
    raise AssertionError(f"cannot read {value!r} as a string")


def deploy_role(template: dict) -> dict:
    """The role behind the DeployRoleArn output."""
    arn = template["Outputs"]["DeployRoleArn"]["Value"]
    assert list(arn) == ["Fn::GetAtt"], arn
    target = arn["Fn::GetAtt"]
    logical_id, attribute = target if isinstance(target, list) else target.split(".", 1)
    assert attribute == "Arn"
    role = template["Resources"][logical_id]
    assert role["Type"] == "AWS::IAM::Role"
    return role


def trusted_subjects(template: dict, environment: str = "production") -> tuple[set[str], set[str]]:
    """(subjects, audiences) the deploy role of one environment accepts from GitHub's OIDC."""
    assert "GitHubRepository" in template["Parameters"]
    document = deploy_role(template)["Properties"]["AssumeRolePolicyDocument"]
    statements = as_list(document["Statement"])
    assert len(statements) == 1, "the deploy role has one way in"
    [statement] = statements
    assert statement["Effect"] == "Allow"
    assert as_list(statement["Action"]) == ["sts:AssumeRoleWithWebIdentity"]
    assert set(statement["Principal"]) == {"Federated"}
    federated = json.dumps(statement["Principal"]["Federated"])
    provider_ids = [
        logical_id
        for logical_id, resource in template["Resources"].items()
        if resource["Type"] == "AWS::IAM::OIDCProvider"
        and OIDC_HOST in json.dumps(resource["Properties"]["Url"])
    ]
    assert f"oidc-provider/{OIDC_HOST}" in federated or any(
        f'"{logical_id}"' in federated for logical_id in provider_ids
    ), f"the deploy role must trust the GitHub OIDC provider, not {federated}"
    # Only exact matches: a StringLike wildcard would admit other branches or environments.
    assert set(statement["Condition"]) == {"StringEquals"}, statement["Condition"]
    claims = statement["Condition"]["StringEquals"]
    assert set(claims) == {f"{OIDC_HOST}:aud", f"{OIDC_HOST}:sub"}

    def values(claim: str) -> set[str]:
        raw = as_list(claims[f"{OIDC_HOST}:{claim}"])
        github = {
            "GitHubRepository": REPOSITORY,
            "GitHubOwnerId": OWNER_ID,
            "GitHubRepositoryId": REPOSITORY_ID,
            "GitHubEnvironment": environment,
        }
        return {resolve(value, github) for value in raw}

    return values("sub"), values("aud")


def presented_subjects(workflows: dict[str, dict]) -> set[str]:
    """The `sub` claim GitHub puts in the token of each job that may request one."""
    subjects = set()
    for name, _job_id, job in jobs(workflows):
        if (job.get("permissions") or {}).get("id-token") != "write":
            continue
        # The repository's customised subject claim (issue 10): ids, environment, ref and the
        # calling workflow; a job without an environment presents none and is never trusted.
        for environment in environments_of(workflows[name], job) or {""}:
            subjects.add(
                f"repository_owner_id:{OWNER_ID}:repository_id:{REPOSITORY_ID}"
                f":environment:{environment}:ref:refs/heads/main"
                f":job_workflow_ref:{REPOSITORY}/.github/workflows/{name}@refs/heads/main"
            )
    return subjects


def environments_of(workflow: dict, job: dict) -> set[str]:
    """The environments a job may run in: its name, or each option of the input that names it."""
    name = environment_name(job)
    if not name:
        return set()
    found = re.fullmatch(r"\$\{\{ inputs\.([\w-]+) \}\}", name)
    if not found:
        return {name}
    choice = workflow["on"]["workflow_dispatch"]["inputs"][found.group(1)]
    assert choice["type"] == "choice", "only a fixed list of environments"
    return set(choice["options"])


def test_the_deploy_role_trusts_every_subject_the_workflows_present(
    workflows: dict[str, dict], ci_access_template: dict
) -> None:
    subjects, audiences = set(), set()
    for environment in ("production", "staging"):  # one ci-access stack (deploy role) each
        found, heard = trusted_subjects(ci_access_template, environment)
        subjects |= found
        audiences |= heard
    assert audiences == {"sts.amazonaws.com"}
    presented = presented_subjects(workflows)
    assert presented
    assert presented == subjects, f"refused: {presented - subjects}; unused: {subjects - presented}"


@pytest.mark.parametrize("environment", ["production", "staging"])
def test_each_deploy_role_trusts_only_its_own_environment(
    ci_access_template: dict, environment: str
) -> None:
    subjects, _ = trusted_subjects(ci_access_template, environment)
    assert {s.split(":environment:")[1].split(":")[0] for s in subjects} == {environment}
    assert {s.split(":job_workflow_ref:")[1] for s in subjects} == {
        f"{REPOSITORY}/.github/workflows/{name}@refs/heads/main"
        for name in ("ci.yml", "rollback.yml")
    }


def test_the_ci_mysql_service_requires_tls_before_the_tests_run(ci: dict) -> None:
    [test_job] = jobs_running(ci, "make test")
    require = step_index(test_job, lambda s: "require_secure_transport" in s.get("run", ""))
    command = test_job["steps"][require]["run"]
    assert command.startswith("mysql --host=127.0.0.1 --port=3306 --user=root ")
    assert "3306:3306" in mysql_service(ci)["ports"]  # the service that port reaches
    assert "--execute='SET PERSIST require_secure_transport = ON'" in command
    assert require < step_index(test_job, lambda s: s.get("run") == "make test")
