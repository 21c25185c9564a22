"""The CI/CD workflows keep their contract, and the deploy role trusts what they present.

Contract (README "CI/CD"): tests on every pull request and push; `make release SHA=<github.sha>` on
pushes to main in the production environment; `make rollback SHA=<sha>` by hand, the input through
env and checked first; AWS through OIDC only where a job deploys; actions pinned to commit SHAs.
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
BASE_TEMPLATE = ROOT / "cloudformation" / "base.yaml"

OIDC_HOST = "token.actions.githubusercontent.com"
# Any owner/name: the trust policy is read with this as its GitHubRepository parameter.
REPOSITORY = "example-org/cars-api"
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
def base_template() -> dict:
    template, matches = decode(str(BASE_TEMPLATE))
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


def test_the_tests_run_on_the_mysql_version_production_runs(ci: dict, base_template: dict) -> None:
    [database] = [
        resource["Properties"]
        for resource in base_template["Resources"].values()
        if resource["Type"] == "AWS::RDS::DBInstance"
    ]
    assert database["Engine"] == "mysql"
    tag = mysql_service(ci)["image"].removeprefix("mysql:").split("@")[0]
    assert tag == database["EngineVersion"]


def test_the_test_job_also_tests_the_image_with_mysql(ci: dict) -> None:
    [test_job] = jobs_running(ci, "make test")
    assert [step for step in test_job["steps"] if step.get("run") == "make image-test"]


def test_the_test_job_uses_the_images_python_with_pip_caching(ci: dict) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    # The default base is named in the Dockerfile's `upstream` stage (where Dependabot reads it).
    image_python = re.search(r"^FROM python:(\d+\.\d+)-\S+ AS upstream$", dockerfile, re.MULTILINE)
    assert image_python, "the Dockerfile names its default python image"
    [test_job] = jobs_running(ci, "make test")
    [setup] = steps_using(test_job, "actions/setup-python")
    assert setup["with"]["python-version"] == image_python.group(1)
    assert setup["with"]["cache"] == "pip"
    assert "requirements.txt" in setup["with"]["cache-dependency-path"]


def test_the_release_job_runs_make_release_with_the_pushed_commit_sha(ci: dict) -> None:
    [release] = jobs_running(ci, "make release")
    step = step_running(release, "make release")
    assert step["run"].strip() == 'make release SHA="$SHA"'
    assert step["env"]["SHA"] == "${{ github.sha }}"


def test_the_release_job_runs_only_after_the_tests_on_pushes_to_main(ci: dict) -> None:
    [release] = jobs_running(ci, "make release")
    [test_job] = jobs_running(ci, "make test")
    test_id = next(job_id for job_id, job in ci["jobs"].items() if job is test_job)
    assert test_id in as_list(release["needs"])
    condition = re.sub(r"\s+", " ", release["if"])
    assert "github.event_name == 'push'" in condition
    assert "github.ref == 'refs/heads/main'" in condition
    assert " || " not in condition
    assert environment_name(release) == "production"


def test_the_release_job_restores_no_cache(ci: dict) -> None:
    [release] = jobs_running(ci, "make release")
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
    assert step["run"].strip() == 'make rollback SHA="$SHA"'
    assert step["env"]["SHA"] == "${{ inputs.sha }}"
    assert environment_name(job) == "production"


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
            assert environment_name(job) == "production", f"{name} {job_id}"
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


def test_deploys_share_one_concurrency_group_that_never_cancels_in_progress(
    workflows: dict[str, dict],
) -> None:
    groups = set()
    for name, job_id, job in deploying_jobs(workflows):
        concurrency = job["concurrency"]
        assert concurrency["cancel-in-progress"] is False, f"{name} {job_id}"
        assert "${{" not in concurrency["group"], "one fixed group across runs and workflows"
        groups.add(concurrency["group"])
    assert len(groups) == 1
    assert {name for name, _, _ in deploying_jobs(workflows)} == {"ci.yml", "rollback.yml"}


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


@pytest.mark.parametrize("workflow", ["ci.yml", "rollback.yml"])
def test_the_deploy_summary_comes_from_make_status(
    workflows: dict[str, dict], workflow: str
) -> None:
    [(_, _, job)] = [entry for entry in deploying_jobs(workflows) if entry[0] == workflow]
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


def trusted_subjects(template: dict) -> tuple[set[str], set[str]]:
    """(subjects, audiences) the deploy role accepts from the GitHub OIDC provider."""
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
        return {resolve(value, {"GitHubRepository": REPOSITORY}) for value in raw}

    return values("sub"), values("aud")


def presented_subjects(workflows: dict[str, dict]) -> set[str]:
    """The `sub` claim GitHub puts in the token of each job that may request one."""
    subjects = set()
    for name, job_id, job in jobs(workflows):
        if (job.get("permissions") or {}).get("id-token") != "write":
            continue
        environment = environment_name(job)
        if environment:
            subjects.add(f"repo:{REPOSITORY}:environment:{environment}")
        else:
            assert "github.ref == 'refs/heads/main'" in job.get("if", ""), f"{name} {job_id}"
            subjects.add(f"repo:{REPOSITORY}:ref:refs/heads/main")
    return subjects


def test_the_deploy_role_trusts_every_subject_the_workflows_present(
    workflows: dict[str, dict], base_template: dict
) -> None:
    subjects, audiences = trusted_subjects(base_template)
    assert audiences == {"sts.amazonaws.com"}
    presented = presented_subjects(workflows)
    assert presented
    assert presented == subjects, f"refused: {presented - subjects}; unused: {subjects - presented}"


def test_the_deploy_role_trusts_only_the_production_environment(base_template: dict) -> None:
    subjects, _ = trusted_subjects(base_template)
    assert subjects == {f"repo:{REPOSITORY}:environment:production"}
