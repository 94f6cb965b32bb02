"""Several hosts (--nnodes): 2 processes x 2 virtual CPU devices on 127.0.0.1 stand in for a 2-host pod slice
(tp 4 over both). Every socket (JAX's coordination service, gloo, sglang-jax's request forwarding) binds to and
talks to 127.0.0.1; every wait is bounded (the processes' own timeouts and the test's)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import (
    MAX_NEW,
    MUTATED,
    PROMPT,
    ROOT,
    TOOL,
    assert_checks_failed,
    clean_env,
    dump_threads,
    reference_output_ids,
    run_tool,
    strict_json,
)

pytestmark = [pytest.mark.engine, pytest.mark.hosts]  # make test-hosts runs these (make test and test-fast do not)

HOSTS_TIMEOUT = int(os.environ.get("PARAM_SWAP_HOSTS_TIMEOUT", "420"))  # make stress-hosts shortens it


def communicate_all(procs: list, what: str) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of every rank within HOSTS_TIMEOUT in all; a rank still running then fails the
    test with every live rank's threads (where each waits: py-spy) and every rank's stderr tail."""
    out, deadline = [], time.monotonic() + HOSTS_TIMEOUT
    try:
        for p in procs:
            try:
                stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                hung = [r for r, q in enumerate(procs) if q.poll() is None]
                dumps = {r: dump_threads(procs[r].pid) for r in hung}
                for q in procs:
                    q.kill()
                tails = [q.communicate()[1] or "" for q in procs]
                pytest.fail(f"{what}: rank(s) {hung} still running after {HOSTS_TIMEOUT} s (a hang)\n" + "\n".join(
                    f"=== rank {r}:\n{dumps.get(r, '(exited)')}\n--- stderr:\n{tails[r][-4000:]}"
                    for r in range(len(procs))))
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            p.kill()
    return out


