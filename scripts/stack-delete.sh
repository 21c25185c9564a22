#!/usr/bin/env bash
# stack-delete.sh: delete the service, CI access, data and base stacks, after confirmation; say what
# survives.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make stack-delete [CONFIRM=<stack name>] [AWS_REGION=...] [BASE_STACK=...] [DATA_STACK=...]
                         [SERVICE_STACK=...] [CI_STACK=...]
Deletes the service stack, the CI access stack (deploy role), the data stack, then the base stack,
after you type the base stack's name (or the service stack's, when only it exists);
CONFIRM=<that name> answers without a prompt.
The database has deletion protection: turn it off first (the command is printed).
What survives the deletion: the final database snapshot, the ECR repository with its images, the
Secrets Manager secrets of the migration and app users and of the API token (RDS deletes the master
secret it manages with the instance) and the audit bucket (load balancer and VPC flow logs); each
is printed with how to remove it.
USAGE
}

# Dies unless the database of the data stack may be deleted (deletion protection off).
check_database() {
  local id protected
  id=$(state output "$WORK/data.json" "$DATA_STACK" DatabaseInstanceId) || return 0
  protected=$(awsq rds describe-db-instances --db-instance-identifier "$id" \
    --query 'DBInstances[0].DeletionProtection' --output text)
  [[ "$protected" != True ]] || die "database $id has deletion protection on; nothing was deleted." \
    "Turn it off first: aws rds modify-db-instance --db-instance-identifier $id" \
    "--no-deletion-protection --apply-immediately --region $AWS_REGION"
}

# Reads the confirmation from CONFIRM, else from standard input (a terminal or a pipe).
confirm() {
  local expected=$1 answer=${CONFIRM:-}
  if [[ -z "$answer" ]]; then
    printf 'Type the stack name (%s) to confirm: ' "$expected" >&2
    if ! read -r answer; then
      echo >&2
      die "no confirmation given (no input): type the stack name, or set CONFIRM=$expected"
    fi
  fi
  [[ "$answer" == "$expected" ]] || die "confirmation '$answer' is not '$expected': nothing was deleted"
}

delete_stack() {
  say "Deleting stack $1 ..."
  awsq cloudformation delete-stack --stack-name "$1"
  aws_ cloudformation wait stack-delete-complete --stack-name "$1" 2>"$WORK/aws.err" \
    || die "stack $1 was not deleted: $(stack_failure "$1")"
  say "Deleted stack $1."
}

# What the data and base stacks retain (DeletionPolicy Retain/Snapshot), with their identifiers.
survivors() {
  local id
  say "What survives, on purpose:"
  if id=$(state output "$WORK/data.json" "$DATA_STACK" DatabaseInstanceId); then
    say "  - the final snapshot of database $id:" \
      "aws rds describe-db-snapshots --db-instance-identifier $id --snapshot-type manual --region $AWS_REGION"
  fi
  if id=$(state output "$WORK/base.json" "$BASE_STACK" RepositoryName); then
    say "  - ECR repository $id with its images (delete: aws ecr delete-repository --force" \
      "--repository-name $id --region $AWS_REGION)"
  fi
  if id=$(state output "$WORK/base.json" "$BASE_STACK" AuditBucketName); then
    say "  - S3 bucket $id with the load balancer and VPC flow logs (they expire after the" \
      "retention period; delete: aws s3 rb s3://$id --force --region $AWS_REGION)"
  fi
  for id in MigrationSecretArn AppSecretArn; do
    if id=$(state output "$WORK/data.json" "$DATA_STACK" "$id"); then
      say "  - secret $id (delete: aws secretsmanager delete-secret --secret-id $id --region $AWS_REGION)"
    fi
  done
  if id=$(state output "$WORK/base.json" "$BASE_STACK" ApiTokenSecretArn); then
    say "  - secret $id (delete: aws secretsmanager delete-secret --secret-id $id --region $AWS_REGION)"
  fi
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  check_prefix
  require_tools aws python3
  require_credentials
  local service=false ci=false data=false base=false
  describe_stack "$SERVICE_STACK" "$WORK/service-stack.json" && service=true
  describe_stack "$CI_STACK" "$WORK/ci-stack.json" && ci=true
  describe_stack "$DATA_STACK" "$WORK/data.json" && data=true
  describe_stack "$BASE_STACK" "$WORK/base.json" && base=true
  $service || $ci || $data || $base \
    || die "nothing to delete: neither $SERVICE_STACK nor $BASE_STACK exists in $AWS_REGION"
  if $data; then check_database; fi
  say "This deletes, in $AWS_REGION:"
  if $service; then say "  - stack $SERVICE_STACK: the ECS service (the API stops answering), its tasks and alarms"; fi
  if $ci; then say "  - stack $CI_STACK: the GitHub Actions deploy role (and the OIDC provider if it made it)"; fi
  if $data; then
    say "  - stack $DATA_STACK: the database (after a final snapshot), its alarms, log groups," \
      "CA bundle, rotation functions and one-off task definitions"
  fi
  if $base; then
    say "  - stack $BASE_STACK: network, load balancer, cluster, log group (the logs are lost)," \
      "alarm topic, firewall and task roles"
  fi
  if $data || $base; then survivors; fi
  if $base; then
    confirm "$BASE_STACK"
  elif $data; then
    confirm "$DATA_STACK"
  elif $service; then
    confirm "$SERVICE_STACK"
  else
    confirm "$CI_STACK"
  fi
  if $service; then delete_stack "$SERVICE_STACK"; fi
  if $ci; then delete_stack "$CI_STACK"; fi
  if $data; then delete_stack "$DATA_STACK"; fi
  if $base; then delete_stack "$BASE_STACK"; fi
  say "Done. A later make stack-deploy creates a new, empty database; delete the ECR repository" \
    "above first, or give it REPOSITORY_NAME=<another name>, since the name is still taken."
}

main "$@"
