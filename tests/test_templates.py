"""Policy tests over the parsed CloudFormation templates: each test pins one rule of the design."""

import importlib.util
import json
import re

import pytest
from conftest import TEMPLATES, load_template

import cars

_SPEC = importlib.util.spec_from_file_location(
    "iam_scan", TEMPLATES.parent / "scripts" / "iam_scan.py"
)
iam_scan = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(iam_scan)
SECRET_VARIABLES = {
    "MYSQL_USER",
    "MYSQL_PASSWORD",
    "MYSQL_SSL_CA",
    "API_TOKEN",
    "API_TOKEN_PREVIOUS",
}
STATEFUL_TYPES = {
    "base.yaml": {"AWS::ECR::Repository", "AWS::Logs::LogGroup", "AWS::SecretsManager::Secret"},
    "data.yaml": {"AWS::RDS::DBInstance", "AWS::Logs::LogGroup", "AWS::SecretsManager::Secret"},
}
BASE_OUTPUTS = {
    "VpcId",
    "PublicSubnets",
    "PrivateSubnets",
    "LoadBalancerSecurityGroup",
    "ServiceSecurityGroup",
    "DatabaseSecurityGroup",
    "TargetGroupArn",
    "TargetGroupFullName",
    "LoadBalancerFullName",
    "ServiceUrl",
    "RepositoryName",
    "RepositoryUri",
    "RepositoryArn",
    "ClusterName",
    "ClusterArn",
    "LogGroupName",
    "LogGroupArn",
    "ApiTokenSecretArn",
    "AlarmTopicArn",
    "ExecutionRoleArn",
    "TaskRoleArn",
    "TaskSubnets",
    "TaskAssignPublicIp",
}
SERVICE_OUTPUTS = {"ServiceName", "ServiceArn", "TaskDefinitionArn", "ImageUri"}


@pytest.fixture(params=["base.yaml", "ci-access.yaml", "data.yaml", "service.yaml"], scope="module")
def template(request):
    return load_template(request.param)


def rendered(template, **parameters):
    """The resources a stack of template creates with these (else default) parameters."""
    return iam_scan.Renderer(template, **parameters).resources()


def imported(output, stack="BaseStackName"):
    """How the service stack reads an output of the base (or data) stack."""
    return {"Fn::ImportValue": {"Fn::Sub": f"${{{stack}}}:{output}"}}


def as_list(value):
    return value if isinstance(value, list) else [value]


def resources_of(template, resource_type):
    return {
        name: resource
        for name, resource in template["Resources"].items()
        if resource["Type"] == resource_type
    }


def statements(role):
    for policy in role["Properties"].get("Policies", []):
        yield from policy["PolicyDocument"]["Statement"]


def all_policy_statements(template):
    for resource in template["Resources"].values():
        properties = resource.get("Properties", {})
        documents = [p["PolicyDocument"] for p in properties.get("Policies", [])]
        if "PolicyDocument" in properties:
            documents.append(properties["PolicyDocument"])
        for document in documents:
            yield from document["Statement"]


def container(service):
    definitions = service["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"]
    assert len(definitions) == 1
    return definitions[0]


def ingress_rules(template, group):
    """Inline and stand-alone ingress rules of a security group."""
    rules = list(template["Resources"][group]["Properties"].get("SecurityGroupIngress", []))
    for resource in resources_of(template, "AWS::EC2::SecurityGroupIngress").values():
        if resource["Properties"]["GroupId"] == {"Ref": group}:
            rules.append(resource["Properties"])
    return rules


def walk(node):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


# ------------------------------------------------------------------ both templates


def test_every_parameter_and_output_has_a_description(template):
    for section in ("Parameters", "Outputs"):
        for name, entry in template[section].items():
            assert str(entry.get("Description", "")).strip(), f"{section}.{name} has no Description"


def test_every_output_is_exported_as_stack_name_and_output_name(template):
    for name, output in template["Outputs"].items():
        assert output["Export"]["Name"] == {"Fn::Sub": f"${{AWS::StackName}}:{name}"}, name


def test_every_checkov_skip_names_its_reason(template):
    for name, resource in template["Resources"].items():
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
            assert re.fullmatch(r"CKV2?_AWS_\d+", skip["id"]), name
            assert len(skip.get("comment", "").split()) >= 5, f"{name} skips {skip['id']} bare"


def test_no_policy_allows_every_action_of_a_service(template):
    for statement in all_policy_statements(template):
        if statement["Effect"] == "Deny":
            continue  # a Deny of s3:* (the audit bucket refusing plaintext) grants nothing
        for action in as_list(statement["Action"]):
            assert not action.endswith("*"), f"wildcard action {action}"


def test_wildcard_resources_are_limited_to_actions_without_resource_level_permissions(template):
    allowed = {
        "ecr:GetAuthorizationToken",
        "cloudformation:ListExports",
        "cloudformation:ValidateTemplate",
    }
    read_prefixes = ("Describe", "List", "Get")
    no_resource_level = {"ecs:RegisterTaskDefinition"}
    for statement in all_policy_statements(template):
        if statement["Resource"] != "*" or "Condition" in statement:
            continue
        for action in as_list(statement["Action"]):
            service, verb = action.split(":")
            assert (
                action in allowed
                or action in no_resource_level
                or verb.startswith(read_prefixes)
                or service == "application-autoscaling"
            ), f"{action} on '*'"


@pytest.mark.parametrize("name", ["data.yaml", "service.yaml"])
def test_every_alarm_notifies_the_alarm_topic(name):
    template = load_template(name)
    alarms = resources_of(template, "AWS::CloudWatch::Alarm")
    assert alarms
    topic = {"Ref": "AlarmTopicArn"} if "AlarmTopicArn" in template["Parameters"] else None
    for name, alarm in alarms.items():
        expected = topic or imported("AlarmTopicArn")
        assert alarm["Properties"]["AlarmActions"] == [expected], name
        assert alarm["Properties"]["OKActions"] == [expected], name


# ------------------------------------------------------------------ base stack


def test_base_exports_every_output_of_the_contract(base):
    assert set(base["Outputs"]) >= BASE_OUTPUTS


def test_ci_access_exports_the_deploy_role_and_takes_who_may_release(ci):
    assert set(ci["Outputs"]) == {"DeployRoleArn"}
    parameters = ci["Parameters"]
    assert parameters["CreateGitHubOidcProvider"]["Default"] == "true"
    assert parameters["ServiceStackName"]["Default"] == "cars-api-service"
    for name in ("GitHubRepository", "GitHubRepositoryId", "GitHubOwnerId"):
        assert "Default" not in parameters[name], name
    for name in ("GitHubRepositoryId", "GitHubOwnerId"):
        assert re.fullmatch(parameters[name]["AllowedPattern"], "123456")
        assert not re.fullmatch(parameters[name]["AllowedPattern"], "acme")


def test_base_parameters_have_the_contract_defaults(base):
    parameters = base["Parameters"]
    expected = {
        "CertificateArn": "",
        "AlarmEmail": "",
        "AllowPlaintextWrites": "false",
        "WebApplicationFirewall": "true",
        "TaskSubnetType": "public",
        "EnhancedImageScanning": "false",
    }
    for name, default in expected.items():
        assert parameters[name]["Default"] == default, name


