"""The swap: ParamSwapper, the API an RL loop imports (the CLI runs on it too). Every swap takes one path
(run_swap): validate the whole input, compile what it runs, pause generation, place and assign a bucket at a
time, agree with the other hosts, flush the radix cache, continue (a resume continues once the KV pool is
back). And release()/resume() around a trainer's step."""

import contextlib
import dataclasses
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from param_swap import finite, generation, memory, pause, placement, planning, release, rollbacks, trees
from param_swap import sglang_adapter as adapter
from param_swap.engine_state import EngineState, leaves_unchanged
from param_swap.errors import ExitCode, ToolError
from param_swap.hosts import HOSTS
from param_swap.planning import SwapItem
from param_swap.release import DroppedWeights
from param_swap.rollbacks import Rollback, RollbackKind, UndoPoint
from param_swap.stats import TRANSPOSE_ON, FiniteCheck, SwapMode, SwapReport, SwapStats, SwapTimes, Transpose

DEFAULT_BUCKET_MB = 256.0  # --bucket-mb: docs/benchmarks.md ("Buckets")


def buckets(plan: list[SwapItem], bucket_bytes: int | None) -> list[list[SwapItem]]:
    """The plan in consecutive buckets of at most `bucket_bytes` device bytes (a larger tensor is a bucket of
    its own; 0: one tensor each); None: one bucket (bulk)."""
    if bucket_bytes is None:
        return [plan] if plan else []
    out: list[list[SwapItem]] = []
    size = 0
    for item in plan:
        if not out or size + item.nbytes_sum > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(item)
        size += item.nbytes_sum
    return out


def place_and_assign(state: EngineState, plan: list[SwapItem], source: Mapping[str, Any], num_kv_heads: int,
                     stats: SwapStats, undo: Rollback, alias: bool = False, source_check: tuple | None = None) -> dict:
    """Swap every planned tensor into the engine; returns {nnx path: jax.Array}, shared with the engine.

    A bucket at a time (stats.bucket_bytes; bulk: one bucket of everything): place its tensors (dispatched
    together, waited on once), start the check of their NaN/Inf (FiniteCheck.TARGET), assign them, let go of the
    arrays they replaced, go on; a bucket's check is waited on once the next bucket is placed (it ran meanwhile),
    the last one's before the rebind. A refused bucket is rolled back with every bucket before it.
    `source_check` (FiniteCheck.SOURCE, a swap without rollback): the whole tree's check, waited on before the
    first bucket is assigned (it ran while the swap compiled, paused and placed that bucket). Peak: one set + one bucket (or the largest tensor); one set where the rollback
    re-creates what a bucket replaces (free_first: deleted before it is placed); bulk: two sets. If anything
    fails, the previous weights are put back (rollbacks.restore, with `undo`) and a ToolError raised."""
    import jax

    done: list[SwapItem] = []  # assigned so far
    freed: list[SwapItem] = []  # their previous arrays deleted before the new ones were placed (free_first)
    kept: dict[str, Any] = {}  # the current bucket's replaced arrays, alive until the bucket is assigned
    param_dict: dict[str, Any] = {}
    first = free_first(undo, alias)
    checking = source_check  # check_finite's arguments of the check under way: the tree's, or the last bucket's
    try:
        for bucket in buckets(plan, stats.bucket_bytes):
            t = time.perf_counter()
            if first:
                free_replaced(state, bucket, source, stats, freed)
                stats.free_s += time.perf_counter() - t
                t = time.perf_counter()
            host_s = stats.host_s
            placed = {i.target: placement.place(i, source[i.source], num_kv_heads, stats, alias, stats.transpose)
                      for i in bucket}
            jax.block_until_ready(list(placed.values()))
            stats.put_s += time.perf_counter() - t - (stats.host_s - host_s)
            stats.bucket_tensors.append(len(bucket))
            if checking is not None:  # the tree's or the previous bucket's check ran while this one was placed
                stats.finite_check_s += finite.check_finite(*checking)
                checking = None
            if stats.finite_check == FiniteCheck.TARGET:
                t = time.perf_counter()
                checking = (bucket, placed, FiniteCheck.TARGET, finite.screen(placed))
                if undo.kind == RollbackKind.KEPT:  # bulk: its restore needs the replaced arrays, let go of below
                    finite.check_finite(*checking)
                    checking = None
                stats.finite_check_s += time.perf_counter() - t
            stats.sample_peak()
            if undo.kind == RollbackKind.COPY:
                t = time.perf_counter()
                undo.backup(state, bucket)
                stats.backup_s += time.perf_counter() - t
            t = time.perf_counter()
            for item in bucket:
                kept[item.target] = state.assign(item.target, placed[item.target])
                done.append(item)
            for item in bucket:
                stats.release(kept.pop(item.target))
            stats.assign_s += time.perf_counter() - t
            param_dict.update(placed)
        if checking is not None:
            stats.finite_check_s += finite.check_finite(*checking)
        t = time.perf_counter()
        state.rebind_from_model()
        stats.assign_s += time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - any failure mid-swap: put the previous weights back, then report
        if checking is not None:
            checking[3].close()  # no screen reads a buffer once the caller has the error
        restored = rollbacks.restore(state, freed if first else done, {} if first else kept, undo)
        if isinstance(e, ToolError):  # input refused mid-swap (check_finite): its own stage and exit code
            e.details.update(restored=restored, rollback=undo.kind, assigned=len(done))
            raise
        raise ToolError("swap", f"the swap failed after {len(done)} of {len(plan)} tensors were assigned: "
                        f"{type(e).__name__}: {e}",
                        "the previous weights were restored" if restored else
                        "no rollback (--no-rollback, or a device source): the engine is half-swapped and "
                        "is shut down", ExitCode.ENGINE, restored=restored, rollback=undo.kind) from e
    stats.sample_peak()
    return param_dict


