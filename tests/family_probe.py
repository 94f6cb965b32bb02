"""Phase 4 against sglang-jax's own loader, for many checkpoints in ONE process and without an Engine:
for each (arch, tp, tied, KV heads), sglang-jax's JAXModelLoader builds the model from the checkpoint
(load_format auto) on a tp-device mesh made as the scheduler makes it; the tool plans against that model's
Params and places every tensor (both --transpose ways); each placed array is compared with the loader's
(bits, shape, dtype, sharding). Also the rollback's re-creation of load_format="dummy" weights against the
dummy loader's. Prints one JSON line per case.
Usage: python tests/family_probe.py ARCH:TP:TIED:KV[:BIAS[:MOE_BACKEND]] ... (4 virtual CPU devices; TIED,
BIAS: 0 or 1; MOE_BACKEND: epmoe or fused)"""

import dataclasses
import json
import os
import sys
import tempfile
import types

os.environ.setdefault("USE_TORCH", "0")  # transformers without torch: nothing here needs it (6 s less)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import numpy as np  # noqa: E402

from param_swap import checkpoint as ckpt  # noqa: E402
from param_swap import demo, families, placement, planning  # noqa: E402
from param_swap import sglang_adapter as adapter  # noqa: E402


def loader_model(folder: str, tp: int, moe_backend: str, load_format: str = "auto"):
    """(a model runner stand-in: model, model_config, mesh) as sglang-jax's loader builds it."""
    import jax
    from sgl_jax.srt.configs.load_config import LoadConfig
    from sgl_jax.srt.configs.model_config import ModelConfig
    from sgl_jax.srt.model_loader.loader import get_model_loader
    from sgl_jax.srt.utils.mesh_utils import create_device_mesh

    mesh = create_device_mesh(ici_parallelism=[1, tp], dcn_parallelism=[1, 1], devices=jax.devices()[:tp])
    model_config = ModelConfig(model_path=folder, dtype="bfloat16", moe_backend=moe_backend)
    model_config.configure_for_tensor_parallel(tp)  # as ModelRunner.load_model does
    model_config.hf_config.ep_size, model_config.hf_config.ep_num_redundant_experts = 1, 0
    model_config.hf_config.moe_backend = model_config.moe_backend.value
    with jax.set_mesh(mesh):
        model = get_model_loader(LoadConfig(load_format=load_format), mesh).load_model(model_config=model_config)
    return types.SimpleNamespace(model=model, model_config=model_config, mesh=mesh)


def loader_params(folder: str, tp: int, moe_backend: str):
    runner = loader_model(folder, tp, moe_backend)
    return adapter.engine_params(runner), runner.model_config.moe_backend.value


def dummy_again_mismatched(folder: str, tp: int, moe_backend: str) -> list[str]:
    """Rollback "dummy": the tool's dummy_weights() re-creates every Param of a load_format="dummy" model
    bit for bit (and sharding for sharding)."""
    runner = loader_model(folder, tp, moe_backend, "dummy")
    params = adapter.engine_params(runner)
    again = adapter.dummy_weights(runner, set(params))
    bad = []
    for path, param in params.items():
        a, b = again[path], param.get_value()
        if a.sharding != b.sharding or a.dtype != b.dtype or not np.array_equal(np.asarray(a), np.asarray(b)):
            bad.append(path)
    return bad


def case(spec: str, root: str) -> dict:
    arch, tp, tied, kv, *rest = spec.split(":")
    tp, tied, kv, bias = int(tp), tied == "1", int(kv), bool(rest and rest[0] == "1")
    backend = rest[1] if len(rest) > 1 else "epmoe"
    folder = demo.write_demo_checkpoint(os.path.join(root, spec.replace(":", "_")), arch=arch, tied=tied,
                                       num_kv_heads=kv, attention_bias=bias)
    info = ckpt.read_checkpoint_info(folder)
    ckpt.validate_checkpoint(info)
    params, backend = loader_params(folder, tp, backend)
    flat = ckpt.hf_to_mllm(ckpt.read_safetensors(info), info.tie_word_embeddings)
    plan = planning.plan_swap(flat, params, info.num_kv_heads, info.architecture, backend)
    result = {"case": spec, "num_params": len(params), "num_planned": len(plan), "mismatched": [],
              "sharding_differs": [], "replicas": sorted({i.replicas for i in plan if i.op == "kv_heads"}),
              "moe_backend": backend, "largest_tensor_ratio": round(max(i.nbytes_sum for i in plan)
                                                                     / sum(i.nbytes_sum for i in plan), 4),
              "targets": sorted(i.target for i in plan if ".layers.1." in i.target)}
    if os.environ.get("DUMMY_CHECK") == "1":
        result["dummy_mismatched"] = dummy_again_mismatched(folder, tp, backend)
    for item in plan:
        theirs = params[item.target].get_value()
        for transpose in ("device", "host"):  # both ways of --transpose
            ours = placement.place(item, flat[item.source], info.num_kv_heads, transpose=transpose)
            if ours.sharding != theirs.sharding or ours.dtype != theirs.dtype:
                result["sharding_differs"].append(f"{item.target} ({transpose})")
            a, b = np.asarray(ours), np.asarray(theirs)
            if a.shape != b.shape or a.view(np.uint16).tobytes() != b.view(np.uint16).tobytes():
                result["mismatched"].append(f"{item.target} ({transpose})")
    return result


def plant_qk_norm_swapped() -> None:  # every layer's q_norm and k_norm scales exchanged (the inventory's rows)
    sglang = {t.mllm: t.sglang for t in families.TENSORS}
    other = {"model.layers_{i}.self_attn.q_norm.scale": "model.layers_{i}.self_attn.k_norm.scale",
             "model.layers_{i}.self_attn.k_norm.scale": "model.layers_{i}.self_attn.q_norm.scale"}
    families.TENSORS = [dataclasses.replace(t, sglang=sglang[other[t.mllm]]) if t.mllm in other else t
                        for t in families.TENSORS]


def plant_experts_gate_up_swapped() -> None:  # every MoE layer's stacked gate and up experts exchanged (epmoe)
    names = families.FAMILIES["Qwen3MoeForCausalLM"].moe_backends["epmoe"]
    gate, up = "model.layers_{i}.mlp.experts.gate_proj.kernel", "model.layers_{i}.mlp.experts.up_proj.kernel"
    names[gate], names[up] = names[up], names[gate]


PLANTS = {"qk_norm_swapped": plant_qk_norm_swapped, "experts_gate_up_swapped": plant_experts_gate_up_swapped}


def main() -> None:
    if os.environ.get("PLANT"):
        PLANTS[os.environ["PLANT"]]()
    with tempfile.TemporaryDirectory() as root:
        for spec in sys.argv[1:]:
            print(json.dumps(case(spec, root)), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
