"""The AWS make targets: misuse is refused clearly, and stack-deploy / deploy / rotate-token /
rollback / history / status / logs / stack-delete run end to end against moto's server (a real AWS
API emulator on 127.0.0.1; tests/moto_fixes.py fills three CloudFormation gaps data.yaml needs).

moto's CloudFormation reports no Outputs for base.yaml (it cannot resolve some of them) and cannot
run Fargate deployments, so the targets that read outputs also run against a small stack that has
the base stack's output contract (STUB below). What only a real account shows is in
test_verify.py's recorded responses.
"""

import json
import os
import pty
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cfnlint.decode import decode
from conftest import REGION, ROOT, client, image_manifest, pem_bundle
from test_verify import ENGINE

SHA_A = "aaaa1111aaaa1111aaaa1111aaaa1111aaaa1111"
SHA_B = "bbbb2222bbbb2222bbbb2222bbbb2222bbbb2222"
# The repository the deploy role trusts, by name and by GitHub's numeric ids.
GITHUB = {
    "GITHUB_REPOSITORY": "acme/cars-api",
    "GITHUB_REPOSITORY_ID": "4242",
    "GITHUB_OWNER_ID": "42",
}
# A stack with the outputs the scripts read from the base stack (the Infrastructure contract).
STUB = {
    "Resources": {
        "ApiTokenSecret": {
            "Type": "AWS::SecretsManager::Secret",
            "Properties": {"GenerateSecretString": {"PasswordLength": 48}},
        },
        "Repository": {
            "Type": "AWS::ECR::Repository",
            "Properties": {"RepositoryName": "cars-api-stub", "ImageTagMutability": "IMMUTABLE"},
        },
        "Cluster": {"Type": "AWS::ECS::Cluster"},
        "Vpc": {"Type": "AWS::EC2::VPC", "Properties": {"CidrBlock": "10.20.0.0/16"}},
        "Subnet": {
            "Type": "AWS::EC2::Subnet",
            "Properties": {"VpcId": {"Ref": "Vpc"}, "CidrBlock": "10.20.0.0/24"},
        },
        "ServiceSecurityGroup": {
            "Type": "AWS::EC2::SecurityGroup",
            "Properties": {"GroupDescription": "tasks", "VpcId": {"Ref": "Vpc"}},
        },
        "LogGroup": {
            "Type": "AWS::Logs::LogGroup",
            "Properties": {"LogGroupName": "/ecs/cars-api-stub", "RetentionInDays": 7},
        },
    },
    "Outputs": {
        "RepositoryName": {"Value": {"Ref": "Repository"}},
        "RepositoryUri": {"Value": {"Fn::GetAtt": ["Repository", "RepositoryUri"]}},
        "ClusterName": {"Value": {"Ref": "Cluster"}},
        "LogGroupName": {"Value": {"Ref": "LogGroup"}},
        "ServiceUrl": {"Value": "http://127.0.0.1:9"},
        "ApiTokenSecretArn": {"Value": {"Ref": "ApiTokenSecret"}},
        "TaskSubnets": {"Value": {"Ref": "Subnet"}},
        "ServiceSecurityGroup": {"Value": {"Fn::GetAtt": ["ServiceSecurityGroup", "GroupId"]}},
        "TaskAssignPublicIp": {"Value": "ENABLED"},
    },
}
# A stack with the output the release reads from the data stack, and its migration task family.
MIGRATE_FAMILY = "cars-api-stub-data-migrate"
DATA_STUB = {
    "Resources": {
        "MigrationTaskDefinition": {
            "Type": "AWS::ECS::TaskDefinition",
            "Properties": {
                "Family": MIGRATE_FAMILY,
                "RequiresCompatibilities": ["FARGATE"],
                "NetworkMode": "awsvpc",
                "Cpu": "256",
                "Memory": "512",
                "ContainerDefinitions": [
                    {
                        "Name": "cars-api",
                        "Image": "placeholder",
                        "Memory": 512,  # moto's RunTask sums container memory
                        "Command": ["python", "cars.py", "migrate"],
                    }
                ],
            },
        }
    },
    "Outputs": {"MigrationTaskFamily": {"Value": MIGRATE_FAMILY}},
}


@pytest.fixture(scope="module")
def aws_env(aws_env):
    """conftest's moto user, with a local stand-in for the RDS CA bundle (no download from AWS)."""
    home = Path(aws_env["HOME"])
    return {**aws_env, "RDS_CA_BUNDLE": str(pem_bundle(home / "rds-ca.pem", "Test RDS root CA"))}


def make(target, env, stdin=subprocess.DEVNULL, **variables):
    """Run `make <target>` as a user would; variables go on the command line."""
    args = [f"{key}={value}" for key, value in variables.items()]
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), target, *args],
        env=env,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines, f"no error line in: {result.stderr}"
    return lines[-1]


def stack_exists(cfn, name):
    try:
        cfn.describe_stacks(StackName=name)
    except cfn.exceptions.ClientError:
        return False
    return True


@pytest.fixture(scope="module")
def base_stack(aws_env):
    """`make stack-deploy` once, with the real base.yaml, as a first-time user runs it."""
    return make("stack-deploy", aws_env, **GITHUB)


