"""What one swap did and cost: SwapStats (collected while it runs), SwapTimes, and SwapReport (its JSON, the
weights_swapped_from_mllm and swap_round phase lines, what ParamSwapper.swap() returns)."""

import dataclasses
import enum
import time
import weakref

from param_swap import memory
from param_swap.memory import MemorySplit
from param_swap.sglang_adapter import PAUSE_MODE


class SwapMode(enum.StrEnum):
    STREAMING = "streaming"  # a bucket of tensors placed, assigned, the arrays it replaced freed (or freed first)
    BULK = "bulk"  # every array placed, then all assigned (the reference algorithm: two sets at the peak)


class Transpose(enum.StrEnum):
    """Where a host kernel stored [out, in] becomes [in, out] (docs/benchmarks.md, "Where the transpose runs")."""
    AUTO = "auto"  # per platform: TRANSPOSE_ON
    HOST = "host"  # the strided view handed to jax.device_put
    DEVICE = "device"  # placed as stored, one jitted transpose on the devices


TRANSPOSE_ON = {"cpu": Transpose.HOST, "gpu": Transpose.DEVICE, "tpu": Transpose.DEVICE}


class FiniteCheck(enum.StrEnum):
    """How a swap finds NaN and infinite weights (finite.check_finite)."""
    TARGET = "target"  # each bucket as placed on the devices, before generation continues (a failure rolls back)
    SOURCE = "source"  # the whole tree, before any of it is assigned (a swap without rollback)
    OFF = "off"  # allow_nonfinite: swapped in knowingly


@dataclasses.dataclass
class SwapStats:
    """What one swap cost: seconds per step, device bytes placed, the peak, and whether the arrays it
    replaced were released (nothing else may still hold them)."""

    mode: SwapMode
    source: str = "host"  # host (numpy) or device (trainer-resident jax.Arrays)
    transpose: Transpose = Transpose.DEVICE  # host sources: where kernels are transposed (--transpose)
    bucket_bytes: int | None = None  # streaming: device bytes placed before they are assigned (None: bulk)
    bucket_tensors: list[int] = dataclasses.field(default_factory=list)  # tensors per bucket, in swap order
    host_s: float = 0.0  # layout + dtype on the host
    put_s: float = 0.0  # jax.device_put into the target sharding (and device transforms), until ready
    assign_s: float = 0.0  # Param assignment + leaves rebind
    backup_s: float = 0.0  # rollback "copy": host copies of the replaced arrays
    free_s: float = 0.0  # rollback "dummy"/"source": the replaced arrays deleted before the new ones are placed
    freed_first_bytes_sum: int = 0  # their device bytes
    meter_s: float = 0.0  # the device-memory samples (a walk over every live array on CPU): not in the swap's time
    prepare_s: float = 0.0  # before generation is paused: compiling what the swap runs (prepare_swap)
    prepare_compiles: int = 0  # XLA compiles in prepare_swap (0 for a layout swapped before)
    finite_check: FiniteCheck = FiniteCheck.TARGET  # how NaN/Inf weights are found (finite.FiniteCheck)
    finite_check_s: float = 0.0  # the seconds the swap waited on it (source: also what validate() spent on it)
    swap_compiles: int = 0  # XLA compiles while the engine was changed (0: everything was prepared)
    transposed_bytes_sum: int = 0  # kernels transposed on the devices
    copied_bytes_sum: int = 0  # device bytes of the arrays made for the engine (not taken as they are: alias)
    aliased_bytes_sum: int = 0  # device bytes of trainer arrays the engine took as they are (alias)
    device_put_reshards: int = 0  # device sources on another device order than the engine's mesh (place_device)
    peak_bytes_in_use_sum: int = 0
    rss_before_bytes: int = dataclasses.field(default_factory=memory.process_rss_bytes)
    peak_rss_bytes: int = 0  # host memory, sampled with the device peak after every bucket
    replaced: list = dataclasses.field(default_factory=list)  # weakrefs to the replaced arrays
    shared: set = dataclasses.field(default_factory=set)  # ids of engine arrays an earlier swap took from a trainer
    aliased: set = dataclasses.field(default_factory=set)  # ids of the trainer arrays this swap took (alias)
    replaced_shared: int = 0  # replaced arrays that were the trainer's (alias): the trainer owns them

    def sample_peak(self) -> None:
        t = time.perf_counter()
        self.peak_bytes_in_use_sum = max(self.peak_bytes_in_use_sum, memory.bytes_in_use_sum(memory.device_memory(collect=False)))
        self.peak_rss_bytes = max(self.peak_rss_bytes, memory.process_rss_bytes())
        self.meter_s += time.perf_counter() - t

    def release(self, old) -> None:
        if not hasattr(old, "is_deleted"):  # an abstract value (the weights were released): no buffers
            return
        if id(old) in self.shared:  # still the trainer's array: not ours to free
            self.replaced_shared += 1
        else:
            self.replaced.append(weakref.ref(old))

    def still_alive(self) -> int:
        return sum(r() is not None for r in self.replaced)

    def as_json(self) -> dict:
        def gbps(seconds):
            return round(self.copied_bytes_sum / seconds / 1e9, 3) if seconds else None

        place_s = self.host_s + self.put_s
        return {"swap_mode": self.mode, "source": self.source, "transpose": self.transpose,
                "bucket_bytes": self.bucket_bytes, "buckets": len(self.bucket_tensors),
                "bucket_tensors": self.bucket_tensors,
                "host_s": round(self.host_s, 4), "put_s": round(self.put_s, 4),
                "place_s": round(place_s, 4), "assign_s": round(self.assign_s, 4), "backup_s": round(self.backup_s, 4),
                "free_s": round(self.free_s, 4), "freed_first_bytes_sum": self.freed_first_bytes_sum,
                "meter_s": round(self.meter_s, 4), "prepare_s": round(self.prepare_s, 4),
                "prepare_compiles": self.prepare_compiles, "swap_compiles": self.swap_compiles,
                "finite_check": self.finite_check, "finite_check_s": round(self.finite_check_s, 4),
                "copied_bytes_sum": self.copied_bytes_sum,
                "aliased_bytes_sum": self.aliased_bytes_sum, "device_put_reshards": self.device_put_reshards,
                "place_gb_per_s": gbps(place_s), "host_gb_per_s": gbps(self.host_s), "put_gb_per_s": gbps(self.put_s),
                "transposed_bytes_sum": self.transposed_bytes_sum,
                "swap_peak_bytes_in_use_sum": self.peak_bytes_in_use_sum,
                "rss_before_swap_bytes": self.rss_before_bytes, "swap_peak_rss_bytes": self.peak_rss_bytes,
                "replaced_arrays": len(self.replaced) + self.replaced_shared,
                "replaced_shared_with_trainer": self.replaced_shared, "replaced_still_alive": self.still_alive()}


