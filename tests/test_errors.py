"""Bad input and faults: one error line with a stage and a message that names the problem, then the summary
(ok: false), and the documented exit code. Nothing is left behind."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import MUTATED, TOOL, assert_phase_keys, clean_env, run_tool
from safetensors.numpy import load_file, save_file

from param_swap import checkpoint as ckpt
from param_swap import errors, families, planning
from param_swap import sglang_adapter as adapter

CPU4 = ["--device", "cpu", "--tp-size", "4", "--max-new-tokens", "4"]


def assert_error(run, code: int, stage: str, *words: str) -> dict:
    assert run.returncode == code, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
    errors = [r for r in run.records if r["phase"] == "error"]
    assert len(errors) == 1, run.stdout
    error = errors[0]
    assert error["stage"] == stage, error
    for word in words:
        assert word.lower() in (error["error"] + " " + error["hint"]).lower(), (word, error)
    assert run.records[-1]["phase"] == "summary" and run.records[-1]["ok"] is False
    assert run.records.index(error) == len(run.records) - 2
    assert "Traceback" not in run.stdout
    if code == 2:  # bad input: the error line says it all, no traceback on stderr either
        assert "Traceback" not in run.stderr, run.stderr[-2000:]
    return error


@pytest.fixture
def ckpt_copy(checkpoint, tmp_path):
    def make(**kw) -> str:
        dst = tmp_path / "ckpt"
        shutil.copytree(checkpoint(**kw), dst)
        return str(dst)

    return make


def rewrite_tensors(folder: str, change) -> None:
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# --- usage, before JAX starts ------------------------------------------------------------------------------


@pytest.mark.parametrize("args,words", [
    (["--prompt", ""], ["--prompt", "empty"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens 0"]),
    (["--max-running-requests", "0"], ["--max-running-requests 0"]),
    (["--mem-fraction-static", "1.5"], ["--mem-fraction-static 1.5"]),
    (["--max-total-tokens", "0"], ["--max-total-tokens 0"]),
    (["--serve-load", "-1"], ["--serve-load -1"]),
    (["--arch", "qwen3"], ["--arch qwen3", "--demo"]),
    (["--serve-load", "2", "--serve-seconds", "0"], ["--serve-seconds 0"]),
    (["--serve-load", "2", "--max-new-tokens", "2100"], ["--serve-load", "longest request", "--max-new-tokens"]),
])
def test_usage_errors(checkpoint, args, words):
    run = run_tool("--model-id", checkpoint(), *CPU4, *args)
    assert_error(run, 2, "arguments", *words)


def test_dp_size_is_gone():
    """sglang-jax's single-process engine, which the in-place swap needs, runs dp_size 1: the flag is gone."""
    assert_error(run_tool("--demo", "--dp-size", "1"), 2, "arguments", "unrecognized arguments: --dp-size")


@pytest.mark.parametrize("args, words", [
    (["--bucket-mbb", "3"], ["unrecognized arguments: --bucket-mbb 3", "did you mean --bucket-mb (not --bucket-mbb)"]),
    (["--verify-logist"], ["did you mean --verify-logits (not --verify-logist)"]),
    (["--bucket-mb", "abc"], ["argument --bucket-mb: invalid float value: 'abc'"]),
    (["--bucket-mb"], ["argument --bucket-mb: expected one argument"]),
    (["--arch", "gpt5"], ["argument --arch: invalid choice: 'gpt5'", "qwen3_moe"]),
    (["--rl"], ["ambiguous option: --rl could match", "--rl-steps"]),
    (["--rl-steps", "2", "--serve-load", "2"], ["--rl-steps", "--serve-load"]),  # conflicting flags
])
def test_a_command_line_that_does_not_parse_is_one_error_line(args, words, tmp_path):
    """Every kind of argument error (unknown flag, bad or missing value, out of its choices, ambiguous,
    conflicting) ends as every bad input does: one strict-JSON error line (stage arguments) and the summary on
    stdout, also in --json-out, exit 2; argparse's short usage and message still on stderr."""
    out = tmp_path / "out.jsonl"
    run = run_tool("--demo", "--json-out", str(out), *args)
    error = assert_error(run, 2, "arguments", *words)
    assert error["exit_code"] == 2 and [json.loads(line) for line in out.read_text().splitlines()] == run.records
    if len(args) < 4:  # argparse's own refusals keep its stderr
        assert run.stderr.startswith("usage: ") and f"error: {error['error']}" in run.stderr


