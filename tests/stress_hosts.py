"""make stress-hosts: each multi-host test that can hang, N times in a row, one pytest process per run (no
retries, no longer bounds): the failure count per test, and every failed run's output (its thread dumps when it
hung) under out/stress-hosts/. Not in CI.

    python tests/stress_hosts.py N N_KNOWN [STACK ...]

N runs of every test in tests/test_hosts.py and of test_compat's two-host test on each STACK (an overlay in
.stacks/); N_KNOWN runs of the two that hung in CI (issue 41: the kill inside a forward, and serving on two hosts
on 0.1.0rc0); N=0: those two alone. A test's runs stop early once it hung twice (a finding; the rest would only repeat it)."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "out", "stress-hosts")
KILL_IN_FORWARD = "tests/test_hosts.py::test_a_rank_killed_ends_the_other_within_20_s[1-slow_forward-rank 1: " \
                  "engine_ready_dummy-2.0-generate_before_swap]"
SERVING_COMPAT = "tests/test_compat.py::test_two_hosts_while_serving"
KNOWN = {(KILL_IN_FORWARD, None), (SERVING_COMPAT, "0.1.0rc0")}
HOSTS_TIMEOUT_S = "240"  # a run's bound (tests/test_hosts.py HOSTS_TIMEOUT): 4x the longest passing run


CACHE = tempfile.mkdtemp(prefix="param_swap_stress_jax_cache_")  # JAX's compilation cache, shared by every run


def host_tests() -> list[str]:
    listed = subprocess.run([sys.executable, "-m", "pytest", "-m", "hosts", "--collect-only", "-q",
                             "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    return [line for line in listed.stdout.splitlines() if line.startswith("tests/test_hosts.py::")]


def run_once(test: str, stack: str | None, log: str) -> tuple[str, float]:
    # this checkout's package first (a mutated run's own import would find the editable install's), then the stack
    path = [ROOT] + ([os.path.join(ROOT, ".stacks", stack)] if stack else [])
    env = {**os.environ, "PARAM_SWAP_HOSTS_TIMEOUT": HOSTS_TIMEOUT_S, "PYTHONPATH": os.pathsep.join(path),
           "PARAM_SWAP_TEST_JAX_CACHE": CACHE}  # warm after the first run, as in a CI session
    if stack:
        env["PARAM_SWAP_STACK"] = stack
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", test],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    took = time.monotonic() - start
    if run.returncode == 0:
        return "passed", took
    with open(log, "w") as f:
        f.write(run.stdout + run.stderr)
    return ("hung" if re.search(r"\(a hang\)", run.stdout) else "failed"), took


def main() -> int:
    n, n_known, stacks = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    os.makedirs(OUT, exist_ok=True)
    plan = [(t, None) for t in host_tests()] + [(SERVING_COMPAT, s) for s in stacks]
    assert {t for t, _ in KNOWN if "test_hosts" in t} <= {t for t, _ in plan}, "a known test's id changed"
    plan.sort(key=lambda ts: ts not in KNOWN)  # the known hangs first
    bad = 0
    for test, stack in plan:
        runs = n_known if (test, stack) in KNOWN else n
        if not runs:
            continue
        counts = {"passed": 0, "failed": 0, "hung": 0}
        times = []
        name = test.split("::", 1)[1] + (f" on {stack}" if stack else "")
        for i in range(runs):
            log = os.path.join(OUT, re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:150] + f"-{i + 1}.log")
            verdict, took = run_once(test, stack, log)
            counts[verdict] += 1
            times.append(took)
            print(f"  {name} run {i + 1}/{runs}: {verdict} in {took:.0f} s" + ("" if verdict == "passed" else f" ({log})"),
                  flush=True)
            if counts["hung"] >= 2:
                break
        done = sum(counts.values())
        bad += done - counts["passed"]
        print(f"{name}: {counts['failed']} failed, {counts['hung']} hung in {done} runs "
              f"({min(times):.0f}-{max(times):.0f} s each)", flush=True)
    print(f"stress-hosts: {bad} bad run(s)")
    shutil.rmtree(CACHE, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
