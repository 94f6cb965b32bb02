#!/usr/bin/env python3
"""Benchmark: the colocated RL cycle, ours against the reference authors' way, side by side on the same engine
arguments and checkpoint (Qwen2.5-3B-shaped, few layers, 4 virtual CPU devices; each way in its own process).

Ours: ParamSwapper.release() before the trainer's donating AdamW step, resume(params, alias=True) after it.
The reference authors' (their rollout backend on branch mllm-jax-sglang, rebuilt here with this package's
pieces): a copy of the engine's dummy Params is kept on the devices from the start; before the step the engine
is swapped back to it (so that the trainer's arrays are not referenced) and the KV pool's buffers are deleted;
after it the KV pool is rebuilt with a cached jitted zeros and the trainer's params are aliased in again.

Per step: release_s, train_s, resume_s, kv_rebuild_s against its bound (the same cached allocators called once
more, alone), and the device bytes in use at the four points (rolled out, released, trained, resumed); the
bytes at `released` are what the trainer's step has to work with less. Prints a table (and --out JSON).

  python bench/rl_cycle.py                      # 4 layers, 3 steps each way, a 32768-token KV pool (~8 min)
  python bench/rl_cycle.py --layers 2 --steps 2 --out rl.json
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from param_swap import demo  # noqa: E402

QWEN25_3B_SHAPE = dict(vocab_size=151936, hidden_size=2048, num_heads=16, num_kv_heads=2, head_dim=128,
                       intermediate_size=11008, tied=True)
PROMPT, NEW = "The quick brown fox", 8
POINTS = ("rolled_out", "released", "trained", "resumed")


def in_use() -> int:
    from param_swap import memory

    return memory.bytes_in_use_sum(memory.device_memory())


def one_way(way: str, folder: str, steps: int, max_total_tokens: int) -> None:
    """One process, one way: a JSON line per step."""
    import jax

    from param_swap import checkpoint, flags, release, rl_cycle, runner
    from param_swap import sglang_adapter as adapter
    from param_swap.swapper import ParamSwapper

    args = flags.parse_args(["--model-id", folder, "--device", "cpu", "--tp-size", "4", "--max-total-tokens",
                             str(max_total_tokens)])
    engine, model_runner = adapter.start_engine(runner.engine_kwargs(args, folder, "cpu", "dummy"))
    swapper = ParamSwapper(engine)
    cached = {p: v.get_value() + 0 for p, v in swapper.state.params.items()} if way == "reference" else None
    trainer = rl_cycle.Trainer(swapper.to_engine_layout(checkpoint.load_mllm_params(folder)), 1e-2)
    swapper.swap(trainer.params, alias=True)
    swapper.generate(PROMPT, NEW)  # the first rollout compiles the forward
    for k in range(1, steps + 1):
        at = {"rolled_out": in_use()}
        t = time.perf_counter()
        if way == "ours":
            swapper.release(trainer_held=trainer.held())
            layout = swapper.released.kv
        else:  # the engine back on its cached dummy set, then the KV pool dropped
            swapper.guard.begin_change()
            for path, value in cached.items():
                swapper.state.assign(path, value)
            swapper.state.rebind_from_model()
            engine.flush_cache()
            layout = release.free_kv(model_runner)
        release_s = time.perf_counter() - t
        at["released"] = in_use()
        train_s = trainer.step(k)
        at["trained"] = in_use()
        t = time.perf_counter()
        if way == "ours":
            kv_rebuild_s = swapper.resume(trainer.params, alias=True, trainer_held=trainer.held())["kv_rebuild_s"]
        else:
            kv_rebuild_s = release.rebuild_kv(model_runner, layout)
            swapper.guard.end_change(swapper.swaps)
            swapper.swap(trainer.params, alias=True)
        resume_s = time.perf_counter() - t
        at["resumed"] = in_use()
        t = time.perf_counter()
        bound = [make() for make in layout.allocators()]  # the same allocation alone
        jax.block_until_ready(bound)
        bound_s = time.perf_counter() - t
        for a in bound:
            a.delete()
        t = time.perf_counter()
        swapper.generate(PROMPT, NEW)
        print(json.dumps({"way": way, "step": k, "release_s": round(release_s, 4), "train_s": round(train_s, 4),
                          "resume_s": round(resume_s, 4), "kv_rebuild_s": round(kv_rebuild_s, 4),
                          "kv_alloc_bound_s": round(bound_s, 4), "rollout_s": round(time.perf_counter() - t, 4),
                          "kv_bytes_sum": layout.bytes_sum, "bytes_in_use_sum": at}), flush=True)
    engine.shutdown()
    os._exit(0)


def run_way(way: str, folder: str, steps: int, max_total_tokens: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4", USE_TORCH="0")
    proc = subprocess.run([sys.executable, __file__, "--way", way, "--folder", folder, "--steps", str(steps),
                           "--max-total-tokens", str(max_total_tokens)],
                          capture_output=True, text=True, env=env, timeout=3600, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{way} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-total-tokens", type=int, default=32768, help="the KV pool's size (the reference "
                   "authors' v4-8 run: 32768)")
    p.add_argument("--out", default=None)
    p.add_argument("--way", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.way:
        import param_swap

        param_swap.block_stop_signals()
        return one_way(a.way, a.folder, a.steps, a.max_total_tokens)
    with tempfile.TemporaryDirectory() as root:
        folder = demo.write_demo_checkpoint(os.path.join(root, "ckpt"), num_layers=a.layers, **QWEN25_3B_SHAPE)
        rows = [r for way in ("ours", "reference") for r in run_way(way, folder, a.steps, a.max_total_tokens)]
    print(f"{'way':10} {'step':>4} {'release_s':>9} {'train_s':>8} {'resume_s':>8} {'kv_rebuild_s':>12} "
          f"{'kv_bound_s':>10} " + " ".join(f"{p + ' MB':>14}" for p in POINTS))
    for r in rows:
        print(f"{r['way']:10} {r['step']:>4} {r['release_s']:9.3f} {r['train_s']:8.3f} {r['resume_s']:8.3f} "
              f"{r['kv_rebuild_s']:12.4f} {r['kv_alloc_bound_s']:10.4f} "
              + " ".join(f"{r['bytes_in_use_sum'][p] / 1e6:14.1f}" for p in POINTS))
    ours = [r for r in rows if r["way"] == "ours"]
    ref = [r for r in rows if r["way"] == "reference"]
    if ours and ref:
        saved = ref[-1]["bytes_in_use_sum"]["released"] - ours[-1]["bytes_in_use_sum"]["released"]
        print(f"while the trainer steps, ours holds {saved / 1e6:.1f} MB less than the reference authors' way "
              f"(last step; the KV pool: {ours[-1]['kv_bytes_sum'] / 1e6:.1f} MB)")
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
