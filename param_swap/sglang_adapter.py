"""The sglang-jax adapter: every use of sglang-jax beyond its public Engine API, and the only module that
imports sgl_jax. Where the supported stacks differ, the difference is a line here with the stack named;
probe_sglang() checks, before the engine starts, that the installed release has every module, attribute and
signature used here (NEEDED)."""

import dataclasses
import functools
import logging
import os
import re
import weakref
from typing import Any

from param_swap import memory, trees
from param_swap.errors import ExitCode, ToolError, log
from param_swap.families import FAMILIES

SUPPORTED_STACKS = {  # name -> (sglang-jax distribution version, jax version); each one: make test-compat
    "bd09a87": ("0.0.2", "0.8.1"),  # the TPU reference run's commit (it calls itself 0.0.2); imports qwix
    "0.0.3rc99": ("0.0.3rc99", "0.8.1"),  # requirements-cpu.txt, requirements-tpu.txt
    "0.1.0rc0": ("0.1.0rc0", "0.10.2"),  # the newest release
    "0.1.0rc0-jax0.11": ("0.1.0rc0", "0.11.2"),  # with flax 0.12.12 (flax 0.12.4 cannot import on JAX 0.11)
}


ENGINE_ARGS = ("model_path", "load_format", "enable_single_process", "device", "tp_size", "dtype",
               "download_dir", "mem_fraction_static", "max_prefill_tokens", "max_total_tokens",
               "max_running_requests", "disable_precompile", "watchdog_timeout", "random_seed", "moe_backend",
               "log_level", "nnodes", "node_rank", "dist_init_addr")  # the ServerArgs engine_kwargs() passes


SGL = "sgl_jax.srt."


NEEDED = {  # module (under sgl_jax.srt. unless it starts with sgl_jax.) -> "attribute need" for each thing used.
    # need: "fields:a,b" dataclass fields; "call:a,b" a callable taking these parameters; "sets:a,b" the module's
    # code sets these attributes (on the objects a running engine makes); "reads:a" its code names it.
    "server_args": ["ServerArgs fields:" + ",".join(ENGINE_ARGS)],
    "entrypoints.engine": ["Engine sets:scheduler_info,tokenizer_manager,loop,server_args",
                           "run_scheduler_loop_thread_after_create call:server_args,port_args"],
    "managers.scheduler": [
        "Scheduler sets:_request_dispatcher,waiting_queue,running_batch,last_batch,cur_batch,tp_worker,server_args",
        "Scheduler.flush_cache call:", "Scheduler.stream_output call:reqs", "Scheduler._add_request_to_queue call:req",
        "Scheduler.pause_generation call:recv_req", "Scheduler.recv_requests call:", "Scheduler sets:_engine_paused"],
    "sgl_jax.utils": ["TypeBasedDispatcher sets:_mapping"],
    "managers.schedule_batch": [
        "ScheduleBatch.retract_all call:server_args", "ScheduleBatch.filter_batch call:", "ScheduleBatch.is_empty call:",
        "ScheduleBatch.batch_size call:", "ScheduleBatch sets:forward_mode", "Req.finished call:",
        "Req sets:rid,origin_input_ids,output_ids,output_token_logprobs_val,req_pool_idx"],
    "model_executor.forward_batch_info": ["ForwardMode.is_extend call:"],
    "managers.io_struct": ["PauseGenerationReqInput call:mode", "ContinueGenerationReqInput call:"],
    "managers.tokenizer_manager": ["TokenizerManager.pause_generation call:",
                                   "TokenizerManager.continue_generation call:", "TokenizerManager.flush_cache call:",
                                   "TokenizerManager sets:tokenizer"],
    "managers.tp_worker_overlap_thread": ["ModelWorkerClient sets:worker"],
    "managers.tp_worker": ["ModelWorker sets:model_runner"],
    "model_executor.model_runner": ["ModelRunner sets:model_state_leaves,jitted_run_model,model,mesh,model_config,"
                                    "token_to_kv_pool"],
    "mem_cache.memory_pool": ["MHATokenToKVPool sets:kv_buffer"],
    "configs.model_config": ["ModelConfig.get_total_num_kv_heads call:", "ModelConfig sets:hf_config,dtype,model_path"],
    "configs.load_config": ["LoadConfig call:load_format"],
    "model_loader.loader": ["JAXModelLoader call:load_config,mesh", "JAXModelLoader.load_model call:model_config"],
    "utils.weight_utils": ["WeightLoader call:model,model_config,mesh,dtype", "WeightLoader reads:_dummy_mode",
                           "WeightLoader._get_param call:params,path",
                           "WeightLoader._load_dummy_weights call:params,weight_mappings"],
    "utils.common_utils": ["kill_process_tree call:parent_pid,include_parent"],
}