def free_first(undo: Rollback, alias: bool) -> bool:
    """Whether each bucket's previous arrays are deleted before its new ones are placed: where the rollback
    re-creates them (dummy, source), so that the swap's peak is one set, not one set + the largest bucket.
    Not with alias (a trainer's arrays may then be the engine's)."""
    return undo.kind in rollbacks.RECREATED and not alias


def free_replaced(state: EngineState, bucket: list[SwapItem], source: Mapping[str, Any], stats: SwapStats,
                  freed: list[SwapItem]) -> None:
    """Each item's Param and leaf to its abstract value and its array deleted (never an array of the source tree
    or one a trainer shares: those are only let go of), each item added to `freed` first: a failure re-creates
    them."""
    sources = {id(a) for a in trees.source_arrays(source)}  # a lazy tree's base: nothing is computed
    for item in bucket:
        freed.append(item)
        old = state.assign(item.target, release.abstract(state.params[item.target].get_value()))
        stats.release(old)
        if trees.on_devices(old) and not old.is_deleted() and id(old) not in sources | stats.shared:
            stats.freed_first_bytes_sum += memory.param_bytes_sum([old])
            old.delete()


def agree_finite(error: ToolError | None) -> ToolError | None:
    """Several hosts: each checked only its own shards of the tree; every rank refuses if any found a NaN or an
    infinity (the lowest such rank's error), before any pauses. One host: `error`."""
    if not HOSTS.multi:
        return error
    found = HOSTS.agree("finite_source", error.record() if error is not None else None)
    if error is not None:
        return error
    return next((ToolError.of_rank(r, rec) for r, rec in enumerate(found) if rec), None)


def agree_plan(plan: list[SwapItem]) -> None:
    """Several hosts: every host is about to swap the same plan, or none touches its engine."""
    plans = HOSTS.agree("swap_plan", planning.plan_fingerprint(plan))
    if len(set(plans)) > 1:
        raise ToolError("swap_agreement", "the hosts planned different swaps: " + ", ".join(
            f"rank {r} {p}" for r, p in enumerate(plans)), "every host must swap the same tree (names, shapes, "
            "dtypes) into the same engine; nothing was swapped", ExitCode.BAD_INPUT, plans=plans)


