#!/usr/bin/env bash
# stack-deploy.sh: create or update the long-lived stacks in order: the base stack (network, ALB, WAF,
# ECR, cluster, task roles), the data stack (database, identities, RDS CA bundle; then the bootstrap
# task), then the CI access stack (GitHub OIDC trust and deploy role) that names the resources of
# both; print their outputs. Nothing to change changes nothing.
# Every stack change goes through a change set that is shown first; one that would replace a
# stateful resource is refused unless ALLOW_REPLACE=true. PLAN=true (make plan) only shows them.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make stack-deploy GITHUB_REPOSITORY=owner/name [STACK_PREFIX=cars-api] [AWS_REGION=...]
                         [ALLOW_REPLACE=true] [BOOTSTRAP_SHA=<sha>] [GITHUB_ENVIRONMENT=production]
usage: make plan [SHA=<sha>] [GITHUB_REPOSITORY=owner/name] [STACK_PREFIX=...]
First creates the service-linked roles the stacks need (ECS, Application Auto Scaling, Elastic
Load Balancing, RDS; those that exist are kept). A stack that a failed first create left in
ROLLBACK_COMPLETE, ROLLBACK_FAILED or CREATE_FAILED is deleted and created again when nothing
stateful is left in it; otherwise it stops and prints the exact commands. Each stack changes
through a change set whose resource changes are printed first (Add, Modify, Replace, Remove);
one that replaces a database, bucket, repository or secret is refused unless ALLOW_REPLACE=true.
make plan prints the change sets of every stack (and of the service stack for SHA) and deletes
them: nothing changes. Creates or updates the base stack (cloudformation/base.yaml), the data stack
(cloudformation/data.yaml), then the CI access stack (cloudformation/ci-access.yaml: the GitHub
OIDC provider and the deploy role). After the data stack it writes the regional RDS CA bundle
(fetched and checked before any stack changes) into its secret (only when it changed), makes sure
the API token has an AWSPREVIOUS version, and runs the bootstrap task (creates the database, the
migration and app users, and their grants; idempotent) with the image BOOTSTRAP_SHA names once it
passes the scan gate and (in GitHub Actions) the attestation check, else the digest the service
runs now; never merely the newest image (no release and no BOOTSTRAP_SHA: it says so and skips).
After a successful bootstrap of an available database it marks the data stack DatabaseReady=true:
deletion protection on, rotation schedules created.
  GITHUB_REPOSITORY     repository whose ci.yml and rollback.yml (main, production environment)
                        may deploy; when omitted it is derived from `git remote get-url origin`
                        and must be confirmed at a terminal (refused without one)
  GITHUB_REPOSITORY_ID  its numeric id and that of its owner; default: asked from GitHub with
  GITHUB_OWNER_ID       `gh api repos/<owner/name>` (.id and .owner.id)
Optional, passed only when set (otherwise the stack keeps its current value or the default):
  STACK_PREFIX          first part of every stack and resource name (default cars-api); a second
                        prefix (staging) is a separate environment in the same account
  GITHUB_ENVIRONMENT    GitHub environment whose jobs the deploy role trusts (default production;
                        staging for STACK_PREFIX=staging)
  CREATE_OIDC_PROVIDER  'false' when the account already has the GitHub OIDC provider (default:
                        detected; another prefix's provider is reused, not created twice)
  ALLOW_REPLACE         'true' lets a change set replace a stateful resource (after a backup)
  CERTIFICATE_ARN       ACM certificate for HTTPS (then DOMAIN_NAME is required)
  DOMAIN_NAME           host name the certificate covers
  ALLOW_PLAINTEXT_WRITES 'true' lets writes through plain HTTP without a certificate (demo only)
  WAF                   'false' removes the web application firewall
  TASK_SUBNET_TYPE      'private' runs the tasks without public IPs behind VPC endpoints
  ENHANCED_SCANNING     'true' turns on continuous (Amazon Inspector) image scanning
  DB_MULTI_AZ           'true' for a standby database in a second zone
  DB_INSTANCE_CLASS     e.g. db.t4g.small
  LOG_RETENTION_DAYS    e.g. 90
  ALARM_EMAIL           address subscribed to the alarms
  DB_SNAPSHOT           DB snapshot to restore when the data stack creates the database
  RDS_CA_BUNDLE         a local PEM file instead of the AWS-published regional RDS CA bundle
  BOOTSTRAP_SHA         image (commit sha in ECR) of the bootstrap and migration task definitions;
                        it must pass the scan gate (and, in GitHub Actions, the attestation check)
  BOOTSTRAP             'skip' leaves the bootstrap task out
USAGE
}

