"""Device-to-device placement against the host path, without an engine (tests/test_trainer.py runs it).

On 4 virtual CPU devices and a mesh built like sglang-jax's (("data", "tensor"), explicit axes), every op
(copy, transpose, KV-head repeat, bf16 and fp32 sources) from sources in many shardings (FSDP, the reverse
device order, replicated, one device, split along the last axis) must give exactly the host path's array:
same bits, shape, dtype and sharding (on CPU the resharding collectives move 16-bit floats as their bits:
IN_PROCESS_COLLECTIVES). prepare_swap compiles beforehand everything a placement runs: the placement itself compiles
nothing. Prints one JSON line.
"""

import json
import os

os.environ.setdefault("USE_TORCH", "0")  # transformers without torch: nothing here needs it (6 s less)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from param_swap import memory, placement, planning  # noqa: E402
from param_swap.stats import SwapStats  # noqa: E402

devices = jax.devices()
engine_mesh = Mesh(np.array(devices).reshape(1, 4), ("data", "tensor"),
                   axis_types=(jax.sharding.AxisType.Explicit,) * 2)
BF16 = np.dtype(ml_dtypes.bfloat16)
KV_HEADS = 2  # head_dim 8: a [32, 16] k_proj kernel, repeated x2 to [32, 32] at tp 4


def item(op, shape, spec, replicas=1):
    sharding = NamedSharding(engine_mesh, spec)
    value = jax.device_put(np.zeros(shape, BF16), sharding)
    return planning.SwapItem("t", "s", op, replicas, tuple(shape), value.dtype, sharding, memory.param_bytes_sum([value]))


ITEMS = {  # name: (item, MLLM source shape)
    "copy_col": (item("copy", (32, 64), P(None, "tensor")), (32, 64)),
    "copy_row": (item("copy", (64, 32), P("tensor", None)), (64, 32)),
    "norm": (item("copy", (32,), P()), (32,)),
    "lm_head": (item("transpose", (64, 32), P("tensor", None)), (32, 64)),
    "kv_kernel_x2": (item("kv_heads", (32, 32), P(None, "tensor"), 2), (32, 16)),
    "kv_bias_x2": (item("kv_heads", (32,), P("tensor"), 2), (16,)),
    "kv_kernel_x1": (item("kv_heads", (32, 16), P(None, "tensor"), 1), (32, 16)),
}
SOURCES = {
    "fsdp": lambda shape: NamedSharding(Mesh(np.array(devices), ("fsdp",)), P("fsdp")),
    "fsdp_reversed_devices": lambda shape: NamedSharding(Mesh(np.array(devices[::-1]), ("fsdp",)), P("fsdp")),
    "replicated": lambda shape: NamedSharding(Mesh(np.array(devices), ("fsdp",)), P()),
    "one_device": lambda shape: jax.sharding.SingleDeviceSharding(devices[1]),
    "last_axis_split": lambda shape: NamedSharding(Mesh(np.array(devices), ("m",)), P(*([None] * (len(shape) - 1)), "m")),
}

rng = np.random.default_rng(0)
mismatches, cases, compiled_in_place, prepare_compiles = [], 0, [], 0
for name, (it, shape) in ITEMS.items():
    for dtype in (BF16, np.dtype(np.float32)):
        host = rng.standard_normal(shape).astype(np.float32).astype(dtype)
        want = placement.place(it, host, KV_HEADS)
        for source, sharding in SOURCES.items():
            cases += 1
            src = jax.device_put(host, sharding(shape))
            stats = SwapStats("streaming", source="device")
            prepare_compiles += placement.prepare_swap([it], {"s": src}, KV_HEADS, "device", False)[1]
            before = placement.count_compiles()
            got = placement.place(it, src, KV_HEADS, stats)
            # prepare_swap compiled everything the placement runs (but the jax.device_put of a source on another
            # device order, which JAX compiles itself: device_put_reshards)
            if placement.count_compiles() != before and placement.same_devices(it, src.sharding):
                compiled_in_place.append(f"{name} {dtype} from {source}")
            same = (got.shape == want.shape and got.dtype == want.dtype
                    and got.sharding.is_equivalent_to(want.sharding, got.ndim)
                    and np.asarray(got).tobytes() == np.asarray(want).tobytes())
            if not same:
                mismatches.append(f"{name} {dtype} from {source}")
# alias: an FSDP source whose layout is the target's (a row-split kernel) is the engine's array with the target's
# own sharding (its mesh: sglang-jax's forward refuses another) over the same buffers, no copy
row = ITEMS["copy_row"][0]
fsdp = jax.device_put(rng.standard_normal((64, 32)).astype(BF16), SOURCES["fsdp"]((64, 32)))
aliased = placement.place(row, fsdp, KV_HEADS, SwapStats("streaming", source="device"), alias=True)
alias_ok = (placement.can_alias(row, fsdp) and aliased.sharding == row.sharding
            and sorted(p for _, p, _ in memory.device_buffers(aliased)) == sorted(p for _, p, _ in memory.device_buffers(fsdp)))

# the counter counts: the same placement with the compiled functions forgotten and not prepared compiles again
placement.device_transform.cache_clear()
placement.compiled.cache_clear()
before = placement.count_compiles()
placement.place(ITEMS["copy_col"][0], jax.device_put(np.zeros((32, 64), BF16), SOURCES["fsdp"]((32, 64))), KV_HEADS)
unprepared_compiles = placement.count_compiles() - before
print(json.dumps({"cases": cases, "mismatches": mismatches, "compiled_in_place": compiled_in_place,
                  "prepare_compiles": prepare_compiles, "unprepared_compiles": unprepared_compiles,
                  "fsdp_alias_is_the_target": alias_ok}))
