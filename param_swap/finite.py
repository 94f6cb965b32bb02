"""NaN and infinite weights (a trainer that diverged, a damaged checkpoint) are refused before the engine uses
them: counted on the devices as placed, each device its own shard, no communication."""

import functools
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from param_swap import trees
from param_swap.errors import ExitCode, ToolError
from param_swap.planning import SwapItem
from param_swap.stats import FiniteCheck


def exponent_mask(dtype) -> tuple[Any, int] | None:
    """(The unsigned integer type of a float's size, its exponent bits), or None for any dtype but a 16- or 32-bit
    float: NaN or infinite <=> every exponent bit is set. Counting in integers beats isfinite on XLA:CPU
    (docs/benchmarks.md, "The NaN/Inf check") and also counts host bfloat16, which numpy's isfinite cannot."""
    import jax.numpy as jnp

    if not jnp.issubdtype(dtype, jnp.floating) or np.dtype(dtype).itemsize not in (2, 4):
        return None
    info = jnp.finfo(dtype)
    return (np.uint16 if np.dtype(dtype).itemsize == 2 else np.uint32), ((1 << info.nexp) - 1) << info.nmant


@functools.cache
def nonfinite_counter(sharding):
    """A jitted count of the NaN and infinite elements in each device's own shard of an array in `sharding`
    (a NamedSharding): one int32 per device, left on that device. shard_map: no communication between
    devices or hosts, so it never meets a forward's collectives."""
    import jax
    import jax.numpy as jnp

    axes = tuple(sharding.mesh.axis_names)

    def local(x):
        if (bits := exponent_mask(x.dtype)) is None:
            bad = ~jnp.isfinite(x)
        else:
            bad = (jax.lax.bitcast_convert_type(x, bits[0]) & bits[1]) == bits[1]
        return jnp.sum(bad, dtype=jnp.int32).reshape((1,) * len(axes))

    return jax.jit(jax.shard_map(local, mesh=sharding.mesh, in_specs=sharding.spec,
                                 out_specs=jax.sharding.PartitionSpec(*axes), check_vma=False))


def nonfinite_counts(arrays: Mapping[str, Any]) -> dict[str, int]:
    """{name: NaN and infinite elements} of the arrays that hold any (this host's shards; a replicated
    shard once): host arrays counted by numpy, device arrays (NamedSharding) on their devices, dispatched
    together and read back at once (a few bytes per device)."""
    import jax

    counts, pending = {}, {}
    for name, arr in arrays.items():
        if not trees.on_devices(arr):
            host = np.asarray(arr)
            bits = exponent_mask(host.dtype)
            counts[name] = int(np.count_nonzero((host.view(bits[0]) & bits[1]) == bits[1])) if bits else \
                int(np.count_nonzero(~np.isfinite(host))) if host.dtype.kind == "f" else 0
        elif not isinstance(arr.sharding, jax.sharding.NamedSharding):
            counts[name] = int(jax.device_get(jax.numpy.sum(~jax.numpy.isfinite(arr))))
        else:
            pending[name] = (arr, nonfinite_counter(arr.sharding)(arr))
    got = jax.device_get({name: [out.addressable_data(i) for i in range(len(out.sharding.addressable_devices))]
                          for name, (_, out) in pending.items()})
    for name, (arr, out) in pending.items():
        per_device = {next(iter(out.addressable_data(i).devices())): int(np.asarray(v).sum())
                      for i, v in enumerate(got[name])}
        distinct = {tuple((s.start, s.stop, s.step) for s in index): device for device, index in
                    arr.sharding.addressable_devices_indices_map(arr.shape).items()}
        counts[name] = sum(per_device[device] for device in distinct.values())
    return {name: n for name, n in counts.items() if n}


FINITE_WHERE = {FiniteCheck.TARGET: "placed on the devices, before their assignment",
                FiniteCheck.SOURCE: "in the tree, before the swap"}


def check_finite(items: list[SwapItem], arrays: Mapping[str, Any], by: FiniteCheck) -> float:
    """Refuse (exit 2) if any of these items' arrays holds a NaN or an infinity; `arrays` by the items' target
    names (FiniteCheck.TARGET: placed) or source names (SOURCE: the tree itself). Returns the seconds it took."""
    t = time.perf_counter()
    found = nonfinite_counts(arrays)
    if found:
        item = {getattr(i, "target" if by == FiniteCheck.TARGET else "source"): i for i in items}
        named = [f"{item[k].source} -> {item[k].target} ({n} of {int(np.prod(arrays[k].shape))})" for k, n in found.items()]
        raise ToolError("weights_finite", f"{len(found)} tensor(s) hold NaN or infinite values ({FINITE_WHERE[by]}): "
                        + ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else ""),
                        "a trainer that diverged, or a damaged checkpoint; the engine keeps its previous weights "
                        "(--allow-nonfinite, ParamSwapper(engine, allow_nonfinite=True): swap them knowingly)",
                        ExitCode.BAD_INPUT, nonfinite={item[k].source: n for k, n in found.items()})
    return time.perf_counter() - t
