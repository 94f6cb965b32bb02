#!/usr/bin/env bash
# Every TPU requirements file resolves for a TPU VM (Linux x86_64, CPython 3.12, as this machine's .venv):
# pip install --dry-run --ignore-installed, so that what .venv holds plays no part.
# The two-step stacks (bd09a87, 0.1.0rc0-jax0.11) also resolve their sglang-jax with --no-deps: bd09a87 from the
# vendored source in place of its git URL (this machine cannot reach GitHub). Usage: check_requirements.sh PYTHON
set -euo pipefail
py=${1:-python3}
cd "$(dirname "$0")/.."
"$py" -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 12) and platform.machine() == "x86_64"))' \
  || { echo "needs CPython 3.12 on x86_64 (a TPU VM's), got $("$py" -V) on $(uname -m)" >&2; exit 1; }
report=$(mktemp)
trap 'rm -f "$report"' EXIT
check() {  # name, pip arguments...
  local name=$1; shift
  local start=$SECONDS
  if out=$("$py" -m pip install --dry-run --ignore-installed --quiet --report "$report" "$@" 2>&1); then
    echo "ok   $name: $("$py" -c 'import json, sys; d = json.load(open(sys.argv[1])); print(len(d["install"]), "packages,", ", ".join(sorted(i["metadata"]["name"] + " " + i["metadata"]["version"] for i in d["install"] if i["metadata"]["name"].lower() in ("sglang-jax", "jax", "jaxlib", "libtpu", "flax", "qwix"))))' "$report") ($(( SECONDS - start )) s)"
  else
    echo "FAIL $name"; printf '%s\n' "$out" | grep -v "^WARNING: Location" | tail -15; return 1
  fi
}
check requirements-tpu.txt -r requirements-tpu.txt
check requirements-tpu-0.1.0rc0.txt -r requirements-tpu-0.1.0rc0.txt
check requirements-tpu-0.1.0rc0-jax0.11.txt -r requirements-tpu-0.1.0rc0-jax0.11.txt
check "  + sglang-jax==0.1.0rc0 --no-deps" --no-deps sglang-jax==0.1.0rc0
check requirements-tpu-bd09a87.txt -r requirements-tpu-bd09a87.txt
check "  + sglang-jax bd09a87 (vendored) --no-deps" --no-deps stacks/vendor/sglang-jax-bd09a87-python.tar.gz
