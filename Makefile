# cars-api: the single entry point for running, testing, building and deploying.
# Run `make` for the list of targets; every variable below can be overridden (make run PORT=9090).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules --no-print-directory

## Python (3.11 or newer) that creates the virtualenvs.
PYTHON ?= python3
## Where the virtualenvs live.
VENV ?= .venv
## Address make run listens on (cars.py's HOST).
HOST ?= 127.0.0.1
## Port make run listens on (cars.py's PORT).
PORT ?= 8080
## Extra pytest arguments for make test, check and drill, e.g. PYTEST_ARGS='-k idempotency -x'.
PYTEST_ARGS ?=
## Container engine: docker, podman, or another docker-compatible command.
CONTAINER ?= docker
## Name of the local image (tagged with the commit).
IMAGE ?= cars-api
## Base image to build on instead of the Dockerfile's upstream stage (a local stand-in).
PYTHON_IMAGE ?=
## Commit to build, push, deploy or roll back (7 to 40 hex characters); required by release, push, deploy, rollback.
SHA ?=
## Region of the stacks.
AWS_REGION ?= eu-west-1
## First part of the four stack names (each must start with it): STACK_PREFIX=staging runs a second environment.
STACK_PREFIX ?= cars-api
# An empty STACK_PREFIX (a GitHub environment without the variable) means the default prefix.
ifeq ($(strip $(STACK_PREFIX)),)
override STACK_PREFIX := cars-api
endif
## Base stack: network, load balancer, WAF, repository, cluster, roles, alarm topic.
BASE_STACK ?= $(STACK_PREFIX)-base
## Data stack: the database, its secrets, rotation, bootstrap and migration tasks.
DATA_STACK ?= $(STACK_PREFIX)-data
## Service stack: the ECS service, its autoscaling, alarms and dashboard (one per release).
SERVICE_STACK ?= $(STACK_PREFIX)-service
## CI access stack: the GitHub OIDC provider and the deploy role.
CI_STACK ?= $(STACK_PREFIX)-ci-access
## Days the log groups and the audit bucket keep logs (make stack-deploy).
LOG_RETENTION_DAYS ?= 365
## owner/name of the GitHub repository whose workflows may deploy.
GITHUB_REPOSITORY ?=
## Required reviewers of the production environment (make github-setup): logins or team:<org>/<slug>.
REVIEWERS ?=
## An image saved by make image-save, which make push loads instead of building.
IMAGE_ARCHIVE ?=
## The image ID IMAGE_ARCHIVE must still hold (dist/image.id).
IMAGE_ID ?=
## true: make rollback deploys an image the scan gate refuses, and says so.
ALLOW_VULNERABLE ?=
## Any text (the incident): push, release and deploy refuse; rollback still works.
DEPLOY_FREEZE ?=
## 1: make lock moves every lock to the newest versions its input allows.
UPGRADE ?=
## CloudWatch Logs filter pattern for make logs, e.g. FILTER='{ $.status >= 500 }'.
FILTER ?=
## Time window of make logs: 15m, 1h, 2d.
SINCE ?=
## true: stack-deploy may apply a change set that replaces a database, bucket, repository or secret.
ALLOW_REPLACE ?=
## Commit whose image (past the scan gate) the bootstrap and migration tasks run; default: the live one.
BOOTSTRAP_SHA ?=
## GitHub environment whose jobs this prefix's deploy role trusts (production, staging, ...).
GITHUB_ENVIRONMENT ?= production
## make logs TASK=<task id>: print exactly that ECS task's log (failed bootstraps and migrations name it).
TASK ?=
## With TASK: the log stream prefix of that task (migrate, bootstrap, or the service's).
STREAM_PREFIX ?=
## true: make rotate-token refuses the old token at once too (someone who knew it left).
REVOKE_PREVIOUS ?=

# The scripts read their settings from the environment, never from their arguments.
export HOST PORT CONTAINER IMAGE PYTHON_IMAGE SHA AWS_REGION STACK_PREFIX BASE_STACK DATA_STACK
export SERVICE_STACK CI_STACK GITHUB_REPOSITORY GITHUB_ENVIRONMENT LOG_RETENTION_DAYS
export REVIEWERS IMAGE_ARCHIVE IMAGE_ID ALLOW_VULNERABLE DEPLOY_FREEZE UPGRADE SINCE
export ALLOW_REPLACE BOOTSTRAP_SHA TASK STREAM_PREFIX REVOKE_PREVIOUS

RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed
LOCK_TOOL := $(VENV)/lock/.installed
# Every venv installs from a lock file, and pip refuses any file whose hash the lock lacks.
PIP_INSTALL = pip install --quiet --disable-pip-version-check --require-hashes
# The recipes read SHA from the shell's environment ($${SHA}), never as $(SHA), so its text is
# never pasted into a shell line. Make still expands a command-line SHA=... before any check
# (a $(shell ...) in it runs), while a SHA taken from the environment reaches the scripts
# untouched: that is why the workflows set SHA with env: and run a bare `make release`.
require_sha = @[[ -n "$${SHA:-}" ]] || { echo "usage: make $@ SHA=<commit sha>  (7 to 40 hex characters)" >&2; exit 2; }

