#!/usr/bin/env python3
"""Benchmark: our swap against tunix's sync on the same engine and checkpoint, a Qwen2.5-3B-shaped one with
few layers (vocab 151936, hidden 2048, 16 heads, 2 KV heads, head_dim 128, intermediate 11008, tied), 4
virtual CPU devices. From the host (streaming with the default bucket, bulk; tunix from a host tree) and
device to device (trainer trees FSDP-sharded, replicated, in the engine's layout with --alias, FSDP with
--alias; tunix from the same FSDP tree), and the host and FSDP rows again with --allow-nonfinite (the NaN/Inf
check's cost). Runs the tool once per combination, back to back, then the device bounds
(bench/device_swap_profile.py: one jit of the whole tree, a jitted identity per tensor), then prints a table
(and --out JSON): swap seconds (swap_s: place + assign + backup + flush; prepare_s, the compiles before
generation is paused, apart; call_s, the whole swap() call) and the split, peak extra ratio, host RSS,
placement speed against a plain numpy copy of the same bytes and a plain device-to-device copy; then ours side
by side with tunix and the ratios (our whole call / tunix's whole call, peak extra ratios), each against its
like; the check's cost; the peak where the old arrays are freed first; the later device swap against the
whole-tree bound.

  python bench/bench_swap.py                 # ~1.2 GB checkpoint, 4 layers: ours x9, tunix x2, bounds (~25 min)
  python bench/bench_swap.py --sweep         # + streaming with --bucket-mb 0 / 64 / 1024 and --transpose device
  python bench/bench_swap.py --all           # + the torch sources
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
from param_swap import demo  # noqa: E402

QWEN25_3B_SHAPE = dict(vocab_size=151936, hidden_size=2048, num_heads=16, num_kv_heads=2, head_dim=128,
                       intermediate_size=11008, tied=True)
COMBOS = [("streaming", "safetensors", ()), ("bulk", "safetensors", ()),  # the first row is our default
          ("streaming", "trainer", ("--trainer-sharding", "fsdp")),
          ("streaming", "trainer", ("--trainer-sharding", "replicated")),
          ("streaming", "trainer", ("--trainer-sharding", "engine", "--alias")),
          ("streaming", "trainer", ("--trainer-sharding", "fsdp", "--alias")),
          ("bulk", "trainer", ("--trainer-sharding", "fsdp")),  # every reshard of the set at once
          # the NaN/Inf check off: its cost is the difference from the same row with it on
          ("streaming", "safetensors", ("--allow-nonfinite",)),
          ("streaming", "trainer", ("--trainer-sharding", "fsdp", "--allow-nonfinite"))]
SWEEP = [("streaming", "safetensors", ("--bucket-mb", "0")), ("streaming", "safetensors", ("--bucket-mb", "64")),
         ("streaming", "safetensors", ("--bucket-mb", "1024")), ("streaming", "safetensors", ("--transpose", "device"))]
OTHER_SOURCES = [("streaming", "torch", ()), ("bulk", "torch", ())]
D2D_COPY = """
import json, sys, time
import jax, numpy as np
from param_swap import checkpoint, demo, memory
info = checkpoint.read_checkpoint_info({folder!r})
tensors = checkpoint.read_safetensors(info)  # memory-mapped: only shapes and dtypes are used
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
def fsdp(shape):
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp" if shape[0] % mesh.size == 0 else None))
arrays = [jax.device_put(np.zeros(t.shape, t.dtype), fsdp(t.shape)) for t in tensors.values()]
copies = [jax.jit(lambda a: a, out_shardings=a.sharding) for a in arrays]
for c, a in zip(copies, arrays):
    c(a).block_until_ready()  # compile
