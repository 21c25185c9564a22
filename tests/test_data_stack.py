"""Policy tests of the data stack (data.yaml) and of how the others use it: each pins one rule."""

import json
import re

import pytest
from conftest import load_template
from test_templates import (
    BASE_RESOURCES,
    TEMPLATES,
    as_list,
    deploy_statements,
    granting,
    rendered,
    resources_of,
    statements,
    walk,
)

ROOT = TEMPLATES.parent
INTERFACE_OUTPUTS = {
    "DatabaseInstanceId",
    "DatabaseHost",
    "DatabasePort",
    "DatabaseName",
    "AppSecretArn",
    "MigrationSecretArn",
    "CaBundleSecretArn",
}
MASTER_SECRET = {"Fn::GetAtt": ["Database", "MasterUserSecret.SecretArn"]}
CLUSTER_ARN = "arn:aws:ecs:eu-west-1:123456789012:cluster/cluster-x"


def resource(data, name):
    return data["Resources"][name]["Properties"]


def only_container(data, name):
    (definition,) = resource(data, name)["ContainerDefinitions"]
    return definition


def secrets_of(definition):
    return {secret["Name"]: secret["ValueFrom"] for secret in definition["Secrets"]}


def mentions(node, needle):
    return needle in json.dumps(node)


# ------------------------------------------------------------------ shape


@pytest.mark.parametrize("name", ["base.yaml", "ci-access.yaml", "data.yaml", "service.yaml"])
def test_each_template_body_stays_under_the_cloudformation_limit(name):
    assert len((TEMPLATES / name).read_bytes()) < 51_200


def test_data_stack_exports_the_interface_outputs(data):
    assert set(data["Outputs"]) >= INTERFACE_OUTPUTS


def test_base_stack_holds_no_database_any_more():
    base = load_template("base.yaml")
    assert not resources_of(base, "AWS::RDS::DBInstance")
    assert not {"DatabaseInstanceClass", "DatabaseMultiAz"} & set(base["Parameters"])
    assert "LogRetentionDays" in base["Parameters"]


def test_data_stack_takes_its_own_retention_of_365_days_and_the_base_topic(data):
    assert data["Parameters"]["LogRetentionDays"]["Default"] == 365
    assert "AlarmTopicArn" in data["Parameters"]


def test_makefile_names_the_data_stack_and_passes_the_retention():
    makefile = (ROOT / "Makefile").read_text()
    assert "DATA_STACK ?= $(STACK_PREFIX)-data\n" in makefile
    assert "LOG_RETENTION_DAYS ?= 365\n" in makefile
    exported = " ".join(line for line in makefile.splitlines() if line.startswith("export "))
    assert {"DATA_STACK", "LOG_RETENTION_DAYS"} <= set(exported.split())
    assert re.search(r"^rotate-token: ## .+", makefile, re.MULTILINE)


def test_stack_deploy_defaults_for_a_new_data_stack_are_the_template_defaults(data):
    script = (ROOT / "scripts" / "stack-deploy.sh").read_text()
    body = script[script.index("data_parameters() {") :]
    body = body[: body.index("\n}\n")]
    for name, value in re.findall(r'\|\| echo "([A-Za-z]+)=([^"$]*)"', body):
        assert str(data["Parameters"][name].get("Default")) == value, name


# ------------------------------------------------------------------ identities (B)


def test_master_password_is_managed_by_rds(data):
    database = resource(data, "Database")
    assert database["ManageMasterUserPassword"] is True
    assert "MasterUserPassword" not in database
    assert not resources_of(data, "AWS::SecretsManager::SecretTargetAttachment").keys() & {
        "DatabaseSecretAttachment"
    }