SGLANG_NEEDS = [(module if module.startswith("sgl_jax.") else SGL + module, *need.split(" ", 1))
                for module, needs in NEEDED.items() for need in needs]  # (module, attribute, need) rows


def installed_versions() -> dict[str, str | None]:
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {dist: version(dist) for dist in ("sglang-jax", "jax", "jaxlib", "flax")}


def missing_need(module: str, name: str, need: str, why: str = "") -> list[str]:
    """What of one SGLANG_NEEDS (or a Family's needs) row the installed sglang-jax lacks (empty: it has it)."""
    import importlib
    import inspect

    try:
        obj = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - whatever stops sglang-jax from importing is what the probe reports
        return [f"{module} does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
    source_module = obj
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return [f"{module}.{name}"]
    kind, _, names = need.partition(":")
    wanted = [n for n in names.split(",") if n]
    if kind == "fields":
        have = {f.name for f in dataclasses.fields(obj)}
        return [f"{name}.{n}" for n in wanted if n not in have]
    if kind == "call":
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            params = {}
        return [f"{module}.{name}({n}=...)" for n in wanted if n not in params]
    if kind == "lacks":
        return [f"{name} still has `{names}`" + (f" ({why})" if why else "")] if names in inspect.getsource(obj) else []
    source = inspect.getsource(inspect.getmodule(obj) or source_module)
    if kind == "reads":
        return [f"{name} never reads {n}" for n in wanted if n not in source]
    # "sets": an assignment self.n = / self.n, x = / a dataclass field n:
    return [f"{name}.{n} (never set in {module})" for n in wanted
            if not re.search(rf"self\.{re.escape(n)}\b[^=\n]*=(?!=)", source)
            and not re.search(rf"^\s+{re.escape(n)}\s*:", source, re.M)]


@functools.cache
def probe_sglang(family: tuple[str, str] | None = None) -> dict:
    """Before the engine starts: every module, attribute and signature the adapter uses (SGLANG_NEEDS, and for
    `family`, (architecture, MoE backend), that Family's needs) is in the installed sglang-jax. Returns the
    versions and the matching SUPPORTED_STACKS name (None: untested, but it has everything); anything missing
    is exit 2, naming it, the versions and the supported stacks."""
    versions = installed_versions()
    missing = [m for row in SGLANG_NEEDS for m in missing_need(*row)]
    needs = FAMILIES[family[0]].needs.get(family[1], []) if family and family[0] in FAMILIES else []
    for_family = [] if missing else [m for row in needs for m in missing_need(*row)]
    if missing or for_family:
        imports = list(dict.fromkeys(m for m in missing if "does not import" in m))
        found = missing or for_family
        shown = imports[:1] if imports else found[:6]
        installed = f"the installed sglang-jax {versions['sglang-jax']} (jax {versions['jax']})"
        what = (f"{installed} lacks what the swap needs: " if missing else
                f"{installed} cannot run the swap for {family[0]} ({family[1]}): ") + "; ".join(shown)
        stacks = "; ".join(f"{name}: sglang-jax {v}, jax {j}" for name, (v, j) in SUPPORTED_STACKS.items()
                           if missing or (v, j) != (versions["sglang-jax"], versions["jax"]))
        raise ToolError("sglang_jax", what + (f" (and {len(found) - len(shown)} more)" if len(found) > len(shown) else ""),
                        ("bd09a87 imports qwix (pip install qwix==0.1.8); else " if any("'qwix'" in m for m in imports) else "")
                        + ("install a supported stack" if missing else "the other families run on this stack; for "
                         "this one install another supported stack") + " (docs/tpu.md: one requirements file each): "
                        + stacks, ExitCode.BAD_INPUT, versions=versions, missing=found,
                        supported_stacks=list(SUPPORTED_STACKS))
    stack = next((name for name, (v, j) in SUPPORTED_STACKS.items()
                  if (v, j) == (versions["sglang-jax"], versions["jax"])), None)
    if stack is None and family is None:
        log(f"sglang-jax {versions['sglang-jax']} with jax {versions['jax']} is not a tested stack (it has everything "
            f"the swap uses; tested: {', '.join(SUPPORTED_STACKS)})")
    return {**versions, "stack": stack}


class EngineErrorLog(logging.Handler):
    """The last error sglang-jax logged: its scheduler logs the exception (a traceback) and then SIGQUITs, so
    this is the engine's own message for the error line."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()

    def text(self) -> str | None:
        lines = [line.strip() for line in (self.last or "").splitlines() if line.strip()]
        return lines[-1] if lines else None


ENGINE_ERRORS = EngineErrorLog()


def engine_scheduler(engine):
    """The in-process scheduler (enable_single_process=True), or None."""
    return (engine.scheduler_info or {}).get("scheduler")


def engine_model_runner(engine):
    return engine_scheduler(engine).tp_worker.worker.model_runner


def engine_extras(engine) -> dict:
    """Where the tool keeps its hooks on one engine (several ParamSwappers of one engine share them)."""
    return engine.scheduler_info


def engine_loop(engine):
    """The event loop the engine's own sync calls run (run_until_complete) and its coroutines belong to."""
    return engine.loop


def engine_tokenizer(engine):
    return engine.tokenizer_manager.tokenizer


def radix_cache_tokens(scheduler) -> int | None:
    """Tokens the scheduler's radix (prefix) cache holds; None where it has none (radix cache disabled)."""
    size = getattr(getattr(scheduler, "tree_cache", None), "total_size", None)
    return int(size()) if callable(size) else None


def engine_loaded_dummy(engine) -> bool:
    return str(getattr(getattr(engine, "server_args", None), "load_format", None)) in ("dummy", "LoadFormat.DUMMY")


def leaves_of(model_runner) -> list:
    """The flattened nnx state every forward reads: ModelRunner.initialize_jit flattens it once, and each forward
    passes `model_state_leaves` to a jitted function whose treedef is frozen."""
    return model_runner.model_state_leaves


def rebind_leaves(model_runner, leaves: list) -> None:
    """A NEW list, never the old one changed in place (releases after 0.0.3rc99 cache on its identity)."""
    model_runner.model_state_leaves = leaves


def runner_model(model_runner):
    return model_runner.model


def runner_facts(model_runner) -> dict:
    """What the plan needs of the engine's model config: its KV heads before tp replication, its HF
    architecture, its MoE backend (epmoe or fused)."""
    config = model_runner.model_config
    return {"num_kv_heads": config.get_total_num_kv_heads(),
            "arch": (getattr(config.hf_config, "architectures", None) or [None])[0],
            "moe_backend": getattr(config.hf_config, "moe_backend", None)}


def kill_engine_children() -> None:
    """sglang-jax's own process-tree kill, for this process's children (the engine's)."""
    from sgl_jax.srt.utils.common_utils import kill_process_tree

    kill_process_tree(os.getpid(), include_parent=False)


class RequestRecorder:
    """The scheduler's own record of every finished request (prompt ids, generated ids, their logprobs), because
    the engine's non-streaming answer is wrong once it spans a 50-token output chunk (docs/phases.md, "The
    generated tokens"). It wraps Scheduler.stream_output and drops records nobody takes, oldest first, past
    `keep`."""

    def __init__(self, scheduler, keep: int = 1024):
        self.finished: dict[str, dict] = {}
        original = scheduler.stream_output

        def stream_output(reqs, *args, **kwargs):
            for req in reqs:
                if req.finished() and req.rid not in self.finished:
                    self.finished[req.rid] = {
                        "prompt_ids": [int(t) for t in req.origin_input_ids],
                        "output_ids": [int(t) for t in req.output_ids],
                        "output_logprobs": ([float(v) for v in req.output_token_logprobs_val]
                                            if req.output_token_logprobs_val is not None else None)}
                    while len(self.finished) > keep:
                        self.finished.pop(next(iter(self.finished)))
            return original(reqs, *args, **kwargs)

        scheduler.stream_output = stream_output

    def take(self, rid: str) -> dict:
        if rid not in self.finished:
            raise ToolError("generate", f"the scheduler kept no record of request {rid}",
                            "sglang-jax's scheduler no longer passes finished requests through stream_output: "
                            "this tool needs a supported sglang-jax (SUPPORTED_STACKS)", ExitCode.ENGINE)
        return self.finished.pop(rid)


def request_recorder(engine) -> RequestRecorder:
    """The engine's RequestRecorder (start_engine and ParamSwapper make it before any request of theirs)."""
    extras = engine_extras(engine)
    if "request_recorder" not in extras:
        extras["request_recorder"] = RequestRecorder(engine_scheduler(engine))
    return extras["request_recorder"]


def start_engine(kwargs: dict):
    """An in-process sglang-jax Engine and its model runner. A failure inside Engine(...) (its scheduler's
    start: a KV cache that does not fit, an engine argument it rejects, a model that cannot be built) is a
    ToolError with the engine's own message, exit 3. When it arrives as SIGQUIT, the Stopper answers."""
    probe_sglang()
    import jax
    import sgl_jax.srt.entrypoints.engine as engine_module
    from sgl_jax.srt.entrypoints.engine import Engine

    if kwargs.get("nnodes", 1) > 1:
        os.environ["SGLANG_BLOCK_NONZERO_RANK_CHILDREN"] = "0"  # rank >= 1: Engine() returns, no health server
    if ENGINE_ERRORS not in logging.getLogger().handlers:
        logging.getLogger().addHandler(ENGINE_ERRORS)
    made = []  # the scheduler, also on rank >= 1 of several hosts, where Engine() keeps no handle on it
    create = engine_module.run_scheduler_loop_thread_after_create

    def create_and_keep(*args, **kwargs):
        made.append(create(*args, **kwargs))
        return made[-1]

    initialize = jax.distributed.initialize
    if kwargs.get("nnodes", 1) > 1 and jax.distributed.is_initialized():
        # bd09a87's Scheduler.__init__ calls jax.distributed.initialize whenever nnodes > 1 (0.0.3rc99 and later
        # skip it when JAX is initialized already: HOSTS.start did, before JAX's backend started)
        jax.distributed.initialize = lambda *args, **kwargs: None
    engine_module.run_scheduler_loop_thread_after_create = create_and_keep
    try:
        engine = Engine(**kwargs)
    except Exception as e:  # noqa: BLE001 - the engine's own errors become one clear error line
        raise ToolError("engine_start", ENGINE_ERRORS.text() or f"{type(e).__name__}: {e}",
                        "see the engine's traceback on stderr", ExitCode.ENGINE) from e
    finally:
        engine_module.run_scheduler_loop_thread_after_create = create
        jax.distributed.initialize = initialize
    if engine.scheduler_info is None and made and made[-1]:  # rank >= 1: no tokenizer, only its scheduler
        engine.scheduler_info = dict(made[-1])
    if engine_scheduler(engine) is None:
        raise ToolError("engine_start", ENGINE_ERRORS.text() or "the engine started without an in-process scheduler",
                        "see the engine's traceback on stderr", ExitCode.ENGINE)
    request_recorder(engine)  # before any request: generate_greedy() reads the scheduler's own ids from it
    return engine, engine_model_runner(engine)


PAUSE_MODE = "retract"  # requests in flight keep their tokens and are prefilled again on the new weights (ServeGuard)


IDLE_WAIT_S = 0.001  # a paused or idle scheduler's turn (ServeGuard.wrap_idle_wait): upstream's own wait when idle
BATCH_INPUTS_KEPT = 4  # forward steps whose inputs serving_bytes() looks at (the paused scheduler holds the last)


class ServeGuard:
    """Hooks on the in-process scheduler that make a swap atomic with respect to generation, and prove it: the
    pause retracts (requests keep their tokens and are prefilled again on the new weights, also those of a last
    prefill batch not yet merged), the flush holds retracted requests aside so that the radix cache can be
    emptied, and every forward step records the weight set it ran on (docs/phases.md, "Swapping while the
    engine serves"). Its state changes only through its own methods."""

    def __init__(self, engine):
        import jax

        self.engine = engine
        self.weights_id = 0  # 0: the dummy weights; each completed swap sets a new id (a rolled-back one not)
        self.changing = False  # True while a swap changes Params (and after a failed swap that could not restore)
        self.forwards = 0
        self.by_weights: dict[int, int] = {}  # weights_id -> forward steps that ran on exactly that set
        self.mixed: list[dict] = []  # forward steps that saw a change of weights
        self.hold_waiting = False  # hold waiting requests aside while the scheduler flushes
        self.held = 0
        self.flushes = 0  # flushes the scheduler has handled (its own thread; rank >= 1: rank 0's, forwarded)
        self.flushes_at_pause = 0  # flushes when the last pause was confirmed (the swap's flush is the next)
        self.last_flush: dict = {}  # the last one's success, message, requests held aside, radix tokens after it
        self.batch_inputs: list[list] = []  # weakrefs to the input arrays of the last BATCH_INPUTS_KEPT forwards
        self.before_serving = {id(a): weakref.ref(a) for a in jax.live_arrays()}  # never counted as a batch's
        self.retracted_prefills = 0
        self.pauses = 0  # pause requests the scheduler has handled (its own thread)
        self.paused_requests: int | None = None  # requests it held at the last pause (None: still running some)
        scheduler = engine_scheduler(engine)
        self.wrap_forward(engine_model_runner(engine))
        self.wrap_flush(scheduler)
        self.wrap_pause(scheduler)
        self.wrap_idle_wait(scheduler)
        self.take_failure_signals(scheduler)

    def wrap_forward(self, model_runner) -> None:
        """Each forward step records the weight set it ran on (mixed: it saw a change) and, weakly, its input
        arrays (what the batch of a paused scheduler still holds: serving_bytes)."""
        import jax

        run_model = model_runner.jitted_run_model

        def jitted_run_model(*args, **kwargs):
            start = (self.weights_id, self.changing)
            out = run_model(*args, **kwargs)
            end = (self.weights_id, self.changing)
            self.forwards += 1
            if start[1] or end[1] or start[0] != end[0]:
                if len(self.mixed) < 100:
                    self.mixed.append({"forward": self.forwards, "weights_at_start": start[0],
                                       "weights_at_end": end[0], "swap_running": start[1] or end[1]})
            else:
                self.by_weights[start[0]] = self.by_weights.get(start[0], 0) + 1
            # the batch's arrays; the weights and the KV cache are not arguments of this wrapper
            self.batch_inputs.append([weakref.ref(a) for a in jax.tree_util.tree_leaves((args, kwargs))
                                      if isinstance(a, jax.Array)])
            del self.batch_inputs[:-BATCH_INPUTS_KEPT]
            return out

        model_runner.jitted_run_model = jitted_run_model

    def wrap_flush(self, scheduler) -> None:
        """The scheduler's flush_cache refuses while requests wait: with hold_waiting, the waiting requests that
        own no KV (retracted) are held aside while it runs, on its own thread; last_flush records its answer."""
        flush = scheduler.flush_cache

        def held_aside():
            self.held = 0
            if not self.hold_waiting:
                return flush()
            held = scheduler.waiting_queue
            owning = [r.rid for r in held if r.req_pool_idx is not None]
            if owning:
                return False, f"{len(owning)} waiting request(s) own KV cache", 0
            scheduler.waiting_queue = []
            try:
                return flush()
            finally:
                scheduler.waiting_queue = held + scheduler.waiting_queue
                self.held = len(held)

        def flush_cache():
            out = held_aside()
            self.last_flush = {"success": bool(out[0]), "message": str(out[1] or ""), "held": self.held,
                               "radix_tokens_after": radix_cache_tokens(scheduler)}
            self.flushes += 1
            return out

        scheduler.flush_cache = flush_cache

    def wrap_pause(self, scheduler) -> None:
        """The scheduler's pause handler, also retracting the requests of a last prefill batch not yet merged
        into the running one (sglang-jax bd09a87 to 0.1.0rc0 misses them, as upstream SGLang does not), and
        recording when the scheduler's own thread has paused (pauses, paused_requests)."""
        mapping = scheduler._request_dispatcher._mapping
        index = next(i for i, (ty, _) in enumerate(mapping) if ty.__name__ == "PauseGenerationReqInput")
        pause = mapping[index][1]

        def pause_generation(recv_req):
            last = scheduler.last_batch
            out = pause(recv_req)
            self.retracted_prefills = 0
            self.paused_requests = None
            if recv_req.mode == "retract" and last is not None and last is not scheduler.running_batch \
                    and last.forward_mode.is_extend():
                last.filter_batch()  # finished requests are already released
                if not last.is_empty():
                    for req in last.retract_all(scheduler.server_args):
                        scheduler._add_request_to_queue(req)
                        self.retracted_prefills += 1
                scheduler.last_batch = scheduler.cur_batch = None
            running = 0 if scheduler.running_batch.is_empty() else scheduler.running_batch.batch_size()
            self.paused_requests = len(scheduler.waiting_queue) if running == 0 else None  # None: not paused
            self.pauses += 1
            return out

        mapping[index] = (mapping[index][0], pause_generation)

    @staticmethod
    def wrap_idle_wait(scheduler) -> None:
        """The scheduler's loop polls its sockets without a pause while generation is paused or nothing is queued
        (a core and half the GIL, taken from the swap and the trainer in this process): such a turn now waits
        IDLE_WAIT_S first, as sglang-jax's loop does when idle with a communication backend."""
        import time

        recv = scheduler.recv_requests

        def recv_requests():
            idle = scheduler.last_batch is None and scheduler.running_batch.is_empty() and not scheduler.waiting_queue
            if scheduler._engine_paused or idle:
                time.sleep(IDLE_WAIT_S)
            return recv()

        scheduler.recv_requests = recv_requests

    @staticmethod
    def take_failure_signals(scheduler) -> None:
        """The engine's failure signals (a forward's exception, the watchdog) come to this process, where the
        Stopper turns them into one error line and exit 3; sglang-jax sends them to the parent process."""
        import psutil

        for owner in (scheduler, scheduler.tp_worker):
            if hasattr(owner, "parent_process"):
                owner.parent_process = psutil.Process()

    def begin_change(self) -> None:
        """A swap starts changing the Params: every forward step from now on is mixed until end_change()."""
        self.changing = True

    def end_change(self, weights_id: int | None) -> None:
        """The Params are one whole set again: `weights_id` (a new set, or the previous one after a rollback).
        None: they are not (a failed swap without rollback), and every later forward step counts as mixed."""
        if weights_id is not None:
            self.weights_id, self.changing = weights_id, False

    def paused(self, hold_waiting: bool) -> None:
        """This swap's pause is confirmed: the next flush is its flush; hold_waiting (rank >= 1 of several
        hosts, whose flush comes from rank 0): hold the waiting requests aside for it."""
        self.hold_waiting, self.flushes_at_pause = hold_waiting, self.flushes

    def release_waiting(self) -> None:
        """The swap's flush is over (or will not come): waiting requests are not held aside any more."""
        self.hold_waiting = False

    async def send_pause(self) -> None:
        """pause_generation(retract) through the tokenizer manager (the scheduler handles it on its thread)."""
        from sgl_jax.srt.managers.io_struct import PauseGenerationReqInput

        await self.engine.tokenizer_manager.pause_generation(PauseGenerationReqInput(mode=PAUSE_MODE))

    async def send_flush(self) -> None:
        """The scheduler's flush_cache with the waiting (retracted) requests held aside (last_flush says how it
        went, on every rank)."""
        self.hold_waiting = True
        try:
            await self.engine.tokenizer_manager.flush_cache()
        finally:
            self.hold_waiting = False

    async def send_continue(self) -> None:
        from sgl_jax.srt.managers.io_struct import ContinueGenerationReqInput

        await self.engine.tokenizer_manager.continue_generation(ContinueGenerationReqInput())

    def serving_bytes(self, exclude: set[tuple[int, int]]) -> int:
        """Device bytes of the arrays a paused (or idle) scheduler's batch still holds (the live inputs of its last
        forward steps), which the memory checks count apart from the weights. Buffers in `exclude` and arrays
        alive before the guard was installed are never counted."""
        seen, total = set(exclude), 0
        for refs in self.batch_inputs:
            for ref in refs:
                arr = ref()
                if arr is None or arr.is_deleted():
                    continue
                old = self.before_serving.get(id(arr))
                if old is not None and old() is arr:
                    continue
                try:
                    buffers = memory.device_buffers(arr, wait=False)
                except (RuntimeError, TypeError):  # deleted since (a forward donated it): not held any more
                    continue
                for device, ptr, nbytes in buffers:
                    if (device.id, ptr) not in seen:
                        seen.add((device.id, ptr))
                        total += nbytes
        return total

    def forward_counts(self) -> dict:
        return {"forwards": self.forwards, "forwards_mixed": len(self.mixed),
                "forwards_by_weights": {str(k): v for k, v in sorted(self.by_weights.items())}}


def serve_guard(engine) -> ServeGuard:
    """The engine's ServeGuard (installed at its first use: see attach())."""
    extras = engine_extras(engine)
    if "serve_guard" not in extras:
        extras["serve_guard"] = ServeGuard(engine)
    return extras["serve_guard"]


class LoaderTap:
    """Stands in for one Param of the model that sglang-jax's own loader fills. The loader reads the Param's
    shape and dtype through `.value` (an abstract value: the model is built with nnx.eval_shape) and its
    assignment `.value = array` goes to `on_assign` and is dropped: only one loaded tensor exists at a time."""

    def __init__(self, path: str, abstract, on_assign):
        self._path, self._abstract, self._on_assign = path, abstract, on_assign

    @property
    def value(self):
        return self._abstract

    @value.setter
    def value(self, array) -> None:
        self._on_assign(self._path, array)


def run_own_loader(model_runner, model_path: str, on_assign) -> None:
    """sglang-jax's OWN loader (its model file's weight mappings, its WeightLoader) over the checkpoint at
    `model_path`, on the engine's mesh and config, with every Param assignment handed to on_assign(path, array)
    instead (LoaderTap). on_assign must never raise (the loader's fast path takes any exception for its own
    failure and assigns the Param again) and must be thread-safe."""
    import copy

    from sgl_jax.srt.configs.load_config import LoadConfig
    from sgl_jax.srt.model_loader.loader import JAXModelLoader
    from sgl_jax.srt.utils.weight_utils import WeightLoader

    original = WeightLoader._get_param
    WeightLoader._get_param = lambda self, params, path: LoaderTap(path, original(self, params, path).value, on_assign)
    try:
        model_config = copy.copy(model_runner.model_config)
        model_config.model_path = model_path
        model_config._dummy_mode = False  # the engine's config says "dummy" (DummyModelLoader sets it; WeightLoader reads it)
        JAXModelLoader(LoadConfig(load_format="auto"), model_runner.mesh).load_model(model_config=model_config)
    finally:
        WeightLoader._get_param = original


def path_str(path) -> str:
    """('model', 'layers', 0, 'mlp', ...) or a jax key path -> 'model.layers.0.mlp...' (without '.value')."""
    parts = []
    for k in path:
        k = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(k))
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def model_params(model) -> dict[str, Any]:
    """{nnx path: nnx.Param} of an nnx model."""
    from flax import nnx

    return {path_str(p): node for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


def engine_params(model_runner) -> dict[str, Any]:
    """{nnx path: nnx.Param} of the engine's model."""
    return model_params(runner_model(model_runner))


def dummy_weights(model_runner, paths: set[str]) -> dict[str, Any]:
    """{nnx path: array} of these Params as sglang-jax's load_format="dummy" makes them: its own loader's dummy
    initialiser, run for these Params only, into an abstract copy of the model (the engine is not touched).
    Re-created bit for bit on every supported stack, whatever values its initialiser uses."""
    import jax
    from flax import nnx
    from sgl_jax.srt.utils.weight_utils import WeightLoader

    model, config = model_runner.model, model_runner.model_config
    make = [getattr(model, n) for n in dir(type(model)) if n.startswith("_create_") and n.endswith("weight_mappings")]
    if len(make) != 1:
        raise RuntimeError(f"{type(model).__name__} has {len(make)} _create_*weight_mappings methods, not 1")
    mesh = model_runner.mesh
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: type(model)(config.hf_config, dtype=config.dtype, mesh=mesh))
    wanted = {k: m for k, m in make[0]().items()
              if (t := getattr(m, "target_path", m)) and (t if isinstance(t, str) else t[0]) in paths}
    WeightLoader(model=abstract, model_config=config, mesh=mesh, dtype=config.dtype)._load_dummy_weights(
        nnx.state(abstract), wanted)
    made = {p: v.get_value() for p, v in model_params(abstract).items() if p in paths}
    missing = paths - {p for p, a in made.items() if trees.on_devices(a)}
    if missing:
        raise RuntimeError(f"sglang-jax's dummy initialiser made no array for {sorted(missing)[:3]}")
    return made


