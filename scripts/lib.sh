# lib.sh: shared settings and helpers of the AWS scripts; sourced by them, never run.
# shellcheck shell=bash
# Works with AWS CLI v1 and v2 and with bash 3.2 (macOS): no associative arrays, no v2-only flags.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AWS_REGION=${AWS_REGION:-eu-west-1}
# Every stack, and every name the stacks give (their Prefix parameter), starts with STACK_PREFIX:
# STACK_PREFIX=staging deploys a second, separate environment into the same account and region.
STACK_PREFIX=${STACK_PREFIX:-cars-api}
BASE_STACK=${BASE_STACK:-$STACK_PREFIX-base}
DATA_STACK=${DATA_STACK:-$STACK_PREFIX-data}
SERVICE_STACK=${SERVICE_STACK:-$STACK_PREFIX-service}
CI_STACK=${CI_STACK:-$STACK_PREFIX-ci-access}
IMAGE=${IMAGE:-cars-api}
CONTAINER=${CONTAINER:-docker}
# The accepted scan findings: one '<vulnerability id> <YYYY-MM-DD expiry> <reason>' per line.
SCAN_ALLOWLIST=${SCAN_ALLOWLIST:-$ROOT/.github/scan-allowlist}
# AWS CLI v2 pipes output through a pager by default; v1 ignores this.
export AWS_PAGER=''

die() { echo "error: $*" >&2; exit 1; }
say() { echo "$*"; }

# Prints the script's usage (its usage function) and exits 2: a caller mistake, not a failure.
usage_error() {
  [[ $# -eq 0 ]] || echo "error: $*" >&2
  usage
  exit 2
}

# SHA must name a commit: 7 to 40 lowercase hex characters. Checked before any AWS call.
check_sha() {
  [[ -n "${SHA:-}" ]] || usage_error "SHA is required"
  [[ "$SHA" =~ ^[0-9a-f]{7,40}$ ]] \
    || usage_error "SHA '$SHA' is not a commit SHA (7 to 40 lowercase hex characters)"
}

# Fails early, with what to install, when a needed command is missing.
require_tools() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || case $tool in
      aws) die "the aws CLI is not installed (or not on PATH): install AWS CLI v2 (v1 works too)" ;;
      python3) die "python3 is not installed (or not on PATH): the deploy scripts need it" ;;
      *) die "$tool is not installed (or not on PATH)" ;;
    esac
  done
}

# A private scratch directory for the AWS answers, removed on exit.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cars-api-deploy.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

last_line() { grep -v '^[[:space:]]*$' "$1" | tail -n 1 || true; }

# The aws CLI with our region, and the emulator endpoint when AWS_ENDPOINT_URL is set (passed
# explicitly so that an old CLI that ignores the variable never talks to a real account instead).
aws_() {
  local global=(--region "$AWS_REGION")
  [[ -z "${AWS_ENDPOINT_URL:-}" ]] || global+=(--endpoint-url "$AWS_ENDPOINT_URL")
  aws "${global[@]}" "$@"
}

# aws_ that dies with what AWS said when the call fails.
awsq() {
  aws_ "$@" 2>"$WORK/aws.err" || die "aws $1 $2 failed: $(last_line "$WORK/aws.err")"
}

# The decision helper (reads the saved JSON; makes no AWS call itself).
state() { python3 "$ROOT/scripts/deploy_state.py" "$@"; }

# state, dying with its message when it reports a failure.
state_or_die() {
  local out
  out=$(state "$@") || die "$out"
  printf '%s\n' "$out"
}

require_credentials() {
  aws_ sts get-caller-identity --output json >"$WORK/identity.json" 2>"$WORK/aws.err" \
    || die "cannot use AWS (profile ${AWS_PROFILE:-default}, region $AWS_REGION):" \
      "$(last_line "$WORK/aws.err") - set AWS_PROFILE, or run 'aws configure' / 'aws sso login'"
}

# Saves DescribeStacks of stack $1 to file $2; returns 1 when the stack does not exist.
describe_stack() {
  if aws_ cloudformation describe-stacks --stack-name "$1" --output json >"$2" 2>"$WORK/aws.err"; then
    return 0
  fi
  rm -f "$2"
  grep -q 'does not exist' "$WORK/aws.err" && return 1
  die "cannot read stack $1: $(last_line "$WORK/aws.err")"
}