##@ General

.PHONY: help
help: ## Show this help: the targets, then the variables people set.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target> [VAR=value]\n"} /^[a-zA-Z_-]+:.*?##/ { printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)
	@awk '/^## / { text = substr($$0, 4); next } /^[A-Z][A-Z0-9_]* \?=/ { if (!shown++) printf "\n\033[1mVariables\033[0m (make <target> NAME=value; more per target in docs/reference/make.md)\n"; printf "  \033[36m%-19s\033[0m %s\n", $$1, text } { text = "" }' $(MAKEFILE_LIST)

##@ Development

$(RUNTIME): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/$(PIP_INSTALL) -r requirements.txt
	touch $@

$(DEV): $(RUNTIME) $(LOCK_TOOL) tests/requirements.txt tests/requirements-checkov.txt tests/requirements-cloudsplaining.txt
	$(VENV)/bin/$(PIP_INSTALL) -r tests/requirements.txt
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/$(PIP_INSTALL) -r tests/requirements-checkov.txt
	$(PYTHON) -m venv $(VENV)/cloudsplaining
	$(VENV)/cloudsplaining/bin/$(PIP_INSTALL) -r tests/requirements-cloudsplaining.txt
	touch $@

# uv in a venv of its own, so that `make lock` works even while another lock file is broken.
$(LOCK_TOOL): tests/requirements-lock.txt
	$(PYTHON) -m venv $(VENV)/lock
	$(VENV)/lock/bin/$(PIP_INSTALL) -r tests/requirements-lock.txt
	touch $@

.PHONY: run
run: $(RUNTIME) ## Serve the API on http://127.0.0.1:8080 (SQLite, or MySQL when MYSQL_HOST is set).
	exec $(VENV)/bin/python cars.py

.PHONY: migrate
migrate: $(RUNTIME) ## Apply pending schema migrations to the store the environment names (MYSQL_*, or SQLITE_PATH).
	$(VENV)/bin/python cars.py migrate

.PHONY: test
test: lint ## Run the linters and the whole test suite (what CI runs).
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The edit-test loop: ruff, then the tests that take seconds: the API on both stores, serving,
# faults, migrations, the templates and workflows, the release gate and the docs. Left out, for
# make test and CI: the drills and soak, logging under load, identities and TLS, rotation, the
# container, the fuzzer, the lock check (asks the package index), and the moto-driven
# walk-throughs of the AWS and GitHub targets. A new test file joins here once it is quick.
QUICK_TESTS := test_api test_idempotency test_schema_validator test_server test_faults \
  test_migrations test_templates test_data_stack test_workflows test_release_gate test_docs
.PHONY: check
check: $(DEV) ## The quick loop (under a minute): ruff, then the quick tests (no drills, soak, image, emulator).
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q $(QUICK_TESTS:%=tests/%.py) $(PYTEST_ARGS)

.PHONY: docs
docs: $(DEV) ## Regenerate the tables of docs/reference/ from the Makefile, scripts and templates.
	$(VENV)/bin/python scripts/docs_reference.py

