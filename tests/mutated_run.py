"""Runs the tool with one deliberate defect, to prove its checks can fail. A check that cannot fail is a
defect of its own. Usage: python tests/mutated_run.py MUTATION[+MUTATION...] [tool args...]

Each defect patches the module of param_swap/ that defines what it changes, through patch(): the name must
exist there, and no other module may hold the original by a from-import (the patch would silently not take
effect there); either is an error before the tool starts (exit 99).

  no_rebind       Params are assigned but model_state_leaves is never rebound (the forward keeps the dummies, which
                  are not freed first: freed, the forward would fail on their deleted buffers, exit 3)
  skip_one_param  the swap leaves the last planned Param dummy
  copy_in_dict    after the swap, one dict entry is a copy of the engine's array, not the array itself
  no_flush        the radix cache is not flushed after the swap
  no_pause        generation is not paused around the swap, nor is the pause confirmed (agree_paused): forward
                  steps run on half-swapped weights (the replaced ones not freed first: freed, a forward would fail
                  on their deleted buffers, exit 3)
  flush_ignored   the flush is sent without holding the retracted requests aside and its answer is ignored
                  (sglang-jax refuses it while requests wait: the cache keeps the old weights' prefix KV)
  crash_while_serving  the scheduler thread raises once the --serve-load clients run (exit 3, one error line)
  fail_swap_at_N  the N-th tensor placement raises (a device out of memory, say): the swap must roll back
  sigquit_in_generate  the scheduler "dies" during the second generation (SIGQUIT, as sglang-jax signals it)
  scheduler_start_fails  the sglang-jax scheduler raises while the Engine starts (exit 3, never 137)
  device_copy_kept  a device-to-device swap keeps an extra copy of every placed array (single_copy_memory)
  slow_place      each tensor placement sleeps 0.3 s; the first writes the file $PARAM_SWAP_MARKER when set (not a
                  defect: a window to send a signal mid-swap)
  slow_engine_start  inside Engine(), once its scheduler exists: writes the file $PARAM_SWAP_MARKER, sleeps 10 s
                  (not a defect: a window to send a signal while the engine starts)
  pause_not_awaited  this process's swap goes on without waiting for its scheduler to confirm the pause, and
                  that scheduler takes 2 s to handle it (on one rank of several hosts: a rank not paused when
                  the Params change; the swap_paused agreement must refuse the swap on every rank)
  flush_skipped   this process's scheduler answers every radix cache flush with success and flushes nothing (on
                  one rank of several hosts: its cache keeps the old weights' prefix KV; swap_flush on every rank)
  weights_id_kept  this process's guard never learns that a swap completed (its forward steps are all counted
                  on the dummy set): on one rank of several hosts, the ranks' counts per weight set differ
                  (serve_no_mixed_forward: ranks_on_the_same_sets)
  slow_forward    every forward step of this process's model runner sleeps 0.5 s first (not a defect: a window
                  to kill one rank of several hosts while they generate)
  recorder_drops_last_token  the tool's record of each answer misses its last generated id (the engine's answer
                  cannot be trusted: generate)
  stale_tensor_in_round  the third swap (--rounds 2: round 2, back to A) places layer 0's down_proj from the
                  previous swap's tree (B): state that leaks between swaps, which only rounds_consistent sees
  replaced_kept_in_rounds  from the second swap on, the arrays each swap replaced stay referenced and are not
                  deleted first (rounds_no_leak: memory that grows with every swap, and replaced_still_alive)
  copy_kept_in_rounds  from the second swap on, a copy of every placed array stays on the devices (rounds_no_leak
                  by its memory alone: every leaf is the new array)
  flush_drops_waiting  the swap's flush makes sglang-jax's flush_cache succeed by aborting the waiting (retracted)
                  requests instead of holding them aside: the requests in flight are lost (serve_no_lost_requests)
  rollback_from_b  a rollback from the previous swap's tree places 0.02 - w of it (weights B) instead
  skip_swap       this process's swap touches nothing but reports success (on one rank of several hosts: a
                  partial swap, which swap_agreement must turn into exit 1 on every rank)
  plan_one_short  this process plans one tensor fewer (on one rank of several hosts: the hosts' plans differ)
  extra_step      this process takes one collective step more after validating the checkpoint (on one rank
                  of several hosts: the ranks run different code)
  kv_kept_on_release  release() records the KV pool's layout but frees none of its buffers (rl_released)
  dummy_set_cached  release() keeps a device copy of the engine's weights, as the reference authors' backend keeps
                  its dummy set to swap back before the trainer's step (rl_released)
  aliased_ref_kept  release() lets go of every weight but one Param that is the trainer's own array (rl_released:
                  the released engine still references a trainer buffer)
  kv_rebuilt_bigger  every rebuild of the KV pool has one page more than the pool had (rl_no_recompile: the forward
                  compiles again after each resume)
  resume_skips_one_tensor  resume() swaps in layer 0's down_proj from the previous step's params (a host copy kept
                  before the trainer's step) with this step's others (rl_weights_follow_trainer)
  resume_places_previous_params  resume() swaps in the previous step's params instead of this step's
                  (rl_weights_follow_trainer)
Layout errors that every structural check passes (the oracles --verify-weights / --verify-logits must fail):
  gate_up_swapped     gate_proj and up_proj exchanged in every layer (a wrong row in the tensor inventory)
  kv_heads_tiled      KV heads repeated as [h0, h1, h0, h1] instead of [h0, h0, h1, h1] (needs tp > KV heads)
  layers_swapped      layers 0 and 1 exchanged
  kernel_shifted      layer 0's down_proj shifted by one column
  norm_left_dummy     layer 0's post_attention_layernorm scale swapped in as a new array holding the dummy values
  no_torch            torch is not installed (as find_spec sees it)
The weights oracle itself:
  loader_loads_twice  sglang-jax's own loader assigns model.norm.scale twice (weights_equal_loader: loaded_twice)
  compare_raises      the oracle's compare of one tensor raises once (exit 3: the oracle failed; the loader must
                      not see it, or its fast path would load that tensor again)
  sglang_lacks_pause  the installed sglang-jax has no Scheduler.pause_generation (the probe: exit 2)
"""
import os
import signal
import sys
import types

