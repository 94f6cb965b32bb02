#!/usr/bin/env python3
"""The device run's results (bench/device/run.sh's $OUT) as the tables docs/benchmarks.md keeps: per run its exit
code and verdict; per phase bytes_in_use_sum (and the allocator's peak_bytes_in_use_sum where the backend has
memory_stats) beside the reference v4-8 run's; each swap's seconds and GB/s against the two bounds; the oracles'
seconds; tunix's sync beside ours; the RL cycle's steps with the allocator's figures at its four points. Usage: python bench/device/report.py OUT_DIR"""

import json
import os
import sys

REFERENCE = {"engine_ready_dummy": 6_551_193_600, "sglang_param_dict_ready": 12_800_165_888,
             "weights_swapped_from_mllm": 6_551_193_600}  # the reference TPU v4-8 run (bulk), bytes_in_use_sum
PHASES = ["engine_ready_dummy", "generate_before_swap", "sglang_param_dict_ready", "weights_swapped_from_mllm",
          "weights_verified", "before_generate_param_dict_kept", "generate_result", "after_drop_param_dict"]
RL_POINTS = ("rolled_out", "released", "trained", "resumed")  # the RL cycle's memory points (rl_step.memory_at)


def runs(path: str) -> dict[str, dict]:
    out, name = {}, None
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if "run" in rec:
                name = rec["run"]
                out[name] = {"records": [], "command": rec.get("command")}
            elif "run_end" in rec:
                out[rec["run_end"]].update(exit_code=rec["exit_code"], seconds=rec["seconds"])
            elif name:
                out[name]["records"].append(rec)
    return out


def gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def main() -> None:
    folder = sys.argv[1]
    all_runs = runs(os.path.join(folder, "runs.jsonl"))
    bounds_file = os.path.join(folder, "bounds.jsonl")
    bounds = json.loads(open(bounds_file).read().splitlines()[0]) if os.path.exists(bounds_file) and \
        os.path.getsize(bounds_file) else {}
    print("| run | exit | seconds | checks failed |\n|---|---|---|---|")
    for name, r in all_runs.items():
        summary = next((x for x in r["records"] if x.get("phase") == "summary"), {})
        failed = [k for k, v in summary.get("checks", {}).items() if not v["ok"]]
        error = next((x for x in r["records"] if x.get("phase") == "error"), None)
        print(f"| {name} | {r.get('exit_code')} | {r.get('seconds')} | {', '.join(failed) or '-'}"
              f"{' (error: ' + error['stage'] + ': ' + error['error'][:120] + ')' if error else ''} |")
    print("\n| phase | reference v4-8 (bulk) GB | " + " | ".join(
        f"{n} in use / peak GB" for n in ("streaming", "bulk")) + " |\n|---|---|---|---|")
    for phase in PHASES:
        cells = []
        for name in ("streaming", "bulk"):
            rec = next((x for x in all_runs.get(name, {}).get("records", []) if x.get("phase") == phase), None)
            mem = (rec or {}).get("memory", {}).get("jax_device_memory_summary", {})
            cells.append(f"{gb(mem.get('bytes_in_use_sum'))} / {gb(mem.get('peak_bytes_in_use_sum'))}")
        print(f"| {phase} | {gb(REFERENCE.get(phase))} | " + " | ".join(cells) + " |")
    print(f"\nbounds: device_put {bounds.get('device_put_gb_per_s')} GB/s, device-to-device copy "
          f"{bounds.get('d2d_copy_gb_per_s')} GB/s ({gb(bounds.get('device_bytes_sum'))} GB)")
    print("\n| run | swap_s | place GB/s | vs device_put | vs d2d copy | swap peak extra (of a set) | single copy | "
          "weights oracle s |\n|---|---|---|---|---|---|---|---|")
    for name, r in all_runs.items():
        swap = next((x for x in r["records"] if x.get("phase") == "weights_swapped_from_mllm"), None)
        if swap is None:
            continue
        place = swap.get("place_gb_per_s")
        oracle = next((x for x in r["records"] if x.get("phase") == "weights_verified"), {})
        single = next((x for x in r["records"] if x.get("phase") == "summary"), {}).get("checks", {}).get(
            "single_copy_memory", {}).get("ok")

        def ratio(bound, place=place) -> str:
            return f"{place / bound:.2f}" if place and bound else "-"

        print(f"| {name} | {swap.get('swap_s')} | {place} | {ratio(bounds.get('device_put_gb_per_s'))} | "
              f"{ratio(bounds.get('d2d_copy_gb_per_s'))} | {swap.get('swap_peak_extra_ratio')} | {single} | "
              f"{oracle.get('seconds', '-')} |")
    steps = [x for x in all_runs.get("rl_cycle", {}).get("records", []) if x.get("phase") == "rl_step"]
    if steps:
        print("\n| RL step | release_s | train_s | resume_s | kv_rebuild_s | resume_compiles | released engine GB | "
              + " | ".join(f"{p} in use / peak GB" for p in RL_POINTS) + " |\n|---|---|---|---|---|---|---|"
              + "---|" * len(RL_POINTS))
        for s in steps:
            at = s.get("memory_at", {})
            print(f"| {s['step']} | {s['release_s']} | {s['train_s']} | {s['resume_s']} | {s['kv_rebuild_s']} | "
                  f"{s['resume_compiles']} | {gb(s['released_engine_bytes_sum'])} | " + " | ".join(
                      f"{gb(at.get(p, {}).get('bytes_in_use_sum'))} / {gb(at.get(p, {}).get('peak_bytes_in_use_sum'))}"
                      for p in RL_POINTS) + " |")
    tunix = os.path.join(folder, "tunix.jsonl")
    if os.path.exists(tunix):
        for line in open(tunix):
            t = json.loads(line)
            print(f"\ntunix ({t.get('source')}): cold {t.get('cold_s')} s, warm {t.get('warm_s')} s, peak extra "
                  f"{t.get('swap_peak_extra_ratio')}")


if __name__ == "__main__":
    main()
