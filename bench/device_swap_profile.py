#!/usr/bin/env python3
"""Where a device-to-device swap's time goes: the trainer tree on the engine's devices as `--weights-source
trainer --trainer-sharding fsdp` (or --trainer-sharding) places it, placed into the engine's target shardings in
several ways, side by side in one process, each three times (the first pays the compiles, the others are a
later swap of the same layout). Nothing is assigned: this times the placement, the part of the swap that
moves the bytes. Per way: seconds, backend compiles and their seconds (jax.monitoring), dispatch seconds
(until the last call returns) against wait seconds (until the arrays are ready). (A transfer guard would
prove nothing here: on CPU jax.device_put's host read is a memcpy it does not see; bench/tunix_sync.py counts
those reads instead.)

  python bench/device_swap_profile.py --model-id DIR --tp-size 4      # prints one JSON line per way and run
  python bench/device_swap_profile.py --model-id DIR --kinds          # first one line per kind of tensor

Ways: per_tensor (the tool's: one jitted transform per tensor, waited on per bucket), per_bucket (one jit over
a bucket's tensors), whole_tree (one jit over every tensor: the bound a swap of the whole tree at once would
reach, two sets at its peak), pipelined (per_tensor with the next bucket dispatched before the current one is waited
on), device_put (what tunix's reshard_pytree does without pathways; no transforms), plain_copy (a jitted
identity per tensor in the source's own sharding: the same bytes, no resharding).
"""

import argparse
import json
import os
import time

import run_param_swap as rps
from param_swap import checkpoint, flags, placement, runner, trees
from param_swap.flags import TrainerSharding
from param_swap.swapper import DEFAULT_BUCKET_MB, buckets

COMPILES: list[float] = []


def on_event(event: str, duration: float, **_: object) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES.append(duration)


def timed(name: str, fn, bucket_list, run: int) -> dict:
    import jax

    del COMPILES[:]
    dispatch = wait = 0.0
    ok, error = True, None
    t0 = time.perf_counter()
    try:
        for bucket in bucket_list:
            t = time.perf_counter()
            out = fn(bucket)
            dispatch += time.perf_counter() - t
            t = time.perf_counter()
            jax.block_until_ready(out)
            wait += time.perf_counter() - t
            del out
    except Exception as e:  # noqa: BLE001 - a way that fails is reported as such, not hidden
        ok, error = False, f"{type(e).__name__}: {str(e)[:200]}"
    total = time.perf_counter() - t0
    return {"way": name, "run": run, "seconds": round(total, 4), "dispatch_s": round(dispatch, 4),
            "wait_s": round(wait, 4), "compiles": len(COMPILES), "compile_s": round(sum(COMPILES), 4),
            "ok": ok, "error": error}