def agree_swapped(swapper: "ParamSwapper", plan: list[SwapItem], param_dict: Mapping[str, Any],
                  error: ToolError | None, undo: UndoPoint) -> ToolError | None:
    """Several hosts: every host completed this swap, or none keeps it. Each host's completed swaps, plan, error,
    and how many of its engine's Params (and their model_state_leaves entries) are now this swap's arrays (what
    the engine holds, not what the swap says it did) are compared; on any difference every host puts its
    previous weights back (undo_swap), and all raise the same error: the first failed host's, else
    swap_agreement (exit 1: a partial swap would generate with mixed weights and no error). One host: `error`."""
    if not HOSTS.multi:
        return error
    state = swapper.state
    leaves, where = state.leaves(), state.leaf_index
    held = sum(state.params[p].get_value() is a and leaves[where[p]] is a for p, a in param_dict.items())
    seen = HOSTS.agree("swap_done", {"swaps": swapper.swaps, "plan": planning.plan_fingerprint(plan), "params_held": held,
                                     "error": error.record() if error is not None else None})
    if error is None and all(s == seen[0] for s in seen) and held == len(plan):
        return None
    restored = swapper.undo_swap(plan, undo) if error is None else bool(error.details.get("restored"))
    everywhere = all(HOSTS.agree("swap_undone", restored))
    failed = [(r, s["error"]) for r, s in enumerate(seen) if s["error"]]
    hosts = [{"rank": r, "swaps_completed": s["swaps"], "plan": s["plan"], "params_held": s["params_held"],
              "error": s["error"]["error"] if s["error"] else None} for r, s in enumerate(seen)]
    if failed:
        r, rec = failed[0]
        out = ToolError(rec["stage"], f"rank {r}: {rec['error']}", rec["hint"], rec["exit_code"], failed_rank=r)
    else:
        short = [r for r, s in enumerate(seen) if s["params_held"] != len(plan)] or \
            [r for r, s in enumerate(seen) if (s["swaps"], s["plan"]) != (seen[0]["swaps"], seen[0]["plan"])]
        out = ToolError("swap_agreement", f"the hosts did not all complete the swap: rank(s) {short} differ ("
                        + "; ".join(f"rank {h['rank']}: {h['params_held']} of {len(plan)} Params swapped, "
                                    f"{h['swaps_completed']} swaps completed" for h in hosts) + ")",
                        "a partial swap (a host skipped or lost part of it); the previous weights were put back "
                        "on every host" if everywhere else "a partial swap: the engine holds mixed weights",
                        ExitCode.CHECK_FAILED, failed_rank=short[0] if short else 0)
    out.details.update(restored=everywhere, rollback=undo.rollback.kind, hosts=hosts)
    return out


def run_on_engine_loop(engine, coro):
    """Run a coroutine on the engine's event loop from synchronous code (the loop must not be running:
    sglang-jax's own sync calls have the same rule)."""
    loop = adapter.engine_loop(engine)
    if loop.is_running():
        coro.close()
        raise ToolError("arguments", "the engine's event loop is running (a generation or a swap is in "
                        "progress on it)", "from a coroutine on engine.loop, await swapper.swap_async(...); "
                        "from synchronous code, call swap() while no engine call runs")
    return loop.run_until_complete(coro)


@dataclasses.dataclass(frozen=True)
class Released:
    """What release() gave back: the KV pool's layout (None: kept) and the weights dropped (None: kept)."""
    kv: release.KvLayout | None
    weights: release.DroppedWeights | None


@dataclasses.dataclass
class SwapInput:
    """A swap's input, validated whole before anything touches the engine."""
    flat: Mapping[str, Any]
    plan: list[SwapItem]
    device: bool  # every leaf a jax.Array: a trainer-resident source
    undo: Rollback  # how a failure mid-swap puts the previous weights back
    finite_check: FiniteCheck
    source_check: tuple | None = None  # FiniteCheck.SOURCE: check_finite's arguments, the tree's screen under way
    finite_check_s: float = 0.0  # the seconds validate() spent on the check (starting it, or all of it)


@dataclasses.dataclass
class SwapResult:
    report: SwapReport  # its as_json() is what swap() and swap_async() return
    arrays: dict  # {nnx path: the engine's new array} (the CLI's --keep-param-dict, param_sharing_check)
    leaves: dict  # the leaves_unchanged check's details