def test_help_is_argparse_s():
    run = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: ") and "--bucket-mb BUCKET_MB" in run.stdout


def test_an_error_line_has_the_keys_it_always_had():
    assert_phase_keys(run_tool("--demo", "--max-new-tokens", "0"), "error")


def test_an_sglang_jax_without_what_the_swap_needs_is_bad_input_before_the_engine_starts(checkpoint):
    """The capability probe: one attribute the adapter uses is missing (as in the registry's 0.0.2, which also
    lacks others: tests/test_compat.py runs it)."""
    run = run_tool("sglang_lacks_pause", "--model-id", checkpoint(), *CPU4, script=MUTATED)
    error = assert_error(run, 2, "sglang_jax", "Scheduler.pause_generation", "0.0.3rc99", "supported stack")
    assert error["versions"]["sglang-jax"] == "0.0.3rc99" and error["missing"] == [
        "sgl_jax.srt.managers.scheduler.Scheduler.pause_generation"]
    assert set(error["supported_stacks"]) == set(adapter.SUPPORTED_STACKS) and "engine_ready_dummy" not in run.phases()


def test_json_out_in_missing_folder(checkpoint, tmp_path):
    run = run_tool("--model-id", checkpoint(), *CPU4, "--json-out", str(tmp_path / "nope" / "out.jsonl"))
    assert_error(run, 2, "arguments", "--json-out", "folder")


def test_device_conflicts_with_jax_platforms(checkpoint):
    env = {**clean_env(), "JAX_PLATFORMS": "cpu"}
    run = run_tool("--model-id", checkpoint(), "--device", "tpu", "--tp-size", "4", env=env)
    assert_error(run, 2, "arguments", "--device tpu", "JAX_PLATFORMS=cpu")


# --- parallelism -------------------------------------------------------------------------------------------


def test_tp_must_divide_heads(checkpoint):
    run = run_tool("--model-id", checkpoint(), "--device", "cpu", "--tp-size", "3")
    assert_error(run, 2, "arguments", "--tp-size 3", "4 attention heads")


def test_tp_must_equal_devices(checkpoint):
    env = {**clean_env(), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    run = run_tool("--model-id", checkpoint(), "--tp-size", "2", env=env)
    assert_error(run, 2, "arguments", "--tp-size 2 != 4 devices")


@contextlib.contextmanager
def one_core():
    """This process (and so the tool it starts) on one core."""
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)


@pytest.mark.parametrize("dtype, file_dtype", [("float32", "bfloat16"), ("auto", "float32")])
def test_a_float32_engine_on_more_cpu_devices_than_cores_is_refused(checkpoint, dtype, file_dtype):
    """XLA's CPU all-reduce deadlocks there and aborts the process after 40 s with no line (measured: 4 devices
    on 2 cores, 2 on 1): refused before the engine starts. On one core, so on any machine."""
    with one_core():
        run = run_tool("--model-id", checkpoint(dtype=file_dtype), "--device", "cpu", "--tp-size", "2",
                       "--dtype", dtype)
    error = assert_error(run, 2, "arguments", "a float32 engine on 2 CPU devices with 1 core", "--dtype bfloat16",
                         "--tp-size 1 or less")
    assert (error["devices"], error["cores"]) == (2, 1)
    assert "engine_ready_dummy" not in run.phases()


@pytest.mark.engine
def test_a_bfloat16_engine_on_more_cpu_devices_than_cores_runs(checkpoint):
    with one_core():
        run = run_tool("--model-id", checkpoint(), "--device", "cpu", "--tp-size", "2", "--dtype", "bfloat16",
                       "--max-new-tokens", "4")
    assert run.returncode == 0, (run.records[-2:], run.stderr[-2000:])


def test_the_documented_float32_command_on_this_machine(checkpoint):
    """The issue's command, `--dtype float32 --tp-size 4 --device cpu`: refused on fewer than 4 cores, else it
    is not this refusal."""
    run = run_tool("--model-id", checkpoint(), "--dtype", "float32", "--tp-size", "4", "--device", "cpu",
                   "--max-new-tokens", "4")
    if len(os.sched_getaffinity(0)) < 4:
        assert_error(run, 2, "arguments", "a float32 engine on 4 CPU devices", "all-reduce deadlocks")
    else:
        assert "all-reduce deadlocks" not in run.stdout


# --- the checkpoint ----------------------------------------------------------------------------------------


def test_missing_local_folder():
    run = run_tool("--model-id", "/nonexistent/qwen-ckpt", *CPU4)
    assert_error(run, 2, "checkpoint", "/nonexistent/qwen-ckpt", "does not exist")


