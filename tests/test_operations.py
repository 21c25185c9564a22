"""Operating the service: the dashboard, the log metrics and their alarms, the audit trail, the
retention policy, and make logs / make dashboard / the default security group script.

The template tests read the parsed templates; the log-metric tests run the real server, make it
answer a 401, log an error and answer a database-unavailable 503, and match the filter patterns
of base.yaml against the lines it printed; the script tests run against moto's server.
"""

import json
import re
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from conftest import REGION, ROOT, TEMPLATES, TOKEN, client, free_port, load_template

# The values CloudWatch Logs accepts for a log group's retention (PutRetentionPolicy).
CLOUDWATCH_RETENTION_DAYS = [
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
    3288, 3653,
]  # fmt: skip
LOG_NAMESPACE = {"Ref": "Prefix"}  # the log metrics are namespaced by the environment
DASHBOARD_LOG_NAMESPACE = "@{Prefix}@"  # the same, as the dashboard body names it


def all_templates():
    return {path.name: load_template(path.name) for path in sorted(TEMPLATES.glob("*.yaml"))}


def resources_of(template, resource_type):
    return {
        name: resource
        for name, resource in template["Resources"].items()
        if resource["Type"] == resource_type
    }


def imported(stack_parameter, output):
    return {"Fn::ImportValue": {"Fn::Sub": f"${{{stack_parameter}}}:{output}"}}


# ------------------------------------------------------------------ the dashboard

# What each metric dimension must name: (namespace, dimension) -> (template, resource type, how
# the stacks refer to it as CloudWatch wants it).
DIMENSIONS = {
    ("AWS/ApplicationELB", "LoadBalancer"): (
        "base",
        "AWS::ElasticLoadBalancingV2::LoadBalancer",
        "LoadBalancerFullName",
    ),
    ("AWS/ApplicationELB", "TargetGroup"): (
        "base",
        "AWS::ElasticLoadBalancingV2::TargetGroup",
        "TargetGroupFullName",
    ),
    ("AWS/ECS", "ClusterName"): ("base", "AWS::ECS::Cluster", "Ref"),
    ("AWS/ECS", "ServiceName"): ("service", "AWS::ECS::Service", "Name"),
    ("ECS/ContainerInsights", "ClusterName"): ("base", "AWS::ECS::Cluster", "Ref"),
    ("ECS/ContainerInsights", "ServiceName"): ("service", "AWS::ECS::Service", "Name"),
    ("AWS/RDS", "DBInstanceIdentifier"): ("data", "AWS::RDS::DBInstance", "Ref"),
}


def dashboard_body(service):
    """The dashboard's JSON with each ${...} of its Fn::Sub replaced by a marker @{...}@, and the
    Fn::Sub variables."""
    dashboards = resources_of(service, "AWS::CloudWatch::Dashboard")
    assert len(dashboards) == 1, "one dashboard per service stack"
    (dashboard,) = dashboards.values()
    text, variables = dashboard["Properties"]["DashboardBody"]["Fn::Sub"]
    marked = re.sub(r"\$\{([^}]+)\}", r"@{\1}@", text)
    return json.loads(marked), variables


def marker(value):
    found = re.fullmatch(r"@\{([^}]+)\}@", value)
    assert found, f"{value} is not a reference to a resource"
    return found.group(1)


def export_of(template, output):
    """The value (Ref or GetAtt) behind an exported output of template."""
    assert output in template["Outputs"], f"no output {output}"
    return template["Outputs"][output]["Value"]


def resolve(name, variables, templates):
    """(template key, resource logical id, 'Ref' or the attribute) that ${name} stands for."""
    if name in variables:
        value = variables[name]
        source = value["Fn::ImportValue"]["Fn::Sub"]
        stack, _, output = source.partition(":")
        key = {"${BaseStackName}": "base", "${DataStackName}": "data"}[stack]
        assert key in templates, f"{source}: template of the {key} stack missing"
        value = export_of(templates[key], output)
        if "Ref" in value:
            return key, value["Ref"], "Ref"
        logical, attribute = value["Fn::GetAtt"]
        return key, logical, attribute
    logical, _, attribute = name.partition(".")
    assert logical in templates["service"]["Resources"], f"${{{name}}} names nothing"
    return "service", logical, attribute or "Ref"


def dashboard_templates(base, service):
    return {"base": base, "service": service, "data": load_template("data.yaml")}


def metric_widgets(body):
    return [w for w in body["widgets"] if w["type"] == "metric"]


def metrics_of(widget):
    """(namespace, metric, {dimension: value}) of each line of a metric widget."""
    for line in widget["properties"]["metrics"]:
        parts = [part for part in line if not isinstance(part, dict)]
        namespace, metric, *pairs = parts
        assert len(pairs) % 2 == 0, line
        yield namespace, metric, dict(zip(pairs[::2], pairs[1::2], strict=True))


def test_dashboard_is_named_after_the_service_stack(service):
    (dashboard,) = resources_of(service, "AWS::CloudWatch::Dashboard").values()
    assert dashboard["Properties"]["DashboardName"] == {"Ref": "AWS::StackName"}