.PHONY: lint
lint: $(DEV) ## Run every linter and scanner; each must report zero findings.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/shellcheck scripts/*.sh tests/compose/*.sh .ci/run
	$(VENV)/bin/hadolint Dockerfile tests/compose/mariadb.Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yaml
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.dependabot .github/dependabot.yml
	$(VENV)/bin/zizmor --offline .github/workflows
	$(VENV)/bin/cfn-lint --include-checks I -- cloudformation/*.yaml
	$(VENV)/checkov/bin/checkov --quiet --compact --skip-download --framework cloudformation --directory cloudformation
	$(VENV)/bin/python scripts/iam_scan.py $(VENV)/cloudsplaining/bin/cloudsplaining
	$(VENV)/bin/bandit --quiet --recursive cars.py scripts
	$(VENV)/bin/detect-secrets-hook $$(git ls-files)
	UV=$(VENV)/lock/bin/uv scripts/lock.sh --check

.PHONY: lock
lock: $(LOCK_TOOL) ## Resolve tests/requirements*.in into hashed lock files (UPGRADE=1: newest versions).
	UV=$(VENV)/lock/bin/uv scripts/lock.sh

.PHONY: fmt
fmt: $(DEV) ## Format the Python code and apply ruff's safe fixes.
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

.PHONY: bench
bench: $(DEV) ## Measure throughput, latency, CPU and memory against the Bottle + Waitress ceiling, Flask and FastAPI.
	$(VENV)/bin/python scripts/bench.py

.PHONY: drill
drill: $(DEV) ## Run the soak: minutes of mixed load, no errors, flat memory (the short drills run in make test).
	$(VENV)/bin/pytest -m drill $(PYTEST_ARGS)

.PHONY: clean
clean: ## Remove the virtualenv, caches, the build output and the local SQLite database.
	rm -rf $(VENV) dist .pytest_cache .ruff_cache cars.db cars.db-wal cars.db-shm

##@ Container

.PHONY: image
image: ## Build the image cars-api:<SHA> and its SBOM dist/sbom.cdx.json (SHA: the current commit).
	scripts/image.sh

.PHONY: image-test
image-test: ## Build the image, run it and check health, walk-through, non-root, fast stop, contents, SBOM.
	scripts/image-test.sh

.PHONY: image-save
image-save: ## Save the built image cars-api:<SHA> to dist/image.tar and its ID to dist/image.id (for the release job).
	scripts/image-save.sh

# podman-compose in a venv of its own, for Podman without `podman compose`, and for compose-test.
COMPOSE_TOOL := $(VENV)/compose/.installed
$(COMPOSE_TOOL): tests/requirements-compose.txt
	$(PYTHON) -m venv $(VENV)/compose
	$(VENV)/compose/bin/$(PIP_INSTALL) -r tests/requirements-compose.txt
	touch $@

.PHONY: compose-tool
compose-tool: $(COMPOSE_TOOL) ## Install podman-compose into .venv/compose (for Podman without `podman compose`).

.PHONY: up
up: ## Write .env with random secrets if there is none, start MySQL and the API, wait for /ready.
	scripts/compose.sh up

.PHONY: down
down: ## Stop the compose stack; the data volume is kept (make up serves the same cars).
	scripts/compose.sh down

.PHONY: compose-test
compose-test: $(DEV) $(COMPOSE_TOOL) ## Prove make up, the curl walk-through, make down, and the data kept (builds images).
	$(VENV)/bin/pytest -m compose -rA tests/test_compose.py $(PYTEST_ARGS)

##@ AWS (honours AWS_PROFILE, AWS_REGION and AWS_ENDPOINT_URL)

.PHONY: plan
plan: ## Show what stack-deploy (and a release of SHA, if given) would add, modify or replace; change nothing.
	PLAN=true scripts/stack-deploy.sh

.PHONY: stack-deploy
stack-deploy: ## Create or update the base, data (then CA bundle, bootstrap task) and CI access stacks.
	scripts/stack-deploy.sh

.PHONY: release
release: ## Build (or load IMAGE_ARCHIVE), push, pass the scan gate, deploy by digest and verify (SHA required).
	$(require_sha)
	DEPLOY_KIND=release scripts/release.sh

.PHONY: push
push: ## The first half of release: push cars-api:<SHA> and pass the scan gate, deploy nothing (SHA required).
	$(require_sha)
	DEPLOY_KIND=release RELEASE_STEP=push scripts/release.sh

.PHONY: deploy
deploy: ## Deploy an image already in ECR by digest after the scan gate and attestation check (SHA required).
	$(require_sha)
	DEPLOY_KIND=deploy scripts/deploy.sh

.PHONY: rollback
rollback: ## Redeploy an earlier image from ECR by digest and verify it (SHA required; ALLOW_VULNERABLE=true).
	$(require_sha)
	DEPLOY_KIND=rollback scripts/deploy.sh

.PHONY: history
history: ## List the images in ECR, newest first, with push time, digest, scan and which one is live.
	scripts/history.sh

.PHONY: status
status: ## Show the live image digest and commit, running/desired tasks, deployments, the URL and dashboard.
	scripts/status.sh

.PHONY: logs
# FILTER reaches the script as typed, through LOGS_FILTER ($(value) does not expand it), since
# make would read the $. of '{ $.status >= 500 }' as a variable of its own.
logs: export LOGS_FILTER = $(value FILTER)
logs: ## Print recent log events, those matching FILTER='{ $.status >= 500 }' in SINCE=1h, or TASK=<id>'s.
	FILTER="$${LOGS_FILTER}" scripts/logs.sh

.PHONY: dashboard
dashboard: ## Print (and at a terminal open) the URL of the service's CloudWatch dashboard.
	scripts/dashboard.sh

.PHONY: rotate-token
rotate-token: ## Replace the API token and roll the tasks; the old one stays valid until revoke-previous-token.
	scripts/rotate-token.sh

.PHONY: revoke-previous-token
revoke-previous-token: ## End the old API token's grace period (run once clients switched; at once if it leaked).
	TOKEN_ACTION=revoke-previous scripts/rotate-token.sh

.PHONY: stack-delete
stack-delete: ## Delete the stacks after confirmation; says what survives.
	scripts/stack-delete.sh

##@ GitHub (uses the gh CLI and its login)

.PHONY: github-setup
github-setup: ## Set the OIDC subject claim, the production environment and the ruleset protecting main (REVIEWERS).
	@[[ -n "$${REVIEWERS:-}" ]] || { echo "error: REVIEWERS is required" >&2; \
	  echo "usage: make github-setup REVIEWERS=<login>,team:<org>/<slug> [GITHUB_REPOSITORY=owner/name]" >&2; exit 2; }
	$(PYTHON) scripts/github_settings.py setup

.PHONY: github-check
github-check: ## Fail, one line per drift, when the GitHub settings the deploy role trusts differ.
	$(PYTHON) scripts/github_settings.py check
