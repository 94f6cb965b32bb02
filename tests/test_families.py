"""Qwen2, Qwen3, Llama and Qwen3-MoE: the same proofs for every family. Every placed array bit-identical (and in the same
sharding) to sglang-jax's own loader over tp, tied/untied, KV heads, attention biases and both MoE backends
(one process, no Engine: tests/family_probe.py); each family's demo swaps, generates the own loader's greedy
tokens, and passes both oracles and --rounds; planted family-specific layout errors are named."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, clean_env, reference_output_ids, run_tool

from param_swap import checkpoint as ckpt
from param_swap import demo, errors

MATRIX = [  # arch:tp:tied:kv[:attention_bias[:moe_backend]]
    "qwen2:4:1:2", "qwen2:4:0:1", "qwen2:2:0:4", "qwen2:4:1:1", "qwen2:2:1:4", "qwen2:1:0:4", "qwen2:4:0:2",
    "qwen3:1:1:1", "qwen3:2:0:2", "qwen3:4:1:4", "qwen3:4:0:1", "qwen3:2:1:1:1",
    "llama:1:0:1", "llama:2:1:2", "llama:4:0:4", "llama:4:1:1", "llama:2:0:2:1",
    "qwen3_moe:1:0:1:0:epmoe", "qwen3_moe:2:1:2:0:epmoe", "qwen3_moe:4:0:4:1:epmoe",
    "qwen3_moe:4:1:2:0:fused", "qwen3_moe:4:0:1:0:fused",
]


def probe(*cases: str, plant: str | None = None, env_extra: dict | None = None) -> list[dict]:
    env = {**clean_env(), **({"PLANT": plant} if plant else {}), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "tests/family_probe.py", *cases], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.engine
def test_every_family_places_arrays_equal_to_sglang_loader():
    results = probe(*MATRIX)
    assert [r["case"] for r in results] == MATRIX
    for r in results:
        arch, tp, tied, kv, *rest = r["case"].split(":")
        assert r["num_planned"] == r["num_params"], r
        assert r["mismatched"] == [] and r["sharding_differs"] == [], r
        assert r["replicas"] == [max(1, int(tp) // int(kv))], r
        names = " ".join(r["targets"])  # layer 1's targets
        assert ("q_norm" in names) == arch.startswith("qwen3")
        assert ("o_proj.bias" in names or "c_proj.bias" in names) == (rest[:1] == ["1"])
        assert ("q_proj.bias" in names) == (arch == "qwen2" or rest[:1] == ["1"])
        if arch == "qwen3_moe":  # layer 0 dense (mlp_only_layers), layer 1 sparse: router + stacked experts
            experts = ("wi_0", "wi_1", "wo") if rest[1] == "epmoe" else ("w1", "w3", "w2")
            assert all(f"mlp.{e}" in names for e in experts) and "moe_gate.kernel" in names
            assert 0 < r["largest_tensor_ratio"] < 0.25  # a layer's stacked experts: the streaming peak


@pytest.mark.engine
def test_rollback_recreates_the_dummy_weights_of_every_family():
    """Rollback "dummy": dummy_weights() re-creates every Param of a load_format="dummy" model bit for bit, in its
    sharding (one case per family and MoE backend)."""
    cases = ["qwen2:4:1:2", "qwen3:2:0:2", "llama:4:0:4", "qwen3_moe:2:1:2:0:epmoe", "qwen3_moe:4:0:1:0:fused"]
    results = probe(*cases, env_extra={"DUMMY_CHECK": "1"})
    assert [r["case"] for r in results] == cases
    assert all(r["dummy_mismatched"] == [] for r in results), results


@pytest.mark.parametrize("plant, case, named", [
    ("qk_norm_swapped", "qwen3:2:1:2", {f"model.layers.{i}.self_attn.{n}_norm.scale" for i in (0, 1) for n in "qk"}),
    ("experts_gate_up_swapped", "qwen3_moe:2:1:2:0:epmoe", {"model.layers.1.mlp.wi_0", "model.layers.1.mlp.wi_1"}),
])
@pytest.mark.engine
def test_planted_family_layout_errors_are_named(plant, case, named):
    (r,) = probe(case, plant=plant)
    assert set(r["mismatched"]) == {f"{n} ({t})" for n in named for t in ("device", "host")}


def test_checkpoint_validation_covers_every_family(tmp_path):
    for arch in ("qwen3", "llama", "qwen3_moe"):
        folder = demo.write_demo_checkpoint(str(tmp_path / arch), arch=arch)
        info = ckpt.read_checkpoint_info(folder)
        ckpt.validate_checkpoint(info)
        expected = ckpt.expected_tensors(info)
        assert any("q_norm" in n for n in expected) == arch.startswith("qwen3")
        if arch == "qwen3_moe":
            assert info.moe_layers == (1,) and "model.layers.1.mlp.experts.3.down_proj.weight" in expected
            assert "model.layers.0.mlp.gate_proj.weight" in expected  # the dense layer
        os.remove(os.path.join(folder, "model.safetensors"))
        tensors = {n: np.zeros(s, np.float32) for n, s in expected.items()}
        drop = next(n for n in tensors if "k_norm" in n or "k_proj.weight" in n)
        del tensors[drop]
        from safetensors.numpy import save_file

        save_file(tensors, os.path.join(folder, "model.safetensors"))
        with pytest.raises(errors.ToolError, match="missing"):
            ckpt.validate_checkpoint(ckpt.read_checkpoint_info(folder))


@pytest.mark.engine
@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen3_moe"])
def test_demo_of_each_family(arch, tmp_path):
    """--demo --arch X: both oracles, --rounds 1, exit 0; its greedy tokens are the own loader's."""
    folder = str(tmp_path / "demo")
    run = run_tool("--demo", "--arch", arch, "--demo-dir", folder, "--max-new-tokens", "16", "--rounds", "1")
    checks = run.summary["checks"]
    assert run.returncode == 0, (checks, run.stderr[-3000:])
    assert checks["weights_equal_loader"]["ok"] and checks["logits_match_reference"]["ok"]
    assert checks["rounds_consistent"]["ok"]
    prompt = run.phase("generate_result")["prompt"]
    assert run.phase("generate_result")["output_ids"] == reference_output_ids(folder, 4, prompt, 16)
