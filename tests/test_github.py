"""make github-setup / github-check: the GitHub settings the deploy role's trust relies on, as code.

gh is replaced by tests/github/fake_gh.py, first on PATH: it replays GitHub's recorded answers
(tests/github/*.json, in the shapes of the GitHub REST API) and logs every call, so the tests see
the exact requests the real scripts make. What only a real repository shows is in
docs/explanation/testing.md.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

RECORDED = ROOT / "tests" / "github"
SCRIPT = ROOT / "scripts" / "github_settings.py"
REPO = "octo-org/cars-api"
REVIEWERS = "alice,team:octo-org/release-approvers"
REPO_PATH = f"repos/{REPO}"
SUB = f"{REPO_PATH}/actions/oidc/customization/sub"
ENV = f"{REPO_PATH}/environments/production"
RULES = f"{ENV}/deployment-branch-policies"
RULES_LIST = f"{RULES}?per_page=100"
USER = "users/alice"
TEAM = "orgs/octo-org/teams/release-approvers"
CLAIM_KEYS = ["repository_owner_id", "repository_id", "environment", "ref", "job_workflow_ref"]
SUB_BODY = {"use_default": False, "include_claim_keys": CLAIM_KEYS}
ENV_BODY = {
    "prevent_self_review": True,
    "reviewers": [{"type": "User", "id": 5823001}, {"type": "Team", "id": 9102233}],
    "deployment_branch_policy": {"protected_branches": False, "custom_branch_policies": True},
    "can_admins_bypass": False,
}
RULESETS_LIST = f"{REPO_PATH}/rulesets?includes_parents=false&per_page=100"
RULESET = f"{REPO_PATH}/rulesets/5123456"
RULESET_BODY = {
    "name": "protect main",
    "target": "branch",
    "enforcement": "active",
    "bypass_actors": [],
    "conditions": {"ref_name": {"include": ["refs/heads/main"], "exclude": []}},
    "rules": [
        {"type": "deletion"},
        {"type": "non_fast_forward"},
        {
            "type": "pull_request",
            "parameters": {
                "required_approving_review_count": 1,
                "dismiss_stale_reviews_on_push": True,
                "require_code_owner_review": False,
                "require_last_push_approval": True,
                "required_review_thread_resolution": False,
            },
        },
        {
            "type": "required_status_checks",
            "parameters": {
                "strict_required_status_checks_policy": True,
                "required_status_checks": [{"context": "lint, test and image test"}],
            },
        },
    ],
}
READ_BACK = [
    ("GET", SUB, None),
    ("GET", ENV, None),
    ("GET", RULES_LIST, None),
    ("GET", RULESETS_LIST, None),
    ("GET", RULESET, None),
]
SUBJECT = (
    "repository_owner_id:81234567:repository_id:712345678:environment:production"
    ":ref:refs/heads/main:job_workflow_ref:octo-org/cars-api/.github/workflows/{}@refs/heads/main"
)
# Each recorded drift, the line check must print for it, and the one write setup repairs it with.
DRIFTS = {
    "self-review-allowed": ("self-review is allowed", ("PUT", ENV, ENV_BODY)),
    "admin-bypass-on": ("administrators can bypass", ("PUT", ENV, ENV_BODY)),
    "no-reviewers": ("no required reviewers", ("PUT", ENV, ENV_BODY)),
    "any-branch": ("any branch may deploy", ("PUT", ENV, ENV_BODY)),
    "extra-branch-rule": (
        "extra deployment rule branch 'release/*'",
        ("DELETE", f"{RULES}/31000002", None),
    ),
    "default-sub-claim": ("GitHub's default subject", ("PUT", SUB, SUB_BODY)),
    "ruleset-force-push": (
        "ruleset 'protect main': force pushes to main are allowed",
        ("PUT", RULESET, RULESET_BODY),
    ),
}


class FakeGitHub:
    """A PATH whose gh is the recorder, the recordings it replays and the calls it got."""

    def __init__(self, tmp_path):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        gh = bin_dir / "gh"
        gh.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{RECORDED / "fake_gh.py"}" "$@"\n')
        gh.chmod(0o755)
        self.recordings = tmp_path / "recordings.json"
        self.log = tmp_path / "calls.jsonl"
        # GitHub Actions sets GITHUB_REPOSITORY: the tests decide it themselves.
        env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_REPOSITORY", "REVIEWERS")}
        env.update(
            {
                "PATH": f"{bin_dir}:{os.environ['PATH']}",
                "FAKE_GH_RECORDINGS": str(self.recordings),
                "FAKE_GH_CALLS": str(self.log),
                # No git repository with an origin remote unless a test makes one.
                "GIT_DIR": str(tmp_path / "no-git"),
            }
        )
        self.env = env

    def answers(self, *states):
        """Replay the shared answers, a compliant repository, then each state's answers on top."""
        merged = {}
        for state in ("repository", "compliant", *states):
            merged.update(json.loads((RECORDED / f"{state}.json").read_text()))
        self.recordings.write_text(json.dumps(merged))

    def override(self, key, status, body):
        """Answer key with one recorded answer from now on."""
        merged = json.loads(self.recordings.read_text())
        merged[key] = {"status": status, "body": body}
        self.recordings.write_text(json.dumps(merged))

    def calls(self):
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        return [(c["method"], c["path"], c["body"]) for c in map(json.loads, lines)]

    def writes(self):
        return [call for call in self.calls() if call[0] != "GET"]

    def headers(self):
        return [json.loads(line)["headers"] for line in self.log.read_text().splitlines()]


