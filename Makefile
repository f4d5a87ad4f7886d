# The README's two commands: `make demo` and `make test`. Both install what they need on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test unit integration e2e seeded fuzz lint deps system-deps control-plane argo bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

deps: $(STAMP)

# PostgreSQL (server binaries) and bubblewrap (the process kubelet's termination-message mounts), from Debian.
system-deps:
	@hack/install-system-deps.sh

control-plane: system-deps
	@hack/cluster/build.sh >/dev/null

# Argo Workflows' workflow-controller and argoexec, for the Argo e2e tests (cached like the control plane).
argo:
	@hack/cluster/build-argo.sh >/dev/null

lint: deps
	$(VENV)/bin/ruff check $(wildcard operator tests hack bench)
	$(VENV)/bin/ruff format --check $(wildcard operator tests hack bench)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: deps
	$(VENV)/bin/pytest tests/unit -q

integration: deps system-deps
	$(VENV)/bin/pytest tests/integration -q

e2e: deps control-plane argo
	$(VENV)/bin/pytest tests/e2e -q

# What could depend on string hashing order (set and dict iteration) runs under several PYTHONHASHSEED values:
# the JSON patch sent to the API server, the key and its property tests, the hit and miss patches.
HASH_SEEDS ?= 0 1 2 3 4 5 6 7
SEEDED_TESTS := tests/unit/test_patches.py tests/unit/test_key_properties.py tests/unit/test_keys.py \
	tests/unit/test_mutation.py tests/integration/test_admission_json_patch.py

seeded: deps system-deps
	@for seed in $(HASH_SEEDS); do \
		echo "PYTHONHASHSEED=$$seed"; \
		PYTHONHASHSEED=$$seed $(VENV)/bin/pytest $(SEEDED_TESTS) -q -p no:cacheprovider || exit 1; \
	done

# The fuzz tests run in `make test` with 10,000 examples in all, derandomized; this runs them with FUZZ_EXAMPLES
# (a million by default), random, so each run explores further. docs/development.md, "Fuzzing".
FUZZ_EXAMPLES ?= 1000000
FUZZ_TESTS := tests/integration/test_fuzz_admission.py tests/integration/test_fuzz_webhook.py tests/unit/test_fuzz_cli.py

fuzz: deps system-deps
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest $(FUZZ_TESTS) -q -p no:cacheprovider --timeout=0 \
		--hypothesis-show-statistics

test: deps control-plane argo lint seeded
	$(VENV)/bin/pytest tests -q -p no:cacheprovider

# `make demo DEMO=argo`: the same story with an Argo Workflow (builds Argo on first use).
demo: deps control-plane $(if $(filter argo,$(DEMO)),argo)
	$(PY) -m hack.demo $(if $(filter argo,$(DEMO)),--argo) $(DEMO_ARGS)

bench: deps control-plane
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
