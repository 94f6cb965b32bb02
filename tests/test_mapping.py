"""Phase 4: MLLM tree -> sglang-jax nnx paths, layouts, KV-head replication, shardings (the placed arrays against sglang-jax's own loader: test_families.py)."""


import ml_dtypes
import numpy as np
import pytest

from param_swap import errors, placement, planning, swapper

BF16 = np.dtype(ml_dtypes.bfloat16)


def item(op, shape, replicas=1, dtype=BF16):
    return planning.SwapItem("t", "s", op, replicas, shape, dtype, None, 0)


def target_bytes(item_, src, kv_heads, transpose="device"):
    """What place() puts on the device: host_array's array, transposed back where it says so (--transpose
    device: C-contiguous; host: already the target's layout, possibly a strided view for jax.device_put)."""
    out, transposed = placement.host_array(item_, src, kv_heads, transpose)
    assert out.dtype == BF16 and (out.flags.c_contiguous if transpose == "device" else not transposed)
    return out.T if transposed else out


@pytest.mark.parametrize("transpose", ["device", "host"])
@pytest.mark.parametrize("layout", ["c_order", "transposed_view"])
@pytest.mark.parametrize("kv_heads,replicas", [(2, 2), (1, 4)])
def test_kv_heads_repeat_contiguously(kv_heads, replicas, layout, transpose):
    head_dim, hidden = 4, 3
    kernel = np.arange(hidden * kv_heads * head_dim, dtype=np.float32).reshape(hidden, kv_heads * head_dim).astype(BF16)
    if layout == "transposed_view":  # what hf_to_mllm makes of a checkpoint's [out, in] tensor
        kernel = np.ascontiguousarray(kernel.T).T
    out = target_bytes(item("kv_heads", (hidden, kv_heads * head_dim * replicas), replicas), kernel, kv_heads,
                       transpose)
    heads = out.reshape(hidden, kv_heads * replicas, head_dim)
    for h in range(kv_heads * replicas):  # [h0, h0, h1, h1] for 2 heads at tp=4
        np.testing.assert_array_equal(heads[:, h], kernel.reshape(hidden, kv_heads, head_dim)[:, h // replicas])
    bias = np.arange(kv_heads * head_dim, dtype=np.float32).astype(BF16)
    out_b = target_bytes(item("kv_heads", (kv_heads * head_dim * replicas,), replicas), bias, kv_heads, transpose)
    np.testing.assert_array_equal(out_b.reshape(-1, head_dim)[::replicas], bias.reshape(-1, head_dim))


def test_transposed_views_are_not_copied_on_the_host():
    hf = np.arange(12, dtype=np.float32).reshape(4, 3).astype(BF16)  # [out, in]
    out, transposed = placement.host_array(item("copy", (3, 4)), hf.T, 1)
    assert transposed and np.shares_memory(out, hf)  # the device does the transpose
    out, transposed = placement.host_array(item("copy", (3, 4)), hf.T, 1, "host")
    assert not transposed and out.shape == (3, 4) and np.shares_memory(out, hf)  # device_put copies it strided


@pytest.mark.parametrize("transpose", ["device", "host"])
@pytest.mark.parametrize("layout", ["c_order", "transposed_view"])
def test_lm_head_transposes_back_and_casts(layout, transpose):
    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)  # MLLM [hidden, vocab]
    if layout == "transposed_view":
        kernel = np.ascontiguousarray(kernel.T).T
    out = target_bytes(item("transpose", (3, 2)), kernel, 1, transpose)
    np.testing.assert_array_equal(out.astype(np.float32), kernel.T)


def test_target_names_cover_the_qwen2_layer():
    assert planning.target_name("model.layers_3.self_attn.k_proj.kernel") == ("model.layers.3.self_attn.k_proj.weight", "kv_heads")
    assert planning.target_name("model.layers_3.self_attn.v_proj.bias") == ("model.layers.3.self_attn.v_proj.bias", "kv_heads")
    assert planning.target_name("model.layers_0.self_attn.o_proj.kernel") == ("model.layers.0.self_attn.o_proj.weight", "copy")
    assert planning.target_name("model.layers_0.mlp.gate_proj.kernel") == ("model.layers.0.mlp.gate_proj.weight", "copy")
    assert planning.target_name("lm_head.kernel") == ("lm_head.embedding", "transpose")
    assert planning.target_name("model.layers_1.input_layernorm.scale") == ("model.layers.1.input_layernorm.scale", "copy")
    with pytest.raises(errors.ToolError):
        planning.target_name("model.layers_0.self_attn.rotary.kernel")


def test_buckets_keep_the_plan_order_and_size():
    plan = [planning.SwapItem(f"t{k}", "s", "copy", 1, (n,), BF16, None, n) for k, n in enumerate([5, 3, 9, 1, 1, 4])]
    sizes = [[i.nbytes_sum for i in b] for b in swapper.buckets(plan, 8)]
    assert sizes == [[5, 3], [9], [1, 1, 4]]  # a tensor larger than a bucket is a bucket of its own
    assert [len(b) for b in swapper.buckets(plan, 0)] == [1] * 6  # 0: one tensor at a time
    assert swapper.buckets(plan, None) == [plan]  # bulk
    assert [i for b in swapper.buckets(plan, 7) for i in b] == plan
