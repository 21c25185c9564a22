#!/usr/bin/env bash
# stack-deploy.sh: create or update the long-lived stacks in order: the base stack (network, ALB, WAF,
# ECR, cluster, database, task roles), then the CI access stack (GitHub OIDC trust and deploy role)
# that names the base stack's resources; print their outputs. Nothing to change changes nothing.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
CI_STACK=${CI_STACK:-cars-api-ci-access}

usage() {
  cat >&2 <<'USAGE'
usage: make stack-deploy GITHUB_REPOSITORY=owner/name [AWS_REGION=...] [BASE_STACK=...] [CI_STACK=...]
Creates or updates the base stack (cloudformation/base.yaml), then the CI access stack
(cloudformation/ci-access.yaml: the GitHub OIDC provider and the deploy role).
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

# Name=Value pairs of the base stack's --parameter-overrides: each optional setting that is set.
base_parameters() {
  local pair name var
  for pair in CertificateArn=CERTIFICATE_ARN DomainName=DOMAIN_NAME \
    AllowPlaintextWrites=ALLOW_PLAINTEXT_WRITES WebApplicationFirewall=WAF \
    TaskSubnetType=TASK_SUBNET_TYPE EnhancedImageScanning=ENHANCED_SCANNING \
    RepositoryName=REPOSITORY_NAME DatabaseMultiAz=DB_MULTI_AZ DatabaseInstanceClass=DB_INSTANCE_CLASS \
    LogRetentionDays=LOG_RETENTION_DAYS AlarmEmail=ALARM_EMAIL; do
    name=${pair%%=*}
    var=${pair#*=}
    [[ -z "${!var:-}" ]] || echo "$name=${!var}"
  done
}

# Value of parameter $1 of the base stack as deployed.
base_parameter() {
  awsq cloudformation describe-stacks --stack-name "$BASE_STACK" --output text \
    --query "Stacks[0].Parameters[?ParameterKey=='$1'].ParameterValue | [0]"
}

# Name=Value pairs of the CI access stack: who may release (repository $1, ids $2 and $3), and
# the physical ids of the base stack's resources that the deploy role names.
ci_parameters() {
  local logical physical subnets=() public_ip=true prefix=Public
  echo "GitHubRepository=$1"
  echo "GitHubRepositoryId=$2"
  echo "GitHubOwnerId=$3"
  echo "BaseStackName=$BASE_STACK"
  echo "ServiceStackName=$SERVICE_STACK"
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
# prints its outputs.
deploy_stack() {
  local line overrides=()
  while IFS= read -r line; do overrides+=("$line"); done
  cfn_deploy --stack-name "$1" --template-file "$ROOT/cloudformation/$2" \
    --capabilities CAPABILITY_NAMED_IAM ${overrides[@]+--parameter-overrides "${overrides[@]}"} \
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
  require_tools aws python3
  require_credentials
  for stack in "$BASE_STACK" "$CI_STACK"; do
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
  say "Deploying stack $CI_STACK in $AWS_REGION (deploy role trusts $repo: ci.yml and rollback.yml on main)"
  # shellcheck disable=SC2086 # ids is two numbers: split on purpose
  ci_parameters "$repo" $ids >"$WORK/ci.parameters"
  deploy_stack "$CI_STACK" ci-access.yaml <"$WORK/ci.parameters"
  say "Next: make release SHA=\$(git rev-parse HEAD); in GitHub set the repository variables" \
    "AWS_DEPLOY_ROLE_ARN (DeployRoleArn above) and AWS_REGION=$AWS_REGION"
}

main "$@"
