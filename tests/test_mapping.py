"""Phase 4: MLLM tree -> sglang-jax nnx paths, layouts, KV-head replication, shardings (the placed arrays against sglang-jax's own loader: test_families.py)."""


import ml_dtypes
import numpy as np
import pytest

import run_param_swap as rps

BF16 = np.dtype(ml_dtypes.bfloat16)


def item(op, shape, replicas=1, dtype=BF16):
    return rps.SwapItem("t", "s", op, replicas, shape, dtype, None, 0)


def target_bytes(item_, src, kv_heads):
    """What place() puts on the device: host_array's array, transposed back where it says so."""
    out, transposed = rps.host_array(item_, src, kv_heads)
    assert out.flags.c_contiguous and out.dtype == BF16
    return out.T if transposed else out


@pytest.mark.parametrize("layout", ["c_order", "transposed_view"])
@pytest.mark.parametrize("kv_heads,replicas", [(2, 2), (1, 4)])
def test_kv_heads_repeat_contiguously(kv_heads, replicas, layout):
    head_dim, hidden = 4, 3
    kernel = np.arange(hidden * kv_heads * head_dim, dtype=np.float32).reshape(hidden, kv_heads * head_dim).astype(BF16)
    if layout == "transposed_view":  # what hf_to_mllm makes of a checkpoint's [out, in] tensor
        kernel = np.ascontiguousarray(kernel.T).T
    out = target_bytes(item("kv_heads", (hidden, kv_heads * head_dim * replicas), replicas), kernel, kv_heads)
    heads = out.reshape(hidden, kv_heads * replicas, head_dim)
    for h in range(kv_heads * replicas):  # [h0, h0, h1, h1] for 2 heads at tp=4
        np.testing.assert_array_equal(heads[:, h], kernel.reshape(hidden, kv_heads, head_dim)[:, h // replicas])
    bias = np.arange(kv_heads * head_dim, dtype=np.float32).astype(BF16)
    out_b = target_bytes(item("kv_heads", (kv_heads * head_dim * replicas,), replicas), bias, kv_heads)
    np.testing.assert_array_equal(out_b.reshape(-1, head_dim)[::replicas], bias.reshape(-1, head_dim))


def test_transposed_views_are_not_copied_on_the_host():
    hf = np.arange(12, dtype=np.float32).reshape(4, 3).astype(BF16)  # [out, in]
    out, transposed = rps.host_array(item("copy", (3, 4)), hf.T, 1)
    assert transposed and np.shares_memory(out, hf)  # the device does the transpose


@pytest.mark.parametrize("layout", ["c_order", "transposed_view"])
def test_lm_head_transposes_back_and_casts(layout):
    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)  # MLLM [hidden, vocab]
    if layout == "transposed_view":
        kernel = np.ascontiguousarray(kernel.T).T
    out = target_bytes(item("transpose", (3, 2)), kernel, 1)
    np.testing.assert_array_equal(out.astype(np.float32), kernel.T)


def test_target_names_cover_the_qwen2_layer():
    assert rps.target_name("model.layers_3.self_attn.k_proj.kernel") == ("model.layers.3.self_attn.k_proj.weight", "kv_heads")
    assert rps.target_name("model.layers_3.self_attn.v_proj.bias") == ("model.layers.3.self_attn.v_proj.bias", "kv_heads")
    assert rps.target_name("model.layers_0.self_attn.o_proj.kernel") == ("model.layers.0.self_attn.o_proj.weight", "copy")
    assert rps.target_name("model.layers_0.mlp.gate_proj.kernel") == ("model.layers.0.mlp.gate_proj.weight", "copy")
    assert rps.target_name("lm_head.kernel") == ("lm_head.embedding", "transpose")
    assert rps.target_name("model.layers_1.input_layernorm.scale") == ("model.layers.1.input_layernorm.scale", "copy")
    with pytest.raises(rps.ToolError):
        rps.target_name("model.layers_0.self_attn.rotary.kernel")
