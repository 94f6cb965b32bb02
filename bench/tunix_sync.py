#!/usr/bin/env python3
"""tunix's sglang-jax weight sync, run on OUR engine and checkpoint, for `make bench` side by side with ours.

google-tunix is a benchmark-only dependency (requirements-bench.txt, installed with --no-deps: only
`tunix.generate.utils` and `tunix.rl.reshard` are imported, without the package's training-stack
__init__). What tunix 0.1.7's `SglangJaxSampler.update_params` does, step for step:

    new_state = utils.transfer_state_with_mappings(src_state=trainer_state, dst_state=nnx.split(model)[1],
        key_mappings=<tunix's Qwen2 -> sglang-jax mapping>, transpose_keys={"lm_head.w": (1, 0)},
        reshard_fn=reshard.reshard_pytree, rollout_engine="sglang_jax", num_kv_heads=..., head_dim=...)
    model_runner.model_state_leaves = jax.tree_util.tree_flatten(new_state)[0]

The trainer state is tunix's own Qwen2 layout (q/k/v as [D, N, H], o as [N, H, D], biases flat), made from
the checkpoint: on the devices FSDP-sharded like the tool's `--trainer-sharding fsdp` (--source device), or
numpy on the host (--source host). Three syncs: the first timed cold (compiles included, like the tool's
first swap), the second with a sampler thread reading the unique live device buffers every 2 ms (tunix's
sync is one call: there is no per-tensor hook; a lower bound, and a poor one: the thread rarely runs while
the sync holds both cores), the third timed warm (like the tool's --rounds). Every sync also measures the
bytes in use when its new state is ready and the old one still bound (ready_peak_extra_ratio: a measured
point, also a lower bound of its peak). Then: the engine's bytes that are the trainer's own buffers after
the sync (jax.device_put keeps a buffer whose slice lines up: tunix's engine shares those with the trainer,
as the tool does only with --alias), and the whole arrays one sync reads to the host (host_reads). Greedy ids (ignore_eos) are taken before any flush (tunix never calls
engine.flush_cache(); the prompt's prefix KV from the dummy weights survives) and after one.

  python bench/tunix_sync.py --model-id DIR --tp-size 4 --source device --max-new-tokens 8
Prints one JSON line.
"""

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
import types

import run_param_swap as rps  # noqa: E402
from param_swap import checkpoint, engine_state, flags, generation, memory, runner, trees  # noqa: E402

PROMPT = "The quick brown fox"


def import_tunix():
    spec = importlib.util.find_spec("tunix")
    if spec is None:
        raise SystemExit("google-tunix is not installed: .venv/bin/pip install --no-deps -r requirements-bench.txt")
    package = types.ModuleType("tunix")  # skip tunix/__init__.py (trainers, metrax, grain, ...)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["tunix"] = package
    from tunix.generate import utils
    from tunix.models.qwen2 import mapping_sglang_jax
    from tunix.rl import reshard

    return utils, reshard, mapping_sglang_jax.SGLANG_JAX_MAPPING


def tunix_layout(flat: dict, heads: int, kv_heads: int, head_dim: int) -> dict:
    """The MLLM tree -> tunix's Qwen2 param names and shapes (reshapes only: the same values)."""
    out = {}
    for key, a in flat.items():
        name = key.replace("model.layers_", "layers.").replace("self_attn.", "attn.")
        if key == "model.embed_tokens.embedding":
            out["embedder.input_embedding"] = a
        elif key == "model.norm.scale":
            out["final_norm.w"] = a
        elif key == "lm_head.kernel":
            out["lm_head.w"] = a
        elif name.endswith("layernorm.scale"):
            out[name[: -len("scale")] + "w"] = a
        elif name.endswith("_proj.bias"):
            out[name.replace("_proj.bias", "_bias")] = a
        elif ".attn.q_proj." in name:
            out[name.replace(".kernel", ".w")] = a.reshape(a.shape[0], heads, head_dim)
        elif ".attn.k_proj." in name or ".attn.v_proj." in name:
            out[name.replace(".kernel", ".w")] = a.reshape(a.shape[0], kv_heads, head_dim)
        elif ".attn.o_proj." in name:
            out[name.replace(".kernel", ".w")] = a.reshape(heads, head_dim, a.shape[-1])
        else:
            out[name] = a  # mlp.*.kernel
    return out