@pytest.mark.parametrize("template_name", sorted(STATEFUL_TYPES))
def test_stateful_resources_carry_deletion_and_update_replace_policies(template_name):
    types = STATEFUL_TYPES[template_name]
    stateful = {
        name: resource
        for name, resource in load_template(template_name)["Resources"].items()
        if resource["Type"] in types
    }
    assert {r["Type"] for r in stateful.values()} == types
    for name, resource in stateful.items():
        deletion = resource.get("DeletionPolicy")
        assert deletion in {"Retain", "RetainExceptOnCreate", "Snapshot", "Delete"}, name
        # UpdateReplacePolicy has no RetainExceptOnCreate: a replacement keeps the old one.
        replace = "Retain" if deletion == "RetainExceptOnCreate" else deletion
        assert resource.get("UpdateReplacePolicy") == replace, name


def test_data_survives_stack_deletion_but_not_a_rolled_back_first_create(base, data, ci):
    assert data["Resources"]["Database"]["DeletionPolicy"] == "Snapshot"
    kept = [
        base["Resources"]["Repository"],
        base["Resources"]["ApiTokenSecret"],
        data["Resources"]["MigrationSecret"],  # the snapshot is useless without the users
        data["Resources"]["AppSecret"],
        ci["Resources"]["GitHubOidcProvider"],  # other environments' deploy roles trust it
    ]
    for resource in kept:
        assert resource["DeletionPolicy"] == "RetainExceptOnCreate", resource["Type"]
        assert resource["UpdateReplacePolicy"] == "Retain", resource["Type"]


def test_nothing_a_failed_first_create_leaves_behind_blocks_the_rerun(template):
    """Whatever a rollback keeps is either unnamed or named after the stack's own id."""
    for name, resource in template["Resources"].items():
        if resource.get("DeletionPolicy") != "Retain":
            continue
        names = [v for k, v in resource.get("Properties", {}).items() if k.endswith("Name")]
        assert all("AWS::StackId" in json.dumps(v) for v in names), name


def test_the_database_can_roll_back_until_the_bootstrap_made_it_ready(data):
    parameter = data["Parameters"]["DatabaseReady"]
    assert parameter["Default"] == "false"
    assert parameter["AllowedValues"] == ["true", "false"]
    assert data["Conditions"]["Ready"] == {"Fn::Equals": [{"Ref": "DatabaseReady"}, "true"]}
    database = data["Resources"]["Database"]["Properties"]
    assert database["DeletionProtection"] == {"Fn::If": ["Ready", True, False]}
    for ready, protected in (("false", False), ("true", True)):
        database = rendered(data, DatabaseReady=ready)["Database"]["Properties"]
        assert database["DeletionProtection"] is protected


def test_no_template_creates_a_service_linked_role(template):
    """stack-deploy creates them first; one created here would race or collide with it."""
    assert not resources_of(template, "AWS::IAM::ServiceLinkedRole")


def test_repository_tags_are_immutable_and_scanned_on_push(base):
    repository = base["Resources"]["Repository"]["Properties"]
    assert repository["ImageTagMutability"] == "IMMUTABLE"
    assert repository["ImageScanningConfiguration"]["ScanOnPush"] is True


def test_repository_lifecycle_rule_expires_old_images(base):
    text = base["Resources"]["Repository"]["Properties"]["LifecyclePolicy"]["LifecyclePolicyText"]
    rules = json.loads(text)["rules"]
    assert rules
    assert all(rule["action"]["type"] == "expire" for rule in rules)
    assert all(rule["selection"]["countNumber"] >= 10 for rule in rules), "keep rollback targets"


def test_cluster_has_container_insights(base):
    settings = base["Resources"]["Cluster"]["Properties"]["ClusterSettings"]
    assert {"Name": "containerInsights", "Value": "enabled"} in settings


def test_log_group_is_named_for_the_prefix_and_has_retention(base):
    log_group = base["Resources"]["LogGroup"]["Properties"]
    assert log_group["LogGroupName"] == {"Fn::Sub": "/ecs/${Prefix}"}
    assert log_group["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def test_database_is_private_encrypted_protected_and_backed_up(data):
    database = data["Resources"]["Database"]["Properties"]
    assert database["Engine"] == "mysql"
    assert re.fullmatch(r"8\.4\.\d+", database["EngineVersion"]), "pin a MySQL 8.4 LTS minor"
    assert database["EngineLifecycleSupport"] == "open-source-rds-extended-support-disabled"
    assert database["PubliclyAccessible"] is False
    assert database["StorageEncrypted"] is True
    assert database["DeletionProtection"] == {"Fn::If": ["Ready", True, False]}
    assert database["BackupRetentionPeriod"] >= 7
    assert database["MultiAZ"] == {"Fn::If": ["IsMultiAz", True, False]}
    subnets = data["Resources"]["DatabaseSubnetGroup"]["Properties"]["SubnetIds"]
    assert subnets == {"Ref": "PrivateSubnets"}


def test_private_subnets_have_no_route_to_the_internet(base):
    for route in resources_of(base, "AWS::EC2::Route").values():
        assert route["Properties"]["RouteTableId"] != {"Ref": "PrivateRouteTable"}


def test_api_token_is_generated_by_secrets_manager(base):
    token = base["Resources"]["ApiTokenSecret"]["Properties"]
    assert "SecretString" not in token
    assert token["GenerateSecretString"]["PasswordLength"] >= 32


def test_no_template_holds_a_literal_secret(template):
    for node in walk(template):
        if isinstance(node, dict):
            assert "SecretString" not in node
            assert "MasterUserPassword" not in node or "resolve:secretsmanager" in str(
                node["MasterUserPassword"]
            )


def test_database_accepts_mysql_only_from_the_service_and_the_rotation(base, data):
    rules = ingress_rules(base, "DatabaseSecurityGroup")
    assert rules
    for rule in rules:
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 3306, 3306)
        assert rule["SourceSecurityGroupId"] == {"Ref": "ServiceSecurityGroup"}
        assert "CidrIp" not in rule
    extra = resources_of(data, "AWS::EC2::SecurityGroupIngress")
    assert [r["Properties"] for r in extra.values()] == [
        {
            "Description": "MySQL from the secret rotation functions",
            "GroupId": {"Ref": "DatabaseSecurityGroup"},
            "IpProtocol": "tcp",
            "FromPort": 3306,
            "ToPort": 3306,
            "SourceSecurityGroupId": {"Ref": "RotationSecurityGroup"},
        }
    ]


def test_service_accepts_8080_only_from_the_load_balancer(base):
    rules = ingress_rules(base, "ServiceSecurityGroup")
    assert rules
    for rule in rules:
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 8080, 8080)
        assert rule["SourceSecurityGroupId"] == {"Ref": "LoadBalancerSecurityGroup"}
        assert "CidrIp" not in rule


def test_load_balancer_is_open_only_on_http_and_https(base):
    for rule in ingress_rules(base, "LoadBalancerSecurityGroup"):
        assert rule["IpProtocol"] == "tcp"
        assert rule["FromPort"] == rule["ToPort"]
        assert rule["FromPort"] in {80, 443}


def test_load_balancer_drops_invalid_headers(base):
    attributes = base["Resources"]["LoadBalancer"]["Properties"]["LoadBalancerAttributes"]
    assert {"Key": "routing.http.drop_invalid_header_fields.enabled", "Value": "true"} in attributes


def test_target_group_checks_health_and_drains_quickly(base):
    target_group = base["Resources"]["TargetGroup"]["Properties"]
    assert target_group["HealthCheckPath"] == "/health"
    assert target_group["TargetType"] == "ip"
    assert target_group["Port"] == 8080
    delay = {a["Key"]: a["Value"] for a in target_group["TargetGroupAttributes"]}[
        "deregistration_delay.timeout_seconds"
    ]
    assert int(delay) <= 30


# ------------------------------------------------------------------ side by side (issue 21 item 3)