# Reads the base stack outputs the scripts need into REPOSITORY_URI, REPOSITORY_NAME, CLUSTER,
# SERVICE_URL. SERVICE_URL may be overridden (e.g. a custom domain on the certificate).
load_base() {
  local file="$WORK/base.json"
  describe_stack "$BASE_STACK" "$file" \
    || die "stack $BASE_STACK not found in $AWS_REGION: create it first with make stack-deploy"
  state_or_die stack "$file" "$BASE_STACK" >/dev/null
  REPOSITORY_URI=$(state_or_die output "$file" "$BASE_STACK" RepositoryUri)
  REPOSITORY_NAME=$(state_or_die output "$file" "$BASE_STACK" RepositoryName)
  CLUSTER=$(state_or_die output "$file" "$BASE_STACK" ClusterName)
  if [[ -z "${SERVICE_URL:-}" ]]; then
    SERVICE_URL=$(state_or_die output "$file" "$BASE_STACK" ServiceUrl)
  fi
}

# Console URL of the CloudWatch dashboard of service stack $1 (service.yaml names it after the stack).
dashboard_url() {
  echo "https://$AWS_REGION.console.aws.amazon.com/cloudwatch/home?region=$AWS_REGION#dashboards/dashboard/$1"
}

# The awsvpc network configuration of one-off tasks: the service's subnets, security group
# (MySQL to the database, HTTPS to AWS) and public IP setting, from the base stack outputs.
task_network() {
  local file="$WORK/base.json" subnets group public
  subnets=$(state_or_die output "$file" "$BASE_STACK" TaskSubnets)
  group=$(state_or_die output "$file" "$BASE_STACK" ServiceSecurityGroup)
  public=$(state_or_die output "$file" "$BASE_STACK" TaskAssignPublicIp)
  printf 'awsvpcConfiguration={subnets=[%s],securityGroups=[%s],assignPublicIp=%s}\n' \
    "$subnets" "$group" "$public"
}

# Runs task definition $1 once on Fargate in the cluster and waits (bounded by TASK_TIMEOUT) until
# it stops; returns 0 when its container exited 0. $2 names it in messages. Anything else (it did
# not start, exited non-zero, overran: then it is stopped) dies with why and says nothing changed.
run_one_off() {
  local taskdef=$1 what=$2 timeout=${TASK_TIMEOUT:-900} task msg rc network hint
  local deadline=$((SECONDS + timeout))
  network=$(task_network)
  awsq ecs run-task --cluster "$CLUSTER" --task-definition "$taskdef" --launch-type FARGATE \
    --count 1 --started-by "$STACK_PREFIX-$what" --network-configuration "$network" \
    --output json >"$WORK/run-task.json"
  task=$(state_or_die started-task "$WORK/run-task.json" "$what")
  say "Started the $what task $task"
  # The command that prints this task's log (the stream prefix its task definition logs under).
  aws_ ecs describe-task-definition --task-definition "$taskdef" --output json \
    >"$WORK/one-off-taskdef.json" 2>/dev/null || rm -f "$WORK/one-off-taskdef.json"
  hint=$(state log-hint "$WORK/one-off-taskdef.json" "$task")
  while :; do
    awsq ecs describe-tasks --cluster "$CLUSTER" --tasks "$task" --output json >"$WORK/task.json"
    rc=0
    msg=$(state task-outcome "$WORK/task.json" "$what") || rc=$?
    case $rc in
      0) say "$msg"; return 0 ;;
      3) ;;
      *) die "$msg; its log: $hint; nothing else changed" ;;
    esac
    if ((SECONDS >= deadline)); then
      aws_ ecs stop-task --cluster "$CLUSTER" --task "$task" \
        --reason "cars-api $what overran ${timeout}s" --output json >/dev/null 2>&1 || true
      die "$msg after ${timeout}s: stopped it; nothing else changed (TASK_TIMEOUT waits longer;" \
        "its log: $hint)"
    fi
    say "  $msg"
    sleep "${POLL_SECONDS:-15}"
  done
}

