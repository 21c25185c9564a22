"""Policy tests over the parsed CloudFormation templates: each test pins one rule of the design."""

import json
import re
from pathlib import Path

import pytest
from cfnlint.decode import decode

TEMPLATES = Path(__file__).resolve().parent.parent / "cloudformation"
SECRET_VARIABLES = {"MYSQL_USER", "MYSQL_PASSWORD", "API_TOKEN"}
STATEFUL_TYPES = {
    "AWS::ECR::Repository",
    "AWS::Logs::LogGroup",
    "AWS::RDS::DBInstance",
    "AWS::SecretsManager::Secret",
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
    "DatabaseSecretArn",
    "ApiTokenSecretArn",
    "DatabaseHost",
    "DatabasePort",
    "DatabaseName",
    "DatabaseInstanceId",
    "AlarmTopicArn",
    "DeployRoleArn",
}
SERVICE_OUTPUTS = {"ServiceName", "ServiceArn", "TaskDefinitionArn", "ImageUri"}


def load(name):
    template, matches = decode(str(TEMPLATES / name))
    assert not matches, f"{name} does not parse: {matches}"
    return template


@pytest.fixture(scope="module")
def base():
    return load("base.yaml")


@pytest.fixture(scope="module")
def service():
    return load("service.yaml")


@pytest.fixture(params=["base.yaml", "service.yaml"], scope="module")
def template(request):
    return load(request.param)


def imported(output):
    """How the service stack reads an output of the base stack."""
    return {"Fn::ImportValue": {"Fn::Sub": f"${{BaseStackName}}:{output}"}}


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
        for action in as_list(statement["Action"]):
            assert not action.endswith("*"), f"wildcard action {action}"


def test_wildcard_resources_are_limited_to_actions_without_resource_level_permissions(template):
    allowed = {
        "ecr:GetAuthorizationToken",
        "cloudformation:ListExports",
        "cloudformation:ValidateTemplate",
    }
    read_prefixes = ("Describe", "List", "Get")
    no_resource_level = {"ecs:RegisterTaskDefinition", "ecs:DeregisterTaskDefinition"}
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


def test_every_alarm_notifies_the_alarm_topic(template):
    alarms = resources_of(template, "AWS::CloudWatch::Alarm")
    assert alarms
    topic = {"Ref": "AlarmTopic"} if "AlarmTopic" in template["Resources"] else None
    for name, alarm in alarms.items():
        expected = topic or imported("AlarmTopicArn")
        assert alarm["Properties"]["AlarmActions"] == [expected], name
        assert alarm["Properties"]["OKActions"] == [expected], name


# ------------------------------------------------------------------ base stack


def test_base_exports_every_output_of_the_contract(base):
    assert set(base["Outputs"]) >= BASE_OUTPUTS


def test_base_parameters_have_the_contract_defaults(base):
    parameters = base["Parameters"]
    assert "Default" not in parameters["GitHubRepository"]
    expected = {
        "CreateGitHubOidcProvider": "true",
        "CertificateArn": "",
        "DatabaseMultiAz": "false",
        "DatabaseInstanceClass": "db.t4g.micro",
        "LogRetentionDays": 30,
        "AlarmEmail": "",
    }
    for name, default in expected.items():
        assert parameters[name]["Default"] == default, name


def test_stateful_resources_carry_deletion_and_update_replace_policies(base):
    stateful = {
        name: resource
        for name, resource in base["Resources"].items()
        if resource["Type"] in STATEFUL_TYPES
    }
    assert {r["Type"] for r in stateful.values()} == STATEFUL_TYPES
    for name, resource in stateful.items():
        assert resource.get("DeletionPolicy") in {"Retain", "Snapshot", "Delete"}, name
        assert resource.get("UpdateReplacePolicy") == resource["DeletionPolicy"], name


def test_data_survives_stack_deletion(base):
    resources = base["Resources"]
    assert resources["Database"]["DeletionPolicy"] == "Snapshot"
    assert resources["Repository"]["DeletionPolicy"] == "Retain"
    for secret in resources_of(base, "AWS::SecretsManager::Secret").values():
        assert secret["DeletionPolicy"] == "Retain"


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