# Properties that name a resource in a namespace shared by the account (or the world): none of
# them may be a literal, or two environments would collide on it.
NAMES_ANYWHERE = {
    "AlarmName",
    "BucketName",
    "DashboardName",
    "DBInstanceIdentifier",
    "FunctionName",
    "LogGroupName",
    "MetricNamespace",
    "RepositoryName",
    "RoleName",
    "RotationLambdaName",
    "TopicName",
}
NAMES_OF_TYPE = {
    "AWS::ECS::TaskDefinition": {"Family"},
    "AWS::ECS::Service": {"ServiceName"},
    "AWS::IAM::Role": {"Path"},
    "AWS::SNS::Topic": {"DisplayName"},
    "AWS::SecretsManager::Secret": {"Name"},
}


def literal_names(template):
    """(resource, property, value) of every name that is a plain string."""
    for name, resource in template["Resources"].items():
        properties = resource.get("Properties", {})
        for key in NAMES_OF_TYPE.get(resource["Type"], ()):
            if isinstance(properties.get(key), str):
                yield name, key, properties[key]
        for node in walk(properties):
            if not isinstance(node, dict):
                continue
            for key, value in node.items():
                if key in NAMES_ANYWHERE and isinstance(value, str):
                    yield name, key, value
            visibility = node.get("VisibilityConfig", {})
            if isinstance(visibility.get("MetricName"), str):
                yield name, "VisibilityConfig.MetricName", visibility["MetricName"]
            namespace = node.get("Namespace")
            if isinstance(namespace, str) and not namespace.startswith(("AWS/", "ECS/")):
                yield name, "Namespace", namespace


def test_no_resource_name_is_a_literal(template):
    assert list(literal_names(template)) == []


def test_the_name_check_catches_a_fixed_name(base):
    fixed = json.loads(json.dumps(base))
    fixed["Resources"]["LogGroup"]["Properties"]["LogGroupName"] = "/ecs/cars-api"
    assert list(literal_names(fixed)) == [("LogGroup", "LogGroupName", "/ecs/cars-api")]


@pytest.mark.parametrize("name", ["base.yaml", "ci-access.yaml", "data.yaml", "service.yaml"])
def test_every_template_takes_the_same_prefix(name):
    prefix = load_template(name)["Parameters"]["Prefix"]
    assert prefix["Default"] == "cars-api"
    assert prefix["Description"]
    assert prefix["MaxLength"] == 20
    pattern = prefix["AllowedPattern"]
    for good in ("cars-api", "staging", "team-a2"):
        assert re.fullmatch(pattern, good), good
    for bad in ("Staging", "cars--api", "-cars", "cars-", "cars_api", "2cars", "a.b"):
        assert not re.fullmatch(pattern, bad), bad


@pytest.mark.parametrize("prefix", ["cars-api", "staging"])
def test_names_follow_the_prefix(base, data, ci, prefix):
    resources = rendered(base, Prefix=prefix)
    assert resources["Repository"]["Properties"]["RepositoryName"] == prefix
    assert resources["LogGroup"]["Properties"]["LogGroupName"] == f"/ecs/{prefix}"
    assert resources["ExecutionRole"]["Properties"]["Path"] == f"/{prefix}/"
    bucket = resources["AuditBucket"]["Properties"]["BucketName"]
    assert bucket.startswith(f"aws-waf-logs-{prefix}-")
    database = rendered(data, Prefix=prefix)["Database"]["Properties"]
    assert database["DBInstanceIdentifier"] == f"{prefix}-data"
    (passing,) = granting(deploy_statements(ci, Prefix=prefix), "iam:PassRole")
    assert all(f":role/{prefix}/" in arn for arn in passing["Resource"])


# ------------------------------------------------------------------ entry point (issue 10 item 1)

CERTIFICATE = "arn:aws:acm:eu-west-1:123456789012:certificate/0a1b2c3d-0000-4000-8000-000000000000"


def assert_the_apps_problem_shape(fixed):
    """A fixed answer of the load balancer reads like cars.py's problem+json errors."""
    body = json.loads(fixed["MessageBody"])
    status = int(fixed["StatusCode"])
    assert body["detail"].strip()
    assert body == cars.problem(status, body["detail"]).body
    # ALB allows text/plain, text/css, text/html, application/javascript and application/json
    # only: application/json is the nearest to the app's application/problem+json.
    assert fixed["ContentType"] == "application/json"


def test_plain_http_serves_reads_only_and_refuses_writes_by_default(base):
    resources = rendered(base)
    assert "HttpsListener" not in resources
    (action,) = resources["HttpListener"]["Properties"]["DefaultActions"]
    assert action["Type"] == "fixed-response"
    refusal = action["FixedResponseConfig"]
    assert refusal["StatusCode"] == "403"
    assert_the_apps_problem_shape(refusal)
    assert "TLS" in json.loads(refusal["MessageBody"])["detail"]
    rule = resources["PlaintextReadsRule"]["Properties"]
    assert rule["ListenerArn"] == "httplistener-placeholder"
    (condition,) = rule["Conditions"]
    assert condition["Field"] == "http-request-method"
    assert sorted(condition["HttpRequestMethodConfig"]["Values"]) == ["GET", "HEAD"]
    assert rule["Actions"] == [{"Type": "forward", "TargetGroupArn": "targetgroup-placeholder"}]


def test_plain_http_writes_need_the_explicit_opt_in(base):
    resources = rendered(base, AllowPlaintextWrites="true")
    assert "PlaintextReadsRule" not in resources
    assert resources["HttpListener"]["Properties"]["DefaultActions"] == [
        {"Type": "forward", "TargetGroupArn": "targetgroup-placeholder"}
    ]
    with_certificate = rendered(
        base, AllowPlaintextWrites="true", CertificateArn=CERTIFICATE, DomainName="api.example.com"
    )
    (action,) = with_certificate["HttpListener"]["Properties"]["DefaultActions"]
    assert action["Type"] == "redirect", "a certificate always wins over plain HTTP"


def test_with_a_certificate_http_redirects_to_the_domain_name(base):
    resources = rendered(base, CertificateArn=CERTIFICATE, DomainName="api.example.com")
    assert "PlaintextReadsRule" not in resources
    (action,) = resources["HttpListener"]["Properties"]["DefaultActions"]
    assert action["Type"] == "redirect"
    redirect = action["RedirectConfig"]
    assert redirect["Protocol"] == "HTTPS"
    assert redirect["Host"] == "api.example.com", "never the client's Host header"
    assert redirect["StatusCode"] == "HTTP_301"


def test_https_is_gcm_only_hardened_and_serves_only_the_domain_name(base):
    resources = rendered(base, CertificateArn=CERTIFICATE, DomainName="api.example.com")
    https = resources["HttpsListener"]["Properties"]
    # TLS13-1-2-Res: TLS 1.3/1.2, ECDHE key exchange and AES-GCM only (no CBC, no RSA kex).
    assert https["SslPolicy"] == "ELBSecurityPolicy-TLS13-1-2-Res-2021-06"
    attributes = {a["Key"]: a["Value"] for a in https["ListenerAttributes"]}
    hsts = attributes["routing.http.response.strict_transport_security.header_value"]
    assert int(re.fullmatch(r"max-age=(\d+).*", hsts).group(1)) >= 31536000
    assert attributes["routing.http.response.x_content_type_options.header_value"] == "nosniff"
    assert attributes["routing.http.response.server.enabled"] == "false"
    (default,) = https["DefaultActions"]
    assert default["Type"] == "fixed-response"
    assert default["FixedResponseConfig"]["StatusCode"] == "404"
    assert_the_apps_problem_shape(default["FixedResponseConfig"])
    rules = [
        r["Properties"]
        for r in resources.values()
        if r["Type"] == "AWS::ElasticLoadBalancingV2::ListenerRule"
        and r["Properties"]["ListenerArn"] == "httpslistener-placeholder"
    ]
    assert len(rules) == 1
    assert rules[0]["Conditions"] == [
        {"Field": "host-header", "HostHeaderConfig": {"Values": ["api.example.com"]}}
    ]
    assert rules[0]["Actions"] == [{"Type": "forward", "TargetGroupArn": "targetgroup-placeholder"}]
    plain = {
        a["Key"]: a["Value"] for a in resources["HttpListener"]["Properties"]["ListenerAttributes"]
    }
    assert plain["routing.http.response.server.enabled"] == "false"