def test_dashboard_shows_traffic_errors_latency_capacity_database_and_alarms(service):
    body, _ = dashboard_body(service)
    shown = {
        (namespace, metric, (line[-1] if isinstance(line[-1], dict) else {}).get("stat"))
        for widget in metric_widgets(body)
        for line in widget["properties"]["metrics"]
        for namespace, metric in [line[:2]]
    }
    names = {(namespace, metric) for namespace, metric, _ in shown}
    assert {
        ("AWS/ApplicationELB", "RequestCount"),
        ("AWS/ApplicationELB", "HTTPCode_Target_5XX_Count"),
        ("AWS/ApplicationELB", "HTTPCode_ELB_5XX_Count"),
        ("AWS/ApplicationELB", "HealthyHostCount"),
        ("ECS/ContainerInsights", "RunningTaskCount"),
        ("ECS/ContainerInsights", "DesiredTaskCount"),
        ("AWS/ECS", "CPUUtilization"),
        ("AWS/ECS", "MemoryUtilization"),
        ("AWS/RDS", "CPUUtilization"),
        ("AWS/RDS", "DatabaseConnections"),
        ("AWS/RDS", "FreeStorageSpace"),
    } <= names
    latency = {stat for namespace, metric, stat in shown if metric == "TargetResponseTime"}
    assert latency == {"p50", "p90", "p99"}
    assert [w for w in body["widgets"] if w["type"] == "alarm"], "no alarm states"


def test_every_dashboard_metric_names_a_resource_and_dimension_the_stacks_create(base, service):
    body, variables = dashboard_body(service)
    templates = dashboard_templates(base, service)
    filters = log_metrics(base)
    checked = 0
    for widget in metric_widgets(body):
        assert marker(widget["properties"]["region"]) == "AWS::Region"
        for namespace, metric, dimensions in metrics_of(widget):
            checked += 1
            if namespace == DASHBOARD_LOG_NAMESPACE:
                assert metric in filters, f"no metric filter makes {namespace}/{metric}"
                assert dimensions == {}, "the metric filters publish no dimensions"
                continue
            assert dimensions, f"{namespace}/{metric} names no resource"
            for dimension, value in dimensions.items():
                expected = DIMENSIONS.get((namespace, dimension))
                assert expected, f"{namespace}/{metric}: unknown dimension {dimension}"
                key, type_, attribute = expected
                name = marker(value)
                if key == "data" and "data" not in templates:
                    # Until the data stack's template lands, the import itself is the contract.
                    assert variables[name] == imported("DataStackName", "DatabaseInstanceId")
                    assert "DataStackName" in service["Parameters"]
                    continue
                found = resolve(name, variables, templates)
                assert found[0] == key, (
                    f"{namespace}/{metric} {dimension} from the {found[0]} stack"
                )
                assert templates[key]["Resources"][found[1]]["Type"] == type_
                assert found[2] == attribute, f"{namespace}/{metric} {dimension}: {found[2]}"
            if namespace == "ECS/ContainerInsights":
                settings = base["Resources"]["Cluster"]["Properties"]["ClusterSettings"]
                assert {"Name": "containerInsights", "Value": "enabled"} in settings
    assert checked >= 15


def test_dashboard_alarm_widget_shows_every_alarm_of_the_service_log_metrics_and_database(
    base, service
):
    body, variables = dashboard_body(service)
    templates = dashboard_templates(base, service)
    (widget,) = [w for w in body["widgets"] if w["type"] == "alarm"]
    # The base and data stacks name their alarms <stack name>-<what>; the service's have ARNs.
    prefix = "arn:${AWS::Partition}:cloudwatch:${AWS::Region}:${AWS::AccountId}:alarm:"
    named = {"BaseAlarm": ("base", "BaseStackName"), "DataAlarm": ("data", "DataStackName")}
    names = {}
    for variable, (key, stack) in named.items():
        assert variables[variable] == {"Fn::Sub": prefix + "${" + stack + "}"}
        for name, alarm in resources_of(templates[key], "AWS::CloudWatch::Alarm").items():
            names[(variable, json.dumps(alarm["Properties"].get("AlarmName")))] = (key, name)
    shown = set()
    for arn in widget["properties"]["alarms"]:
        variable, _, suffix = arn.removeprefix("@{").partition("}@-")
        if variable in named:
            name = json.dumps({"Fn::Sub": "${AWS::StackName}-" + suffix})
            assert (variable, name) in names, f"{arn}: that stack has no such alarm"
            shown.add(names[(variable, name)])
            continue
        key, logical, attribute = resolve(marker(arn), variables, templates)
        assert templates[key]["Resources"][logical]["Type"] == "AWS::CloudWatch::Alarm"
        assert attribute == "Arn"
        shown.add((key, logical))
    expected = {("service", name) for name in resources_of(service, "AWS::CloudWatch::Alarm")}
    expected |= {
        ("data", name) for name in resources_of(templates["data"], "AWS::CloudWatch::Alarm")
    }
    expected |= {
        ("base", name)
        for name, alarm in resources_of(base, "AWS::CloudWatch::Alarm").items()
        if alarm["Properties"].get("Namespace") == LOG_NAMESPACE
    }
    assert shown == expected


def test_dashboard_log_widget_reads_the_service_log_group(base, service):
    body, variables = dashboard_body(service)
    templates = dashboard_templates(base, service)
    (widget,) = [w for w in body["widgets"] if w["type"] == "log"]
    source = re.match(r"SOURCE '([^']+)'", widget["properties"]["query"]).group(1)
    assert resolve(marker(source), variables, templates) == ("base", "LogGroup", "Ref")


# ------------------------------------------------------------------ log metrics and alarms


def log_metrics(base):
    """metric name -> filter pattern of the metric filters on the service's log group."""
    found = {}
    for name, resource in resources_of(base, "AWS::Logs::MetricFilter").items():
        properties = resource["Properties"]
        assert properties["LogGroupName"] == {"Ref": "LogGroup"}, name
        (transformation,) = properties["MetricTransformations"]
        assert transformation["MetricNamespace"] == LOG_NAMESPACE
        assert transformation["MetricValue"] == "1"
        found[transformation["MetricName"]] = properties["FilterPattern"]
    return found