@pytest.fixture(scope="module")
def stub(aws_env, moto_url):
    """A stack with the base stack's outputs, two images in its repository and some log events."""
    cfn = client("cloudformation", moto_url)
    cfn.create_stack(StackName="cars-api-stub", TemplateBody=json.dumps(STUB))
    ecr = client("ecr", moto_url)
    for tag in (SHA_A, SHA_B):
        manifest = image_manifest("sha256:" + tag[:8] * 8)
        ecr.put_image(repositoryName="cars-api-stub", imageManifest=manifest, imageTag=tag)
        time.sleep(1.1)  # distinct push times, so that newest-first is observable
    logs = client("logs", moto_url)
    stream = "cars-api/cars-api/0123456789abcdef0123456789abcdef"
    logs.create_log_stream(logGroupName="/ecs/cars-api-stub", logStreamName=stream)
    now = int(time.time() * 1000)
    logs.put_log_events(
        logGroupName="/ecs/cars-api-stub",
        logStreamName=stream,
        logEvents=[
            {
                "timestamp": now - 2000,
                "message": '{"method": "GET", "path": "/cars", "status": 200}',
            },
            {
                "timestamp": now - 1000,
                "message": '{"method": "GET", "path": "/ready", "status": 200}',
            },
        ],
    )
    cfn.create_stack(StackName="cars-api-stub-data", TemplateBody=json.dumps(DATA_STUB))
    return {
        **aws_env,
        "BASE_STACK": "cars-api-stub",
        "DATA_STACK": "cars-api-stub-data",
        "SERVICE_STACK": "cars-api-stub-service",
    }


# Misuse: refused before any AWS call, with a usage line


@pytest.mark.parametrize("target", ["release", "push", "deploy", "rollback"])
def test_target_without_sha_prints_usage(target, aws_env):
    result = make(target, aws_env)
    assert result.returncode == 2
    assert f"usage: make {target} SHA=<commit sha>" in result.stderr


@pytest.mark.parametrize(
    "sha",
    [
        "ABCDEF1",
        "abc12",
        "a" * 41,
        "main",
        "abcdef1 ",
        "abcdef1;touch {tmp}/pwned",
        "abcdef1`touch {tmp}/pwned`",
    ],
)
@pytest.mark.parametrize("target", ["release", "deploy", "rollback"])
def test_malformed_sha_is_refused_before_any_aws_call(target, sha, aws_env, tmp_path):
    env = {**aws_env, "PATH": "/usr/bin:/bin"}  # no aws CLI here: an AWS call would fail otherwise
    result = make(target, env, SHA=sha.format(tmp=tmp_path))
    assert result.returncode == 2
    assert "is not a commit SHA (7 to 40 lowercase hex characters)" in error_line(result)
    assert f"usage: make {target} SHA=" in result.stderr
    assert not (tmp_path / "pwned").exists()


def test_missing_aws_cli_is_named(aws_env):
    result = make("deploy", {**aws_env, "PATH": "/usr/bin:/bin"}, SHA=SHA_A)
    assert result.returncode != 0
    assert error_line(result).startswith("error: the aws CLI is not installed (or not on PATH)")