def test_only_the_https_listener_forwards_without_a_host_check(base):
    """Apart from the reads-only rule, nothing forwards plain HTTP by default."""
    forwards = [
        name
        for name, resource in rendered(base).items()
        for node in walk(resource)
        if isinstance(node, dict) and node.get("Type") == "forward"
    ]
    assert forwards == ["PlaintextReadsRule"]


# ------------------------------------------------------------------ deploy role trust (item 4)


def subjects(owner_id, repository_id, repository, environment="production"):
    return [
        f"repository_owner_id:{owner_id}:repository_id:{repository_id}:environment:{environment}"
        f":ref:refs/heads/main:job_workflow_ref:{repository}/.github/workflows/{workflow}"
        "@refs/heads/main"
        for workflow in ("ci.yml", "rollback.yml")
    ]


def test_deploy_role_trusts_exactly_ci_and_rollback_on_main_by_numeric_ids(ci):
    role = rendered(ci, GitHubOwnerId="42", GitHubRepositoryId="4242", GitHubRepository="acme/cars")
    trust = role["DeployRole"]["Properties"]["AssumeRolePolicyDocument"]
    (statement,) = trust["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert set(statement["Condition"]) == {"StringEquals"}, "no StringLike wildcards"
    condition = statement["Condition"]["StringEquals"]
    assert set(condition) == {
        "token.actions.githubusercontent.com:aud",
        "token.actions.githubusercontent.com:sub",
    }
    assert condition["token.actions.githubusercontent.com:aud"] == "sts.amazonaws.com"
    assert condition["token.actions.githubusercontent.com:sub"] == subjects(
        "42", "4242", "acme/cars"
    )
    assert "*" not in json.dumps(condition)


def test_each_environment_has_its_own_deploy_role(ci):
    assert ci["Parameters"]["GitHubEnvironment"]["Default"] == "production"
    ids = {"GitHubOwnerId": "42", "GitHubRepositoryId": "4242", "GitHubRepository": "acme/cars"}
    role = rendered(ci, GitHubEnvironment="staging", **ids)["DeployRole"]["Properties"]
    (statement,) = role["AssumeRolePolicyDocument"]["Statement"]
    trusted = statement["Condition"]["StringEquals"]["token.actions.githubusercontent.com:sub"]
    assert trusted == subjects("42", "4242", "acme/cars", "staging")
    assert not [s for s in trusted if ":environment:production:" in s]


def test_deploy_role_trusts_the_github_oidc_provider_created_or_existing(ci):
    trust = ci["Resources"]["DeployRole"]["Properties"]["AssumeRolePolicyDocument"]
    federated = trust["Statement"][0]["Principal"]["Federated"]["Fn::If"]
    assert federated[0] == "CreateOidcProvider"
    assert federated[1] == {"Ref": "GitHubOidcProvider"}
    assert federated[2]["Fn::Sub"].endswith(":oidc-provider/token.actions.githubusercontent.com")
    provider = ci["Resources"]["GitHubOidcProvider"]
    assert provider["Condition"] == "CreateOidcProvider"
    assert provider["Properties"]["ClientIdList"] == ["sts.amazonaws.com"]


def test_deploy_role_pushes_only_to_this_repository(ci):
    for statement in statements(ci["Resources"]["DeployRole"]):
        actions = set(as_list(statement["Action"]))
        ecr = {a for a in actions if a.startswith("ecr:")} - {"ecr:GetAuthorizationToken"}
        if ecr:
            assert statement["Resource"] == {
                "Fn::Sub": "arn:${AWS::Partition}:ecr:${AWS::Region}:${AWS::AccountId}"
                ":repository/${RepositoryName}"
            }


def test_deploy_role_changes_only_the_service_stack(ci):
    service_stack = (
        "arn:${AWS::Partition}:cloudformation:${AWS::Region}:${AWS::AccountId}"
        ":stack/${ServiceStackName}/*"
    )
    writes = {
        "cloudformation:CreateChangeSet",
        "cloudformation:ExecuteChangeSet",
        "cloudformation:CreateStack",
        "cloudformation:UpdateStack",
    }
    granted = set()
    for statement in statements(ci["Resources"]["DeployRole"]):
        actions = set(as_list(statement["Action"]))
        assert "cloudformation:DeleteStack" not in actions
        if actions & writes:
            assert statement["Resource"] == {"Fn::Sub": service_stack}
            granted |= actions & writes
    assert granted == writes


# ------------------------------------------------------------------ deploy role permissions

# The deploy role's complete list of actions, reviewed against the IAM service authorization
# reference. A new action fails test_deploy_role_actions_are_exactly_the_reviewed_allow_list
# until a person reviews it and adds it here.
DEPLOY_ROLE_ACTIONS = {
    # images: push by digest, scan-gate, list (release-path relies on each of these)
    "ecr:GetAuthorizationToken",
    "ecr:BatchCheckLayerAvailability",
    "ecr:BatchGetImage",
    "ecr:CompleteLayerUpload",
    "ecr:DescribeImageScanFindings",
    "ecr:DescribeImages",
    "ecr:DescribeRepositories",
    "ecr:GetDownloadUrlForLayer",
    "ecr:InitiateLayerUpload",
    "ecr:ListImages",
    "ecr:PutImage",
    "ecr:UploadLayerPart",
    # the service stack only (the base stack is read)
    "cloudformation:CancelUpdateStack",
    "cloudformation:ContinueUpdateRollback",
    "cloudformation:CreateChangeSet",
    "cloudformation:CreateStack",
    "cloudformation:DeleteChangeSet",
    "cloudformation:DescribeChangeSet",
    "cloudformation:DescribeStackEvents",
    "cloudformation:DescribeStackResource",
    "cloudformation:DescribeStackResources",
    "cloudformation:DescribeStacks",
    "cloudformation:ExecuteChangeSet",
    "cloudformation:GetTemplate",
    "cloudformation:GetTemplateSummary",
    "cloudformation:ListChangeSets",
    "cloudformation:ListExports",
    "cloudformation:ListStackResources",
    "cloudformation:UpdateStack",
    "cloudformation:ValidateTemplate",
    # what the service stack contains
    "ecs:CreateService",
    "ecs:DeleteService",
    "ecs:DescribeClusters",
    "ecs:DescribeServiceDeployments",
    "ecs:DescribeServices",
    "ecs:DescribeTaskDefinition",
    "ecs:DescribeTasks",
    "ecs:ListServiceDeployments",
    "ecs:ListServices",
    "ecs:ListTagsForResource",
    "ecs:ListTaskDefinitions",
    "ecs:ListTasks",
    "ecs:RegisterTaskDefinition",
    "ecs:RunTask",  # the release's migration task only
    "ecs:StopServiceDeployment",
    "ecs:StopTask",  # a migration that overruns its time
    "ecs:TagResource",
    "ecs:UntagResource",
    "ecs:UpdateService",
    "iam:PassRole",
    "application-autoscaling:DeleteScalingPolicy",
    "application-autoscaling:DeregisterScalableTarget",
    "application-autoscaling:DescribeScalableTargets",
    "application-autoscaling:DescribeScalingActivities",
    "application-autoscaling:DescribeScalingPolicies",
    "application-autoscaling:DescribeScheduledActions",
    "application-autoscaling:ListTagsForResource",
    "application-autoscaling:PutScalingPolicy",
    "application-autoscaling:RegisterScalableTarget",
    "cloudwatch:DeleteAlarms",
    "cloudwatch:DescribeAlarms",
    "cloudwatch:GetMetricData",
    "cloudwatch:ListTagsForResource",
    "cloudwatch:PutMetricAlarm",
    "cloudwatch:TagResource",
    "cloudwatch:UntagResource",
    "cloudwatch:DeleteDashboards",  # the service stack's dashboard only
    "cloudwatch:GetDashboard",
    "cloudwatch:PutDashboard",
    # status and verification (no logs: CI reads none, and they could carry what a task printed)
    "elasticloadbalancing:DescribeLoadBalancers",
    "elasticloadbalancing:DescribeTargetGroups",
    "elasticloadbalancing:DescribeTargetHealth",
}


# What make stack-deploy passes in, for the policy tests to read back.
BASE_RESOURCES = {
    "ClusterName": "cluster-x",
    "AlarmTopicArn": "arn:aws:sns:eu-west-1:123456789012:topic-x",
    "ExecutionRoleName": "execution-x",
    "TaskRoleName": "task-x",
    "TaskSubnets": "subnet-1,subnet-2",
    "MigrationExecutionRoleName": "migration-x",
}


def deploy_statements(ci, **parameters):
    role = rendered(ci, **{**BASE_RESOURCES, **parameters})["DeployRole"]
    return [s for p in role["Properties"]["Policies"] for s in p["PolicyDocument"]["Statement"]]


def granting(statements_, action):
    found = [s for s in statements_ if action in as_list(s["Action"])]
    assert found, f"{action} is not granted"
    return found


def test_deploy_role_actions_are_exactly_the_reviewed_allow_list(ci):
    granted = set()
    for statement in deploy_statements(ci):
        assert statement["Effect"] == "Allow"
        assert "NotAction" not in statement
        assert "NotResource" not in statement
        granted |= set(as_list(statement["Action"]))
    assert granted - DEPLOY_ROLE_ACTIONS == set(), "new actions: review them, then allow-list"
    assert DEPLOY_ROLE_ACTIONS - granted == set(), "dropped actions: remove them from the list"


def test_deploy_role_has_no_iam_write_action(ci):
    iam = {a for s in deploy_statements(ci) for a in as_list(s["Action"]) if a.startswith("iam:")}
    assert iam == {"iam:PassRole"}


def test_deploy_role_passes_exactly_the_task_roles_and_the_migration_role_only_to_ecs_tasks(ci):
    (statement,) = granting(deploy_statements(ci), "iam:PassRole")
    assert as_list(statement["Action"]) == ["iam:PassRole"]
    assert sorted(statement["Resource"]) == [
        "arn:aws:iam::123456789012:role/cars-api/execution-x",
        "arn:aws:iam::123456789012:role/cars-api/migration-x",
        "arn:aws:iam::123456789012:role/cars-api/task-x",
    ]
    assert statement["Condition"] == {
        "StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}
    }


SERVICE_ARN = "arn:aws:ecs:eu-west-1:123456789012:service/cluster-x/cars-api-service"
FAMILY_ARN = "arn:aws:ecs:eu-west-1:123456789012:task-definition/cars-api-service:*"
MIGRATE_ARN = "arn:aws:ecs:eu-west-1:123456789012:task-definition/cars-api-data-migrate:*"


def test_deploy_role_changes_only_the_one_service_with_its_family_and_subnets(ci):
    for public_ip in ("true", "false"):
        statements_ = deploy_statements(ci, TaskPublicIp=public_ip)
        for action in ("ecs:CreateService", "ecs:UpdateService"):
            (statement,) = granting(statements_, action)
            assert statement["Resource"] == SERVICE_ARN
            assert statement["Condition"] == {
                "ArnLikeIfExists": {"ecs:task-definition": FAMILY_ARN},
                "StringEqualsIfExists": {
                    "ecs:enable-execute-command": "false",
                    "ecs:enable-service-connect": "false",
                },
                "ForAllValues:StringEquals": {"ecs:subnet": ["subnet-1", "subnet-2"]},
                "BoolIfExists": {"ecs:auto-assign-public-ip": public_ip},
            }
    statements_ = deploy_statements(ci)
    (register,) = granting(statements_, "ecs:RegisterTaskDefinition")
    assert register["Resource"] == [FAMILY_ARN, MIGRATE_ARN]
    for action in ("ecs:DeleteService", "ecs:TagResource", "ecs:DescribeServices"):
        for statement in granting(statements_, action):
            assert SERVICE_ARN in as_list(statement["Resource"])
            assert all("cars-api-service" in r for r in as_list(statement["Resource"]))


def test_deploy_role_scales_only_ecs_desired_counts(ci):
    for statement in deploy_statements(ci):
        writes = [
            a
            for a in as_list(statement["Action"])
            if a.startswith("application-autoscaling:")
            and not a.split(":")[1].startswith(("Describe", "List"))
        ]
        if writes:
            assert statement["Condition"] == {
                "StringEquals": {
                    "application-autoscaling:service-namespace": "ecs",
                    "application-autoscaling:scalable-dimension": "ecs:service:DesiredCount",
                }
            }


def test_deploy_role_alarm_actions_reach_only_the_topic_and_the_service_scaling(ci):
    (statement,) = granting(deploy_statements(ci), "cloudwatch:PutMetricAlarm")
    assert statement["Condition"] == {
        "ForAllValues:ArnLike": {
            "cloudwatch:AlarmActions": [
                "arn:aws:sns:eu-west-1:123456789012:topic-x",
                "arn:aws:autoscaling:eu-west-1:123456789012:scalingPolicy:*:resource/ecs/service"
                "/cluster-x/cars-api-service:policyName/*",
            ]
        }
    }
    for resource in as_list(statement["Resource"]):
        assert re.search(
            r":alarm:(TargetTracking-service/cluster-x/)?cars-api-service-\*$", resource
        )


def test_every_wildcard_resource_says_why():
    for name in ("base.yaml", "ci-access.yaml", "data.yaml", "service.yaml"):
        for number, line in enumerate((TEMPLATES / name).read_text().splitlines(), 1):
            if re.search(r"Resource: '\*'", line):
                assert re.search(r"'\*'\s+#\s*\S.{10,}", line), f"{name}:{number} {line.strip()}"


def test_iam_scanner_renders_the_deploy_role_with_placeholders(capsys):
    assert iam_scan.main(["iam_scan.py", "--print"]) == 0
    document = json.loads(capsys.readouterr().out)
    text = json.dumps(document)
    assert "${" not in text
    assert "Fn::" not in text
    assert {a for s in document["Statement"] for a in as_list(s["Action"])} == DEPLOY_ROLE_ACTIONS


# ------------------------------------------------------------------ firewall (item 5)

WAF_RESOURCES = {"WebAcl", "WebAclAssociation", "WafLogging"}


CLOUDSPLAINING = TEMPLATES.parent / ".venv" / "cloudsplaining" / "bin" / "cloudsplaining"


def test_iam_analyser_passes_the_deploy_role_and_fails_an_unscoped_iam_write(tmp_path, capsys):
    assert CLOUDSPLAINING.exists(), "make lint installs cloudsplaining into .venv/cloudsplaining"
    assert iam_scan.main(["iam_scan.py", str(CLOUDSPLAINING)]) == 0
    text = (TEMPLATES / "ci-access.yaml").read_text()
    anchor = "              - Sid: PassTheTaskRolesToEcsTasks\n"
    assert anchor in text
    minting = "              - {Effect: Allow, Action: iam:CreateRole, Resource: '*'}\n"
    worse = tmp_path / "ci-access.yaml"
    worse.write_text(text.replace(anchor, minting + anchor))
    capsys.readouterr()
    assert iam_scan.main(["iam_scan.py", str(CLOUDSPLAINING), str(worse)]) == 1
    report = capsys.readouterr().err
    assert "iam:CreateRole" in report
    assert "Privilege Escalation" in report or "Resource Exposure" in report


def waf_rules(base):
    return {r["Name"]: r for r in rendered(base)["WebAcl"]["Properties"]["Rules"]}


def test_waf_guards_the_load_balancer_by_default(base):
    resources = rendered(base)
    assert set(resources) >= WAF_RESOURCES
    association = resources["WebAclAssociation"]["Properties"]
    assert association["ResourceArn"] == "loadbalancer-placeholder"
    assert resources["WebAcl"]["Properties"]["Scope"] == "REGIONAL"
    assert set(rendered(base, WebApplicationFirewall="false")) & WAF_RESOURCES == set()


def test_waf_runs_the_common_and_known_bad_inputs_rule_groups(base):
    rules = waf_rules(base)
    for group in ("AWSManagedRulesCommonRuleSet", "AWSManagedRulesKnownBadInputsRuleSet"):
        statement = rules[group]["Statement"]["ManagedRuleGroupStatement"]
        assert (statement["VendorName"], statement["Name"]) == ("AWS", group)
        assert rules[group]["OverrideAction"] == {"None": {}}, "count-only would block nothing"
    # Only the 8 KiB body rule is relaxed: the app accepts up to MAX_BODY.
    overrides = rules["AWSManagedRulesCommonRuleSet"]["Statement"]["ManagedRuleGroupStatement"][
        "RuleActionOverrides"
    ]
    assert overrides == [{"Name": "SizeRestrictions_BODY", "ActionToUse": {"Count": {}}}]


def test_waf_limits_requests_per_ip_and_writes_tighter(base):
    rules = waf_rules(base)
    every = rules["RequestsPerIp"]
    writes = rules["WritesPerIp"]
    for rule in (every, writes):
        assert rule["Action"] == {"Block": {}}
        assert rule["Statement"]["RateBasedStatement"]["AggregateKeyType"] == "IP"
    assert "ScopeDownStatement" not in every["Statement"]["RateBasedStatement"]
    limit = writes["Statement"]["RateBasedStatement"]["Limit"]
    assert limit < every["Statement"]["RateBasedStatement"]["Limit"]
    scope = writes["Statement"]["RateBasedStatement"]["ScopeDownStatement"]
    reads = re.compile(scope["NotStatement"]["Statement"]["RegexMatchStatement"]["RegexString"])
    assert scope["NotStatement"]["Statement"]["RegexMatchStatement"]["FieldToMatch"] == {
        "Method": {}
    }
    assert [m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE") if not reads.match(m)] == [
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
    ]


def test_waf_blocks_bodies_only_above_the_apps_limit(base):
    rule = waf_rules(base)["BodyLargerThanTheApp"]
    assert rule["Action"] == {"Block": {}}
    statement = rule["Statement"]["RegexMatchStatement"]
    assert statement["FieldToMatch"] == {"SingleHeader": {"Name": "content-length"}}
    too_large = re.compile(statement["RegexString"])
    limit = cars.MAX_BODY
    for length in (0, 1, 8192, limit - 1, limit, 9999):
        assert not too_large.match(str(length)), length
    for length in (limit + 1, limit + 1000, 99999, 100000, 10**9):
        assert too_large.match(str(length)), length


def test_waf_logs_without_the_bearer_token(base):
    resources = rendered(base)
    logging = resources["WafLogging"]["Properties"]
    assert logging["ResourceArn"] == "arn:aws:wafv2:eu-west-1:123456789012:webacl-placeholder"
    assert logging["RedactedFields"] == [{"SingleHeader": {"Name": "authorization"}}]


# ------------------------------------------------------------------ private tasks (item 6)

ENDPOINTS = {"ecr.api", "ecr.dkr", "logs", "secretsmanager"}


def endpoints(resources):
    found = {}
    for resource in resources.values():
        if resource["Type"] == "AWS::EC2::VPCEndpoint":
            service = resource["Properties"]["ServiceName"].removeprefix("com.amazonaws.eu-west-1.")
            found[service] = resource["Properties"]
    return found


def test_private_tasks_reach_aws_only_through_vpc_endpoints(base):
    resources = rendered(base, TaskSubnetType="private", S3PrefixListId="pl-0123abcd")
    found = endpoints(resources)
    assert set(found) == ENDPOINTS | {"s3"}
    private = ["privatesubneta-placeholder", "privatesubnetb-placeholder"]
    for service in ENDPOINTS:
        assert found[service]["VpcEndpointType"] == "Interface"
        assert found[service]["PrivateDnsEnabled"] is True
        assert found[service]["SubnetIds"] == private
        assert found[service]["SecurityGroupIds"] == ["endpointsecuritygroup-placeholder"]
    assert found["s3"]["VpcEndpointType"] == "Gateway"
    assert found["s3"]["RouteTableIds"] == ["privateroutetable-placeholder"]
    (layers,) = found["s3"]["PolicyDocument"]["Statement"]
    assert layers["Action"] == "s3:GetObject"
    assert layers["Resource"] == "arn:aws:s3:::prod-eu-west-1-starport-layer-bucket/*"
    egress = resources["ServiceSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    destinations = [
        r.get("DestinationSecurityGroupId") or r.get("DestinationPrefixListId") for r in egress
    ]
    assert sorted(destinations) == ["endpointsecuritygroup-placeholder", "pl-0123abcd"]
    assert all((r["IpProtocol"], r["FromPort"], r["ToPort"]) == ("tcp", 443, 443) for r in egress)
    assert not any("CidrIp" in r for r in egress)
    ingress = resources["EndpointSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert sorted(r["CidrIp"] for r in ingress) == ["10.20.10.0/24", "10.20.11.0/24"]


def test_public_tasks_create_no_endpoints_and_keep_https_egress(base):
    resources = rendered(base)
    assert endpoints(resources) == {}
    (egress,) = resources["ServiceSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    assert (egress["FromPort"], egress["ToPort"], egress["CidrIp"]) == (443, 443, "0.0.0.0/0")


def test_task_subnets_and_public_ip_follow_the_task_subnet_type(base):
    for mode, subnets, public_ip in (
        ("public", "publicsubneta-placeholder,publicsubnetb-placeholder", "ENABLED"),
        ("private", "privatesubneta-placeholder,privatesubnetb-placeholder", "DISABLED"),
    ):
        renderer = iam_scan.Renderer(base, TaskSubnetType=mode, S3PrefixListId="pl-0123abcd")
        outputs = renderer.render(base["Outputs"])
        assert outputs["TaskSubnets"]["Value"] == {"Fn::Join": [",", subnets.split(",")]}, mode
        assert outputs["TaskAssignPublicIp"]["Value"] == public_ip, mode


def test_private_tasks_require_the_s3_prefix_list(base):
    rule = base["Rules"]["S3PrefixListForPrivateTasks"]
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "TaskSubnetType"}, "private"]}
    assert rule["Assertions"][0]["Assert"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "S3PrefixListId"}, ""]}]
    }