def kv_pool_buffers(model_runner) -> list:
    """The KV pool's device buffers, one fused array per layer. The forward donates them and the runner puts
    its outputs back into this very list (every stack), so it is always the current set."""
    return model_runner.token_to_kv_pool.kv_buffer


def set_kv_pool_buffers(model_runner, arrays: list) -> None:
    """Put new buffers into the KV pool's own list (in place: the runner's memory pools hold the pool)."""
    model_runner.token_to_kv_pool.kv_buffer[:] = arrays


def engine_leaf_paths(model_runner):
    """Paths of the flattened nnx state, in model_state_leaves order, and its treedef."""
    import jax
    from flax import nnx

    with_path, treedef = jax.tree_util.tree_flatten_with_path(nnx.split(runner_model(model_runner))[1])
    return [path_str(p) for p, _ in with_path], treedef


def flatten_model_state(model_runner) -> tuple[list, Any]:
    """The model's nnx state flattened as ModelRunner.initialize_jit does: (leaves, treedef)."""
    import jax
    from flax import nnx

    return jax.tree_util.tree_flatten(nnx.split(runner_model(model_runner))[1])


def attach(engine) -> tuple[RequestRecorder, ServeGuard]:
    """The tool's hooks on a running engine, installed once per engine (every ParamSwapper of it shares them):
    the RequestRecorder wraps Scheduler.stream_output; the ServeGuard wraps ModelRunner.jitted_run_model,
    Scheduler.flush_cache, Scheduler.recv_requests and the scheduler's PauseGenerationReqInput handler, and makes
    this process the
    scheduler's parent_process (the engine's failure signals come here). Each wrapper calls the original."""
    return request_recorder(engine), serve_guard(engine)

