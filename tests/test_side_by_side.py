"""Two environments in one account and Region (issue 21 item 3): the long-lived stacks, on moto.

Run as a script, this file is tests/moto_fixes.py's server plus the one attribute the service
stack's imports need that moto 5.2.5 lacks: Fn::GetAtt TargetGroup.TargetGroupFullName (without
it moto drops every output of the base stack, so nothing can import them).
"""

import json
import sys
import time

import pytest
from conftest import MOTO, TEMPLATES, client, moto_server

PREFIXES = ("cars-api", "staging")
DIGEST = "sha256:" + "0123456789abcdef" * 4
GITHUB = {"GitHubRepository": "acme/cars", "GitHubRepositoryId": "4242", "GitHubOwnerId": "42"}
CAPABILITIES = ["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"]


def create(cfn, name, template, **parameters):
    """Create stack `name` from a template of cloudformation/ and wait until it settles.

    With CreateStack: moto's change sets leave a new stack without outputs, hence exports.
    """
    cfn.create_stack(
        StackName=name,
        TemplateBody=(TEMPLATES / template).read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        Capabilities=CAPABILITIES,
    )
    deadline = time.monotonic() + 120
    while (stack := cfn.describe_stacks(StackName=name)["Stacks"][0])["StackStatus"].endswith(
        "_IN_PROGRESS"
    ):
        assert time.monotonic() < deadline, f"{name} still {stack['StackStatus']}"
        time.sleep(0.5)
    reasons = [
        f"{e['LogicalResourceId']}: {e.get('ResourceStatusReason')}"
        for e in cfn.describe_stack_events(StackName=name)["StackEvents"]
        if e.get("ResourceStatus", "").endswith("FAILED")
    ]
    assert stack["StackStatus"] == "CREATE_COMPLETE", (name, stack["StackStatus"], reasons)
    return stack


def physical(cfn, stack):
    """Logical id -> physical id of every resource of a stack."""
    resources = cfn.describe_stack_resources(StackName=stack)["StackResources"]
    return {r.get("LogicalResourceId", ""): r.get("PhysicalResourceId", "") for r in resources}


def deploy_environment(cfn, prefix, create_oidc_provider):
    """All four stacks of one environment, wired the way make stack-deploy and release wire them."""
    stacks = {kind: f"{prefix}-{kind}" for kind in ("base", "data", "ci-access", "service")}
    create(cfn, stacks["base"], "base.yaml", Prefix=prefix)
    base = physical(cfn, stacks["base"])
    outputs = {
        o["OutputKey"]: o["OutputValue"]
        for o in cfn.describe_stacks(StackName=stacks["base"])["Stacks"][0]["Outputs"]
    }
    shared = {
        "Prefix": prefix,
        "RepositoryName": base["Repository"],
        "ClusterName": base["Cluster"].split("/")[-1],
        "AlarmTopicArn": base["AlarmTopic"],
        "ExecutionRoleName": base["ExecutionRole"],
        "ServiceStackName": stacks["service"],
    }
    create(
        cfn,
        stacks["data"],
        "data.yaml",
        **shared,
        VpcId=base["Vpc"],
        PrivateSubnets=f"{base['PrivateSubnetA']},{base['PrivateSubnetB']}",
        DatabaseSecurityGroup=base["DatabaseSecurityGroup"],
        ServiceSecurityGroup=base["ServiceSecurityGroup"],
        LogGroupName=base["LogGroup"],
        TaskImage=f"{outputs['RepositoryUri']}@{DIGEST}",
        DatabaseReady="true",
    )
    data = physical(cfn, stacks["data"])
    create(
        cfn,
        stacks["ci-access"],
        "ci-access.yaml",
        **shared,
        **GITHUB,
        GitHubEnvironment=prefix,
        CreateGitHubOidcProvider=create_oidc_provider,
        BaseStackName=stacks["base"],
        DataStackName=stacks["data"],
        MigrationExecutionRoleName=data["MigrationExecutionRole"],
        TaskRoleName=base["TaskRole"],
        TaskSubnets=outputs["TaskSubnets"],
        TaskPublicIp="true",
    )
    # The per-release service stack is left out: moto 5.2.5's CloudFormation creates no
    # AWS::CloudWatch::Alarm, which its dashboard and deployment alarm name. Its names are the
    # stack's own (tests/test_templates.py checks that none is a literal).
    del stacks["service"]
    return stacks


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory):
    """This file's moto server on a free port of 127.0.0.1, for this module."""
    root = {"PYTHONPATH": str(TEMPLATES.parent)}  # conftest, imported by this file, imports cars
    yield from moto_server(tmp_path_factory, __file__, root)