# ------------------------------------------------------------------ image scanning


def test_enhanced_scanning_is_an_option_that_is_off_by_default(base):
    assert "RegistryScanning" not in rendered(base)
    scanning = rendered(base, EnhancedImageScanning="true")["RegistryScanning"]["Properties"]
    assert scanning["ScanType"] == "ENHANCED"
    (rule,) = scanning["Rules"]
    assert rule["ScanFrequency"] == "CONTINUOUS_SCAN"
    assert rule["RepositoryFilters"] == [{"Filter": "cars-api", "FilterType": "WILDCARD"}]


# ------------------------------------------------------------------ task roles (item 2)


def test_execution_role_is_scoped_to_the_repository_secrets_and_log_group(base):
    scope = {
        "ecr:GetAuthorizationToken": ["*"],
        "ecr:BatchCheckLayerAvailability": [{"Fn::GetAtt": ["Repository", "Arn"]}],
        "ecr:BatchGetImage": [{"Fn::GetAtt": ["Repository", "Arn"]}],
        "ecr:GetDownloadUrlForLayer": [{"Fn::GetAtt": ["Repository", "Arn"]}],
        "secretsmanager:GetSecretValue": [{"Ref": "ApiTokenSecret"}],
        "logs:CreateLogStream": [{"Fn::GetAtt": ["LogGroup", "Arn"]}],
        "logs:PutLogEvents": [{"Fn::GetAtt": ["LogGroup", "Arn"]}],
    }
    seen = set()
    for statement in statements(base["Resources"]["ExecutionRole"]):
        assert statement["Effect"] == "Allow"
        for action in as_list(statement["Action"]):
            assert action in scope, f"unexpected {action}"
            assert as_list(statement["Resource"]) == scope[action], action
            seen.add(action)
    assert seen == set(scope)


