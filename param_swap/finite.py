"""NaN and infinite weights (a trainer that diverged, a damaged checkpoint) are refused before the engine uses
them: found where the bytes lie, each device its own shards, no communication. Where device buffers are host
memory (XLA:CPU) numpy reads them in place, several threads at once; elsewhere (TPU, GPU) a jitted count runs on
the devices (one read of HBM). Either way the tensors that hold any are then counted exactly for the error."""

import concurrent.futures
import ctypes
import dataclasses
import functools
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from param_swap import trees
from param_swap.errors import ExitCode, ToolError
from param_swap.planning import SwapItem
from param_swap.stats import FiniteCheck

HOST_MEMORY_PLATFORMS = {"cpu"}  # device buffers numpy can read in place (docs/benchmarks.md, "The NaN/Inf check")
PIECE_BYTES = 16 << 20  # a thread's share of a buffer
CHUNK_WORDS = 1 << 16  # 512 KB of 64-bit words per numpy step: the scratch stays in cache


def exponent_mask(dtype) -> tuple[Any, int] | None:
    """(The unsigned integer type of a float's size, its exponent bits), or None for any dtype but a 16- or 32-bit
    float: NaN or infinite <=> every exponent bit is set. Counting in integers beats isfinite on XLA:CPU
    (docs/benchmarks.md, "The NaN/Inf check") and also counts host bfloat16, which numpy's isfinite cannot."""
    import jax.numpy as jnp

    if not jnp.issubdtype(dtype, jnp.floating) or np.dtype(dtype).itemsize not in (2, 4):
        return None
    info = jnp.finfo(dtype)
    return (np.uint16 if np.dtype(dtype).itemsize == 2 else np.uint32), ((1 << info.nexp) - 1) << info.nmant


