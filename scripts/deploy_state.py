"""deploy_state.py: reads AWS describe-* JSON saved by the deploy scripts and says what it means.

The shell scripts make every AWS call (AWS CLI v1 or v2) and save the JSON answers; this helper only
reads files, so the decisions (is the rollout complete, rolled back, stuck, serving the wrong image)
live in one place that tests drive with recorded responses. Standard library only.

Exit status: 0 = done/ok, 1 = failed (the line printed says what happened), 3 = not finished yet,
4 = the scan gate refuses the image (only an explicit override may pass it).
"""

import argparse
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

OK, FAILED, PENDING, REFUSED = 0, 1, 3, 4
CONTAINER = "cars-api"  # the fixed container name in service.yaml
BUSY_SUFFIX = "_IN_PROGRESS"
# States in which a stack can only be deleted (its creation failed or a delete half-ran).
MUST_DELETE = {"ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "CREATE_FAILED", "DELETE_FAILED"}
CANCELLED = ("Resource update cancelled", "Resource creation cancelled")


class StateError(Exception):
    """A state the caller must stop on; the message is the one line shown to the user."""


def load(path: Path):
    """The JSON document at path, or None when the file was not written (resource missing)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return json.loads(text) if text.strip() else None


def when(value) -> str:
    """A timestamp as AWS CLI v1 (epoch number or ISO text) or v2 (ISO text) prints it, in UTC."""
    if value is None or value == "":
        return "-"
    if isinstance(value, int | float):
        moment = datetime.fromtimestamp(value / 1000 if value > 1e11 else value, UTC)
    else:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def sort_key(value) -> float:
    """A sortable number for a v1 or v2 timestamp (missing sorts first)."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, int | float):
        return float(value / 1000 if value > 1e11 else value)
    moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


# CloudFormation


def the_stack(doc) -> dict | None:
    stacks = (doc or {}).get("Stacks") or []
    return stacks[0] if stacks else None


def stack_check(doc, name: str) -> str:
    """The stack status when a deploy may proceed (MISSING when absent); Failure when it may not."""
    stack = the_stack(doc)
    if stack is None:
        return "MISSING"
    status = stack["StackStatus"]
    if status == "REVIEW_IN_PROGRESS":  # only an unexecuted change set: deploy creates it
        return status
    if status.endswith(BUSY_SUFFIX):
        raise StateError(f"stack {name} is busy ({status}): wait for it to finish, then retry")
    if status in MUST_DELETE:
        raise StateError(
            f"stack {name} is {status} and cannot be updated: delete it "
            f"(aws cloudformation delete-stack --stack-name {name}), then retry"
        )
    if status == "UPDATE_ROLLBACK_FAILED":
        raise StateError(
            f"stack {name} is UPDATE_ROLLBACK_FAILED: fix the cause, then run "
            f"aws cloudformation continue-update-rollback --stack-name {name}"
        )
    return status


def output(doc, name: str, key: str) -> str:
    stack = the_stack(doc)
    for item in (stack or {}).get("Outputs") or []:
        if item.get("OutputKey") == key:
            return item["OutputValue"]
    raise StateError(f"stack {name} has no output {key}: is it a cars-api stack, fully created?")


def root_cause(stack_doc, events_doc) -> str:
    """The first failure of the latest stack operation, from DescribeStackEvents (newest first)."""
    stack = the_stack(stack_doc) or {}
    failures = []
    for event in (events_doc or {}).get("StackEvents") or []:
        is_stack = event.get("ResourceType") == "AWS::CloudFormation::Stack"
        status = event.get("ResourceStatus", "")
        started = status in ("CREATE_IN_PROGRESS", "UPDATE_IN_PROGRESS")
        if is_stack and started and event.get("ResourceStatusReason") == "User Initiated":
            break  # the start of the latest operation
        reason = event.get("ResourceStatusReason") or ""
        if status.endswith("_FAILED") and not is_stack and not reason.startswith(CANCELLED):
            failures.append(f"{event.get('LogicalResourceId')}: {reason}")
    if failures:
        return failures[-1]  # events are newest first: the last one found happened first
    return stack.get("StackStatusReason") or "no failure reason recorded"


def stack_failure(stack_doc, events_doc, name: str) -> str:
    """Where a failed deploy left the stack, and why (its first failure)."""
    stack = the_stack(stack_doc)
    if stack is None:
        return f"stack {name} does not exist"
    status = stack["StackStatus"]
    line = f"stack {name} is {status} ({root_cause(stack_doc, events_doc)})"
    if status in MUST_DELETE:
        line += (
            "; delete it before the next deploy: "
            f"aws cloudformation delete-stack --stack-name {name}"
        )
    return line


def changed_parameters(doc, pairs: list[str]) -> list[str]:
    """The Name=Value pairs whose value differs from the deployed stack's (all when it has none)."""
    stack = the_stack(doc) or {}
    if stack.get("StackStatus") == "REVIEW_IN_PROGRESS":  # never created: nothing to keep
        return pairs
    current = {p["ParameterKey"]: p.get("ParameterValue") for p in stack.get("Parameters") or []}
    return [pair for pair in pairs if current.get(pair.partition("=")[0]) != pair.partition("=")[2]]


def parameter(doc, key: str) -> str:
    """The deployed value of parameter key ('' when the stack or the parameter is missing)."""
    for item in (the_stack(doc) or {}).get("Parameters") or []:
        if item.get("ParameterKey") == key:
            return item.get("ParameterValue") or ""
    return ""


def outputs(doc) -> list[str]:
    items = (the_stack(doc) or {}).get("Outputs") or []
    if not items:
        return ["  (the stack reports no outputs)"]
    width = max(len(item["OutputKey"]) for item in items)
    return [f"  {item['OutputKey']:{width}}  {item['OutputValue']}" for item in items]


# Change sets: what a deploy would add, modify or replace, and whether it may


# Resources whose replacement loses data or its name: the database, a bucket, the image
# repository, a secret. stack-deploy refuses to replace them unless ALLOW_REPLACE=true.
STATEFUL = {
    "AWS::RDS::DBInstance",
    "AWS::RDS::DBCluster",
    "AWS::S3::Bucket",
    "AWS::ECR::Repository",
    "AWS::SecretsManager::Secret",
}
NO_CHANGES = 5  # exit status of `changes` when the change set is empty
EMPTY_REASONS = ("didn't contain changes", "No updates are to be performed")


def template_parameters(text: str) -> list[str]:
    """The names of the Parameters section of a CloudFormation YAML template (2-space indent)."""
    names, inside = [], False
    for line in text.splitlines():
        if re.match(r"^\S", line):
            inside = line.rstrip() == "Parameters:"
            continue
        found = re.match(r"^  ([A-Za-z0-9]+):\s*$", line)
        if inside and found:
            names.append(found.group(1))
    return names


def change_set_input(stack_doc, template: Path, pairs: list[str], name: str, stack: str) -> dict:
    """CreateChangeSet input: CREATE for a new stack, else UPDATE keeping every unset parameter."""
    current = the_stack(stack_doc)
    created = current is not None and current.get("StackStatus") != "REVIEW_IN_PROGRESS"
    text = template.read_text()
    declared = template_parameters(text)
    given = dict(pair.partition("=")[::2] for pair in pairs if pair)
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise StateError(f"{template.name} has no parameter {', '.join(unknown)}")
    had = {p["ParameterKey"] for p in (current or {}).get("Parameters") or []} if created else set()
    parameters = [{"ParameterKey": key, "ParameterValue": value} for key, value in given.items()]
    parameters += [
        {"ParameterKey": key, "UsePreviousValue": True}
        for key in declared
        if key in had and key not in given
    ]
    return {
        "StackName": stack,
        "ChangeSetName": name,
        "ChangeSetType": "UPDATE" if created else "CREATE",
        "TemplateBody": text,
        "Parameters": parameters,
        "Capabilities": ["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"],
    }


def change_lines(pages: list) -> tuple[list[str], list[str]]:
    """(one line per resource change, the stateful replacements among them)."""
    lines, replaced = [], []
    for page in pages:
        for change in (page or {}).get("Changes") or []:
            item = change.get("ResourceChange") or {}
            action = item.get("Action", "?")
            kind = item.get("ResourceType", "?")
            logical = item.get("LogicalResourceId", "?")
            replacement = item.get("Replacement") or ""
            if action == "Modify" and replacement in ("True", "Conditional"):
                action = "Replace" if replacement == "True" else "Replace?"
            line = f"  {action:9} {logical} ({kind})"
            if item.get("PhysicalResourceId"):
                line += f" {item['PhysicalResourceId']}"
            causes = sorted(
                {
                    (d.get("Target") or {}).get("Name") or (d.get("Target") or {}).get("Attribute")
                    for d in item.get("Details") or []
                }
                - {None}
            )
            if causes:
                line += f"  [{', '.join(causes)}]"
            if action.startswith("Replace") and kind in STATEFUL:
                line += "  STATEFUL"
                replaced.append(f"{logical} ({kind})")
            lines.append(line)
    return lines, replaced


def changes(pages: list, stack: str, allow_replace: bool, kind: str) -> tuple[int, str]:
    """The plan of a change set: its lines; refused when it replaces a stateful resource."""
    first = pages[0] if pages else {}
    status = first.get("Status", "")
    reason = first.get("StatusReason") or ""
    if status == "FAILED":
        if any(words in reason for words in EMPTY_REASONS):
            return NO_CHANGES, f"{stack}: no changes"
        return FAILED, f"the change set of {stack} failed: {reason}"
    lines, replaced = change_lines(pages)
    new = " (new stack)" if kind == "CREATE" else ""
    head = f"{stack}: {len(lines)} resource change(s){new}"
    if not lines:  # a parameter value or an output changes, no resource does
        lines = ["  (parameter values or outputs only)"]
    text = "\n".join([head, *lines])
    if replaced and not allow_replace:
        return REFUSED, text + (
            f"\nrefused: this would REPLACE {', '.join(replaced)} of {stack} (a new, empty one; "
            "the data of the old one is lost or left behind): nothing was changed. Undo the "
            "setting that forces it, or run again with ALLOW_REPLACE=true after a snapshot/backup"
        )
    return OK, text


def failed_create(stack_doc, resources_doc, name: str) -> str:
    """Whether a stack a first create left failed may be deleted and created again.

    Returns the lines to say when it may (nothing stateful is left in it); fails with the exact
    commands when a stateful resource still exists, which only a person may decide to delete.
    """
    stack = the_stack(stack_doc) or {}
    status = stack.get("StackStatus", "")
    left, kept = [], []
    for item in (resources_doc or {}).get("StackResources") or []:
        state = item.get("ResourceStatus", "")
        physical = item.get("PhysicalResourceId") or ""
        what = f"{item.get('LogicalResourceId')} ({item.get('ResourceType')}) {physical}".strip()
        gone = state in ("DELETE_COMPLETE", "DELETE_SKIPPED") or not physical
        if state == "DELETE_SKIPPED" and physical:
            kept.append(what)
        elif not gone and item.get("ResourceType") in STATEFUL:
            left.append((item, what))
    if left:
        steps = [
            "aws rds modify-db-instance --db-instance-identifier "
            f"{item['PhysicalResourceId']} --no-deletion-protection --apply-immediately"
            for item, _ in left
            if item.get("ResourceType") == "AWS::RDS::DBInstance"
        ]
        steps.append(f"aws cloudformation delete-stack --stack-name {name}")
        retain = " ".join(item["LogicalResourceId"] for item, _ in left)
        raise StateError(
            f"stack {name} is {status} from a failed first create and still holds "
            f"{'; '.join(what for _, what in left)}: nothing was changed. To start over "
            f"without it: {' && '.join(steps)}, then make stack-deploy again; to keep it, delete "
            f"the stack with --retain-resources {retain} once it is DELETE_FAILED and import or "
            "remove the resource by hand"
        )
    said = [
        f"stack {name} is {status} from a failed first create; nothing of value is in it:"
        " deleting it and creating it again"
    ]
    said += [
        f"  kept by its DeletionPolicy (delete it if the create fails on its name): {what}"
        for what in kept
    ]
    return "\n".join(said)


# ECS


def task_images(directory: Path) -> dict[str, str]:
    """taskDefinitionArn -> image of the cars-api container, from saved DescribeTaskDefinition."""
    images = {}
    for path in sorted((directory / "taskdefs").glob("*.json")):
        taskdef = (load(path) or {}).get("taskDefinition") or {}
        containers = taskdef.get("containerDefinitions") or []
        chosen = next((c for c in containers if c.get("name") == CONTAINER), None)
        chosen = chosen or (containers[0] if containers else {})
        if taskdef.get("taskDefinitionArn"):
            images[taskdef["taskDefinitionArn"]] = chosen.get("image", "(no image)")
    return images


def the_service(doc) -> dict:
    services = (doc or {}).get("services") or []
    if not services:
        failures = (doc or {}).get("failures") or [{}]
        arn = failures[0].get("arn", "the service")
        raise StateError(f"{arn} not found ({failures[0].get('reason', 'MISSING')})")
    service = services[0]
    if service.get("status") != "ACTIVE":
        raise StateError(f"service {service.get('serviceName')} is {service.get('status')}")
    return service


def image_of(deployment: dict, images: dict[str, str]) -> str:
    return images.get(deployment.get("taskDefinition", ""), deployment.get("taskDefinition", "?"))


def tasks(count: int) -> str:
    return f"{count} task" if count == 1 else f"{count} tasks"


def serving(service: dict, images: dict[str, str]) -> str:
    """The images that have running tasks (repository name:tag), for error lines."""
    running = [d for d in service.get("deployments") or [] if d.get("runningCount", 0) > 0]
    if not running:
        return "nothing (no task is running)"
    short = [image_of(d, images).rsplit("/", 1)[-1] for d in running]
    return ", ".join(
        f"{name} ({tasks(d['runningCount'])})" for name, d in zip(short, running, strict=True)
    )


def last_event(service: dict) -> str:
    """The newest ECS service event that tells of a failure or rollback, if any."""
    words = ("circuit breaker", "rolling back", "rolled back", "failed", "alarm", "unable")
    for event in service.get("events") or []:  # newest first
        message = event.get("message", "")
        if any(word in message.lower() for word in words):
            return f" (last ECS event: {message})"
    return ""


def rollout(services_doc, images: dict[str, str], expected: str) -> tuple[int, str]:
    """Decide whether expected is live: primary COMPLETED, exact image, running == desired."""
    service = the_service(services_doc)
    deployments = service.get("deployments") or []
    now = serving(service, images)
    primary = next((d for d in deployments if d.get("status") == "PRIMARY"), None)
    if primary is None:
        return (
            FAILED,
            f"service {service['serviceName']} has no primary deployment; now serving {now}",
        )
    for deployment in deployments:
        failed = deployment is not primary and deployment.get("rolloutState") == "FAILED"
        if failed and image_of(deployment, images) == expected:
            reason = deployment.get("rolloutStateReason", "no reason given")
            return FAILED, (
                f"{expected} was rolled back by the circuit breaker/alarm: {reason}; "
                f"now serving {now}"
            )
    state = primary.get("rolloutState", "")
    running, desired = primary.get("runningCount", 0), primary.get("desiredCount", 0)
    actual = image_of(primary, images)
    if state == "FAILED":
        reason = primary.get("rolloutStateReason", "no reason given")
        return FAILED, (
            f"the deployment of {actual} failed (circuit breaker/alarm, no rollback): {reason}; "
            f"now serving {now}"
        )
    if actual != expected:
        return FAILED, (
            f"wrong image: the primary deployment runs {actual}, not {expected}"
            f"{last_event(service)}; now serving {now}"
        )
    if desired < 1:
        return (
            FAILED,
            f"desired count of {service['serviceName']} is 0: nothing would serve {actual}",
        )
    others = sum(d.get("runningCount", 0) for d in deployments if d is not primary)
    progress = f"{running}/{desired} tasks running"
    if primary.get("failedTasks"):
        progress += f", {primary['failedTasks']} failed to start"
    if state == "COMPLETED" and running == desired and others == 0:
        return OK, f"{expected} is live: {progress}"
    if others:
        progress += f", {tasks(others)} of the previous release still running"
    return PENDING, f"rollout of {expected} is {state or 'in progress'}: {progress}"


def deployments_table(service: dict, images: dict[str, str]) -> list[str]:
    lines = []
    for d in service.get("deployments") or []:
        lines.append(
            f"  {d.get('status', '?'):8} {d.get('rolloutState', '-'):12} "
            f"{d.get('runningCount', 0)}/{d.get('desiredCount', 0)}  {when(d.get('updatedAt'))}  "
            f"{image_of(d, images)}"
        )
        if d.get("rolloutStateReason"):
            lines.append(f"           {d['rolloutStateReason']}")
    return lines


def commit_of(stack_doc, image: str) -> str:
    """The commit of the live image: the stack's ImageTag when its digest is the live one."""
    for item in (the_stack(stack_doc) or {}).get("Parameters") or []:
        if item.get("ParameterKey") == "ImageTag":
            sha, _, digest = item.get("ParameterValue", "").partition("@")
            if digest and image.endswith(f"@{digest}"):
                return sha
    return "unknown (the live image is not the one the service stack names)"


def status(services_doc, images: dict[str, str], url: str, stack_doc=None) -> list[str]:
    service = the_service(services_doc)
    primary = next((d for d in service.get("deployments") or [] if d["status"] == "PRIMARY"), {})
    live = image_of(primary, images) if primary else "none"
    lines = [
        f"service      {service['serviceName']} ({service.get('status')})",
        f"live image   {live}",
        f"commit       {commit_of(stack_doc, live)}",
        f"tasks        {service.get('runningCount', 0)} running / "
        f"{service.get('desiredCount', 0)} desired ({service.get('pendingCount', 0)} pending)",
        f"url          {url}",
        "deployments  (status, rollout, running/desired, updated UTC, image)",
        *deployments_table(service, images),
        "events       (newest first, UTC)",
    ]
    for event in (service.get("events") or [])[:5]:
        lines.append(f"  {when(event.get('createdAt'))}  {event.get('message', '')}")
    return lines


# ECR


def tags_of(images_doc) -> list[dict]:
    return list((images_doc or {}).get("imageDetails") or [])


def resolve(images_doc, sha: str, repository: str) -> str:
    """The image tag that sha names: an exact tag, else the one tag that starts with it."""
    tags = sorted({tag for image in tags_of(images_doc) for tag in image.get("imageTags") or []})
    if sha in tags:
        return sha
    matches = [tag for tag in tags if tag.startswith(sha)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise StateError(
            f"{sha} is ambiguous in {repository} ({', '.join(matches)}): give more characters; "
            "nothing changed"
        )
    raise StateError(
        f"{sha} is not an image in {repository}: nothing changed "
        "(make history lists the images you can deploy)"
    )


def is_live(image: dict, live_image: str) -> bool:
    """True when the live image (repository@digest, or repository:tag of old) is this one."""
    if "@" in live_image:
        return live_image.rsplit("@", 1)[-1] == image.get("imageDigest")
    live_tag = live_image.rsplit(":", 1)[-1] if live_image else ""
    return bool(live_tag) and live_tag in (image.get("imageTags") or [])


def digest_of(images_doc, tag: str) -> str:
    """The digest the tag names in the saved DescribeImages answer."""
    for image in tags_of(images_doc):
        if tag in (image.get("imageTags") or []):
            return image["imageDigest"]
    raise StateError(f"{tag} is not a tag in the repository: nothing changed")


def history(images_doc, live_image: str) -> list[str]:
    rows = sorted(tags_of(images_doc), key=lambda i: sort_key(i.get("imagePushedAt")), reverse=True)
    if not rows:
        return ["no images in the repository yet: make release SHA=<commit sha> pushes one"]
    lines = [f"{'PUSHED (UTC)':19}  {'TAG':40}  {'DIGEST':19}  {'SCAN':24}  LIVE"]
    for image in rows:
        tags = image.get("imageTags") or []
        name = ",".join(tags) if tags else f"(untagged {image.get('imageDigest', '')[:19]})"
        counts = (image.get("imageScanFindingsSummary") or {}).get("findingSeverityCounts")
        scan = " ".join(f"{k}={v}" for k, v in sorted(counts.items())) if counts else "-"
        if counts == {}:
            scan = "no findings"
        mark = "live" if is_live(image, live_image) else ""
        digest, pushed = image.get("imageDigest", "")[:19], when(image.get("imagePushedAt"))
        lines.append(f"{pushed:19}  {name:40}  {digest:19}  {scan:24}  {mark}".rstrip())
    return lines


def same_image(batch_doc, local_id: str, reference: str) -> str:
    """Confirm the tag in ECR holds the local image: its manifest or config digest is local_id."""
    found = (batch_doc or {}).get("images") or []
    if not found:
        raise StateError(f"{reference} could not be read from the repository: nothing was pushed")
    digest = found[0].get("imageId", {}).get("imageDigest", "")
    manifest = json.loads(found[0].get("imageManifest") or "{}")
    config = (manifest.get("config") or {}).get("digest", "")
    if local_id in (digest, config):
        return f"{reference} is already in ECR and is the same image ({local_id}): not pushed again"
    # The config holds the labels, so a different config digest is also a different revision label.
    raise StateError(
        f"{reference} is already in ECR but holds another image (manifest {digest}, config "
        f"{config or 'unknown'}), not {local_id} built and tested for this commit: tags are "
        "immutable, so nothing was pushed or deployed; find out who pushed it, then delete that "
        "tag or release another commit"
    )


# ECR image scan

# What stops a release: every CRITICAL finding, and HIGH findings that have a fix (enhanced
# scanning says so per finding; basic scanning never does, so its HIGH findings count as fixable).
SCAN_WAIT = {"IN_PROGRESS", "PENDING"}
SCAN_DONE = {"COMPLETE", "ACTIVE"}  # ACTIVE: enhanced (continuous) scanning keeps watching


def is_date(text: str) -> bool:
    """True for a calendar date written YYYY-MM-DD."""
    try:
        return datetime.strptime(text, "%Y-%m-%d").strftime("%Y-%m-%d") == text
    except ValueError:
        return False


def allowlist(path: Path, today: str) -> tuple[dict[str, str], dict[str, str]]:
    """(id -> reason of live entries, id -> expiry of expired ones) from the allow-list file."""
    live, expired = {}, {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 3 or not is_date(parts[1]):
            raise StateError(
                f"{path.name}:{number}: expected "
                "'<vulnerability id> <YYYY-MM-DD expiry> <reason>', "
                f"got {raw.strip()!r}"
            )
        vulnerability, expiry, reason = parts
        if expiry < today:
            expired[vulnerability] = expiry
        else:
            live[vulnerability] = f"{reason} (until {expiry})"
    return live, expired


def findings(doc) -> list[dict]:
    """The active findings of a DescribeImageScanFindings answer, basic and enhanced alike."""
    scan = (doc or {}).get("imageScanFindings") or {}
    found = []
    for item in scan.get("findings") or []:
        attributes = {a.get("key"): a.get("value", "") for a in item.get("attributes") or []}
        package = f"{attributes.get('package_name', '?')} {attributes.get('package_version', '')}"
        found.append(
            {
                "id": item.get("name", "?"),
                "severity": item.get("severity", "UNDEFINED"),
                "package": package.strip(),
                "fix": "UNKNOWN",
            }
        )
    for item in scan.get("enhancedFindings") or []:
        if item.get("status", "ACTIVE") != "ACTIVE":
            continue  # SUPPRESSED or CLOSED
        details = item.get("packageVulnerabilityDetails") or {}
        packages = details.get("vulnerablePackages") or [{}]
        package = f"{packages[0].get('name', '?')} {packages[0].get('version', '')}"
        found.append(
            {
                "id": details.get("vulnerabilityId") or item.get("title", "?"),
                "severity": item.get("severity", "UNDEFINED"),
                "package": package.strip(),
                "fix": item.get("fixAvailable", "UNKNOWN"),
            }
        )
    return found


def blocks(finding: dict) -> bool:
    return finding["severity"] == "CRITICAL" or (
        finding["severity"] == "HIGH" and finding["fix"] != "NO"
    )


def scan_verdict(doc, allowed: dict[str, str], expired: dict[str, str]) -> tuple[int, str]:
    """Whether the scanned image may be deployed: done and no blocking finding left unexcused."""
    digest = (doc or {}).get("imageId", {}).get("imageDigest", "the image")
    scan_status = (doc or {}).get("imageScanStatus") or {}
    state = scan_status.get("status", "UNKNOWN")
    if state in SCAN_WAIT:
        return PENDING, f"the ECR scan of {digest} is {state}"
    if state not in SCAN_DONE:
        why = scan_status.get("description") or "no description"
        return REFUSED, f"the ECR scan of {digest} is {state} ({why}), so nothing clears the image"
    found = findings(doc)
    blocking = [f for f in found if blocks(f)]
    excused = [f for f in blocking if f["id"] in allowed]
    refused = [f for f in blocking if f["id"] not in allowed]
    notes = [f"allow-listed: {f['id']} ({f['severity']}): {allowed[f['id']]}" for f in excused]

    def describe(finding: dict) -> str:
        line = (
            f"{finding['id']} ({finding['severity']}, {finding['package']}, fix {finding['fix']})"
        )
        if finding["id"] in expired:
            line += f" [its allow-list entry expired on {expired[finding['id']]}]"
        return line

    if refused:
        return REFUSED, (
            f"{len(refused)} blocking finding(s) in {digest} (CRITICAL, or HIGH with a fix): "
            + "; ".join(describe(f) for f in refused)
        )
    counts: dict[str, int] = {}
    for finding in found:
        counts[finding["severity"]] = counts.get(finding["severity"], 0) + 1
    summary = " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no findings"
    return OK, "\n".join([f"scan of {digest}: no blocking findings ({summary})", *notes])


# One-off tasks (the release's migration, stack-deploy's bootstrap)

# What RegisterTaskDefinition takes back from a DescribeTaskDefinition answer.
REGISTER_KEYS = (
    "family",
    "taskRoleArn",
    "executionRoleArn",
    "networkMode",
    "containerDefinitions",
    "volumes",
    "placementConstraints",
    "requiresCompatibilities",
    "cpu",
    "memory",
    "runtimePlatform",
    "ephemeralStorage",
)


def register_input(taskdef_doc, image: str) -> str:
    """RegisterTaskDefinition input: the described revision with its container on image."""
    taskdef = (taskdef_doc or {}).get("taskDefinition")
    if not taskdef:
        raise StateError("no task definition in the answer")
    found = {key: taskdef[key] for key in REGISTER_KEYS if taskdef.get(key)}
    containers = [c for c in found.get("containerDefinitions") or [] if c.get("name") == CONTAINER]
    if len(containers) != 1:
        raise StateError(f"task definition {taskdef.get('family')} has no container {CONTAINER}")
    containers[0]["image"] = image
    return json.dumps(found)


def started_task(run_doc, what: str) -> str:
    """The ARN of the task RunTask started; Failure with ECS's reason when it started none."""
    failures = (run_doc or {}).get("failures") or []
    tasks_ = (run_doc or {}).get("tasks") or []
    if failures or not tasks_:
        reasons = "; ".join(
            f"{f.get('reason', 'unknown')} {f.get('detail', '')}".strip() for f in failures
        )
        raise StateError(f"the {what} task did not start: {reasons or 'ECS started no task'}")
    return tasks_[0]["taskArn"]


def task_outcome(tasks_doc, what: str) -> tuple[int, str]:
    """Done when the task stopped and its container exited 0; failed on any other stop."""
    found = (tasks_doc or {}).get("tasks") or []
    if not found:
        return FAILED, f"the {what} task is gone (ECS forgets stopped tasks after an hour)"
    task = found[0]
    status = task.get("lastStatus", "UNKNOWN")
    if status != "STOPPED":
        return PENDING, f"the {what} task is {status}"
    container = next((c for c in task.get("containers") or [] if c.get("name") == CONTAINER), {})
    code = container.get("exitCode")
    reason = task.get("stoppedReason") or "no reason given"
    if code == 0:
        return OK, f"the {what} task exited 0"
    if code is None:
        why = container.get("reason")
        return FAILED, f"the {what} task stopped before its container ran: {reason}" + (
            f" ({why})" if why else ""
        )
    return FAILED, f"the {what} task exited {code} ({reason})"


def pending_since(describe_doc, versions_doc):
    """The CreatedDate of the version that carries AWSPENDING but not AWSCURRENT, else None."""
    stages = (describe_doc or {}).get("VersionIdsToStages") or {}
    pending = [v for v, labels in stages.items() if "AWSPENDING" in labels]
    pending = [v for v in pending if "AWSCURRENT" not in stages[v]]
    if not pending:
        return None
    created = {
        item.get("VersionId"): item.get("CreatedDate")
        for item in (versions_doc or {}).get("Versions") or []
    }
    return created.get(pending[0]) or ""


def secret_line(
    describe_doc, versions_doc, now: float, stuck_minutes: int, token: bool = False
) -> tuple[bool, str]:
    """(stuck?, one status line) of a secret: its rotation, last rotation and a pending version."""
    doc = describe_doc or {}
    name = doc.get("Name", "?")
    if not doc.get("RotationEnabled"):
        changed = when(doc.get("LastChangedDate"))
        line = f"  {name}: no rotation schedule, last changed {changed}"
        stages = doc.get("VersionIdsToStages") or {}
        previous = [v for v, labels in stages.items() if "AWSPREVIOUS" in labels]
        if token and previous and "AWSCURRENT" not in stages[previous[0]]:
            line += ", its PREVIOUS value is still accepted (make revoke-previous-token ends that)"
        return False, line
    days = (doc.get("RotationRules") or {}).get("AutomaticallyAfterDays")
    schedule = (doc.get("RotationRules") or {}).get("ScheduleExpression")
    every = f"every {days} days" if days else (schedule or "on a schedule")
    line = (
        f"  {name}: rotates {every}, last {when(doc.get('LastRotatedDate'))}, "
        f"next {when(doc.get('NextRotationDate'))}"
    )
    since = pending_since(doc, versions_doc)
    if since is None:
        return False, line + ", nothing pending"
    age = (now - sort_key(since)) / 60 if since else float("inf")
    function = (doc.get("RotationLambdaARN") or "").rsplit(":", 1)[-1]
    if age < stuck_minutes:
        return False, line + f", rotating now (AWSPENDING since {when(since)})"
    log = f"; its function's log: /aws/lambda/{function}" if function else ""
    return True, line + (
        f", STUCK: AWSPENDING since {when(since)} ({int(age)} min) was never made current; the "
        f"last rotation failed{log}; aws secretsmanager rotate-secret --secret-id {name} retries"
    )


def secrets_status(directory: Path, now: float, stuck_minutes: int) -> tuple[int, str]:
    """The rotation state of each saved DescribeSecret (with its ListSecretVersionIds)."""
    lines, stuck = ["secrets"], False
    for path in sorted(directory.glob("*.describe.json")):
        versions = load(path.with_name(path.name.replace(".describe.", ".versions.")))
        token = path.name.endswith(".token.describe.json")
        is_stuck, line = secret_line(load(path), versions, now, stuck_minutes, token)
        stuck |= is_stuck
        lines.append(line)
    if len(lines) == 1:
        lines.append("  (none found in the stacks)")
    return (FAILED if stuck else OK), "\n".join(lines)


def log_hint(taskdef_doc, task_arn: str) -> str:
    """The command that prints exactly this task's log: its id and its stream prefix."""
    task_id = task_arn.rsplit("/", 1)[-1]
    containers = ((taskdef_doc or {}).get("taskDefinition") or {}).get("containerDefinitions") or []
    hint = f"make logs TASK={task_id}"
    for container in containers:
        options = (container.get("logConfiguration") or {}).get("options") or {}
        if options.get("awslogs-stream-prefix"):
            return f"{hint} STREAM_PREFIX={options['awslogs-stream-prefix']}"
    return hint


def missing_previous(describe_doc) -> str:
    """The AWSCURRENT version id when no version carries AWSPREVIOUS yet, else ''."""
    stages = (describe_doc or {}).get("VersionIdsToStages") or {}
    if any("AWSPREVIOUS" in labels for labels in stages.values()):
        return ""
    return current_version(describe_doc)


def staged_version(describe_doc, stage) -> str:
    """The version id that carries a staging label (AWSCURRENT, AWSPREVIOUS)."""
    stages = (describe_doc or {}).get("VersionIdsToStages") or {}
    for version, labels in stages.items():
        if stage in labels:
            return version
    raise StateError(f"the secret has no {stage} version")


def current_version(describe_doc) -> str:
    """The version id that carries AWSCURRENT."""
    return staged_version(describe_doc, "AWSCURRENT")


def previous_version(describe_doc) -> str:
    """The version id that carries AWSPREVIOUS."""
    return staged_version(describe_doc, "AWSPREVIOUS")


# CloudWatch Logs


def logs(directory: Path, lines: int) -> list[str]:
    """The newest events of the saved GetLogEvents answers, merged in time order."""
    events = []
    for path in sorted((directory / "logs").glob("*.json")):
        stream = path.stem
        for event in (load(path) or {}).get("events") or []:
            events.append((event.get("timestamp", 0), stream, event.get("message", "").rstrip()))
    events.sort()
    return [f"{when(ts)}  {stream[:8]}  {message}" for ts, stream, message in events[-lines:]]


# Fields every JSON line has, or that readable() shows in their own column.
SHOWN_FIELDS = {"time", "level", "logger", "message", "method", "path", "status", "duration_ms"}


def readable(message: str) -> str:
    """One JSON log line as text: status, method and path of a request, else level and message."""
    try:
        entry = json.loads(message)
    except ValueError:
        return message
    if not isinstance(entry, dict):
        return message
    if "status" in entry and "method" in entry:
        head = f"{entry['status']}  {entry['method']} {entry.get('path', '')}"
        if "duration_ms" in entry:
            head += f"  {entry['duration_ms']} ms"
    else:
        head = f"{entry.get('level', '-')}  {entry.get('message', '')}"
    rest = [
        f"{key}={value}"
        for key, value in entry.items()
        if key not in SHOWN_FIELDS | {"traceback"} and value is not None
    ]
    text = "  ".join([head, *rest])
    if entry.get("traceback"):
        text += "\n    " + str(entry["traceback"]).rstrip().replace("\n", "\n    ")
    return text


def filtered(doc, lines: int) -> list[str]:
    """The newest events of a FilterLogEvents answer, oldest first, one readable line each."""
    events = sorted(
        (event.get("timestamp", 0), event.get("logStreamName", ""), event.get("message", ""))
        for event in (doc or {}).get("events") or []
    )
    shown = [
        f"{when(ts)}  {stream.rsplit('/', 1)[-1][:8]}  {readable(message.rstrip())}"
        for ts, stream, message in events[-lines:]
    ]
    if len(events) > lines:
        shown.insert(0, f"(the newest {lines} of {len(events)} matches; LOG_LINES=... shows more)")
    return shown


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, args in {
        "stack": ["file", "name"],
        "output": ["file", "name", "key"],
        "stack-failure": ["dir", "name"],
        "outputs": ["file"],
        "changed-parameters": ["file", "pairs"],
        "taskdefs": ["dir"],
        "rollout": ["dir", "expected"],
        "serving": ["dir"],
        "live": ["dir"],
        "status": ["dir", "url"],
        "resolve": ["file", "sha", "repository"],
        "digest": ["file", "tag"],
        "same-image": ["file", "local_id", "reference"],
        "scan": ["file", "allowlist", "today"],
        "history": ["dir", "live"],
        "logs": ["dir", "lines"],
        "events": ["file", "lines"],
        "register-input": ["file", "image"],
        "started-task": ["file", "what"],
        "task-outcome": ["file", "what"],
        "missing-previous": ["file"],
        "previous-version": ["file"],
        "current-version": ["file"],
        "template-parameters": ["file"],
        "parameter": ["file", "key"],
        "log-hint": ["file", "task"],
        "secrets": ["dir", "now", "stuck_minutes"],
        "change-set-input": ["file", "template", "pairs", "name", "stack"],
        "changes": ["dir", "stack", "allow_replace", "kind"],
        "failed-create": ["file", "resources", "name"],
    }.items():
        command = sub.add_parser(name)
        for arg in args:
            command.add_argument(arg)
    args = parser.parse_args(argv)
    base = Path(getattr(args, "dir", "") or ".")
    try:
        code, text = run(args, base)
    except StateError as failure:
        code, text = FAILED, str(failure)
    print(text)
    return code


def run(args, base: Path) -> tuple[int, str]:
    services = load(base / "services.json")
    match args.command:
        case "stack":
            return OK, stack_check(load(Path(args.file)), args.name)
        case "output":
            return OK, output(load(Path(args.file)), args.name, args.key)
        case "stack-failure":
            stack, events = load(base / "stack.json"), load(base / "events.json")
            return OK, stack_failure(stack, events, args.name)
        case "outputs":
            return OK, "\n".join(outputs(load(Path(args.file))))
        case "changed-parameters":
            pairs = Path(args.pairs).read_text().splitlines()
            return OK, "\n".join(changed_parameters(load(Path(args.file)), pairs))
        case "taskdefs":
            found = {d["taskDefinition"] for d in the_service(services).get("deployments") or []}
            return OK, "\n".join(sorted(found))
        case "rollout":
            return rollout(services, task_images(base), args.expected)
        case "serving":
            try:
                return OK, serving(the_service(services), task_images(base))
            except StateError as failure:
                return OK, f"nothing ({failure})"
        case "live":
            service = the_service(services)
            primary = [d for d in service.get("deployments") or [] if d.get("status") == "PRIMARY"]
            return OK, image_of(primary[0], task_images(base)) if primary else ""
        case "status":
            stack = load(base / "service-stack.json")
            return OK, "\n".join(status(services, task_images(base), args.url, stack))
        case "resolve":
            return OK, resolve(load(Path(args.file)), args.sha, args.repository)
        case "digest":
            return OK, digest_of(load(Path(args.file)), args.tag)
        case "same-image":
            return OK, same_image(load(Path(args.file)), args.local_id, args.reference)
        case "scan":
            allowed, expired = allowlist(Path(args.allowlist), args.today)
            return scan_verdict(load(Path(args.file)), allowed, expired)
        case "history":
            return OK, "\n".join(history(load(base / "images.json"), args.live))
        case "logs":
            return OK, "\n".join(logs(base, int(args.lines)))
        case "events":
            return OK, "\n".join(filtered(load(Path(args.file)), int(args.lines)))
        case "register-input":
            return OK, register_input(load(Path(args.file)), args.image)
        case "started-task":
            return OK, started_task(load(Path(args.file)), args.what)
        case "task-outcome":
            return task_outcome(load(Path(args.file)), args.what)
        case "missing-previous":
            return OK, missing_previous(load(Path(args.file)))
        case "current-version":
            return OK, current_version(load(Path(args.file)))
        case "previous-version":
            return OK, previous_version(load(Path(args.file)))
        case "secrets":
            return secrets_status(base, float(args.now), int(args.stuck_minutes))
        case "log-hint":
            return OK, log_hint(load(Path(args.file)), args.task)
        case "parameter":
            return OK, parameter(load(Path(args.file)), args.key)
        case "template-parameters":
            return OK, "\n".join(template_parameters(Path(args.file).read_text()))
        case "change-set-input":
            pairs = Path(args.pairs).read_text().splitlines()
            found = change_set_input(
                load(Path(args.file)), Path(args.template), pairs, args.name, args.stack
            )
            return OK, json.dumps(found)
        case "changes":
            pages = [load(path) for path in sorted(base.glob(f"{args.stack}.changes.*.json"))]
            return changes(pages, args.stack, args.allow_replace == "true", args.kind)
        case "failed-create":
            return OK, failed_create(load(Path(args.file)), load(Path(args.resources)), args.name)
    raise StateError(f"unknown command {args.command}")  # argparse already refuses these


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
