"""Stopping a run: SIGINT (Ctrl-C) and SIGTERM (`timeout`) at engine start, during a generation and mid-swap end
with one error line, the summary and 130 / 143, promptly, leaving no process of the run behind."""

import glob
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from conftest import CONSOLE_SCRIPT, MUTATED, ROOT, TOOL, clean_env, strict_json

pytestmark = pytest.mark.engine  # make test-fast leaves these out

CPU4 = ["--device", "cpu", "--tp-size", "4"]
STOP_BOUND_S = 20  # seconds from the signal to the exit (a swap in progress may take ~8 s here: slow_place)


def stop_run(argv: list, after_phase: str | None, sig: int, tmp_path, delay: float = 0.5, marker=None,
             cwd: str = ROOT) -> dict:
    """Start the tool (`python ARGV`, or ARGV itself when it starts with the console script), wait for `after_phase`'s line (or, with after_phase None, for the file `marker` that a
    mutation writes), then `delay`, send `sig`; the lines, code, timing."""
    json_out = tmp_path / "run.jsonl"
    env = {**clean_env(compile_cache=False), **({"PARAM_SWAP_MARKER": str(marker)} if marker else {})}
    command = argv if argv[0] == CONSOLE_SCRIPT else [sys.executable, *argv]
    proc = subprocess.Popen([*command, "--json-out", str(json_out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=cwd)
    lines, sent, family = [], None, []

    def stop() -> None:
        nonlocal sent, family
        time.sleep(delay)
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        sent = time.perf_counter()
        proc.send_signal(sig)

    try:
        if after_phase is None:
            deadline = time.monotonic() + 120
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if marker.exists():
                stop()
        for line in proc.stdout:
            lines.append(strict_json(line))
            if lines[-1]["phase"] == after_phase:
                stop()
                break
        lines += [strict_json(line) for line in proc.stdout]
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert sent is not None, f"no {after_phase or marker}: {[r['phase'] for r in lines]}"
    return {"code": code, "seconds": time.perf_counter() - sent, "lines": lines, "family": family,
            "json_out": json_out.read_text().splitlines()}


def assert_stopped(run: dict, sig: int, code: int, interrupted: str) -> dict:
    error, summary = run["lines"][-2], run["lines"][-1]
    assert run["code"] == code, run["lines"][-3:]
    assert error["phase"] == "error" and error["stage"] == "interrupted" and error["exit_code"] == code
    assert error["signal"] == signal.Signals(sig).name and error["interrupted_phase"] == interrupted
    assert summary["phase"] == "summary" and summary["ok"] is False
    assert run["seconds"] < STOP_BOUND_S
    assert not [pid for pid in run["family"] if psutil.pid_exists(pid)], "a process of the run survived"
    assert [strict_json(line) for line in run["json_out"]] == run["lines"]
    return error


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_while_the_engine_starts(checkpoint, tmp_path, sig, code):
    """Inside sglang-jax's Engine(): its scheduler exists (the mutation writes the marker, then takes 10 s more)
    and the engine has not returned yet."""
    run = stop_run([MUTATED, "slow_engine_start", "--model-id", checkpoint(), *CPU4], None, sig, tmp_path,
                   marker=tmp_path / "scheduler_made")
    error = assert_stopped(run, sig, code, "engine_ready_dummy")
    assert error["engine_holds"] == "the engine was starting"


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130)])  # SIGTERM: mid-swap below, and in make test-compat
def test_stop_during_a_generation(checkpoint, tmp_path, sig, code):
    """Through the console script, from another folder: its signal mask must be in place before numpy starts
    OpenBLAS's threads too (else Python's KeyboardInterrupt, a traceback and no verdict)."""
    run = stop_run([CONSOLE_SCRIPT, "--model-id", checkpoint(), *CPU4, "--max-new-tokens", "400"],
                   "engine_ready_dummy", sig, tmp_path, cwd=str(tmp_path))
    error = assert_stopped(run, sig, code, "generate_before_swap")
    assert error["engine_holds"] == "the dummy weights (no swap yet)"


def test_stop_mid_swap_lets_the_swap_complete(checkpoint, tmp_path):
    # the signal 1 s after the first tensor placement began (not after a phase line: the swap's compiles
    # before the pause take a machine-dependent time)
    run = stop_run([MUTATED, "slow_place", "--model-id", checkpoint(), *CPU4, "--max-new-tokens", "4"],
                   None, signal.SIGTERM, tmp_path, delay=1.0, marker=tmp_path / "placing")
    error = assert_stopped(run, signal.SIGTERM, 143, "weights_swapped_from_mllm")
    assert error["engine_holds"].startswith("the weights of swap 1; the swap in progress completed before stopping")


def test_timeout_ends_the_demo_with_its_summary():
    """`timeout 8` ends the demo wherever it is: the error line names the phase after the last one written
    (the demo's phases in order, test_end_to_end.DEMO_PHASES), and the summary follows."""
    from test_end_to_end import DEMO_PHASES

    demos = set(glob.glob(f"{tempfile.gettempdir()}/param_swap_demo_*"))
    proc = subprocess.run(["timeout", "8", sys.executable, TOOL, "--demo"], capture_output=True, text=True,
                          env=clean_env(compile_cache=False), cwd=ROOT, timeout=120)
    lines = [strict_json(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 124  # timeout's own code; the tool exited 143
    assert lines[-2]["stage"] == "interrupted" and lines[-2]["exit_code"] == 143
    written = [r["phase"] for r in lines[:-2]]
    assert written == DEMO_PHASES[:len(written)]  # the demo's own order, cut where the signal came
    # the run was after its last line and before the next: in that phase, or in the validation before the
    # engine ("checkpoint", a stage without a line of its own, between jax_ready and engine_ready_dummy)
    stages = ["jax_ready", "checkpoint", *DEMO_PHASES[1:]]
    last, following = stages.index(written[-1]), stages.index(DEMO_PHASES[len(written)])
    assert lines[-2]["interrupted_phase"] in stages[last + 1:following + 1], (written, lines[-2])
    assert lines[-1]["phase"] == "summary" and lines[-1]["ok"] is False
    assert "device bytes in use (sum)" in proc.stderr  # the table
    assert set(glob.glob(f"{tempfile.gettempdir()}/param_swap_demo_*")) == demos  # its temp checkpoint removed
