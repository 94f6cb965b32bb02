"""The commands the docs give users, run as documented (their flags, on the tiny checkpoint and CPU virtual
devices in place of the hub model and the TPU): each passes every check it prints."""

import os
import re
import shlex

import pytest
from conftest import PROMPT, ROOT, reference_output_ids, run_tool
from test_serve import SERVE_CHECKS

from param_swap import flags, validation

pytestmark = pytest.mark.engine  # make test-fast leaves these out


def documented_args(doc: str, marker: str) -> list[str]:
    """The tool's arguments in the first command of `doc` (a bash block, or inline code) that contains `marker`:
    line continuations joined, `timeout N` and `python run_param_swap.py` dropped, cut at the first
    redirection or the end of the inline code."""
    text = open(os.path.join(ROOT, doc)).read().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "run_param_swap.py" in line and marker in line)
    words = shlex.split(line[line.index("run_param_swap.py") + len("run_param_swap.py"):].split("`")[0])
    cut = next((i for i, w in enumerate(words) if re.match(r"^(\d?>|\||<)", w)), len(words))
    return words[:cut]


def on_this_machine(args: list[str], folder: str, tmp_path) -> list[str]:
    """The documented arguments with the tiny checkpoint for the hub id, CPU virtual devices, the test prompt,
    and the output files in tmp_path."""
    out, i = [], 0
    while i < len(args):
        flag = args[i]
        if flag in ("--model-id", "--json-out", "--plot", "--prompt"):
            value = {"--model-id": folder, "--prompt": PROMPT}.get(flag, str(tmp_path / os.path.basename(args[i + 1])))
            out += [flag, value]
            i += 2
        else:
            out.append(flag)
            i += 1
    return [*out, "--device", "cpu", "--max-new-tokens", "12"]


def assert_all_checks_pass(run, *expected: str) -> dict:
    checks = run.summary["checks"]
    assert run.returncode == 0, ({k: v for k, v in checks.items() if not v["ok"]}, run.records[-2:], run.stderr[-3000:])
    assert set(expected) <= set(checks) and all(c["ok"] for c in checks.values())
    return checks


def test_the_readme_tpu_command(checkpoint, tmp_path):
    """README "On a TPU VM": --chat --keep-param-dict --verify-param-sharing --verify-weights --verify-logits
    (the default prompt, in the chat template)."""
    args = documented_args("README.md", "--keep-param-dict")
    assert {"--chat", "--keep-param-dict", "--verify-param-sharing", "--verify-weights", "--verify-logits",
            "--json-out"} <= set(args) and "--prompt" not in args
    folder = checkpoint(tied=True, num_kv_heads=2)
    run = run_tool(*on_this_machine(args, folder, tmp_path))
    assert_all_checks_pass(run, "param_sharing", "weights_equal_loader", "logits_match_reference")
    assert run.phase("generate_result")["prompt"] == validation.chat_prompt(folder, flags.parse_args([]).prompt)
    assert "before_generate_param_dict_kept" in run.phases()
    assert (tmp_path / "swap.jsonl").read_text().splitlines() == run.stdout.strip().splitlines()


def test_the_trainer_handoff_command(checkpoint, tmp_path):
    """docs/tpu.md "The trainer-resident handoff": --weights-source trainer --trainer-sharding engine --alias."""
    args = documented_args("docs/tpu.md", "--trainer-sharding engine")
    folder = checkpoint(tied=True, num_kv_heads=2)
    run = run_tool(*on_this_machine(args, folder, tmp_path))
    assert_all_checks_pass(run, "weights_equal_loader")
    swapped = run.phase("weights_swapped_from_mllm")
    assert swapped["source"] == "device" and swapped["alias"] and swapped["aliased_bytes_sum"] > 0


@pytest.mark.parametrize("flags, field, value", [
    (["--transpose", "device"], "transpose", "device"),  # the TPU and GPU default, through the whole tool
    (["--weights-source", "trainer", "--trainer-sharding", "replicated"], "source", "device"),
])
def test_documented_flags_through_the_whole_tool(checkpoint, flags, field, value):
    folder = checkpoint(tied=False, num_kv_heads=2)
    run = run_tool("--model-id", folder, "--device", "cpu", "--tp-size", "4", "--prompt", PROMPT,
                   "--max-new-tokens", "12", *flags, "--verify-weights", "--verify-logits")
    assert_all_checks_pass(run, "weights_equal_loader", "logits_match_reference")
    swapped = run.phase("weights_swapped_from_mllm")
    assert swapped[field] == value
    if flags[1] == "device":  # the kernels went in as stored and were transposed on the devices
        assert swapped["transposed_bytes_sum"] > 0
    else:
        assert run.phase("mllm_params_device_ready")["trainer_sharding"] == "replicated"
    assert run.phase("generate_result")["output_ids"] == reference_output_ids(folder, 4)


@pytest.mark.long
def test_the_serving_demo():
    """docs/benchmarks.md "Serving while swapping": `--demo --rounds 4 --serve-load 8`, as documented (both
    oracles, the default --single-copy-tolerance and --serve-seconds): every check passes (make test-long)."""
    args = documented_args("docs/benchmarks.md", "--serve-load 8")
    assert args == ["--demo", "--rounds", "4", "--serve-load", "8"]
    run = run_tool(*args, timeout=1800)
    checks = assert_all_checks_pass(run, *SERVE_CHECKS, "weights_equal_loader", "logits_match_reference",
                                    "rounds_consistent", "rounds_no_leak", "single_copy_memory")
    assert checks["single_copy_memory"]["tolerance"] == flags.parse_args([]).single_copy_tolerance
    assert checks["weights_equal_loader"]["swaps_checked"] == 3  # the first swap and rounds 2 and 4 (A)
    load = run.phase("serve_load")
    assert load["clients"] == 8 and all(s["requests_paused"] > 0 for s in load["swaps"])
