"""The other sglang-jax stacks our users run (make test-compat: one pytest session per stack, its overlay in
front of .venv on PYTHONPATH, PARAM_SWAP_STACK naming it; stacks/*.txt). On each, the whole tool through a
subset that covers every path of the adapter: the demo with both oracles, swaps under load, Qwen3-MoE, a Llama
trainer tree with --alias and two RL steps (release, resume), one planted layout error, a 2-process multi-host pair, a SIGTERM stop. The
registry's sglang-jax 0.0.2 (unsupported) is refused before the engine starts. `make test` (the pinned
0.0.3rc99) skips this file."""

import os
import signal

import pytest
from conftest import MUTATED, PROMPT, TOOL, run_tool
from test_hosts import phase_of, run_hosts
from test_signals import CPU4, assert_stopped, stop_run

from param_swap import sglang_adapter as adapter

STACK = os.environ.get("PARAM_SWAP_STACK")
UNSUPPORTED = "registry-0.0.2"
pytestmark = [pytest.mark.skipif(not STACK, reason="make test-compat runs these, one stack at a time"), pytest.mark.engine]
supported = pytest.mark.skipif(STACK == UNSUPPORTED, reason=f"{UNSUPPORTED} is refused (test_registry_0_0_2...)")
FAST = ["--max-new-tokens", "16"]


def assert_all_ok(run) -> None:
    failed = {k: v for k, v in run.summary.get("checks", {}).items() if not v["ok"]}
    assert run.returncode == 0 and not failed, (run.returncode, failed, run.stderr[-3000:])


@supported
def test_demo_with_both_oracles_on_the_stack_named():
    run = run_tool("--demo")
    assert_all_ok(run)
    ready = run.phase("engine_ready_dummy")
    assert ready["stack"] == STACK, ready  # the probe found the stack make test-compat installed
    assert (ready["sglang_jax_version"], run.phase("jax_ready")["jax_version"]) == adapter.SUPPORTED_STACKS[STACK]
    assert {"weights_equal_loader", "logits_match_reference", "single_copy_memory"} <= set(run.summary["checks"])


@supported
def test_swaps_under_load():
    run = run_tool("--demo", "--rounds", "2", "--serve-load", "4", "--serve-seconds", "2", *FAST)
    assert_all_ok(run)
    assert {"serve_no_lost_requests", "serve_no_mixed_forward", "serve_fresh_after_swap", "rounds_consistent",
            "rounds_no_leak"} <= set(run.summary["checks"])
    assert run.summary["checks"]["weights_equal_loader"]["swaps_checked"] == 2  # the first swap and round 2 (A)


@supported
def test_qwen3_moe_demo():
    run = run_tool("--demo", "--arch", "qwen3_moe", *FAST)
    if STACK == "bd09a87":  # its dummy initialiser cannot start a Qwen3-MoE engine: refused before it starts
        error = run.phase("error")
        assert run.returncode == 2 and error["stage"] == "sglang_jax", run.stderr[-3000:]
        assert "Qwen3MoeForCausalLM" in error["error"] and "bd09a87" not in error["hint"]
        assert "engine_ready_dummy" not in run.phases()
        return
    assert_all_ok(run)


@supported
def test_llama_trainer_tree_with_alias_and_two_rl_steps():
    run = run_tool("--demo", "--arch", "llama", "--weights-source", "trainer", "--alias", "--trainer-sharding",
                   "engine", "--rl-steps", "2", *FAST)
    assert_all_ok(run)
    swapped = run.phase("weights_swapped_from_mllm")
    assert swapped["source"] == "device" and swapped["aliased_bytes_sum"] > 0
    assert {"rl_released", "rl_no_recompile", "rl_weights_follow_trainer"} <= set(run.summary["checks"])
    assert [s["resume_compiles"] == 0 for s in run.records if s["phase"] == "rl_step"] == [False, True]


@supported
def test_a_planted_layout_error_fails_both_oracles():
    run = run_tool("kernel_shifted", "--demo", *FAST, script=MUTATED)
    checks = run.summary["checks"]
    assert run.returncode == 1, run.stderr[-3000:]
    assert sorted(k for k, v in checks.items() if not v["ok"]) == ["logits_match_reference", "weights_equal_loader"]
    assert set(checks["weights_equal_loader"]["differing"]) == {"model.layers.0.mlp.down_proj.weight"}


@supported
def test_two_hosts_while_serving(checkpoint):
    folder = checkpoint(tied=True, num_kv_heads=2)
    (code0, records, _, err0), (code1, _, _, err1) = run_hosts([folder, folder], "--verify-weights", "--rounds", "1",
                                                               "--serve-load", "4", "--serve-seconds", "1",
                                                               "--max-new-tokens", "6")
    assert (code0, code1) == (0, 0), err0[-3000:] + err1[-3000:]
    assert records[-1]["ok"] and [h["exit_code"] for h in records[-1]["hosts"]] == [0, 0]
    assert phase_of(records, "weights_verified")["ok"] and phase_of(records, "engine_ready_dummy")["stack"] == STACK
    forwards = records[-1]["checks"]["serve_no_mixed_forward"]  # every rank paused, flushed, in step
    assert forwards["ok"] and forwards["ranks_on_the_same_sets"] and records[-1]["checks"]["serve_fresh_after_swap"]["ok"]


@supported
def test_sigterm_during_a_generation(checkpoint, tmp_path):
    run = stop_run([TOOL, "--model-id", checkpoint(), *CPU4, "--max-new-tokens", "400"], "engine_ready_dummy",
                   signal.SIGTERM, tmp_path)
    assert_stopped(run, signal.SIGTERM, 143, "generate_before_swap")


@pytest.mark.skipif(STACK != UNSUPPORTED, reason=f"only on {UNSUPPORTED}")
def test_registry_0_0_2_is_refused_before_the_engine_starts(checkpoint):
    run = run_tool("--model-id", checkpoint(), *CPU4, "--prompt", PROMPT)
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [r for r in run.records if r["phase"] == "error"]
    assert len(errors) == 1 and errors[0]["stage"] == "sglang_jax", errors
    error = errors[0]
    assert "sglang-jax 0.0.2" in error["error"] and "Traceback" not in run.stdout
    assert all(name in error["hint"] for name in adapter.SUPPORTED_STACKS)
    assert "ServerArgs.disable_precompile" in error["missing"] and "engine_ready_dummy" not in run.phases()
