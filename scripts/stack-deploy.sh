#!/usr/bin/env bash
# stack-deploy.sh: create or update the long-lived base stack (network, ALB, ECR, cluster, database,
# deploy role) and print its outputs. A run with nothing to change changes nothing.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make stack-deploy [GITHUB_REPOSITORY=owner/name] [AWS_REGION=...] [BASE_STACK=...]
Creates or updates the base stack from cloudformation/base.yaml.
  GITHUB_REPOSITORY     repository whose production environment may deploy
                        (default: derived from `git remote get-url origin`)
Optional, passed only when set (otherwise the stack keeps its current value or the default):
  CREATE_OIDC_PROVIDER  'false' when the account already has the GitHub OIDC provider
  CERTIFICATE_ARN       ACM certificate for HTTPS (then DOMAIN_NAME is required)
  DOMAIN_NAME           host name the certificate covers
  DB_MULTI_AZ           'true' for a standby database in a second zone
  DB_INSTANCE_CLASS     e.g. db.t4g.small
  LOG_RETENTION_DAYS    e.g. 90
  ALARM_EMAIL           address subscribed to the alarms
  REPOSITORY_NAME       ECR repository name (default cars-api)
USAGE
}

# owner/name of the GitHub repository: $GITHUB_REPOSITORY, else the origin remote.
github_repository() {
  local url repo
  if [[ -n "${GITHUB_REPOSITORY:-}" ]]; then
    repo=$GITHUB_REPOSITORY
  else
    url=$(git -C "$ROOT" remote get-url origin 2>/dev/null) \
      || usage_error "GITHUB_REPOSITORY is not set and there is no git remote 'origin' to derive it from"
    url=${url%.git}
    url=${url%/}
    repo="$(basename "$(dirname "${url//://}")")/$(basename "$url")"
  fi
  [[ "$repo" =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ ]] \
    || usage_error "GITHUB_REPOSITORY '$repo' is not owner/name"
  echo "$repo"
}

# Name=Value pairs for --parameter-overrides: the repository, plus each optional setting that is set.
parameters() {
  local pair name var
  echo "GitHubRepository=$1"
  echo "ServiceStackName=$SERVICE_STACK"
  for pair in CreateGitHubOidcProvider=CREATE_OIDC_PROVIDER CertificateArn=CERTIFICATE_ARN \
    DomainName=DOMAIN_NAME RepositoryName=REPOSITORY_NAME DatabaseMultiAz=DB_MULTI_AZ DatabaseInstanceClass=DB_INSTANCE_CLASS \
    LogRetentionDays=LOG_RETENTION_DAYS AlarmEmail=ALARM_EMAIL; do
    name=${pair%%=*}
    var=${pair#*=}
    [[ -z "${!var:-}" ]] || echo "$name=${!var}"
  done
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  local repo line overrides=()
  repo=$(github_repository)
  require_tools aws python3
  require_credentials
  if describe_stack "$BASE_STACK" "$WORK/base.json"; then
    state_or_die stack "$WORK/base.json" "$BASE_STACK" >/dev/null
  fi
  while IFS= read -r line; do overrides+=("$line"); done < <(parameters "$repo")
  say "Deploying stack $BASE_STACK in $AWS_REGION (deploy role trusts $repo)"
  cfn_deploy --stack-name "$BASE_STACK" --template-file "$ROOT/cloudformation/base.yaml" \
    --capabilities CAPABILITY_NAMED_IAM --parameter-overrides "${overrides[@]}" \
    || die "stack $BASE_STACK was not deployed: $(stack_failure "$BASE_STACK")"
  describe_stack "$BASE_STACK" "$WORK/base.json" || die "stack $BASE_STACK vanished after the deploy"
  say "Outputs of $BASE_STACK:"
  state outputs "$WORK/base.json"
  say "Next: make release SHA=\$(git rev-parse HEAD); in GitHub set the repository variables" \
    "AWS_DEPLOY_ROLE_ARN (DeployRoleArn above) and AWS_REGION=$AWS_REGION"
}

main "$@"