class Pattern:
    """A CloudWatch Logs JSON filter pattern: { $.a.b OP value [&& or || ...] }.

    Faithful for what the templates use: selectors of nested keys, = and != on strings and numbers,
    < <= > >= on numbers, && binding tighter than ||, no parentheses. A missing key, or a string
    compared with a number, does not match. Anything else is refused, not guessed.
    """

    TERM = re.compile(
        r'\s*\$\.([A-Za-z_][\w.]*)\s*(=|!=|<=|>=|<|>)\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?)\s*'
    )

    def __init__(self, text):
        inner = re.fullmatch(r"\s*\{(.*)\}\s*", text)
        assert inner, f"not a JSON filter pattern: {text}"
        self.alternatives = []
        for alternative in inner.group(1).split("||"):
            terms = []
            for term in alternative.split("&&"):
                found = self.TERM.fullmatch(term)
                assert found, f"unsupported term {term!r} in {text}"
                selector, operator, value = found.groups()
                value = json.loads(value)
                assert operator in ("=", "!=") or not isinstance(value, str), text
                terms.append((selector.split("."), operator, value))
            self.alternatives.append(terms)

    def matches(self, line):
        try:
            entry = json.loads(line)
        except ValueError:
            return False
        return any(all(self.term(entry, *term) for term in terms) for terms in self.alternatives)

    @staticmethod
    def term(entry, path, operator, value):
        for key in path:
            if not isinstance(entry, dict) or key not in entry:
                return False
            entry = entry[key]
        if isinstance(value, str) != isinstance(entry, str) or isinstance(entry, bool | None):
            return False
        return {
            "=": entry == value,
            "!=": entry != value,
            "<": entry < value,
            "<=": entry <= value,
            ">": entry > value,
            ">=": entry >= value,
        }[operator]


def test_the_filter_evaluator_follows_cloudwatch_semantics():
    assert Pattern("{ $.status = 401 }").matches('{"status": 401}')
    assert not Pattern("{ $.status = 401 }").matches('{"status": "401"}')
    assert not Pattern("{ $.status = 401 }").matches('{"level": "INFO"}')
    assert Pattern("{ $.status >= 500 }").matches('{"status": 503}')
    assert not Pattern("{ $.status >= 500 }").matches('{"status": 499}')
    assert Pattern('{ $.a.b = "x" || $.c = 1 }').matches('{"c": 1}')
    assert not Pattern('{ $.a.b = "x" && $.c = 1 }').matches('{"a": {"b": "x"}, "c": 2}')
    assert not Pattern('{ $.level = "ERROR" }').matches("not json")