def test_task_role_grants_nothing(base):
    task_role = base["Resources"]["TaskRole"]["Properties"]
    assert "Policies" not in task_role
    assert "ManagedPolicyArns" not in task_role


def test_task_roles_are_long_lived_and_trust_only_ecs_tasks(base):
    for name in ("ExecutionRole", "TaskRole"):
        properties = base["Resources"][name]["Properties"]
        (statement,) = properties["AssumeRolePolicyDocument"]["Statement"]
        assert statement["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}, name
        assert statement["Condition"] == {
            "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
        }, name
    assert not resources_of(base, "AWS::IAM::ManagedPolicy"), "no boundary left to maintain"


def test_database_alarms_watch_cpu_and_free_storage(data):
    metrics = {
        a["Properties"]["MetricName"]: a["Properties"]
        for a in resources_of(data, "AWS::CloudWatch::Alarm").values()
    }
    assert set(metrics) >= {"CPUUtilization", "FreeStorageSpace"}
    for alarm in (metrics["CPUUtilization"], metrics["FreeStorageSpace"]):
        assert alarm["Namespace"] == "AWS/RDS"
        assert alarm["Dimensions"] == [
            {"Name": "DBInstanceIdentifier", "Value": {"Ref": "Database"}}
        ]
    assert metrics["FreeStorageSpace"]["ComparisonOperator"] == "LessThanThreshold"


# ------------------------------------------------------------------ service stack


def test_service_exports_every_output_of_the_contract(service):
    assert set(service["Outputs"]) == SERVICE_OUTPUTS


def test_service_imports_only_what_the_base_and_data_stacks_export(base, data, service):
    names = {"${BaseStackName}": set(), "${DataStackName}": set()}
    for node in walk(service):
        if isinstance(node, dict) and "Fn::ImportValue" in node:
            prefix, _, name = node["Fn::ImportValue"]["Fn::Sub"].partition(":")
            names[prefix].add(name)
    assert names["${BaseStackName}"] <= set(base["Outputs"])
    assert names["${DataStackName}"] <= set(data["Outputs"])
    assert names["${DataStackName}"] == {
        "DatabaseHost",
        "DatabasePort",
        "DatabaseName",
        "AppSecretArn",
        "CaBundleSecretArn",
        "DatabaseInstanceId",  # the dashboard's database metrics
    }


def test_service_parameters_follow_the_contract(service):
    parameters = service["Parameters"]
    assert "Default" not in parameters["ImageTag"]
    expected = {
        "BaseStackName": "cars-api-base",
        "DataStackName": "cars-api-data",
        "DesiredCount": 2,
        "MinCapacity": 2,
        "MaxCapacity": 6,
        "Cpu": "256",
        "Memory": "512",
    }
    for name, default in expected.items():
        assert parameters[name]["Default"] == default, name
    assert "TaskSubnetType" not in parameters, "the base stack chooses, for the deploy role too"


DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("tag", "accepted"),
    [
        (f"1a2b3c4@{DIGEST}", True),
        (f"{'f' * 40}@{DIGEST}", True),
        ("1a2b3c4", False),  # a tag alone: the digest is what tasks run
        (f"latest@{DIGEST}", False),
        (f"1A2B3C4@{DIGEST}", False),
        (f"1a2b3c@{DIGEST}", False),
        (f"{'f' * 41}@{DIGEST}", False),
        (f"1a2b3c4@{DIGEST[:-1]}", False),
        (f"1a2b3c4@{DIGEST}0", False),
        (f"1a2b3c4@sha512:{'0' * 64}", False),
    ],
)
def test_image_tag_must_be_a_commit_sha_at_a_digest(service, tag, accepted):
    pattern = service["Parameters"]["ImageTag"]["AllowedPattern"]
    assert bool(re.fullmatch(pattern, tag)) is accepted