@dataclasses.dataclass
class SwapTimes:
    """perf_counter marks of one swap: start (the pause sent), paused, swapped (changed + memory taken), flushed,
    continued; and the whole call's: called (before the input is validated) and returned."""
    start: float
    paused: float
    change_s: float  # the engine's change itself (place, assign, rebind), the memory samples left out
    flush_start: float
    flushed: float
    continued: float
    called: float
    returned: float


@dataclasses.dataclass
class SwapReport:
    """One swap's report; as_json() is the phase JSON's weights_swapped_from_mllm (docs/phases.md, docs/api.md)."""
    param_bytes_sum: int
    num_swapped: int
    alias: bool
    rollback_kind: str
    stats: SwapStats
    bytes_in_use_sum_before_swap: int
    times: SwapTimes
    leaves_unchanged: bool
    split: MemorySplit
    memory: dict  # the device memory sample, taken while generation was still paused
    requests_paused: int
    requests_held_in_flush: int
    prefill_requests_retracted: int

    def as_json(self) -> dict:
        t = self.times
        swap_s = t.change_s + t.flushed - t.flush_start
        stopped = t.continued - t.start
        return {"swap_s": round(swap_s, 4), "call_s": round(t.returned - t.called, 4), "flush_s": round(t.flushed - t.flush_start, 4),
                "num_swapped": self.num_swapped, "param_bytes_sum": self.param_bytes_sum, "alias": self.alias,
                "rollback": self.rollback_kind != "off", "rollback_kind": self.rollback_kind, **self.stats.as_json(),
                "bytes_in_use_sum_before_swap": self.bytes_in_use_sum_before_swap,
                "swap_peak_extra_ratio": round((self.stats.peak_bytes_in_use_sum - self.bytes_in_use_sum_before_swap)
                                               / self.param_bytes_sum, 4),
                "leaves_unchanged": self.leaves_unchanged, **self.split.as_json("bytes_in_use_sum_after_swap"),
                "memory": self.memory,
                "pause_mode": PAUSE_MODE, "pause_s": round(t.paused - t.start, 4),
                "serving_stopped_s": round(stopped, 4), "serving_stopped_ratio": round(stopped / max(swap_s, 1e-9), 3),
                "requests_paused": self.requests_paused, "requests_held_in_flush": self.requests_held_in_flush,
                "prefill_requests_retracted": self.prefill_requests_retracted}
