#!/usr/bin/env python3
"""A Qwen2.5-3B-shaped random checkpoint (vocab 151936, hidden 2048, 16 heads, 2 KV heads, head_dim 128,
intermediate 11008, tied; bf16) with N layers, written from the config on the machine that runs it (no
download): 36 layers is the full size (6.2 GB), a few layers for a rehearsal on CPU.
Usage: python bench/device/write_checkpoint.py FOLDER LAYERS. Prints one JSON line."""

import json
import os
import sys
import time

from param_swap import demo  # noqa: E402

QWEN25_3B_SHAPE = dict(vocab_size=151936, hidden_size=2048, num_heads=16, num_kv_heads=2, head_dim=128,
                       intermediate_size=11008, tied=True)  # as bench/bench_swap.py's


def main() -> None:
    folder, layers = sys.argv[1], int(sys.argv[2])
    t = time.perf_counter()
    demo.write_demo_checkpoint(folder, num_layers=layers, **QWEN25_3B_SHAPE)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    print(json.dumps({"checkpoint": folder, "num_layers": layers, "safetensors_bytes": size,
                      "seconds": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
