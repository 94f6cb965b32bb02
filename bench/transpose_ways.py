#!/usr/bin/env python3
"""Where a kernel's transpose is fastest on this platform: one HF-stored [out, in] bf16 kernel (11008 x 2048,
45 MB, Qwen2.5-3B's MLP) put into a tensor-parallel [in, out] sharding over up to 4 devices, four ways, best
and median of 5 after a warm-up, and the results compared bit for bit (docs/benchmarks.md, "Where the
transpose runs"):

  host:   the strided [in, out] view handed to jax.device_put (--transpose host)
  device: the stored array put contiguous in the mirrored sharding, one jitted transpose (--transpose device)
  numpy:  np.ascontiguousarray of the view first, then jax.device_put
  callback: jax.make_array_from_callback over the view (how several hosts place: each its own slices)

  python bench/transpose_ways.py          # 4 virtual CPU devices; on a TPU VM: JAX_PLATFORMS=tpu python ...
                                          # on one GPU: JAX_PLATFORMS=cuda python ... (a 1-device mesh)
"""

import os
import time

if not os.environ.get("JAX_PLATFORMS"):
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402


def main() -> None:
    devices = jax.devices()[:4]
    mesh = Mesh(np.array(devices).reshape(1, len(devices)), ("data", "tensor"))
    target, mirrored = NamedSharding(mesh, P(None, "tensor")), NamedSharding(mesh, P("tensor", None))
    stored = np.random.default_rng(0).standard_normal((11008, 2048)).astype(ml_dtypes.bfloat16)  # [out, in]
    transpose = jax.jit(lambda x: x.T, out_shardings=target)
    ways = {"host": lambda: jax.device_put(stored.T, target),
            "device": lambda: transpose(jax.device_put(stored, mirrored)),
            "numpy": lambda: jax.device_put(np.ascontiguousarray(stored.T), target),
            "callback": lambda: jax.make_array_from_callback(stored.T.shape, target, lambda i: stored.T[i])}
    results = {name: np.asarray(way()) for name, way in ways.items()}  # also the warm-up
    same = all(np.array_equal(results["host"].view(np.uint16), r.view(np.uint16)) for r in results.values())
    print(f"{jax.devices()[0].platform} x{len(devices)}: every way gives the same bits: {same}")
    for name, way in ways.items():
        times = []
        for _ in range(5):
            t = time.perf_counter()
            way().block_until_ready()
            times.append(time.perf_counter() - t)
        print(f"{jax.devices()[0].platform} {name:8s} best {stored.nbytes / min(times) / 1e9:.2f} GB/s, "
              f"median {stored.nbytes / sorted(times)[2] / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