def test_only_the_bootstrap_task_and_the_rotation_ever_see_the_master_secret(data):
    users = {name for name, body in data["Resources"].items() if mentions(body, "MasterUserSecret")}
    assert users == {
        "MigrationSecret",  # its masterarn key, which only the rotation function reads
        "AppSecret",
        "BootstrapExecutionRole",
        "BootstrapTaskDefinition",
        "MigrationSecretRotation",
        "AppSecretRotation",
    }
    (read,) = [
        s
        for s in statements(data["Resources"]["BootstrapExecutionRole"])
        if s["Sid"] == "ReadSecrets"
    ]
    assert MASTER_SECRET in read["Resource"]
    for role in ("MigrationExecutionRole", "TaskRefreshRole"):
        assert not mentions(data["Resources"][role], "MasterUserSecret"), role
    assert not mentions(load_template("service.yaml"), "MasterUserSecret")


def test_the_deploy_role_can_read_no_secret_at_all(ci):
    actions = {a for s in deploy_statements(ci) for a in as_list(s["Action"])}
    assert not [a for a in actions if a.startswith(("secretsmanager:", "kms:"))]


@pytest.mark.parametrize(
    ("name", "user"), [("MigrationSecret", "cars_mig"), ("AppSecret", "cars_app")]
)
def test_migration_and_app_identities_are_generated_with_fixed_user_names(data, name, user):
    generated = resource(data, name)["GenerateSecretString"]
    template = generated["SecretStringTemplate"]["Fn::Sub"]
    assert json.loads(template) == {
        "username": user,
        "ssl": True,  # TLS only: the rotation function never retries without it
        "masterarn": "${Database.MasterUserSecret.SecretArn}",  # read by the rotation function
    }
    assert generated["GenerateStringKey"] == "password"
    assert generated["PasswordLength"] >= 32
    assert set("/@\"' `\\") <= set(generated["ExcludeCharacters"])
    attachment = resource(data, f"{name}Attachment")
    assert attachment == {
        "SecretId": {"Ref": name},
        "TargetId": {"Ref": "Database"},
        "TargetType": "AWS::RDS::DBInstance",
    }


@pytest.mark.parametrize("name", ["MigrationSecret", "AppSecret"])
def test_each_identity_rotates_every_30_days_by_alternating_users(data, name):
    assert data["Transform"] == "AWS::SecretsManager-2024-09-16", "the current function artifacts"
    schedule = resource(data, f"{name}Rotation")
    assert schedule["SecretId"] == {"Ref": f"{name}Attachment"}, "after host and port are in"
    assert schedule["RotationRules"] == {"AutomaticallyAfterDays": 30}
    # Creating a schedule rotates (or tests) at once: it exists only once the users do.
    assert data["Resources"][f"{name}Rotation"]["Condition"] == "Ready"
    assert schedule["RotateImmediatelyOnUpdate"] is True, "the first rotation while one watches"
    hosted = schedule["HostedRotationLambda"]
    assert hosted["RotationType"] == "MySQLMultiUser"
    assert hosted["MasterSecretArn"] == MASTER_SECRET
    assert hosted["VpcSubnetIds"] == {"Fn::Join": [",", {"Ref": "PrivateSubnets"}]}
    assert hosted["VpcSecurityGroupIds"] == {"Ref": "RotationSecurityGroup"}


def test_rotation_functions_reach_only_mysql_and_the_secrets_manager_and_rds_endpoints(data):
    group = resource(data, "RotationSecurityGroup")
    assert "SecurityGroupIngress" not in group
    rules = {
        (r["FromPort"], str(r.get("DestinationSecurityGroupId", r.get("CidrIp"))))
        for r in group["SecurityGroupEgress"]
    }
    assert rules == {
        (3306, str({"Ref": "DatabaseSecurityGroup"})),
        (443, "10.20.10.0/24"),
        (443, "10.20.11.0/24"),
    }
    endpoint = data["Resources"]["SecretsManagerEndpoint"]
    assert endpoint["Condition"] == "CreateEndpoint"
    assert endpoint["Properties"]["PrivateDnsEnabled"] is True
    assert endpoint["Properties"]["SubnetIds"] == {"Ref": "PrivateSubnets"}
    script = (ROOT / "scripts" / "stack-deploy.sh").read_text()
    assert '[[ "$(base_parameter TaskSubnetType)" != private ]] || endpoint=false' in script