@pytest.mark.parametrize("env_extra", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["hf_hub_offline", "unreachable_hub"])
def test_hub_id_without_network(tmp_path, env_extra):
    env = {**clean_env(), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "3", **env_extra}
    run = run_tool("--model-id", "Qwen/Qwen2.5-3B-Instruct", *CPU4, env=env, timeout=300)
    assert_error(run, 2, "checkpoint", "Qwen/Qwen2.5-3B-Instruct", "offline", "--local-dir")


def test_unsupported_architecture(ckpt_copy):
    folder = ckpt_copy()
    config_path = os.path.join(folder, "config.json")
    config = json.load(open(config_path))
    config["architectures"] = ["MistralForCausalLM"]
    json.dump(config, open(config_path, "w"))
    run = run_tool("--model-id", folder, *CPU4)
    assert_error(run, 2, "checkpoint", "MistralForCausalLM", *families.SUPPORTED_ARCHITECTURES)


def test_missing_kv_heads_is_what_transformers_assumes(ckpt_copy):
    """config.json without num_key_value_heads: the engine (through transformers' Qwen2Config) sees 32 KV heads
    for 4 attention heads and would die inside its scheduler; the tool names the field and HF's value."""
    folder = ckpt_copy()
    config = json.load(open(os.path.join(folder, "config.json")))
    del config["num_key_value_heads"]
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    run = run_tool("--model-id", folder, *CPU4)
    assert_error(run, 2, "checkpoint", "num_key_value_heads", "transformers assumes 32")
    assert "engine_ready_dummy" not in run.phases()


def test_prompt_beyond_the_token_budget_is_named_before_the_engine(checkpoint):
    run = run_tool("--model-id", checkpoint(), *CPU4, "--max-total-tokens", "8")
    assert_error(run, 2, "arguments", "--max-total-tokens 8", "prompt")
    assert "engine_ready_dummy" not in run.phases()


def test_missing_tensor(ckpt_copy):
    folder = ckpt_copy()
    rewrite_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    run = run_tool("--model-id", folder, *CPU4)
    assert_error(run, 2, "checkpoint", "model.layers.1.mlp.up_proj.weight: missing")


def test_wrong_shape(ckpt_copy):
    folder = ckpt_copy()

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:128]

    rewrite_tensors(folder, shrink)
    run = run_tool("--model-id", folder, *CPU4)
    assert_error(run, 2, "checkpoint", "model.layers.0.self_attn.k_proj.weight", "shape (128, 512)", "(256, 512)")


def test_integer_tensor_is_refused(ckpt_copy):
    folder = ckpt_copy()

    def quantize(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].view(np.int8)[:, :512]

    rewrite_tensors(folder, quantize)
    run = run_tool("--model-id", folder, *CPU4)
    assert_error(run, 2, "checkpoint", "model.layers.0.mlp.up_proj.weight: dtype I8", "floats only")


@pytest.mark.parametrize("damage", ["truncated", "garbage_header"])
def test_corrupt_safetensors(ckpt_copy, damage):
    folder = ckpt_copy()
    path = os.path.join(folder, "model.safetensors")
    if damage == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        with open(path, "r+b") as f:
            f.write(b"\xff" * 64)
    run = run_tool("--model-id", folder, *CPU4)
    assert_error(run, 2, "checkpoint", "model.safetensors", "truncated or corrupt")


def test_tensors_sized_for_another_model(ckpt_copy, checkpoint):
    folder = ckpt_copy()  # config: intermediate 1024; tensors from an intermediate-2048 model
    other = checkpoint(intermediate_size=2048)
    shutil.copy(os.path.join(other, "model.safetensors"), os.path.join(folder, "model.safetensors"))
    run = run_tool("--model-id", folder, *CPU4)
    assert_error(run, 2, "checkpoint", "6 tensor(s) do not match config.json", "config says (1024, 512)")


def test_b_checkpoint_of_other_sizes(checkpoint):
    run = run_tool("--model-id", checkpoint(), *CPU4, "--rounds", "2", "--model-id-b",
                   checkpoint(intermediate_size=2048))
    assert_error(run, 2, "checkpoint", "--model-id-b", "other sizes")
    assert "engine_ready_dummy" not in [r["phase"] for r in run.records]  # found before the engine started


