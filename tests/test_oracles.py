"""The independent oracles inside the tool run (--verify-weights, --verify-logits): they pass correct swaps
(whatever the model answers) and they catch the layout errors that every structural check passes."""

import json
import shutil

import pytest
from conftest import MAX_NEW, MUTATED, PROMPT, assert_checks_failed, reference_output_ids, run_tool
from test_end_to_end import ORACLES, swap_args
from test_errors import assert_error

from param_swap import checkpoint as ckpt

pytestmark = pytest.mark.engine  # make test-fast leaves these out

ORACLE_CHECKS = ("weights_equal_loader", "logits_match_reference")

# mutation -> the engine paths weights_equal_loader must name (all of them, and no other)
PLANTED = {
    "gate_up_swapped": {f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1) for p in ("gate", "up")},
    "kv_heads_tiled": {f"model.layers.{i}.self_attn.{p}_proj.{w}" for i in (0, 1) for p in "kv" for w in ("weight", "bias")},
    "layers_swapped": None,  # every Param of layers 0 and 1 (20 are listed): checked by count below
    "kernel_shifted": {"model.layers.0.mlp.down_proj.weight"},
    "norm_left_dummy": {"model.layers.0.post_attention_layernorm.scale"},
}


@pytest.mark.parametrize("mutation", sorted(PLANTED))
def test_planted_layout_error_passes_structural_checks_and_fails_both_oracles(checkpoint, mutation):
    folder = checkpoint(tied=True, num_kv_heads=2)  # 2 KV heads at tp 4: each head on 2 devices
    run = run_tool(mutation, *swap_args(folder, 4, "--verify-param-sharing", *ORACLES), script=MUTATED)
    assert run.returncode == 1, run.stderr[-3000:]
    checks = run.summary["checks"]
    # the blind spot: every check that compares nothing with the checkpoint passes
    structural = {k: v["ok"] for k, v in checks.items() if k not in ORACLE_CHECKS}
    assert structural == {"leaves_unchanged": True, "param_sharing": True, "generate": True, "swap_effective": True,
                          "single_copy_memory": True}
    assert_checks_failed(checks, *ORACLE_CHECKS)
    named = set(run.phase("weights_verified")["differing"])
    if PLANTED[mutation] is None:
        layers = [n for n in ckpt.expected_tensors(ckpt.read_checkpoint_info(folder)) if ".layers." in n]
        assert run.phase("weights_verified")["num_differing"] == len(layers)  # both layers, every Param
        assert all(".layers.0." in p or ".layers.1." in p for p in named)
    else:
        assert named == PLANTED[mutation]
    for problems in run.phase("weights_verified")["differing"].values():
        assert problems["differing_elements"] > 0 and problems["max_abs_diff"] > 0
        assert len(problems["first_differing_index"]) in (1, 2)
    logits = checks["logits_match_reference"]
    assert logits["max_abs_logprob_diff"] > logits["logprob_tolerance"] or logits["max_margin"] > logits["argmax_margin"]


def test_weights_check_fails_every_mismatched_round_and_keeps_the_first_failure(checkpoint):
    """With --rounds, weights_equal_loader runs after every swap to a checkpoint (A here; the perturbed B has
    none): a defect in every swap fails each of them, and the check keeps the first failure's details."""
    folder = checkpoint(tied=True, num_kv_heads=2)
    run = run_tool("kernel_shifted", *swap_args(folder, 4, "--rounds", "2", "--verify-weights"), script=MUTATED)
    assert run.returncode == 1, run.stderr[-3000:]
    check = run.summary["checks"]["weights_equal_loader"]
    assert not check["ok"] and check["swaps_checked"] == 2 and check["failed_swaps"] == ["first swap", "round 2"]
    assert set(check["differing"]) == {"model.layers.0.mlp.down_proj.weight"}
    assert [(r["swap"], r["ok"]) for r in run.records if r["phase"] == "weights_verified"] == [
        ("first swap", False), ("round 2", False)]
    assert run.summary["checks"]["rounds_consistent"]["ok"]  # the defect is the same every time: invisible there


def test_a_failure_of_the_oracle_itself_is_exit_3_and_never_reaches_the_loader(checkpoint):
    """An exception inside the oracle's compare is the oracle failing (exit 3), not a check verdict; it must not
    reach sglang-jax's loader, whose fast path would take it for its own failure and load the tensor again
    (which the oracle then counted as loaded_twice: the serving demo's false failure)."""
    run = run_tool("compare_raises", *swap_args(checkpoint(tied=True, num_kv_heads=2), 4, "--verify-weights"),
                   script=MUTATED)
    assert_error(run, 3, "weights_verified", "oracle failed", "injected failure")
    assert "weights_equal_loader" not in run.summary["checks"] and "Fast load failed" not in run.stderr


def test_eos_first_checkpoint_passes(checkpoint, tmp_path):
    """A checkpoint whose EOS is the first token the swapped engine picks: the answer used to be empty
    (check generate failed, exit 1) although sglang-jax's own loader answers the same. With ignore_eos every
    answer has max_new_tokens tokens; finish_reason says length, swap_effective still compares 12 tokens."""
    src = checkpoint(tied=True, num_kv_heads=2)
    first = reference_output_ids(src, 4)[0]
    folder = tmp_path / "eos_first"
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = config["bos_token_id"] = first
    (folder / "config.json").write_text(json.dumps(config))
    run = run_tool(*swap_args(str(folder), 4, *ORACLES))
    assert run.returncode == 0, (run.summary, run.stderr[-3000:])
    result = run.phase("generate_result")
    assert result["output_ids"][0] == first and len(result["output_ids"]) == MAX_NEW
    assert result["finish_reason"]["type"] == "length"
    assert run.summary["checks"]["swap_effective"]["ok"]


def test_float32_engine_passes_both_oracles(checkpoint):
    folder = checkpoint(tied=False, num_kv_heads=2)
    run = run_tool(*swap_args(folder, 1, "--dtype", "float32", *ORACLES))  # tp 1: see bench/oracle_thresholds.py
    assert run.returncode == 0, (run.summary, run.stderr[-3000:])
    logits = run.summary["checks"]["logits_match_reference"]
    assert logits["engine_dtype"] == "float32" and logits["logprob_tolerance"] == 0.1 and logits["max_abs_logprob_diff"] < 1e-3
    assert logits["argmax_agreement"] == f"{MAX_NEW}/{MAX_NEW}"


def test_chat_wraps_the_prompt_with_the_template(checkpoint):
    folder = checkpoint(tied=True, num_kv_heads=2)
    run = run_tool(*swap_args(folder, 4, "--chat", "--verify-logits"))
    assert run.returncode == 0, run.stderr[-3000:]
    prompt = run.phase("generate_before_swap")["prompt"]
    assert prompt.startswith("<|im_start|>user\n" + PROMPT) and prompt.endswith("<|im_start|>assistant\n")
    assert run.phase("generate_result")["prompt"] == prompt


def test_chat_without_a_template_is_bad_input(checkpoint):
    run = run_tool(*swap_args(checkpoint(chat_template=False), 4, "--chat"))
    assert_error(run, 2, "arguments", "chat template")
    assert "engine_ready_dummy" not in run.phases()


def test_verify_logits_without_torch_is_bad_input(checkpoint):
    run = run_tool("no_torch", *swap_args(checkpoint(), 4, "--verify-logits"), script=MUTATED)
    assert_error(run, 2, "arguments", "torch", "pip install")
    assert "engine_ready_dummy" not in run.phases()