def test_rotation_reaches_the_rds_api_through_an_endpoint_in_both_task_modes(data):
    """The RDS-managed master secret has no host: the function asks DescribeDBInstances."""
    endpoint = data["Resources"]["RdsEndpoint"]
    assert "Condition" not in endpoint, "public and private task mode alike"
    properties = endpoint["Properties"]
    assert properties["ServiceName"] == {"Fn::Sub": "com.amazonaws.${AWS::Region}.rds"}
    assert properties["PrivateDnsEnabled"] is True, "the function's default client resolves to it"
    assert properties["SubnetIds"] == {"Ref": "PrivateSubnets"}, "where the functions run"
    (statement,) = properties["PolicyDocument"]["Statement"]
    assert statement["Principal"] == {"AWS": {"Ref": "AWS::AccountId"}}
    assert statement["Action"] == "rds:DescribeDBInstances"
    assert statement["Resource"]["Fn::Sub"].endswith(":db:${Prefix}-data")
    group = resource(data, "RdsEndpointSecurityGroup")
    (ingress,) = group["SecurityGroupIngress"]
    assert ingress["SourceSecurityGroupId"] == {"Ref": "RotationSecurityGroup"}
    assert (ingress["FromPort"], ingress["ToPort"]) == (443, 443)
    assert group["SecurityGroupEgress"][0]["CidrIp"] == "127.0.0.1/32"