best = float("inf")
for _ in range(3):
    t = time.perf_counter()
    for c, a in zip(copies, arrays):
        c(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
nbytes = sum(memory.param_bytes_sum([a]) for a in arrays)
print(json.dumps({{"bytes": nbytes, "seconds": best, "gb_per_s": nbytes / best / 1e9}}))
"""


def device_copy_gbps(folder: str, tp: int) -> dict:
    """A plain device-to-device copy of the same tensors on the same devices (tp virtual CPU devices: on CPU
    a memcpy): a jitted identity per tensor, FSDP-sharded, compiled first, best of 3, tensor by tensor with
    a wait after each, as the swap does."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={tp}")
    proc = subprocess.run([sys.executable, "-c", D2D_COPY.format(folder=folder)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"device copy failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm_page_cache(folder: str) -> None:
    """Read every file of the checkpoint once, so that every row (ours and tunix's) finds it in the page cache:
    the tool maps the safetensors lazily, so a cold cache would put the disk's speed into the first row's
    placement (14.3 s instead of about 0.8 s in one run here). A cold start's cost is the disk's, not the swap's."""
    t = time.perf_counter()
    nbytes = 0
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            while chunk := f.read(1 << 24):
                nbytes += len(chunk)
    print(f"page cache warmed: {nbytes:,} bytes read in {time.perf_counter() - t:.1f} s", file=sys.stderr)


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


MAX_NEW = 8  # greedy tokens per run, for the prompt below: compared with sglang-jax's own loader
PROMPT = "The quick brown fox"  # bench/tunix_sync.py's too


def run_json(*argv: str, tp: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tunix_rows(folder: str, tp: int, reference: list, sources: tuple[str, ...]) -> list[dict]:
    """tunix's sync (bench/tunix_sync.py) on the same engine and checkpoint, from these sources."""
    import importlib.util

    if importlib.util.find_spec("tunix") is None:
        print("google-tunix not installed (pip install --no-deps -r requirements-bench.txt): no tunix rows",
              file=sys.stderr)
        return []
    rows = []
    for source in sources:
        print(f"running tunix / {source} ...", file=sys.stderr, flush=True)
        r = run_json(os.path.join(ROOT, "bench", "tunix_sync.py"), "--model-id", folder, "--tp-size", str(tp),
                     "--source", source, "--max-new-tokens", str(MAX_NEW), tp=tp)
        rows.append({"method": f"tunix transfer_state_with_mappings, {source} source", "first_swap_s": r["cold_s"],
                     "later_swap_s": r["warm_s"], "swap_peak_extra_ratio": r["ready_peak_extra_ratio"],
                     "sampled_peak_extra_ratio": r["swap_peak_extra_ratio"],
                     "shared_with_trainer_bytes_sum": r["shared_with_trainer_bytes_sum"],
                     "host_reads": r["host_reads"], "host_read_bytes": r["host_read_bytes"],
                     "tokens_equal_own_loader": r["output_ids"] == reference,
                     "tokens_equal_own_loader_without_flush": r["output_ids_without_flush"] == reference})
    return rows


def run_once(folder: str, mode: str, source: str, tp: int, extra: tuple = ()) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "run_param_swap.py"), "--model-id", folder,
                               "--device", "cpu", "--tp-size", str(tp), "--swap-mode", mode, "--weights-source",
                               source, *extra, "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW), "--rounds", "2",
                               "--json-out",
                               out.name],
                              capture_output=True, text=True, env=env)
        lines = [json.loads(line) for line in open(out.name) if line.strip()]
        records = {r["phase"]: r for r in lines}
        rounds = [r for r in lines if r["phase"] == "swap_round"]
    if proc.returncode != 0:
        raise SystemExit(f"{mode}/{source} {extra} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    read, swapped = records["mllm_params_cpu_ready"], records["weights_swapped_from_mllm"]
    placed = swapped["copied_bytes_sum"]
    seconds_to_device = read["seconds"] + swapped["place_s"] + records.get("mllm_params_device_ready", {}).get("seconds", 0)
    later = [r for r in rounds if r["weights"] == "A"]  # round 2 swaps A back (B is computed while it is placed)
    return {
        "swap_mode": mode, "weights_source": " ".join((source, *extra)).replace("--trainer-sharding ", ""),
        "bucket_mb": records["sglang_param_dict_ready"]["bucket_mb"], "transpose": swapped["transpose"],
        "rollback_kind": swapped["rollback_kind"], "later_rollback_kind": later[0]["rollback_kind"],
        "param_bytes_sum": swapped["param_bytes_sum"], "swap_s": swapped["swap_s"], "call_s": swapped["call_s"],
        "rounds_call_s": round(sum(r["call_s"] for r in later) / len(later), 4),
        "finite_check": swapped["finite_check"], "finite_check_s": swapped["finite_check_s"],
        "later_finite_check": later[0]["finite_check"],
        "rounds_finite_check_s": round(sum(r["finite_check_s"] for r in later) / len(later), 4),
        "free_s": swapped["free_s"], "freed_first_bytes_sum": swapped["freed_first_bytes_sum"],
        "prepare_s": swapped["prepare_s"], "prepare_compiles": swapped["prepare_compiles"],
        "swap_compiles": max(r["swap_compiles"] for r in [swapped, *rounds]),
        "later_prepare_compiles": max(r["prepare_compiles"] for r in rounds),
        "weights_made_s": max(r["weights_made_s"] for r in rounds),
        "rounds_swap_s": round(sum(r["swap_s"] for r in later) / len(later), 4),
        "rounds_gb_per_s": round(swapped["param_bytes_sum"] / (sum(r["swap_s"] for r in later) / len(later)) / 1e9, 3),
        "output_ids": records["generate_result"]["output_ids"],
        "copied_bytes_sum": swapped["copied_bytes_sum"], "aliased_bytes_sum": swapped["aliased_bytes_sum"],
        "swap_peak_extra_ratio": swapped["swap_peak_extra_ratio"], "buckets": swapped["buckets"],
        "read_s": read["read_s"], "convert_s": read["convert_s"], "host_s": swapped["host_s"],
        "put_s": swapped["put_s"], "assign_s": swapped["assign_s"], "backup_s": swapped["backup_s"],
        "flush_s": swapped["flush_s"], "meter_s": swapped["meter_s"],
        "place_gb_per_s": swapped["place_gb_per_s"],
        "read_convert_place_gb_per_s": round(placed / seconds_to_device / 1e9, 3),
        # later swaps reuse the compiled transposes: the steady state of an RL loop
        "rounds_place_gb_per_s": round(sum(r["copied_bytes_sum"] for r in rounds)
                                       / sum(r["place_s"] for r in rounds) / 1e9, 3),
        "rounds_peak_extra_ratio": max(r["swap_peak_extra_ratio"] for r in rounds),
        "rss_peak_bytes": max(r["memory"]["process_rss_peak_bytes"] for r in lines if "memory" in r),
        "rss_after_read_bytes": read["memory"]["process_rss_bytes"],
        "rss_before_swap_bytes": swapped["rss_before_swap_bytes"],
        "swap_peak_rss_bytes": swapped["swap_peak_rss_bytes"],
        "swap_host_extra_vs_tree": round((swapped["swap_peak_rss_bytes"] - swapped["rss_before_swap_bytes"])
                                         / read["host_bytes"], 3),
        "host_tree_bytes": read["host_bytes"],
    }


def device_bounds(folder: str, tp: int) -> dict:
    """bench/device_swap_profile.py in its own process on the same checkpoint: the FSDP trainer tree placed into
    the engine's layout tensor by tensor as the tool does (per_tensor), in one jit of the whole tree
    (whole_tree: the transform bound) and by a jitted identity per tensor (plain_copy: the copy bound); per way
    the best GB/s of its runs 2 and 3 (run 1 compiles)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "device_swap_profile.py"), "--model-id", folder,
                           "--tp-size", str(tp), "--ways", "per_tensor,whole_tree,plain_copy"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"device_swap_profile failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {way: max(r["gb_per_s"] for r in rows if r["way"] == way and r["run"] > 1 and r["ok"])
            for way in ("per_tensor", "whole_tree", "plain_copy")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tp-size", type=int, default=4)
    p.add_argument("--checkpoint-dir", default=None, help="reuse/keep the checkpoint here (default: temp folder)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--sweep", action="store_true", help="also streaming with other --bucket-mb and --transpose device")
    p.add_argument("--all", action="store_true", help="also the torch and trainer-resident sources")
    args = p.parse_args()
    tmp = None
    folder = args.checkpoint_dir or (tmp := tempfile.mkdtemp(prefix="bench_ckpt_"))
    if not os.path.exists(os.path.join(folder, "config.json")):
        t = time.perf_counter()
        demo.write_demo_checkpoint(folder, num_layers=args.layers, **QWEN25_3B_SHAPE)
        print(f"checkpoint written in {time.perf_counter() - t:.1f} s: {folder}", file=sys.stderr)
    warm_page_cache(folder)
    rows = []
    for mode, source, extra in COMBOS + SWEEP * args.sweep + OTHER_SOURCES * args.all:
        print(f"running {mode} / {source} {' '.join(extra)} ...", file=sys.stderr, flush=True)
        rows.append(run_once(folder, mode, source, args.tp_size, extra))
    reference = run_json(os.path.join(ROOT, "tests", "reference_generate.py"), "--model-id", folder, "--device", "cpu",
                         "--tp-size", str(args.tp_size), "--prompt", PROMPT, "--max-new-tokens",
                         str(MAX_NEW), tp=args.tp_size)["output_ids"]
    tunix = tunix_rows(folder, args.tp_size, reference, ("host", "device"))
    print("running bench/device_swap_profile.py (the device bounds) ...", file=sys.stderr, flush=True)
    bounds = device_bounds(folder, args.tp_size)
    copy = numpy_copy_gbps(rows[0]["param_bytes_sum"])
    d2d = device_copy_gbps(folder, args.tp_size)
    for row in rows:
        row["device_copy_gb_per_s"] = round(d2d["gb_per_s"], 3)
        row["rounds_place_vs_device_copy"] = round(row["rounds_place_gb_per_s"] / d2d["gb_per_s"], 3)
        row["rounds_swap_vs_device_copy"] = round(row["rounds_gb_per_s"] / d2d["gb_per_s"], 3)
        row["numpy_copy_gb_per_s"] = {k: round(v, 3) for k, v in copy.items()}
        row["read_convert_place_vs_numpy_copy"] = round(row["read_convert_place_gb_per_s"] / copy["alloc"], 3)
        row["read_convert_place_vs_warm_copy"] = round(row["read_convert_place_gb_per_s"] / copy["warm"], 3)
        row["rounds_place_vs_numpy_copy"] = round(row["rounds_place_gb_per_s"] / copy["alloc"], 3)
    cols = ["swap_mode", "weights_source", "bucket_mb", "transpose", "rollback_kind", "buckets", "swap_peak_extra_ratio",
            "freed_first_bytes_sum", "free_s", "swap_s", "call_s", "rounds_call_s", "finite_check", "finite_check_s",
            "later_finite_check", "rounds_finite_check_s", "prepare_s", "prepare_compiles", "swap_compiles", "later_prepare_compiles", "weights_made_s",
            "rounds_swap_s", "rounds_gb_per_s", "rounds_swap_vs_device_copy", "read_s", "convert_s", "host_s", "put_s", "assign_s", "backup_s", "flush_s",
            "meter_s", "place_gb_per_s", "read_convert_place_gb_per_s", "read_convert_place_vs_numpy_copy",
            "read_convert_place_vs_warm_copy", "rounds_place_gb_per_s", "rounds_place_vs_numpy_copy",
            "rounds_place_vs_device_copy", "rounds_peak_extra_ratio",
            "rss_before_swap_bytes", "swap_peak_rss_bytes", "swap_host_extra_vs_tree", "rss_peak_bytes"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c] / 1e9:.2f} GB" if c.endswith("_bytes") else str(row[c]) for c in cols) + " |")
    print("\nrss_peak_bytes is the whole run's peak (the engine's first compile dominates it); "
          "swap_host_extra_vs_tree = (host RSS peak during the swap - RSS before it) / host tree bytes")
    print(f"\nparam bytes over devices: {rows[0]['param_bytes_sum']:,}; host tree: {rows[0]['host_tree_bytes']:,} "
          f"bytes; numpy copy of the same bytes: {copy['alloc']:.2f} GB/s into a new array, "
          f"{copy['warm']:.2f} GB/s into a touched one; device-to-device copy of the same tensors "
          f"(jitted identity, FSDP-sharded, tensor by tensor): {d2d['gb_per_s']:.2f} GB/s")
    side = [{"method": f"ours, {row['swap_mode']}, {row['weights_source']}"
             + (f", bucket {row['bucket_mb']:g} MB, transpose {row['transpose']}" if row["swap_mode"] == "streaming"
                else ""), "first_swap_s": row["swap_s"],
             "later_swap_s": row["rounds_swap_s"], "first_call_s": row["call_s"], "later_call_s": row["rounds_call_s"],
             "swap_peak_extra_ratio": row["swap_peak_extra_ratio"],
             "prepare_s": row["prepare_s"], "shared_with_trainer_bytes_sum": row["aliased_bytes_sum"],
             "tokens_equal_own_loader": row["output_ids"] == reference} for row in rows] + tunix
    print("\nside by side (same engine arguments, same checkpoint, greedy ids of " + str(MAX_NEW) + " tokens vs "
          "sglang-jax's own loader; our peak is sampled after every bucket, tunix's when its new state is ready "
          "(sampled_peak_extra_ratio: a thread every 2 ms); prepare_s is ours before generation is paused, not in "
          "first_swap_s):")
    side_cols = ["method", "first_swap_s", "prepare_s", "later_swap_s", "first_call_s", "later_call_s",
                 "swap_peak_extra_ratio",
                 "sampled_peak_extra_ratio", "shared_with_trainer_bytes_sum", "host_reads", "host_read_bytes",
                 "tokens_equal_own_loader", "tokens_equal_own_loader_without_flush"]
    print("| " + " | ".join(side_cols) + " |")
    print("|" + "---|" * len(side_cols))
    for row in side:
        print("| " + " | ".join(str(row.get(c, "")) for c in side_cols) + " |")
    # like with like: our default from the host against tunix's host source; our FSDP trainer rows (without and
    # with --alias: tunix's engine shares the buffers that line up) against its device source from the same tree
    pairs = [(side[0], "host source")] + [(r, "device source") for r in side if ", trainer fsdp" in r["method"]
                                          and "--allow-nonfinite" not in r["method"]]
    for ours, source in pairs:
        theirs = next((r for r in side if r["method"] == f"tunix transfer_state_with_mappings, {source}"), None)
        if theirs is None:
            continue
        first = ours["first_swap_s"] / theirs["first_swap_s"]
        first_all = (ours["first_swap_s"] + ours["prepare_s"]) / theirs["first_swap_s"]
        later = ours["later_swap_s"] / theirs["later_swap_s"]
        peak = ours["swap_peak_extra_ratio"] / max(theirs["swap_peak_extra_ratio"], 1e-9)
        call_first, call_later = ours["first_call_s"] / theirs["first_swap_s"], ours["later_call_s"] / theirs["later_swap_s"]
        bound = 0.5 if "--alias" in ours["method"] else 1.0  # alias: like for like with tunix's silent sharing
        print(f"\n{ours['method']} / {theirs['method']}: whole call (call_s / tunix's whole update) first "
              f"{call_first:.2f}x, later {call_later:.2f}x (target <= {bound}: "
              f"{'met' if max(call_first, call_later) <= bound else 'NOT met'}; goal 0.5: "
              f"{'met' if max(call_first, call_later) <= 0.5 else 'NOT met'}); swap_s alone first {first:.2f}x "
              f"({first_all:.2f}x with prepare_s), later {later:.2f}x; peak extra ratio {peak:.2f}x "
              f"(<= 1.0: {'met' if peak <= 1.0 else 'NOT met'})")
    print("\nthe NaN/Inf check's cost, side by side: the same row with --allow-nonfinite, swap_s and call_s, "
          "first and later (this machine's noise is in the difference too), target <= 0.10 of the swap:")
    for row in rows:
        if "--allow-nonfinite" not in row["weights_source"]:
            continue
        on = next(r for r in rows if r["swap_mode"] == row["swap_mode"]
                  and r["weights_source"] == row["weights_source"].replace(" --allow-nonfinite", ""))
        for when, key in (("first", "swap_s"), ("later", "rounds_swap_s"), ("first", "call_s"), ("later", "rounds_call_s")):
            cost = (on[key] - row[key]) / row[key]
            print(f"  {on['weights_source']}, {when} {key}: {on[key]:.4f} s checked, {row[key]:.4f} s not: "
                  f"{cost:+.3f} ({'met' if cost <= 0.10 else 'NOT met'})")
    print("the seconds each swap waited on the check (finite_check_s / swap_s; a `source` check's screen starts "
          "before the pause, outside swap_s):")
    for row in rows:
        if row["finite_check"] == "off":
            continue
        for when, check, secs, swap in (("first", row["finite_check"], row["finite_check_s"], row["swap_s"]),
                                        ("later", row["later_finite_check"], row["rounds_finite_check_s"],
                                         row["rounds_swap_s"])):
            print(f"  {row['swap_mode']}, {row['weights_source']}, {when}: {check} {secs:.4f} s / {swap:.4f} s = "
                  f"{secs / swap:.3f}")
    print("\nfree before placing (rollback dummy/source): swap_peak_extra_ratio target <= 0.05:")
    for row in rows:
        if row["swap_mode"] == "streaming" and row["rollback_kind"] in ("dummy", "source"):
            print(f"  {row['weights_source']}, first swap ({row['rollback_kind']}): {row['swap_peak_extra_ratio']} "
                  f"({'met' if row['swap_peak_extra_ratio'] <= 0.05 else 'NOT met'}; freed first "
                  f"{row['freed_first_bytes_sum']:,} bytes in {row['free_s']} s)")
        if row["swap_mode"] == "streaming" and row["later_rollback_kind"] in ("dummy", "source"):
            print(f"  {row['weights_source']}, later swaps ({row['later_rollback_kind']}): "
                  f"{row['rounds_peak_extra_ratio']} ({'met' if row['rounds_peak_extra_ratio'] <= 0.05 else 'NOT met'})")
    print(f"\ndevice bounds (bench/device_swap_profile.py, the FSDP tree, best of runs 2-3): the tool's placement "
          f"per tensor {bounds['per_tensor']:.2f} GB/s, one jit of the whole tree {bounds['whole_tree']:.2f} GB/s, a "
          f"jitted identity per tensor {bounds['plain_copy']:.2f} GB/s")
    for row in rows:
        if row["weights_source"] == "trainer fsdp" and row["swap_mode"] == "streaming":
            ratio = row["rounds_gb_per_s"] / bounds["whole_tree"]
            call = row["param_bytes_sum"] / row["rounds_call_s"] / 1e9 / bounds["whole_tree"]
            print(f"  ours, streaming, trainer fsdp, later swap: {row['rounds_gb_per_s']:.2f} GB/s (swap_s) = "
                  f"{ratio:.2f} of the whole-tree transform (target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'}); "
                  f"by call_s {call:.2f} of it")
    for row in rows:
        if row["weights_source"].startswith("trainer"):
            print(f"\nours, {row['swap_mode']}, {row['weights_source']}: later swap {row['rounds_gb_per_s']:.2f} GB/s = "
                  f"{row['rounds_swap_vs_device_copy']:.2f} of the plain device copy's {d2d['gb_per_s']:.2f} GB/s "
                  f"(target >= 0.5: {'met' if row['rounds_swap_vs_device_copy'] >= 0.5 else 'NOT met'}); "
                  f"compiles in the swaps: {row['swap_compiles']}, in a later swap's prepare: "
                  f"{row['later_prepare_compiles']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"layers": args.layers, "tp_size": args.tp_size, "rows": rows, "side_by_side": side, "bounds": bounds,
                       "reference_output_ids": reference}, f, indent=1)
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