# Applies the schema migrations of image $1 (repository@digest) with the migration identity,
# before the service changes: registers the data stack's migration task family with the new
# image and runs it. Secrets go from Secrets Manager into the task; none passes through here.
run_migration() {
  local image=$1 family
  describe_stack "$DATA_STACK" "$WORK/data.json" \
    || die "stack $DATA_STACK not found in $AWS_REGION: create it first with make stack-deploy"
  family=$(state_or_die output "$WORK/data.json" "$DATA_STACK" MigrationTaskFamily)
  aws_ ecs describe-task-definition --task-definition "$family" --output json \
    >"$WORK/migrate-taskdef.json" 2>"$WORK/aws.err" \
    || die "no migration task definition $family ($(last_line "$WORK/aws.err")): make" \
      "stack-deploy creates it once an image is in the repository; nothing changed"
  state_or_die register-input "$WORK/migrate-taskdef.json" "$image" >"$WORK/migrate-register.json"
  awsq ecs register-task-definition --cli-input-json "file://$WORK/migrate-register.json" \
    --output json >"$WORK/migrate-registered.json"
  say "Migrating the database schema with $image (task family $family)"
  run_one_off "$family" migration
}

# Reads SERVICE_NAME from the service stack; returns 1 when no release was deployed yet.
load_service() {
  describe_stack "$SERVICE_STACK" "$WORK/service-stack.json" || return 1
  SERVICE_NAME=$(state output "$WORK/service-stack.json" "$SERVICE_STACK" ServiceName) || return 1
}

# Saves DescribeServices and the task definitions of all its deployments into $WORK.
# Returns 1 (what AWS said is in $WORK/aws.err) when a call fails.
snapshot_service() {
  local arns arn file
  aws_ ecs describe-services --cluster "$CLUSTER" --services "$SERVICE_NAME" --output json \
    >"$WORK/services.json" 2>"$WORK/aws.err" || return 1
  # The helper prints its reason on stdout when it fails: keep it as the error to report.
  arns=$(state taskdefs "$WORK") || { printf '%s\n' "$arns" >"$WORK/aws.err"; return 1; }
  mkdir -p "$WORK/taskdefs"
  for arn in $arns; do
    file="$WORK/taskdefs/${arn//[^A-Za-z0-9]/_}.json"
    # Task definition revisions never change: fetch each once.
    [[ -s "$file" ]] && continue
    aws_ ecs describe-task-definition --task-definition "$arn" --output json \
      >"$file" 2>"$WORK/aws.err" || { rm -f "$file"; return 1; }
  done
}

# snapshot_service that dies with the reason when it cannot read the service.
snapshot_or_die() {
  snapshot_service || die "cannot read service $SERVICE_NAME in cluster $CLUSTER: $(last_line "$WORK/aws.err")"
}

# Saves DescribeImages of the repository to $WORK/images.json (all pages: the CLI follows them).
save_images() {
  awsq ecr describe-images --repository-name "$REPOSITORY_NAME" --output json >"$WORK/images.json"
}

# The image tag that $1 (a full or unique short SHA) names in the repository; dies when none.
resolve_tag() {
  save_images
  state_or_die resolve "$WORK/images.json" "$1" "$REPOSITORY_URI"
}

# Stops a release or deploy while DEPLOY_FREEZE is set; make rollback is the one way through.
check_freeze() {
  [[ -z "${DEPLOY_FREEZE:-}" ]] && return 0
  if [[ "${DEPLOY_KIND:-}" == rollback ]]; then
    say "DEPLOY_FREEZE is set ($DEPLOY_FREEZE): rolling back anyway"
    return 0
  fi
  die "deploys are frozen (DEPLOY_FREEZE=$DEPLOY_FREEZE): nothing changed; only make rollback" \
    "may change the service until the freeze is lifted"
}