@pytest.fixture(scope="module")
def environments(moto_url):
    cfn = client("cloudformation", moto_url)
    # The first environment creates the account's GitHub OIDC provider, the second reuses it
    # (moto creates no AWS::IAM::OIDCProvider; tests/test_attack_paths.py renders both cases).
    return cfn, {
        prefix: deploy_environment(cfn, prefix, "true" if prefix == PREFIXES[0] else "false")
        for prefix in PREFIXES
    }


NAMED_OUTPUTS = ("Name", "Arn", "Uri", "Url", "Id", "Host", "Subnets", "Group", "Family")


def names(cfn, stacks):
    """Every physical id and named output (not a port or a switch) of an environment's stacks."""
    found = set()
    for stack in stacks.values():
        found |= {v for v in physical(cfn, stack).values() if v}
        described = cfn.describe_stacks(StackName=stack)["Stacks"][0]
        found |= {
            o["OutputValue"]
            for o in described.get("Outputs", [])
            if o["OutputKey"].endswith(NAMED_OUTPUTS)
            and o["OutputKey"] != "DatabaseName"  # a schema inside each environment's database
            and "Fn::GetAtt" not in o["OutputValue"]  # what moto cannot resolve, it prints
        }
    return found


def test_both_environments_deploy_every_stack(environments):
    cfn, stacks = environments
    for prefix in PREFIXES:
        for name in stacks[prefix].values():
            status = cfn.describe_stacks(StackName=name)["Stacks"][0]["StackStatus"]
            assert status == "CREATE_COMPLETE", f"{name}: {status}"


def test_no_name_of_one_environment_appears_in_the_other(environments):
    cfn, stacks = environments
    production, staging = (names(cfn, stacks[prefix]) for prefix in PREFIXES)
    assert production & staging == set()
    assert [n for n in staging if "cars-api" in n] == []
    assert [n for n in production if "staging" in n] == []


def test_each_environment_names_its_own_resources_after_its_prefix(environments, moto_url):
    cfn, stacks = environments
    for prefix in PREFIXES:
        base = physical(cfn, stacks[prefix]["base"])
        assert base["Repository"] == prefix
        assert base["LogGroup"] == f"/ecs/{prefix}"
        secrets = client("secretsmanager", moto_url).describe_secret(
            SecretId=base["ApiTokenSecret"]
        )
        assert secrets["Name"] == f"{prefix}/api-token"
        data = physical(cfn, stacks[prefix]["data"])
        database = client("rds", moto_url).describe_db_instances(
            DBInstanceIdentifier=data["Database"]
        )["DBInstances"][0]
        assert database["DBInstanceIdentifier"] == f"{prefix}-data"


def test_each_deploy_role_reaches_only_its_own_environment(environments, moto_url):
    cfn, stacks = environments
    iam = client("iam", moto_url)
    policies = {}
    for prefix in PREFIXES:
        role = physical(cfn, stacks[prefix]["ci-access"])["DeployRole"]
        (name,) = iam.list_role_policies(RoleName=role)["PolicyNames"]
        document = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
        policies[prefix] = json.dumps(document)
        assert f":role/{prefix}/" in policies[prefix], "passes its own environment's roles"
    assert "cars-api" not in policies["staging"]
    assert "staging" not in policies["cars-api"]


def serve(argv):
    """moto_fixes.py's server with TargetGroupFullName (the part of the ARN after its last ':')."""
    sys.path.insert(0, str(MOTO.parent))
    import moto_fixes  # noqa: F401  # its fixes apply on import
    from moto.elbv2.models import FakeTargetGroup
    from moto.server import main

    FakeTargetGroup.has_cfn_attr = classmethod(lambda cls, name: name == "TargetGroupFullName")
    FakeTargetGroup.get_cfn_attribute = lambda group, name: group.arn.split(":")[-1]
    return main(argv)


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