def test_missing_credentials_are_named(aws_env):
    env = {
        k: v for k, v in aws_env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    result = make("status", env)
    assert result.returncode != 0
    line = error_line(result)
    assert line.startswith(f"error: cannot use AWS (profile default, region {REGION}):")
    assert "credentials" in line


def test_missing_base_stack_says_to_run_stack_deploy(aws_env):
    result = make("history", aws_env, BASE_STACK="no-such-stack")
    assert result.returncode != 0
    assert error_line(result) == (
        f"error: stack no-such-stack not found in {REGION}: create it first with make stack-deploy"
    )


# A parent make exports all four stack names, derived from its own STACK_PREFIX: a child run with
# STACK_PREFIX=staging that kept one of them would write staging's settings into production.
@pytest.mark.parametrize(
    ("target", "variable", "leaked"),
    [
        ("stack-deploy", "BASE_STACK", "cars-api-base"),
        ("stack-deploy", "DATA_STACK", "cars-api-data"),
        ("stack-deploy", "SERVICE_STACK", "cars-api-service"),
        ("stack-deploy", "CI_STACK", "cars-api-ci-access"),
        ("release", "SERVICE_STACK", "cars-api-service"),
        ("deploy", "BASE_STACK", "cars-api-base"),
        ("rollback", "SERVICE_STACK", "cars-api-service"),
        ("rotate-token", "DATA_STACK", "cars-api-data"),
        ("stack-delete", "BASE_STACK", "cars-api-base"),
    ],
)
def test_a_stack_name_of_another_prefix_is_refused_before_any_aws_call(
    target, variable, leaked, aws_env
):
    # No aws CLI on this PATH: a run that reached AWS would fail on that instead.
    env = {**aws_env, "PATH": "/usr/bin:/bin", "STACK_PREFIX": "staging", variable: leaked}
    result = make(target, env, SHA=SHA_A, **GITHUB)
    assert result.returncode == 2, result.stderr
    assert error_line(result) == (
        f"error: {variable}={leaked} is not a stack of STACK_PREFIX=staging: every stack name"
        f" starts with 'staging-'; unset {variable} (it follows STACK_PREFIX) or set it to a"
        " staging- name. Nothing was changed"
    )


def test_stack_deploy_refuses_a_malformed_github_repository(aws_env):
    result = make("stack-deploy", aws_env, **{**GITHUB, "GITHUB_REPOSITORY": "not a repo"})
    assert result.returncode == 2
    assert "GITHUB_REPOSITORY 'not a repo' is not owner/name" in error_line(result)


def test_stack_deploy_without_repository_or_github_remote_prints_usage(aws_env, tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    env = {**aws_env, "GIT_DIR": str(tmp_path / ".git")}
    env.pop("GITHUB_REPOSITORY", None)
    result = make("stack-deploy", env)
    assert result.returncode == 2
    assert "GITHUB_REPOSITORY is not set" in error_line(result)
    assert "usage: make stack-deploy" in result.stderr


def test_stack_deploy_refuses_a_repository_from_origin_without_a_terminal(aws_env, tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    upstream = "https://github.com/upstream/cars-api.git"
    subprocess.run(["git", "-C", str(tmp_path), "remote", "add", "origin", upstream], check=True)
    env = {**aws_env, "GIT_DIR": str(tmp_path / ".git")}
    env.pop("GITHUB_REPOSITORY", None)
    result = make("stack-deploy", env, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    line = error_line(result)
    assert "origin says 'upstream/cars-api'" in line
    assert "only a person at a terminal may confirm" in line


def test_stack_deploy_deploys_nothing_unless_a_person_confirms_the_origin_repository(
    aws_env, moto_url, tmp_path
):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    upstream = "https://github.com/upstream/cars-api.git"
    subprocess.run(["git", "-C", str(tmp_path), "remote", "add", "origin", upstream], check=True)
    env = {**aws_env, "GIT_DIR": str(tmp_path / ".git"), "AWS_REGION": "ap-southeast-2"}
    env.pop("GITHUB_REPOSITORY", None)
    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"no\n")  # the person at the terminal does not confirm
        result = make("stack-deploy", env, stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    assert result.returncode != 0
    assert "will trust GitHub repository upstream/cars-api (from origin)" in result.stderr
    assert "error: not confirmed: nothing was deployed" in result.stderr
    cfn = client("cloudformation", moto_url, region="ap-southeast-2")
    assert not stack_exists(cfn, "cars-api-base")


@pytest.mark.parametrize(
    "ids",
    [
        {"GITHUB_REPOSITORY_ID": "acme", "GITHUB_OWNER_ID": "42"},
        {"GITHUB_REPOSITORY_ID": "4242", "GITHUB_OWNER_ID": ""},
        {"GITHUB_REPOSITORY_ID": "4242", "GITHUB_OWNER_ID": "42; touch pwned"},
    ],
)
def test_stack_deploy_refuses_ids_that_are_not_numeric(aws_env, ids):
    env = {**aws_env, "PATH": "/usr/bin:/bin"}  # no aws CLI: refused before any AWS call
    result = make("stack-deploy", env, GITHUB_REPOSITORY="acme/cars-api", **ids)
    assert result.returncode == 2
    assert "must both be numeric ids" in error_line(result)


def test_stack_deploy_without_ids_or_gh_says_how_to_give_them(aws_env, tmp_path):
    env = {**aws_env, "PATH": str(tmp_path)}  # neither gh nor aws
    env["PATH"] += ":" + ":".join(d for d in ("/usr/bin", "/bin") if not (Path(d) / "gh").exists())
    result = make("stack-deploy", env, GITHUB_REPOSITORY="acme/cars-api")
    assert result.returncode == 2
    assert "set GITHUB_REPOSITORY_ID and GITHUB_OWNER_ID, or install the gh CLI" in error_line(
        result
    )


# End to end on moto


def test_stack_deploy_creates_the_base_stack_resources(base_stack, moto_url):
    assert base_stack.returncode == 0, base_stack.stderr
    assert "Outputs of cars-api-base:" in base_stack.stdout
    cfn = client("cloudformation", moto_url)
    stack = cfn.describe_stacks(StackName="cars-api-base")["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    parameters = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}
    assert parameters["AllowPlaintextWrites"] == "false"
    assert parameters["WebApplicationFirewall"] == "true"
    assert "WARNING" not in base_stack.stderr
    resources = {
        r["LogicalResourceId"]: r["PhysicalResourceId"]
        for r in cfn.list_stack_resources(StackName="cars-api-base")["StackResourceSummaries"]
    }
    repo = client("ecr", moto_url).describe_repositories(repositoryNames=[resources["Repository"]])[
        "repositories"
    ][0]
    assert repo["imageTagMutability"] == "IMMUTABLE"
    # scanOnPush: moto's CloudFormation drops ImageScanningConfiguration; only AWS shows it.
    clusters = client("ecs", moto_url).describe_clusters(clusters=[resources["Cluster"]])
    assert clusters["clusters"][0]["status"] == "ACTIVE"
    groups = client("logs", moto_url).describe_log_groups(logGroupNamePrefix="/ecs/cars-api")
    group = next(g for g in groups["logGroups"] if g["logGroupName"] == "/ecs/cars-api")
    assert group["retentionInDays"] == 365, "the Makefile's LOG_RETENTION_DAYS"
    ec2 = client("ec2", moto_url)
    vpc = resources["Vpc"]
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    assert len(subnets) == 4
    groups = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]}])
    ids = {g["GroupId"] for g in groups["SecurityGroups"]}
    for name in ("LoadBalancerSecurityGroup", "ServiceSecurityGroup", "DatabaseSecurityGroup"):
        assert resources[name] in ids
    balancers = client("elbv2", moto_url).describe_load_balancers(
        LoadBalancerArns=[resources["LoadBalancer"]]
    )
    assert balancers["LoadBalancers"][0]["Scheme"] == "internet-facing"
    # The deploy role is in the CI access stack, deployed second, naming the base resources.
    ci = cfn.describe_stacks(StackName="cars-api-ci-access")["Stacks"][0]
    assert ci["StackStatus"] == "CREATE_COMPLETE"
    ci_parameters = {p["ParameterKey"]: p["ParameterValue"] for p in ci["Parameters"]}
    assert ci_parameters["GitHubRepository"] == "acme/cars-api"
    assert ci_parameters["ServiceStackName"] == "cars-api-service"
    assert ci_parameters["GitHubRepositoryId"] == "4242"
    assert ci_parameters["GitHubOwnerId"] == "42"
    assert ci_parameters["RepositoryName"] == resources["Repository"]
    assert ci_parameters["ExecutionRoleName"] == resources["ExecutionRole"]
    assert ci_parameters["TaskRoleName"] == resources["TaskRole"]
    # (moto prints a list parameter in its own way, so look for both ids in it)
    for subnet in ("PublicSubnetA", "PublicSubnetB"):
        assert resources[subnet] in ci_parameters["TaskSubnets"]
    assert resources["PrivateSubnetA"] not in ci_parameters["TaskSubnets"]
    assert ci_parameters["TaskPublicIp"] == "true"
    ci_resources = {
        r["LogicalResourceId"]: r["PhysicalResourceId"]
        for r in cfn.list_stack_resources(StackName="cars-api-ci-access")["StackResourceSummaries"]
    }
    role = client("iam", moto_url).get_role(RoleName=ci_resources["DeployRole"].split("/")[-1])
    trust = json.dumps(role["Role"]["AssumeRolePolicyDocument"])
    for workflow in ("ci.yml", "rollback.yml"):
        subject = (
            "repository_owner_id:42:repository_id:4242:environment:production:ref:refs/heads/main"
            f":job_workflow_ref:acme/cars-api/.github/workflows/{workflow}@refs/heads/main"
        )
        assert subject in trust
    assert "repo:acme/cars-api" not in trust, "names alone are trusted no more"
    linked = client("iam", moto_url).list_roles(
        PathPrefix="/aws-service-role/ecs.application-autoscaling.amazonaws.com/"
    )["Roles"]
    assert len(linked) == 1, "the deploy role may not create it, so stack-deploy does"


def test_stack_deploy_warns_when_plaintext_writes_are_on(aws_env, moto_url):
    env = {**aws_env, "AWS_REGION": "us-east-2", "STACK_PREFIX": "demo"}
    result = make("stack-deploy", env, ALLOW_PLAINTEXT_WRITES="true", **GITHUB)
    assert result.returncode == 0, result.stderr
    assert "WARNING: AllowPlaintextWrites is on" in result.stderr
    assert "clear text" in result.stderr
    stack = client("cloudformation", moto_url, region="us-east-2").describe_stacks(
        StackName="demo-base"
    )["Stacks"][0]
    parameters = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}
    assert parameters["AllowPlaintextWrites"] == "true"