# Logs the container engine in to the repository's registry.
ecr_login() {
  local registry=${REPOSITORY_URI%%/*}
  aws_ ecr get-login-password 2>"$WORK/aws.err" \
    | "$CONTAINER" login --username AWS --password-stdin "$registry" >/dev/null \
    || die "cannot log in to $registry: $(last_line "$WORK/aws.err")"
}

# The digest that tag $1 names in the repository (saves DescribeImages of that tag).
tag_digest() {
  awsq ecr describe-images --repository-name "$REPOSITORY_NAME" --image-ids "imageTag=$1" \
    --output json >"$WORK/tag.json"
  state_or_die digest "$WORK/tag.json" "$1"
}

# Waits (bounded by SCAN_TIMEOUT) for ECR's scan of digest $1 and applies the gate: CRITICAL
# findings, and HIGH ones with a fix, stop the deploy unless the allow-list excuses them. $2 is
# "fresh" right after a push (ECR may not have started the scan yet); $3 is the override, "true"
# only for a rollback with ALLOW_VULNERABLE=true. Returns 4 with the reason in SCAN_REFUSAL.
# shellcheck disable=SC2034  # SCAN_REFUSAL is read by release.sh and deploy.sh, which source this
scan_gate() {
  local digest=$1 fresh=${2:-} override=${3:-false} timeout=${SCAN_TIMEOUT:-600} msg rc
  local deadline=$((SECONDS + timeout)) today
  today=$(date -u +%Y-%m-%d)
  [[ -f "$SCAN_ALLOWLIST" ]] || die "the scan allow-list $SCAN_ALLOWLIST does not exist"
  while :; do
    rc=0
    if aws_ ecr describe-image-scan-findings --repository-name "$REPOSITORY_NAME" \
      --image-id "imageDigest=$digest" --output json >"$WORK/scan.json" 2>"$WORK/aws.err"; then
      msg=$(state scan "$WORK/scan.json" "$SCAN_ALLOWLIST" "$today") || rc=$?
    elif grep -q 'ScanNotFoundException' "$WORK/aws.err"; then
      msg="ECR has no scan of $digest (is scan on push on for $REPOSITORY_NAME?)"
      if [[ "$fresh" == fresh ]]; then rc=3; else rc=4; fi
    else
      die "aws ecr describe-image-scan-findings failed: $(last_line "$WORK/aws.err")"
    fi
    case $rc in
      0) say "$msg"; return 0 ;;
      3) ;;
      4)
        if [[ "$override" == true ]]; then
          say "WARNING: ALLOW_VULNERABLE=true: deploying despite the scan gate: $msg"
          return 0
        fi
        SCAN_REFUSAL=$msg
        return 4 ;;
      *) die "$msg" ;;
    esac
    ((SECONDS < deadline)) || { msg="$msg after ${timeout}s"; break; }
    say "  $msg"
    sleep "${POLL_SECONDS:-15}"
  done
  SCAN_REFUSAL=$msg
  return 4
}

# In GitHub Actions, gh verifies the build provenance attestation of digest $1 before anything
# changes; elsewhere nothing can, and it says so.
verify_attestation() {
  local ref="$REPOSITORY_URI@$1"
  if [[ "${GITHUB_ACTIONS:-}" != true ]]; then
    say "WARNING: could not verify the build provenance attestation of $ref: only a GitHub" \
      "Actions run checks it (gh attestation verify oci://$ref --repo <owner/name> --cert-identity" \
      "https://github.com/<owner/name>/.github/workflows/ci.yml@refs/heads/main" \
      "--deny-self-hosted-runners does by hand)"
    return 0
  fi
  [[ -n "${GITHUB_REPOSITORY:-}" ]] || die "GITHUB_REPOSITORY is not set: cannot verify $ref"
  require_tools gh "$CONTAINER"
  ecr_login
  # The signing certificate must name ci.yml at refs/heads/main exactly (an attestation made by a
  # pull request's or another branch's run names another ref) and a GitHub-hosted runner.
  gh attestation verify "oci://$ref" --repo "$GITHUB_REPOSITORY" \
    --cert-identity "https://github.com/$GITHUB_REPOSITORY/.github/workflows/ci.yml@refs/heads/main" \
    --deny-self-hosted-runners >"$WORK/attest.out" 2>&1 \
    || die "the build provenance attestation of $ref does not verify:" \
      "$(last_line "$WORK/attest.out"); nothing changed"
  say "verified: $ref has a build provenance attestation signed by $GITHUB_REPOSITORY's ci.yml" \
    "on main, on a GitHub-hosted runner"
}

# `aws cloudformation deploy` that treats "nothing to change" as success. The CLI does so itself
# for an empty change set; CloudFormation can also answer "No updates are to be performed".
cfn_deploy() {
  local out="$WORK/deploy.out"
  if aws_ cloudformation deploy --no-fail-on-empty-changeset "$@" 2>&1 | tee "$out"; then
    return 0
  fi
  if grep -q 'No updates are to be performed' "$out"; then
    say "No changes to deploy: the stack is up to date."
    return 0
  fi
  return 1
}

# Where a failed deploy left stack $1 and why (its first failure), for error lines.
stack_failure() {
  describe_stack "$1" "$WORK/stack.json" || true
  aws_ cloudformation describe-stack-events --stack-name "$1" --max-items 100 --output json \
    >"$WORK/events.json" 2>/dev/null || rm -f "$WORK/events.json"
  state stack-failure "$WORK" "$1"
}

# Dies with the service stack state, its first failure and what is serving now.
report_failed_deploy() {
  local what=$1 why now="nothing (the service does not exist)"
  why=$(stack_failure "$SERVICE_STACK")
  if load_service && snapshot_service; then now=$(state serving "$WORK" || true); fi
  die "deploy of $what failed: $why; now serving $now"
}

# Polls DescribeServices until the rollout of image $1 completes, fails or times out.
wait_for_rollout() {
  local expected=$1 timeout=${ROLLOUT_TIMEOUT:-600} msg rc
  local deadline=$((SECONDS + timeout))
  while :; do
    snapshot_or_die
    rc=0
    msg=$(state rollout "$WORK" "$expected") || rc=$?
    case $rc in
      0) say "$msg"; return 0 ;;
      3) ;;
      *) die "$msg" ;;
    esac
    ((SECONDS < deadline)) \
      || die "stuck: $msg after ${timeout}s; now serving $(state serving "$WORK")"
    say "  $msg"
    sleep "${POLL_SECONDS:-15}"
  done
}

# GET <ServiceUrl>/ready through the load balancer must answer 200 (bounded retries).
check_ready() {
  local url="${SERVICE_URL%/}/ready" tries=${READY_TRIES:-12} code=000 i
  for ((i = 1; i <= tries; i++)); do
    code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 "$url" 2>"$WORK/curl.err") || true
    if [[ "$code" == 200 ]]; then
      say "$url answered 200"
      return 0
    fi
    ((i == tries)) || sleep "${READY_INTERVAL:-5}"
  done
  local why
  why=$(last_line "$WORK/curl.err")
  die "$url answered ${code}${why:+ ($why)} $tries times in a row; ECS runs $(state serving "$WORK")" \
    "- see make logs"
}

# Deploys the service stack with image tag $1 at digest $2 (both in ECR): tasks run the digest.
deploy_release() {
  local tag=$1 digest=$2 expected="$REPOSITORY_URI@$2"
  if describe_stack "$SERVICE_STACK" "$WORK/service-stack.json"; then
    state_or_die stack "$WORK/service-stack.json" "$SERVICE_STACK" >/dev/null
  fi
  # Migrations only move forward: a rollback runs none, and an older image that cannot serve
  # the newer schema answers 503 on /ready (its schema check), which stops the rollback.
  if [[ "${DEPLOY_KIND:-}" == rollback ]]; then
    say "Rollback: no migration runs (the schema stays as it is)"
  else
    run_migration "$expected"
  fi
  say "Deploying $REPOSITORY_URI:$tag by digest $digest (stack $SERVICE_STACK, region $AWS_REGION)"
  local prefix
  prefix=$(prefix_parameter service.yaml)
  cfn_deploy --stack-name "$SERVICE_STACK" --template-file "$ROOT/cloudformation/service.yaml" \
    --capabilities CAPABILITY_IAM \
    --parameter-overrides ${prefix:+"$prefix"} "BaseStackName=$BASE_STACK" \
    "DataStackName=$DATA_STACK" "ImageTag=$tag@$digest" \
    || report_failed_deploy "$expected"
  load_service || die "stack $SERVICE_STACK has no ServiceName output after the deploy"
  wait_for_rollout "$expected"
  check_ready
  say "ok: $expected ($tag) is live at $SERVICE_URL"
}

# STACK_PREFIX names ECR repositories, buckets and RDS identifiers: lowercase, 20 characters.
# Every stack name starts with it: a parent make exports all four names, derived from its own
# prefix, and a STACK_PREFIX=staging run that kept one would write staging into production.
check_prefix() {
  local variable name
  [[ "$STACK_PREFIX" =~ ^[a-z][a-z0-9]*(-[a-z0-9]+)*$ && ${#STACK_PREFIX} -le 20 ]] \
    || usage_error "STACK_PREFIX '$STACK_PREFIX' must be lowercase letters and digits in words" \
      "joined by single hyphens, starting with a letter, at most 20 characters (staging, cars-api)"
  for variable in BASE_STACK DATA_STACK SERVICE_STACK CI_STACK; do
    name=${!variable}
    [[ "$name" == "$STACK_PREFIX"-* ]] \
      || usage_error "$variable=$name is not a stack of STACK_PREFIX=$STACK_PREFIX: every stack" \
        "name starts with '$STACK_PREFIX-'; unset $variable (it follows STACK_PREFIX) or set it" \
        "to a $STACK_PREFIX- name. Nothing was changed"
  done
}

# "Prefix=$STACK_PREFIX" when template $1 (a file name in cloudformation/) declares Prefix.
prefix_parameter() {
  # grep without -q reads to the end: an early exit would break the pipe under pipefail.
  if state template-parameters "$ROOT/cloudformation/$1" | grep -x Prefix >/dev/null; then
    echo "Prefix=$STACK_PREFIX"
  fi
}

# True when template $1 declares parameter $2.
template_declares() {
  state template-parameters "$ROOT/cloudformation/$1" | grep -x "$2" >/dev/null
}

# Creates change set $3 of stack $1 from template $2 with the Name=Value pairs of file $4 (other
# parameters keep their deployed values), waits until CloudFormation has computed it and saves
# its pages as $WORK/$1.changes.<n>.json; CHANGE_SET_TYPE is CREATE or UPDATE.
create_change_set() {
  local stack=$1 template=$2 name=$3 pairs=$4 status page=1 token
  rm -f "$WORK/$stack".changes.*.json
  describe_stack "$stack" "$WORK/$stack.before.json" || true
  state_or_die change-set-input "$WORK/$stack.before.json" "$ROOT/cloudformation/$template" \
    "$pairs" "$name" "$stack" >"$WORK/$stack.input.json"
  CHANGE_SET_TYPE=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["ChangeSetType"])' \
    "$WORK/$stack.input.json")
  if ! aws_ cloudformation create-change-set --cli-input-json "file://$WORK/$stack.input.json" \
    --output json >/dev/null 2>"$WORK/aws.err"; then
    # Some endpoints refuse an empty change set at once instead of creating a FAILED one.
    grep -q 'No updates are to be performed' "$WORK/aws.err" \
      || die "aws cloudformation create-change-set failed: $(last_line "$WORK/aws.err")"
    echo '{"Status": "FAILED", "StatusReason": "No updates are to be performed."}' \
      >"$WORK/$stack.changes.1.json"
    return 0
  fi
  while :; do
    status=$(awsq cloudformation describe-change-set --stack-name "$stack" --change-set-name "$name" \
      --query Status --output text)
    [[ "$status" == *_PENDING || "$status" == *_IN_PROGRESS ]] || break
    sleep "${POLL_SECONDS:-5}"
  done
  token=
  while :; do
    awsq cloudformation describe-change-set --stack-name "$stack" --change-set-name "$name" \
      ${token:+--next-token "$token"} --output json >"$WORK/$stack.changes.$page.json"
    token=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("NextToken") or "")' \
      "$WORK/$stack.changes.$page.json")
    [[ -n "$token" ]] || break
    page=$((page + 1))
  done
}

# Deletes change set $2 of stack $1, and the stack too when only the change set made it (a plan
# of a stack that does not exist yet leaves it REVIEW_IN_PROGRESS, with no resources).
discard_change_set() {
  aws_ cloudformation delete-change-set --stack-name "$1" --change-set-name "$2" \
    >/dev/null 2>&1 || true
  if [[ "$CHANGE_SET_TYPE" == CREATE ]]; then
    aws_ cloudformation delete-stack --stack-name "$1" >/dev/null 2>&1 || true
  fi
}

# ALLOW_REPLACE as true or false (a usage error otherwise).
allow_replace() {
  case "${ALLOW_REPLACE:-false}" in
    true | false) echo "${ALLOW_REPLACE:-false}" ;;
    *) usage_error "ALLOW_REPLACE must be true or false, not '$ALLOW_REPLACE'" ;;
  esac
}

# Prints what deploying template $2 with the pairs of file $3 would do to stack $1, then deletes
# the change set: changes nothing. Returns 4 when stack-deploy would refuse it.
plan_stack() {
  local name rc=0 text
  name="plan-$(date +%s)"
  create_change_set "$1" "$2" "$name" "$3"
  text=$(state changes "$WORK" "$1" "$(allow_replace)" "$CHANGE_SET_TYPE") || rc=$?
  discard_change_set "$1" "$name"
  case $rc in
    0 | 4 | 5) say "$text" ;;
    *) die "$text" ;;
  esac
  [[ $rc -ne 4 ]] || return 4
  return 0
}
