# cars-api: the single entry point for running, testing, building and deploying.
# Run `make` for the list of targets; every variable below can be overridden (make run PORT=9090).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules --no-print-directory

PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8080
PYTEST_ARGS ?=
CONTAINER ?= docker
IMAGE ?= cars-api
PYTHON_IMAGE ?=
SHA ?=
AWS_REGION ?= eu-west-1
STACK_PREFIX ?= cars-api
BASE_STACK ?= $(STACK_PREFIX)-base
SERVICE_STACK ?= $(STACK_PREFIX)-service
GITHUB_REPOSITORY ?=

# The scripts read their settings from the environment, never from their arguments.
export HOST PORT CONTAINER IMAGE PYTHON_IMAGE SHA AWS_REGION BASE_STACK SERVICE_STACK GITHUB_REPOSITORY

RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed
# SHA comes through the environment so that nothing the caller typed is pasted into a shell line.
require_sha = @[[ -n "$${SHA:-}" ]] || { echo "usage: make $@ SHA=<commit sha>  (7 to 40 hex characters)" >&2; exit 2; }

##@ General

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target> [VAR=value]\n"} /^[a-zA-Z_-]+:.*?##/ { printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development

$(RUNTIME): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(DEV): $(RUNTIME) tests/requirements.txt tests/requirements-checkov.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet --disable-pip-version-check -r tests/requirements-checkov.txt
	touch $@

.PHONY: run
run: $(RUNTIME) ## Serve the API on http://127.0.0.1:8080 (SQLite, or MySQL when MYSQL_HOST is set).
	exec $(VENV)/bin/python cars.py

.PHONY: test
test: lint ## Run the linters and the whole test suite (what CI runs).
	$(VENV)/bin/pytest $(PYTEST_ARGS)

.PHONY: lint
lint: $(DEV) ## Run every linter and scanner; each must report zero findings.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/shellcheck scripts/*.sh .ci/run
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yaml
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(VENV)/bin/zizmor --offline .github/workflows
	$(VENV)/bin/cfn-lint --include-checks I -- cloudformation/*.yaml
	$(VENV)/checkov/bin/checkov --quiet --compact --skip-download --framework cloudformation --directory cloudformation
	$(VENV)/bin/bandit --quiet --recursive cars.py scripts
	$(VENV)/bin/detect-secrets-hook $$(git ls-files)

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
clean: ## Remove the virtualenv, caches and the local SQLite database.
	rm -rf $(VENV) .pytest_cache .ruff_cache cars.db cars.db-wal cars.db-shm

##@ Container

.PHONY: image
image: ## Build the image cars-api:<SHA> (SHA defaults to the current commit; CONTAINER=podman works too).
	scripts/image.sh

.PHONY: image-test
image-test: ## Build the image, run it and check health, the walk-through, non-root, fast stop and contents.
	scripts/image-test.sh

.PHONY: up
up: ## Start MySQL and the API with docker compose on http://127.0.0.1:8080.
	$(CONTAINER) compose up --build --detach --wait

.PHONY: down
down: ## Stop the compose services (the database volume is kept).
	$(CONTAINER) compose down

##@ AWS (honours AWS_PROFILE, AWS_REGION and AWS_ENDPOINT_URL)

.PHONY: stack-deploy
stack-deploy: ## Create or update the long-lived stacks; prints the repository URI and service URL.
	scripts/stack-deploy.sh

.PHONY: release
release: ## Build and push cars-api:<SHA>, deploy it and verify what serves (SHA required).
	$(require_sha)
	scripts/release.sh

.PHONY: deploy
deploy: ## Deploy and verify an image already in ECR (SHA required).
	$(require_sha)
	scripts/deploy.sh

.PHONY: rollback
rollback: ## Redeploy an earlier image from ECR, without rebuilding, and verify it (SHA required).
	$(require_sha)
	scripts/deploy.sh

.PHONY: history
history: ## List the images in ECR, newest first, with push time and which one is live.
	scripts/history.sh

.PHONY: status
status: ## Show the live image, running/desired tasks, recent deployments and the URL.
	scripts/status.sh

.PHONY: logs
logs: ## Print recent log events of the service.
	scripts/logs.sh

.PHONY: stack-delete
stack-delete: ## Delete the stacks after confirmation; says what survives.
	scripts/stack-delete.sh