def test_second_stack_deploy_changes_nothing(base_stack, aws_env, moto_url):
    assert base_stack.returncode == 0, base_stack.stderr
    cfn = client("cloudformation", moto_url)
    before = cfn.describe_stacks(StackName="cars-api-base")["Stacks"][0]
    resources = cfn.list_stack_resources(StackName="cars-api-base")["StackResourceSummaries"]
    again = make("stack-deploy", aws_env, **GITHUB)
    assert again.returncode == 0, again.stderr
    assert "No changes to deploy" in again.stdout
    after = cfn.describe_stacks(StackName="cars-api-base")["Stacks"][0]
    assert after["StackStatus"] == before["StackStatus"]
    assert after.get("LastUpdatedTime") == before.get("LastUpdatedTime")
    assert (
        cfn.list_stack_resources(StackName="cars-api-base")["StackResourceSummaries"] == resources
    )
    ci = cfn.describe_stacks(StackName="cars-api-ci-access")["Stacks"][0]
    assert ci.get("LastUpdatedTime") is None, "the CI access stack is unchanged too"
    assert "The RDS CA bundle (1 certificates) is current" in again.stdout
    assert "Wrote the RDS CA bundle" not in again.stdout


def test_stack_deploy_first_creates_every_service_linked_role_the_stacks_need(base_stack, moto_url):
    assert base_stack.returncode == 0, base_stack.stderr
    roles = client("iam", moto_url).list_roles(PathPrefix="/aws-service-role/")["Roles"]
    services = {role["Path"].split("/")[2] for role in roles}
    assert services >= {
        "ecs.amazonaws.com",
        "ecs.application-autoscaling.amazonaws.com",
        "elasticloadbalancing.amazonaws.com",
        "rds.amazonaws.com",
    }
    created = base_stack.stdout.index("Created the service-linked role of ecs.amazonaws.com")
    assert created < base_stack.stdout.index("Deploying stack cars-api-base")


def test_stack_deploy_goes_through_a_change_set_it_prints_and_leaves_none_behind(
    base_stack, moto_url
):
    assert base_stack.returncode == 0, base_stack.stderr
    assert "cars-api-base: " in base_stack.stdout
    assert "resource change(s) (new stack)" in base_stack.stdout
    assert "  Add       Vpc (AWS::EC2::VPC)" in base_stack.stdout
    cfn = client("cloudformation", moto_url)
    for stack in ("cars-api-base", "cars-api-data", "cars-api-ci-access"):
        pending = [
            summary
            for summary in cfn.list_change_sets(StackName=stack)["Summaries"]
            if summary["ExecutionStatus"] == "AVAILABLE"
        ]
        assert pending == [], stack


def test_a_first_create_that_fails_half_way_is_retried_by_the_same_command(aws_env, moto_url):
    region = "us-west-2"
    env = {**aws_env, "AWS_REGION": region}
    ecr = client("ecr", moto_url, region=region)
    cfn = client("cloudformation", moto_url, region=region)
    # Something the base stack names exists already: its create fails after other resources.
    ecr.create_repository(repositoryName="cars-api")
    failed = make("stack-deploy", env, **GITHUB)
    assert failed.returncode != 0
    line = error_line(failed)
    assert line.startswith(
        "error: stack cars-api-base was not created: stack cars-api-base is "
        "ROLLBACK_COMPLETE (Repository: "
    )
    assert "run make stack-deploy again" in line
    stack = cfn.describe_stacks(StackName="cars-api-base")["Stacks"][0]
    assert stack["StackStatus"] == "ROLLBACK_COMPLETE"
    assert not stack_exists(cfn, "cars-api-data"), "it stopped at the failed stack"
    ecr.delete_repository(repositoryName="cars-api")  # the fix
    rerun = make("stack-deploy", env, **GITHUB)
    assert rerun.returncode == 0, rerun.stderr
    assert "stack cars-api-base is ROLLBACK_COMPLETE from a failed first create" in rerun.stdout
    assert "deleting it and creating it again" in rerun.stdout
    for name in ("cars-api-base", "cars-api-data", "cars-api-ci-access"):
        status = cfn.describe_stacks(StackName=name)["Stacks"][0]["StackStatus"]
        assert status == "CREATE_COMPLETE", name


