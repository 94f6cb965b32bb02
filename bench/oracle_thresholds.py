#!/usr/bin/env python3
"""The distributions behind --verify-logits' thresholds: correct swaps (bf16 and fp32 engines, tiny random
Qwen2 checkpoints over tp, tied/untied, KV heads, file dtype, seeds) against the planted layout errors of
tests/mutated_run.py. Runs the tool once per case (the oracle told never to fail: tolerances 1e9) and prints
per case the largest and mean |engine - reference| logprob of a generated token and the largest margin by
which a generated token trails the reference's argmax, then the smallest planted-error figure.

  python bench/oracle_thresholds.py                    # ~15 min on 2 cores
  python bench/oracle_thresholds.py --out thresholds.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from param_swap import demo  # noqa: E402

# (engine dtype, tp, checkpoint keywords). fp32 engines run at tp 1: at tp 4, and sometimes at tp 2, a float32
# engine on this 2-core machine aborts in XLA's CPU all-reduce ("Termination timeout for all reduce
# RendezvousKey ... only 3 of them arrived"), with sglang-jax's own loader too; bf16 engines do not. The tool
# now refuses a float32 engine on more CPU devices than cores (exit 2: docs/phases.md, exit codes).
CORRECT = [
    ("bfloat16", 4, dict(tied=True, num_kv_heads=2)),
    ("bfloat16", 4, dict(tied=False, num_kv_heads=1, dtype="float32")),
    ("bfloat16", 2, dict(tied=True, num_kv_heads=4, seed=3)),
    ("bfloat16", 1, dict(tied=False, num_kv_heads=2, seed=5)),
    ("bfloat16", 4, dict(tied=True, num_kv_heads=4, num_layers=4, seed=11)),
    ("bfloat16", 4, dict(tied=False, num_kv_heads=2, hidden_size=1024, intermediate_size=2816, seed=13)),
    ("float32", 1, dict(tied=True, num_kv_heads=2)),
    ("float32", 1, dict(tied=False, num_kv_heads=4, dtype="float32", seed=5)),
    ("float32", 1, dict(tied=False, num_kv_heads=2, num_layers=4, seed=11)),  # 1 KV head at tp 1 fails inside sglang-jax
]
MUTATIONS = ["gate_up_swapped", "kv_heads_tiled", "layers_swapped", "kernel_shifted", "norm_left_dummy"]
PROMPTS = ["The quick brown fox", "Explain what a parameter hot-swap is in one sentence."]


def run_case(folder: str, dtype: str, tp: int, prompt: str, max_new: int, mutation: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    script = [os.path.join(ROOT, "tests", "mutated_run.py"), mutation] if mutation else [os.path.join(ROOT, "run_param_swap.py")]
    cmd = [sys.executable, *script, "--model-id", folder, "--device", "cpu", "--tp-size", str(tp), "--dtype", dtype,
           "--prompt", prompt, "--max-new-tokens", str(max_new), "--verify-logits",
           "--logprob-tolerance", "1e9", "--argmax-margin", "1e9"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    found = [r for r in records if r["phase"] == "logits_verified"]
    if not found:
        raise SystemExit(f"no logits_verified for {cmd}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    r = found[0]
    return {k: r[k] for k in ("max_abs_logprob_diff", "mean_abs_logprob_diff", "max_margin", "argmax_agreement")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (dtype, tp, kw) in enumerate(CORRECT):
            folder = demo.write_demo_checkpoint(os.path.join(tmp, f"c{i}"), **kw)
            for prompt in PROMPTS:
                rows.append({"case": "correct", "engine_dtype": dtype, "tp": tp, "checkpoint": kw, "prompt": prompt,
                             **run_case(folder, dtype, tp, prompt, args.max_new_tokens, None)})
                print(json.dumps(rows[-1]), flush=True)
        folder = demo.write_demo_checkpoint(os.path.join(tmp, "m"), tied=True, num_kv_heads=2)
        for dtype, tp in (("bfloat16", 4), ("float32", 1)):
            for mutation in MUTATIONS if tp > 1 else [m for m in MUTATIONS if m != "kv_heads_tiled"]:
                rows.append({"case": mutation, "engine_dtype": dtype, "tp": tp, "prompt": PROMPTS[0],
                             **run_case(folder, dtype, tp, PROMPTS[0], args.max_new_tokens, mutation)})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| case | engine dtype | tp | max abs d logprob | mean abs d logprob | max margin | argmax agreement |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['engine_dtype']} | {r['tp']} | {r['max_abs_logprob_diff']:.3g} | "
              f"{r['mean_abs_logprob_diff']:.3g} | {r['max_margin']:.3g} | {r['argmax_agreement']} |")
    for dtype in ("bfloat16", "float32"):
        good = [r for r in rows if r["case"] == "correct" and r["engine_dtype"] == dtype]
        bad = [r for r in rows if r["case"] != "correct" and r["engine_dtype"] == dtype]
        print(f"{dtype}: correct swaps max |d| {max(r['max_abs_logprob_diff'] for r in good):.3g}, max margin "
              f"{max(r['max_margin'] for r in good):.3g}; planted errors min of max |d| "
              f"{min(r['max_abs_logprob_diff'] for r in bad):.3g}, min of max margin {min(r['max_margin'] for r in bad):.3g}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