def test_rotation_reaches_secrets_manager_in_public_and_private_task_mode(data):
    """Public: the data stack's endpoint admits the functions. Private: the base stack's does."""
    base = load_template("base.yaml")
    public = rendered(data, CreateSecretsManagerEndpoint="true")
    ingress = public["SecretsManagerEndpointSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert "rotationsecuritygroup-placeholder" in [r["SourceSecurityGroupId"] for r in ingress]
    private = rendered(data, CreateSecretsManagerEndpoint="false")
    assert "SecretsManagerEndpoint" not in private
    private_base = rendered(base, TaskSubnetType="private", S3PrefixListId="pl-0123abcd")
    allowed = {
        r["CidrIp"]
        for r in private_base["EndpointSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    }
    subnets = {
        private_base[s]["Properties"]["CidrBlock"] for s in ("PrivateSubnetA", "PrivateSubnetB")
    }
    assert subnets <= allowed, "the functions run in the private subnets"
    for schedule in ("AppSecretRotation", "MigrationSecretRotation"):
        hosted = resource(data, schedule)["HostedRotationLambda"]
        assert hosted["VpcSubnetIds"] == {"Fn::Join": [",", {"Ref": "PrivateSubnets"}]}
    assert "Condition" not in data["Resources"]["RdsEndpoint"], "both modes need the RDS API"


@pytest.mark.parametrize("template_name", ["base.yaml", "data.yaml"])
def test_every_interface_endpoint_has_a_least_privilege_policy(template_name):
    template = load_template(template_name)
    endpoints = {
        name: r["Properties"]
        for name, r in resources_of(template, "AWS::EC2::VPCEndpoint").items()
        if r["Properties"]["VpcEndpointType"] == "Interface"
    }
    assert endpoints
    for name, properties in endpoints.items():
        for statement in properties["PolicyDocument"]["Statement"]:
            assert statement["Effect"] == "Allow", name
            assert statement["Principal"] == {"AWS": {"Ref": "AWS::AccountId"}}, name
            for action in as_list(statement["Action"]):
                assert not action.endswith("*"), (name, action)
            if statement["Resource"] == "*":
                assert as_list(statement["Action"]) in (
                    ["ecr:GetAuthorizationToken"],
                    ["secretsmanager:GetRandomPassword"],
                ), name


# What AWS's published MySQLMultiUser rotation function (aws-samples/aws-secrets-manager-rotation-
# lambdas, SecretsManagerRDSMySQLRotationMultiUser/lambda_function.py) reads from the secret it
# rotates: get_secret_dict() requires host, username, password and engine (== "mysql");
# get_connection() reads port (else 3306), dbname (else none) and ssl (else TLS, then plaintext);
# set_secret() reads masterarn. Where each comes from here:
ROTATED_SECRET_KEYS = {
    "engine": "attachment",  # SecretTargetAttachment of an AWS::RDS::DBInstance
    "host": "attachment",
    "port": "attachment",
    "username": "template",  # SecretStringTemplate; bootstrap creates this user
    "password": "generated",  # GenerateStringKey; bootstrap sets it  # pragma: allowlist secret
    "masterarn": "template",
    "ssl": "template",
}
OPTIONAL_KEYS = {"dbname"}  # connects without a default schema: the grants name cars.*
# The RDS-managed master secret holds username and password only; get_secret_dict(master=True)
# then finds the instance in the secret's aws:rds:primaryDBInstanceArn system tag and host, port
# and engine through rds:DescribeDBInstances.
ATTACHMENT_KEYS = {"engine", "host", "port", "dbInstanceIdentifier"}  # what RDS instances get
USERNAME_LIMIT = 16  # the function's default USERNAME_CHARACTER_LIMIT; hosted ones set no other


@pytest.mark.parametrize("name", ["MigrationSecret", "AppSecret"])
def test_rotated_secrets_hold_every_key_the_published_function_reads(data, name):
    generated = resource(data, name)["GenerateSecretString"]
    template = json.loads(generated["SecretStringTemplate"]["Fn::Sub"])
    secret = {**template, generated["GenerateStringKey"]: "x", **dict.fromkeys(ATTACHMENT_KEYS)}
    assert set(ROTATED_SECRET_KEYS) <= set(secret), "a required or chosen key is missing"
    assert not (OPTIONAL_KEYS & set(secret))
    for key, source in ROTATED_SECRET_KEYS.items():
        assert (key in ATTACHMENT_KEYS) == (source == "attachment"), key
    assert resource(data, "Database")["Engine"] == "mysql", "the attachment's engine key"
    assert template["ssl"] is True
    assert template["masterarn"] == "${Database.MasterUserSecret.SecretArn}"
    assert len(template["username"] + "_clone") <= USERNAME_LIMIT, "the clone must fit"
    rotation = resource(data, f"{name}Rotation")
    assert rotation["SecretId"] == {"Ref": f"{name}Attachment"}, "rotates with the attachment keys"
    assert rotation["HostedRotationLambda"]["MasterSecretArn"] == MASTER_SECRET
    assert "RdsEndpoint" in data["Resources"], "the master secret has no host"


def test_bootstrap_creates_exactly_the_users_the_rotated_secrets_name(data):
    secrets = secrets_of(only_container(data, "BootstrapTaskDefinition"))
    for kind, name in (("MIGRATION", "MigrationSecret"), ("APP", "AppSecret")):
        assert secrets[f"{kind}_USER"] == {"Fn::Sub": f"${{{name}}}:username::"}
        assert secrets[f"{kind}_PASSWORD"] == {"Fn::Sub": f"${{{name}}}:password::"}


def test_a_failed_rotation_mails_the_topic_and_alarms_on_the_dashboard(data):
    rule = resource(data, "RotationFailedRule")
    pattern = rule["EventPattern"]
    assert pattern["source"] == ["aws.secretsmanager"]
    assert pattern["detail"]["eventName"] == ["RotationFailed", "RotationAbandoned"]
    assert pattern["detail"]["additionalEventData"]["SecretId"] == [
        {"Ref": "MigrationSecret"},
        {"Ref": "AppSecret"},
    ]
    (target,) = rule["Targets"]
    assert target["Arn"] == {"Ref": "AlarmTopicArn"}
    assert target["InputTransformer"]["InputTemplate"]["Fn::Sub"].startswith('"First: make ')
    alarm = resource(data, "RotationFailedAlarm")
    assert alarm["AlarmName"] == {"Fn::Sub": "${AWS::StackName}-rotation-failed"}
    assert alarm["AlarmDescription"].startswith("First: make status")
    assert (alarm["Namespace"], alarm["MetricName"]) == ("AWS/Events", "TriggeredRules")
    assert alarm["Dimensions"] == [{"Name": "RuleName", "Value": {"Ref": "RotationFailedRule"}}]
    dashboard = load_template("service.yaml")["Resources"]["Dashboard"]["Properties"]
    assert '"${DataAlarm}-rotation-failed"' in dashboard["DashboardBody"]["Fn::Sub"][0]
    base = load_template("base.yaml")
    (publish,) = [
        s
        for s in base["Resources"]["AlarmTopicPolicy"]["Properties"]["PolicyDocument"]["Statement"]
        if "Service" in s["Principal"]
    ]
    assert "events.amazonaws.com" in publish["Principal"]["Service"]


# ------------------------------------------------------------------ one-off tasks (B, C)


def test_bootstrap_task_runs_bootstrap_with_the_master_and_both_identities(data):
    definition = only_container(data, "BootstrapTaskDefinition")
    assert definition["Command"] == ["python", "cars.py", "bootstrap"]
    secrets = secrets_of(definition)
    assert set(secrets) == {
        "MYSQL_USER",
        "MYSQL_PASSWORD",
        "MIGRATION_USER",
        "MIGRATION_PASSWORD",
        "APP_USER",
        "APP_PASSWORD",
        "MYSQL_SSL_CA",
    }
    assert secrets["MYSQL_USER"] == {"Fn::Sub": "${Database.MasterUserSecret.SecretArn}:username::"}
    assert secrets["MIGRATION_PASSWORD"] == {"Fn::Sub": "${MigrationSecret}:password::"}
    assert secrets["APP_USER"] == {"Fn::Sub": "${AppSecret}:username::"}
    properties = resource(data, "BootstrapTaskDefinition")
    assert properties["ExecutionRoleArn"] == {"Fn::GetAtt": ["BootstrapExecutionRole", "Arn"]}
    assert "TaskRoleArn" not in properties, "the task itself calls no AWS API"
    assert data["Resources"]["BootstrapTaskDefinition"]["Condition"] == "HasTaskImage"


def test_migration_task_runs_migrate_with_the_migration_identity_only(data):
    definition = only_container(data, "MigrationTaskDefinition")
    assert definition["Command"] == ["python", "cars.py", "migrate"]
    secrets = secrets_of(definition)
    assert secrets == {
        "MYSQL_USER": {"Fn::Sub": "${MigrationSecret}:username::"},
        "MYSQL_PASSWORD": {"Fn::Sub": "${MigrationSecret}:password::"},
        "MYSQL_SSL_CA": {"Ref": "CaBundleSecret"},
    }
    properties = resource(data, "MigrationTaskDefinition")
    assert properties["Family"] == {"Fn::Sub": "${AWS::StackName}-migrate"}
    assert properties["ExecutionRoleArn"] == {"Fn::GetAtt": ["MigrationExecutionRole", "Arn"]}
    (read,) = [
        s
        for s in statements(data["Resources"]["MigrationExecutionRole"])
        if s["Sid"] == "ReadSecrets"
    ]
    assert read["Resource"] == [{"Ref": "MigrationSecret"}, {"Ref": "CaBundleSecret"}]


@pytest.mark.parametrize("name", ["BootstrapTaskDefinition", "MigrationTaskDefinition"])
def test_one_off_tasks_run_unprivileged_with_a_read_only_filesystem(data, name):
    definition = only_container(data, name)
    assert definition["User"] == "10001:10001"
    assert definition["ReadonlyRootFilesystem"] is True
    assert definition["LinuxParameters"] == {"Capabilities": {"Drop": ["ALL"]}}


def test_deploy_role_runs_only_the_migration_family_in_the_cluster(ci):
    statements_ = deploy_statements(ci)
    (run,) = granting(statements_, "ecs:RunTask")
    assert (
        run["Resource"]
        == "arn:aws:ecs:eu-west-1:123456789012:task-definition/cars-api-data-migrate:*"
    )
    assert run["Condition"] == {
        "ArnEquals": {"ecs:cluster": CLUSTER_ARN},
        "StringEqualsIfExists": {"ecs:enable-execute-command": "false"},
    }
    (stop,) = granting(statements_, "ecs:StopTask")
    assert stop["Condition"] == {"ArnEquals": {"ecs:cluster": CLUSTER_ARN}}


def test_deploy_role_reads_the_data_stack_outputs_but_cannot_change_the_stack(ci):
    data_stack = "arn:aws:cloudformation:eu-west-1:123456789012:stack/cars-api-data/*"
    (read,) = granting(deploy_statements(ci), "cloudformation:DescribeStacks")
    assert data_stack in read["Resource"]
    (change,) = granting(deploy_statements(ci), "cloudformation:UpdateStack")
    assert data_stack not in as_list(change["Resource"])


def test_deploy_role_can_neither_run_the_bootstrap_task_nor_pass_its_role(ci):
    for statement in deploy_statements(ci):
        text = json.dumps(statement)
        assert "bootstrap" not in text.lower(), statement["Sid"]
    (passing,) = granting(deploy_statements(ci), "iam:PassRole")
    assert "arn:aws:iam::123456789012:role/cars-api/migration-x" in passing["Resource"]
    assert len(passing["Resource"]) == 3
    assert BASE_RESOURCES["MigrationExecutionRoleName"] == "migration-x"


def test_release_runs_the_migration_before_the_service_stack_changes():
    lib = (ROOT / "scripts" / "lib.sh").read_text()
    body = lib[lib.index("deploy_release() {") :]
    assert body.index("run_migration") < body.index("cfn_deploy --stack-name")


# ------------------------------------------------------------------ verified TLS (D)


def test_database_refuses_connections_without_tls_1_2_or_1_3(data):
    group = resource(data, "DatabaseParameterGroup")
    assert group["Family"] == "mysql8.4"
    assert group["Parameters"]["require_secure_transport"] == "1"
    assert group["Parameters"]["tls_version"] == "TLSv1.2,TLSv1.3"
    database = resource(data, "Database")
    assert database["DBParameterGroupName"] == {"Ref": "DatabaseParameterGroup"}
    assert database["CACertificateIdentifier"] == "rds-ca-rsa2048-g1"


def test_the_rds_ca_bundle_reaches_every_task_as_pem_text(data):
    service = load_template("service.yaml")
    (container,) = service["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"]
    ca = {"Fn::ImportValue": {"Fn::Sub": "${DataStackName}:CaBundleSecretArn"}}
    assert secrets_of({"Secrets": container["Secrets"]})["MYSQL_SSL_CA"] == ca
    for name in ("BootstrapTaskDefinition", "MigrationTaskDefinition"):
        assert secrets_of(only_container(data, name))["MYSQL_SSL_CA"] == {"Ref": "CaBundleSecret"}
    policy = resource(data, "ServiceSecretsPolicy")
    (read,) = policy["PolicyDocument"]["Statement"]
    assert read["Action"] == "secretsmanager:GetSecretValue"
    assert read["Resource"] == [{"Ref": "AppSecret"}, {"Ref": "CaBundleSecret"}]
    assert resource(data, "ServiceSecretsPolicy")["Roles"] == [{"Ref": "ExecutionRoleName"}]


# ------------------------------------------------------------------ rotation pick-up (E)


def test_tasks_are_replaced_daily_so_they_pick_up_rotated_credentials(data):
    schedule = resource(data, "TaskRefreshSchedule")
    assert re.fullmatch(r"cron\(\d+ \d+ \* \* \? \*\)", schedule["ScheduleExpression"])
    target = schedule["Target"]
    assert target["Arn"] == {
        "Fn::Sub": "arn:${AWS::Partition}:scheduler:::aws-sdk:ecs:updateService"
    }
    assert target["RoleArn"] == {"Fn::GetAtt": ["TaskRefreshRole", "Arn"]}
    body = target["Input"]["Fn::Sub"]
    assert json.loads(body.replace("${ClusterName}", "c").replace("${ServiceStackName}", "s")) == {
        "Cluster": "c",
        "Service": "s",
        "ForceNewDeployment": True,
    }
    (statement,) = statements(data["Resources"]["TaskRefreshRole"])
    assert statement["Action"] == "ecs:UpdateService"
    service = "service/${ClusterName}/${ServiceStackName}"
    assert statement["Resource"] == {
        "Fn::Sub": f"arn:${{AWS::Partition}}:ecs:${{AWS::Region}}:${{AWS::AccountId}}:{service}"
    }
    trust = data["Resources"]["TaskRefreshRole"]["Properties"]["AssumeRolePolicyDocument"]
    assert trust["Statement"][0]["Principal"] == {"Service": "scheduler.amazonaws.com"}


def test_stack_deploy_makes_sure_the_previous_token_stage_exists_before_the_service_reads_it():
    script = (ROOT / "scripts" / "stack-deploy.sh").read_text()
    main = script[script.index("\nmain() {") :]
    assert main.index("ensure_previous_token") < main.index('deploy_stack "$CI_STACK"')
    assert "--version-stage AWSPREVIOUS --move-to-version-id" in script


# ------------------------------------------------------------------ hygiene and logs (F, G)


def test_minor_versions_upgrade_automatically_in_a_maintenance_window(data):
    database = resource(data, "Database")
    assert database["AutoMinorVersionUpgrade"] is True
    assert re.fullmatch(
        r"[a-z]{3}:\d\d:\d\d-[a-z]{3}:\d\d:\d\d", database["PreferredMaintenanceWindow"]
    )
    assert database["EngineLifecycleSupport"] == "open-source-rds-extended-support-disabled"


def test_rds_exports_error_and_slow_query_logs_into_groups_with_retention(data):
    database = data["Resources"]["Database"]
    assert database["Properties"]["EnableCloudwatchLogsExports"] == ["error", "slowquery"]
    parameters = resource(data, "DatabaseParameterGroup")["Parameters"]
    assert parameters["slow_query_log"] == "1"
    assert float(parameters["long_query_time"]) > 0
    assert parameters["log_output"] == "FILE"
    for kind, name in (
        ("error", "DatabaseErrorLogGroup"),
        ("slowquery", "DatabaseSlowQueryLogGroup"),
    ):
        group = resource(data, name)
        assert group["LogGroupName"] == {"Fn::Sub": f"/aws/rds/instance/${{Prefix}}-data/{kind}"}
        assert group["RetentionInDays"] == {"Ref": "LogRetentionDays"}
        assert name in as_list(database["DependsOn"]), "the group must exist before RDS writes"
    assert database["Properties"]["DBInstanceIdentifier"] == {"Fn::Sub": "${Prefix}-data"}


def test_rds_events_reach_the_alarm_topic_which_lets_rds_publish(data):
    subscription = resource(data, "DatabaseEventSubscription")
    assert subscription["SnsTopicArn"] == {"Ref": "AlarmTopicArn"}
    assert subscription["SourceType"] == "db-instance"
    assert subscription["SourceIds"] == [{"Ref": "Database"}]
    assert set(subscription["EventCategories"]) == {
        "failure",
        "failover",
        "maintenance",
        "low storage",
    }
    base = load_template("base.yaml")
    policy = base["Resources"]["AlarmTopicPolicy"]["Properties"]
    assert policy["Topics"] == [{"Ref": "AlarmTopic"}]
    publishers = [
        s
        for s in policy["PolicyDocument"]["Statement"]
        if "Service" in s["Principal"] and "sns:Publish" in as_list(s["Action"])
    ]
    (statement,) = publishers
    assert "events.rds.amazonaws.com" in statement["Principal"]["Service"]
    assert statement["Condition"] == {
        "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    }


def test_no_data_stack_statement_reaches_beyond_its_own_resources(data):
    for node in walk(data):
        if isinstance(node, dict) and node.get("Effect") == "Allow":
            for action in as_list(node["Action"]):
                assert not action.endswith("*"), action
