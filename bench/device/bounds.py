#!/usr/bin/env python3
"""The two bounds a swap is compared with, on the same devices, in one process: a plain jax.device_put of the
checkpoint's host bytes (each tensor as stored, into an FSDP sharding over every device, waited on) and a
plain device-to-device copy of the same arrays (a jitted identity per tensor, compiled first, best of 3).
Usage: python bench/device/bounds.py CHECKPOINT DEVICE TP (DEVICE cpu makes TP virtual devices). Prints one
JSON line, with memory_stats()' bytes_in_use and peak where the backend has them."""

import json
import os
import sys
import time

from param_swap import checkpoint, flags, memory, runner  # noqa: E402


def main() -> None:
    folder, device, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    runner.configure_platform(flags.parse_args(["--device", device, "--tp-size", str(tp)]))
    import jax
    import numpy as np

    info = checkpoint.read_checkpoint_info(os.path.abspath(folder))
    tensors = checkpoint.read_safetensors(info)  # memory-mapped
    for arr in tensors.values():  # the page cache, not the disk: a swap from a warm checkpoint is what is compared
        np.asarray(arr).sum(dtype=np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))

    def fsdp(shape):
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            "fsdp" if shape and shape[0] % mesh.size == 0 else None))

    t = time.perf_counter()
    arrays = [jax.device_put(a, fsdp(a.shape)) for a in tensors.values()]
    jax.block_until_ready(arrays)
    put_s = time.perf_counter() - t
    host_bytes = sum(a.nbytes for a in tensors.values())
    device_bytes = memory.param_bytes_sum(arrays)
    copies = [jax.jit(lambda a: a + 0, out_shardings=a.sharding) for a in arrays]  # + 0: a real copy, not an alias
    for c, a in zip(copies, arrays, strict=True):
        c(a).block_until_ready()  # compile
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for c, a in zip(copies, arrays, strict=True):
            c(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    print(json.dumps({"bounds": True, "backend": jax.default_backend(), "devices": len(jax.devices()),
                      "tensors": len(arrays), "host_bytes": host_bytes, "device_bytes_sum": device_bytes,
                      "device_put_s": round(put_s, 4), "device_put_gb_per_s": round(device_bytes / put_s / 1e9, 3),
                      "d2d_copy_s": round(best, 4), "d2d_copy_gb_per_s": round(device_bytes / best / 1e9, 3),
                      "bytes_in_use_sum": sum(s.get("bytes_in_use", 0) for s in stats) or None,
                      "peak_bytes_in_use_sum": sum(s.get("peak_bytes_in_use", 0) for s in stats) or None}),
          flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
