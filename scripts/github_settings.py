#!/usr/bin/env python3
"""github_settings.py: set (setup) or verify (check) the GitHub settings the deploy role trusts.

The AWS deploy role trusts an OIDC token only when its subject names the repository's and owner's
numeric ids, the production environment, main and one of the two deploying workflows. That subject
shape and the environment's rules live in GitHub, not in this repository: this script keeps them as
code through `gh api` (gh holds the login; standard library only).

  setup  sets the subject claim keys, the production environment (main only, REVIEWERS, no
         self-review, no admin bypass) and the repository ruleset that protects main (no force
         push, no deletion, changes through a reviewed pull request whose required status check
         passed, no bypass), writing only what differs, then reads everything back.
  check  reads the same settings and prints one `drift:` line for each that differs.

Settings come from the environment (make passes them):
  GITHUB_REPOSITORY  owner/name; when unset, the origin remote's, once the user types it back
  REVIEWERS          setup only: 1 to 6 comma-separated GitHub logins and team:<org>/<slug>
Exit status: 0 = settings match, 1 = drift or a failed call (said on stderr), 2 = usage error.
"""

import json
import os
import re
import subprocess  # nosec B404  # runs gh and git with argv built here, never a shell
import sys

ENVIRONMENT = "production"
BRANCH = "main"
# The order makes the subject the deploy role's trust policy matches (see subjects()).
CLAIM_KEYS = ["repository_owner_id", "repository_id", "environment", "ref", "job_workflow_ref"]
WORKFLOWS = ("ci.yml", "rollback.yml")
BRANCH_POLICY = {"protected_branches": False, "custom_branch_policies": True}
API_VERSION = "2022-11-28"
# The ruleset that protects main: what the environment's "main only" rule and the deploy role's
# refs/heads/main condition rely on (whoever can push to main can release).
RULESET_NAME = "protect main"
REQUIRED_CHECK = "lint, test and image test"  # the name of ci.yml's test job
PULL_REQUEST = {
    "required_approving_review_count": 1,
    "dismiss_stale_reviews_on_push": True,
    "require_code_owner_review": False,
    "require_last_push_approval": True,
    "required_review_thread_resolution": False,
}
RULES = [
    {"type": "deletion"},
    {"type": "non_fast_forward"},
    {"type": "pull_request", "parameters": PULL_REQUEST},
    {
        "type": "required_status_checks",
        "parameters": {
            "strict_required_status_checks_policy": True,
            "required_status_checks": [{"context": REQUIRED_CHECK}],
        },
    },
]
RULESET = {
    "name": RULESET_NAME,
    "target": "branch",
    "enforcement": "active",
    "bypass_actors": [],
    "conditions": {"ref_name": {"include": [f"refs/heads/{BRANCH}"], "exclude": []}},
    "rules": RULES,
}
RULE_WORDS = {
    "deletion": f"{BRANCH} may be deleted",
    "non_fast_forward": f"force pushes to {BRANCH} are allowed",
    "pull_request": f"changes reach {BRANCH} without a reviewed pull request",
    "required_status_checks": f"changes reach {BRANCH} without the check '{REQUIRED_CHECK}'",
}
ORIGIN_URL = ["git", "remote", "get-url", "origin"]
MAX_REVIEWERS = 6  # GitHub's limit per environment
REPOSITORY_RE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
LOGIN_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})$")
TEAM_RE = re.compile(r"^team:([A-Za-z0-9][A-Za-z0-9-]*)/([A-Za-z0-9_.-]+)$")
USAGE = """\
usage: make github-setup REVIEWERS=<login>,team:<org>/<slug> [GITHUB_REPOSITORY=owner/name]
       make github-check [GITHUB_REPOSITORY=owner/name]
Sets (github-setup) or verifies (github-check), with the gh CLI, what the deploy role trusts:
the OIDC subject claim keys repository_owner_id, repository_id, environment, ref, job_workflow_ref,
the production environment: deployments from main only, the REVIEWERS (1 to 6 logins or teams
of the owner) as required reviewers, no self-review, no administrator bypass; and the ruleset
'protect main': no force push or deletion of main, a pull request with 1 approval (after the last
push) and the check 'lint, test and image test' passed, on the branch as it is, no bypass.
  GITHUB_REPOSITORY  owner/name as GitHub spells it; when unset, the origin remote's repository
                     is used only after you type it back
Needs gh logged in (gh auth login) as an administrator of the repository."""


