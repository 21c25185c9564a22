#!/usr/bin/env bash
# stack-deploy.sh: create or update the long-lived stacks in order: the base stack (network, ALB, WAF,
# ECR, cluster, task roles), the data stack (database, identities, RDS CA bundle; then the bootstrap
# task), then the CI access stack (GitHub OIDC trust and deploy role) that names the resources of
# both; print their outputs. Nothing to change changes nothing.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
CI_STACK=${CI_STACK:-cars-api-ci-access}

usage() {
  cat >&2 <<'USAGE'
usage: make stack-deploy GITHUB_REPOSITORY=owner/name [AWS_REGION=...] [BASE_STACK=...] [DATA_STACK=...]
                         [CI_STACK=...]
Creates or updates the base stack (cloudformation/base.yaml), the data stack (cloudformation/
data.yaml), then the CI access stack (cloudformation/ci-access.yaml: the GitHub OIDC provider and
the deploy role). After the data stack it writes the regional RDS CA bundle into its secret (only
when it changed), makes sure the API token has an AWSPREVIOUS version, and runs the bootstrap task
(creates the database, the migration and app users, and their grants; idempotent) with the image
BOOTSTRAP_SHA names, else the newest image in the repository (none yet: it says so and skips).
  GITHUB_REPOSITORY     repository whose ci.yml and rollback.yml (main, production environment)
                        may deploy; when omitted it is derived from `git remote get-url origin`
                        and must be confirmed at a terminal (refused without one)
  GITHUB_REPOSITORY_ID  its numeric id and that of its owner; default: asked from GitHub with
  GITHUB_OWNER_ID       `gh api repos/<owner/name>` (.id and .owner.id)
Optional, passed only when set (otherwise the stack keeps its current value or the default):
  CREATE_OIDC_PROVIDER  'false' when the account already has the GitHub OIDC provider
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
  REPOSITORY_NAME       ECR repository name (default cars-api)
  DB_SNAPSHOT           DB snapshot to restore when the data stack creates the database
  RDS_CA_BUNDLE         a local PEM file instead of the AWS-published regional RDS CA bundle
  BOOTSTRAP_SHA         image (commit sha in ECR) of the bootstrap and migration task definitions
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
    RepositoryName=REPOSITORY_NAME LogRetentionDays=LOG_RETENTION_DAYS AlarmEmail=ALARM_EMAIL
}

# Name=Value pairs of the data stack: the physical ids of the base stack's resources it names,
# the Secrets Manager endpoint the base stack lacks with public tasks, TASK_IMAGE (when there is
# one) and each optional setting.
data_parameters() {
  local logical physical subnets=() endpoint=true
  echo "ServiceStackName=$SERVICE_STACK"
  echo "DatabaseInstanceIdentifier=$(printf '%s' "$DATA_STACK" | tr '[:upper:]' '[:lower:]')"
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
}

# Sets TASK_IMAGE, the one-off tasks' image as repository@digest: BOOTSTRAP_SHA's, else the
# newest pushed image; empty when the repository holds none yet.
find_task_image() {
  local name uri tag
  [[ ! "${BOOTSTRAP_SHA:-0000000}" =~ ^[0-9a-f]{7,40}$ ]] \
    && usage_error "BOOTSTRAP_SHA '$BOOTSTRAP_SHA' is not a commit SHA (7 to 40 lowercase hex)"
  name=$(resource_id "$BASE_STACK" Repository)
  uri=$(awsq ecr describe-repositories --repository-names "$name" \
    --query 'repositories[0].repositoryUri' --output text)
  TASK_IMAGE=
  if [[ -n "${BOOTSTRAP_SHA:-}" ]]; then
    awsq ecr describe-images --repository-name "$name" --output json >"$WORK/images.json"
    tag=$(state_or_die resolve "$WORK/images.json" "$BOOTSTRAP_SHA" "$uri")
    awsq ecr describe-images --repository-name "$name" --image-ids "imageTag=$tag" \
      --output json >"$WORK/tag.json"
    TASK_IMAGE="$uri@$(state_or_die digest "$WORK/tag.json" "$tag")"
    return 0
  fi
  awsq ecr describe-images --repository-name "$name" --output json \
    --query 'sort_by(imageDetails, &imagePushedAt)[-1].imageDigest' >"$WORK/newest.json"
  tag=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])) or "")' "$WORK/newest.json")
  [[ -z "$tag" ]] || TASK_IMAGE="$uri@$tag"
}