def test_log_group_is_named_for_the_service_and_has_retention(base):
    log_group = base["Resources"]["LogGroup"]["Properties"]
    assert log_group["LogGroupName"] == "/ecs/cars-api"
    assert log_group["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def test_database_is_private_encrypted_protected_and_backed_up(base):
    database = base["Resources"]["Database"]["Properties"]
    assert database["Engine"] == "mysql"
    assert re.fullmatch(r"8\.4\.\d+", database["EngineVersion"]), "pin a MySQL 8.4 LTS minor"
    assert database["EngineLifecycleSupport"] == "open-source-rds-extended-support-disabled"
    assert database["PubliclyAccessible"] is False
    assert database["StorageEncrypted"] is True
    assert database["DeletionProtection"] is True
    assert database["BackupRetentionPeriod"] >= 7
    assert database["MultiAZ"] == {"Fn::If": ["IsMultiAz", True, False]}
    subnets = base["Resources"]["DatabaseSubnetGroup"]["Properties"]["SubnetIds"]
    assert subnets == [{"Ref": "PrivateSubnetA"}, {"Ref": "PrivateSubnetB"}]


def test_private_subnets_have_no_route_to_the_internet(base):
    for route in resources_of(base, "AWS::EC2::Route").values():
        assert route["Properties"]["RouteTableId"] != {"Ref": "PrivateRouteTable"}


def test_database_credentials_are_generated_and_resolved_from_the_secret(base):
    secret = base["Resources"]["DatabaseSecret"]["Properties"]["GenerateSecretString"]
    assert json.loads(secret["SecretStringTemplate"]) == {"username": "cars"}
    assert secret["GenerateStringKey"] == "password"
    assert set("/@\" '") <= set(secret["ExcludeCharacters"])
    database = base["Resources"]["Database"]["Properties"]
    for prop, key in (("MasterUsername", "username"), ("MasterUserPassword", "password")):
        reference = f"{{{{resolve:secretsmanager:${{DatabaseSecret}}:SecretString:{key}}}}}"
        assert database[prop] == {"Fn::Sub": reference}, prop
    attachment = base["Resources"]["DatabaseSecretAttachment"]["Properties"]
    assert attachment["SecretId"] == {"Ref": "DatabaseSecret"}
    assert attachment["TargetId"] == {"Ref": "Database"}


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


def test_database_accepts_mysql_only_from_the_service(base):
    rules = ingress_rules(base, "DatabaseSecurityGroup")
    assert rules
    for rule in rules:
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 3306, 3306)
        assert rule["SourceSecurityGroupId"] == {"Ref": "ServiceSecurityGroup"}
        assert "CidrIp" not in rule


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


def test_http_redirects_to_https_when_a_certificate_is_given(base):
    condition, with_certificate, without = base["Resources"]["HttpListener"]["Properties"][
        "DefaultActions"
    ]["Fn::If"]
    assert condition == "HasCertificate"
    assert with_certificate[0]["Type"] == "redirect"
    assert with_certificate[0]["RedirectConfig"]["Protocol"] == "HTTPS"
    assert without == [{"Type": "forward", "TargetGroupArn": {"Ref": "TargetGroup"}}]
    https = base["Resources"]["HttpsListener"]
    assert https["Condition"] == "HasCertificate"
    assert https["Properties"]["SslPolicy"].startswith("ELBSecurityPolicy-TLS13-1-2")