@pytest.fixture
def github(tmp_path):
    return FakeGitHub(tmp_path)


def script(command, env, stdin="", **settings):
    """Run scripts/github_settings.py <command> with settings in its environment, as make does."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), command],
        env=env | settings,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def make(target, env, **variables):
    """Run `make <target>` as a user would; variables go on the command line."""
    args = [f"{key}={value}" for key, value in variables.items()]
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), target, f"PYTHON={sys.executable}", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def setup(github, **settings):
    return script(
        "setup", github.env, **{"GITHUB_REPOSITORY": REPO, "REVIEWERS": REVIEWERS} | settings
    )


def check(github, **settings):
    return script("check", github.env, **{"GITHUB_REPOSITORY": REPO} | settings)


def drift_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("drift: ")]


# setup


def test_setup_of_a_new_repository_makes_exactly_these_requests(github):
    github.answers("fresh")
    result = setup(github)
    assert result.returncode == 0, result.stderr
    assert github.calls() == [
        ("GET", REPO_PATH, None),
        ("GET", USER, None),
        ("GET", TEAM, None),
        ("GET", SUB, None),
        ("PUT", SUB, SUB_BODY),
        ("GET", ENV, None),
        ("PUT", ENV, ENV_BODY),
        ("GET", RULES_LIST, None),
        ("POST", RULES, {"name": "main", "type": "branch"}),
        ("GET", RULESETS_LIST, None),
        ("POST", f"{REPO_PATH}/rulesets", RULESET_BODY),
        *READ_BACK,
    ]
    assert all("X-GitHub-Api-Version: 2022-11-28" in sent for sent in github.headers())


def test_setup_prints_the_ids_and_subjects_stack_deploy_needs(github):
    github.answers("fresh")
    result = setup(github)
    assert result.returncode == 0, result.stderr
    assert (
        "GITHUB_REPOSITORY=octo-org/cars-api GITHUB_REPOSITORY_ID=712345678"
        " GITHUB_OWNER_ID=81234567" in result.stdout
    )
    for workflow in ("ci.yml", "rollback.yml"):
        assert SUBJECT.format(workflow) in result.stdout


def test_setup_run_again_changes_nothing(github):
    github.answers("fresh")
    first = setup(github)
    assert first.returncode == 0, first.stderr
    done = len(github.calls())
    second = setup(github)
    assert second.returncode == 0, second.stderr
    again = github.calls()[done:]
    assert [call for call in again if call[0] != "GET"] == []
    assert "nothing to change" in second.stdout


def test_setup_on_a_compliant_repository_only_reads(github):
    github.answers()
    result = setup(github)
    assert result.returncode == 0, result.stderr
    assert github.writes() == []


@pytest.mark.parametrize("state", DRIFTS)
def test_setup_repairs_each_drift_with_only_the_write_it_needs(github, state):
    github.answers(state)
    result = setup(github)
    assert result.returncode == 0, result.stderr
    assert github.writes() == [DRIFTS[state][1]]


def test_setup_replaces_reviewers_that_differ_from_the_setting(github):
    github.answers()
    result = setup(github, REVIEWERS="alice")
    assert result.returncode == 0, result.stderr
    assert github.writes() == [
        ("PUT", ENV, ENV_BODY | {"reviewers": [{"type": "User", "id": 5823001}]})
    ]


@pytest.mark.parametrize(
    ("reviewers", "message"),
    [
        ("", "REVIEWERS is required"),
        (" , ", "REVIEWERS is required"),
        ("alice,bad login!", "'bad login!' is not a GitHub login or team:<org>/<slug>"),
        ("team:other-org/approvers", "team other-org/approvers is not in octo-org"),
        (",".join(f"user{i}" for i in range(7)), "at most 6 reviewers"),
    ],
)
def test_setup_refuses_bad_reviewers_before_any_github_call(github, reviewers, message):
    github.answers()
    result = setup(github, REVIEWERS=reviewers)
    assert result.returncode == 2
    assert message in result.stderr
    assert "usage: make github-setup" in result.stderr
    assert github.calls() == []


def test_setup_stops_on_an_unknown_reviewer_before_any_write(github):
    github.answers()
    result = setup(github, REVIEWERS="alice,nobody-here")
    assert result.returncode == 1
    assert "reviewer nobody-here: no such GitHub user" in result.stderr
    assert github.writes() == []


def test_setup_stops_at_the_first_refused_write_with_what_github_said(github):
    github.answers("fresh")
    github.override(f"PUT {ENV}", 403, {"message": "Must have admin rights to Repository."})
    result = setup(github)
    assert result.returncode == 1
    assert "Must have admin rights to Repository. (HTTP 403)" in result.stderr
    assert github.writes() == [("PUT", SUB, SUB_BODY), ("PUT", ENV, ENV_BODY)]


def test_setup_fails_when_github_does_not_keep_what_it_wrote(github):
    github.answers("no-reviewers")
    # GitHub accepts the PUT but the environment still has no reviewers (as on a plan without them).
    no_reviewers = json.loads((RECORDED / "no-reviewers.json").read_text())[f"GET {ENV}"][0]
    github.override(f"GET {ENV}", no_reviewers["status"], no_reviewers["body"])
    result = setup(github)
    assert result.returncode == 1
    assert drift_lines(result) == ["drift: environment production: no required reviewers"]


# check


def test_check_passes_on_a_compliant_repository_and_only_reads(github):
    github.answers()
    result = check(github)
    assert result.returncode == 0, result.stderr
    assert "ok: " in result.stdout
    assert github.calls() == [("GET", REPO_PATH, None), *READ_BACK]


@pytest.mark.parametrize("state", DRIFTS)
def test_check_fails_naming_each_drift(github, state):
    github.answers(state)
    result = check(github)
    assert result.returncode == 1
    lines = drift_lines(result)
    assert len(lines) == 1, result.stderr
    assert DRIFTS[state][0] in lines[0]
    assert github.writes() == []


def test_check_names_every_drift_of_a_new_repository(github):
    github.answers("fresh")
    result = check(github)
    assert result.returncode == 1
    assert drift_lines(result) == [
        "drift: OIDC subject claim: GitHub's default subject (repo:<owner/name>:...);"
        " want the keys " + ", ".join(CLAIM_KEYS),
        "drift: environment production does not exist",
        "drift: ruleset 'protect main' does not exist: anyone who can push may force-push or "
        "delete main",
    ]
    assert "make github-setup" in result.stderr


def test_check_reports_a_sub_claim_with_keys_in_another_order(github):
    github.answers()
    github.override(
        f"GET {SUB}", 200, {"use_default": False, "include_claim_keys": CLAIM_KEYS[::-1]}
    )
    result = check(github)
    assert result.returncode == 1
    assert drift_lines(result) == [
        "drift: OIDC subject claim: keys "
        + ", ".join(CLAIM_KEYS[::-1])
        + " (want "
        + ", ".join(CLAIM_KEYS)
        + ", in this order)"
    ]


def test_check_reports_deployments_from_any_protected_branch(github):
    github.answers()
    environment = json.loads((RECORDED / "compliant.json").read_text())[f"GET {ENV}"]["body"]
    protected = {"protected_branches": True, "custom_branch_policies": False}
    github.override(f"GET {ENV}", 200, environment | {"deployment_branch_policy": protected})
    result = check(github)
    assert result.returncode == 1
    assert drift_lines(result) == [
        "drift: environment production: any protected branch may deploy"
        " (want selected branches: only main)"
    ]
    assert github.calls() == [
        ("GET", REPO_PATH, None),
        ("GET", SUB, None),
        ("GET", ENV, None),
        ("GET", RULESETS_LIST, None),
        ("GET", RULESET, None),
    ]


# GITHUB_REPOSITORY and gh


@pytest.mark.parametrize("command", ["setup", "check"])
def test_missing_github_repository_without_origin_is_a_usage_error(github, command):
    github.answers()
    result = script(command, github.env, REVIEWERS=REVIEWERS)
    assert result.returncode == 2
    assert "GITHUB_REPOSITORY is not set and there is no git remote 'origin'" in result.stderr
    assert "usage: make github-setup" in result.stderr
    assert github.calls() == []


def test_malformed_github_repository_is_a_usage_error(github):
    github.answers()
    result = check(github, GITHUB_REPOSITORY="octo-org")
    assert result.returncode == 2
    assert "GITHUB_REPOSITORY 'octo-org' is not owner/name" in result.stderr
    assert github.calls() == []


@pytest.fixture(
    params=[
        "git@github.com:octo-org/cars-api.git",
        "https://github.com/octo-org/cars-api",
        "ssh://git@github.com/octo-org/cars-api.git/",
    ]
)
def origin(github, tmp_path, request):
    """A git repository whose origin remote is the recorded repository, as SSH or HTTPS URL."""
    subprocess.run(["git", "init", "-q", str(tmp_path / "clone")], check=True)
    git_dir = tmp_path / "clone" / ".git"
    remote = request.param
    subprocess.run(
        ["git", "--git-dir", str(git_dir), "remote", "add", "origin", remote], check=True
    )
    github.env["GIT_DIR"] = str(git_dir)
    github.answers()
    return github


@pytest.mark.parametrize("answer", ["", "y\n", "octo-org/other\n", "octo-org/cars-api.git\n"])
def test_repository_from_origin_is_refused_unless_typed_back(origin, answer):
    result = script("check", origin.env, stdin=answer)
    assert result.returncode == 2
    assert (
        "the origin remote names octo-org/cars-api. Type octo-org/cars-api to use it"
        in result.stderr
    )
    assert "set GITHUB_REPOSITORY=owner/name" in result.stderr
    assert origin.calls() == []


def test_repository_from_origin_is_used_when_typed_back(origin):
    result = script("check", origin.env, stdin="octo-org/cars-api\n")
    assert result.returncode == 0, result.stderr
    assert origin.calls()[0] == ("GET", REPO_PATH, None)


def test_missing_gh_is_named(github, tmp_path):
    # Nothing but git on PATH: a CI runner has a real gh, which must not be called.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "git").symlink_to(shutil.which("git"))
    github.env["PATH"] = str(bare)
    result = check(github)
    assert result.returncode == 1
    assert "gh (the GitHub CLI) is not installed" in result.stderr


def test_unknown_repository_is_named(github):
    github.answers()
    github.override(f"GET {REPO_PATH}", 404, {"message": "Not Found", "status": "404"})
    result = check(github)
    assert result.returncode == 1
    assert "repository octo-org/cars-api not found" in result.stderr
    assert github.calls() == [("GET", REPO_PATH, None)]


# The make targets


def test_make_github_setup_then_github_check_pass_on_a_new_repository(github):
    github.answers("fresh")
    setup_run = make("github-setup", github.env, GITHUB_REPOSITORY=REPO, REVIEWERS=REVIEWERS)
    assert setup_run.returncode == 0, setup_run.stderr
    assert len(github.writes()) == 4, "sub claim, environment, its branch rule, the ruleset"
    check_run = make("github-check", github.env, GITHUB_REPOSITORY=REPO)
    assert check_run.returncode == 0, check_run.stderr
    assert len(github.writes()) == 4


def test_make_github_setup_without_reviewers_prints_usage(github):
    github.answers()
    result = make("github-setup", github.env, GITHUB_REPOSITORY=REPO)
    assert result.returncode == 2
    assert "REVIEWERS is required" in result.stderr
    assert "usage: make github-setup REVIEWERS=" in result.stderr
    assert github.calls() == []


def test_make_github_check_fails_on_drift(github):
    github.answers("admin-bypass-on")
    result = make("github-check", github.env, GITHUB_REPOSITORY=REPO)
    assert result.returncode != 0
    assert len(drift_lines(result)) == 1


# the ruleset that protects main


def test_check_names_a_ruleset_that_only_evaluates_and_can_be_bypassed(github):
    github.answers("ruleset-evaluate-bypass")
    result = check(github)
    assert result.returncode == 1
    assert drift_lines(result) == [
        "drift: ruleset 'protect main' is evaluate (want active)",
        "drift: ruleset 'protect main': someone may bypass it (want no bypass actors)",
    ]
    assert github.writes() == []


def test_setup_puts_back_an_enforced_ruleset_without_bypass(github):
    github.answers("ruleset-evaluate-bypass")
    result = setup(github)
    assert result.returncode == 0, result.stderr
    assert github.writes() == [("PUT", RULESET, RULESET_BODY)]
    assert "set: ruleset 'protect main'" in result.stdout


def test_the_required_check_is_the_name_of_the_ci_test_job():
    ci = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    (check_name,) = RULESET_BODY["rules"][3]["parameters"]["required_status_checks"]
    assert f"name: {check_name['context']}\n" in ci
