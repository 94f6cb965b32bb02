"""Placement: one planned tensor from its source (a host numpy array, or a trainer's jax.Array in any sharding)
to its target on the engine's devices, in the target's dtype and sharding; and everything it compiles, compiled
before generation is paused (prepare_swap)."""

import dataclasses
import functools
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from param_swap import finite, trees
from param_swap.families import Op
from param_swap.planning import SwapItem
from param_swap.stats import SwapStats, Transpose

# Platforms whose collectives run in-process (XLA:CPU): a 16-bit reshard moves its bits, since that backend runs
# it in float32, and each resharding step is waited on, since two in flight can deadlock (docs/benchmarks.md)
IN_PROCESS_COLLECTIVES = {"cpu"}


def transposed_on_device(item: SwapItem, src: np.ndarray, transpose: Transpose) -> bool:
    """With --transpose device, a host kernel that is a transposed view goes in as stored and is transposed on
    the devices (host_array, place)."""
    arr = src.T if item.op == Op.TRANSPOSE else src
    return transpose == Transpose.DEVICE and arr.ndim == 2 and not arr.flags.c_contiguous and arr.T.flags.c_contiguous


def host_array(item: SwapItem, src: np.ndarray, num_kv_heads: int, transpose: Transpose = Transpose.DEVICE) -> tuple[np.ndarray, bool]:
    """(Host array in the engine dtype, transposed). transpose "host" gives the target's layout, possibly a
    strided view for jax.device_put; "device" gives a C-contiguous array, and transposed=True means place()
    transposes it on the devices, where that is faster than a strided host copy (docs/benchmarks.md)."""
    arr = src if src.dtype == item.dtype else src.astype(item.dtype)  # keeps the memory layout
    if item.op == Op.TRANSPOSE:
        arr = arr.T
    transposed = transposed_on_device(item, src, transpose)
    if transposed:
        arr = arr.T
    if item.op == Op.KV_HEADS and item.replicas > 1:  # repeat each head contiguously: [h0, h0, h1, h1]
        axis = 0 if transposed else arr.ndim - 1
        shape = arr.shape
        heads = arr.reshape(*shape[:axis], num_kv_heads, shape[axis] // num_kv_heads, *shape[axis + 1:])
        arr = np.repeat(heads, item.replicas, axis=axis).reshape(*shape[:axis], -1, *shape[axis + 1:])
    return (arr if transpose == Transpose.HOST else np.ascontiguousarray(arr)), transposed


COMPILES: dict[int, int] = {}  # XLA backend compiles run so far, per thread id (count_compiles)


def on_compile_event(event: str, duration: float, **_: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        ident = threading.get_ident()
        COMPILES[ident] = COMPILES.get(ident, 0) + 1


@functools.cache
def compile_listener() -> None:
    import jax

    jax.monitoring.register_event_duration_secs_listener(on_compile_event)


def count_compiles(all_threads: bool = False) -> int:
    """XLA backend compiles run so far by this thread (a swap reports its own: prepare_compiles, swap_compiles)
    or by every thread (the scheduler's forward compiles too). A jax.monitoring listener, installed on first use."""
    compile_listener()
    return sum(COMPILES.values()) if all_threads else COMPILES.get(threading.get_ident(), 0)


@functools.cache
def device_transpose(sharding):
    """A jitted 2-D transpose whose output lands in `sharding` (the input comes in the mirrored sharding,
    so every device transposes its own shard: no communication)."""
    import jax

    return jax.jit(lambda x: x.T, out_shardings=sharding)


def mirrored(sharding, ndim: int):
    import jax

    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*reversed(spec)))


def can_alias(item: SwapItem, src) -> bool:
    """The trainer's array is already exactly the target (shape, dtype, sharding): the engine can use it as is."""
    return (item.op == Op.COPY or (item.op == Op.KV_HEADS and item.replicas == 1)) and src.dtype == item.dtype \
        and tuple(src.shape) == item.shape and src.sharding.is_equivalent_to(item.sharding, len(item.shape))