def word_masks(dtype) -> tuple[int, int, int] | None:
    """(exponent bits, lowest exponent bit, sign bit) of every float packed in a 64-bit word, or None (not a 16-,
    32- or 64-bit float). Per float, (bits & exponent) + lowest reaches the sign bit iff every exponent bit is
    set, and never carries into the next float: an OR over the words finds any NaN or infinity exactly."""
    import jax.numpy as jnp

    if not jnp.issubdtype(dtype, jnp.floating) or (size := np.dtype(dtype).itemsize) not in (2, 4, 8):
        return None
    info = jnp.finfo(dtype)
    per = ((1 << info.nexp) - 1) << info.nmant, 1 << info.nmant, 1 << (info.nexp + info.nmant)
    return tuple(sum(m << (8 * size * k) for k in range(8 // size)) for m in per)


def any_nonfinite_bytes(raw: np.ndarray, dtype, keep: Any = None) -> bool:
    """Whether these bytes (uint8, a whole number of `dtype` floats) hold a NaN or an infinity (word_masks);
    `keep`: what keeps their buffer alive until this returns."""
    exponent, lowest, sign = (np.uint64(m) for m in word_masks(dtype))
    whole = raw.size - raw.size % 8
    words = raw[:whole].view(np.uint64)
    scratch = np.empty(min(CHUNK_WORDS, words.size), np.uint64)
    seen = 0
    for start in range(0, words.size, CHUNK_WORDS):
        chunk = words[start:start + CHUNK_WORDS]
        out = scratch[:chunk.size]
        np.bitwise_and(chunk, exponent, out=out)
        np.add(out, lowest, out=out)
        seen |= int(np.bitwise_or.reduce(out))
    if seen & int(sign):
        return True
    tail = raw[whole:].view(dtype)  # under 8 bytes of 16- or 32-bit floats
    bits = exponent_mask(dtype)
    return bool(tail.size) and bool(np.any((tail.view(bits[0]) & bits[1]) == bits[1]))


def in_place(arr) -> list[tuple[np.ndarray, Any]] | None:
    """This host's distinct shards of `arr` as uint8 numpy arrays over the buffers themselves, each with what
    keeps its buffer alive; None where that is not possible (a device that is not host memory, or a dtype
    word_masks does not cover: counted on the devices instead). A host array is its own bytes."""
    if not trees.on_devices(arr):
        host = np.asarray(arr)
        if word_masks(host.dtype) is None or not host.flags.c_contiguous:
            return None
        return [(host.reshape(-1).view(np.uint8), host)]
    if word_masks(arr.dtype) is None or arr.sharding.device_set and \
            next(iter(arr.sharding.device_set)).platform not in HOST_MEMORY_PLATFORMS:
        return None
    where = arr.sharding.addressable_devices_indices_map(arr.shape)
    out, seen = [], set()
    for i in range(len(arr.sharding.addressable_devices)):
        data = arr.addressable_data(i)  # a single-device array: its buffer pointer, no device->host read
        key = tuple((s.start, s.stop, s.step) for s in where[next(iter(data.devices()))])
        if key in seen or not data.nbytes:
            continue
        seen.add(key)
        data.block_until_ready()  # the bytes are read behind JAX's back: never while still being written
        buffer = (ctypes.c_uint8 * data.nbytes).from_address(data.unsafe_buffer_pointer())
        out.append((np.frombuffer(buffer, np.uint8), data))
    return out


@functools.cache
def pool() -> concurrent.futures.ThreadPoolExecutor:
    """The screen's threads (numpy lets go of the GIL in each step), one per core, at most 4."""
    return concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="finite")


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


def counted_on_devices(sharding, dtype) -> bool:
    """Whether a swap's check of an array in this sharding runs nonfinite_counter (prepare_swap compiles it
    first); where numpy reads it in place (in_place), only an array that holds a NaN or an infinity is."""
    return word_masks(dtype) is None or next(iter(sharding.device_set)).platform not in HOST_MEMORY_PLATFORMS


def dispatch_counts(arrays: Mapping[str, Any]) -> dict[str, tuple]:
    """nonfinite_counter on each of these device arrays (NamedSharding), dispatched, not waited on:
    {name: (array, its per-device counts)}."""
    return {name: (arr, nonfinite_counter(arr.sharding)(arr)) for name, arr in arrays.items()}


def read_counts(pending: Mapping[str, tuple]) -> dict[str, int]:
    """{name: NaN and infinite elements} of dispatch_counts' arrays, read back at once (a few bytes per device):
    this host's shards, a replicated shard once."""
    import jax

    got = jax.device_get({name: [out.addressable_data(i) for i in range(len(out.sharding.addressable_devices))]
                          for name, (_, out) in pending.items()})
    counts = {}
    for name, (arr, out) in pending.items():
        per_device = {next(iter(out.addressable_data(i).devices())): int(np.asarray(v).sum())
                      for i, v in enumerate(got[name])}
        distinct = {tuple((s.start, s.stop, s.step) for s in index): device for device, index in
                    arr.sharding.addressable_devices_indices_map(arr.shape).items()}
        counts[name] = sum(per_device[device] for device in distinct.values())
    return counts


def on_named_devices(arr) -> bool:
    import jax

    return trees.on_devices(arr) and isinstance(arr.sharding, jax.sharding.NamedSharding)


def nonfinite_counts(arrays: Mapping[str, Any]) -> dict[str, int]:
    """{name: NaN and infinite elements} of the arrays that hold any (this host's shards; a replicated
    shard once): host arrays counted by numpy, device arrays (NamedSharding) on their devices."""
    import jax

    counts = {}
    for name, arr in arrays.items():
        if not trees.on_devices(arr):
            host = np.asarray(arr)
            bits = exponent_mask(host.dtype)
            counts[name] = int(np.count_nonzero((host.view(bits[0]) & bits[1]) == bits[1])) if bits else \
                int(np.count_nonzero(~np.isfinite(host))) if host.dtype.kind == "f" else 0
        elif not on_named_devices(arr):
            counts[name] = int(jax.device_get(jax.numpy.sum(~jax.numpy.isfinite(arr))))
    counts.update(read_counts(dispatch_counts({n: a for n, a in arrays.items() if on_named_devices(a)})))
    return {name: n for name, n in counts.items() if n}


@dataclasses.dataclass
class Screen:
    """A look for NaN and infinities under way (screen()): result() waits for it, close() abandons it."""
    pieces: list[tuple[str, concurrent.futures.Future]]  # numpy on the threads, over buffers read in place
    counting: dict[str, tuple]  # dispatch_counts on the devices (TPU, GPU)
    unread: set[str]  # the rest (host arrays of other dtypes): counted when result() is asked

    def result(self) -> set[str]:
        """The names of the arrays that hold a NaN or an infinity (and of the unread ones)."""
        concurrent.futures.wait([f for _, f in self.pieces])  # no thread still reads when this returns or raises
        found = {name for name, piece in self.pieces if piece.result()}
        return found | {name for name, n in read_counts(self.counting).items() if n} | self.unread

    def close(self) -> None:
        """Stop it and wait for the pieces already running: nothing reads a buffer after this returns (a failed
        swap's caller may then delete or donate the arrays)."""
        for _, piece in self.pieces:
            piece.cancel()
        concurrent.futures.wait([f for _, f in self.pieces])


def screen(arrays: Mapping[str, Any]) -> Screen:
    """Start looking for NaN and infinities in these arrays: read in place where possible (in_place), every buffer
    split in PIECE_BYTES pieces over the threads; elsewhere counted on the devices (dispatched). Returns at once
    (the pieces hold their buffers alive; keep the arrays undeleted until result() or close())."""
    pieces, device, unread = [], {}, set()
    step = PIECE_BYTES - PIECE_BYTES % 8
    for name, arr in arrays.items():
        shards = in_place(arr)
        if shards is not None:
            pieces += [(name, pool().submit(any_nonfinite_bytes, raw[s:s + step], arr.dtype, keep))
                       for raw, keep in shards for s in range(0, raw.size, step)]
        elif on_named_devices(arr):
            device[name] = arr
        else:
            unread.add(name)
    return Screen(pieces, dispatch_counts(device), unread)


FINITE_WHERE = {FiniteCheck.TARGET: "placed on the devices, before generation continues",
                FiniteCheck.SOURCE: "in the tree, before any is assigned"}


def check_finite(items: list[SwapItem], arrays: Mapping[str, Any], by: FiniteCheck, started: Screen | None = None) -> float:
    """Refuse (exit 2) if any of these items' arrays holds a NaN or an infinity; `arrays` by the items' target
    names (FiniteCheck.TARGET: placed) or source names (SOURCE: the tree itself); `started`: their screen(),
    already under way. Returns the seconds it waited."""
    t = time.perf_counter()
    suspects = (started or screen(arrays)).result()
    found = nonfinite_counts({name: arr for name, arr in arrays.items() if name in suspects})
    if found:
        item = {getattr(i, "target" if by == FiniteCheck.TARGET else "source"): i for i in items}
        named = [f"{item[k].source} -> {item[k].target} ({n} of {int(np.prod(arrays[k].shape))})" for k, n in found.items()]
        raise ToolError("weights_finite", f"{len(found)} tensor(s) hold NaN or infinite values ({FINITE_WHERE[by]}): "
                        + ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else ""),
                        "a trainer that diverged, or a damaged checkpoint; the engine keeps its previous weights "
                        "(--allow-nonfinite, ParamSwapper(engine, allow_nonfinite=True): swap them knowingly)",
                        ExitCode.BAD_INPUT, nonfinite={item[k].source: n for k, n in found.items()})
    return time.perf_counter() - t