def test_plan_refuses_what_the_engine_cannot_hold():
    """The second guard, against the engine's own Params (shapes, coverage), before any assignment."""
    import jax.numpy as jnp

    class P:
        def __init__(self, shape):
            self.v = jnp.zeros(shape, jnp.bfloat16)

        def get_value(self):
            return self.v

    params = {"model.norm.scale": P((8,)), "model.embed_tokens.embedding": P((16, 8))}
    flat = {"model.norm.scale": np.zeros(8, np.float32), "model.embed_tokens.embedding": np.zeros((16, 4), np.float32)}
    with pytest.raises(errors.ToolError, match=r"gives \(16, 4\), the engine has \(16, 8\)"):
        planning.plan_swap(flat, params, 1)
    with pytest.raises(errors.ToolError, match="model.embed_tokens.embedding: no source tensor"):
        planning.plan_swap({"model.norm.scale": flat["model.norm.scale"]}, params, 1)


# --- faults once the engine runs -----------------------------------------------------------------------------


def plan_size(folder: str) -> int:
    """The tensors a swap places: one per checkpoint tensor the config asks for (the tool's own reading)."""
    return len(ckpt.expected_tensors(ckpt.read_checkpoint_info(folder)))


@pytest.fixture(scope="module")
def one_mb_buckets(checkpoint) -> list[int]:
    """How a correct swap of the default test checkpoint packs 1 MB buckets (tensors per bucket)."""
    run = run_tool("--model-id", checkpoint(), *CPU4, "--bucket-mb", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    return run.phase("weights_swapped_from_mllm")["bucket_tensors"]


def assigned_before(bucket_tensors: list[int], failing: int) -> int:
    """Tensors assigned when the `failing`-th tensor of a swap (1-based) fails: every bucket before its own."""
    done = 0
    for n in bucket_tensors:
        if done + n >= failing:
            return done
        done += n
    raise AssertionError(f"tensor {failing} is past the plan {bucket_tensors}")


@pytest.mark.parametrize("swap, failing, extra, kind", [
    (1, 5, ["--bucket-mb", "1"], "dummy"),  # the first swap: sglang-jax's dummy initialiser again, no copy made
    (2, 10, ["--bucket-mb", "1", "--rounds", "1"], "source"),  # round 1: A placed again from its tree
    (2, 10, ["--bucket-mb", "1", "--rounds", "1", "--weights-source", "trainer", "--rollback"], "copy"),
    (1, 5, ["--swap-mode", "bulk"], "kept"),  # bulk assigns only once every tensor is placed
])
@pytest.mark.engine
def test_failure_mid_swap_restores_previous_weights(checkpoint, one_mb_buckets, swap, failing, extra, kind):
    tensors = plan_size(checkpoint())
    assert sum(one_mb_buckets) == tensors and len(one_mb_buckets) > 2  # 1 MB buckets: a real restore
    run = run_tool(f"fail_swap_at_{(swap - 1) * tensors + failing}", "--model-id", checkpoint(), *CPU4, *extra,
                   script=MUTATED)
    error = assert_error(run, 3, "swap", "RESOURCE_EXHAUSTED")
    assert error["restored"] is True and error["rollback"] == kind and error["previous_weights_answer_matches"] is True
    assigned = 0 if kind == "kept" else assigned_before(one_mb_buckets, failing)
    assert assigned > 0 or kind == "kept"
    assert f"after {assigned} of {tensors} tensors were assigned" in error["error"]
    if swap == 2:  # the round swaps the same plan as the first swap: packed the same
        assert run.phase("weights_swapped_from_mllm")["bucket_tensors"] == one_mb_buckets


@pytest.mark.engine
def test_wrong_rollback_is_seen(checkpoint):
    """Planted: the rollback re-creates B (0.02 - A) instead of A: the answer after the restore differs."""
    run = run_tool(f"fail_swap_at_{plan_size(checkpoint()) + 10}+rollback_from_b", "--model-id", checkpoint(), *CPU4,
                   "--bucket-mb", "1", "--rounds", "1", script=MUTATED)
    error = assert_error(run, 3, "swap", "RESOURCE_EXHAUSTED")
    assert error["restored"] is True and error["previous_weights_answer_matches"] is False


@pytest.mark.engine
def test_failure_mid_swap_without_rollback_is_reported(checkpoint):
    run = run_tool("fail_swap_at_5", "--model-id", checkpoint(), *CPU4, "--bucket-mb", "1", "--no-rollback",
                   script=MUTATED)
    error = assert_error(run, 3, "swap", "half-swapped")
    assert error["restored"] is False and error["rollback"] == "off"


@pytest.mark.engine
def test_engine_crash_is_exit_3_not_137(checkpoint):
    run = run_tool("sigquit_in_generate", "--model-id", checkpoint(), *CPU4, script=MUTATED)
    assert_error(run, 3, "engine_crash", "SIGQUIT", "--watchdog-timeout")


@pytest.mark.engine
def test_scheduler_start_failure_is_exit_3_with_the_engines_message(checkpoint):
    """A failure inside Engine(...) (sglang-jax SIGQUITs and SIGKILLs the process tree: 137) is one error line
    naming the engine's own message, the summary and exit 3."""
    run = run_tool("scheduler_start_fails", "--model-id", checkpoint(), *CPU4, script=MUTATED)
    assert_error(run, 3, "engine_start", "RuntimeError: injected scheduler start failure")
    assert "engine_ready_dummy" not in run.phases()


def poison(tensors) -> None:
    """One NaN in layer 0's up_proj, one infinity in layer 1's input norm (a trainer that diverged)."""
    for name, value in (("model.layers.0.mlp.up_proj.weight", np.nan), ("model.layers.1.input_layernorm.weight",
                                                                        np.inf)):
        w = tensors[name].copy()
        w.flat[7] = value
        tensors[name] = w


@pytest.mark.engine
@pytest.mark.parametrize("extra, where, rollback, refused", [
    # each bucket as placed: the first with a NaN is refused, the buckets before it are put back
    (["--bucket-mb", "1"], "placed on the devices", "dummy", {"model.layers_0.mlp.up_proj.kernel": 1}),
    # bulk: its one bucket is checked before it is assigned (its rollback needs the arrays it replaces)
    (["--swap-mode", "bulk"], "placed on the devices", "kept",
     {"model.layers_0.mlp.up_proj.kernel": 1, "model.layers_1.input_layernorm.scale": 1}),
    # no rollback (a device source, --no-rollback): the whole tree is checked first, nothing is assigned
    (["--weights-source", "trainer", "--no-rollback"], "in the tree", "off",
     {"model.layers_0.mlp.up_proj.kernel": 1, "model.layers_1.input_layernorm.scale": 1}),
    (["--no-rollback"], "in the tree", "off",  # the host tree: bf16, which numpy's isfinite does not see as a float
     {"model.layers_0.mlp.up_proj.kernel": 1, "model.layers_1.input_layernorm.scale": 1}),
])
def test_nonfinite_weights_are_refused_and_the_engine_keeps_its_weights(ckpt_copy, extra, where, rollback, refused):
    folder = ckpt_copy()
    rewrite_tensors(folder, poison)
    run = run_tool("--model-id", folder, *CPU4, *extra)
    error = assert_error(run, 2, "weights_finite", "model.layers_0.mlp.up_proj.kernel", where, "--allow-nonfinite")
    assert error["nonfinite"] == refused and error["rollback"] == rollback
    assert (error["assigned"] > 0 and error["restored"]) if rollback == "dummy" else error["assigned"] == 0
    assert error["previous_weights_answer_matches"] is True  # the dummy weights answer as before the swap
    assert "weights_swapped_from_mllm" not in run.phases()


@pytest.mark.engine
def test_nonfinite_weights_allowed_knowingly_and_strict_json(ckpt_copy):
    """--allow-nonfinite swaps them in; the logits oracle then sees NaN logprobs: exit 1, and every line is
    still strict JSON (conftest parses with NaN refused): null, with the fields named in nonfinite_fields."""
    folder = ckpt_copy()
    rewrite_tensors(folder, poison)
    run = run_tool("--model-id", folder, *CPU4, "--allow-nonfinite", "--verify-logits")
    assert run.returncode == 1, run.stderr[-2000:]
    assert run.phase("weights_swapped_from_mllm")["finite_check"] == "off"
    assert run.summary["checks"]["logits_match_reference"]["ok"] is False
    logits = run.phase("logits_verified")
    assert logits["max_abs_logprob_diff"] is None and logits["nonfinite_fields"]["max_abs_logprob_diff"] == "nan"


@pytest.mark.engine
def test_other_host_dtype_is_cast_and_still_shared(checkpoint):
    run = run_tool("--model-id", checkpoint(), *CPU4, "--mllm-param-dtype", "float16", "--verify-param-sharing")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.summary["checks"]["param_sharing"]["ok"]


@pytest.mark.engine
def test_demo_leaves_nothing_behind(tmp_path):
    env = {**clean_env(), "TMPDIR": str(tmp_path)}
    run = run_tool("--demo", "--max-new-tokens", "2", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("param_swap_demo_")]