def as_target(item: SwapItem, src):
    """An array that can alias (can_alias) as the engine's: the trainer's array itself where its sharding is
    the target's; where it is only equivalent (the same devices and layout on another mesh, e.g. an FSDP mesh's
    first axis over the engine's tensor axis), the same per-device buffers in the target's sharding (no copy:
    sglang-jax's forward needs its own mesh on every weight, explicit axes)."""
    import jax

    if src.sharding == item.sharding:
        return src
    shards = [src.addressable_data(i) for i in range(len(src.sharding.addressable_devices))]
    by_device = {next(iter(a.devices())): a for a in shards}
    return jax.make_array_from_single_device_arrays(
        item.shape, item.sharding, [by_device[d] for d in item.sharding.addressable_devices_indices_map(item.shape)])


def fitting(sharding, shape: tuple):
    """`sharding`'s spec on its mesh, replicated along every axis of `shape` the mesh axes do not divide."""
    import jax

    mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))

    def size(axes) -> int:
        return int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))

    return jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*[a if a is not None and n % size(a) == 0 else None
                                           for a, n in zip(spec, shape, strict=True)]))


def source_sharding(item: SwapItem, shape: tuple):
    """Where a source tensor of `shape` sits on the engine's mesh so that the item's transform needs no
    communication: the target's sharding (mirrored for a transpose), replicated where it does not divide, and
    along the heads axis of a KV projection whose heads are repeated (the repeat reshapes that axis)."""
    import jax

    sharding = fitting(mirrored(item.sharding, len(shape)) if item.op == Op.TRANSPOSE else item.sharding, shape)
    if item.op == Op.KV_HEADS and item.replicas > 1:
        spec = (tuple(sharding.spec) + (None,) * len(shape))[:len(shape) - 1]
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec, None))
    return sharding