def test_image_is_the_repository_at_the_digest_of_the_image_tag(service):
    assert container(service)["Image"] == {
        "Fn::Sub": [
            "${RepositoryUri}@${Digest}",
            {
                "RepositoryUri": imported("RepositoryUri"),
                "Digest": {"Fn::Select": [1, {"Fn::Split": ["@", {"Ref": "ImageTag"}]}]},
            },
        ]
    }


def test_secrets_reach_the_container_only_through_value_from(service):
    definition = container(service)
    plain = {variable["Name"] for variable in definition["Environment"]}
    assert not plain & SECRET_VARIABLES
    assert not any(re.search("PASSWORD|TOKEN|SECRET|KEY", name) for name in plain)
    secrets = {secret["Name"]: secret["ValueFrom"] for secret in definition["Secrets"]}
    assert set(secrets) == SECRET_VARIABLES
    # The app identity: user name and password from the same secret, since rotation alternates
    # between cars_app and cars_app_clone.
    app_secret = imported("AppSecretArn", "DataStackName")
    assert secrets["MYSQL_USER"] == {
        "Fn::Sub": ["${SecretArn}:username::", {"SecretArn": app_secret}]
    }
    assert secrets["MYSQL_PASSWORD"] == {
        "Fn::Sub": ["${SecretArn}:password::", {"SecretArn": app_secret}]
    }
    assert secrets["MYSQL_SSL_CA"] == imported("CaBundleSecretArn", "DataStackName")
    assert secrets["API_TOKEN"] == imported("ApiTokenSecretArn")
    assert secrets["API_TOKEN_PREVIOUS"] == {
        "Fn::Sub": ["${SecretArn}::AWSPREVIOUS:", {"SecretArn": imported("ApiTokenSecretArn")}]
    }