def host_reads(fn) -> tuple[int, int]:
    """How many whole jax.Arrays `fn` reads into host numpy (jax.Array._value, what jax.device_put falls back
    to when a target slice is in no source buffer), and their bytes. On CPU that read is a memcpy (and a
    transfer guard does not see it); on a TPU or GPU it is a device -> host copy of the tensor, then its
    placement again. The tool's device path never calls it (tests/test_trainer.py::test_rl_loop_through_the_api
    counts the same reads)."""
    from jax._src import array

    prop, reads = array.ArrayImpl._value, []

    def counted(self):
        reads.append(self.nbytes)
        return prop.fget(self)

    array.ArrayImpl._value = property(counted)
    try:
        fn()
    finally:
        array.ArrayImpl._value = prop
    return len(reads), sum(reads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-id", required=True)
    p.add_argument("--tp-size", type=int, default=4)
    p.add_argument("--device", choices=["cpu", "gpu", "tpu"], default="cpu")
    p.add_argument("--source", choices=["device", "host"], default="device")
    p.add_argument("--max-new-tokens", type=int, default=8)
    a = p.parse_args()
    args = flags.parse_args(["--model-id", a.model_id, "--device", a.device, "--tp-size", str(a.tp_size)])
    device = runner.configure_platform(args)
    import jax
    import numpy as np
    from flax import nnx

    utils, reshard, mapping = import_tunix()
    info = checkpoint.read_checkpoint_info(os.path.abspath(a.model_id))
    engine, model_runner = rps.start_engine(runner.engine_kwargs(args, info.path, device, "dummy"))
    result = {"source": a.source}
    try:
        state = engine_state.EngineState(model_runner)
        param_bytes = memory.param_bytes_sum(p.get_value() for p in state.params.values())
        gen = lambda: generation.generate_greedy(engine, PROMPT, a.max_new_tokens)["output_ids"]  # noqa: E731
        result["dummy_output_ids"] = gen()
        flat = trees.flatten(checkpoint.load_mllm_params(info.path))
        layout = tunix_layout(flat, info.num_heads, info.num_kv_heads, info.head_dim)
        if a.source == "device":
            mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
            P = jax.sharding.PartitionSpec
            layout = {k: jax.device_put(v, jax.sharding.NamedSharding(
                mesh, P("fsdp") if v.shape[0] % mesh.size == 0 else P())) for k, v in layout.items()}
            jax.block_until_ready(layout)
        trainer = nnx.State(trees.nest({k: nnx.Param(v) for k, v in layout.items()}))

        ready = {}  # bytes in use when the new state is ready and the old one still bound (measured, not sampled)

        def sync() -> float:
            t = time.perf_counter()
            new_state = utils.transfer_state_with_mappings(
                src_state=trainer, dst_state=nnx.split(model_runner.model)[1],
                key_mappings=mapping["to_hf_mappings"], transpose_keys=mapping["to_hf_transpose_keys"],
                reshard_fn=reshard.reshard_pytree, rollout_engine="sglang_jax",
                num_kv_heads=model_runner.model_config.get_total_num_kv_heads(),
                head_dim=model_runner.model_config.head_dim)
            leaves = jax.tree_util.tree_flatten(new_state)[0]
            jax.block_until_ready(leaves)
            seconds = time.perf_counter() - t
            ready["bytes"] = max(ready.get("bytes", 0), memory.bytes_in_use_sum(memory.device_memory(collect=False)))
            ready["leaves"] = leaves
            model_runner.model_state_leaves = leaves
            return seconds

        before = memory.bytes_in_use_sum(memory.device_memory())
        result["cold_s"] = round(sync(), 4)
        result["output_ids_without_flush"] = gen()
        peak, done = [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], memory.bytes_in_use_sum(memory.device_memory(collect=False)))
                time.sleep(0.002)

        before = memory.bytes_in_use_sum(memory.device_memory())
        sampler = threading.Thread(target=sample)
        sampler.start()
        result["sampled_s"] = round(sync(), 4)
        done.set()
        sampler.join()
        result["warm_s"] = round(sync(), 4)
        after = memory.bytes_in_use_sum(memory.device_memory())
        # the engine's leaves that ARE the trainer's buffers (jax.device_put keeps a buffer whose slice lines up)
        trainer_buffers = {(d.id, p) for v in layout.values() if trees.on_devices(v) for d, p, _ in memory.device_buffers(v)}
        result["shared_with_trainer_bytes_sum"] = sum(n for leaf in ready["leaves"] for d, p, n in memory.device_buffers(leaf)
                                                      if (d.id, p) in trainer_buffers)
        result["host_reads"], result["host_read_bytes"] = host_reads(sync)
        result.update(param_bytes_sum=param_bytes, bytes_in_use_sum_before_sync=before,
                      swap_peak_bytes_in_use_sum=peak[0], bytes_in_use_sum_after_sync=after,
                      swap_peak_extra_ratio=round((peak[0] - before) / param_bytes, 4),
                      ready_peak_extra_ratio=round((ready["bytes"] - before) / param_bytes, 4),
                      after_extra_ratio=round((after - before) / param_bytes, 4))
        result["flush_cache"] = str(engine.flush_cache())
        result["output_ids"] = gen()
    finally:
        engine.shutdown()
    print(json.dumps(result), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