class UsageError(Exception):
    """A mistake of the caller: the message, then the usage, exit 2."""


class GitHubError(Exception):
    """A call or a state that stops the run: the one line shown, exit 1."""


# Settings


def origin_repository() -> str | None:
    """owner/name of the origin remote (HTTPS or SSH URL), or None when there is none."""
    try:
        done = subprocess.run(  # noqa: S603  # nosec B603  # fixed argv; git from PATH, as for the user
            ORIGIN_URL,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return None
    url = done.stdout.strip().removesuffix("/").removesuffix(".git")
    if done.returncode != 0 or not url:
        return None
    parts = url.replace(":", "/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


def repository(environ: dict) -> str:
    """GITHUB_REPOSITORY, or origin's repository once the user has typed it back."""
    repo = environ.get("GITHUB_REPOSITORY", "").strip()
    if not repo:
        derived = origin_repository()
        if derived is None:
            raise UsageError("GITHUB_REPOSITORY is not set and there is no git remote 'origin'")
        print(
            f"GITHUB_REPOSITORY is not set; the origin remote names {derived}."
            f" Type {derived} to use it: ",
            end="",
            file=sys.stderr,
            flush=True,
        )
        answer = sys.stdin.readline().strip()
        if answer != derived:
            print(file=sys.stderr)
            raise UsageError(f"{derived} was not confirmed: set GITHUB_REPOSITORY=owner/name")
        repo = derived
    if not REPOSITORY_RE.match(repo):
        raise UsageError(f"GITHUB_REPOSITORY '{repo}' is not owner/name")
    return repo


def reviewers(text: str, owner: str) -> list[tuple[str, str]]:
    """The REVIEWERS setting as ("User", login) and ("Team", slug) pairs, in the order given."""
    wanted = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        team = TEAM_RE.match(item)
        if team:
            if team.group(1).lower() != owner.lower():
                raise UsageError(f"team {team.group(1)}/{team.group(2)} is not in {owner}")
            wanted.append(("Team", team.group(2)))
        elif LOGIN_RE.match(item):
            wanted.append(("User", item))
        else:
            raise UsageError(f"'{item}' is not a GitHub login or team:<org>/<slug>")
    wanted = list(dict.fromkeys(wanted))
    if not wanted:
        raise UsageError("REVIEWERS is required: at least one person or team approves deploys")
    if len(wanted) > MAX_REVIEWERS:
        raise UsageError(
            f"GitHub allows at most {MAX_REVIEWERS} reviewers, REVIEWERS has {len(wanted)}"
        )
    return wanted


# GitHub through gh


def gh(method: str, path: str, body: dict | None = None):
    """Call `gh api`; the decoded answer (None when empty), or None for 404 on a GET."""
    argv = ["gh", "api", "--method", method, "-H", f"X-GitHub-Api-Version: {API_VERSION}", path]
    if body is not None:
        argv += ["--input", "-"]
    try:
        done = subprocess.run(  # noqa: S603  # nosec B603  # argv built here; gh from PATH
            argv,
            input=json.dumps(body) if body is not None else None,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise GitHubError(
            "gh (the GitHub CLI) is not installed or not on PATH: install it, then gh auth login"
        ) from None
    if done.returncode != 0:
        if method == "GET" and "(HTTP 404)" in done.stderr:
            return None
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise GitHubError(
            f"gh api --method {method} {path} failed: {lines[-1] if lines else 'no output'}"
        )
    return json.loads(done.stdout) if done.stdout.strip() else None


def read_repository(repo: str) -> dict:
    """The repository as GitHub names it, with its and its owner's numeric ids."""
    found = gh("GET", f"repos/{repo}")
    if found is None:
        raise GitHubError(
            f"repository {repo} not found, or the gh login cannot see it (gh auth status)"
        )
    return found


def reviewer_ids(wanted: list[tuple[str, str]], owner: str) -> list[dict]:
    """The REST reviewer entries ({"type", "id"}) of the wanted users and teams."""
    entries = []
    for kind, name in wanted:
        if kind == "User":
            found = gh("GET", f"users/{name}")
            what = f"reviewer {name}: no such GitHub user"
        else:
            found = gh("GET", f"orgs/{owner}/teams/{name}")
            what = f"reviewer team {owner}/{name}: no such team, or the gh login cannot see it"
        if found is None:
            raise GitHubError(what)
        entries.append({"type": kind, "id": found["id"]})
    return entries


def read_sub(repo: str) -> dict | None:
    return gh("GET", f"repos/{repo}/actions/oidc/customization/sub")


def read_environment(repo: str) -> dict | None:
    return gh("GET", f"repos/{repo}/environments/{ENVIRONMENT}")


def read_branch_rules(repo: str) -> list[dict]:
    """The environment's custom deployment branch and tag rules."""
    found = gh(
        "GET", f"repos/{repo}/environments/{ENVIRONMENT}/deployment-branch-policies?per_page=100"
    )
    rules = (found or {}).get("branch_policies", [])
    if (found or {}).get("total_count", 0) > len(rules):
        raise GitHubError(
            f"environment {ENVIRONMENT} has over 100 deployment rules: remove them by hand"
        )
    return rules


def read_ruleset(repo: str) -> dict | None:
    """The repository's ruleset named RULESET_NAME, in full, or None when there is none."""
    found = gh("GET", f"repos/{repo}/rulesets?includes_parents=false&per_page=100") or []
    summary = next((item for item in found if item.get("name") == RULESET_NAME), None)
    if summary is None:
        return None
    return gh("GET", f"repos/{repo}/rulesets/{summary['id']}")


# What must hold


def sub_drift(sub: dict | None) -> list[str]:
    """The subject claim's difference from CLAIM_KEYS, as drift lines."""
    if sub is None or sub.get("use_default", True):
        return [
            "OIDC subject claim: GitHub's default subject (repo:<owner/name>:...); want the keys "
            + ", ".join(CLAIM_KEYS)
        ]
    keys = sub.get("include_claim_keys") or []
    if keys != CLAIM_KEYS:
        shown = ", ".join(keys) or "none (the organisation's template)"
        return [f"OIDC subject claim: keys {shown} (want {', '.join(CLAIM_KEYS)}, in this order)"]
    return []


def reviewers_rule(environment: dict) -> dict:
    rules = environment.get("protection_rules") or []
    return next((rule for rule in rules if rule.get("type") == "required_reviewers"), {})


def current_reviewers(environment: dict) -> list[dict]:
    """The environment's required reviewers as REST reviewer entries ({"type", "id"})."""
    return [
        {"type": entry["type"], "id": entry["reviewer"]["id"]}
        for entry in reviewers_rule(environment).get("reviewers") or []
    ]


def sorted_entries(entries: list[dict]) -> list[tuple]:
    """Reviewer entries in a fixed order: GitHub need not list them as they were given."""
    return sorted((entry["type"], entry["id"]) for entry in entries)


def environment_drift(environment: dict | None) -> list[str]:
    """How the production environment differs from what the trust relies on, as drift lines."""
    where = f"environment {ENVIRONMENT}"
    if environment is None:
        return [f"{where} does not exist"]
    drift = []
    rule = reviewers_rule(environment)
    if not rule.get("reviewers"):
        drift.append(f"{where}: no required reviewers")
    elif rule.get("prevent_self_review") is not True:
        drift.append(f"{where}: self-review is allowed (want prevent_self_review true)")
    if environment.get("can_admins_bypass", True) is not False:
        drift.append(f"{where}: administrators can bypass its rules (want can_admins_bypass false)")
    policy = environment.get("deployment_branch_policy")
    if policy is None:
        drift.append(f"{where}: any branch may deploy (want selected branches: only {BRANCH})")
    elif policy != BRANCH_POLICY:
        drift.append(
            f"{where}: any protected branch may deploy (want selected branches: only {BRANCH})"
        )
    return drift


def is_main(rule: dict) -> bool:
    return rule.get("name") == BRANCH and rule.get("type", "branch") == "branch"


def rules_drift(rules: list[dict]) -> list[str]:
    """How the deployment branch rules differ from a single rule for main, as drift lines."""
    where = f"environment {ENVIRONMENT}"
    drift = [
        f"{where}: extra deployment rule {rule.get('type', 'branch')} '{rule.get('name')}'"
        f" (want only branch {BRANCH})"
        for rule in rules
        if not is_main(rule)
    ]
    if not any(is_main(rule) for rule in rules):
        drift.append(f"{where}: no deployment rule for branch {BRANCH}")
    return drift


def ruleset_drift(ruleset: dict | None) -> list[str]:
    """How the ruleset protecting main differs from RULESET, as drift lines."""
    where = f"ruleset '{RULESET_NAME}'"
    if ruleset is None:
        return [f"{where} does not exist: anyone who can push may force-push or delete {BRANCH}"]
    drift = []
    if ruleset.get("enforcement") != "active":
        drift.append(f"{where} is {ruleset.get('enforcement')} (want active)")
    if ruleset.get("target") != "branch" or ruleset.get("conditions") != RULESET["conditions"]:
        drift.append(f"{where} does not apply to exactly refs/heads/{BRANCH}")
    if ruleset.get("bypass_actors"):
        drift.append(f"{where}: someone may bypass it (want no bypass actors)")
    found = {rule.get("type"): rule.get("parameters") or {} for rule in ruleset.get("rules") or []}
    for rule in RULES:
        have = found.get(rule["type"])
        if have is None or comparable(have) != comparable(rule.get("parameters") or {}):
            drift.append(f"{where}: {RULE_WORDS[rule['type']]}")
    return drift


def comparable(parameters: dict) -> dict:
    """A rule's parameters as RULES states them: GitHub adds keys, and ids to the checks."""
    wanted = {key for rule in RULES for key in (rule.get("parameters") or {})}
    found = {key: value for key, value in parameters.items() if key in wanted}
    if "required_status_checks" in found:
        found["required_status_checks"] = sorted(
            check.get("context") for check in found["required_status_checks"]
        )
    return found


def drift_of(repo: str) -> list[str]:
    """Read every setting and return one line per difference."""
    drift = sub_drift(read_sub(repo))
    environment = read_environment(repo)
    drift += environment_drift(environment)
    if environment and environment.get("deployment_branch_policy") == BRANCH_POLICY:
        drift += rules_drift(read_branch_rules(repo))
    return drift + ruleset_drift(read_ruleset(repo))


# Commands


def subjects(found: dict) -> list[str]:
    """The token subjects of the two deploying workflows once the claim keys are set."""
    ids = f"repository_owner_id:{found['owner']['id']}:repository_id:{found['id']}"
    return [
        f"{ids}:environment:{ENVIRONMENT}:ref:refs/heads/{BRANCH}"
        f":job_workflow_ref:{found['full_name']}/.github/workflows/{workflow}@refs/heads/{BRANCH}"
        for workflow in WORKFLOWS
    ]


def print_ids(found: dict) -> None:
    print(
        f"For make stack-deploy: GITHUB_REPOSITORY={found['full_name']}"
        f" GITHUB_REPOSITORY_ID={found['id']} GITHUB_OWNER_ID={found['owner']['id']}"
    )
    print("Token subjects the deploy role must trust (and no others):")
    for subject in subjects(found):
        print(f"  {subject}")


def report(repo: str, drift: list[str], fix: str) -> int:
    """Print the drift lines (or ok) and return the exit status."""
    if not drift:
        print(
            f"ok: {repo}: OIDC subject claim, environment {ENVIRONMENT} and ruleset"
            f" '{RULESET_NAME}' are as required"
        )
        return 0
    for line in drift:
        print(f"drift: {line}", file=sys.stderr)
    print(f"error: {len(drift)} GitHub setting(s) of {repo} differ; {fix}", file=sys.stderr)
    return 1


def write(method: str, path: str, body: dict | None, what: str) -> int:
    """Make one write, say what it did and count it."""
    gh(method, path, body)
    print(what)
    return 1


def setup_sub(repo: str) -> int:
    """Set the subject claim keys unless they are set already; the number of writes."""
    if not sub_drift(read_sub(repo)):
        return 0
    body = {"use_default": False, "include_claim_keys": CLAIM_KEYS}
    path = f"repos/{repo}/actions/oidc/customization/sub"
    return write("PUT", path, body, f"set: OIDC subject claim keys {', '.join(CLAIM_KEYS)}")


def setup_environment(repo: str, entries: list[dict], names: str) -> int:
    """Create or correct the environment unless it is as wanted; the number of writes."""
    environment = read_environment(repo)
    if not environment_drift(environment) and sorted_entries(
        current_reviewers(environment)
    ) == sorted_entries(entries):
        return 0
    body = {
        "prevent_self_review": True,
        "reviewers": entries,
        "deployment_branch_policy": BRANCH_POLICY,
        "can_admins_bypass": False,
    }
    what = f"set: environment {ENVIRONMENT}: {BRANCH} only, no self-review or bypass, {names}"
    return write("PUT", f"repos/{repo}/environments/{ENVIRONMENT}", body, what)


def setup_branch_rules(repo: str) -> int:
    """Leave exactly one deployment rule, for main; the number of writes."""
    path = f"repos/{repo}/environments/{ENVIRONMENT}/deployment-branch-policies"
    rules = read_branch_rules(repo)
    writes = 0
    for rule in rules:
        if not is_main(rule):
            what = f"removed: deployment rule {rule.get('type', 'branch')} '{rule.get('name')}'"
            writes += write("DELETE", f"{path}/{rule['id']}", None, what)
    if not any(is_main(rule) for rule in rules):
        body = {"name": BRANCH, "type": "branch"}
        writes += write("POST", path, body, f"set: deployment rule branch {BRANCH}")
    return writes


def setup_ruleset(repo: str) -> int:
    """Create or correct the ruleset that protects main; the number of writes."""
    ruleset = read_ruleset(repo)
    if not ruleset_drift(ruleset):
        return 0
    what = (
        f"set: ruleset '{RULESET_NAME}': no force push or deletion of {BRANCH}, a reviewed pull"
        f" request and the check '{REQUIRED_CHECK}', no bypass"
    )
    if ruleset is None:
        return write("POST", f"repos/{repo}/rulesets", RULESET, what)
    return write("PUT", f"repos/{repo}/rulesets/{ruleset['id']}", RULESET, what)


def setup(environ: dict) -> int:
    """Write what differs, read everything back, print the ids."""
    repo = repository(environ)
    wanted = reviewers(environ.get("REVIEWERS", ""), repo.split("/")[0])
    found = read_repository(repo)
    repo = found["full_name"]
    entries = reviewer_ids(wanted, found["owner"]["login"])
    names = ", ".join(f"{kind.lower()} {name}" for kind, name in wanted)
    writes = setup_sub(repo) + setup_environment(repo, entries, names) + setup_branch_rules(repo)
    writes += setup_ruleset(repo)
    if not writes:
        print(f"{repo}: nothing to change")
    status = report(repo, drift_of(repo), "GitHub did not keep what was written (plan or rights?)")
    print_ids(found)
    return status


def check(environ: dict) -> int:
    """Read the settings; fail with one line per drift."""
    found = read_repository(repository(environ))
    status = report(found["full_name"], drift_of(found["full_name"]), "run make github-setup")
    print_ids(found)
    return status


def main(argv: list[str]) -> int:
    commands = {"setup": setup, "check": check}
    try:
        if len(argv) != 1 or argv[0] not in commands:
            raise UsageError("say setup or check")
        return commands[argv[0]](dict(os.environ))
    except UsageError as exc:
        print(f"error: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    except GitHubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
