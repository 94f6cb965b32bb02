"""Trainer-resident weights: device-to-device swaps, zero copy (alias), the donation hazard, the Python API and
an RL loop, each against sglang-jax's own loader."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ENGINE_TIMEOUT, MUTATED, ROOT, assert_checks_failed, clean_env, reference_output_ids, run_tool
from test_end_to_end import swap_args

pytestmark = pytest.mark.engine  # make test-fast leaves these out

GATE_BYTES = 512 * 1024 * 2  # the largest tensor of the test checkpoints: gate/up/down [512, 1024] bf16


def run_script(*argv, env=None):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env or clean_env(),
                          timeout=ENGINE_TIMEOUT, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_device_placement_equals_host_placement_from_any_sharding():
    """copy, transpose and KV-head repeat on the devices, from FSDP, reversed device order, replicated, one
    device and last-axis-split sources (bf16 and fp32): every array bit-identical to the host path's."""
    [result] = run_script(os.path.join(ROOT, "tests", "device_place_probe.py"))
    assert result["cases"] == 70 and result["mismatches"] == []
    # prepare_swap compiled what each placement runs; without it the same placement compiles
    assert result["compiled_in_place"] == [] and result["prepare_compiles"] > 0 and result["unprepared_compiles"] > 0
    assert result["fsdp_alias_is_the_target"]  # --alias from an FSDP tree: the target's mesh, the trainer's buffers


# (tp, tied, KV heads): what cannot alias is a repeated K/V projection (tp > KV heads) and an untied lm_head
# (4, True, 2) runs over two hosts in tests/test_hosts.py; tp 1 (no sharding) with a host source: test_end_to_end
ALIAS_MATRIX = [(2, True, 4), (4, False, 1)]


