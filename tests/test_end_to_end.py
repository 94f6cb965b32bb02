"""The demo end to end, and the swapped engine against sglang-jax's own loader (the heart)."""

import pytest
from conftest import (
    CONSOLE_SCRIPT,
    MAX_NEW,
    MUTATED,
    PROMPT,
    assert_checks_failed,
    assert_phase_keys,
    clean_env,
    reference_output_ids,
    run_tool,
)

from param_swap import checkpoint as ckpt
from param_swap import flags

pytestmark = pytest.mark.engine  # make test-fast leaves these out

DEMO_PHASES = ["jax_ready", "engine_ready_dummy", "generate_before_swap", "mllm_params_cpu_ready",
               "sglang_param_dict_ready", "weights_swapped_from_mllm", "param_sharing_check", "weights_verified",
               "before_generate_param_dict_kept", "generate_result", "logits_verified", "after_drop_param_dict",
               "summary"]
ORACLES = ("--verify-weights", "--verify-logits")


def swap_args(folder, tp, *extra):
    return ["--model-id", folder, "--device", "cpu", "--tp-size", str(tp), "--prompt", PROMPT,
            "--max-new-tokens", str(MAX_NEW), *extra]


@pytest.mark.fast
def test_demo(tmp_path):
    """The demo as an installed user runs it: the console script `run-param-swap`, from another folder."""
    env = {**clean_env(), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    run = run_tool("--demo", "--demo-dir", str(tmp_path / "demo"), "--json-out", str(tmp_path / "demo.jsonl"),
                   "--plot", str(tmp_path / "memory.png"), "--wandb", env=env, script=CONSOLE_SCRIPT,
                   cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    # the human-readable table on stderr, the plot, the offline W&B run
    table = run.stderr[run.stderr.index("device bytes in use (sum)"):]
    for phase in DEMO_PHASES[:-1]:
        assert phase in table
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert run.phases() == DEMO_PHASES
    assert_phase_keys(run, "demo")
    assert run.summary["ok"] is True
    assert set(run.summary["checks"]) == {"leaves_unchanged", "param_sharing", "generate", "swap_effective",
                                          "single_copy_memory", "weights_equal_loader", "logits_match_reference"}
    assert all(c["ok"] for c in run.summary["checks"].values())
    # --max-new-tokens' default, exactly as generated: the independent reference's argmax at every position
    # (teacher-forced on the engine's own tokens, agreement everywhere = its greedy decode is the same sequence)
    new_tokens = flags.parse_args([]).max_new_tokens
    result, logits = run.phase("generate_result"), run.phase("logits_verified")
    assert len(result["output_ids"]) == result["meta_info"]["completion_tokens"] == new_tokens
    assert logits["reference_argmax"] == result["output_ids"] and logits["argmax_agreement"] == f"{new_tokens}/{new_tokens}"
    # one Param per tensor of the demo checkpoint (kept in --demo-dir), each checked
    params = len(ckpt.expected_tensors(ckpt.read_checkpoint_info(str(tmp_path / "demo"))))
    assert run.phase("weights_verified")["paths_checked"] == params and run.phase("weights_verified")["differing"] == {}
    for record in run.records[:-1]:
        summary = record["memory"]["jax_device_memory_summary"]
        assert record["memory"]["source"] == "live_arrays" and record["memory"]["process_rss_bytes"] > 0
        assert len(record["memory"]["jax_device_memory_stats"]) == 4
        if record["phase"] != "jax_ready":
            assert summary["bytes_in_use_sum"] > 0 and summary["bytes_in_use_min"] > 0
    dummy = run.phase("engine_ready_dummy")
    swapped = run.phase("weights_swapped_from_mllm")
    kept = run.phase("before_generate_param_dict_kept")
    base = dummy["memory"]["jax_device_memory_summary"]["bytes_in_use_sum"]
    # one set of params, even with the caller's dict alive: within 2% of the dummy engine
    for rec in (swapped, kept):
        assert rec["memory"]["jax_device_memory_summary"]["bytes_in_use_sum"] <= base * 1.02
    assert swapped["param_bytes_sum"] == dummy["param_bytes_sum"] > 0
    assert run.phase("param_sharing_check")["paths_checked"] == dummy["num_params"] == params
    assert (tmp_path / "demo.jsonl").read_text().splitlines() == run.stdout.strip().splitlines()
    assert run.phase("generate_result")["output_ids"] != run.phase("generate_before_swap")["output_ids"]


# (tp, tied, num_kv_heads, num_shards, file dtype): each value of each axis appears at least once, and KV heads
# repeated (tp 2 > 1 KV head) as well as split. The placed arrays of many more (family, tp, tied, KV)
# combinations are compared with the loader's, without an engine, in tests/test_families.py (tp 4, untied, 1 KV
# head: also with an engine, from the trainer's arrays, in tests/test_trainer.py); these run the whole tool and
# a second engine (sglang-jax's own loader) each.
MATRIX = [
    (1, True, 2, 1, "bfloat16"),
    (2, False, 1, 3, "float32"),
    (4, True, 4, 2, "bfloat16"),
]


@pytest.mark.parametrize("tp,tied,kv_heads,shards,dtype", MATRIX)
def test_swapped_engine_matches_sglang_loader(checkpoint, tp, tied, kv_heads, shards, dtype):
    folder = checkpoint(tied=tied, num_kv_heads=kv_heads, num_shards=shards, dtype=dtype)
    run = run_tool(*swap_args(folder, tp, *ORACLES))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.summary["ok"], run.summary
    assert run.summary["checks"]["weights_equal_loader"]["ok"] and run.summary["checks"]["logits_match_reference"]["ok"]
    assert run.phase("generate_result")["output_ids"] == reference_output_ids(folder, tp)


def test_torch_source_bulk_mode_and_fp32_host_tree_match_too(checkpoint):
    folder = checkpoint(tied=True, num_kv_heads=2)
    run = run_tool(*swap_args(folder, 4, "--weights-source", "torch", "--swap-mode", "bulk",
                              "--mllm-param-dtype", "float32", "--verify-param-sharing", "--keep-param-dict", *ORACLES))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.summary["checks"]["weights_equal_loader"]["ok"] and run.summary["checks"]["logits_match_reference"]["ok"]
    assert run.phase("generate_result")["output_ids"] == reference_output_ids(folder, 4)
    assert run.phase("mllm_params_cpu_ready")["weights_source"] == "torch"
    assert 0.95 <= run.phase("weights_swapped_from_mllm")["swap_peak_extra_ratio"] <= 1.05  # bulk: two sets


def test_rounds_repeat_answers_without_leaking(checkpoint):
    folder = checkpoint(tied=False, num_kv_heads=2)
    run = run_tool(*swap_args(folder, 4, "--rounds", "4", "--verify-weights", "--bucket-mb", "1"))
    assert run.returncode == 0, run.stderr[-3000:]
    # the first swap and both A rounds against the loader (the perturbed B has no checkpoint to load)
    assert run.summary["checks"]["weights_equal_loader"]["swaps_checked"] == 3
    assert [r["swap"] for r in run.records if r["phase"] == "weights_verified"] == ["first swap", "round 2", "round 4"]
    rounds = [r for r in run.records if r["phase"] == "swap_round"]
    assert [r["weights"] for r in rounds] == ["B", "A", "B", "A"]
    reference = reference_output_ids(folder, 4)
    assert run.phase("generate_result")["output_ids"] == reference
    assert [r["output_ids"] for r in rounds if r["weights"] == "A"] == [reference, reference]
    assert rounds[0]["output_ids"] == rounds[2]["output_ids"] != reference
    checks = run.summary["checks"]
    assert checks["rounds_consistent"]["ok"] and checks["rounds_no_leak"]["ok"]
    first = run.phase("weights_swapped_from_mllm")["memory"]["jax_device_memory_summary"]["bytes_in_use_sum"]
    assert all(r["bytes_in_use_sum_after_swap"] <= first * 1.02 for r in rounds)
    assert all(r["replaced_still_alive"] == 0 for r in rounds)
    # streaming with a rollback that re-creates (dummy, then source): each bucket's previous arrays are deleted
    # before its new ones are placed, so the peak is one set (it was one set + one 1 MiB bucket, 0.09 of it)
    swapped = run.phase("weights_swapped_from_mllm")
    for swap in (swapped, *rounds):
        assert swap["swap_peak_extra_ratio"] <= 0.01 and swap["freed_first_bytes_sum"] == swap["param_bytes_sum"]
    assert swapped["buckets"] > 10 and swapped["rollback_kind"] == "dummy" and swapped["backup_s"] == 0
    assert [(r["rollback_kind"], r["backup_s"]) for r in rounds] == [("source", 0)] * 4  # rollback costs nothing


def test_second_checkpoint_as_b(checkpoint, tmp_path):
    a = checkpoint(tied=True, num_kv_heads=2)
    b = checkpoint(tied=True, num_kv_heads=2, seed=7)
    run = run_tool(*swap_args(a, 4, "--rounds", "2", "--model-id-b", b, "--verify-weights"))
    assert run.returncode == 0, run.stderr[-3000:]
    verified = [r for r in run.records if r["phase"] == "weights_verified"]
    assert [(r["swap"], r["model_path"], r["ok"]) for r in verified] == [("first swap", a, True), ("round 1", b, True),
                                                                         ("round 2", a, True)]
    rounds = [r for r in run.records if r["phase"] == "swap_round"]
    assert rounds[0]["output_ids"] == reference_output_ids(b, 4)
    assert rounds[1]["output_ids"] == reference_output_ids(a, 4)


# --- the checks themselves must be able to fail -------------------------------------------------------------


def test_mutation_no_rebind_fails_swap_effective(checkpoint):
    folder = checkpoint(tied=True, num_kv_heads=2)
    run = run_tool("no_rebind", *swap_args(folder, 4), script=MUTATED)
    assert run.returncode == 1
    # the leaves list still holds the dummies (the forward answers as before the swap) beside the Params' new set
    assert_checks_failed(run.summary["checks"], "swap_effective", "leaves_unchanged", "single_copy_memory")
    assert run.phase("generate_result")["output_ids"] == run.phase("generate_before_swap")["output_ids"]
    assert run.phase("generate_result")["output_ids"] != reference_output_ids(folder, 4)


def test_mutation_one_param_left_dummy_fails_leaves_unchanged(checkpoint):
    folder = checkpoint(tied=True, num_kv_heads=2)
    run = run_tool("skip_one_param", *swap_args(folder, 4, "--max-new-tokens", "2"), script=MUTATED)
    assert run.returncode == 1
    assert_checks_failed(run.summary["checks"], "leaves_unchanged")
    leaves = run.summary["checks"]["leaves_unchanged"]
    assert leaves["params_swapped"] == leaves["params_in_model"] - 1


def test_mutation_copy_in_dict_fails_buffer_sharing(checkpoint):
    folder = checkpoint(tied=True, num_kv_heads=2)
    run = run_tool("copy_in_dict", *swap_args(folder, 4, "--verify-param-sharing", "--max-new-tokens", "2"),
                   script=MUTATED)
    assert run.returncode == 1
    assert_checks_failed(run.summary["checks"], "param_sharing")
    sharing = run.summary["checks"]["param_sharing"]
    assert len(sharing["not_same_buffer"]) == 1 and len(sharing["not_identical"]) == 1


def test_mutation_answer_one_id_short_fails_generate(checkpoint):
    """The tool's record of every answer misses its last id: the count no longer matches completion_tokens,
    whatever the weights (the swap itself is right, and every other check passes)."""
    run = run_tool("recorder_drops_last_token", *swap_args(checkpoint(tied=True, num_kv_heads=2), 4), script=MUTATED)
    assert run.returncode == 1, run.stderr[-3000:]
    assert_checks_failed(run.summary["checks"], "generate")
    check = run.summary["checks"]["generate"]
    assert check["num_tokens"] == [MAX_NEW - 1] * 2 and set(check["inconsistent"]) == {"generate_before_swap",
                                                                                       "generate_result"}
    for problems in check["inconsistent"].values():
        assert f"{MAX_NEW - 1} ids, completion_tokens {MAX_NEW}, max_new_tokens {MAX_NEW}" in problems


@pytest.mark.parametrize("mutation, failing", [
    ("stale_tensor_in_round", "rounds_consistent"),  # round 2 (A again) keeps one tensor of B
    ("replaced_kept_in_rounds", "rounds_no_leak"),   # each round's replaced set stays referenced
    ("copy_kept_in_rounds", "rounds_no_leak"),       # each round keeps a copy of what it placed: memory alone
])
def test_each_rounds_check_fails_on_its_defect(checkpoint, mutation, failing):
    folder = checkpoint(tied=True, num_kv_heads=2)
    run = run_tool(mutation, *swap_args(folder, 4, "--rounds", "2"), script=MUTATED)
    assert run.returncode == 1, run.stderr[-3000:]
    assert_checks_failed(run.summary["checks"], failing)  # the first swap's own checks all pass
    check = run.summary["checks"][failing]
    if failing == "rounds_consistent":  # round 1 (B) was right, round 2 (A) no longer answers as the first swap
        assert (check["b_rounds_equal"], check["a_rounds_equal"], check["a_rounds"]) == (1, 0, 1)
        return
    # one more set of the params on the devices after each round: round r holds r sets more than the first swap
    first = run.phase("weights_swapped_from_mllm")["engine_bytes_sum"]
    params = run.phase("engine_ready_dummy")["param_bytes_sum"]
    assert [f["round"] for f in check["failed_rounds"]] == [1, 2]
    for f in check["failed_rounds"]:
        assert f["engine_bytes_sum"] - first == pytest.approx(f["round"] * params, rel=0.02)
        assert f["leaves_ok"] is (mutation == "copy_kept_in_rounds")  # replaced arrays alive: the leaves check too