# owner/name of the GitHub repository: $GITHUB_REPOSITORY, else the origin remote once a person
# confirms it (a fresh copy of this template points origin at the upstream project).
github_repository() {
  local url repo answer
  if [[ -n "${GITHUB_REPOSITORY:-}" ]]; then
    repo=$GITHUB_REPOSITORY
  else
    url=$(git -C "$ROOT" remote get-url origin 2>/dev/null) \
      || usage_error "GITHUB_REPOSITORY is not set and there is no git remote 'origin' to derive it from"
    url=${url%.git}
    url=${url%/}
    repo="$(basename "$(dirname "${url//://}")")/$(basename "$url")"
    [[ -t 0 ]] || usage_error "GITHUB_REPOSITORY is not set; origin says '$repo', which only a" \
      "person at a terminal may confirm: pass GITHUB_REPOSITORY=$repo if it is yours"
    printf 'The deploy role will trust GitHub repository %s (from origin). Type yes to confirm: ' \
      "$repo" >&2
    read -r answer || answer=
    [[ "$answer" == yes ]] || die "not confirmed: nothing was deployed (pass GITHUB_REPOSITORY=owner/name)"
  fi
  [[ "$repo" =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ ]] \
    || usage_error "GITHUB_REPOSITORY '$repo' is not owner/name"
  echo "$repo"
}

# "<repository id> <owner id>" of repository $1: from the environment, else from GitHub's API.
github_ids() {
  local ids
  if [[ -n "${GITHUB_REPOSITORY_ID:-}${GITHUB_OWNER_ID:-}" ]]; then
    ids="${GITHUB_REPOSITORY_ID:-} ${GITHUB_OWNER_ID:-}"
  else
    command -v gh >/dev/null 2>&1 \
      || usage_error "set GITHUB_REPOSITORY_ID and GITHUB_OWNER_ID, or install the gh CLI to look them up"
    ids=$(gh api "repos/$1" --jq '"\(.id) \(.owner.id)"') \
      || die "gh api repos/$1 failed: log in with gh auth login, or set GITHUB_REPOSITORY_ID and GITHUB_OWNER_ID"
  fi
  [[ "$ids" =~ ^[1-9][0-9]*\ [1-9][0-9]*$ ]] \
    || usage_error "GITHUB_REPOSITORY_ID and GITHUB_OWNER_ID must both be numeric ids (got '$ids')"
  echo "$ids"
}

# Id of the Region's S3 managed prefix list, which private tasks may reach (printed only then).
s3_prefix_list() {
  [[ "${TASK_SUBNET_TYPE:-}" == private ]] || return 0
  local id
  id=$(awsq ec2 describe-managed-prefix-lists \
    --filters "Name=prefix-list-name,Values=com.amazonaws.$AWS_REGION.s3" \
    --query 'PrefixLists[0].PrefixListId' --output text)
  [[ "$id" == pl-* ]] || die "no S3 prefix list found in $AWS_REGION"
  echo "S3PrefixListId=$id"
}

