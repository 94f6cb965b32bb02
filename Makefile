# make demo: tiny random Qwen2 on 4 virtual CPU devices, the whole verification.
# make test: ruff and the test suite on the pinned stack (CPU, virtual devices; builds its own checkpoints; 2 workers),
#   but the several-hosts tests, which make test-hosts runs (2 processes x 2 virtual devices on 127.0.0.1),
#   and the documented serving demo, which make test-long runs (about 8 minutes).
# make test-compat: the tool on every other supported sglang-jax stack (and the refusal of the unsupported one).
# make stress: the documented serving command, 5 runs in a row on each supported stack.
# make stress-hosts: every several-hosts test 5 times in a row, the two that hung in CI 20 times (not in CI).
# make test-fast: ruff, the engine-free tests and one end-to-end run (a few minutes): the edit-test loop.
# All create .venv with Python >= 3.12 and install the project into it first when needed (editable, with the
# extras cpu, torch, test, plot, wandb: requirements-{cpu,torch,test,plot,wandb}.txt); the other stacks
# are small overlays (stacks/*.txt, installed --no-deps into .stacks/NAME) put in front of .venv on PYTHONPATH.

VENV := .venv
PY := $(VENV)/bin/python
REQ := pyproject.toml requirements-cpu.txt requirements-torch.txt requirements-test.txt requirements-plot.txt requirements-wandb.txt
EXTRAS := cpu,torch,test,plot,wandb
STAMP := $(VENV)/.installed
STACKS_DIR := .stacks
COMPAT_STACKS := bd09a87 0.1.0rc0 0.1.0rc0-jax0.11 registry-0.0.2
STRESS_STACKS := 0.0.3rc99 bd09a87 0.1.0rc0 0.1.0rc0-jax0.11
STRESS_RUNS := 5
TEST_WORKERS := 2

.PHONY: setup demo test test-hosts test-long test-fast test-compat stacks stress stress-hosts lint bench pyz check-requirements check-install device-kit device-rehearsal clean

setup: $(STAMP)