def test_deploy_role_trusts_only_the_production_environment(base):
    trust = base["Resources"]["DeployRole"]["Properties"]["AssumeRolePolicyDocument"]
    (statement,) = trust["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert set(statement["Condition"]) == {"StringEquals"}, "no StringLike wildcards"
    condition = statement["Condition"]["StringEquals"]
    assert condition["token.actions.githubusercontent.com:aud"] == "sts.amazonaws.com"
    assert condition["token.actions.githubusercontent.com:sub"] == {
        "Fn::Sub": "repo:${GitHubRepository}:environment:production"
    }


def test_deploy_role_trusts_the_github_oidc_provider_created_or_existing(base):
    trust = base["Resources"]["DeployRole"]["Properties"]["AssumeRolePolicyDocument"]
    federated = trust["Statement"][0]["Principal"]["Federated"]["Fn::If"]
    assert federated[0] == "CreateOidcProvider"
    assert federated[1] == {"Ref": "GitHubOidcProvider"}
    assert federated[2]["Fn::Sub"].endswith(":oidc-provider/token.actions.githubusercontent.com")
    provider = base["Resources"]["GitHubOidcProvider"]
    assert provider["Condition"] == "CreateOidcProvider"
    assert provider["Properties"]["ClientIdList"] == ["sts.amazonaws.com"]


def test_deploy_role_pushes_only_to_this_repository(base):
    for statement in statements(base["Resources"]["DeployRole"]):
        actions = set(as_list(statement["Action"]))
        ecr = {a for a in actions if a.startswith("ecr:")} - {"ecr:GetAuthorizationToken"}
        if ecr:
            assert statement["Resource"] == {"Fn::GetAtt": ["Repository", "Arn"]}


def test_deploy_role_changes_only_the_service_stack(base):
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
    for statement in statements(base["Resources"]["DeployRole"]):
        actions = set(as_list(statement["Action"]))
        assert "cloudformation:DeleteStack" not in actions
        if actions & writes:
            assert statement["Resource"] == {"Fn::Sub": service_stack}
            granted |= actions & writes
    assert granted == writes


def test_deploy_role_writes_roles_only_with_the_service_boundary(base):
    writes = {
        "iam:CreateRole",
        "iam:PutRolePolicy",
        "iam:AttachRolePolicy",
        "iam:PutRolePermissionsBoundary",
    }
    service_roles = {
        "Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:role/${ServiceStackName}/*"
    }
    granted = set()
    for statement in statements(base["Resources"]["DeployRole"]):
        actions = set(as_list(statement["Action"]))
        assert "iam:DeleteRolePermissionsBoundary" not in actions
        if actions & writes:
            assert statement["Resource"] == service_roles
            boundary = statement["Condition"]["StringEquals"]["iam:PermissionsBoundary"]
            assert boundary == {"Ref": "ServiceRoleBoundary"}
            granted |= actions & writes
    assert granted == writes


def test_deploy_role_passes_only_service_roles_and_only_to_ecs_tasks(base):
    passing = [
        s
        for s in statements(base["Resources"]["DeployRole"])
        if "iam:PassRole" in as_list(s["Action"])
    ]
    assert len(passing) == 1
    (statement,) = passing
    assert statement["Resource"]["Fn::Sub"].endswith(":role/${ServiceStackName}/*")
    assert statement["Condition"]["StringEquals"]["iam:PassedToService"] == (
        "ecs-tasks.amazonaws.com"
    )


def test_database_alarms_watch_cpu_and_free_storage(base):
    metrics = {
        a["Properties"]["MetricName"]: a["Properties"]
        for a in resources_of(base, "AWS::CloudWatch::Alarm").values()
    }
    assert set(metrics) >= {"CPUUtilization", "FreeStorageSpace"}
    for alarm in metrics.values():
        assert alarm["Namespace"] == "AWS/RDS"
        assert alarm["Dimensions"] == [
            {"Name": "DBInstanceIdentifier", "Value": {"Ref": "Database"}}
        ]
    assert metrics["FreeStorageSpace"]["ComparisonOperator"] == "LessThanThreshold"


# ------------------------------------------------------------------ service stack


def test_service_exports_every_output_of_the_contract(service):
    assert set(service["Outputs"]) == SERVICE_OUTPUTS


def test_service_imports_only_what_the_base_stack_exports(base, service):
    names = set()
    for node in walk(service):
        if isinstance(node, dict) and "Fn::ImportValue" in node:
            prefix, _, name = node["Fn::ImportValue"]["Fn::Sub"].partition(":")
            assert prefix == "${BaseStackName}"
            names.add(name)
    assert names
    assert names <= set(base["Outputs"])


def test_service_parameters_follow_the_contract(service):
    parameters = service["Parameters"]
    assert "Default" not in parameters["ImageTag"]
    expected = {
        "BaseStackName": "cars-api-base",
        "DesiredCount": 2,
        "MinCapacity": 2,
        "MaxCapacity": 6,
        "Cpu": "256",
        "Memory": "512",
        "TaskSubnetType": "public",
    }
    for name, default in expected.items():
        assert parameters[name]["Default"] == default, name
    assert parameters["TaskSubnetType"]["AllowedValues"] == ["public", "private"]


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
    database_secret = imported("DatabaseSecretArn")
    assert secrets["MYSQL_USER"] == {
        "Fn::Sub": ["${SecretArn}:username::", {"SecretArn": database_secret}]
    }
    assert secrets["MYSQL_PASSWORD"] == {
        "Fn::Sub": ["${SecretArn}:password::", {"SecretArn": database_secret}]
    }
    assert secrets["API_TOKEN"] == imported("ApiTokenSecretArn")


def test_container_reaches_the_database_of_the_base_stack(service):
    environment = {v["Name"]: v["Value"] for v in container(service)["Environment"]}
    assert environment["HOST"] == "0.0.0.0"  # noqa: S104 - the container must listen on its ENI
    assert environment["PORT"] == "8080"
    assert environment["MYSQL_HOST"] == imported("DatabaseHost")
    assert environment["MYSQL_PORT"] == imported("DatabasePort")
    assert environment["MYSQL_DATABASE"] == imported("DatabaseName")


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


def test_execution_role_is_scoped_to_the_repository_secrets_and_log_group(service):
    scope = {
        "ecr:GetAuthorizationToken": ["*"],
        "ecr:BatchCheckLayerAvailability": [imported("RepositoryArn")],
        "ecr:BatchGetImage": [imported("RepositoryArn")],
        "ecr:GetDownloadUrlForLayer": [imported("RepositoryArn")],
        "secretsmanager:GetSecretValue": [
            imported("DatabaseSecretArn"),
            imported("ApiTokenSecretArn"),
        ],
        "logs:CreateLogStream": [imported("LogGroupArn")],
        "logs:PutLogEvents": [imported("LogGroupArn")],
    }
    seen = set()
    for statement in statements(service["Resources"]["ExecutionRole"]):
        assert statement["Effect"] == "Allow"
        for action in as_list(statement["Action"]):
            assert action in scope, f"unexpected {action}"
            assert as_list(statement["Resource"]) == scope[action], action
            seen.add(action)
    assert seen == set(scope)


def test_task_role_grants_nothing(service):
    task_role = service["Resources"]["TaskRole"]["Properties"]
    assert "Policies" not in task_role
    assert "ManagedPolicyArns" not in task_role


def test_service_roles_are_bounded_and_trust_only_ecs_tasks(service):
    roles = resources_of(service, "AWS::IAM::Role")
    assert set(roles) == {"ExecutionRole", "TaskRole"}
    for name, role in roles.items():
        properties = role["Properties"]
        # The deploy role may create and pass roles only under this path and with this boundary.
        assert properties["Path"] == {"Fn::Sub": "/${AWS::StackName}/"}, name
        assert properties["PermissionsBoundary"] == imported("ServiceRoleBoundaryArn"), name
        (statement,) = properties["AssumeRolePolicyDocument"]["Statement"]
        assert statement["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}, name
    family = service["Resources"]["TaskDefinition"]["Properties"]["Family"]
    assert family == {"Ref": "AWS::StackName"}, "the deploy role tags task-definition/<stack>:*"


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


def test_tasks_run_in_public_subnets_with_a_public_ip_unless_private_is_chosen(service):
    network = service["Resources"]["Service"]["Properties"]["NetworkConfiguration"][
        "AwsvpcConfiguration"
    ]
    assert service["Conditions"]["UsePublicSubnets"] == {
        "Fn::Equals": [{"Ref": "TaskSubnetType"}, "public"]
    }
    assert network["AssignPublicIp"] == {"Fn::If": ["UsePublicSubnets", "ENABLED", "DISABLED"]}
    assert network["Subnets"] == {
        "Fn::If": [
            "UsePublicSubnets",
            {"Fn::Split": [",", imported("PublicSubnets")]},
            {"Fn::Split": [",", imported("PrivateSubnets")]},
        ]
    }
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