import param_swap

param_swap.block_stop_signals()  # as run_param_swap.py, before numpy starts a thread

from param_swap import (  # noqa: E402
    engine_state,
    families,
    generation,
    oracles,
    pause,
    placement,
    planning,
    release,
    rl_cycle,
    rollbacks,
    rounds,
    runner,
    serve_load,
    stats,
    swapper,
    validation,
)
from param_swap import sglang_adapter as adapter  # noqa: E402
from param_swap.hosts import HOSTS  # noqa: E402

mutations, argv = sys.argv[1], sys.argv[2:]


def refuse(message: str) -> None:
    print(f"mutated_run: {message}", file=sys.stderr)
    sys.exit(99)


def patch(owner, name: str, new):
    """owner.name = new, returning the original. owner: a module of param_swap/ (no other module may hold the
    original by a from-import) or a class of one (its objects share the patched method)."""
    if not hasattr(owner, name):
        refuse(f"{owner.__name__} has no {name}: the mutation no longer fits the code")
    original = getattr(owner, name)
    if isinstance(owner, types.ModuleType):
        holders = [m for m, mod in list(sys.modules.items()) if m.startswith("param_swap") and mod is not owner
                   and any(v is original for v in vars(mod).values())]
        if holders:
            refuse(f"{owner.__name__}.{name} is also held by {holders} (a from-import): the patch would not take "
                   "effect there")
    setattr(owner, name, new)
    return original