# Physical id of resource $2 of stack $1 (empty when it has none).
resource_id() {
  awsq cloudformation describe-stack-resources --stack-name "$1" --output text \
    --query "StackResources[?LogicalResourceId=='$2'].PhysicalResourceId | [0]" | sed '/^None$/d'
}

# Writes the regional RDS CA bundle (or RDS_CA_BUNDLE) into the data stack's CA secret, after
# checking that it is PEM certificates and nothing else, and only when it changed.
refresh_ca_bundle() {
  local secret bundle="$WORK/rds-ca.pem" count
  secret=$(resource_id "$DATA_STACK" CaBundleSecret)
  [[ -n "$secret" ]] || die "stack $DATA_STACK has no CaBundleSecret"
  if [[ -n "${RDS_CA_BUNDLE:-}" ]]; then
    [[ -f "$RDS_CA_BUNDLE" ]] || usage_error "RDS_CA_BUNDLE: no file at $RDS_CA_BUNDLE"
    cp "$RDS_CA_BUNDLE" "$bundle"
  else
    local url="https://truststore.pki.rds.amazonaws.com/$AWS_REGION/$AWS_REGION-bundle.pem"
    curl -fsS --max-time 30 --proto '=https' -o "$bundle" "$url" 2>"$WORK/curl.err" \
      || die "cannot fetch the RDS CA bundle from $url: $(last_line "$WORK/curl.err")" \
        "(or pass RDS_CA_BUNDLE=<file>)"
  fi
  count=$(grep -c -- '-----BEGIN CERTIFICATE-----' "$bundle" || true)
  if ((count == 0)) || grep -q -- 'PRIVATE KEY' "$bundle" \
    || [[ "$(grep -c -- '-----END CERTIFICATE-----' "$bundle")" != "$count" ]] \
    || ! openssl crl2pkcs7 -nocrl -certfile "$bundle" 2>/dev/null \
      | openssl pkcs7 -print_certs -noout >/dev/null 2>&1; then
    die "the RDS CA bundle ${RDS_CA_BUNDLE:-from AWS} is not a file of PEM certificates; nothing written"
  fi
  aws_ secretsmanager get-secret-value --secret-id "$secret" --query SecretString \
    --output text >"$WORK/ca-current.pem" 2>/dev/null || : >"$WORK/ca-current.pem"
  if [[ "$(cat "$WORK/ca-current.pem")" == "$(cat "$bundle")" ]]; then
    say "The RDS CA bundle ($count certificates) is current"
    return 0
  fi
  awsq secretsmanager put-secret-value --secret-id "$secret" --secret-string "file://$bundle" \
    --output json >/dev/null
  say "Wrote the RDS CA bundle ($count certificates) to $secret"
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
    say "WARNING: no image in the repository yet, so no bootstrap task: the database users do" \
      "not exist. Push one (make push SHA=<sha>), then run make stack-deploy again before the" \
      "first release."
    return 0
  fi
  load_base
  say "Running the bootstrap task (database, migration and app users, grants)"
  run_one_off "$taskdef" bootstrap
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
  [[ -z "${CREATE_OIDC_PROVIDER:-}" ]] || echo "CreateGitHubOidcProvider=$CREATE_OIDC_PROVIDER"
  if [[ "$(base_parameter TaskSubnetType)" == private ]]; then
    public_ip=false
    prefix=Private
  fi
  echo "TaskPublicIp=$public_ip"
  while read -r logical physical; do
    case $logical in
      Repository) echo "RepositoryName=$physical" ;;
      Cluster) echo "ClusterName=${physical##*/}" ;;
      LogGroup) echo "LogGroupName=$physical" ;;
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