def wait_for(server, predicate, what):
    """The lines the server printed, once one of them satisfies predicate (bounded wait)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = server.log().splitlines()
        if any(predicate(line) for line in lines):
            return lines
        time.sleep(0.05)
    pytest.fail(f"the server never logged {what}:\n{server.log()}")


def request(url, method="GET", headers=None):
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, method=method, data=b"{}", headers=headers or {}),
            timeout=10,
        ) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def field(line, key):
    try:
        return json.loads(line).get(key)
    except ValueError:
        return None


def real_lines(run_server, tmp_path):
    """What the real server prints while it answers a 401, logs an error, and answers 503 since
    the database is unreachable: two `python cars.py` processes, their JSON lines."""
    sqlite = run_server({"API_TOKEN": TOKEN})
    assert request(f"{sqlite.url}/cars", "POST", {"Content-Type": "application/json"}) == 401
    assert request(f"{sqlite.url}/cars") == 200
    with sqlite3.connect(tmp_path / f"{sqlite.port}.db") as db:
        db.execute("DROP TABLE cars")  # the schema breaks under the running server
    assert request(f"{sqlite.url}/cars") == 500
    mysql = run_server(
        {
            "MYSQL_HOST": "127.0.0.1",
            "MYSQL_PORT": str(free_port()),  # nothing listens there: the database is down
            "MYSQL_USER": "ops",
            "MYSQL_PASSWORD": "unused",  # pragma: allowlist secret -- never reaches a server
            "MYSQL_DATABASE": "ops",
            "AUTO_MIGRATE": "false",
        }
    )
    assert request(f"{mysql.url}/cars") == 503
    lines = wait_for(sqlite, lambda line: field(line, "status") == 500, "the 500")
    lines += wait_for(mysql, lambda line: field(line, "status") == 503, "the 503")
    return [line for line in lines if line.startswith("{")]


# What each metric must count, said about one parsed line.
COUNTED = {
    "Unauthorized": lambda entry: entry.get("status") == 401,
    "ErrorLines": lambda entry: entry.get("level") in ("ERROR", "CRITICAL"),
    "DatabaseUnavailable": lambda entry: entry.get("message") == "database unavailable",
}


def test_each_metric_filter_matches_exactly_its_lines_of_the_real_server(
    base, run_server, tmp_path
):
    lines = real_lines(run_server, tmp_path)
    entries = [json.loads(line) for line in lines]
    assert any(e.get("message") == "database error" and e["level"] == "ERROR" for e in entries)
    unavailable = [e for e in entries if e.get("message") == "database unavailable"]
    assert unavailable
    assert all(e["level"] == "WARNING" for e in unavailable)
    patterns = log_metrics(base)
    assert set(patterns) == set(COUNTED)
    for metric, counted in COUNTED.items():
        pattern = Pattern(patterns[metric])
        matched = [line for line in lines if pattern.matches(line)]
        assert matched, f"{metric} matches none of:\n" + "\n".join(lines)
        assert matched == [line for line in lines if counted(json.loads(line))], metric
        assert len(matched) < len(lines), f"{metric} matches every line"


def test_every_service_log_metric_and_database_alarm_starts_with_a_command_to_run_first(
    base, service
):
    alarms = resources_of(service, "AWS::CloudWatch::Alarm")
    alarms |= resources_of(load_template("data.yaml"), "AWS::CloudWatch::Alarm")
    alarms |= {
        name: alarm
        for name, alarm in resources_of(base, "AWS::CloudWatch::Alarm").items()
        if alarm["Properties"].get("Namespace") == LOG_NAMESPACE
    }
    assert len(alarms) == 10  # with the data stack's rotation-failed alarm
    for name, alarm in alarms.items():
        description = alarm["Properties"]["AlarmDescription"]
        assert description.startswith("First: make "), name
        assert len(description) <= 1024, name


def test_every_log_metric_has_an_alarm_that_says_what_to_do_first(base):
    metrics = log_metrics(base)
    assert set(metrics) == {"Unauthorized", "ErrorLines", "DatabaseUnavailable"}
    alarmed = {}
    for name, alarm in resources_of(base, "AWS::CloudWatch::Alarm").items():
        properties = alarm["Properties"]
        if properties.get("Namespace") != LOG_NAMESPACE:
            continue
        alarmed[properties["MetricName"]] = name
        assert properties["TreatMissingData"] == "notBreaching", name
        assert properties["Statistic"] == "Sum", name
        assert properties["AlarmDescription"].startswith("First: "), name
        first_step = properties["AlarmDescription"].split(". ")[0]
        assert "make " in first_step, f"{name}: the first step is no command"
    assert set(alarmed) == set(metrics)


def test_every_alarm_of_every_template_notifies_the_alarm_topic():
    alarms = 0
    for name, template in all_templates().items():
        topics = [{"Ref": topic} for topic in resources_of(template, "AWS::SNS::Topic")]
        if "AlarmTopicArn" in template.get("Parameters", {}):
            topics.append({"Ref": "AlarmTopicArn"})
        for stack in ("BaseStackName", "DataStackName"):
            topics.append(imported(stack, "AlarmTopicArn"))
        for logical, alarm in resources_of(template, "AWS::CloudWatch::Alarm").items():
            alarms += 1
            for key in ("AlarmActions", "OKActions"):
                (action,) = alarm["Properties"][key]
                assert action in topics, f"{name} {logical} {key}: {action}"
    assert alarms >= 7  # the service's four and the three on the log metrics, at least


# ------------------------------------------------------------------ audit trail and retention


def test_every_log_group_and_the_audit_bucket_keep_logs_for_the_retention_parameter():
    groups = 0
    for name, template in all_templates().items():
        log_groups = resources_of(template, "AWS::Logs::LogGroup")
        if not log_groups:
            continue
        parameter = template["Parameters"]["LogRetentionDays"]
        assert parameter["Default"] == 365, name
        assert parameter["AllowedValues"] == CLOUDWATCH_RETENTION_DAYS, name
        for logical, group in log_groups.items():
            groups += 1
            retention = group["Properties"]["RetentionInDays"]
            assert retention == {"Ref": "LogRetentionDays"}, f"{name} {logical}"
    assert groups >= 2
    base = load_template("base.yaml")
    (rule,) = base["Resources"]["AuditBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    assert rule["Status"] == "Enabled"
    assert rule["ExpirationInDays"] == {"Ref": "LogRetentionDays"}


def test_audit_bucket_is_encrypted_private_and_owned_by_the_account(base):
    bucket = base["Resources"]["AuditBucket"]
    properties = bucket["Properties"]
    (encryption,) = properties["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    # SSE-S3: the only server-side encryption load balancer logs support.
    assert encryption["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}
    assert properties["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert properties["OwnershipControls"] == {
        "Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]
    }
    # Evidence outlives the stack; the name carries the stack id, so a new stack of the same
    # name makes a new bucket.
    assert bucket["DeletionPolicy"] == bucket["UpdateReplacePolicy"] == "Retain"
    assert "${Id}" in properties["BucketName"]["Fn::Sub"][0]


def audit_statements(base):
    policy = base["Resources"]["AuditBucketPolicy"]["Properties"]
    assert policy["Bucket"] == {"Ref": "AuditBucket"}
    return {s["Sid"]: s for s in policy["PolicyDocument"]["Statement"]}


def test_audit_bucket_refuses_requests_without_tls(base):
    deny = audit_statements(base)["DenyInsecureTransport"]
    assert deny["Effect"] == "Deny"
    assert deny["Principal"] == "*"
    assert deny["Action"] == "s3:*"
    assert deny["Resource"] == [
        {"Fn::GetAtt": ["AuditBucket", "Arn"]},
        {"Fn::Sub": "${AuditBucket.Arn}/*"},
    ]
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_only_log_delivery_may_write_to_the_audit_bucket_under_its_prefixes(base):
    statements = audit_statements(base)
    allows = [s for s in statements.values() if s["Effect"] == "Allow"]
    assert {
        a for s in allows for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    } == {
        "s3:PutObject",
        "s3:GetBucketAcl",
        "s3:ListBucket",
    }
    elb = statements["LoadBalancerLogs"]
    legacy, modern = elb["Principal"]["Fn::If"][1:]
    assert modern == {"Service": "logdelivery.elasticloadbalancing.amazonaws.com"}
    account = legacy["AWS"]["Fn::Sub"][1]["Id"]
    assert account == {"Fn::FindInMap": ["ElbLogAccount", {"Ref": "AWS::Region"}, "Id"]}
    assert elb["Resource"] == {"Fn::Sub": "${AuditBucket.Arn}/alb-*/AWSLogs/${AWS::AccountId}/*"}
    for sid in ("LogDeliveryCheck", "LogDeliveryWrite"):
        assert statements[sid]["Principal"] == {"Service": "delivery.logs.amazonaws.com"}
        assert statements[sid]["Condition"] == {
            "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
        }
    assert statements["LogDeliveryWrite"]["Resource"] == {
        "Fn::Sub": "${AuditBucket.Arn}/AWSLogs/${AWS::AccountId}/*"
    }


def test_the_legacy_elb_regions_are_exactly_those_with_an_elb_log_account(base):
    regions = set()
    for node in json.loads(json.dumps(base["Conditions"]["ElbAccountRegion"]))["Fn::Or"]:
        for equals in node.get("Fn::Or", [node]):
            assert equals["Fn::Equals"][0] == {"Ref": "AWS::Region"}
            regions.add(equals["Fn::Equals"][1])
    accounts = base["Mappings"]["ElbLogAccount"]
    assert regions == set(accounts)
    assert all(re.fullmatch(r"\d{12}", a["Id"]) for a in accounts.values())
    assert accounts[REGION]["Id"] == "156460612806"


def test_load_balancer_writes_access_and_connection_logs_to_the_audit_bucket(base):
    balancer = base["Resources"]["LoadBalancer"]
    attributes = {a["Key"]: a["Value"] for a in balancer["Properties"]["LoadBalancerAttributes"]}
    for kind, prefix in (("access_logs", "alb-access"), ("connection_logs", "alb-connection")):
        assert attributes[f"{kind}.s3.enabled"] == "true"
        assert attributes[f"{kind}.s3.bucket"] == {"Ref": "AuditBucket"}
        assert attributes[f"{kind}.s3.prefix"] == prefix
    # AWS refuses the attributes unless the bucket policy already lets ELB write.
    assert balancer["DependsOn"] == "AuditBucketPolicy"


def test_waf_logs_redacted_into_the_audit_bucket_which_waf_accepts_by_name(base):
    waf_logging = base["Resources"]["WafLogging"]
    assert waf_logging["Condition"] == base["Resources"]["WebAcl"]["Condition"] == "UseWaf"
    properties = waf_logging["Properties"]
    assert properties["RedactedFields"] == [{"SingleHeader": {"Name": "authorization"}}]
    assert properties["LogDestinationConfigs"] == [{"Fn::GetAtt": ["AuditBucket", "Arn"]}]
    assert waf_logging["DependsOn"] == "AuditBucketPolicy"
    name, values = base["Resources"]["AuditBucket"]["Properties"]["BucketName"]["Fn::Sub"]
    assert name.startswith("aws-waf-logs-")  # WAF logs to no other bucket
    assert "AWS::StackId" in json.dumps(values["Id"])
    # 13 + 12 + 1 + the longest Region name (14) + 1 + 8 hex digits of the stack id
    assert len(name.replace("${AWS::AccountId}", "1" * 12).replace("${AWS::Region}", "x" * 14)
               .replace("${Id}", "f" * 8)) <= 63  # fmt: skip
    assert "${AWS::StackName}" not in name  # a stack name may hold capitals; bucket names cannot
    groups = resources_of(base, "AWS::Logs::LogGroup").values()
    assert not [g for g in groups if "aws-waf-logs" in json.dumps(g)]  # one place for WAF logs


def test_vpc_flow_logs_record_rejected_traffic_into_the_audit_bucket(base):
    (flow_log,) = resources_of(base, "AWS::EC2::FlowLog").values()
    properties = flow_log["Properties"]
    assert properties["ResourceType"] == "VPC"
    assert properties["ResourceId"] == {"Ref": "Vpc"}
    assert properties["TrafficType"] in ("REJECT", "ALL")
    assert properties["LogDestinationType"] == "s3"
    assert properties["LogDestination"] == {"Fn::GetAtt": ["AuditBucket", "Arn"]}
    assert flow_log["DependsOn"] == "AuditBucketPolicy"


def test_deploy_role_manages_only_the_service_stacks_dashboard():
    ci = load_template("ci-access.yaml")
    policies = ci["Resources"]["DeployRole"]["Properties"]["Policies"]
    statements = [s for p in policies for s in p["PolicyDocument"]["Statement"]]
    dashboards = [s for s in statements if any("Dashboard" in a for a in s["Action"])]
    assert len(dashboards) == 1
    (statement,) = dashboards
    assert sorted(statement["Action"]) == [
        "cloudwatch:DeleteDashboards",
        "cloudwatch:GetDashboard",
        "cloudwatch:PutDashboard",
    ]
    arn = "arn:${AWS::Partition}:cloudwatch::${AWS::AccountId}:dashboard/${ServiceStackName}"
    assert statement["Resource"] == {"Fn::Sub": arn}


def test_docs_say_what_to_look_at_first_for_every_alarm_and_what_operations_cost():
    section = (ROOT / "docs/reference/alarms.md").read_text()
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    for name, template in all_templates().items():
        for alarm in resources_of(template, "AWS::CloudWatch::Alarm"):
            (row,) = [r for r in rows if re.match(rf"\| [^|]*`{alarm}`", r)] or [None]
            assert row, f"{name} {alarm} has no row in docs/reference/alarms.md"
            assert len([cell for cell in row.split(" | ") if cell.strip()]) == 4, row
    for words in ("make dashboard", "make logs FILTER=", "SINCE=", "**365**", "SSE-S3"):
        assert words in section, words
    costs = (ROOT / "docs/reference/costs.md").read_text()
    costs = costs[costs.index("\n## The defaults") :]
    costs = costs[: costs.find("\n## ", 1)]
    items = {line.split("|")[1].strip() for line in costs.splitlines() if line.startswith("| ")}
    for item in ("Log ingestion", "Log storage", "Log metrics", "Audit bucket", "Flow logs"):
        assert item in items, item
    assert {"Dashboard", "CloudWatch alarms"} <= items


# ------------------------------------------------------------------ the scripts, against moto


def run(command, env, **variables):
    """Run a script, or `make <target>` as a user would (variables on the command line)."""
    args = [f"{key}={value}" for key, value in variables.items()]
    return subprocess.run(
        command + args,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def make(target, env, **variables):
    return run(["make", "-s", "-C", str(ROOT), target], env, **variables)


def default_group_rules(ec2, vpc):
    (group,) = ec2.describe_security_groups(
        Filters=[
            {"Name": "vpc-id", "Values": [vpc]},
            {"Name": "group-name", "Values": ["default"]},
        ]
    )["SecurityGroups"]
    rules = ec2.describe_security_group_rules(
        Filters=[{"Name": "group-id", "Values": [group["GroupId"]]}]
    )["SecurityGroupRules"]
    return group["GroupId"], rules


def test_default_security_group_script_revokes_every_rule_and_a_rerun_changes_nothing(
    aws_env, moto_url
):
    cfn = client("cloudformation", moto_url)
    template = {
        "Resources": {"Vpc": {"Type": "AWS::EC2::VPC", "Properties": {"CidrBlock": "10.9.0.0/16"}}}
    }
    cfn.create_stack(StackName="ops-sg", TemplateBody=json.dumps(template))
    vpc = cfn.describe_stack_resource(StackName="ops-sg", LogicalResourceId="Vpc")[
        "StackResourceDetail"
    ]["PhysicalResourceId"]
    ec2 = client("ec2", moto_url)
    group, before = default_group_rules(ec2, vpc)
    # AWS gives a new VPC's default group two rules: all traffic out, and all traffic in from
    # members of the group. moto makes only the first; add the second as AWS has it.
    assert [r["IsEgress"] for r in before] == [True]
    ec2.authorize_security_group_ingress(
        GroupId=group,
        IpPermissions=[{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}],
    )
    assert len(default_group_rules(ec2, vpc)[1]) == 2
    env = {**aws_env, "BASE_STACK": "ops-sg"}
    first = run([str(ROOT / "scripts" / "default-sg.sh")], env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == (
        f"Default security group {group} of {vpc}: revoked 1 inbound and 1 outbound rules."
    )
    assert default_group_rules(ec2, vpc)[1] == []
    again = run([str(ROOT / "scripts" / "default-sg.sh")], env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (
        f"Default security group {group} of {vpc} has no rules (nothing to revoke)."
    )
    assert default_group_rules(ec2, vpc)[1] == []


def test_default_security_group_script_names_a_stack_without_a_vpc(aws_env):
    result = run([str(ROOT / "scripts" / "default-sg.sh")], {**aws_env, "BASE_STACK": "nothing"})
    assert result.returncode == 1
    assert result.stderr.startswith("error: aws cloudformation describe-stack-resource failed")


def test_stack_deploy_empties_the_default_security_group_right_after_the_base_stack():
    script = (ROOT / "scripts" / "stack-deploy.sh").read_text()
    base = 'deploy_stack "$BASE_STACK" base.yaml <"$WORK/base.parameters"\n'
    assert base + '  "$ROOT/scripts/default-sg.sh"\n' in script


STUB = {
    "Resources": {
        "Repository": {
            "Type": "AWS::ECR::Repository",
            "Properties": {"RepositoryName": "ops-stub"},
        },
        "Cluster": {"Type": "AWS::ECS::Cluster"},
        "LogGroup": {
            "Type": "AWS::Logs::LogGroup",
            "Properties": {"LogGroupName": "/ecs/ops-stub", "RetentionInDays": 7},
        },
    },
    "Outputs": {
        "RepositoryName": {"Value": {"Ref": "Repository"}},
        "RepositoryUri": {"Value": {"Fn::GetAtt": ["Repository", "RepositoryUri"]}},
        "ClusterName": {"Value": {"Ref": "Cluster"}},
        "LogGroupName": {"Value": {"Ref": "LogGroup"}},
        "ServiceUrl": {"Value": "http://127.0.0.1:9"},
    },
}
STREAM = "cars-api/cars-api/fedcba9876543210fedcba9876543210"
# Lines as cars.py prints them (the real server's lines are matched in the tests above).
ACCESS_503 = (
    '{"time": "2026-01-01T00:00:00.000+00:00", "level": "INFO", "logger": "cars", '
    '"message": "request", "method": "GET", "path": "/cars", "status": 503, "duration_ms": 2.69, '
    '"request_id": "e57c2c4f", "peer": "10.20.0.7", "forwarded_for": null}'
)
UNAVAILABLE = (
    '{"time": "2026-01-01T00:00:00.000+00:00", "level": "WARNING", "logger": "cars", '
    '"message": "database unavailable", "error": "(2003, Connection refused)"}'
)


@pytest.fixture(scope="module")
def stub(aws_env, moto_url):
    """A base stack stand-in with log events: two recent, one three hours old."""
    client("cloudformation", moto_url).create_stack(
        StackName="ops-stub", TemplateBody=json.dumps(STUB)
    )
    logs = client("logs", moto_url)
    logs.create_log_stream(logGroupName="/ecs/ops-stub", logStreamName=STREAM)
    now = int(time.time() * 1000)
    logs.put_log_events(
        logGroupName="/ecs/ops-stub",
        logStreamName=STREAM,
        logEvents=[
            {"timestamp": now - 3 * 3600 * 1000, "message": UNAVAILABLE},
            {"timestamp": now - 2000, "message": ACCESS_503},
            {"timestamp": now - 1000, "message": UNAVAILABLE},
            {"timestamp": now - 500, "message": "filter text: $.status, as typed"},
        ],
    )
    return {
        **aws_env,
        "STACK_PREFIX": "ops",
        "BASE_STACK": "ops-stub",
        "SERVICE_STACK": "ops-stub-service",
    }


def test_logs_with_a_filter_and_a_window_print_readable_matching_lines(stub):
    result = make("logs", stub, FILTER='"database unavailable"', SINCE="1h")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, "the three-hour-old line is outside the window"
    stamp, task, text = lines[0].split("  ", 2)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stamp)
    assert task == "fedcba98"
    assert text == "WARNING  database unavailable  error=(2003, Connection refused)"
    wider = make("logs", stub, FILTER='"database unavailable"', SINCE="4h")
    assert len(wider.stdout.strip().splitlines()) == 2


def test_logs_print_requests_as_status_method_path_and_duration(stub):
    result = make("logs", stub, FILTER='"status": 503', SINCE="15m")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(
        "503  GET /cars  2.69 ms  request_id=e57c2c4f  peer=10.20.0.7"
    )


def test_logs_hand_the_filter_over_as_typed(stub):
    result = make("logs", stub, FILTER='"$.status"', SINCE="1h")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert line.endswith("filter text: $.status, as typed")


def test_logs_without_matches_say_so(stub):
    result = make("logs", stub, FILTER='"no such words"', SINCE="2d")
    assert result.returncode == 0, result.stderr
    assert "No events in /ecs/ops-stub in the last 2d that match" in result.stdout


@pytest.mark.parametrize("since", ["1w", "0h", "h", "1.5h", "90", "1h;ls", "-1h"])
def test_logs_refuse_a_malformed_window_before_any_aws_call(aws_env, since):
    result = make("logs", {**aws_env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, SINCE=since)
    assert result.returncode == 2
    assert "SINCE must be a number and a unit m, h or d" in result.stderr
    assert "usage: make logs" in result.stderr


def test_dashboard_prints_the_console_url_of_the_service_stacks_dashboard(stub, moto_url):
    client("cloudwatch", moto_url).put_dashboard(
        DashboardName="ops-stub-service", DashboardBody='{"widgets": []}'
    )
    result = make("dashboard", stub)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"https://{REGION}.console.aws.amazon.com/cloudwatch/home?region={REGION}"
        "#dashboards/dashboard/ops-stub-service"
    )


def test_dashboard_without_a_release_says_to_deploy_one(stub):
    result = make("dashboard", {**stub, "SERVICE_STACK": "ops-none"})
    assert result.returncode != 0
    assert result.stderr.startswith(f"error: no dashboard ops-none in {REGION}")
    assert "make release" in result.stderr


def test_status_of_a_running_release_prints_the_dashboard_url(stub, moto_url):
    cfn = client("cloudformation", moto_url)
    outputs = cfn.describe_stacks(StackName="ops-stub")["Stacks"][0]["Outputs"]
    cluster = next(o["OutputValue"] for o in outputs if o["OutputKey"] == "ClusterName")
    ecs = client("ecs", moto_url)
    image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/ops-stub@sha256:" + "ab" * 32
    task = ecs.register_task_definition(
        family="ops-stub-service",
        containerDefinitions=[{"name": "cars-api", "image": image, "memory": 512}],
    )["taskDefinition"]["taskDefinitionArn"]
    ecs.create_service(
        cluster=cluster, serviceName="ops-stub-service", taskDefinition=task, desiredCount=1
    )
    release = {
        "Resources": {"Topic": {"Type": "AWS::SNS::Topic"}},
        "Outputs": {"ServiceName": {"Value": "ops-stub-service"}},
    }
    cfn.create_stack(StackName="ops-stub-service", TemplateBody=json.dumps(release))
    result = make("status", stub)
    assert result.returncode == 0, result.stderr
    assert "service      ops-stub-service (ACTIVE)" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == (
        f"dashboard    https://{REGION}.console.aws.amazon.com/cloudwatch/home?region={REGION}"
        "#dashboards/dashboard/ops-stub-service"
    )


def test_stack_delete_says_the_audit_bucket_survives(aws_env, moto_url):
    template = {
        "Resources": {
            **STUB["Resources"],
            "Repository": {
                "Type": "AWS::ECR::Repository",
                "Properties": {"RepositoryName": "ops-doomed"},
            },
            "LogGroup": {
                "Type": "AWS::Logs::LogGroup",
                "Properties": {"LogGroupName": "/ecs/ops-doomed", "RetentionInDays": 7},
            },
            "AuditBucket": {"Type": "AWS::S3::Bucket", "DeletionPolicy": "Retain"},
        },
        "Outputs": {**STUB["Outputs"], "AuditBucketName": {"Value": {"Ref": "AuditBucket"}}},
    }
    cfn = client("cloudformation", moto_url)
    cfn.create_stack(StackName="ops-doomed", TemplateBody=json.dumps(template))
    bucket = cfn.describe_stack_resource(StackName="ops-doomed", LogicalResourceId="AuditBucket")[
        "StackResourceDetail"
    ]["PhysicalResourceId"]
    env = {
        **aws_env,
        "STACK_PREFIX": "ops",
        "BASE_STACK": "ops-doomed",
        "SERVICE_STACK": "ops-doomed-service",
    }
    result = make("stack-delete", env, CONFIRM="ops-doomed")
    assert result.returncode == 0, result.stderr
    assert f"  - S3 bucket {bucket} with the load balancer and VPC flow logs" in result.stdout
    assert f"aws s3 rb s3://{bucket} --force --region {REGION}" in result.stdout


MIGRATE_TASK = "5f0e3c1d2b4a49e8a7c6d5e4f3a2b1c0"  # pragma: allowlist secret (a task id)
BOOTSTRAP_TASK = "0c1b2a3f4e5d6c7b8a9f0e1d2c3b4a5f"  # pragma: allowlist secret (a task id)


@pytest.fixture(scope="module")
def one_off_logs(stub, moto_url):
    """The streams one-off tasks write: <awslogs-stream-prefix>/<container>/<task id>."""
    logs = client("logs", moto_url)
    now = int(time.time() * 1000)
    for prefix, task, lines in (
        ("migrate", MIGRATE_TASK, ["applying migration 7", "migration 7 failed: duplicate key"]),
        ("bootstrap", BOOTSTRAP_TASK, ["bootstrap done"]),
    ):
        stream = f"{prefix}/cars-api/{task}"
        logs.create_log_stream(logGroupName="/ecs/ops-stub", logStreamName=stream)
        logs.put_log_events(
            logGroupName="/ecs/ops-stub",
            logStreamName=stream,
            logEvents=[
                {"timestamp": now - 100 + i, "message": json.dumps({"level": "INFO", "message": m})}
                for i, m in enumerate(lines)
            ],
        )
    return stub


def test_logs_of_one_task_print_exactly_its_lines_oldest_first(one_off_logs):
    result = make("logs", one_off_logs, TASK=MIGRATE_TASK, STREAM_PREFIX="migrate")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split("  ", 2)[2] for line in lines] == [
        '{"level": "INFO", "message": "applying migration 7"}',
        '{"level": "INFO", "message": "migration 7 failed: duplicate key"}',
    ]
    assert all(line.split("  ")[1] == MIGRATE_TASK[:8] for line in lines)
    alone = make("logs", one_off_logs, TASK=BOOTSTRAP_TASK)
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.strip().endswith('"bootstrap done"}')
    assert "migration" not in alone.stdout


def test_logs_of_a_task_under_another_prefix_or_without_a_stream_say_so(one_off_logs):
    result = make("logs", one_off_logs, TASK=MIGRATE_TASK, STREAM_PREFIX="bootstrap")
    assert result.returncode == 0, result.stderr
    assert f"No log stream of task {MIGRATE_TASK} under prefix bootstrap" in result.stdout


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        ({"TASK": "abc;ls"}, "TASK must be an ECS task id"),
        ({"TASK": MIGRATE_TASK, "STREAM_PREFIX": "a b"}, "STREAM_PREFIX must be a log stream"),
    ],
)
def test_logs_refuse_a_malformed_task_or_prefix_before_any_aws_call(aws_env, variables, words):
    result = make("logs", {**aws_env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, **variables)
    assert result.returncode == 2
    assert words in result.stderr


SECRETS_STUB = {
    "Resources": {
        name: {"Type": "AWS::SecretsManager::Secret", "Properties": {"Name": f"ops-stub-{name}"}}
        for name in ("app", "migration", "rdsca")
    }
}


@pytest.fixture
def rotating(stub, moto_url):
    """A data stack stand-in: app and migration secrets rotate, a migration version is pending."""
    cfn = client("cloudformation", moto_url)
    if not any(s["StackName"] == "ops-stub-data" for s in cfn.list_stacks()["StackSummaries"]):
        cfn.create_stack(StackName="ops-stub-data", TemplateBody=json.dumps(SECRETS_STUB))
        secrets = client("secretsmanager", moto_url)
        for name in ("app", "migration"):
            secrets.rotate_secret(
                SecretId=f"ops-stub-{name}", RotationRules={"AutomaticallyAfterDays": 30}
            )
        secrets.put_secret_value(
            SecretId="ops-stub-migration",  # pragma: allowlist secret (a name)
            SecretString="half-rotated",  # pragma: allowlist secret
            VersionStages=["AWSPENDING"],
        )
    return {**stub, "DATA_STACK": "ops-stub-data"}


def secret_lines(result):
    lines = result.stdout.splitlines()
    start = lines.index("secrets")
    return {
        line.split(":")[0].strip(): line for line in lines[start + 1 :] if line.startswith("  ")
    }


def test_status_shows_each_secrets_rotation_and_a_stuck_pending_version(rotating):
    result = make("status", rotating, PENDING_STUCK_MINUTES="0")
    assert result.returncode != 0, "a stuck rotation fails make status"
    found = secret_lines(result)
    assert re.search(
        r"ops-stub-app: rotates every 30 days, last \d{4}-\d\d-\d\d \d\d:\d\d:\d\d, next .*, "
        r"nothing pending$",
        found["ops-stub-app"],
    )
    assert ", STUCK: AWSPENDING since " in found["ops-stub-migration"]
    assert (
        "aws secretsmanager rotate-secret --secret-id ops-stub-migration retries"
        in (found["ops-stub-migration"])
    )
    assert "ops-stub-rdsca: no rotation schedule, last changed " in found["ops-stub-rdsca"]


def test_status_calls_a_fresh_pending_version_a_rotation_in_progress(rotating):
    result = make("status", rotating)  # PENDING_STUCK_MINUTES: 60
    assert result.returncode == 0, result.stderr
    assert ", rotating now (AWSPENDING since " in secret_lines(result)["ops-stub-migration"]


def test_status_refuses_a_stuck_threshold_that_is_not_minutes(aws_env):
    result = make("status", aws_env, PENDING_STUCK_MINUTES="1h")
    assert result.returncode == 2
    assert "PENDING_STUCK_MINUTES must be a number of minutes" in result.stderr