# Name=Value pairs for each optional setting that is set, from Parameter=VARIABLE arguments.
set_parameters() {
  local pair name var
  for pair in "$@"; do
    name=${pair%%=*}
    var=${pair#*=}
    [[ -z "${!var:-}" ]] || echo "$name=${!var}"
  done
}

# Name=Value pairs of the base stack's --parameter-overrides: each optional setting that is set.
base_parameters() {
  set_parameters CertificateArn=CERTIFICATE_ARN DomainName=DOMAIN_NAME \
    AllowPlaintextWrites=ALLOW_PLAINTEXT_WRITES WebApplicationFirewall=WAF \
    TaskSubnetType=TASK_SUBNET_TYPE EnhancedImageScanning=ENHANCED_SCANNING \
    LogRetentionDays=LOG_RETENTION_DAYS AlarmEmail=ALARM_EMAIL
}

# Name=Value pairs of the data stack: the physical ids of the base stack's resources it names,
# the Secrets Manager endpoint the base stack lacks with public tasks, TASK_IMAGE (when there is
# one) and each optional setting.
data_parameters() {
  local logical physical subnets=() endpoint=true
  echo "ServiceStackName=$SERVICE_STACK"
  [[ "$(base_parameter TaskSubnetType)" != private ]] || endpoint=false
  echo "CreateSecretsManagerEndpoint=$endpoint"
  [[ -z "$TASK_IMAGE" ]] || echo "TaskImage=$TASK_IMAGE"
  while read -r logical physical; do
    case $logical in
      Vpc) echo "VpcId=$physical" ;;
      DatabaseSecurityGroup | ServiceSecurityGroup) echo "$logical=$physical" ;;
      Repository) echo "RepositoryName=$physical" ;;
      Cluster) echo "ClusterName=${physical##*/}" ;;
      LogGroup) echo "LogGroupName=$physical" ;;
      AlarmTopic) echo "AlarmTopicArn=$physical" ;;
      ExecutionRole) echo "ExecutionRoleName=$physical" ;;
      PrivateSubnetA | PrivateSubnetB) subnets+=("$physical") ;;
    esac
  done < <(awsq cloudformation describe-stack-resources --stack-name "$BASE_STACK" --output text \
    --query 'StackResources[].[LogicalResourceId,PhysicalResourceId]')
  [[ ${#subnets[@]} -eq 2 ]] || die "stack $BASE_STACK has no private subnets A and B"
  echo "PrivateSubnets=${subnets[0]},${subnets[1]}"
  set_parameters DatabaseMultiAz=DB_MULTI_AZ DatabaseInstanceClass=DB_INSTANCE_CLASS \
    LogRetentionDays=LOG_RETENTION_DAYS SnapshotIdentifier=DB_SNAPSHOT
  # A new stack records every setting, so that later runs that leave one unset keep it as is.
  [[ -s "$WORK/$DATA_STACK.json" ]] && return 0
  [[ -n "${DB_MULTI_AZ:-}" ]] || echo "DatabaseMultiAz=false"
  [[ -n "${DB_INSTANCE_CLASS:-}" ]] || echo "DatabaseInstanceClass=db.t4g.micro"
  [[ -n "${LOG_RETENTION_DAYS:-}" ]] || echo "LogRetentionDays=365"
  [[ -n "${DB_SNAPSHOT:-}" ]] || echo "SnapshotIdentifier="
  [[ -n "$TASK_IMAGE" ]] || echo "TaskImage="
  return 0
}

# Sets TASK_IMAGE, the one-off tasks' image as repository@digest, never merely the newest image:
# BOOTSTRAP_SHA's once it passes the scan gate and the attestation check, else the digest the
# service runs now (its release passed both); empty (the data stack keeps its image) otherwise.
find_task_image() {
  local tag digest
  [[ ! "${BOOTSTRAP_SHA:-0000000}" =~ ^[0-9a-f]{7,40}$ ]] \
    && usage_error "BOOTSTRAP_SHA '$BOOTSTRAP_SHA' is not a commit SHA (7 to 40 lowercase hex)"
  TASK_IMAGE=
  if [[ ! -s "$WORK/$BASE_STACK.json" ]]; then
    [[ -z "${BOOTSTRAP_SHA:-}" ]] || usage_error "BOOTSTRAP_SHA: stack $BASE_STACK does not exist" \
      "yet, so its repository holds no image; run make stack-deploy without it first"
    return 0
  fi
  REPOSITORY_NAME=$(resource_id "$BASE_STACK" Repository)
  [[ -n "$REPOSITORY_NAME" ]] || return 0
  REPOSITORY_URI=$(awsq ecr describe-repositories --repository-names "$REPOSITORY_NAME" \
    --query 'repositories[0].repositoryUri' --output text)
  if [[ -n "${BOOTSTRAP_SHA:-}" ]]; then
    tag=$(resolve_tag "$BOOTSTRAP_SHA")
    digest=$(tag_digest "$tag")
    scan_gate "$digest" || die "BOOTSTRAP_SHA=$BOOTSTRAP_SHA: $SCAN_REFUSAL; the bootstrap and" \
      "migration tasks run only an image that passes the scan gate: nothing was deployed"
    verify_attestation "$digest"
    TASK_IMAGE="$REPOSITORY_URI@$digest"
    say "The bootstrap and migration tasks run $TASK_IMAGE (BOOTSTRAP_SHA, scanned and cleared)"
    return 0
  fi
  if describe_stack "$SERVICE_STACK" "$WORK/service-stack.json"; then
    tag=$(state parameter "$WORK/service-stack.json" ImageTag)
    if [[ "$tag" == *@sha256:* ]]; then
      TASK_IMAGE="$REPOSITORY_URI@${tag#*@}"
      say "The bootstrap and migration tasks run $TASK_IMAGE, the image the service runs now"
    fi
  fi
}

# Physical id of resource $2 of stack $1 (empty when it has none).
resource_id() {
  awsq cloudformation describe-stack-resources --stack-name "$1" --output text \
    --query "StackResources[?LogicalResourceId=='$2'].PhysicalResourceId | [0]" | sed '/^None$/d'
}

# Fetches the regional RDS CA bundle (or takes RDS_CA_BUNDLE) into $WORK/rds-ca.pem and checks
# that it is PEM certificates and nothing else, before any stack changes: a bad file or an
# unreachable truststore stops the deploy with nothing changed.
fetch_ca_bundle() {
  local bundle="$WORK/rds-ca.pem"
  if [[ -n "${RDS_CA_BUNDLE:-}" ]]; then
    [[ -f "$RDS_CA_BUNDLE" ]] || usage_error "RDS_CA_BUNDLE: no file at $RDS_CA_BUNDLE"
    cp "$RDS_CA_BUNDLE" "$bundle"
  else
    local url="https://truststore.pki.rds.amazonaws.com/$AWS_REGION/$AWS_REGION-bundle.pem"
    curl -fsS --max-time 30 --proto '=https' -o "$bundle" "$url" 2>"$WORK/curl.err" \
      || die "cannot fetch the RDS CA bundle from $url: $(last_line "$WORK/curl.err")" \
        "(or pass RDS_CA_BUNDLE=<file>); nothing was changed"
  fi
  CA_COUNT=$(grep -c -- '-----BEGIN CERTIFICATE-----' "$bundle" || true)
  if ((CA_COUNT == 0)) || grep -q -- 'PRIVATE KEY' "$bundle" \
    || [[ "$(grep -c -- '-----END CERTIFICATE-----' "$bundle")" != "$CA_COUNT" ]] \
    || ! openssl crl2pkcs7 -nocrl -certfile "$bundle" 2>/dev/null \
      | openssl pkcs7 -print_certs -noout >/dev/null 2>&1; then
    die "the RDS CA bundle ${RDS_CA_BUNDLE:-from AWS} is not a file of PEM certificates;" \
      "nothing was changed"
  fi
}

# Writes the bundle fetch_ca_bundle checked into the data stack's CA secret, when it changed.
refresh_ca_bundle() {
  local secret bundle="$WORK/rds-ca.pem"
  secret=$(resource_id "$DATA_STACK" CaBundleSecret)
  [[ -n "$secret" ]] || die "stack $DATA_STACK has no CaBundleSecret"
  aws_ secretsmanager get-secret-value --secret-id "$secret" --query SecretString \
    --output text >"$WORK/ca-current.pem" 2>/dev/null || : >"$WORK/ca-current.pem"
  if [[ "$(cat "$WORK/ca-current.pem")" == "$(cat "$bundle")" ]]; then
    say "The RDS CA bundle ($CA_COUNT certificates) is current"
    return 0
  fi
  awsq secretsmanager put-secret-value --secret-id "$secret" --secret-string "file://$bundle" \
    --output json >/dev/null
  say "Wrote the RDS CA bundle ($CA_COUNT certificates) to $secret"
}

# The service reads the API token's AWSPREVIOUS stage too, and ECS stops a task whose secret
# stage is missing: before the first `make rotate-token`, AWSPREVIOUS marks the current version.
ensure_previous_token() {
  local secret version
  secret=$(resource_id "$BASE_STACK" ApiTokenSecret)
  [[ -n "$secret" ]] || die "stack $BASE_STACK has no ApiTokenSecret"
  awsq secretsmanager describe-secret --secret-id "$secret" --output json >"$WORK/token.json"
  version=$(state_or_die missing-previous "$WORK/token.json")
  [[ -n "$version" ]] || return 0
  awsq secretsmanager update-secret-version-stage --secret-id "$secret" \
    --version-stage AWSPREVIOUS --move-to-version-id "$version" --output json >/dev/null
  say "The API token's current version is also AWSPREVIOUS until the first make rotate-token"
}

# Runs the bootstrap task (idempotent: creates what is missing, re-applies the grants) when the
# data stack has its task definition, i.e. once an image exists.
bootstrap() {
  if [[ "${BOOTSTRAP:-}" == skip ]]; then
    say "BOOTSTRAP=skip: the bootstrap task was not run"
    return 0
  fi
  local taskdef
  taskdef=$(resource_id "$DATA_STACK" BootstrapTaskDefinition)
  if [[ -z "$taskdef" ]]; then
    say "WARNING: no image chosen for the bootstrap task yet (no release, no BOOTSTRAP_SHA), so" \
      "the database users do not exist. Push one (make push SHA=<sha>), then run make" \
      "stack-deploy BOOTSTRAP_SHA=<sha> before the first release."
    return 0
  fi
  load_base
  say "Running the bootstrap task (database, migration and app users, grants)"
  run_one_off "$taskdef" bootstrap
  BOOTSTRAPPED=true
}

# Value of parameter $1 of the base stack as deployed.
base_parameter() {
  awsq cloudformation describe-stacks --stack-name "$BASE_STACK" --output text \
    --query "Stacks[0].Parameters[?ParameterKey=='$1'].ParameterValue | [0]"
}

# Name=Value pairs of the CI access stack: who may release (repository $1, ids $2 and $3), and
# the physical ids of the base stack's resources that the deploy role names.
ci_parameters() {
  local logical physical subnets=() public_ip=true prefix=Public role
  role=$(resource_id "$DATA_STACK" MigrationExecutionRole)
  echo "GitHubRepository=$1"
  echo "GitHubRepositoryId=$2"
  echo "GitHubOwnerId=$3"
  echo "BaseStackName=$BASE_STACK"
  echo "DataStackName=$DATA_STACK"
  echo "ServiceStackName=$SERVICE_STACK"
  echo "MigrationExecutionRoleName=$role"
  oidc_parameter
  if template_declares ci-access.yaml GitHubEnvironment; then
    echo "GitHubEnvironment=${GITHUB_ENVIRONMENT:-production}"
  fi
  if [[ "$(base_parameter TaskSubnetType)" == private ]]; then
    public_ip=false
    prefix=Private
  fi
  echo "TaskPublicIp=$public_ip"
  while read -r logical physical; do
    case $logical in
      Repository) echo "RepositoryName=$physical" ;;
      Cluster) echo "ClusterName=${physical##*/}" ;;
      AlarmTopic) echo "AlarmTopicArn=$physical" ;;
      ExecutionRole) echo "ExecutionRoleName=$physical" ;;
      TaskRole) echo "TaskRoleName=$physical" ;;
      "${prefix}SubnetA" | "${prefix}SubnetB") subnets+=("$physical") ;;
    esac
  done < <(awsq cloudformation describe-stack-resources --stack-name "$BASE_STACK" --output text \
    --query 'StackResources[].[LogicalResourceId,PhysicalResourceId]')
  [[ ${#subnets[@]} -eq 2 ]] || die "stack $BASE_STACK has no $prefix subnets A and B"
  echo "TaskSubnets=${subnets[0]},${subnets[1]}"
}

# CreateGitHubOidcProvider: CREATE_OIDC_PROVIDER when set; else false whenever the account has
# the GitHub OIDC provider already (an account has one per URL: a second prefix reuses the first's,
# and the provider outlives the stack that made it), true only when it has none.
oidc_parameter() {
  local arns arn
  if [[ -n "${CREATE_OIDC_PROVIDER:-}" ]]; then
    echo "CreateGitHubOidcProvider=$CREATE_OIDC_PROVIDER"
    return 0
  fi
  arns=$(awsq iam list-open-id-connect-providers --output text \
    --query 'OpenIDConnectProviderList[].Arn')
  for arn in $arns; do
    if [[ "$arn" == */token.actions.githubusercontent.com ]]; then
      echo "CreateGitHubOidcProvider=false"
      return 0
    fi
  done
  echo "CreateGitHubOidcProvider=true"
}

# Deploys stack $1 from template $2 with the Name=Value overrides read from standard input (and
# Prefix), through a change set whose changes are printed first, and prints the stack's outputs.
# Overrides equal to the deployed values are left out: the stack changes only when a setting
# does. A change set that replaces a stateful resource is refused unless ALLOW_REPLACE=true; with
# PLAN=true the change set is only printed and deleted.
deploy_stack() {
  local name rc=0 text kind why
  { prefix_parameter "$2"; cat; } >"$WORK/$1.pairs"
  if [[ -s "$WORK/$1.json" ]]; then
    state_or_die changed-parameters "$WORK/$1.json" "$WORK/$1.pairs" >"$WORK/$1.changed"
    mv "$WORK/$1.changed" "$WORK/$1.pairs"
  fi
  if [[ "${PLAN:-}" == true ]]; then
    plan_stack "$1" "$2" "$WORK/$1.pairs" || PLAN_REFUSED=true
    return 0
  fi
  name="stack-deploy-$(date +%s)"
  create_change_set "$1" "$2" "$name" "$WORK/$1.pairs"
  text=$(state changes "$WORK" "$1" "$(allow_replace)" "$CHANGE_SET_TYPE") || rc=$?
  case $rc in
    0) say "$text" ;;
    5)
      discard_change_set "$1" "$name"
      say "No changes to deploy: the stack $1 is up to date."
      describe_stack "$1" "$WORK/$1.json" || die "stack $1 vanished"
      return 0 ;;
    4)
      discard_change_set "$1" "$name"
      printf '%s\n' "$text" | sed '$d'
      die "$(printf '%s\n' "$text" | tail -n 1)" ;;
    *) discard_change_set "$1" "$name"; die "$text" ;;
  esac
  kind=$(tr '[:upper:]' '[:lower:]' <<<"$CHANGE_SET_TYPE")
  awsq cloudformation execute-change-set --stack-name "$1" --change-set-name "$name" \
    --output json >/dev/null
  if ! aws_ cloudformation wait "stack-$kind-complete" --stack-name "$1" 2>"$WORK/wait.err"; then
    [[ "$kind" == create ]] || die "stack $1 was not deployed: $(stack_failure "$1")"
    why=$(stack_failure "$1")
    die "stack $1 was not created: ${why%%; delete it before the next deploy*}. Fix the cause," \
      "then run make stack-deploy again: it deletes a failed first create when nothing" \
      "stateful is left in it"
  fi
  describe_stack "$1" "$WORK/$1.json" || die "stack $1 vanished after the deploy"
  say "Outputs of $1:"
  state outputs "$WORK/$1.json"
}

