"""The colocated RL cycle (--rl-steps; ParamSwapper.release/resume): the demo's cycle passes its three checks,
each check fails on its planted defects, bad input is refused with a named error and loses nothing, and the
API's cycle in docs/api.md runs as written."""

import json
import os
import re

import pytest
from conftest import MUTATED, ROOT, assert_checks_failed, clean_env, run_tool
from test_end_to_end import swap_args
from test_errors import assert_error
from test_trainer import run_script

from param_swap import checkpoint as ckpt

RL = ("--weights-source", "trainer", "--trainer-sharding", "engine", "--alias", "--verify-weights")


@pytest.mark.engine
def test_the_demo_cycle_holds_one_set_and_recompiles_nothing(tmp_path):
    run = run_tool("--demo", "--rl-steps", "3", "--rl-save", str(tmp_path / "last"))
    checks = run.summary["checks"]
    assert run.returncode == 0, ({k: v for k, v in checks.items() if not v["ok"]}, run.stderr[-3000:])
    assert all(checks[c]["ok"] for c in ("rl_released", "rl_no_recompile", "rl_weights_follow_trainer"))
    steps = [r for r in run.records if r["phase"] == "rl_step"]
    params = run.phase("engine_ready_dummy")["param_bytes_sum"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert s["released_engine_bytes_sum"] <= 0.02 * params and s["engine_held_arrays"] == 0
        assert s["kv_bytes_freed"] == s["kv_bytes_sum"] > 0 and s["weights_bytes_let_go"] > 0
        assert s["weights_verified"] is True and s["answer_changed"] is True
        at = {p: m["bytes_in_use_sum"] for p, m in s["memory_at"].items()}
        # released and trained: the trainer's params and optimizer state, and the released engine's crumbs
        assert at["released"] == at["trained"] <= s["trainer_bytes_sum"] + s["optimizer_bytes_sum"] + 0.02 * params
        # rolled out and resumed: that, the KV cache and the K/V projections the engine repeats (cannot alias)
        assert at["resumed"] == at["rolled_out"] <= at["released"] + s["kv_bytes_sum"] + s["copied_bytes_sum"] \
            + 0.02 * params
    assert steps[0]["resume_compiles"] > 0 and [s["resume_compiles"] for s in steps[1:]] == [0, 0]
    # --rl-save: the last step's params, as a checkpoint sglang-jax's loader read bit for bit (weights_verified)
    assert len(ckpt.expected_tensors(ckpt.read_checkpoint_info(str(tmp_path / "last")))) == 26


@pytest.mark.engine
@pytest.mark.parametrize("mutation, steps, failing", [
    ("kv_kept_on_release", 1, ["rl_released"]),
    ("dummy_set_cached", 1, ["rl_released"]),
    ("aliased_ref_kept", 1, ["rl_released"]),
    ("kv_rebuilt_bigger", 2, ["rl_no_recompile"]),
    ("resume_skips_one_tensor", 1, ["rl_weights_follow_trainer", "weights_equal_loader"]),
    ("resume_places_previous_params", 1, ["rl_weights_follow_trainer", "weights_equal_loader"]),
])
def test_each_rl_check_fails_on_its_defect(checkpoint, mutation, steps, failing):
    folder = checkpoint(tied=True, num_kv_heads=2)
    run = run_tool(mutation, *swap_args(folder, 4, *RL, "--rl-steps", str(steps), "--max-new-tokens", "6"),
                   script=MUTATED)
    assert run.returncode == 1, run.stderr[-3000:]
    assert_checks_failed(run.summary["checks"], *failing)


@pytest.mark.parametrize("flags, words", [
    (["--rl-steps", "2", "--serve-load", "2"], ["--rl-steps with --serve-load", "idle engine"]),
    (["--rl-steps", "2"], ["--rl-steps with --weights-source safetensors", "--weights-source trainer"]),
    (["--rl-steps", "-1"], ["--rl-steps -1"]),
    (["--rl-save", "/tmp/x"], ["--rl-save without --rl-steps"]),
    (["--weights-source", "trainer", "--rl-steps", "2", "--rl-learning-rate", "0"], ["--rl-learning-rate 0"]),
])
def test_rl_usage_errors(checkpoint, flags, words):
    assert_error(run_tool(*swap_args(checkpoint(), 4, *flags)), 2, "arguments", *words)


@pytest.mark.engine
def test_release_and_resume_refuse_bad_input_and_lose_nothing(checkpoint):
    """release() twice, with a request in flight, resume() without a tree after the weights went, a tree of
    another layout: each a named ToolError; the engine stays as it was (released, or serving)."""
    [result] = run_script(os.path.join(ROOT, "tests", "rl_api_probe.py"), checkpoint(tied=True, num_kv_heads=2),
                          checkpoint(tied=False, num_kv_heads=2))
    refused = result["refused"]
    assert refused["in_flight"]["stage"] == "release" and refused["in_flight"]["requests_in_flight"] >= 1
    assert result["in_flight_request_finished"] and result["answers_before_equal"]
    assert refused["generate_while_released"]["stage"] == "engine_released"
    assert refused["generate_while_released"]["exit_code"] == 3
    assert refused["swap_while_released"]["stage"] == "engine_released"
    assert refused["release_twice"]["stage"] == "release"
    assert refused["resume_without_tree"]["stage"] == "resume"
    assert refused["resume_other_layout"]["stage"] == "plan"
    assert result["still_released_after_refusals"] == "engine_released"
    assert refused["resume_nan"]["stage"] == "weights_finite" and refused["resume_nan"]["restored"] is True
    assert result["still_released_after_nan"] == "engine_released" and result["params_abstract_after_nan"]
    assert result["resumed_answer_equal"]  # resumed with the same weights: the answer before the release
    assert result["kv_only"]["weights_bytes_deleted"] == 0 and result["kv_only_answer_equal"]


@pytest.mark.engine
def test_api_cycle_example_runs(checkpoint):
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "docs", "api.md")).read(), re.S)
    code = next(b for b in blocks if "swapper.release()" in b)  # "The colocated RL cycle"
    env = {**clean_env(), "CKPT": checkpoint(tied=True, num_kv_heads=2), "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    lines = run_script("-c", code, env=env)
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert all(line["refused"] == "engine_released" and line["engine_held_arrays"] == 0 for line in lines)
    assert len({json.dumps(line["output_ids"]) for line in lines}) == 3  # every step's weights answer differently
    assert all(line["aliased_bytes_sum"] > 0 and line["kv_bytes_freed"] > 0 for line in lines)