@pytest.mark.parametrize("tp,tied,kv_heads", ALIAS_MATRIX)
def test_engine_layout_with_alias_holds_one_set(checkpoint, tp, tied, kv_heads):
    folder = checkpoint(tied=tied, num_kv_heads=kv_heads)
    run = run_tool(*swap_args(folder, tp, "--weights-source", "trainer", "--trainer-sharding", "engine", "--alias",
                              "--verify-weights", "--verify-param-sharing", "--keep-param-dict", "--rounds", "2"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.summary["ok"], run.summary
    assert run.phase("generate_result")["output_ids"] == reference_output_ids(folder, tp)
    swapped = run.phase("weights_swapped_from_mllm")
    base = run.phase("engine_ready_dummy")["memory"]["jax_device_memory_summary"]["bytes_in_use_sum"]
    after = swapped["memory"]["jax_device_memory_summary"]["bytes_in_use_sum"]
    param, copied, aliased = swapped["param_bytes_sum"], swapped["copied_bytes_sum"], swapped["aliased_bytes_sum"]
    # trainer and engine together: one set, plus only what could not alias
    assert after <= base + copied + 0.02 * param
    assert aliased + copied == param and aliased > 0.5 * param
    assert (copied == 0) == (tied and tp <= kv_heads)
    assert swapped["swap_peak_extra_ratio"] <= copied / param + 0.02
    # a device source rolls back only where it is free: from the dummy weights (no device->host copy)
    assert swapped["source"] == "device" and swapped["rollback_kind"] == "dummy" and swapped["device_put_reshards"] == 0
    assert run.phase("mllm_params_device_ready")["aliasable_bytes_sum"] == aliased
    # rounds B (0.02 - A, on the devices), A again: the trainer's arrays the engine let go are the trainer's, not leaks
    rounds = [r for r in run.records if r["phase"] == "swap_round"]
    assert [r["weights"] for r in rounds] == ["B", "A"] and rounds[1]["output_ids"] == reference_output_ids(folder, tp)
    assert rounds[0]["replaced_shared_with_trainer"] > 0 and all(r["replaced_still_alive"] == 0 for r in rounds)


@pytest.mark.parametrize("tp,tied,kv_heads", [(4, False, 2)])  # tp 2: the alias matrix
def test_fsdp_trainer_swaps_device_to_device(checkpoint, tp, tied, kv_heads):
    folder = checkpoint(tied=tied, num_kv_heads=kv_heads)
    run = run_tool(*swap_args(folder, tp, "--weights-source", "trainer", "--verify-weights", "--keep-param-dict",
                              "--bucket-mb", "1"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.summary["ok"], run.summary
    assert run.phase("generate_result")["output_ids"] == reference_output_ids(folder, tp)
    swapped = run.phase("weights_swapped_from_mllm")
    assert run.phase("mllm_params_device_ready")["trainer_sharding"] == "fsdp"
    assert swapped["aliased_bytes_sum"] == 0 and swapped["trainer_only_bytes_sum"] == swapped["trainer_bytes_sum"] > 0
    assert swapped["swap_peak_extra_ratio"] <= GATE_BYTES / swapped["param_bytes_sum"] + 0.02  # 1 MiB buckets
    # the engine's part is one set while the trainer holds its own
    single = run.summary["checks"]["single_copy_memory"]
    assert single["ok"] and single["weights_swapped_from_mllm"] == swapped["engine_bytes_sum"]


def test_single_copy_fails_when_a_device_swap_keeps_a_second_set(checkpoint):
    """With a trainer present, single_copy_memory subtracts only the trainer's own arrays: a second engine-side
    copy made during a device-to-device swap must still fail it."""
    run = run_tool("device_copy_kept", *swap_args(checkpoint(tied=True, num_kv_heads=2), 4,
                                                  "--weights-source", "trainer", "--max-new-tokens", "2"),
                   script=MUTATED)
    assert run.returncode == 1, run.stderr[-2000:]
    assert_checks_failed(run.summary["checks"], "single_copy_memory")


def test_rl_loop_through_the_api(checkpoint, tmp_path):
    """K jitted trainer steps on the devices, a swap and a generation after each; then the final tree saved as
    a checkpoint and loaded by sglang-jax's own loader must answer exactly as the swapped engine did."""
    folder = checkpoint(tied=False, num_kv_heads=1)  # tp 4: KV heads repeated and the lm_head transposed on device
    [result] = run_script(os.path.join(ROOT, "tests", "rl_loop_probe.py"), folder, str(tmp_path), "4", "3")
    steps = result["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2]
    for s in steps:
        assert s["device_to_host_copies"] == 0 and s["device_put_reshards"] == 0 and s["source"] == "device"
        assert s["leaves_unchanged"] and s["replaced_still_alive"] == 0
        assert s["swap_compiles"] == 0  # prepare_swap compiled it all before generation was paused
        assert s["finite_check_s"] > 0
    # the NaN/Inf check: the first swap (rollback: the dummy initialiser) checks each bucket as placed; later
    # ones have no rollback (a device source) and check the tree first; on CPU numpy reads the devices' buffers
    # in place, so no count is read back unless a tensor holds a NaN (the diverged step below)
    assert [s["finite_check"] for s in steps] == ["target", "source", "source"]
    assert [s["device_to_host_counts"] for s in steps] == [0, 0, 0]
    # the first swap compiles the layout's transforms; a later swap of the same layout compiles nothing
    assert steps[0]["prepare_compiles"] > 0 and [s["prepare_compiles"] for s in steps[1:]] == [0, 0]
    # (host RSS is no proof on CPU: the devices' buffers are host memory too, and it moved by 0.06-0.63 of a
    # set between runs; the counted device->host copies above are the proof)
    after = [s["bytes_in_use_sum_after_swap"] for s in steps]
    assert max(after) - min(after) <= 0.02 * steps[0]["param_bytes_sum"]  # flat across steps
    assert len({tuple(s["output_ids"]) for s in steps}) == 3  # every step's weights answer differently
    assert result["final_output_ids"] == reference_output_ids(str(tmp_path / "final"), 4)
    # alias: the same weights, zero copy where the layout allows; then the trainer donates them
    alias = result["alias"]
    assert alias["aliased_bytes_sum"] > 0 and alias["output_ids"] == result["final_output_ids"]
    assert result["donated_deleted"] > 0
    assert result["after_donation"]["stage"] == "engine_weights_deleted"
    assert result["after_donation"]["exit_code"] == 3
    assert result["after_reswap_output_ids"] == result["final_output_ids"]
    # a diverged step (one NaN): refused with exit 2 whether the whole tree is checked before any of it is
    # assigned (no rollback) or each bucket as placed (a copy rollback: the buckets before it are put back); the
    # engine answers as before
    diverged = result["diverged"]
    for name, where in (("no_rollback", "in the tree"), ("rollback", "placed on the devices")):
        error = diverged[name]
        assert error["stage"] == "weights_finite" and error["exit_code"] == 2, error
        assert error["nonfinite"] == {"model.layers_0.mlp.up_proj.kernel": 1} and where in error["error"]
        assert error["restored"] is True and error["output_ids"] == result["final_output_ids"]
    assert diverged["no_rollback"]["assigned"] == 0  # nothing assigned: the engine as it was
    assert diverged["rollback"]["assigned"] > 0  # a real restore: buckets were assigned before the refusal
    allowed = diverged["allowed"]
    assert allowed["finite_check"] == "off" and allowed["leaves_unchanged"]
    assert allowed["output_ids"] != result["final_output_ids"]  # the NaN weights are what the engine runs


def test_api_example_runs(checkpoint):
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "docs", "api.md")).read(), re.S)
    code = next(b for b in blocks if 'CKPT = os.environ["CKPT"]' in b)  # "An RL loop"
    folder = checkpoint(tied=True, num_kv_heads=2)
    env = {**clean_env(), "CKPT": folder, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    lines = run_script("-c", code, env=env)
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert all(len(line["output_ids"]) == 12 and line["peak_extra"] < 0.2 for line in lines)


def test_trainer_flags_need_the_trainer_source(checkpoint):
    run = run_tool("--model-id", checkpoint(), "--device", "cpu", "--tp-size", "4", "--alias")
    assert run.returncode == 2 and run.records[0]["stage"] == "arguments"
    assert "--weights-source trainer" in run.records[0]["error"]