# The service-linked roles the stacks depend on. AWS makes some lazily, on first use, and then
# races the stack that needs them (an ECS cluster created with the role, a known CloudFormation
# failure of a fresh account); the deploy role may not create roles, so this run makes them all.
SERVICE_LINKED_ROLES="ecs.amazonaws.com ecs.application-autoscaling.amazonaws.com
elasticloadbalancing.amazonaws.com rds.amazonaws.com"

# Creates each service-linked role that does not exist yet (idempotent: "taken" is success).
ensure_service_linked_roles() {
  local service
  for service in $SERVICE_LINKED_ROLES; do
    if aws_ iam create-service-linked-role --aws-service-name "$service" >/dev/null \
      2>"$WORK/aws.err"; then
      say "Created the service-linked role of $service"
    elif ! grep -Eq 'has been taken|already exists' "$WORK/aws.err"; then
      die "aws iam create-service-linked-role --aws-service-name $service failed:" \
        "$(last_line "$WORK/aws.err") (an administrator of the account must run it once)"
    fi
  done
}

# A stack in ROLLBACK_COMPLETE, ROLLBACK_FAILED or CREATE_FAILED is what a failed first create
# leaves; it can only be deleted. When nothing stateful is left in it, delete it so that this run
# creates it again; otherwise stop with the exact commands (state failed-create decides).
recover_failed_create() {
  local stack=$1 status said
  status=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["Stacks"][0]["StackStatus"])' \
    "$WORK/$stack.json")
  case $status in
    ROLLBACK_COMPLETE | ROLLBACK_FAILED | CREATE_FAILED) ;;
    *) return 0 ;;
  esac
  say "stack $stack failed to create: $(stack_failure "$stack")"
  awsq cloudformation describe-stack-resources --stack-name "$stack" --output json \
    >"$WORK/$stack.resources.json"
  said=$(state_or_die failed-create "$WORK/$stack.json" "$WORK/$stack.resources.json" "$stack")
  if [[ "${PLAN:-}" == true ]]; then
    say "${said/deleting it and creating it again/make stack-deploy deletes it and creates it again}"
    rm -f "$WORK/$stack.json"
    return 0
  fi
  say "$said"
  awsq cloudformation delete-stack --stack-name "$stack"
  aws_ cloudformation wait stack-delete-complete --stack-name "$stack" 2>"$WORK/wait.err" \
    || die "stack $stack could not be deleted: $(stack_failure "$stack")"
  rm -f "$WORK/$stack.json"
}