def free_port() -> int:
    """A port P with P, P+5 and P+6 free on 127.0.0.1 (JAX's coordinator; sglang-jax's forwarding of requests)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for p in (port, port + 5, port + 6):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port block on 127.0.0.1")


def host_commands(folders: list[str], args: tuple, scripts: list[list[str]] | None) -> tuple[list[list[str]], dict]:
    port = free_port()
    env = {**clean_env(), "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}"}
    return [[sys.executable, *(scripts[rank] if scripts else [TOOL]), "--model-id", folder, "--device", "cpu",
             "--tp-size", "4", "--nnodes", str(len(folders)), "--node-rank", str(rank),
             "--dist-init-addr", f"127.0.0.1:{port}", "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW), *args]
            for rank, folder in enumerate(folders)], env


def run_hosts(folders: list[str], *args: str, scripts: list[list[str]] | None = None) -> list[tuple[int, list, str, str]]:
    """Rank r runs `scripts[r] + the tool's args` on `folders[r]` (its copy of the checkpoint); returns
    (exit code, JSON records on stdout, stdout, stderr) per rank."""
    commands, env = host_commands(folders, args, scripts)
    procs = []
    for cmd in commands:
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    return [(code, [strict_json(line) for line in stdout.splitlines() if line.strip()], stdout, stderr)
            for code, stdout, stderr in communicate_all(procs, " ".join(args))]


def phase_of(records: list, name: str) -> dict:
    found = [r for r in records if r["phase"] == name]
    assert found, [r["phase"] for r in records]
    return found[0]


def test_two_hosts_swap_equals_the_own_loader_on_one(checkpoint):
    folder = checkpoint(tied=True, num_kv_heads=2)  # tp 4 > 2 KV heads: repeated heads, split over the hosts
    (code0, records, _, err0), (code1, records1, stdout1, err1) = run_hosts(
        [folder, folder], "--keep-param-dict", "--verify-param-sharing", "--verify-weights", "--rounds", "2")
    assert code0 == 0, err0[-3000:]
    assert code1 == 0, err1[-3000:]
    assert stdout1 == "" and "rank 1: weights_swapped_from_mllm" in err1  # rank 0 prints the JSON; rank 1 logs
    assert phase_of(records, "jax_ready")["device_count"] == 4 and len(phase_of(records, "jax_ready")["local_devices"]) == 2
    summary = records[-1]
    assert summary["ok"] and summary["exit_code"] == 0
    assert [(h["rank"], h["exit_code"], h["failed_checks"]) for h in summary["hosts"]] == [(0, 0, []), (1, 0, [])]
    assert {"leaves_unchanged", "param_sharing", "weights_equal_loader", "swap_effective", "single_copy_memory",
            "rounds_consistent", "rounds_no_leak"} <= set(summary["checks"])
    # the tokens of a single-process tp-4 engine that loaded the checkpoint with sglang-jax's own loader
    reference = reference_output_ids(folder, 4)
    assert phase_of(records, "generate_result")["output_ids"] == reference
    rounds = [r for r in records if r["phase"] == "swap_round"]
    assert [r["weights"] for r in rounds] == ["B", "A"] and rounds[1]["output_ids"] == reference
    assert rounds[0]["output_ids"] != reference and rounds[0]["rollback_kind"] == "source"
    assert phase_of(records, "weights_verified")["ok"] and phase_of(records, "weights_verified")["paths_checked"] == 26
    # memory: all 4 devices of the slice in every phase line, and each host holds half of them
    for r in records[:-1]:
        mem = r["memory"]
        assert len(mem["jax_device_memory_stats"]) == 4
        total = mem["jax_device_memory_summary"]["bytes_in_use_sum"]
        assert [h["rank"] for h in mem["hosts"]] == [0, 1]
        assert sum(h["bytes_in_use_sum"] for h in mem["hosts"]) == total
        if r["phase"] != "jax_ready":
            assert all(0.4 * total <= h["bytes_in_use_sum"] <= 0.6 * total for h in mem["hosts"]), mem["hosts"]
    swapped = phase_of(records, "weights_swapped_from_mllm")
    dummy = phase_of(records, "engine_ready_dummy")
    assert swapped["memory"]["jax_device_memory_summary"]["bytes_in_use_sum"] <= \
        1.02 * dummy["memory"]["jax_device_memory_summary"]["bytes_in_use_sum"]
    assert swapped["rollback_kind"] == "dummy" and swapped["replaced_still_alive"] == 0


def test_two_hosts_swap_the_trainer_arrays_device_to_device(checkpoint):
    """The tree on the devices of both hosts in the engine's layout (a trainer's), taken by the engine as it is
    where it fits (--alias): no host round trip, one set in the engine. Then two RL steps (release, the
    trainer's donating step, resume) on both ranks, in the same order."""
    folder = checkpoint(tied=True, num_kv_heads=2)
    (code0, records, _, err0), (code1, _, _, err1) = run_hosts(
        [folder, folder], "--weights-source", "trainer", "--trainer-sharding", "engine", "--alias",
        "--keep-param-dict", "--verify-param-sharing", "--verify-weights", "--rl-steps", "2")
    assert (code0, code1) == (0, 0), err0[-3000:] + err1[-3000:]
    assert phase_of(records, "generate_result")["output_ids"] == reference_output_ids(folder, 4)
    assert all(c["ok"] for c in records[-1]["checks"].values()) and "single_copy_memory" in records[-1]["checks"]
    swapped = phase_of(records, "weights_swapped_from_mllm")
    assert swapped["source"] == "device" and swapped["aliased_bytes_sum"] > swapped["copied_bytes_sum"] > 0
    # the split covers both hosts: the trainer's arrays the engine does not share are the K/V projections,
    # stored before their heads are repeated (tp 4 > 2 KV heads)
    trainer = phase_of(records, "mllm_params_device_ready")["trainer_bytes_sum"]
    assert 0 < swapped["trainer_only_bytes_sum"] < trainer == swapped["trainer_bytes_sum"]
    assert swapped["engine_bytes_sum"] == swapped["memory"]["jax_device_memory_summary"]["bytes_in_use_sum"] - \
        swapped["trainer_only_bytes_sum"] - swapped["serving_bytes_sum"]
    steps = [r for r in records if r["phase"] == "rl_step"]
    assert [s["step"] for s in steps] == [1, 2] and steps[1]["resume_compiles"] == 0
    assert all(s["weights_verified"] and s["engine_held_arrays"] == 0 for s in steps)
    assert {"rl_released", "rl_no_recompile", "rl_weights_follow_trainer"} <= set(records[-1]["checks"])


SERVE_CHECKS = ("serve_no_lost_requests", "serve_no_mixed_forward", "serve_fresh_after_swap")


def test_two_hosts_swap_while_serving(checkpoint):
    """--serve-load with --nnodes: rank 0's clients keep requests in flight across every swap; each swap
    pauses every rank's scheduler (each confirms before any rank touches a Param), flushes every rank's radix
    cache (each proves it empty), continues; no forward step on any rank saw a change, and every rank ran as
    many steps on each weight set; the answers equal sglang-jax's own loader on one process."""
    folder = checkpoint(tied=True, num_kv_heads=2)
    (code0, records, _, err0), (code1, _, _, err1) = run_hosts(
        [folder, folder], "--serve-load", "4", "--rounds", "2", "--serve-seconds", "1", "--max-new-tokens", "6")
    assert (code0, code1) == (0, 0), err0[-3000:] + err1[-3000:]
    checks = records[-1]["checks"]
    assert all(c["ok"] for c in checks.values()) and all(checks[c]["ok"] for c in SERVE_CHECKS)
    assert [(h["rank"], h["exit_code"], h["failed_checks"]) for h in records[-1]["hosts"]] == [(0, 0, []), (1, 0, [])]
    forwards = checks["serve_no_mixed_forward"]
    assert [r["forwards_mixed"] for r in forwards["ranks"]] == [0, 0] and forwards["ranks_on_the_same_sets"]
    # (each rank counts "while serving" from its own start of the load: the counts per weight set are compared)
    assert forwards["ranks"][1]["forwards_while_serving"] > 0 and forwards["forwards_while_serving"] > 0
    assert len(forwards["forwards_by_weights"]) >= 4  # dummy, A, B and the sets the window and references swap in
    reference = reference_output_ids(folder, 4, max_new=6)
    assert phase_of(records, "generate_result")["output_ids"] == reference
    rounds = [r for r in records if r["phase"] == "swap_round"]
    assert [r["weights"] for r in rounds] == ["B", "A"] and rounds[1]["output_ids"] == reference
    fresh = checks["serve_fresh_after_swap"]["swaps"]
    assert [(f["swap"], f["weights"], f["equal"]) for f in fresh] == [("first swap", "A", True), ("round 1", "B", True),
                                                                       ("round 2", "A", True)]
    load = phase_of(records, "serve_load")
    assert len(load["swaps"]) == 5 and all(s["requests_paused"] > 0 for s in load["swaps"])
    for r in [phase_of(records, "weights_swapped_from_mllm"), *rounds]:
        assert r["requests_paused"] > 0 and r["requests_held_in_flush"] == r["requests_paused"]


@pytest.mark.parametrize("mutation, stage, words", [
    ("pause_not_awaited", "swap_pause", "rank(s) [1] had not paused generation"),
    ("flush_skipped", "swap_flush", "rank 1: it succeeded, yet"),
])
def test_a_rank_not_paused_or_not_flushed_fails_every_rank(checkpoint, mutation, stage, words):
    """Planted on rank 1 under load: its swap does not wait for its scheduler's pause (which is slow to come),
    or its scheduler's flush answers success and flushes nothing. Both ranks exit 3 with the same error; a rank
    not paused stops the swap before any Param changes."""
    folder = checkpoint(tied=True, num_kv_heads=2)
    results = run_hosts([folder, folder], "--serve-load", "4", "--max-new-tokens", "6",
                        scripts=[[TOOL], [MUTATED, mutation]])
    assert [code for code, *_ in results] == [3, 3], results[0][3][-3000:] + results[1][3][-3000:]
    records = results[0][1]
    error = phase_of(records, "error")
    assert error["stage"] == stage and words in error["error"] and error["failed_rank"] == 1, error
    if stage == "swap_pause":
        assert error["not_paused_ranks"] == [1] and "weights_swapped_from_mllm" not in [r["phase"] for r in records]
    else:
        assert [f["success"] for f in error["flushes"]] == [True, True] and error["flushes"][0]["radix_tokens_after"] == 0
        assert error["flushes"][1]["radix_tokens_after"] > 0 and error["generation"] == "paused"
    assert [h["exit_code"] for h in records[-1]["hosts"]] == [3, 3]


def test_ranks_on_different_weight_sets_fail_the_forward_check(checkpoint):
    """Planted on rank 1 under load: its guard never learns a swap completed, so its steps are counted on the
    dummy set. Each rank's own steps are unmixed; only the comparison across ranks fails, on both ranks."""
    folder = checkpoint(tied=True, num_kv_heads=2)
    results = run_hosts([folder, folder], "--serve-load", "4", "--max-new-tokens", "6", "--serve-seconds", "1",
                        scripts=[[TOOL], [MUTATED, "weights_id_kept"]])
    assert [code for code, *_ in results] == [1, 1], results[0][3][-3000:] + results[1][3][-3000:]
    summary = results[0][1][-1]
    assert [h["failed_checks"] for h in summary["hosts"]] == [["serve_no_mixed_forward"]] * 2
    assert_checks_failed(summary["checks"], "serve_no_mixed_forward")
    forwards = summary["checks"]["serve_no_mixed_forward"]
    assert not forwards["ranks_on_the_same_sets"] and [r["forwards_mixed"] for r in forwards["ranks"]] == [0, 0]
    assert list(forwards["ranks"][1]["forwards_by_weights"]) == ["0"] != list(forwards["forwards_by_weights"])


def test_api_multi_host_example_runs(checkpoint):
    """docs/api.md's "Several hosts" block as written, on 2 processes x 2 virtual CPU devices (PLATFORM=cpu):
    both steps answer as sglang-jax's own loader on one host, and every rank gets rank 0's answer."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "docs", "api.md")).read(), re.S)
    code = next(b for b in blocks if 'NNODES, RANK = int(os.environ["NNODES"])' in b)
    folder = checkpoint(tied=True, num_kv_heads=2)
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**clean_env(), "CKPT": folder, "NNODES": "2", "RANK": str(rank), "ADDR": f"127.0.0.1:{port}",
               "PLATFORM": "cpu", "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=ROOT))
    outs = [(stdout, stderr) for _, stdout, stderr in communicate_all(procs, "docs/api.md's several-hosts block")]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    reference = reference_output_ids(folder, 4)
    for rank, (stdout, _) in enumerate(outs):
        lines = [strict_json(line) for line in stdout.splitlines() if line.startswith("{")]
        assert [(r["rank"], r["step"]) for r in lines] == [(rank, 0), (rank, 1)]
        assert [r["output_ids"] for r in lines] == [reference, reference]


def test_a_check_failing_on_one_rank_fails_every_rank(checkpoint):
    """Rank 1's dict holds a copy of one engine array: its param_sharing fails, rank 0's passes. Both ranks exit
    1, and rank 0's summary names rank 1 and its failed check."""
    folder = checkpoint(tied=True, num_kv_heads=2)
    results = run_hosts([folder, folder], "--verify-param-sharing", "--max-new-tokens", "2",
                        scripts=[[TOOL], [MUTATED, "copy_in_dict"]])
    assert [code for code, *_ in results] == [1, 1], results[0][3][-3000:] + results[1][3][-3000:]
    summary = results[0][1][-1]
    assert summary["ok"] is False and summary["exit_code"] == 1
    assert all(c["ok"] for c in summary["checks"].values())  # rank 0's own checks
    # each rank's own verdict; the common exit code is the worst of them
    assert [(h["rank"], h["exit_code"], h["failed_checks"]) for h in summary["hosts"][:1]] == [(0, 0, [])]
    assert summary["hosts"][1]["exit_code"] == 1
    assert_checks_failed(summary["hosts"][1]["failed_checks"], "param_sharing")
    assert "check param_sharing: FAILED" in results[1][3] and "rank 1: check(s) failed there: param_sharing" in results[0][3]


def test_a_partial_swap_exits_1_on_every_rank(checkpoint):
    """Rank 1's swap touches nothing but says it succeeded: without the agreement rank 0 would generate with
    rank 1's dummy shards and no error at all."""
    folder = checkpoint(tied=True, num_kv_heads=2)
    results = run_hosts([folder, folder], "--max-new-tokens", "4", scripts=[[TOOL], [MUTATED, "skip_swap"]])
    assert [code for code, *_ in results] == [1, 1], results[0][3][-3000:] + results[1][3][-3000:]
    records = results[0][1]
    error = phase_of(records, "error")
    assert error["stage"] == "swap_agreement" and "rank(s) [1]" in error["error"] and error["failed_rank"] == 1
    assert [h["params_held"] for h in error["hosts"]] == [26, 0]
    # every host put the previous (dummy) weights back, and the engine answers as before the swap
    assert error["restored"] and error["previous_weights_answer_matches"]
    assert [h["exit_code"] for h in records[-1]["hosts"]] == [1, 1]
    assert "rank 1: error (swap_agreement" in results[1][3]


def test_hosts_with_different_plans_swap_nothing(checkpoint):
    folder = checkpoint(tied=True, num_kv_heads=2)
    results = run_hosts([folder, folder], "--max-new-tokens", "2", scripts=[[TOOL], [MUTATED, "plan_one_short"]])
    assert [code for code, *_ in results] == [2, 2], results[0][3][-3000:] + results[1][3][-3000:]
    error = phase_of(results[0][1], "error")
    assert error["stage"] == "swap_agreement" and "planned different swaps" in error["error"]
    assert len(set(error["plans"])) == 2 and "weights_swapped_from_mllm" not in [r["phase"] for r in results[0][1]]


def test_a_failure_on_one_rank_ends_every_rank(checkpoint, tmp_path):
    """Rank 1's copy of the checkpoint is damaged: both ranks stop before any engine starts, with rank 1's
    error line on rank 0 and its exit code everywhere."""
    folder = checkpoint(tied=True, num_kv_heads=2)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in os.listdir(folder):
        os.symlink(os.path.join(folder, name), damaged / name)
    (damaged / "config.json").unlink()
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    (damaged / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    results = run_hosts([folder, str(damaged)])
    assert [code for code, *_ in results] == [2, 2], results[0][3][-3000:]
    error = phase_of(results[0][1], "error")
    assert error["stage"] == "checkpoint" and error["error"].startswith("rank 1: ") and error["failed_rank"] == 1
    assert "engine_ready_dummy" not in [r["phase"] for r in results[0][1]]


@pytest.mark.parametrize("extra", [["--bucket-mb", "1"], ["--no-rollback"],
                                   ["--weights-source", "trainer", "--no-rollback"]])
def test_nonfinite_weights_are_refused_on_every_rank(checkpoint, tmp_path, extra):
    """One NaN and one infinity in the checkpoint (a trainer that diverged), on two hosts: each rank holds its
    shards of them only, yet both refuse the same tensors and keep their weights (exit 2 everywhere), per
    bucket as placed (rolled back) or in the whole tree before anything is placed (--no-rollback; from a
    trainer tree each rank reads only its own shards, so the one that holds the NaN must stop the other before
    either pauses)."""
    from test_errors import poison, rewrite_tensors

    folder = str(tmp_path / "ckpt")
    shutil.copytree(checkpoint(tied=True, num_kv_heads=2), folder)
    rewrite_tensors(folder, poison)
    results = run_hosts([folder, folder], *extra)
    errors = [[r for r in records if r["phase"] == "error"] for _, records, *_ in results]
    assert [code for code, *_ in results] == [2, 2], (errors, results[0][3][-3000:] + results[1][3][-3000:])
    error = phase_of(results[0][1], "error")
    assert error["stage"] == "weights_finite" and "model.layers_0.mlp.up_proj.kernel" in error["error"], error
    assert error["previous_weights_answer_matches"] is True and "weights_swapped_from_mllm" not in [
        r["phase"] for r in results[0][1]]
    assert [(h["rank"], h["exit_code"]) for h in results[0][1][-1]["hosts"]] == [(0, 2), (1, 2)]


def test_a_failure_while_another_rank_is_busy_ends_every_rank(checkpoint):
    """Rank 1's scheduler fails while the engines start (SIGQUIT): rank 0 is inside sglang-jax's Engine(),
    waiting for rank 1, and never reaches a step of its own; its watcher ends it with rank 1's error."""
    folder = checkpoint(tied=True, num_kv_heads=2)
    results = run_hosts([folder, folder], scripts=[[TOOL], [MUTATED, "scheduler_start_fails"]])
    assert [code for code, *_ in results] == [3, 3], results[0][3][-3000:] + results[1][3][-3000:]
    error = phase_of(results[0][1], "error")
    assert error["stage"] == "engine_start" and error["failed_rank"] == 1 and "injected" in error["error"]
    assert [h["exit_code"] for h in results[0][1][-1]["hosts"]] == [3, 3]


def test_ranks_out_of_step_or_missing_end_with_an_error_line(checkpoint):
    folder = checkpoint(tied=True, num_kv_heads=2)
    results = run_hosts([folder, folder], scripts=[[TOOL], [MUTATED, "extra_step"]])
    assert [code for code, *_ in results] == [3, 3], results[0][3][-3000:] + results[1][3][-3000:]
    error = phase_of(results[0][1], "error")
    assert error["stage"] == "hosts" and "different steps" in error["error"] and "extra_step" in error["error"]
    # rank 1 never starts: rank 0 says so before JAX's own deadline ends the process without a word
    run = run_tool("--model-id", folder, "--device", "cpu", "--tp-size", "4", "--nnodes", "2", "--node-rank", "0",
                   "--dist-init-addr", f"127.0.0.1:{free_port()}", "--watchdog-timeout", "4", timeout=60)
    assert run.returncode == 3 and run.phase("error")["stage"] == "hosts", run.stderr[-2000:]
    assert "joined" in run.phase("error")["error"] and run.summary["exit_code"] == 3


def test_multi_host_usage_errors():
    run = run_tool("--nnodes", "2", "--node-rank", "0", "--tp-size", "4", "--device", "cpu")
    assert run.returncode == 2 and "--dist-init-addr" in run.phase("error")["error"]
    run = run_tool("--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "127.0.0.1:1234")
    assert run.returncode == 2 and "ranks are 0 .. nnodes-1" in run.phase("error")["hint"]
    run = run_tool("--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "127.0.0.1:1234", "--tp-size", "4",
                   "--demo")
    assert run.returncode == 2 and "--demo" in run.phase("error")["error"]


LOST_AFTER = 15  # --host-lost-after's default
JAX_FATAL = "Terminating process because the JAX distributed service detected fatal errors"
EXIT_WITHIN_S = 20  # the bound: from the kill to the other rank's exit


def alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("killed, mutation, trigger, delay, phase", [
    # inside Engine() on rank 1 (its scheduler exists, it sleeps 10 s): rank 0 waits inside its own Engine()
    (1, "slow_engine_start", "marker", 1.0, "engine_ready_dummy"),
    # rank 1's placements sleep 0.3 s each (26 tensors): rank 0 has placed its own and waits for the agreement
    (1, "slow_place", "rank 1: sglang_param_dict_ready", 1.5, "weights_swapped_from_mllm"),
    # rank 1's forward steps sleep 0.5 s each: both ranks are in the first generation's collectives
    (1, "slow_forward", "rank 1: engine_ready_dummy", 2.0, "generate_before_swap"),
    # rank 0 (the coordination service's process) dies inside a forward step: JAX ends rank 1 at once
    (0, "slow_forward", '"phase": "engine_ready_dummy"', 2.0, "generate_before_swap"),
])
def test_a_rank_killed_ends_the_other_within_20_s(checkpoint, tmp_path, killed, mutation, trigger, delay, phase):
    """kill -9 of rank 1 (the whole process group: a host gone) at three points: rank 0 prints one error line
    naming it and its phase, the summary with summary.hosts, exits 3 within 20 s, and leaves nothing running; JAX
    alone would end it after its 100 s heartbeat timeout with a fatal log and no JSON. Rank 0 killed (its process
    runs JAX's coordination service): JAX's client ends rank 1 at once with its fatal log, before any line of ours
    (a callback JAX's binding takes instead crashes: docs/phases.md); nothing is left running."""
    survivor = 1 - killed
    folder = checkpoint(tied=True, num_kv_heads=2)
    marker = tmp_path / "marker"
    scripts = [[TOOL], [TOOL, "--json-out", str(tmp_path / "json1")]]
    scripts[killed][0:1] = [MUTATED, mutation]
    commands, env = host_commands([folder, folder], (), scripts)
    env["PARAM_SWAP_MARKER"] = str(marker)
    logs = [(open(tmp_path / f"out{r}", "w+"), open(tmp_path / f"err{r}", "w+")) for r in (0, 1)]
    procs = [subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=ROOT, start_new_session=True)
             for cmd, (out, err) in zip(commands, logs, strict=True)]
    watched = tmp_path / ("err1" if killed else "out0")
    try:
        deadline = time.monotonic() + HOSTS_TIMEOUT
        while not (marker.exists() if trigger == "marker" else trigger in watched.read_text()):
            assert time.monotonic() < deadline and procs[1].poll() is None and procs[0].poll() is None, \
                watched.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(delay)
        assert procs[survivor].poll() is None, (tmp_path / f"err{survivor}").read_text()[-3000:]
        os.killpg(procs[killed].pid, signal.SIGKILL)
        t_kill = time.monotonic()
        stderr_file = tmp_path / f"err{survivor}"
        try:
            code = procs[survivor].wait(timeout=EXIT_WITHIN_S + 40)  # bounded; the bound asserted is below
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank {survivor} still running {EXIT_WITHIN_S + 40} s after rank {killed} was killed (a "
                        f"hang):\n{dump_threads(procs[survivor].pid)}\n--- stderr:\n{stderr_file.read_text()[-4000:]}")
        took = time.monotonic() - t_kill
        records = [strict_json(line) for line in (tmp_path / ("json1" if survivor else "out0")).read_text().splitlines()
                   if line.strip()]
        stderr = stderr_file.read_text()
        print(f"rank {survivor} exited {code} {took:.1f} s after rank {killed} was killed")
        if killed == 0:  # JAX's client ends the process at once, before the tool can write a line (docs/phases.md)
            assert code != 0 and took <= EXIT_WITHIN_S and JAX_FATAL in stderr, (code, took, stderr[-6000:])
            assert not records or records[-1]["phase"] != "summary"
            time.sleep(1)
            assert not alive(procs[survivor].pid), f"rank {survivor} left a process running"
            return
        assert code == 3 and took <= EXIT_WITHIN_S, (code, took, stderr[-6000:])
        error = phase_of(records, "error")
        assert error["stage"] == "hosts" and error["lost_ranks"] == [killed] and error["failed_rank"] == killed, error
        assert f"rank(s) {killed} (in " in error["error"] and f"for {LOST_AFTER} s" in error["error"], error
        assert f"this rank was in {phase}" in error["error"], error
        summary = records[-1]
        assert summary["phase"] == "summary" and summary["exit_code"] == 3 and not summary["ok"]
        assert [(h["rank"], h["exit_code"]) for h in summary["hosts"]] == sorted([(survivor, 3), (killed, None)])
        assert [r["phase"] for r in records].count("error") == 1
        time.sleep(1)
        assert not alive(procs[survivor].pid), f"rank {survivor} left a process running"  # its engine's children too
    finally:
        for p in procs:
            if alive(p.pid):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        for out, err in logs:
            out.close()
            err.close()
