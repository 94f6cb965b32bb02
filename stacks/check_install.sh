#!/usr/bin/env bash
# make check-install: what a new user does, in a fresh venv outside the repo (about 5 minutes, 8.5 GB while it
# runs, removed after): pip install ".[cpu]", then the console script's demo and the API's import from another
# folder. Not in CI (the suite installs the same project editable: tests/test_package.py checks the wheel).
set -euo pipefail
python="$1"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/param_swap_install_XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
start=$(date +%s)
"$work/venv/bin/python" -m pip install --quiet "$repo[cpu]"
echo "pip install \"$repo[cpu]\": $(( $(date +%s) - start )) s"
mkdir "$work/elsewhere" && cd "$work/elsewhere"
"$work/venv/bin/python" -c "import run_param_swap; print('API:', run_param_swap.__file__, run_param_swap.ParamSwapper)"
start=$(date +%s)
"$work/venv/bin/run-param-swap" --demo > demo.jsonl
echo "run-param-swap --demo: exit 0 in $(( $(date +%s) - start )) s; $(tail -1 demo.jsonl | cut -c1-120)"
