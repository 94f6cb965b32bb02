# make demo: tiny random Qwen2 on 4 virtual CPU devices, the whole verification.
# make test: the test suite (CPU, virtual devices; builds its own checkpoints).
# Both create .venv with Python >= 3.12 and install requirements-cpu.txt first when needed.

VENV := .venv
PY := $(VENV)/bin/python
REQ := requirements-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

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
	$(PY) -m pip install --quiet -r $(REQ)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) run_param_swap.py --demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pip install --quiet --no-deps -r requirements-bench.txt
	$(PY) bench/bench_swap.py

clean:
	rm -rf $(VENV) .pytest_cache