# Marks the database ready (data stack parameter DatabaseReady=true: deletion protection on, the
# rotation schedules created, which rotate at once) once the bootstrap task has made the users
# and the database is available. Never set back to false: that would drop both.
database_ready() {
  local id status
  template_declares data.yaml DatabaseReady || return 0
  [[ "$(state parameter "$WORK/$DATA_STACK.json" DatabaseReady)" != true ]] || return 0
  if [[ "$BOOTSTRAPPED" != true ]]; then
    say "The database is not marked ready (no deletion protection, no rotation yet): that" \
      "happens in the make stack-deploy whose bootstrap task succeeds"
    return 0
  fi
  id=$(resource_id "$DATA_STACK" Database)
  status=$(awsq rds describe-db-instances --db-instance-identifier "$id" \
    --query 'DBInstances[0].DBInstanceStatus' --output text)
  if [[ "$status" != available ]]; then
    say "The database $id is $status: it is marked ready at the next make stack-deploy"
    return 0
  fi
  say "The database $id is bootstrapped and available: deletion protection on, rotation" \
    "schedules created (DatabaseReady=true); Secrets Manager rotates both identities now"
  echo "DatabaseReady=true" | deploy_stack "$DATA_STACK" data.yaml
}

# Says loudly when the stack lets writes, and so the bearer token, cross the internet unencrypted.
warn_plaintext_writes() {
  if [[ "$(base_parameter AllowPlaintextWrites)" == true \
    && "$(base_parameter CertificateArn)" =~ ^(None)?$ ]]; then
    echo "WARNING: AllowPlaintextWrites is on: writes and their bearer token cross the internet" \
      "in clear text. Only for a throwaway demo; redeploy with ALLOW_PLAINTEXT_WRITES=false or" \
      "CERTIFICATE_ARN=... DOMAIN_NAME=..." >&2
  fi
}

