#!/usr/bin/env python3
"""Benchmark: what the NaN/Inf check of every swap costs, side by side in one run on the same checkpoint
(the Qwen2.5-3B-shaped one of bench_swap.py, few layers, 4 virtual CPU devices). For each source (the host
tree, streaming; a trainer tree FSDP-sharded on the devices), the tool runs with `--rounds 2` twice back to
back, checking and with --allow-nonfinite, and the table gives each swap's finite_check and finite_check_s
(the seconds the swap waited on it: the first swap's buckets are each checked while the next is placed; a
device source's rounds have no rollback, so the whole tree is screened from before the pause until the first
bucket is placed), swap_s and call_s both ways, and the check's cost as the difference. On CPU the screen's
threads share the cores with the placement: the difference, not finite_check_s, is what the check costs. The
two runs also differ by this machine's noise.

  python bench/finite_check_cost.py --checkpoint-dir /tmp/b4     # ~1.2 GB checkpoint, 4 runs (~6 min)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_swap import QWEN25_3B_SHAPE  # noqa: E402

from param_swap import demo  # noqa: E402

SOURCES = {"host": ("--weights-source", "safetensors"), "trainer fsdp": ("--weights-source", "trainer",
                                                                        "--trainer-sharding", "fsdp")}


def run(folder: str, tp: int, extra: tuple) -> list[dict]:
    """The tool's swap lines (the first swap, then each round)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run_param_swap.py"), "--model-id", folder,
                           "--device", "cpu", "--tp-size", str(tp), "--max-new-tokens", "4", "--rounds", "2", *extra],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{extra} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return [r for r in records if r["phase"] in ("weights_swapped_from_mllm", "swap_round")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tp-size", type=int, default=4)
    p.add_argument("--checkpoint-dir", default=None, help="reuse/keep the checkpoint here (default: temp folder)")
    args = p.parse_args()
    folder = args.checkpoint_dir or tempfile.mkdtemp(prefix="bench_ckpt_")
    if not os.path.exists(os.path.join(folder, "config.json")):
        demo.write_demo_checkpoint(folder, num_layers=args.layers, **QWEN25_3B_SHAPE)
    print("| source | swap | finite_check | finite_check_s | swap_s checked | swap_s allowed | cost / swap_s | "
          "call_s checked | call_s allowed | cost / call_s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, flags in SOURCES.items():
        checked = run(folder, args.tp_size, flags)
        allowed = run(folder, args.tp_size, (*flags, "--allow-nonfinite"))
        for c, a in zip(checked, allowed, strict=True):
            swap = "first" if c["phase"] == "weights_swapped_from_mllm" else f"round {c['round']}"
            print(f"| {name} | {swap} | {c['finite_check']} | {c['finite_check_s']:.4f} | {c['swap_s']:.4f} | "
                  f"{a['swap_s']:.4f} | {(c['swap_s'] - a['swap_s']) / a['swap_s']:+.3f} | {c['call_s']:.4f} | "
                  f"{a['call_s']:.4f} | {(c['call_s'] - a['call_s']) / a['call_s']:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
