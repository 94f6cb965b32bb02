#!/usr/bin/env python3
"""Benchmark: streaming vs bulk swap, safetensors vs torch source, on a Qwen2.5-3B-shaped checkpoint with few
layers (vocab 151936, hidden 2048, 16 heads, 2 KV heads, head_dim 128, intermediate 11008, tied), 4 virtual
CPU devices. Runs the tool once per combination, back to back, then prints a table (and --out JSON):
peak extra ratio, seconds and GB/s per step, host RSS peak, and placement speed against a plain numpy copy
of the same bytes measured in the same invocation (the CPU stand-in for the host -> device limit).

  python bench/bench_swap.py                 # ~1.2 GB checkpoint, 4 layers
  python bench/bench_swap.py --layers 2 --out bench.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import run_param_swap as rps  # noqa: E402

QWEN25_3B_SHAPE = dict(vocab_size=151936, hidden_size=2048, num_heads=16, num_kv_heads=2, head_dim=128,
                       intermediate_size=11008, tied=True)
COMBOS = [("streaming", "safetensors"), ("bulk", "safetensors"), ("streaming", "torch"), ("bulk", "torch")]


def numpy_copy_gbps(nbytes: int, repeats: int = 3) -> dict:
    """Best-of-N speed of plain numpy copies of `nbytes` (the bytes the swap places): into a new array
    (allocation and first touch included, as placement must do) and into an already-touched one."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = {"alloc": float("inf"), "warm": float("inf")}
    for _ in range(repeats):
        t = time.perf_counter()
        fresh = src.copy()
        best["alloc"] = min(best["alloc"], time.perf_counter() - t)
        del fresh
        t = time.perf_counter()
        np.copyto(dst, src)
        best["warm"] = min(best["warm"], time.perf_counter() - t)
    return {k: nbytes / v / 1e9 for k, v in best.items()}


def run_once(folder: str, mode: str, source: str, tp: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "run_param_swap.py"), "--model-id", folder,
                               "--device", "cpu", "--tp-size", str(tp), "--swap-mode", mode, "--weights-source",
                               source, "--max-new-tokens", "1", "--rounds", "2", "--json-out", out.name],
                              capture_output=True, text=True, env=env)
        lines = [json.loads(line) for line in open(out.name) if line.strip()]
        records = {r["phase"]: r for r in lines}
        rounds = [r for r in lines if r["phase"] == "swap_round"]
    if proc.returncode != 0:
        raise SystemExit(f"{mode}/{source} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    read, swapped = records["mllm_params_cpu_ready"], records["weights_swapped_from_mllm"]
    placed = swapped["placed_bytes_sum"]
    seconds_to_device = read["seconds"] + swapped["place_s"]
    return {
        "swap_mode": mode, "weights_source": source, "param_bytes_sum": swapped["param_bytes_sum"],
        "swap_peak_extra_ratio": swapped["swap_peak_extra_ratio"],
        "read_s": read["read_s"], "convert_s": read["convert_s"], "host_s": swapped["host_s"],
        "put_s": swapped["put_s"], "assign_s": swapped["assign_s"], "backup_s": swapped["backup_s"],
        "place_gb_per_s": swapped["place_gb_per_s"],
        "read_convert_place_gb_per_s": round(placed / seconds_to_device / 1e9, 3),
        "direct_put_gb_per_s": swapped["direct_put_gb_per_s"],
        "transposed_put_gb_per_s": swapped["transposed_put_gb_per_s"],
        # later swaps reuse the compiled transposes: the steady state of an RL loop
        "rounds_place_gb_per_s": round(sum(r["placed_bytes_sum"] for r in rounds)
                                       / sum(r["place_s"] for r in rounds) / 1e9, 3),
        "rounds_peak_extra_ratio": max(round((r["swap_peak_bytes_in_use_sum"]
                                              - records["engine_ready_dummy"]["memory"]["jax_device_memory_summary"]
                                              ["bytes_in_use_sum"]) / swapped["param_bytes_sum"], 4) for r in rounds),
        "rss_peak_bytes": max(r["memory"]["process_rss_peak_bytes"] for r in lines if "memory" in r),
        "rss_after_read_bytes": read["memory"]["process_rss_bytes"],
        "rss_before_swap_bytes": swapped["rss_before_swap_bytes"],
        "swap_peak_rss_bytes": swapped["swap_peak_rss_bytes"],
        "swap_host_extra_vs_tree": round((swapped["swap_peak_rss_bytes"] - swapped["rss_before_swap_bytes"])
                                         / read["host_bytes"], 3),
        "host_tree_bytes": read["host_bytes"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tp-size", type=int, default=4)
    p.add_argument("--checkpoint-dir", default=None, help="reuse/keep the checkpoint here (default: temp folder)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    tmp = None
    folder = args.checkpoint_dir or (tmp := tempfile.mkdtemp(prefix="bench_ckpt_"))
    if not os.path.exists(os.path.join(folder, "config.json")):
        t = time.perf_counter()
        rps.write_demo_checkpoint(folder, num_layers=args.layers, **QWEN25_3B_SHAPE)
        print(f"checkpoint written in {time.perf_counter() - t:.1f} s: {folder}", file=sys.stderr)
    rows = []
    for mode, source in COMBOS:
        print(f"running {mode} / {source} ...", file=sys.stderr, flush=True)
        rows.append(run_once(folder, mode, source, args.tp_size))
    copy = numpy_copy_gbps(rows[0]["param_bytes_sum"])
    for row in rows:
        row["numpy_copy_gb_per_s"] = {k: round(v, 3) for k, v in copy.items()}
        row["read_convert_place_vs_numpy_copy"] = round(row["read_convert_place_gb_per_s"] / copy["alloc"], 3)
        row["read_convert_place_vs_warm_copy"] = round(row["read_convert_place_gb_per_s"] / copy["warm"], 3)
        row["rounds_place_vs_numpy_copy"] = round(row["rounds_place_gb_per_s"] / copy["alloc"], 3)
    cols = ["swap_mode", "weights_source", "swap_peak_extra_ratio", "read_s", "convert_s", "host_s", "put_s",
            "assign_s", "backup_s", "place_gb_per_s", "direct_put_gb_per_s", "transposed_put_gb_per_s",
            "read_convert_place_gb_per_s", "read_convert_place_vs_numpy_copy", "read_convert_place_vs_warm_copy",
            "rounds_place_gb_per_s", "rounds_place_vs_numpy_copy", "rounds_peak_extra_ratio",
            "rss_before_swap_bytes", "swap_peak_rss_bytes", "swap_host_extra_vs_tree", "rss_peak_bytes"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c] / 1e9:.2f} GB" if c.endswith("_bytes") else str(row[c]) for c in cols) + " |")
    print("\nrss_peak_bytes is the whole run's peak (the engine's first compile dominates it); "
          "swap_host_extra_vs_tree = (host RSS peak during the swap - RSS before it) / host tree bytes")
    print(f"\nparam bytes over devices: {rows[0]['param_bytes_sum']:,}; host tree: {rows[0]['host_tree_bytes']:,} "
          f"bytes; numpy copy of the same bytes: {copy['alloc']:.2f} GB/s into a new array, "
          f"{copy['warm']:.2f} GB/s into a touched one")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"layers": args.layers, "tp_size": args.tp_size, "rows": rows}, f, indent=1)
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
