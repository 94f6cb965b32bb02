"""Shared fixtures: tiny Qwen2 checkpoints built on the spot, and runners for the tool and for sglang-jax's
own loader, each in its own process (sglang-jax kills its whole process on a scheduler error)."""

import atexit
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from param_swap import demo  # noqa: E402

TOOL = os.path.join(ROOT, "run_param_swap.py")
REFERENCE = os.path.join(ROOT, "tests", "reference_generate.py")
MUTATED = os.path.join(ROOT, "tests", "mutated_run.py")
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "run-param-swap")  # the installed entry point
PROMPT = "The quick brown fox"
MAX_NEW = 12
ENGINE_TIMEOUT = 600


# JAX's persistent compilation cache, shared by every process this test session starts: the same tiny models
# compile the same programs in most runs (measured: a tool run 25.9 s -> 17.6 s). Fresh per session; made by the
# first process that loads this file (pytest-xdist's controller, before it starts its workers, which inherit it).
COMPILE_CACHE = os.environ.get("PARAM_SWAP_TEST_JAX_CACHE", "")
if not COMPILE_CACHE:
    COMPILE_CACHE = os.environ["PARAM_SWAP_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="param_swap_jax_cache_")
    atexit.register(shutil.rmtree, COMPILE_CACHE, ignore_errors=True)


def clean_env(compile_cache: bool = True) -> dict:
    """The environment of a tool process: no inherited JAX platform or XLA flags (the tool sets them);
    the session's compilation cache unless a test times phases (test_signals)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS") and not k.startswith(
        "JAX_COMPILATION_CACHE")}
    env["PYTHONUNBUFFERED"] = "1"
    if compile_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return env


def refuse_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def strict_json(line: str):
    """json.loads that refuses NaN, Infinity and -Infinity (json.dumps writes them; strict parsers refuse)."""
    return json.loads(line, parse_constant=refuse_constant)


@dataclasses.dataclass
class ToolRun:
    returncode: int
    records: list
    stdout: str
    stderr: str

    def phase(self, name: str) -> dict:
        found = [r for r in self.records if r["phase"] == name]
        assert found, f"no {name!r} phase in {[r['phase'] for r in self.records]}\n{self.stderr[-3000:]}"
        return found[0]

    def phases(self) -> list[str]:
        return [r["phase"] for r in self.records]

    @property
    def summary(self) -> dict:
        return self.phase("summary")


PY_SPY = os.path.join(os.path.dirname(sys.executable), "py-spy")  # requirements-test.txt


def process_tree(pid: int) -> list[int]:
    """pid and every process below it (an engine's children)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return tree


def dump_threads(pid: int) -> str:
    """Every thread's stack (Python and native) of a process that outlived its bound, and of its children: where
    it waits, for the failure message (py-spy reads the live process; nothing in it runs)."""
    dumps = []
    for p in process_tree(pid):
        try:
            out = subprocess.run([PY_SPY, "dump", "--native", "--pid", str(p)], capture_output=True, text=True,
                                 timeout=60)
            dumps.append(f"--- threads of pid {p}:\n{out.stdout}{out.stderr}")
        except (OSError, subprocess.TimeoutExpired) as e:
            dumps.append(f"--- pid {p}: no dump ({type(e).__name__}: {e})")
    return "\n".join(dumps)


def run_tool(*args: str, script: str = TOOL, env: dict | None = None, timeout: int = ENGINE_TIMEOUT,
             cwd: str = ROOT) -> ToolRun:
    """`python SCRIPT ARGS` (or the console script itself, script=CONSOLE_SCRIPT), its JSON lines parsed."""
    command = [script] if script == CONSOLE_SCRIPT else [sys.executable, script]
    with subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env or clean_env(), cwd=cwd) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            dump = dump_threads(proc.pid)
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"the tool outlived its {timeout} s: {args}\n{dump}\n--- stderr:\n{stderr[-5000:]}")
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    records = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line:
            records.append(strict_json(line))  # stdout carries only JSON lines
    return ToolRun(proc.returncode, records, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(tied=..., num_kv_heads=..., dtype=..., num_shards=...) -> folder, built once per variant."""
    built: dict = {}

    def make(**kw) -> str:
        key = tuple(sorted(kw.items()))
        if key not in built:
            folder = tmp_path_factory.mktemp("ckpt")
            built[key] = demo.write_demo_checkpoint(str(folder), **kw)
        return built[key]

    return make


_reference_cache: dict = {}


def reference_output_ids(model: str, tp: int, prompt: str = PROMPT, max_new: int = MAX_NEW) -> list[int]:
    """Greedy output_ids of an Engine that loads `model` with sglang-jax's own loader."""
    key = (model, tp, prompt, max_new)
    if key not in _reference_cache:
        proc = subprocess.run([sys.executable, REFERENCE, "--model-id", model, "--device", "cpu", "--tp-size", str(tp),
                               "--prompt", prompt, "--max-new-tokens", str(max_new)],
                              capture_output=True, text=True, env=clean_env(), timeout=ENGINE_TIMEOUT, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _reference_cache[key] = json.loads(proc.stdout.strip().splitlines()[-1])["output_ids"]
    return _reference_cache[key]


# --- every check the tool prints is proven to fail by a planted defect ---------------------------------------
# docs/phases.md's table "check | planted defect | test" names, for each check, the tests that plant its defect
# (tests/mutated_run.py). Those tests assert the failure with assert_checks_failed, which records it; at the end
# of the session every check whose listed tests ran must have been seen failing (else the session fails), and
# the count is printed. tests/test_checks.py holds the table against the tool's own checks.
PHASES_DOC = os.path.join(ROOT, "docs", "phases.md")
SEEN_FAILING: dict[str, set[str]] = {}  # check -> the tests that saw it fail in this session
PASSED: set[str] = set()  # test functions (file.py::name, parameters left out) with a passing call
PARTLY_RUN: set[str] = set()  # test functions of which some parameters were deselected (-k, -m)


def planted_table(path: str = PHASES_DOC, column: str = "tests") -> dict[str, list[str]]:
    """docs/phases.md's table of planted defects, one column: {check: ["test_file.py::test_name", ...]}
    ("tests"), or {check: [mutation, ...]} ("defects": the backquoted names of tests/mutated_run.py's)."""
    import re

    text = open(path).read()
    start = text.index("| check | planted defect | test |")
    pattern, index = {"tests": (r"(test_\w+\.py::test_\w+)", 2), "defects": (r"`(\w+)`", 1)}[column]
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = re.findall(pattern, cells[index])
    return rows


def test_name(nodeid: str) -> str:
    """A test's node id as file.py::name (its parameters left out)."""
    return os.path.basename(nodeid.split("::")[0]) + "::" + nodeid.split("::")[-1].split("[")[0]


def current_test() -> str:
    return test_name(os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0])


def assert_checks_failed(checks: dict | list, *names: str, exactly: bool = True) -> None:
    """`names` failed (exactly: and no other check did). `checks`: summary.checks, or a rank's failed_checks
    (summary.hosts). Recorded for the session's count of checks proven to fail."""
    failed = set(checks) if isinstance(checks, list) else {k for k, v in checks.items() if not v["ok"]}
    if exactly:
        assert failed == set(names), (sorted(failed), names)
    else:
        assert set(names) <= failed, (sorted(failed), names)
    for name in names:
        SEEN_FAILING.setdefault(name, set()).add(current_test())


def pytest_deselected(items):
    PARTLY_RUN.update(test_name(item.nodeid) for item in items)


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        PASSED.add(test_name(report.nodeid))


PROOF: list[str] = []
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # make test runs the suite on 2 pytest-xdist workers


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """The controller: a worker's record (pytest_sessionfinish below), merged before the controller's own. The
    passed tests need no record: the controller's pytest_runtest_logreport sees every worker's reports."""
    record = getattr(node, "workeroutput", {}).get("planted_checks")
    if record:
        for check, tests in record["seen_failing"].items():
            SEEN_FAILING.setdefault(check, set()).update(tests)
        PARTLY_RUN.update(record["partly_run"])


def pytest_sessionfinish(session, exitstatus):
    """Every check whose planted-defect tests passed in this session must have been seen failing by one of them.
    A pytest-xdist worker hands its record to the controller, which counts for the whole session."""
    if WORKER:
        session.config.workeroutput["planted_checks"] = {
            "seen_failing": {k: sorted(v) for k, v in SEEN_FAILING.items()}, "partly_run": sorted(PARTLY_RUN)}
        return
    table = planted_table()
    ran = {check: [t for t in tests if t in PASSED and t not in PARTLY_RUN] for check, tests in table.items()}
    proven = {check for check, tests in table.items() if SEEN_FAILING.get(check, set()) & set(tests)}
    unseen = sorted(check for check in table if ran[check] and check not in proven)
    not_run = sorted(check for check in table if not ran[check])
    if any(ran.values()):
        PROOF.append(f"checks proven to fail by a planted defect in this session: {len(proven)} of {len(table)}"
                     + (f" (not run here: {', '.join(not_run)})" if not_run else ""))
    if unseen:
        PROOF.append(f"FAILED: the tests docs/phases.md lists for {', '.join(unseen)} passed without seeing the "
                     "check fail (assert_checks_failed)")
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    for line in PROOF:
        terminalreporter.write_line(line)


# --- the phase lines' keys are an interface: users grep them -------------------------------------------------
# tests/phase_keys.json holds, for the demo, a `--rounds 2 --serve-load 4` run and an error, the keys of every
# phase line as the tool printed them before it became a package (written by phase_keys() from those runs).
PHASE_KEYS = os.path.join(ROOT, "tests", "phase_keys.json")


def phase_keys(records: list[dict]) -> dict[str, list[str]]:
    """{phase: its lines' keys}: the top-level ones, memory's, and summary's check names with each check's own."""
    keys: dict[str, set[str]] = {}
    for r in records:
        found = keys.setdefault(r["phase"], set())
        found.update(r)
        found.update(f"memory.{k}" for k in r.get("memory", {}))
        for check, details in r.get("checks", {}).items():
            found.update([f"checks.{check}", *(f"checks.{check}.{k}" for k in details)])
    return {phase: sorted(k) for phase, k in keys.items()}


def assert_phase_keys(run: "ToolRun", which: str) -> None:
    """The run's phase lines have exactly the keys committed for `which` (demo, rounds_serve, error)."""
    want = json.load(open(PHASE_KEYS))[which]
    got = phase_keys(run.records)
    assert list(got) == list(want), (list(got), list(want))
    for phase in want:
        assert got[phase] == want[phase], (phase, sorted(set(got[phase]) ^ set(want[phase])))
