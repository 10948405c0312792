# mgpu: set-up and checks. `make demo` and `make test` each install what they need on a fresh Debian
# machine: the .venv with the Python dependencies (torch pinned by constraints.txt) and, through
# apt-get when missing, jq (demo) plus bats, bats-support, bats-assert, shellcheck and a Slurm to test
# against (slurmctld, slurmd, slurm-client, munge: tests/slurm/cluster.sh runs a one-node cluster).
SHELL := bash
.SHELLFLAGS := -Eeuo pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
BOOTSTRAP_PYTHON ?= python3
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.mgpu-deps
# Every shell file: entry scripts, lib/, tests (bats and fakes), tools, bench, CI.
SHELL_FILES = $(shell find . \( -path ./.venv -o -path ./.git \) -prune -o -type f \
	\( -name '*.sh' -o -name '*.bash' -o -name '*.bats' -o -name '*.sbatch' \) -print | sort) \
	tests/fakes/nvidia-smi .ci/run

.PHONY: help demo test lint test-bats test-py deps deps-demo deps-test clean

help:
	@echo "make demo   set up, then show mgpu on a rehearsal server (no GPU needed)"
	@echo "            (DEMO_TRAIN_ARGS=\"--max-steps 20\": extra trainer arguments, a shorter training)"
	@echo "make test   set up, then shellcheck + bats + pytest"
	@echo "make clean  remove .venv and test leftovers"

# mgpu itself is installed editable (`pip install -e .`): after `source .venv/bin/activate`,
# `python -m mgpu.train_clip` and the console scripts (mgpu-check-gpus, ...) work from any folder, and
# edits under py/ take effect without reinstalling.
$(STAMP): pyproject.toml requirements.txt requirements-dev.txt constraints.txt
	@echo "[INFO] creating $(VENV) with the Python dependencies (torch pinned by constraints.txt) and mgpu (editable)"
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements-dev.txt -e . \
		2> >(grep -v "is neither a file nor a directory" >&2)
	touch $@

deps: $(STAMP)

deps-demo: deps
	@bash tools/ensure-tools.sh jq

deps-test: deps
	@bash tools/ensure-tools.sh jq bats bats-support bats-assert shellcheck slurmctld slurmd slurm-client munge

# DEMO_TRAIN_ARGS: extra arguments for the demo's training runs, e.g. "--max-steps 20" (words split at spaces).
DEMO_TRAIN_ARGS ?=
demo: deps-demo
	@bash tools/demo.sh "$(PYTHON)" $(DEMO_TRAIN_ARGS)

# All three suites run; the target fails if any of them failed. pytest runs beside bats (most bats tests
# wait on processes, most pytest tests compute): its output follows bats'.
test: deps-test
	@status=0; pylog=$$(mktemp); \
	$(MAKE) --no-print-directory lint || status=1; \
	$(MAKE) --no-print-directory test-py >"$$pylog" 2>&1 & py=$$!; \
	$(MAKE) --no-print-directory test-bats || status=1; \
	wait $$py || status=1; \
	cat "$$pylog"; rm -f "$$pylog"; \
	exit $$status

lint:
	@echo "== shellcheck: $(words $(SHELL_FILES)) files"
	shellcheck -x $(SHELL_FILES)

# Two groups of test files side by side (tools/test-bats.sh says which); a group's output when it ends.
test-bats:
	PYTHON="$(abspath $(PYTHON))" bash tools/test-bats.sh

# pytest in PYTEST_WORKERS processes (pytest-xdist): the number of cores, at most 4 (each imports torch).
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$((n < 4 ? n : 4)))
test-py:
	@echo "== pytest ($(PYTEST_WORKERS) workers)"
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) --durations=15

clean:
	rm -rf $(VENV) .pytest_cache py/mgpu.egg-info