def test_container_reaches_the_database_of_the_data_stack_and_never_migrates(service):
    environment = {v["Name"]: v["Value"] for v in container(service)["Environment"]}
    assert environment["HOST"] == "0.0.0.0"  # noqa: S104 - the container must listen on its ENI
    assert environment["PORT"] == "8080"
    assert environment["MYSQL_HOST"] == imported("DatabaseHost", "DataStackName")
    assert environment["MYSQL_PORT"] == imported("DatabasePort", "DataStackName")
    assert environment["MYSQL_DATABASE"] == imported("DatabaseName", "DataStackName")
    assert environment["AUTO_MIGRATE"] == "false", "the release's migration task does it"


def test_task_runs_on_fargate_with_parameterised_size(service):
    task = service["Resources"]["TaskDefinition"]["Properties"]
    assert task["RequiresCompatibilities"] == ["FARGATE"]
    assert task["NetworkMode"] == "awsvpc"
    assert task["Cpu"] == {"Ref": "Cpu"}
    assert task["Memory"] == {"Ref": "Memory"}
    definition = container(service)
    assert definition["Name"] == "cars-api"
    assert definition["PortMappings"] == [{"ContainerPort": 8080, "Protocol": "tcp"}]


def test_container_logs_to_the_base_log_group(service):
    logging = container(service)["LogConfiguration"]
    assert logging["LogDriver"] == "awslogs"
    assert logging["Options"]["awslogs-group"] == imported("LogGroupName")
    assert logging["Options"]["awslogs-region"] == {"Ref": "AWS::Region"}


def test_container_checks_health_and_stops_quickly(service):
    definition = container(service)
    assert "http://127.0.0.1:8080/health" in definition["HealthCheck"]["Command"][-1]
    assert definition["HealthCheck"]["Command"][0] == "CMD"
    assert definition["StopTimeout"] <= 30


def test_container_root_filesystem_is_read_only(service):
    definition = container(service)
    assert definition["ReadonlyRootFilesystem"] is True
    assert {m["ContainerPath"] for m in definition["MountPoints"]} == {"/tmp"}  # noqa: S108 - task-local volume


def test_service_stack_creates_no_role_and_runs_the_base_roles(service):
    assert not [r for r in service["Resources"].values() if r["Type"].startswith("AWS::IAM::")]
    task = service["Resources"]["TaskDefinition"]["Properties"]
    assert task["ExecutionRoleArn"] == imported("ExecutionRoleArn")
    assert task["TaskRoleArn"] == imported("TaskRoleArn")
    # The deploy role may register and run only this family, and change only this service.
    assert task["Family"] == {"Ref": "AWS::StackName"}
    assert service["Resources"]["Service"]["Properties"]["ServiceName"] == {"Ref": "AWS::StackName"}


def test_container_runs_as_an_unprivileged_user_without_capabilities(service):
    definition = container(service)
    assert definition["User"] == "10001:10001"
    assert definition["LinuxParameters"]["Capabilities"] == {"Drop": ["ALL"]}
    assert "Add" not in definition["LinuxParameters"]["Capabilities"]
    assert definition["ReadonlyRootFilesystem"] is True
    assert not definition.get("Privileged", False)


def test_deployment_circuit_breaker_rolls_back(service):
    deployment = service["Resources"]["Service"]["Properties"]["DeploymentConfiguration"]
    assert deployment["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}


def test_deployment_is_a_rolling_update_without_capacity_loss(service):
    properties = service["Resources"]["Service"]["Properties"]
    assert properties["LaunchType"] == "FARGATE"
    assert properties["DesiredCount"] == {"Ref": "DesiredCount"}
    assert properties["DeploymentConfiguration"]["MinimumHealthyPercent"] == 100
    assert properties["DeploymentConfiguration"]["MaximumPercent"] == 200
    assert 0 < properties["HealthCheckGracePeriodSeconds"] <= 120


def test_5xx_alarm_rolls_a_bad_release_back(service):
    alarms = service["Resources"]["Service"]["Properties"]["DeploymentConfiguration"]["Alarms"]
    assert alarms["Enable"] is True
    assert alarms["Rollback"] is True
    assert alarms["AlarmNames"] == [{"Ref": "HttpErrorsAlarm"}]
    metrics = {
        m["MetricStat"]["Metric"]["MetricName"]
        for m in service["Resources"]["HttpErrorsAlarm"]["Properties"]["Metrics"]
        if "MetricStat" in m
    }
    assert metrics == {"HTTPCode_Target_5XX_Count", "HTTPCode_ELB_5XX_Count"}


def test_service_registers_with_the_base_target_group(service):
    (balancer,) = service["Resources"]["Service"]["Properties"]["LoadBalancers"]
    assert balancer == {
        "ContainerName": "cars-api",
        "ContainerPort": 8080,
        "TargetGroupArn": imported("TargetGroupArn"),
    }


def test_tasks_run_where_the_base_stacks_task_subnet_type_says(service):
    network = service["Resources"]["Service"]["Properties"]["NetworkConfiguration"][
        "AwsvpcConfiguration"
    ]
    assert network["AssignPublicIp"] == imported("TaskAssignPublicIp")
    assert network["Subnets"] == {"Fn::Split": [",", imported("TaskSubnets")]}
    assert network["SecurityGroups"] == [imported("ServiceSecurityGroup")]


def test_autoscaling_tracks_cpu_and_requests_per_target(service):
    target = service["Resources"]["ScalableTarget"]["Properties"]
    assert target["MinCapacity"] == {"Ref": "MinCapacity"}
    assert target["MaxCapacity"] == {"Ref": "MaxCapacity"}
    policies = {
        p["Properties"]["TargetTrackingScalingPolicyConfiguration"][
            "PredefinedMetricSpecification"
        ]["PredefinedMetricType"]: p["Properties"]
        for p in resources_of(service, "AWS::ApplicationAutoScaling::ScalingPolicy").values()
    }
    assert set(policies) == {"ECSServiceAverageCPUUtilization", "ALBRequestCountPerTarget"}
    for policy in policies.values():
        assert policy["ScalingTargetId"] == {"Ref": "ScalableTarget"}
    label = policies["ALBRequestCountPerTarget"]["TargetTrackingScalingPolicyConfiguration"][
        "PredefinedMetricSpecification"
    ]["ResourceLabel"]
    assert label == {
        "Fn::Sub": [
            "${LoadBalancerFullName}/${TargetGroupFullName}",
            {
                "LoadBalancerFullName": imported("LoadBalancerFullName"),
                "TargetGroupFullName": imported("TargetGroupFullName"),
            },
        ]
    }


def test_service_alarms_watch_errors_latency_health_and_running_tasks(service):
    metrics = {}
    for alarm in resources_of(service, "AWS::CloudWatch::Alarm").values():
        properties = alarm["Properties"]
        if "MetricName" in properties:
            metrics[properties["MetricName"]] = properties
        for query in properties.get("Metrics", []):
            if "MetricStat" in query:
                metrics[query["MetricStat"]["Metric"]["MetricName"]] = query
    assert set(metrics) == {
        "HTTPCode_Target_5XX_Count",
        "HTTPCode_ELB_5XX_Count",
        "TargetResponseTime",
        "UnHealthyHostCount",
        "RunningTaskCount",
        "DesiredTaskCount",
    }
    assert metrics["TargetResponseTime"]["ExtendedStatistic"] == "p99"
    running = service["Resources"]["RunningTasksAlarm"]["Properties"]["Metrics"][0]
    assert running["Expression"] == "desired - running"
