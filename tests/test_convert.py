"""Phase 3: HF checkpoint -> MLLM-JAX flax tree on the host (no engine)."""

import os

import ml_dtypes
import numpy as np
import pytest
import torch

from param_swap import checkpoint as ckpt
from param_swap import errors, trees


def info_of(folder):
    return ckpt.read_checkpoint_info(folder)


def test_names_and_transposes(checkpoint):
    folder = checkpoint(tied=False, num_kv_heads=2)
    hf = ckpt.read_safetensors(info_of(folder))
    flat = ckpt.hf_to_mllm(hf, tie_word_embeddings=False)
    assert len(flat) == len(hf)
    np.testing.assert_array_equal(flat["model.layers_1.self_attn.k_proj.kernel"], hf["model.layers.1.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(flat["model.layers_0.mlp.down_proj.kernel"], hf["model.layers.0.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(flat["lm_head.kernel"], hf["lm_head.weight"].T)
    np.testing.assert_array_equal(flat["model.embed_tokens.embedding"], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(flat["model.layers_0.self_attn.q_proj.bias"], hf["model.layers.0.self_attn.q_proj.bias"])
    assert flat["model.layers_0.post_attention_layernorm.scale"].shape == (512,)
    assert flat["model.norm.scale"].dtype == ml_dtypes.bfloat16
    # kernels are views of the checkpoint's arrays, not copies
    assert np.shares_memory(flat["model.layers_0.mlp.up_proj.kernel"], hf["model.layers.0.mlp.up_proj.weight"])
    tree = trees.nest(flat)
    assert tree["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"].shape == (512, 512)
    assert trees.flatten(tree).keys() == flat.keys()


def test_tied_checkpoint_has_no_lm_head(checkpoint):
    folder = checkpoint(tied=True)
    hf = ckpt.read_safetensors(info_of(folder))
    assert "lm_head.weight" not in hf
    flat = ckpt.hf_to_mllm(hf, tie_word_embeddings=True)
    assert "lm_head.kernel" not in flat
    # a tied state_dict (transformers) carries lm_head.weight as an alias of the embedding: dropped too
    hf_with_alias = {**hf, "lm_head.weight": hf["model.embed_tokens.weight"]}
    assert ckpt.hf_to_mllm(hf_with_alias, tie_word_embeddings=True).keys() == flat.keys()


def test_sharded_equals_single_file(checkpoint):
    single = ckpt.read_safetensors(info_of(checkpoint(tied=False, num_shards=1)))
    sharded_info = info_of(checkpoint(tied=False, num_shards=3))
    assert len(sharded_info.files) == 3
    sharded = ckpt.read_safetensors(sharded_info)
    assert single.keys() == sharded.keys()
    for k in single:
        np.testing.assert_array_equal(single[k], sharded[k])


def test_dtype_cast_and_fp32_sources(checkpoint):
    hf32 = ckpt.read_safetensors(info_of(checkpoint(tied=True, dtype="float32")))
    assert hf32["model.norm.weight"].dtype == np.float32
    flat = ckpt.hf_to_mllm(hf32, tie_word_embeddings=True, dtype="bfloat16")
    assert all(a.dtype == ml_dtypes.bfloat16 for a in flat.values())
    flat32 = ckpt.hf_to_mllm(hf32, tie_word_embeddings=True, dtype="float32")
    assert np.shares_memory(flat32["model.norm.scale"], hf32["model.norm.weight"])  # no cast, no copy


def test_numpy_and_torch_inputs_agree_bitwise():
    rng = np.random.default_rng(1)
    big = np.array([3.0e38, -2.5e38, 7.0e4, 1e-40], dtype=np.float32)  # outside fp16's range: no fp16 detour
    w = np.concatenate([big, rng.standard_normal(60).astype(np.float32)]).reshape(8, 8).astype(ml_dtypes.bfloat16)
    as_torch = torch.from_numpy(w.astype(np.float32)).to(torch.bfloat16)
    a = ckpt.hf_to_mllm({"model.layers.0.mlp.up_proj.weight": w}, False)
    b = ckpt.hf_to_mllm({"model.layers.0.mlp.up_proj.weight": as_torch}, False)
    key = "model.layers_0.mlp.up_proj.kernel"
    assert b[key].dtype == ml_dtypes.bfloat16
    assert a[key].view(np.uint16).tobytes() == np.ascontiguousarray(b[key]).view(np.uint16).tobytes()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_torch_state_dict_and_safetensors_trees_are_bit_identical(checkpoint, dtype):
    info = info_of(checkpoint(tied=False, num_kv_heads=1, dtype=dtype))
    from_st = ckpt.hf_to_mllm(ckpt.read_safetensors(info), False)
    from_torch = ckpt.hf_to_mllm(ckpt.read_torch_state_dict(info), False)
    assert from_st.keys() == from_torch.keys()
    for k in from_st:
        assert from_st[k].dtype == from_torch[k].dtype, k
        assert np.array_equal(from_st[k].view(np.uint16), from_torch[k].view(np.uint16)), k


def test_unknown_tensor_is_refused():
    with pytest.raises(errors.ToolError, match="unexpected tensor 'model.vision.proj.weight'"):
        ckpt.hf_to_mllm({"model.vision.proj.weight": np.zeros((2, 2), np.float32)}, False)


def test_checkpoint_info(checkpoint):
    info = info_of(checkpoint(tied=False, num_kv_heads=1, num_shards=2))
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (2, 4, 1, 128)
    assert not info.tie_word_embeddings and len(info.files) == 2
    assert os.path.isabs(info.path)