# Deploys stack $1 from template $2 with the Name=Value overrides read from standard input, and
# prints its outputs. Overrides equal to the deployed values are left out (the CLI keeps those):
# the stack changes only when a setting does. CAPABILITY_AUTO_EXPAND: data.yaml's rotation
# functions come from a transform.
deploy_stack() {
  local line overrides=()
  cat >"$WORK/$1.pairs"
  if [[ -s "$WORK/$1.json" ]]; then
    state_or_die changed-parameters "$WORK/$1.json" "$WORK/$1.pairs" >"$WORK/$1.changed"
    mv "$WORK/$1.changed" "$WORK/$1.pairs"
  fi
  while IFS= read -r line; do [[ -z "$line" ]] || overrides+=("$line"); done <"$WORK/$1.pairs"
  cfn_deploy --stack-name "$1" --template-file "$ROOT/cloudformation/$2" \
    --capabilities CAPABILITY_NAMED_IAM CAPABILITY_AUTO_EXPAND \
    ${overrides[@]+--parameter-overrides "${overrides[@]}"} \
    || die "stack $1 was not deployed: $(stack_failure "$1")"
  describe_stack "$1" "$WORK/$1.json" || die "stack $1 vanished after the deploy"
  say "Outputs of $1:"
  state outputs "$WORK/$1.json"
}

# The service stack's scaling needs Application Auto Scaling's service-linked role. The deploy
# role may not create roles, so the administrator's run creates it once per account.
ensure_autoscaling_role() {
  aws_ iam get-role --role-name AWSServiceRoleForApplicationAutoScaling_ECSService \
    >/dev/null 2>&1 && return 0
  say "Creating the service-linked role of Application Auto Scaling for ECS"
  aws_ iam create-service-linked-role --aws-service-name ecs.application-autoscaling.amazonaws.com \
    >/dev/null 2>"$WORK/aws.err" && return 0
  # Someone else's first run (or the first scalable target) may have made it meanwhile.
  grep -Eq 'already exists|has been taken' "$WORK/aws.err" \
    || die "aws iam create-service-linked-role failed: $(last_line "$WORK/aws.err")"
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

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  local repo ids stack
  repo=$(github_repository)
  ids=$(github_ids "$repo")
  require_tools aws python3 curl openssl
  require_credentials
  for stack in "$BASE_STACK" "$DATA_STACK" "$CI_STACK"; do
    if describe_stack "$stack" "$WORK/$stack.json"; then
      state_or_die stack "$WORK/$stack.json" "$stack" >/dev/null
    fi
  done
  ensure_autoscaling_role
  say "Deploying stack $BASE_STACK in $AWS_REGION"
  base_parameters >"$WORK/base.parameters"
  s3_prefix_list >>"$WORK/base.parameters"
  deploy_stack "$BASE_STACK" base.yaml <"$WORK/base.parameters"
  "$ROOT/scripts/default-sg.sh"
  warn_plaintext_writes
  say "Deploying stack $DATA_STACK in $AWS_REGION"
  find_task_image
  data_parameters >"$WORK/data.parameters"
  deploy_stack "$DATA_STACK" data.yaml <"$WORK/data.parameters"
  refresh_ca_bundle
  ensure_previous_token
  bootstrap
  say "Deploying stack $CI_STACK in $AWS_REGION (deploy role trusts $repo: ci.yml and rollback.yml on main)"
  # shellcheck disable=SC2086 # ids is two numbers: split on purpose
  ci_parameters "$repo" $ids >"$WORK/ci.parameters"
  deploy_stack "$CI_STACK" ci-access.yaml <"$WORK/ci.parameters"
  say "Next: make release SHA=\$(git rev-parse HEAD); in GitHub set the repository variables" \
    "AWS_DEPLOY_ROLE_ARN (DeployRoleArn above) and AWS_REGION=$AWS_REGION"
}

main "$@"