def test_plan_of_a_new_account_lists_what_would_be_added_and_creates_nothing(aws_env, moto_url):
    region = "ap-southeast-2"
    result = make("plan", {**aws_env, "AWS_REGION": region})
    assert result.returncode == 0, result.stderr
    assert "Plan of stack cars-api-base:" in result.stdout
    assert "resource change(s) (new stack)" in result.stdout
    assert "  Add       Repository (AWS::ECR::Repository)" in result.stdout
    assert "after cars-api-base exists" in result.stdout
    assert "Nothing was changed" in result.stdout
    cfn = client("cloudformation", moto_url, region=region)
    live = [s for s in cfn.list_stacks()["StackSummaries"] if s["StackStatus"] != "DELETE_COMPLETE"]
    assert live == []
    assert client("ecr", moto_url, region=region).describe_repositories()["repositories"] == []


def test_plan_of_deployed_stacks_changes_nothing(base_stack, aws_env, moto_url):
    assert base_stack.returncode == 0, base_stack.stderr
    cfn = client("cloudformation", moto_url)
    before = {
        name: cfn.describe_stacks(StackName=name)["Stacks"][0]
        for name in ("cars-api-base", "cars-api-data", "cars-api-ci-access")
    }
    result = make("plan", aws_env, LOG_RETENTION_DAYS="90")
    assert result.returncode == 0, result.stderr
    for name in before:
        assert f"Plan of stack {name}" in result.stdout
    assert "cars-api-base: " in result.stdout
    for name, stack in before.items():
        after = cfn.describe_stacks(StackName=name)["Stacks"][0]
        assert after.get("LastUpdatedTime") == stack.get("LastUpdatedTime"), name
        assert after["Parameters"] == stack["Parameters"], name
        pending = [
            summary
            for summary in cfn.list_change_sets(StackName=name)["Summaries"]
            if summary["ExecutionStatus"] != "EXECUTE_COMPLETE"  # AWS drops those; moto keeps them
        ]
        assert pending == [], name


def resources(cfn, stack):
    return {
        r["LogicalResourceId"]: r["PhysicalResourceId"]
        for r in cfn.list_stack_resources(StackName=stack)["StackResourceSummaries"]
    }


def test_stack_deploy_creates_the_data_stack_between_base_and_ci_access(
    base_stack, aws_env, moto_url
):
    assert base_stack.returncode == 0, base_stack.stderr
    order = [
        line.split()[2] for line in base_stack.stdout.splitlines() if "Deploying stack" in line
    ]
    assert order == ["cars-api-base", "cars-api-data", "cars-api-ci-access"]
    cfn = client("cloudformation", moto_url)
    stack = cfn.describe_stacks(StackName="cars-api-data")["Stacks"][0]
    # (UPDATE_COMPLETE after the second run's test: moto updates a stack whose settings are equal)
    assert stack["StackStatus"] in ("CREATE_COMPLETE", "UPDATE_COMPLETE")
    parameters = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}
    base = resources(cfn, "cars-api-base")
    data = resources(cfn, "cars-api-data")
    assert parameters["LogRetentionDays"] == "365"
    assert parameters["DatabaseSecurityGroup"] == base["DatabaseSecurityGroup"]
    assert parameters["AlarmTopicArn"] == base["AlarmTopic"]
    endpoint = parameters["CreateSecretsManagerEndpoint"]  # pragma: allowlist secret
    assert endpoint == "true", "public tasks: the base stack has none"
    for subnet in ("PrivateSubnetA", "PrivateSubnetB"):
        assert base[subnet] in parameters["PrivateSubnets"]
    (database,) = client("rds", moto_url).describe_db_instances(
        DBInstanceIdentifier="cars-api-data"
    )["DBInstances"]
    assert database["Engine"] == "mysql"
    assert database["PubliclyAccessible"] is False
    (group,) = database["DBParameterGroups"]
    assert group["DBParameterGroupName"] == data["DatabaseParameterGroup"]
    logs = client("logs", moto_url)
    for kind in ("error", "slowquery"):
        name = f"/aws/rds/instance/cars-api-data/{kind}"
        (found,) = logs.describe_log_groups(logGroupNamePrefix=name)["logGroups"]
        assert found["retentionInDays"] == 365, name
    # The CA bundle: written from RDS_CA_BUNDLE (no download), exactly.
    secrets = client("secretsmanager", moto_url)
    bundle = Path(aws_env["RDS_CA_BUNDLE"]).read_text()
    stored = secrets.get_secret_value(SecretId=data["CaBundleSecret"])["SecretString"]
    assert stored == bundle
    assert "Wrote the RDS CA bundle (1 certificates)" in base_stack.stdout
    # The service reads AWSPREVIOUS of the token: it exists from the start.
    stages = secrets.describe_secret(SecretId=base["ApiTokenSecret"])["VersionIdsToStages"]
    assert any({"AWSCURRENT", "AWSPREVIOUS"} <= set(labels) for labels in stages.values())
    # No release and no BOOTSTRAP_SHA: no bootstrap task (never "the newest image"), and it says
    # what to do.
    assert "no image chosen for the bootstrap task yet" in base_stack.stdout
    assert "make stack-deploy BOOTSTRAP_SHA=<sha>" in base_stack.stdout
    assert "BootstrapTaskDefinition" not in data
    ci = cfn.describe_stacks(StackName="cars-api-ci-access")["Stacks"][0]
    ci_parameters = {p["ParameterKey"]: p["ParameterValue"] for p in ci["Parameters"]}
    assert ci_parameters["DataStackName"] == "cars-api-data"
    assert ci_parameters["MigrationExecutionRoleName"] == data["MigrationExecutionRole"]


