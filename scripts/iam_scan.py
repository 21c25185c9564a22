"""Render the deploy role's policy from ci-access.yaml with placeholder values and scan it offline.

usage: python scripts/iam_scan.py <cloudsplaining executable> [template]
       python scripts/iam_scan.py --print

cloudsplaining flags privilege escalation, resource exposure, data exfiltration and
infrastructure modification where a resource is unconstrained. It always exits 0, so this script
fails (exit 1) when it reports anything at all but the ACCEPTED actions below. --print only
prints the rendered policy.
"""

import json
import subprocess  # nosec B404  # runs the cloudsplaining executable named by the caller
import sys
import tempfile
from pathlib import Path

from cfnlint.decode import decode

TEMPLATE = Path(__file__).resolve().parent.parent / "cloudformation" / "ci-access.yaml"
PSEUDO = {
    "AWS::Partition": "aws",
    "AWS::Region": "eu-west-1",
    "AWS::AccountId": "123456789012",
    "AWS::StackName": "cars-api-base",
    "AWS::StackId": (
        "arn:aws:cloudformation:eu-west-1:123456789012:stack/cars-api-base/"
        "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"
    ),
}
PLACEHOLDERS = {  # parameters without a default, as make stack-deploy fills them in
    "GitHubRepository": "example-owner/cars-api",
    "GitHubRepositoryId": "100000001",
    "GitHubOwnerId": "100000002",
    "RepositoryName": "cars-api",
    "ClusterName": "cars-api-base-Cluster-a1b2c3",
    "AlarmTopicArn": "arn:aws:sns:eu-west-1:123456789012:cars-api-base-AlarmTopic-a1b2c3",
    "ExecutionRoleName": "cars-api-base-ExecutionRole-a1b2c3",
    "TaskRoleName": "cars-api-base-TaskRole-a1b2c3",
    "TaskSubnets": "subnet-0a1b2c3d4e5f60001,subnet-0a1b2c3d4e5f60002",
    "TaskPublicIp": "true",
    "MigrationExecutionRoleName": "cars-api-data-MigrationExecutionRole-a1b2c3",
}
# The one finding accepted by design, with its reason (passed as cloudsplaining's exclusions).
ACCEPTED = {
    # An ECR login token can only be granted account-wide; what it may push or pull is decided
    # by the repository-scoped ECR actions of the same policy.
    "ecr:GetAuthorizationToken": "docker login to ECR",
}
CLEAN = "There were no results found."  # cloudsplaining's whole output when it finds nothing
NO_VALUE = object()


class Renderer:
    """Resolve the intrinsic functions of one template for given (else default) parameters."""

    def __init__(self, template, **parameters):
        self.template = template
        self.values = dict(PSEUDO)
        for name, parameter in template["Parameters"].items():
            self.values[name] = str(parameter.get("Default", PLACEHOLDERS.get(name, name)))
        self.values.update(parameters)

    def resources(self):
        """Return the resources the parameters create, rendered."""
        return {
            name: self.render(resource)
            for name, resource in self.template["Resources"].items()
            if "Condition" not in resource or self.condition(resource["Condition"])
        }

    def ref(self, name):
        """Return a parameter's value, or a placeholder name or ARN for a resource."""
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in self.values:
            kind = self.template["Parameters"].get(name, {}).get("Type", "String")
            if kind.startswith(("List<", "CommaDelimitedList")):
                return self.values[name].split(",")
            return self.values[name]
        kind = self.template["Resources"][name]["Type"].split("::")[1].lower()
        if kind in {"sns", "secretsmanager", "iam"}:
            return self.arn(name, kind)
        return f"{name.lower()}-placeholder"

    def arn(self, name, kind):
        """Return a placeholder ARN for resource `name` of service `kind`."""
        return f"arn:aws:{kind}:eu-west-1:123456789012:{name.lower()}-placeholder"

    def condition(self, name):
        """Evaluate a named condition."""
        return self.truth(self.template["Conditions"][name])

    def truth(self, node):
        """Evaluate a condition expression."""
        ((function, argument),) = node.items()
        if function == "Condition":
            return self.condition(argument)
        if function == "Fn::Equals":
            left, right = (self.render(a) for a in argument)
            return str(left) == str(right)
        if function == "Fn::Not":
            return not self.truth(argument[0])
        if function == "Fn::And":
            return all(self.truth(a) for a in argument)
        if function == "Fn::Or":
            return any(self.truth(a) for a in argument)
        raise ValueError(f"unsupported condition {function}")

    def sub(self, argument):
        """Render Fn::Sub in both its forms."""
        text, variables = (argument, {}) if isinstance(argument, str) else argument
        values = {**self.values, **{k: self.render(v) for k, v in variables.items()}}
        for name in self.template["Resources"]:
            values.setdefault(name, self.ref(name))
        for name, value in values.items():
            text = text.replace("${" + name + "}", value if isinstance(value, str) else str(value))
        return text

    def render(self, node):
        """Return node with every intrinsic function resolved."""
        if isinstance(node, list):
            return [v for v in (self.render(item) for item in node) if v is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((key, argument),) = node.items()
            if key == "Ref":
                return self.ref(argument)
            if key == "Fn::Sub":
                return self.sub(argument)
            if key == "Fn::GetAtt":
                name = argument[0]
                kind = self.template["Resources"][name]["Type"].split("::")[1].lower()
                return self.arn(name, kind)
            if key == "Fn::Split":
                separator, text = argument
                return self.render(text).split(separator)
            if key == "Fn::Select":
                index, items = argument[0], self.render(argument[1])
                if isinstance(items, list):  # else (Fn::GetAZs) it stays as written
                    return items[int(index)]
            if key == "Fn::If":
                chosen = argument[1] if self.condition(argument[0]) else argument[2]
                return self.render(chosen)
        rendered = {k: self.render(v) for k, v in node.items()}
        return {k: v for k, v in rendered.items() if v is not NO_VALUE}


def deploy_policy(path=TEMPLATE):
    """Return the deploy role's inline policy document, rendered."""
    template, matches = decode(str(path))
    if matches:
        raise SystemExit(f"{path.name} does not parse: {matches}")
    (policy,) = template["Resources"]["DeployRole"]["Properties"]["Policies"]
    return Renderer(template).render(policy["PolicyDocument"])


def main(argv):
    """Scan the rendered policy; exit 1 on any finding or failure."""
    if len(argv) not in (2, 3):
        print("\n".join(__doc__.strip().splitlines()[2:4]), file=sys.stderr)
        return 2
    document = json.dumps(deploy_policy(*map(Path, argv[2:])), indent=2)
    if argv[1] == "--print":
        print(document)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        policy = Path(scratch) / "deploy-role.json"
        policy.write_text(document)
        exclusions = Path(scratch) / "exclusions.yml"
        exclusions.write_text(json.dumps({"exclude-actions": sorted(ACCEPTED)}))  # JSON is YAML
        scan = subprocess.run(  # noqa: S603  # nosec B603  # the caller's cloudsplaining, fixed argv
            [argv[1], "scan-policy-file", "--input-file", policy, "--exclusions-file", exclusions],
            capture_output=True,
            text=True,
            check=False,
        )
    report = (scan.stdout + scan.stderr).strip()
    if scan.returncode != 0 or report != CLEAN:
        print(
            f"cloudsplaining on the deploy role's policy (exit {scan.returncode}):", file=sys.stderr
        )
        print(report, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
