"""The RL-loop proof, through the Python API (tests/test_trainer.py runs it in its own process).

  python tests/rl_loop_probe.py CKPT OUT_DIR TP STEPS

1. A trainer tree on the devices (FSDP over all devices, bf16), K steps of a jitted deterministic update,
   a device-to-device swap after each step (streaming, no alias) and a generation after each swap.
   Device->host copies the swap makes are counted (ArrayImpl._value, what np.asarray and rollback use, in
   the swapping thread; the NaN/Inf check's exact count of a tensor that holds any, one int32 per device, apart; the scheduler's own threads fetch generated token ids when the swap pauses them:
   counted apart).
   The final tree is saved as an HF checkpoint in OUT_DIR/final (an inverse mapping written here, sharing
   no code with the tool's) for the test to load with sglang-jax's own loader.
2. The donation hazard: the final tree in the engine's own layout, swapped with alias=True; a donating step
   deletes the aliased buffers; generate must raise ToolError(engine_weights_deleted); a swap of the
   step's output then serves again.
3. A trainer that diverged: the next step with one NaN, swapped without a rollback (the tree is checked
   first) and with one (each bucket checked as placed): both refused, the engine answering as before; then
   with allow_nonfinite (swapped knowingly).
Prints one JSON line.
"""

import json
import os
import shutil
import sys
import threading

os.environ.setdefault("USE_TORCH", "0")  # transformers without torch: nothing here needs it (6 s less)
import numpy as np  # noqa: E402

import run_param_swap as rps  # noqa: E402
from param_swap import errors, flags, runner, trees  # noqa: E402

PROMPT, MAX_NEW = "The quick brown fox", 12  # conftest's


def save_hf(tree: dict, src_folder: str, folder: str) -> None:
    """MLLM-JAX tree -> HF safetensors (float32, exact for bf16 values), config and tokenizer from src."""
    from safetensors.numpy import save_file

    tensors = {}
    for key, value in trees.flatten(tree).items():
        arr = np.asarray(value).astype(np.float32)
        name = key.replace(".layers_", ".layers.")
        if name.endswith(".kernel"):  # flax [in, out] -> HF [out, in]
            name, arr = name[: -len(".kernel")] + ".weight", arr.T
        name = name.replace(".scale", ".weight").replace("embed_tokens.embedding", "embed_tokens.weight")
        tensors[name] = np.ascontiguousarray(arr)
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    for f in os.listdir(src_folder):
        if not f.endswith(".safetensors") and not f.endswith(".json.index") and f != "model.safetensors.index.json":
            shutil.copy(os.path.join(src_folder, f), folder)


def main() -> None:
    ckpt, out_dir, tp, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    args = flags.parse_args(["--model-id", ckpt, "--device", "cpu", "--tp-size", str(tp)])
    device = runner.configure_platform(args)
    import jax
    import jax.numpy as jnp
    from jax._src.array import ArrayImpl

    engine, _ = rps.start_engine(runner.engine_kwargs(args, ckpt, device, "dummy"))
    result: dict = {"steps": []}
    try:
        swapper = rps.ParamSwapper(engine)
        mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))

        def fsdp(x):
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp" if x.shape[0] % mesh.size == 0
                                                                               else None))

        params = jax.tree.map(lambda x: jax.device_put(x, fsdp(x)), rps.load_mllm_params(ckpt))

        @jax.jit
        def train_step(p):
            return jax.tree.map(lambda w: (w * 0.98 + 0.02 * jnp.roll(w, 1, axis=-1)).astype(w.dtype), p)

        d2h, scheduler_d2h, counts, swapping = [0], [0], [0], threading.get_ident()
        value = ArrayImpl._value

        def counted(self):
            if threading.get_ident() != swapping:
                scheduler_d2h[0] += 1
            elif self.nbytes > 4:  # the NaN/Inf check reads one int32 count per device and tensor
                d2h[0] += 1
            else:
                counts[0] += 1
            return value.fget(self)

        for step in range(steps):
            params = train_step(params)
            ArrayImpl._value = property(counted)
            try:
                report = swapper.swap(params)
            finally:
                ArrayImpl._value = value
            out = swapper.generate(PROMPT, MAX_NEW)
            result["steps"].append({"step": step, "device_to_host_copies": d2h[0],
                                    "scheduler_device_to_host_copies": scheduler_d2h[0],
                                    "device_to_host_counts": counts[0], **report,
                                    "output_ids": out["output_ids"]})
        save_hf(params, ckpt, os.path.join(out_dir, "final"))
        result["final_output_ids"] = out["output_ids"]

        # the donation hazard: engine layout, aliased, then a donating trainer step
        plan = swapper.plan(params)
        flat = trees.flatten(params)
        engine_layout = {i.source: jax.device_put(flat[i.source].astype(i.dtype),
                                                  runner.trainer_sharding(i, flat[i.source].shape, "engine"))
                         for i in plan}
        report = swapper.swap(engine_layout, alias=True)
        result["alias"] = {k: report[k] for k in ("aliased_bytes_sum", "copied_bytes_sum", "param_bytes_sum",
                                                  "leaves_unchanged", "bytes_in_use_sum_before_swap",
                                                  "bytes_in_use_sum_after_swap", "trainer_only_bytes_sum")}
        result["alias"]["output_ids"] = swapper.generate(PROMPT, MAX_NEW)["output_ids"]
        donated = jax.jit(lambda p: jax.tree.map(lambda w: w * 1, p), donate_argnums=0)(engine_layout)
        result["donated_deleted"] = sum(a.is_deleted() for a in engine_layout.values())
        try:
            swapper.generate(PROMPT, MAX_NEW)
            result["after_donation"] = "generated"
        except errors.ToolError as e:
            result["after_donation"] = e.record()
        swapper.swap(donated, alias=True)
        result["after_reswap_output_ids"] = swapper.generate(PROMPT, MAX_NEW)["output_ids"]

        # a trainer that diverged: one NaN in layer 0's up_proj; refused, the engine answers as before
        key = "model.layers_0.mlp.up_proj.kernel"
        bad = np.array(donated[key])  # (on the host: the engine layout's Explicit mesh refuses an eager .at[])
        bad[1, 2] = np.nan
        diverged = {**donated, key: jax.device_put(bad, donated[key].sharding)}
        result["diverged"] = {}
        swapper.bucket_mb = 1  # several buckets: layer 0's MLP is not in the first one (a real restore)
        for name, kwargs in (("no_rollback", {}), ("rollback", {"rollback": True})):
            try:
                swapper.swap(diverged, **kwargs)
                result["diverged"][name] = "swapped"
            except errors.ToolError as e:
                result["diverged"][name] = {**e.record(), "output_ids": swapper.generate(PROMPT, MAX_NEW)["output_ids"]}
        swapper.allow_nonfinite = True
        report = swapper.swap(diverged)
        result["diverged"]["allowed"] = {"finite_check": report["finite_check"], "leaves_unchanged":
                                         report["leaves_unchanged"],
                                         "output_ids": swapper.generate(PROMPT, MAX_NEW)["output_ids"]}
    finally:
        engine.shutdown()
    print(json.dumps(result, default=str), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