def test_stack_deploy_writes_only_pem_certificates_into_the_ca_bundle(aws_env, moto_url, tmp_path):
    env = {**aws_env, "AWS_REGION": "ca-central-1"}
    junk = tmp_path / "junk.pem"
    junk.write_text("<html>not found</html>\n")
    with_key = pem_bundle(tmp_path / "with-key.pem", "CA")
    with_key.write_text(with_key.read_text() + Path(str(with_key) + ".key").read_text())
    cfn = client("cloudformation", moto_url, region="ca-central-1")
    secrets = client("secretsmanager", moto_url, region="ca-central-1")
    for bad in (junk, with_key):
        result = make("stack-deploy", {**env, "RDS_CA_BUNDLE": str(bad)}, **GITHUB)
        assert result.returncode != 0
        assert error_line(result) == (
            f"error: the RDS CA bundle {bad} is not a file of PEM certificates; nothing was changed"
        )
        # The bundle is checked before anything changes: no stack, no secret.
        assert cfn.list_stacks()["StackSummaries"] == []
        assert secrets.list_secrets()["SecretList"] == []
    two = pem_bundle(tmp_path / "two.pem", "Old root", "New root")
    result = make("stack-deploy", {**env, "RDS_CA_BUNDLE": str(two)}, **GITHUB)
    assert result.returncode == 0, result.stderr
    assert "Wrote the RDS CA bundle (2 certificates)" in result.stdout
    secret = resources(cfn, "cars-api-data")["CaBundleSecret"]
    assert secrets.get_secret_value(SecretId=secret)["SecretString"] == two.read_text()


def test_rollback_on_the_real_base_stack_changes_nothing_when_it_cannot_proceed(
    base_stack, aws_env, moto_url
):
    result = make("rollback", aws_env, SHA="1234567")
    assert result.returncode != 0
    assert error_line(result).startswith("error: ")
    assert not stack_exists(client("cloudformation", moto_url), "cars-api-service")


def test_rollback_to_an_unknown_sha_is_refused_and_changes_nothing(stub, moto_url):
    cfn = client("cloudformation", moto_url)
    result = make("rollback", stub, SHA="1234567")
    assert result.returncode != 0
    uri = f"123456789012.dkr.ecr.{REGION}.amazonaws.com/cars-api-stub"
    assert error_line(result) == (
        f"error: 1234567 is not an image in {uri}: nothing changed "
        "(make history lists the images you can deploy)"
    )
    assert not stack_exists(cfn, "cars-api-stub-service")


def test_history_lists_the_pushed_images_newest_first(stub):
    result = make("history", stub)
    assert result.returncode == 0, result.stderr
    tags = [line.split()[2] for line in result.stdout.splitlines() if line[:2] == "20"]
    assert tags == [SHA_B, SHA_A]
    assert "live" not in result.stdout.split("LIVE", 1)[1]


def test_status_without_a_release_says_how_to_deploy(stub):
    result = make("status", stub)
    assert result.returncode == 0, result.stderr
    assert "No release deployed yet: stack cars-api-stub-service does not exist" in result.stdout
    assert "url          http://127.0.0.1:9" in result.stdout


def test_logs_print_the_newest_events_in_order(stub):
    result = make("logs", stub, LOG_LINES="1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith('{"method": "GET", "path": "/ready", "status": 200}')
    assert "01234567" in lines[0]


def test_stack_delete_without_confirmation_deletes_nothing(stub, moto_url):
    result = make("stack-delete", stub)
    assert result.returncode != 0
    assert "no confirmation given" in error_line(result)
    wrong = make("stack-delete", stub, CONFIRM="cars-api-base")
    assert "is not 'cars-api-stub': nothing was deleted" in error_line(wrong)
    assert stack_exists(client("cloudformation", moto_url), "cars-api-stub")


def test_stack_delete_with_confirmation_deletes_and_says_what_survives(aws_env, moto_url):
    cfn = client("cloudformation", moto_url, region="eu-central-1")
    template = {"Resources": STUB["Resources"], "Outputs": STUB["Outputs"]}
    cfn.create_stack(StackName="cars-api-doomed", TemplateBody=json.dumps(template))
    env = {**aws_env, "AWS_REGION": "eu-central-1", "BASE_STACK": "cars-api-doomed"}
    result = make("stack-delete", env, CONFIRM="cars-api-doomed")
    assert result.returncode == 0, result.stderr
    assert "What survives, on purpose:" in result.stdout
    assert "ECR repository cars-api-stub with its images" in result.stdout
    assert not stack_exists(cfn, "cars-api-doomed")
    nothing = make("stack-delete", env, CONFIRM="cars-api-doomed")
    assert "nothing to delete: neither cars-api-service nor cars-api-doomed exists" in error_line(
        nothing
    )


def test_every_stack_deploy_setting_names_a_parameter_of_its_stack():
    script = (ROOT / "scripts" / "stack-deploy.sh").read_text()

    def passed_in(function):
        body = script[script.index(f"{function}() {{") :]
        body = body[: body.index("\n}\n")]
        found = set(re.findall(r"\b([A-Z][A-Za-z]+)=[A-Z_]+\b", body))
        return found | set(re.findall(r'echo "([A-Z][A-Za-z0-9]+)=\$', body))

    for functions, name in (
        (("base_parameters", "s3_prefix_list"), "base.yaml"),
        (("ci_parameters",), "ci-access.yaml"),
        (("data_parameters",), "data.yaml"),
    ):
        passed = set().union(*(passed_in(f) for f in functions))
        template, _ = decode(str(ROOT / "cloudformation" / name))
        assert passed, name
        assert passed <= set(template["Parameters"]), passed - set(template["Parameters"])
    assert "S3PrefixListId" in passed_in("s3_prefix_list")
    assert {"GitHubRepositoryId", "GitHubOwnerId", "TaskSubnets"} <= passed_in("ci_parameters")
    assert {"DataStackName", "MigrationExecutionRoleName"} <= passed_in("ci_parameters")
    assert {"VpcId", "PrivateSubnets", "AlarmTopicArn", "LogRetentionDays"} <= passed_in(
        "data_parameters"
    )


# The release's checks against moto's ECR API (a stand-in engine: no registry to push to here)


@pytest.fixture
def engine_env(stub, tmp_path):
    """The stub's environment with a stand-in container engine and the test job's archive."""
    engine = tmp_path / "engine"
    engine.write_text(f"#!{sys.executable}\n{ENGINE}")
    engine.chmod(0o755)
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"an image archive")
    tested = "sha256:" + SHA_A[:8] * 8  # the config digest the stub put in ECR for SHA_A
    return {
        **stub,
        "CONTAINER": str(engine),
        "REPLAY_DIR": str(tmp_path),
        "IMAGE_ARCHIVE": str(archive),
        "IMAGE_ID": tested,
        "STUB_IMAGE_ID": tested,
        "STUB_LABEL": SHA_A,
        "SCAN_TIMEOUT": "0",
    }