def apply(mutation: str) -> None:
    if mutation == "no_rebind":
        def assign(self, path, new):
            old = self.params[path].get_value()
            self.params[path].set_value(new)
            return old

        patch(engine_state.EngineState, "assign", assign)
        patch(engine_state.EngineState, "rebind_from_model", lambda self: None)
        patch(swapper, "free_first", lambda *args: False)  # the dummies stay alive for the forward to use
    elif mutation == "skip_one_param":
        original = swapper.place_and_assign

        def place_and_assign(state, plan, *args, **kwargs):
            return original(state, plan[:-1], *args, **kwargs)

        patch(swapper, "place_and_assign", place_and_assign)
    elif mutation == "copy_in_dict":
        original = runner.swap_first

        def swap_first(*args, **kwargs):
            import jax.numpy as jnp

            param_dict = original(*args, **kwargs)
            path = sorted(param_dict)[0]
            param_dict[path] = jnp.copy(param_dict[path])
            return param_dict

        patch(runner, "swap_first", swap_first)
    elif mutation == "no_flush":
        async def flush_radix_cache(guard):
            return 0

        patch(pause, "flush_radix_cache", flush_radix_cache)
    elif mutation == "no_pause":
        async def pause_generation(guard, pauses, **_):
            return 0

        patch(pause, "pause_generation", pause_generation)
        patch(pause, "agree_paused", lambda guard, pauses: None)
        patch(swapper, "free_first", lambda *args: False)
    elif mutation == "flush_ignored":
        async def flush_radix_cache(guard):
            await guard.engine.tokenizer_manager.flush_cache()
            return 0

        patch(pause, "flush_radix_cache", flush_radix_cache)
    elif mutation == "crash_while_serving":
        original_start = serve_load.ServeLoad.start

        def start(self, phases):
            original_start(self, phases)
            scheduler, calls = adapter.engine_scheduler(self.engine), [0]
            process_batch_result = scheduler.process_batch_result

            def failing(*args, **kwargs):
                calls[0] += 1
                if calls[0] == 5:
                    raise RuntimeError("injected scheduler crash while serving")
                return process_batch_result(*args, **kwargs)

            scheduler.process_batch_result = failing

        patch(serve_load.ServeLoad, "start", start)
    elif mutation.startswith("fail_swap_at_"):
        fail_at, calls = int(mutation.rsplit("_", 1)[1]), [0]
        original_place = placement.place

        def place(*args, **kwargs):
            calls[0] += 1
            if calls[0] == fail_at:
                raise RuntimeError("RESOURCE_EXHAUSTED: injected out of memory while placing a tensor")
            return original_place(*args, **kwargs)

        patch(placement, "place", place)
    elif mutation == "device_copy_kept":  # a device-to-device swap keeps a second copy of every array it places
        kept, original_place_device = [], placement.place_device

        def place_device(*args, **kwargs):
            arr = original_place_device(*args, **kwargs)
            kept.append(arr + 0)
            return arr

        patch(placement, "place_device", place_device)
    elif mutation == "slow_place":  # every tensor placement takes 0.3 s more: a window to stop a run mid-swap
        import time

        original_place = placement.place

        def place(*args, **kwargs):
            if os.environ.get("PARAM_SWAP_MARKER"):
                open(os.environ["PARAM_SWAP_MARKER"], "a").close()  # the swap has begun placing
            time.sleep(0.3)
            return original_place(*args, **kwargs)

        patch(placement, "place", place)
    elif mutation == "pause_not_awaited":
        import time

        async def pause_generation(guard, pauses, **_):
            guard.paused(hold_waiting=False)
            return 0

        patch(pause, "pause_generation", pause_generation)
        original_guard = adapter.serve_guard

        def serve_guard(engine):
            extras = adapter.engine_extras(engine)
            if "serve_guard" not in extras:  # before the guard wraps it: the scheduler's pause handler is slow
                mapping = adapter.engine_scheduler(engine)._request_dispatcher._mapping
                index = next(i for i, (ty, _) in enumerate(mapping) if ty.__name__ == "PauseGenerationReqInput")
                handler = mapping[index][1]

                def slow(recv_req):
                    time.sleep(2)
                    return handler(recv_req)

                mapping[index] = (mapping[index][0], slow)
            return original_guard(engine)

        patch(adapter, "serve_guard", serve_guard)
    elif mutation == "flush_skipped":
        from sgl_jax.srt.managers.scheduler import Scheduler

        patch(Scheduler, "flush_cache", lambda self: (True, "", 0))
    elif mutation == "weights_id_kept":
        def end_change(self, weights_id):  # the Params are whole again, but the guard keeps the old set's id
            if weights_id is not None:
                self.changing = False

        patch(adapter.ServeGuard, "end_change", end_change)
    elif mutation == "slow_forward":
        import time

        from sgl_jax.srt.model_executor.model_runner import ModelRunner

        original_forward = ModelRunner.forward

        def forward(self, *args, **kwargs):
            time.sleep(0.5)
            return original_forward(self, *args, **kwargs)

        patch(ModelRunner, "forward", forward)
    elif mutation == "slow_engine_start":
        import functools
        import pathlib
        import time

        import sgl_jax.srt.entrypoints.engine as engine_module

        original_create = engine_module.run_scheduler_loop_thread_after_create

        @functools.wraps(original_create)  # the probe reads its signature
        def create(*args, **kwargs):
            made = original_create(*args, **kwargs)
            pathlib.Path(os.environ["PARAM_SWAP_MARKER"]).touch()
            time.sleep(10)
            return made

        engine_module.run_scheduler_loop_thread_after_create = create
    elif mutation == "sigquit_in_generate":
        import threading

        original_generate, calls = generation.generate_greedy, [0]

        def generate_greedy(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 2:  # while the request loop runs, like a scheduler exception or the watchdog
                threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGQUIT)).start()
            return original_generate(*args, **kwargs)

        patch(generation, "generate_greedy", generate_greedy)
    elif mutation == "scheduler_start_fails":  # the engine's own start fails (as a KV cache that does not fit would)
        from sgl_jax.srt.managers import scheduler

        def failing_init(self, *args, **kwargs):
            raise RuntimeError("injected scheduler start failure")

        patch(scheduler.Scheduler, "__init__", failing_init)
    elif mutation == "gate_up_swapped":
        import dataclasses

        sglang_of = {t.hf: t.sglang for t in families.TENSORS}
        exchanged = {"model.layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
                     "model.layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.gate_proj.weight"}
        patch(families, "TENSORS", [dataclasses.replace(t, sglang=sglang_of[exchanged[t.hf]]) if t.hf in exchanged
                                    else t for t in families.TENSORS])
    elif mutation == "kv_heads_tiled":
        import dataclasses

        import numpy as np

        original_host_array = placement.host_array

        def host_array(item, src, num_kv_heads, *args):
            if item.op != "kv_heads" or item.replicas == 1:
                return original_host_array(item, src, num_kv_heads, *args)
            arr, transposed = original_host_array(dataclasses.replace(item, replicas=1), src, num_kv_heads, *args)
            axis = 0 if transposed else arr.ndim - 1
            return np.ascontiguousarray(np.concatenate([arr] * item.replicas, axis=axis)), transposed

        patch(placement, "host_array", host_array)
    elif mutation == "layers_swapped":
        original_target_name = planning.target_name

        def target_name(mllm_key, *args):
            target, op = original_target_name(mllm_key, *args)
            for a, b in ((".layers.0.", ".layers.1."), (".layers.1.", ".layers.0.")):
                if a in target:
                    return target.replace(a, b), op
            return target, op

        patch(planning, "target_name", target_name)
    elif mutation == "kernel_shifted":
        import numpy as np

        original_host_array = placement.host_array

        def host_array(item, src, num_kv_heads, *args):
            arr, transposed = original_host_array(item, src, num_kv_heads, *args)
            if item.target == "model.layers.0.mlp.down_proj.weight":  # the target's columns: its last axis
                arr = np.ascontiguousarray(np.roll(arr, 1, axis=0 if transposed else -1))
            return arr, transposed

        patch(placement, "host_array", host_array)
    elif mutation == "norm_left_dummy":
        import numpy as np

        original_plan_swap, original_place, dummy = planning.plan_swap, placement.place, {}
        target = "model.layers.0.post_attention_layernorm.scale"

        def plan_swap(flat, params, *args):  # its dummy values, read before the swap frees them
            dummy.setdefault(target, np.asarray(params[target].get_value()))
            return original_plan_swap(flat, params, *args)

        def place(item, src, num_kv_heads, *args, **kwargs):
            if item.target == target:
                import jax

                return jax.device_put(dummy[target], item.sharding)
            return original_place(item, src, num_kv_heads, *args, **kwargs)

        patch(planning, "plan_swap", plan_swap)
        patch(placement, "place", place)
    elif mutation == "no_torch":
        import importlib.util

        original_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "torch" else original_find_spec(name, *a)
    elif mutation == "loader_loads_twice":
        original_loader = adapter.run_own_loader

        def run_own_loader(model_runner, model_path, on_assign):
            def twice(path, array):
                on_assign(path, array)
                if path == "model.norm.scale":
                    on_assign(path, array)

            original_loader(model_runner, model_path, twice)

        patch(adapter, "run_own_loader", run_own_loader)
    elif mutation == "compare_raises":
        original_compare, calls = oracles.compare_arrays, [0]

        def compare_arrays(ours, theirs):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("injected failure of the oracle's compare")
            return original_compare(ours, theirs)

        patch(oracles, "compare_arrays", compare_arrays)
    elif mutation == "sglang_lacks_pause":
        from sgl_jax.srt.managers.scheduler import Scheduler

        del Scheduler.pause_generation
    elif mutation == "recorder_drops_last_token":
        original_take = adapter.RequestRecorder.take

        def take(self, rid):
            record = original_take(self, rid)
            return {**record, "output_ids": record["output_ids"][:-1]}

        patch(adapter.RequestRecorder, "take", take)
    elif mutation in ("stale_tensor_in_round", "replaced_kept_in_rounds", "copy_kept_in_rounds"):
        original_swap, sources, kept = swapper.place_and_assign, [], []

        def place_and_assign(state, plan, source, *args, **kwargs):
            sources.append(source)
            if mutation == "stale_tensor_in_round" and len(sources) == 3:
                key = next(i.source for i in plan if i.target == "model.layers.0.mlp.down_proj.weight")
                source = {**{k: source[k] for k in source}, key: sources[1][key]}
            return original_swap(state, plan, source, *args, **kwargs)

        patch(swapper, "place_and_assign", place_and_assign)
        if mutation == "replaced_kept_in_rounds":
            original_release = stats.SwapStats.release

            def release_but_keep(self, old):
                if len(sources) >= 2:
                    kept.append(old)
                return original_release(self, old)

            patch(stats.SwapStats, "release", release_but_keep)
            original_free_first = swapper.free_first  # kept alive: never deleted before the new arrays are placed
            patch(swapper, "free_first", lambda *args: len(sources) < 2 and original_free_first(*args))
        elif mutation == "copy_kept_in_rounds":
            original_place = placement.place

            def place(*args, **kwargs):
                arr = original_place(*args, **kwargs)
                if len(sources) >= 2:
                    kept.append(arr + 0)
                return arr

            patch(placement, "place", place)
    elif mutation == "flush_drops_waiting":
        from sgl_jax.srt.managers.io_struct import AbortReq

        original_init = adapter.ServeGuard.__init__

        def __init__(self, engine):
            original_init(self, engine)
            scheduler = adapter.engine_scheduler(engine)
            guarded = scheduler.flush_cache

            def flush_cache():
                if self.hold_waiting and scheduler.waiting_queue:
                    scheduler.abort_request(AbortReq(rid="", abort_all=True))
                return guarded()

            scheduler.flush_cache = flush_cache

        patch(adapter.ServeGuard, "__init__", __init__)
    elif mutation == "rollback_from_b":
        original_arrays = rollbacks.Rollback.arrays

        def arrays(self, items):
            if self.kind == "source":
                self.source = rounds.PerturbedWeights(self.source)
            return original_arrays(self, items)

        patch(rollbacks.Rollback, "arrays", arrays)
    elif mutation == "skip_swap":
        patch(swapper, "place_and_assign", lambda *args, **kwargs: {})
    elif mutation == "extra_step":
        original_budget = validation.validate_token_budget

        def validate_token_budget(*args):
            original_budget(*args)
            HOSTS.agree("extra_step")

        patch(validation, "validate_token_budget", validate_token_budget)
    elif mutation == "plan_one_short":
        original_plan = swapper.ParamSwapper.plan
        patch(swapper.ParamSwapper, "plan", lambda self, tree: original_plan(self, tree)[:-1])
    elif mutation == "kv_kept_on_release":
        def free_kv(model_runner):
            arrays = list(adapter.kv_pool_buffers(model_runner))
            return release.KvLayout(tuple((tuple(a.shape), a.dtype, a.sharding) for a in arrays), 0)

        patch(release, "free_kv", free_kv)
    elif mutation in ("dummy_set_cached", "aliased_ref_kept"):
        original_drop, cached = release.drop_weights, []

        def drop_weights(state, shared_ids):
            if mutation == "dummy_set_cached":
                cached[:] = [a + 0 for a in state.arrays()]  # a second set, on the engine's devices
                return original_drop(state, shared_ids)
            path, kept = next((p, v.get_value()) for p, v in state.params.items() if id(v.get_value()) in shared_ids)
            dropped = original_drop(state, shared_ids)
            state.params[path].set_value(kept)
            return dropped

        patch(release, "drop_weights", drop_weights)
    elif mutation == "kv_rebuilt_bigger":
        import dataclasses

        original_rebuild = release.rebuild_kv

        def rebuild_kv(model_runner, layout):
            grown = tuple(((shape[0] + 1, *shape[1:]), dtype, sharding) for shape, dtype, sharding in layout.buffers)
            return original_rebuild(model_runner, dataclasses.replace(layout, buffers=grown))

        patch(release, "rebuild_kv", rebuild_kv)
    elif mutation in ("resume_skips_one_tensor", "resume_places_previous_params"):
        import jax
        import numpy as np

        stash, original_step, original_resume = {}, rl_cycle.Trainer.step, swapper.ParamSwapper.resume_async

        def step(self, k):  # a host copy of the params before the trainer's step changes (and donates) them
            stash.update({key: (np.asarray(a), a.sharding) for key, a in self.params.items()})
            return original_step(self, k)

        async def resume_async(self, tree=None, **kwargs):
            if tree is not None and stash:
                stale = {key: jax.device_put(*stash[key]) for key in stash}
                down = "model.layers_0.mlp.down_proj.kernel"
                tree = stale if mutation == "resume_places_previous_params" else {**tree, down: stale[down]}
            return await original_resume(self, tree, **kwargs)

        patch(rl_cycle.Trainer, "step", step)
        patch(swapper.ParamSwapper, "resume_async", resume_async)
    else:
        refuse(f"unknown mutation {mutation}")


for one in mutations.split("+"):
    apply(one)
runner.cli(argv)