# The service stack's change set for a release of SHA (make plan SHA=...): nothing is deployed.
plan_service() {
  local tag digest
  [[ -n "${SHA:-}" ]] || return 0
  check_sha
  load_base
  tag=$(resolve_tag "$SHA")
  digest=$(tag_digest "$tag")
  {
    prefix_parameter service.yaml
    printf 'BaseStackName=%s\nDataStackName=%s\nImageTag=%s@%s\n' "$BASE_STACK" "$DATA_STACK" \
      "$tag" "$digest"
  } >"$WORK/service.pairs"
  say "Plan of stack $SERVICE_STACK for a release of $tag ($digest):"
  plan_stack "$SERVICE_STACK" service.yaml "$WORK/service.pairs" || PLAN_REFUSED=true
}

# Checks each long-lived stack before anything changes: a failed first create is recovered (or
# explained), a busy or failed one stops the run.
check_stacks() {
  local stack
  for stack in "$BASE_STACK" "$DATA_STACK" "$CI_STACK"; do
    if describe_stack "$stack" "$WORK/$stack.json"; then
      recover_failed_create "$stack"
      [[ ! -s "$WORK/$stack.json" ]] || state_or_die stack "$WORK/$stack.json" "$stack" >/dev/null
    fi
  done
}

# make plan: the change sets of every stack, printed and deleted. A stack whose inputs do not
# exist yet (the data stack before the base stack) is planned on a later run.
plan() {
  local repo ids
  PLAN_REFUSED=false
  check_stacks
  say "Plan of stack $BASE_STACK:"
  base_parameters >"$WORK/base.parameters"
  s3_prefix_list >>"$WORK/base.parameters"
  deploy_stack "$BASE_STACK" base.yaml <"$WORK/base.parameters"
  if [[ ! -s "$WORK/$BASE_STACK.json" ]]; then
    say "Plan of stacks $DATA_STACK and $CI_STACK: after $BASE_STACK exists (they name its resources)"
  else
    say "Plan of stack $DATA_STACK:"
    find_task_image
    data_parameters >"$WORK/data.parameters"
    deploy_stack "$DATA_STACK" data.yaml <"$WORK/data.parameters"
    if [[ ! -s "$WORK/$DATA_STACK.json" ]]; then
      say "Plan of stack $CI_STACK: after $DATA_STACK exists (it names its resources)"
    elif [[ -s "$WORK/$CI_STACK.json" && -z "${GITHUB_REPOSITORY:-}" ]]; then
      say "Plan of stack $CI_STACK (GitHub repository and ids as deployed):"
      ci_parameters "" "" "" | grep -Ev '^GitHub(Repository|RepositoryId|OwnerId)=' \
        >"$WORK/ci.parameters" || true
      deploy_stack "$CI_STACK" ci-access.yaml <"$WORK/ci.parameters"
    else
      repo=$(github_repository)
      ids=$(github_ids "$repo")
      say "Plan of stack $CI_STACK:"
      # shellcheck disable=SC2086 # ids is two numbers: split on purpose
      ci_parameters "$repo" $ids >"$WORK/ci.parameters"
      deploy_stack "$CI_STACK" ci-access.yaml <"$WORK/ci.parameters"
    fi
  fi
  plan_service
  if [[ "$PLAN_REFUSED" == true ]]; then
    die "make stack-deploy would refuse a change above (it replaces a stateful resource);" \
      "ALLOW_REPLACE=true lets it, after a backup"
  fi
  say "Nothing was changed (the change sets were deleted)."
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  local repo ids
  BOOTSTRAPPED=false
  allow_replace >/dev/null
  check_prefix
  if [[ "${PLAN:-}" == true ]]; then
    require_tools aws python3
    require_credentials
    plan
    return 0
  fi
  repo=$(github_repository)
  ids=$(github_ids "$repo")
  require_tools aws python3 curl openssl
  require_credentials
  fetch_ca_bundle
  check_stacks
  find_task_image
  ensure_service_linked_roles
  say "Deploying stack $BASE_STACK in $AWS_REGION"
  base_parameters >"$WORK/base.parameters"
  s3_prefix_list >>"$WORK/base.parameters"
  deploy_stack "$BASE_STACK" base.yaml <"$WORK/base.parameters"
  "$ROOT/scripts/default-sg.sh"
  warn_plaintext_writes
  say "Deploying stack $DATA_STACK in $AWS_REGION"
  data_parameters >"$WORK/data.parameters"
  deploy_stack "$DATA_STACK" data.yaml <"$WORK/data.parameters"
  refresh_ca_bundle
  ensure_previous_token
  bootstrap
  database_ready
  say "Deploying stack $CI_STACK in $AWS_REGION (deploy role trusts $repo: ci.yml and" \
    "rollback.yml on main, environment ${GITHUB_ENVIRONMENT:-production})"
  # shellcheck disable=SC2086 # ids is two numbers: split on purpose
  ci_parameters "$repo" $ids >"$WORK/ci.parameters"
  deploy_stack "$CI_STACK" ci-access.yaml <"$WORK/ci.parameters"
  say "Next: make release SHA=\$(git rev-parse HEAD); in GitHub set the repository variables" \
    "AWS_DEPLOY_ROLE_ARN (DeployRoleArn above) and AWS_REGION=$AWS_REGION"
}

main "$@"