def test_push_of_a_tag_in_ecr_holding_another_image_is_refused(engine_env, tmp_path):
    other = "sha256:" + "0dd1ce00" * 8
    env = {**engine_env, "IMAGE_ID": other, "STUB_IMAGE_ID": other}
    result = make("push", env, SHA=SHA_A)
    assert result.returncode != 0
    line = error_line(result)
    assert f"cars-api-stub:{SHA_A} is already in ECR but holds another image" in line
    assert f"config sha256:{SHA_A[:8] * 8}), not {other}" in line
    assert "push " not in (tmp_path / "engine.log").read_text()


def test_push_of_the_same_image_waits_for_a_scan_that_never_comes_and_stops(engine_env, tmp_path):
    result = make("push", engine_env, SHA=SHA_A)
    assert result.returncode != 0
    assert "is already in ECR and is the same image" in result.stdout
    line = error_line(result)
    assert line.startswith("error: release stopped: ECR has no scan of sha256:")
    assert "after 0s; nothing was deployed" in line
    assert "push " not in (tmp_path / "engine.log").read_text()


def test_rollback_to_an_image_ecr_never_scanned_needs_the_override(stub, moto_url):
    result = make("rollback", stub, SHA=SHA_B)
    assert result.returncode != 0
    line = error_line(result)
    assert "ECR has no scan of sha256:" in line
    assert line.endswith(f"to roll back anyway: make rollback SHA={SHA_B} ALLOW_VULNERABLE=true")
    assert not stack_exists(client("cloudformation", moto_url), "cars-api-stub-service")


# The release's migration step against moto's ECS (its tasks stop with exit code 0)


def test_deploy_runs_the_migration_task_with_the_new_image_before_the_service_stack(stub, moto_url):
    ecr = client("ecr", moto_url)
    clean = {
        "repositoryName": "cars-api-stub",
        "imageId": {},
        "imageScanStatus": {"status": "COMPLETE", "description": "clean"},
        "imageScanFindings": {"findings": [], "findingSeverityCounts": {}},
    }
    request = urllib.request.Request(
        f"{moto_url}/moto-api/static/ecr/scan-finding-results",
        data=json.dumps({"results": [clean], "region": REGION}).encode(),
        method="POST",
    )
    urllib.request.urlopen(request, timeout=5).close()
    ecr.start_image_scan(repositoryName="cars-api-stub", imageId={"imageTag": SHA_A})
    (image,) = ecr.describe_images(repositoryName="cars-api-stub", imageIds=[{"imageTag": SHA_A}])[
        "imageDetails"
    ]
    uri = f"123456789012.dkr.ecr.{REGION}.amazonaws.com/cars-api-stub"
    expected = f"{uri}@{image['imageDigest']}"
    result = make("deploy", {**stub, "POLL_SECONDS": "0"}, SHA=SHA_A)
    # moto's CloudFormation cannot create the service stack (no data stack exports): the release
    # stops there, after the migration ran.
    assert result.returncode != 0
    lines = result.stdout.splitlines()
    assert "the migration task exited 0" in lines, result.stdout + result.stderr
    migrated = lines.index("the migration task exited 0")
    deploying = next(i for i, line in enumerate(lines) if line.startswith("Deploying "))
    assert migrated < deploying, "the schema changes before the service does"
    assert f"Migrating the database schema with {expected}" in result.stdout
    ecs = client("ecs", moto_url)
    started = re.search(r"Started the migration task (arn:\S+/(\S+)/\S+)", result.stdout)
    (task,) = ecs.describe_tasks(cluster=started[2], tasks=[started[1]])["tasks"]
    assert task["startedBy"] == "cars-api-migration"
    assert task["lastStatus"] == "STOPPED"
    definition = ecs.describe_task_definition(taskDefinition=task["taskDefinitionArn"])
    container = definition["taskDefinition"]["containerDefinitions"][0]
    assert definition["taskDefinition"]["family"] == MIGRATE_FAMILY
    assert container["image"] == expected
    assert container["command"] == ["python", "cars.py", "migrate"]
    assert task["overrides"].get("containerOverrides", []) == [], "no credential passes through"


# make rotate-token against moto's Secrets Manager


def token_stages(moto_url, stub):
    secrets = client("secretsmanager", moto_url)
    stack = client("cloudformation", moto_url).describe_stacks(StackName=stub["BASE_STACK"])
    arn = next(
        o["OutputValue"]
        for o in stack["Stacks"][0]["Outputs"]
        if o["OutputKey"] == "ApiTokenSecretArn"
    )

    def value(stage):
        return secrets.get_secret_value(SecretId=arn, VersionStage=stage)["SecretString"]

    return value("AWSCURRENT"), value("AWSPREVIOUS") if has_previous(secrets, arn) else None


def has_previous(secrets, arn):
    stages = secrets.describe_secret(SecretId=arn)["VersionIdsToStages"]
    return any("AWSPREVIOUS" in labels for labels in stages.values())


def test_rotate_token_puts_a_new_token_and_keeps_the_old_one_as_previous(stub, moto_url):
    before, _ = token_stages(moto_url, stub)
    result = make("rotate-token", stub)
    assert result.returncode == 0, result.stderr
    current, previous = token_stages(moto_url, stub)
    assert previous == before
    assert current != before
    assert len(current) >= 32
    assert re.fullmatch(r"[A-Za-z0-9_-]+", current), "header-safe"
    assert current not in result.stdout + result.stderr, "never printed"
    assert "No service yet (stack cars-api-stub-service)" in result.stdout