$(STAMP): $(REQ)
	@test -x $(PY) || { \
	  py=""; \
	  for c in python3.13 python3.12 "$$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3" $$(ls -d "$$(pyenv root 2>/dev/null)"/versions/3.1[2-9]*/bin/python3 2>/dev/null) python3; do \
	    if command -v "$$c" >/dev/null 2>&1 && "$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then py="$$c"; break; fi; \
	  done; \
	  test -n "$$py" || { echo "need Python >= 3.12 (sglang-jax requires it)" >&2; exit 1; }; \
	  echo "creating $(VENV) with $$py"; "$$py" -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) run_param_swap.py --demo

# two pytest-xdist workers, each test to whichever is free (worksteal); TEST_WORKERS=0: one process, in file order
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not hosts and not long"

test-hosts: $(STAMP)
	$(PY) -m pytest -m hosts

test-long: $(STAMP)
	$(PY) -m pytest -m long

test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not engine or fast"

# one overlay per stack, built once (rebuilt when its stacks/NAME.txt changes); `make clean` removes them
$(STACKS_DIR)/%/.installed: stacks/%.txt $(STAMP)
	rm -rf $(STACKS_DIR)/$*
	$(PY) -m pip install --quiet --no-deps --target $(STACKS_DIR)/$* -r stacks/$*.txt
	@du -sh $(STACKS_DIR)/$* | sed 's/^/overlay: /'
	touch $@

stacks: $(COMPAT_STACKS:%=$(STACKS_DIR)/%/.installed)

test-compat: $(STAMP) stacks
	@failed=""; for s in $(COMPAT_STACKS); do \
	  echo "=== stack $$s"; start=$$(date +%s); \
	  PARAM_SWAP_STACK=$$s PYTHONPATH=$(CURDIR)/$(STACKS_DIR)/$$s $(PY) -m pytest -q -p no:cacheprovider tests/test_compat.py \
	    || failed="$$failed $$s"; \
	  echo "=== stack $$s: $$(( $$(date +%s) - start )) s"; \
	done; \
	if [ -n "$$failed" ]; then echo "test-compat failed on:$$failed"; exit 1; fi

# `--demo --rounds 4 --serve-load 8` (oracles on, default tolerance) STRESS_RUNS times in a row on each stack
stress: $(STAMP) stacks
	@set -e; mkdir -p out/stress; for s in $(STRESS_STACKS); do \
	  path=$$( [ $$s = 0.0.3rc99 ] || echo $(CURDIR)/$(STACKS_DIR)/$$s ); \
	  for i in $$(seq 1 $(STRESS_RUNS)); do \
	    start=$$(date +%s); \
	    log=out/stress/$$s-$$i; \
	    PYTHONPATH=$$path $(PY) run_param_swap.py --demo --rounds 4 --serve-load 8 > $$log.jsonl 2> $$log.err \
	      && code=0 || code=$$?; \
	    echo "stack $$s run $$i: exit $$code in $$(( $$(date +%s) - start )) s"; \
	    if [ $$code != 0 ]; then tail -2 $$log.jsonl | cut -c1-2000; exit 1; fi; \
	  done; \
	done

# every several-hosts test HOSTS_RUNS times in a row (test_compat's on each other stack too), the two that hung in
# CI HOSTS_KNOWN_RUNS times: the failure and hang count per test (tests/stress_hosts.py; logs in out/stress-hosts)
HOSTS_RUNS ?= 5
HOSTS_KNOWN_RUNS ?= 20
stress-hosts: $(STAMP) stacks
	$(PY) tests/stress_hosts.py $(HOSTS_RUNS) $(HOSTS_KNOWN_RUNS) bd09a87 0.1.0rc0 0.1.0rc0-jax0.11

bench: $(STAMP)
	$(PY) -m pip install --quiet --no-deps -r requirements-bench.txt
	$(PY) bench/bench_swap.py
	$(PY) bench/rl_cycle.py

# dist/run_param_swap.pyz: the entry and its package in one file (python -m zipapp; its __main__ is
# param_swap/__main__.py), to copy to a TPU VM and run with that environment's Python from any folder
pyz: dist/run_param_swap.pyz

dist/run_param_swap.pyz: run_param_swap.py $(wildcard param_swap/*.py)
	rm -rf .pyz && mkdir -p .pyz dist
	cp run_param_swap.py .pyz/ && mkdir .pyz/param_swap && cp param_swap/*.py .pyz/param_swap/
	cp param_swap/__main__.py .pyz/__main__.py
	python3 -m zipapp .pyz --output $@ --python "/usr/bin/env python3" --compress
	rm -rf .pyz
	@echo "$@: $$(du -k $@ | cut -f1) KB"

# every requirements-tpu*.txt resolves (pip --dry-run, Linux x86_64, Python 3.12: the TPU VM's)
check-requirements: $(STAMP)
	bash stacks/check_requirements.sh $(PY)

# a fresh venv outside the repo: pip install ".[cpu]", run-param-swap --demo and the API's import from another
# folder (about 5 minutes, not in CI)
check-install: $(STAMP)
	bash stacks/check_install.sh "$$($(PY) -c 'import sys; print(sys._base_executable)')"

# the lent GPU machine's run (bench/device/run.sh, docs/benchmarks.md "The device run"): its wheels, and the
# same runner here on CPU with the image's versions and a 2-layer checkpoint (a few minutes)
device-kit: $(STAMP)
	bash bench/device/kit.sh $(PY)

device-rehearsal: $(STAMP) device-kit $(STACKS_DIR)/device-image/.installed
	DEVICE=cpu TP=4 LAYERS=2 PYTHON=$(PY) IMAGE=$(STACKS_DIR)/device-image OUT=out/device-rehearsal \
	  BUDGET_S=1800 STEP_S=900 bash bench/device/run.sh

clean:
	rm -rf $(VENV) $(STACKS_DIR) .whl .pytest_cache dist .pyz