@functools.cache
def device_transform(op: Op, replicas: int, num_kv_heads: int, dtype, sharding, as_bits: bool = False):
    """One jitted function, source -> target on the devices: dtype cast, transpose, KV-head repeat
    ([h0, h0, h1, h1], as host_array does), output in the target sharding. as_bits: the collective that
    reshards the result moves a 16-bit float as uint16 (IN_PROCESS_COLLECTIVES; the barriers keep
    XLA from folding the bitcasts away), the same bits."""
    import jax
    import jax.numpy as jnp

    # the same devices and spec on a mesh of Auto axes: a sharding constraint may not name Explicit ones
    auto_axes = jax.sharding.NamedSharding(jax.sharding.Mesh(sharding.mesh.devices, sharding.mesh.axis_names),
                                           sharding.spec)

    def transform(a):
        a = a.astype(dtype)
        if op == Op.TRANSPOSE:
            a = a.T
        if op == Op.KV_HEADS and replicas > 1:
            lead, last = a.shape[:-1], a.shape[-1]
            heads = a.reshape(*lead, num_kv_heads, last // num_kv_heads)
            a = jnp.repeat(heads, replicas, axis=-2).reshape(*lead, last * replicas)
        if as_bits:
            bits = jax.lax.optimization_barrier(jax.lax.bitcast_convert_type(a, jnp.uint16))
            bits = jax.lax.with_sharding_constraint(bits, auto_axes)
            a = jax.lax.bitcast_convert_type(jax.lax.optimization_barrier(bits), dtype)
        return a

    return jax.jit(transform, out_shardings=sharding)


def same_devices(item: SwapItem, src_sharding) -> bool:
    """A source on the engine's devices in the mesh's order: it can enter the same jit as the target."""
    return src_sharding._device_assignment == item.sharding._device_assignment


def local_slices(op: Op, shape: tuple, src_sharding, dst_sharding) -> bool:
    """Every device already holds what its output needs (no collective): a replicated source, or a copy whose
    target slice on each device lies within the source slice there (the same layout, or a finer split)."""
    if src_sharding.is_fully_replicated:
        return True
    if op != Op.COPY:
        return False
    src, dst = src_sharding.devices_indices_map(shape), dst_sharding.devices_indices_map(shape)

    def within(inner: slice, outer: slice, n: int) -> bool:
        (a, b, _), (c, d, _) = inner.indices(n), outer.indices(n)
        return c <= a and b <= d

    return all(all(within(i, o, n) for i, o, n in zip(dst[dev], src[dev], shape, strict=True)) for dev in dst)


@dataclasses.dataclass(frozen=True)
class DeviceStep:
    fn: Any  # a jitted function (device_transform)
    in_sharding: Any  # the sharding its input comes in
    wait: bool  # an in-process collective (IN_PROCESS_COLLECTIVES): waited on before the next is dispatched


def device_steps(item: SwapItem, shape: tuple, dtype, sharding, num_kv_heads: int) -> list[DeviceStep]:
    """The jitted functions that take a device source of this shape, dtype and sharding (on the engine's
    devices in the mesh's order) to the target, each with the sharding its input comes in: place_device runs
    them, prepare_swap compiles them before a swap. A KV projection split along the heads axis (which the
    repeat reshapes) is first resharded on the devices (source_sharding). Where the platform's collectives
    are in-process (IN_PROCESS_COLLECTIVES), a step that needs one (local_slices says which do not) moves
    16-bit floats as their bits and is waited on."""
    import jax.numpy as jnp

    in_process = item.sharding.mesh.devices.flat[0].platform in IN_PROCESS_COLLECTIVES

    def step(op: Op, replicas: int, out_dtype, out_sharding, in_sharding) -> DeviceStep:
        wait = in_process and not local_slices(op, shape, in_sharding, out_sharding)
        bits = wait and jnp.issubdtype(out_dtype, jnp.floating) and np.dtype(out_dtype).itemsize == 2
        return DeviceStep(device_transform(op, replicas, num_kv_heads, out_dtype, out_sharding, bits),
                          in_sharding, wait)

    steps = []
    if item.op == Op.KV_HEADS and item.replicas > 1 and sharding.shard_shape(shape)[-1] != shape[-1]:
        steps.append(step(Op.COPY, 1, dtype, source_sharding(item, shape), sharding))
        sharding = source_sharding(item, shape)
    return [*steps, step(item.op, item.replicas, item.dtype, item.sharding, sharding)]


def place_device(item: SwapItem, src, num_kv_heads: int, stats: SwapStats | None = None):
    """A trainer-resident source (a jax.Array in any sharding) -> the target, device to device (device_steps).
    A source on another device ORDER than the engine's mesh cannot enter the same jit; it goes through
    jax.device_put, which JAX may route through the host when the slices do not line up (counted in
    device_put_reshards)."""
    import jax

    shape = tuple(src.shape)
    if not same_devices(item, src.sharding):
        src = jax.device_put(src, source_sharding(item, shape))
        if stats is not None:
            stats.device_put_reshards += 1
    for step in device_steps(item, shape, src.dtype, src.sharding, num_kv_heads):
        src = step.fn(src)
        if step.wait:  # never two in-process collectives in flight (IN_PROCESS_COLLECTIVES)
            src.block_until_ready()
    return src


def put(host: np.ndarray, sharding):
    """A host array into `sharding`. One host: jax.device_put. Several: each host puts only the slices its own
    devices hold (jax.make_array_from_callback reads just those from a mapped checkpoint; jax.device_put would
    all-gather every whole tensor across the hosts to check that they agree)."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def index_key(index: tuple) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def host_shards(arr) -> dict[tuple, np.ndarray]:
    """Host copies of this host's distinct shards of `arr`, by index (a replicated shard once). Reads the
    per-device arrays without `addressable_shards`, for the reason device_buffers gives."""
    where = arr.sharding.addressable_devices_indices_map(arr.shape)
    out: dict[tuple, np.ndarray] = {}
    for i in range(len(arr.sharding.addressable_devices)):
        data = arr.addressable_data(i)
        key = index_key(where[next(iter(data.devices()))])
        if key not in out:
            out[key] = np.asarray(data)
    return out


def from_host_shards(shards: Mapping[tuple, np.ndarray], shape: tuple, sharding):
    """The array host_shards() copied, placed again (on every host, from its own shards)."""
    import jax

    return jax.make_array_from_callback(shape, sharding, lambda index: shards[index_key(index)])


def place(item: SwapItem, src, num_kv_heads: int, stats: SwapStats | None = None, alias: bool = False,
          transpose: Transpose = Transpose.DEVICE):
    """The target array of one item, dispatched and not waited on (the swap waits once per bucket). Host
    source: one jax.device_put of the host array into the target sharding (no device-side dtype copy); with
    transpose "device" a kernel goes in as stored, in the mirrored sharding, and one jitted transpose puts it
    in the target's. Device source: place_device, or with `alias` the source's own buffers where it already is
    the target (can_alias, as_target)."""

    if trees.on_devices(src):
        if alias and can_alias(item, src):
            arr = as_target(item, src)
            if stats is not None:
                stats.aliased_bytes_sum += item.nbytes_sum
                stats.aliased.add(id(arr))
            return arr
        transposed = item.op == Op.TRANSPOSE
        arr = place_device(item, src, num_kv_heads, stats)
    else:
        t0 = time.perf_counter()
        host, transposed = host_array(item, src, num_kv_heads, transpose)
        if stats is not None:
            stats.host_s += time.perf_counter() - t0
        if transposed:
            arr = device_transpose(item.sharding)(put(host, mirrored(item.sharding, host.ndim)))
        else:
            arr = put(host, item.sharding)
    if stats is not None:
        stats.copied_bytes_sum += item.nbytes_sum
        stats.transposed_bytes_sum += item.nbytes_sum if transposed else 0
    return arr


@functools.cache
def compiled(fn, shape: tuple, dtype, sharding) -> None:
    """fn compiled for an input of this shape, dtype and sharding (JAX's jit cache keeps it: a later call with
    such an array compiles nothing)."""
    import jax

    fn.lower(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)).compile()


def prepare_swap(plan: list[SwapItem], source: Mapping[str, Any], num_kv_heads: int, transpose: Transpose,
                 alias: bool, count_nonfinite: bool = False) -> tuple[float, int]:
    """Compile every jitted function the swap of this tree will run (device sources: device_steps; host
    kernels transposed on the devices: device_transpose; `count_nonfinite`: the NaN/Inf count of each placed
    array where it runs on the devices, finite.counted_on_devices), before generation is paused, so that the swap
    compiles nothing. Reads only shapes, dtypes and shardings (a lazy source's base: nothing is computed).
    Returns (seconds, compiles): a layout swapped before costs lookups and 0 compiles."""
    t, before = time.perf_counter(), count_compiles()
    base = getattr(source, "base", source)
    for item in plan:
        src = base[item.source]
        shape = tuple(src.shape)
        if count_nonfinite and finite.counted_on_devices(item.sharding, item.dtype):
            compiled(finite.nonfinite_counter(item.sharding), item.shape, item.dtype, item.sharding)
        if trees.on_devices(src):
            if alias and can_alias(item, src):
                continue
            sharding = src.sharding if same_devices(item, src.sharding) else source_sharding(item, shape)
            for step in device_steps(item, shape, src.dtype, sharding, num_kv_heads):
                compiled(step.fn, shape, src.dtype, step.in_sharding)
        elif transposed_on_device(item, src, transpose):
            compiled(device_transpose(item.sharding), tuple(reversed(item.shape)), item.dtype,
                     mirrored(item.sharding, 2))
    return time.perf_counter() - t, count_compiles() - before