class ParamSwapper:
    """Swap MLLM-JAX param trees into a running sglang-jax Engine, in place. docs/api.md has the contract and an
    example.

        swapper = ParamSwapper(engine)
        report = swapper.swap(mllm_params, mode="streaming", alias=False)   # the phase JSON's dict
        report = await swapper.swap_async(mllm_params)   # from a coroutine on engine.loop (while serving)

    Sources: numpy leaves (host: placed with device_put) or jax.Array leaves on the engine's devices in ANY
    sharding (trainer-resident: cast, transposed, KV heads repeated and resharded on the devices, no host round
    trip). The plan (target paths, shapes, dtypes, shardings: the engine's own Params) is made once per tree
    layout and validated whole before anything touches the engine. `alias=True` lets a Param BE the trainer's
    array where it already is the target (placement.can_alias): no copy, but a trainer step that donates that
    buffer deletes the engine's weight (check_live and generate() catch it).

    Every swap pauses generation (retract), swaps, flushes the radix cache (a refused flush is an error) and
    continues: requests in flight keep their tokens so far and finish on the new weights. Constructing one
    attaches the tool's hooks to the engine's scheduler and model runner (sglang_adapter.attach says which)."""

    def __init__(self, engine, num_kv_heads: int | None = None, bucket_mb: float = DEFAULT_BUCKET_MB,
                 transpose: str = "auto", allow_nonfinite: bool = False):
        adapter.probe_sglang()  # exit 2 if the installed sglang-jax lacks what the adapter uses
        if adapter.engine_scheduler(engine) is None:
            raise ToolError("arguments", "the engine has no in-process scheduler (not enable_single_process, or "
                            "rank >= 1 of several hosts started with Engine(...))", "start it with "
                            "enable_single_process=True; on several hosts with run_param_swap.start_engine(kwargs)")
        model_runner = adapter.engine_model_runner(engine)
        _, self.guard = adapter.attach(engine)
        self.engine, self.state = engine, EngineState(model_runner)
        facts = adapter.runner_facts(model_runner)
        self.num_kv_heads = num_kv_heads or facts["num_kv_heads"]
        self.arch, self.moe_backend = facts["arch"], facts["moe_backend"]
        self.plans: dict[tuple, list[SwapItem]] = {}
        self.swaps = 0  # swaps completed
        self.shared_ids: set[int] = set()  # ids of the engine's arrays taken from a trainer by the last swap
        self.idle = threading.Event()  # clear while a swap changes the engine (the Stopper waits for it)
        self.idle.set()
        self.last_swap_restored: bool | None = None  # a failed swap: were the previous weights put back
        self.bucket_mb = bucket_mb  # streaming: MB placed before they are assigned (0: one tensor at a time)
        self.allow_nonfinite = allow_nonfinite  # True: NaN/Inf weights are swapped in, not refused (exit 2)
        self.released: Released | None = None  # what release() gave back, until resume()
        platform = self.mesh.devices.flat[0].platform
        self.transpose = TRANSPOSE_ON.get(platform, Transpose.DEVICE) if transpose == Transpose.AUTO \
            else Transpose(transpose)
        # how the engine's weights can be re-created for free when a swap fails: sglang-jax's dummy initialiser
        # at start (load_format="dummy"), the previous read-only host tree after a swap; None: they cannot
        dummy = adapter.engine_loaded_dummy(engine) and rollbacks.holds_dummy_weights(self.state)
        self.free_rollback: Rollback | None = Rollback(RollbackKind.DUMMY, model_runner=model_runner) if dummy else None

    @property
    def mesh(self):
        """The engine's device mesh. A trainer mesh over mesh.devices (in that order) lets every tensor go
        device to device in one jitted transform; another device order goes through jax.device_put."""
        return next(iter(self.state.params.values())).get_value().sharding.mesh

    def plan(self, mllm_params: Mapping[str, Any]) -> list[SwapItem]:
        """The validated plan for this tree's layout (made once per set of names and shapes)."""
        flat = trees.as_flat(mllm_params)
        base = getattr(flat, "base", flat)
        key = tuple((k, tuple(base[k].shape)) for k in sorted(base))
        if key not in self.plans:
            self.plans[key] = planning.plan_swap(flat, self.state.params, self.num_kv_heads, self.arch, self.moe_backend)
        return self.plans[key]

    def to_engine_layout(self, mllm_params: Mapping[str, Any]) -> dict:
        """The tree on the engine's devices as a trainer that swaps with alias=True holds it: {MLLM-JAX key:
        jax.Array}, each tensor in its target's dtype and sharding where the shapes match (then the engine's
        Param can be that very array), else where its transform needs no communication (placement.source_sharding:
        a K/V projection before its heads are repeated, an untied lm_head's kernel)."""
        flat = trees.as_flat(mllm_params)
        return {item.source: placement.put(np.asarray(flat[item.source]).astype(item.dtype, copy=False),
                                           placement.source_sharding(item, tuple(flat[item.source].shape)))
                for item in self.plan(flat)}

    def swap(self, mllm_params: Mapping[str, Any], mode: str = "streaming", alias: bool = False,
             rollback: bool | None = None) -> dict:
        """Swap the tree in; returns the report (seconds, bytes, peak, serving stop, checks). Raises ToolError
        on bad input (nothing touched) or a failed swap (restored says whether the previous weights are back)."""
        return run_on_engine_loop(self.engine, self.swap_async(mllm_params, mode, alias, rollback))

    async def swap_async(self, mllm_params: Mapping[str, Any], mode: str = "streaming", alias: bool = False,
                         rollback: bool | None = None) -> dict:
        """swap() for a coroutine on engine.loop, e.g. while async_generate requests are in flight."""
        return (await self.swap_detailed(mllm_params, mode, alias, rollback)).report.as_json()

    def run_on_loop(self, coro):
        """Run a coroutine on the engine's event loop from synchronous code (run_on_engine_loop)."""
        return run_on_engine_loop(self.engine, coro)

    def generate(self, prompt: str, max_new_tokens: int, logprobs: bool = False) -> generation.Answer:
        """Greedy generation through the tool's path (checks the weights are live; the scheduler's own ids)."""
        return generation.generate_greedy(self.engine, prompt, max_new_tokens, logprobs)

    def check_live(self) -> None:
        """Raise a clear ToolError if any engine weight buffer was deleted (a trainer donated an aliased array)."""
        generation.check_live(self.engine)

    async def swap_detailed(self, mllm_params: Mapping[str, Any], mode: str = "streaming", alias: bool = False,
                            rollback: bool | None = None, plan: list[SwapItem] | None = None,
                            trainer_held: Mapping[str, Any] | None = None) -> SwapResult:
        """The one path of every swap (swap(), swap_async(), the CLI), with the new arrays and the leaves' check:
        validate, compile what the swap runs, then pause generation, change the engine, flush the radix cache,
        continue. A failed swap that was rolled back flushes and continues too (requests finish on the previous
        weights); one that could not be rolled back leaves generation paused (the engine is half-swapped) and
        says so. `trainer_held`: another tree the trainer holds on the devices meanwhile (counted as its own)."""
        if self.released is not None:
            error = ToolError("engine_released", "the engine's memory is released: swap() cannot change it",
                              "resume(tree) swaps the tree in and takes the memory back", ExitCode.BAD_INPUT)
            HOSTS.fail(error)
            raise error
        return await self.run_swap(mllm_params, mode, alias, rollback, plan, trainer_held)

    async def run_swap(self, mllm_params: Mapping[str, Any], mode: str, alias: bool, rollback: bool | None,
                       plan: list[SwapItem] | None, trainer_held: Mapping[str, Any] | None,
                       resuming: bool = False) -> SwapResult:
        """swap_detailed(); `resuming`: the swap of resume(), which leaves generation paused (resume continues it
        once the KV pool is back) and, failed, leaves the engine released."""
        called = time.perf_counter()
        pauses = self.guard.pauses  # before rank 0 of several hosts can send the pause (after the plan step)
        try:
            checked = self.validate(mllm_params, mode, alias, rollback, plan)
        except ToolError as e:
            HOSTS.fail(e)  # several hosts: the others stop at the next step
            raise
        try:
            return await self.swap_checked(checked, mode, alias, trainer_held, resuming, called, pauses)
        finally:
            if checked.source_check is not None:  # waited on by the swap, or abandoned by a failure before it
                checked.source_check[3].close()

    async def swap_checked(self, checked: SwapInput, mode: str, alias: bool,
                           trainer_held: Mapping[str, Any] | None, resuming: bool, called: float,
                           pauses: int) -> SwapResult:
        """run_swap() after validate(): compile, pause, change the engine, agree, flush, continue, report."""
        prepared = placement.prepare_swap(checked.plan, checked.flat, self.num_kv_heads,
                                          Transpose.DEVICE if checked.device else self.transpose, alias,
                                          checked.finite_check == FiniteCheck.TARGET)
        agree_plan(checked.plan)
        start = time.perf_counter()
        paused = await pause.pause_generation(self.guard, pauses, continue_on_failure=not resuming)
        try:
            pause.agree_paused(self.guard, pauses)
        except ToolError:
            if not resuming:
                await pause.continue_generation(self.guard)
            raise
        paused_at = time.perf_counter()
        error, param_dict = None, {}
        undo = UndoPoint(self.swaps, self.free_rollback, checked.undo)  # agree_swapped may undo the swap with it
        try:
            param_dict, stats, before, change_s = self.change_engine(checked, SwapMode(mode), alias, prepared)
        except ToolError as e:
            error = e
        error = agree_swapped(self, checked.plan, param_dict, error, undo)
        if error is not None:
            if error.details.get("restored") and resuming:
                error.details["generation"] = "paused: the engine stays released"
            elif error.details.get("restored"):
                await pause.flush_radix_cache(self.guard)
                await pause.continue_generation(self.guard)
                error.details["generation"] = "continued on the previous weights"
            else:
                error.details["generation"] = "paused: the engine is half-swapped"
            raise error
        sample = memory.device_memory(collect=False)  # still paused: no forward's temporaries in flight
        split = memory.memory_split(self.state.arrays(), trees.trainer_arrays(checked.flat, trainer_held),
                                    self.guard.serving_bytes, sample)  # the paused batch's buffers now
        flush_start = time.perf_counter()
        held = await pause.flush_radix_cache(self.guard)
        flushed = time.perf_counter()
        if not resuming:
            await pause.continue_generation(self.guard)
        continued = time.perf_counter()
        ok, details = leaves_unchanged(self.state, param_dict, stats.still_alive())  # read-only: serving goes on
        times = SwapTimes(start, paused_at, change_s, flush_start, flushed, continued, called, time.perf_counter())
        report = SwapReport(sum(i.nbytes_sum for i in checked.plan), len(param_dict), alias, checked.undo.kind, stats,
                            before, times, ok, split, sample, paused, held, self.guard.retracted_prefills)
        return SwapResult(report, param_dict, details)

    def validate(self, mllm_params, mode: str, alias: bool, rollback: bool | None,
                 plan: list[SwapItem] | None = None) -> SwapInput:
        """Everything checked before the engine is touched: mode, plan, live sources, alias; the Rollback; and
        how the weights are checked for NaN/Inf (FiniteCheck): each bucket as it is placed where a failure
        mid-swap can be rolled back, else the whole tree before any of it is assigned (started here; waited on
        here, before generation is paused, on several hosts and for a lazy tree)."""
        if mode not in tuple(SwapMode):
            raise ToolError("arguments", f"swap mode {mode!r}", "streaming or bulk")
        flat = trees.as_flat(mllm_params)
        plan = plan or self.plan(flat)
        arrays = trees.source_arrays(flat)
        device = bool(arrays) and all(trees.on_devices(a) for a in arrays)
        deleted = [k for k, a in getattr(flat, "base", flat).items() if trees.on_devices(a) and a.is_deleted()]
        if deleted:
            raise ToolError("plan", f"{len(deleted)} source array(s) were deleted: {', '.join(deleted[:3])}",
                            "the trainer donated or deleted them; swap a live tree")
        if alias and not device:
            raise ToolError("arguments", "alias needs a device source (jax.Array leaves)",
                            "a host tree is always copied to the devices")
        if self.released is not None and self.released.weights is not None:  # resume(): back to released
            undo = Rollback(RollbackKind.RELEASED, abstract=self.released.weights.abstract)
        else:
            undo = rollbacks.choose_rollback(SwapMode(mode), rollback, device, self.free_rollback,
                                             self.state.model_runner)
        if self.allow_nonfinite:
            return SwapInput(flat, plan, device, undo, FiniteCheck.OFF)
        if undo.kind != RollbackKind.OFF:
            return SwapInput(flat, plan, device, undo, FiniteCheck.TARGET)
        arrays = {i.source: flat[i.source] for i in plan}  # a lazy tree's arrays computed, all of them
        t = time.perf_counter()
        screen = finite.screen(arrays)  # runs while the swap compiles, pauses and places its first bucket
        if not HOSTS.multi and not hasattr(flat, "base"):
            return SwapInput(flat, plan, device, undo, FiniteCheck.SOURCE, (plan, arrays, FiniteCheck.SOURCE, screen),
                             time.perf_counter() - t)
        # several hosts (each reads its own shards: all must know before any pauses) or a lazy tree (its
        # computed arrays are not kept for the swap): the check is waited on now, before generation is paused
        error, seconds = None, 0.0
        try:
            seconds = finite.check_finite(plan, arrays, FiniteCheck.SOURCE, screen)
        except ToolError as e:
            error = e
        finally:
            screen.close()
        error = agree_finite(error)
        if error is not None:
            error.details.update(assigned=0, rollback=undo.kind)  # the engine was not touched
            raise error
        return SwapInput(flat, plan, device, undo, FiniteCheck.SOURCE, None, seconds)

    def change_engine(self, checked: SwapInput, mode: SwapMode, alias: bool,
                      prepared: tuple[float, int]) -> tuple[dict, SwapStats, int, float]:
        """The engine's change, with generation paused: place, assign, rebind, release (place_and_assign).
        Returns the new arrays, the stats, the bytes in use before and the seconds it took (the memory samples
        left out). `prepared`: prepare_swap's (seconds, compiles)."""
        import jax

        bucket = None if mode == SwapMode.BULK else int(self.bucket_mb * 2**20)
        stats = SwapStats(mode, source="device" if checked.device else "host", shared=self.shared_ids,
                          transpose=Transpose.DEVICE if checked.device else self.transpose, bucket_bytes=bucket,
                          prepare_s=prepared[0], prepare_compiles=prepared[1], finite_check=checked.finite_check,
                          finite_check_s=checked.finite_check_s)
        before = memory.bytes_in_use_sum(memory.device_memory(collect=False))  # no gc pass: generation is paused
        no_host = checked.device and checked.undo.kind != RollbackKind.COPY
        guard = jax.transfer_guard_device_to_host("disallow") if no_host else contextlib.nullcontext()
        t, compiles = time.perf_counter(), placement.count_compiles()
        self.idle.clear()
        self.guard.begin_change()
        try:
            with guard:
                param_dict = place_and_assign(self.state, checked.plan, checked.flat, self.num_kv_heads, stats,
                                              checked.undo, alias, checked.source_check)
            stats.swap_compiles = placement.count_compiles() - compiles
            self.swaps += 1
            self.guard.end_change(self.swaps)
            self.shared_ids, self.last_swap_restored = stats.aliased, None
            self.free_rollback = Rollback(RollbackKind.SOURCE, source=checked.flat, plan=checked.plan,
                                          num_kv_heads=self.num_kv_heads) if trees.read_only(checked.flat) else None
        except ToolError as e:
            self.last_swap_restored = e.details.get("restored")
            whole = self.last_swap_restored and checked.undo.kind != RollbackKind.RELEASED
            self.guard.end_change(self.guard.weights_id if whole else None)
            if not self.last_swap_restored:
                self.free_rollback = None
            raise
        finally:
            self.idle.set()
        return param_dict, stats, before, time.perf_counter() - t - stats.meter_s

    def undo_swap(self, plan: list[SwapItem], undo: UndoPoint) -> bool:
        """Put back the weights a completed swap replaced (with its Rollback), as if it had failed."""
        self.guard.begin_change()
        restored = rollbacks.restore(self.state, plan, {}, undo.rollback)
        self.last_swap_restored = restored
        if restored:
            self.swaps, self.free_rollback = undo.swaps, undo.free_rollback
            self.guard.end_change(undo.swaps)
        else:
            self.free_rollback = None
            self.guard.end_change(None)
        return restored

    def release(self, weights: bool = True, kv_cache: bool = True,
                trainer_held: Mapping[str, Any] | None = None) -> dict:
        """Give the engine's device memory back before a trainer's step (release_async)."""
        return self.run_on_loop(self.release_async(weights, kv_cache, trainer_held))

    def resume(self, tree: Mapping[str, Any] | None = None, *, mode: str = "streaming", alias: bool = False,
               rollback: bool | None = None, trainer_held: Mapping[str, Any] | None = None) -> dict:
        """Take the memory again after the trainer's step, with its new params (resume_async)."""
        return self.run_on_loop(self.resume_async(tree, mode=mode, alias=alias, rollback=rollback,
                                                  trainer_held=trainer_held))

    async def release_async(self, weights: bool = True, kv_cache: bool = True,
                            trainer_held: Mapping[str, Any] | None = None) -> dict:
        """With no request in flight (else ToolError stage `release`, nothing changed): pause generation, flush
        the radix cache, free the KV pool's buffers (kv_cache) and drop every reference the engine holds to its
        weights (weights: its own arrays deleted, a trainer's let go of; arrays a swap returned are deleted too).
        Generation stays paused and generate() raises ToolError stage `engine_released` until resume().
        `trainer_held`: the trainer's trees (params, optimizer state), counted apart in the report."""
        if self.released is not None or not (weights or kv_cache):
            again = self.released is not None
            error = ToolError("release", "the engine is released already" if again else
                              "release(weights=False, kv_cache=False) releases nothing",
                              "resume() first" if again else "release the weights, the KV cache or both",
                              ExitCode.BAD_INPUT)
            HOSTS.fail(error)
            raise error
        t = time.perf_counter()
        pauses = self.guard.pauses
        HOSTS.agree("release")  # every rank has read its count before rank 0's pause can reach its scheduler
        await pause.pause_generation(self.guard, pauses)
        try:
            pause.agree_paused(self.guard, pauses)
            in_flight = HOSTS.agree("release_in_flight", self.guard.paused_requests)
            if any(in_flight):
                raise ToolError("release", f"{max(in_flight)} request(s) in flight: release() needs an idle engine",
                                "release between rollouts, once your requests have finished; nothing was released",
                                ExitCode.BAD_INPUT, requests_in_flight=max(in_flight))
        except ToolError:
            await pause.continue_generation(self.guard)
            raise
        try:
            await pause.flush_radix_cache(self.guard)  # the radix cache's prefix KV goes with the pool
        except ToolError:
            await pause.continue_generation(self.guard)  # nothing was released
            raise
        self.idle.clear()
        kv = dropped = None
        try:
            if kv_cache:
                kv = release.free_kv(self.state.model_runner)
                self.released = Released(kv, None)
            if weights:
                dropped = self.drop_weights()
        except Exception as e:  # noqa: BLE001 - what was released stays recorded; generation stays paused
            error = ToolError("release", f"the release failed: {type(e).__name__}: {e}", "generation stays "
                              "paused; resume() rebuilds what was released", ExitCode.ENGINE,
                              released=self.released is not None)
            HOSTS.fail(error)
            raise error from e
        finally:
            self.idle.set()
        HOSTS.agree("released")
        release_s = time.perf_counter() - t  # the memory sample below (a walk of every live array on CPU) apart
        sample = memory.device_memory()
        trainer = trees.trainer_arrays(trainer_held)
        split = memory.memory_split(self.state.arrays(), trainer, self.guard.serving_bytes, sample)
        held = release.engine_held_arrays(self.state)
        shared = set(memory.buffer_bytes(held)) & set(memory.buffer_bytes(trainer))
        return {"release_s": round(release_s, 4), "kv_bytes_freed": kv.bytes_sum if kv else 0,
                "weights_bytes_deleted": dropped.deleted_bytes_sum if dropped else 0,
                "weights_bytes_let_go": dropped.let_go_bytes_sum if dropped else 0,
                "engine_held_arrays": len(held), "engine_held_bytes_sum": memory.param_bytes_sum(held),
                "engine_held_trainer_buffers": len(shared), **split.as_json(), "memory": sample}

    def drop_weights(self) -> DroppedWeights:
        """Every Param to its abstract value (release.drop_weights), recorded in self.released."""
        self.guard.begin_change()  # the Params are no whole set until resume() swaps one in
        dropped = release.drop_weights(self.state, self.shared_ids)
        self.shared_ids, self.free_rollback = set(), None
        self.released = Released(self.released.kv if self.released else None, dropped)
        return dropped

    async def resume_async(self, tree: Mapping[str, Any] | None = None, *, mode: str = "streaming",
                           alias: bool = False, rollback: bool | None = None,
                           trainer_held: Mapping[str, Any] | None = None) -> dict:
        """Swap `tree` in (required after release(weights=True); the options of swap()), rebuild the KV pool with
        exactly the layout it had (the forward's compiled executables are reused), continue generation. A failed
        resume (a plan error, NaN weights) leaves the engine released, never half-swapped, and says so."""
        released = self.released
        if released is None or (released.weights is not None and tree is None):
            error = ToolError("resume", "the engine is not released" if released is None else
                              "release(weights=True) dropped the engine's weights: resume() needs the tree to "
                              "swap in", "release() first" if released is None else "resume(params): the "
                              "trainer's new params; the engine stays released", ExitCode.BAD_INPUT)
            HOSTS.fail(error)
            raise error
        t = time.perf_counter()
        result = None
        if tree is not None:
            if released.weights is None:  # kept weights: let go of first, so that a failed swap is a released one
                self.drop_weights()
            try:
                result = await self.run_swap(tree, mode, alias, rollback, None, trainer_held, resuming=True)
            except ToolError as e:
                if self.state.arrays():  # the weights are in (a later step failed): only the KV stays released
                    self.released = Released(released.kv, None)
                e.details.update(released=self.released is not None, generation="paused: the engine stays released")
                raise
        try:
            kv_rebuild_s = release.rebuild_kv(self.state.model_runner, released.kv) if released.kv else 0.0
        except Exception as e:  # noqa: BLE001 - an allocation that does not fit: the KV pool stays released
            self.released = Released(released.kv, None)
            error = ToolError("resume", f"the KV pool could not be rebuilt: {type(e).__name__}: {e}", "the weights "
                              "are in; free device memory and call resume() again", ExitCode.ENGINE, released=True,
                              generation="paused: the engine stays released")
            HOSTS.fail(error)
            raise error from e
        HOSTS.agree("resumed")  # every rank's KV pool is back before rank 0's continue reaches its scheduler
        self.released = None
        await pause.continue_generation(self.guard)
        kv_now = memory.param_bytes_sum(adapter.kv_pool_buffers(self.state.model_runner)) if released.kv else 0
        return {"resume_s": round(time.perf_counter() - t, 4), "kv_rebuild_s": round(kv_rebuild_s, 4),
                "kv_bytes_sum": kv_now,
                "swap": result.report.as_json() if result else None}
