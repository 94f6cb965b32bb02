"""The meter: device bytes in use summed over devices (and hosts), and who they belong to (MemorySplit)."""

import dataclasses
import gc
import os
import resource
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from param_swap.hosts import HOSTS


def process_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def device_buffers(arr, wait: bool = True) -> list[tuple[Any, Any, int]]:
    """(device, buffer pointer, bytes) of each addressable shard, read without `addressable_shards`, whose cached
    Shard list keeps dead buffers alive until the next gc.collect(). wait=False: a shard still being computed is
    not waited for (pointer ("pending", id(arr), i)): reading its pointer can block while holding the GIL that
    the computing thread needs (docs/phases.md, "Every check is exact while the scheduler serves")."""
    out = []
    for i in range(len(arr.sharding.addressable_devices)):
        data = arr.addressable_data(i)
        ptr = data.unsafe_buffer_pointer() if wait or data.is_ready() else ("pending", id(arr), i)
        out.append((next(iter(data.devices())), ptr, data.nbytes))
    return out


WALK_TRIES = 3  # live-array walks per sample when a forward in another thread donates a buffer mid-walk


def live_array_bytes_per_device() -> dict[Any, int]:
    """Bytes of the unique device buffers of jax.live_arrays(), per device (CPU has no memory_stats). An array
    that a concurrent forward donates mid-walk is skipped and the walk taken again (at most WALK_TRIES), so that
    one sample is a consistent set of buffers (docs/phases.md; tests/meter_race_probe.py)."""
    import jax

    for _ in range(WALK_TRIES):
        seen: set[tuple[int, int]] = set()
        per_device: dict[Any, int] = {d: 0 for d in jax.local_devices()}
        donated = 0
        for arr in jax.live_arrays():
            try:
                buffers = [] if arr.is_deleted() else device_buffers(arr, wait=False)
            except (RuntimeError, TypeError) as e:  # XlaRuntimeError is a RuntimeError
                if not (arr.is_deleted() or "deleted" in str(e) or "donated" in str(e)):
                    raise
                donated += 1
                continue
            for device, ptr, nbytes in buffers:
                if (device.id, ptr) not in seen:
                    seen.add((device.id, ptr))
                    per_device[device] = per_device.get(device, 0) + nbytes
        if not donated:
            break
    return per_device


def memory_summary(per_device: list[dict]) -> dict[str, int]:
    """Sum, min and max over devices of each figure every device has."""
    summary: dict[str, int] = {}
    for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"):
        values = [s[key] for s in per_device if key in s]
        if len(values) == len(per_device):
            summary.update({f"{key}_sum": sum(values), f"{key}_min": min(values), f"{key}_max": max(values)})
    return summary


def device_memory(collect: bool = True) -> dict:
    import jax

    if collect:
        gc.collect()
    devices = jax.local_devices()  # this host's (a multi-host phase line sums every host's: Hosts.memory)
    stats = [d.memory_stats() for d in devices]
    if all(s for s in stats):
        source = "memory_stats"
        per_device = [{"device": str(d), **{k: int(v) for k, v in s.items() if isinstance(v, (int, float))}}
                      for d, s in zip(devices, stats, strict=True)]
    else:
        source = "live_arrays"
        in_use = live_array_bytes_per_device()
        per_device = [{"device": str(d), "bytes_in_use": in_use.get(d, 0)} for d in devices]
    return {"process_rss_bytes": process_rss_bytes(),
            "process_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "jax_device_memory_stats": per_device,
            "jax_device_memory_summary": memory_summary(per_device), "source": source}


def bytes_in_use_sum(mem: dict) -> int:
    return mem["jax_device_memory_summary"]["bytes_in_use_sum"]


def device_bytes(value) -> int:
    """Device bytes of an array, or of its abstract value (shape, dtype, sharding), over its addressable devices
    (a replica counted on each)."""
    shard = value.sharding.shard_shape(tuple(value.shape))
    return int(np.prod(shard, dtype=np.int64)) * np.dtype(value.dtype).itemsize * len(value.sharding.addressable_devices)


def param_bytes_sum(arrays) -> int:
    """Bytes of the arrays' addressable shards, summed over devices (replicated data counted per device)."""
    return sum(nbytes for a in arrays for _, _, nbytes in device_buffers(a, wait=False))


def gather_memory(mem: dict) -> dict:
    """A phase's memory sample: this host's on one host; on several, every host's devices (rank order), the
    summary over all of them, and per-host figures (hosts). Several hosts: a step every rank takes."""
    if not HOSTS.multi:
        return mem
    samples = HOSTS.agree("memory", mem)
    per_device = [d for m in samples for d in m["jax_device_memory_stats"]]
    hosts = [{"rank": r, "bytes_in_use_sum": m["jax_device_memory_summary"].get("bytes_in_use_sum"),
              "process_rss_bytes": m["process_rss_bytes"]} for r, m in enumerate(samples)]
    return {**mem, "jax_device_memory_stats": per_device, "jax_device_memory_summary": memory_summary(per_device),
            "hosts": hosts}


def phase_memory(own: dict | None = None) -> dict:
    """The `memory` of a phase line: its own sample (a swap's, taken while generation was paused), else one
    taken now; gathered over the hosts."""
    return gather_memory(own or device_memory())


def buffer_bytes(arrays: Iterable) -> dict[tuple[int, int], int]:
    """{(device id, buffer pointer): bytes} of the live arrays' device buffers."""
    return {(d.id, p): n for a in arrays if not a.is_deleted() for d, p, n in device_buffers(a)}


@dataclasses.dataclass(frozen=True)
class MemorySplit:
    """Device bytes in use, split by whose they are; summed over every host."""
    bytes_in_use_sum: int  # all of them
    trainer_bytes_sum: int  # the trainer's arrays (a device source, and other trees the trainer holds)
    trainer_only_bytes_sum: int  # the part of them the engine does not share
    serving_bytes_sum: int  # the buffers the batch of a paused or idle scheduler still holds (not weights)
    engine_bytes_sum: int  # the rest: the engine's weights, its KV cache, everything else

    def as_json(self, total_key: str = "bytes_in_use_sum") -> dict:
        """Its fields; `total_key` names the first (a swap's lines call it bytes_in_use_sum_after_swap)."""
        return {total_key if k == "bytes_in_use_sum" else k: v for k, v in dataclasses.asdict(self).items()}


def memory_split(engine_arrays: Iterable, trainer_arrays: Iterable, serving_bytes: Callable[[set], int],
                 memory: dict | None = None) -> MemorySplit:
    """Device bytes in use (now, or in the `memory` sample just taken), split (MemorySplit). `serving_bytes`:
    given the buffers to leave out, what the scheduler's batch holds. Several hosts: a step every rank takes."""
    total = bytes_in_use_sum(memory or device_memory())
    engine = set(buffer_bytes(engine_arrays))
    trainer = buffer_bytes(trainer_arrays)
    trainer_only = sum(n for k, n in trainer.items() if k not in engine)
    serving = serving_bytes(engine | set(trainer))
    split = MemorySplit(total, sum(trainer.values()), trainer_only, serving, total - trainer_only - serving)
    hosts = HOSTS.agree("memory_split", split.as_json())
    return MemorySplit(**{k: sum(h[k] for h in hosts) for k in split.as_json()})