def best_ms(fn, repeats: int = 5) -> float:
    import jax

    jax.block_until_ready(fn())  # compiled first
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return round(best * 1e3, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-id", required=True)
    p.add_argument("--tp-size", type=int, default=4)
    p.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB)
    p.add_argument("--ways", default="per_tensor,per_bucket,whole_tree,pipelined,device_put,plain_copy")
    p.add_argument("--trainer-sharding", choices=list(TrainerSharding), default="fsdp")
    p.add_argument("--kinds", action="store_true", help="first, per kind of tensor: best of 5 ms of each way")
    a = p.parse_args()
    cfg = flags.run_config(flags.parse_args(["--model-id", a.model_id, "--device", "cpu", "--tp-size", str(a.tp_size)]))
    device = runner.configure_platform(cfg)
    import jax

    jax.monitoring.register_event_duration_secs_listener(on_event)
    info = checkpoint.read_checkpoint_info(os.path.abspath(a.model_id))
    engine, _ = rps.start_engine(runner.engine_kwargs(cfg, info.path, device, "dummy"))
    try:
        swapper = rps.ParamSwapper(engine)
        flat = trees.flatten(checkpoint.load_mllm_params(info.path))
        plan = swapper.plan(flat)
        trainer = {i.source: placement.put(flat[i.source], runner.trainer_sharding(i, flat[i.source].shape, a.trainer_sharding))
                   for i in plan}
        jax.block_until_ready(list(trainer.values()))
        del flat
        bucket_list = buckets(plan, int(a.bucket_mb * 2**20))
        nbytes = sum(i.nbytes_sum for i in plan)
        k = swapper.num_kv_heads

        def per_tensor(bucket):
            return [placement.place_device(i, trainer[i.source], k) for i in bucket]

        bucket_fns = {}

        def per_bucket(bucket):  # one jit over the bucket: every item's device_steps inlined into it
            srcs = [trainer[i.source] for i in bucket]
            key = tuple(i.target for i in bucket)
            if key not in bucket_fns:
                steps = [[st.fn for st in placement.device_steps(i, tuple(x.shape), x.dtype, x.sharding, k)]
                         for i, x in zip(bucket, srcs, strict=True)]

                def whole(*xs):
                    out = []
                    for fs, x in zip(steps, xs, strict=True):
                        for f in fs:
                            x = f(x)
                        out.append(x)
                    return out

                bucket_fns[key] = jax.jit(whole)
            return bucket_fns[key](*srcs)

        def pipelined(bucket_list_):  # per_tensor, the next bucket dispatched before the current one is waited on
            pending = None
            for bucket in bucket_list_:
                out = per_tensor(bucket)
                if pending is not None:
                    jax.block_until_ready(pending)
                pending = out
            return pending

        def device_put(bucket):  # what tunix's reshard_pytree does without pathways (the transforms left out)
            return jax.device_put([trainer[i.source] for i in bucket], [i.sharding for i in bucket])

        copies = {}

        def plain_copy(bucket):  # the same bytes, same sharding, a jitted identity each: a device memcpy
            out = []
            for i in bucket:
                src = trainer[i.source]
                f = copies.setdefault(i.source, jax.jit(lambda x: x, out_shardings=src.sharding))
                out.append(f(src))
            return out

        if a.kinds:  # per kind of tensor: the tool's placement, the same without the bits, a plain copy, device_put
            kinds: dict[tuple, list] = {}
            for i in plan:
                kinds.setdefault((i.op, i.replicas, i.shape, str(i.sharding.spec)), []).append(i)
            for (op, _, shape, spec), items in kinds.items():
                i, src = items[0], trainer[items[0].source]
                steps = placement.device_steps(i, tuple(src.shape), src.dtype, src.sharding, k)
                plain = [placement.device_transform(i.op, i.replicas, k, i.dtype, i.sharding)] if len(steps) == 1 else None
                ident = jax.jit(lambda x: x, out_shardings=src.sharding)
                row = {"kind": f"{op} {list(shape)} {spec}", "tensors": len(items), "mb_each": round(i.nbytes_sum / 1e6, 1),
                       "tool_ms": best_ms(lambda: placement.place_device(i, src, k)),  # noqa: B023
                       "without_bits_ms": best_ms(lambda: plain[0](src)) if plain else None,  # noqa: B023
                       "plain_copy_ms": best_ms(lambda: ident(src)),  # noqa: B023
                       "device_put_ms": best_ms(lambda: jax.device_put(src, i.sharding))}  # noqa: B023
                print(json.dumps(row), flush=True)
        ways = {"per_tensor": per_tensor, "per_bucket": per_bucket, "whole_tree": per_bucket, "pipelined": pipelined,
                "device_put": device_put, "plain_copy": plain_copy}
        for name in a.ways.split(","):
            for run in (1, 2, 3):
                # pipelined gets the whole list as one "bucket" (it waits itself, one bucket behind); whole_tree
                # is per_bucket with the whole plan as its one bucket
                given = {"pipelined": [bucket_list], "whole_tree": [plan]}.get(name, bucket_list)
                row = timed(name, ways[name], given, run)
                row.update(bytes=nbytes, gb_per_s=round(nbytes / row["seconds"] / 1e9, 3), buckets=len(bucket_list))
                print(json.dumps(row), flush=True)
    finally:
        engine.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