def test_rotate_token_with_revoke_refuses_the_old_token_too(stub, moto_url):
    result = make("rotate-token", stub, REVOKE_PREVIOUS="true")
    assert result.returncode == 0, result.stderr
    current, previous = token_stages(moto_url, stub)
    assert previous == current
    assert "Revoked the previous token" in result.stdout


def test_rotate_token_refuses_a_setting_that_is_not_true_or_false(stub):
    result = make("rotate-token", stub, ROLL_TASKS="yes")
    assert result.returncode == 2
    assert "ROLL_TASKS must be true or false, not 'yes'" in error_line(result)
    assert "usage: make rotate-token" in result.stderr


def test_rotate_token_says_loudly_that_the_old_token_stays_valid_until_revoked(stub, moto_url):
    result = make("rotate-token", stub)
    assert result.returncode == 0, result.stderr
    assert "WARNING: THE OLD TOKEN IS STILL ACCEPTED" in result.stderr
    assert "make revoke-previous-token" in result.stderr
    status = make("status", stub)
    assert "its PREVIOUS value is still accepted (make revoke-previous-token ends that)" in (
        status.stdout
    )


def test_revoke_previous_token_ends_the_grace_period_of_the_old_token(stub, moto_url):
    assert make("rotate-token", stub).returncode == 0
    current, previous = token_stages(moto_url, stub)
    assert previous != current, "in its grace period"
    result = make("revoke-previous-token", stub)
    assert result.returncode == 0, result.stderr
    assert "Revoked the previous token" in result.stdout
    assert token_stages(moto_url, stub) == (current, current), "the old token is refused"
    assert "still accepted" not in make("status", stub).stdout
    again = make("revoke-previous-token", stub)
    assert again.returncode == 0, again.stderr
    assert "No previous token to revoke" in again.stdout
    assert token_stages(moto_url, stub) == (current, current)


def physical_ids(cfn, stacks):
    return {
        r["PhysicalResourceId"]
        for stack in stacks
        for r in cfn.list_stack_resources(StackName=stack)["StackResourceSummaries"]
        if r.get("PhysicalResourceId")
    }


def test_a_staging_prefix_deploys_beside_the_default_sharing_no_named_resource(
    base_stack, aws_env, moto_url
):
    assert base_stack.returncode == 0, base_stack.stderr
    iam = client("iam", moto_url)
    if not iam.list_open_id_connect_providers()["OpenIDConnectProviderList"]:
        # moto's CloudFormation makes no AWS::IAM::OIDCProvider: make the one the first stack
        # made in AWS (it outlives its stack: DeletionPolicy RetainExceptOnCreate).
        iam.create_open_id_connect_provider(
            Url="https://token.actions.githubusercontent.com", ClientIDList=["sts.amazonaws.com"]
        )
    staging = make("stack-deploy", {**aws_env, "STACK_PREFIX": "staging"}, **GITHUB)
    assert staging.returncode == 0, staging.stderr
    cfn = client("cloudformation", moto_url)
    default = ["cars-api-base", "cars-api-data", "cars-api-ci-access"]
    second = ["staging-base", "staging-data", "staging-ci-access"]
    for name in second:
        stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
        assert stack["StackStatus"] == "CREATE_COMPLETE", name
        parameters = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}
        assert parameters.get("Prefix", "staging") == "staging", name
    assert physical_ids(cfn, default).isdisjoint(physical_ids(cfn, second))
    ci = cfn.describe_stacks(StackName="staging-ci-access")["Stacks"][0]
    ci_parameters = {p["ParameterKey"]: p["ParameterValue"] for p in ci["Parameters"]}
    assert ci_parameters["CreateGitHubOidcProvider"] == "false", "the account's provider is reused"
    assert len(iam.list_open_id_connect_providers()["OpenIDConnectProviderList"]) == 1


def test_bootstrap_sha_before_the_base_stack_exists_is_refused_before_any_change(aws_env, moto_url):
    env = {**aws_env, "AWS_REGION": "sa-east-1"}
    result = make("stack-deploy", env, BOOTSTRAP_SHA=SHA_A, **GITHUB)
    assert result.returncode == 2, result.stderr
    assert error_line(result) == (
        "error: BOOTSTRAP_SHA: stack cars-api-base does not exist yet, so its repository holds no"
        " image; run make stack-deploy without it first"
    )
    assert (
        client("cloudformation", moto_url, region="sa-east-1").list_stacks()["StackSummaries"] == []
    )


def test_stack_deploy_never_bootstraps_with_the_newest_image_and_refuses_an_unscanned_one(
    base_stack, aws_env, moto_url
):
    assert base_stack.returncode == 0, base_stack.stderr
    cfn = client("cloudformation", moto_url)
    repository = resources(cfn, "cars-api-base")["Repository"]
    client("ecr", moto_url).put_image(
        repositoryName=repository,
        imageManifest=image_manifest("sha256:" + "cd" * 32),
        imageTag=SHA_A,
    )
    newest = make("stack-deploy", aws_env, **GITHUB)
    assert newest.returncode == 0, newest.stderr
    assert "no image chosen for the bootstrap task yet" in newest.stdout
    data = cfn.describe_stacks(StackName="cars-api-data")["Stacks"][0]
    assert {p["ParameterKey"]: p["ParameterValue"] for p in data["Parameters"]}["TaskImage"] == ""
    chosen = make("stack-deploy", aws_env, BOOTSTRAP_SHA=SHA_A, **GITHUB)
    assert chosen.returncode != 0
    assert error_line(chosen).startswith(
        f"error: BOOTSTRAP_SHA={SHA_A}: ECR has no scan of sha256:"
    )
    assert error_line(chosen).endswith(
        "the bootstrap and migration tasks run only an image that passes the scan gate: nothing"
        " was deployed"
    )
    after = cfn.describe_stacks(StackName="cars-api-data")["Stacks"][0]
    assert after.get("LastUpdatedTime") == data.get("LastUpdatedTime")
