# The README's two commands: `make run` (the service) and `make test` (lint, types, tests).
# Both create .venv and install the project first; re-running is fast when nothing changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.embedserve-installed
ARGS ?=

.PHONY: setup run test lint format embed-sample proto buf buf-release clean fuzz gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,ray]'
	@touch $(STAMP)

run: setup
	$(BIN)/embedserve serve $(ARGS)

lint: setup buf
	$(BIN)/ruff check service kernels bench tests
	$(BIN)/ruff format --check service kernels bench tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest $(ARGS)

format: setup
	$(BIN)/ruff check --fix service kernels bench tests
	$(BIN)/ruff format service kernels bench tests

proto: setup
	$(BIN)/python -m service.wire.protos

# buf (pinned; npm's @bufbuild/buf brings the binary) into .tools/ when missing: `buf lint` (STANDARD, buf.yaml)
# and `buf breaking` of protos/ against the released API, an image checked in as $(BUF_BASELINE).
# Rolling the baseline at a release: `make buf-release` (rebuilds it from protos/) and commit it with the release
# tag; from then on every change is checked against that release. Never roll it to get a breaking change past CI:
# a breaking change is a new package (embedserve.v2).
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
BUF_STAMP := .tools/.buf-$(BUF_VERSION)
BUF_BASELINE := protos/released/embedserve-v1.binpb

$(BUF_STAMP):
	npm install --prefix .tools --no-audit --no-fund --loglevel=error @bufbuild/buf@$(BUF_VERSION)
	@$(BUF) --version
	@touch $@

buf: $(BUF_STAMP)
	$(BUF) lint
	$(BUF) breaking protos --against $(BUF_BASELINE)

buf-release: $(BUF_STAMP)
	$(BUF) lint
	$(BUF) build --exclude-source-info -o $(BUF_BASELINE)

# Long mutation fuzzing of decode (the harness of tests/unit/embedding/test_decode_fuzz.py): make fuzz SECONDS=1800
SECONDS ?= 1800
fuzz: setup
	$(BIN)/python -m tests.unit.embedding.fuzz_decode --seconds $(SECONDS)

# The GPU check on a CUDA machine (results.json + log in OUT after every section): make gpu-check OUT=var/gpu-check
OUT ?= var/gpu-check
gpu-check: setup
	$(BIN)/embedserve bench gpu --out $(OUT)

embed-sample: setup
	$(BIN)/embedserve embed tests/data/oct-sample --out var/oct-sample.parquet

clean:
	rm -rf $(VENV) .tools .mypy_cache .pytest_cache .ruff_cache
