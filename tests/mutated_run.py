"""Runs the tool with one deliberate defect, to prove its checks can fail. A check that cannot fail is a
defect of its own. Usage: python tests/mutated_run.py MUTATION[+MUTATION...] [tool args...]

  no_rebind       Params are assigned but model_state_leaves is never rebound (the forward keeps the dummies)
  skip_one_param  the swap leaves the last planned Param dummy
  copy_in_dict    after the swap, one dict entry is a copy of the engine's array, not the array itself
  no_flush        the radix cache is not flushed after the swap
  no_pause        generation is not paused around the swap, nor is the pause confirmed (agree_paused): forward
                  steps run on half-swapped weights
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
  replaced_kept_in_rounds  from the second swap on, the arrays each swap replaced stay referenced (rounds_no_leak:
                  memory that grows with every swap, and replaced_still_alive)
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
Layout errors that every structural check passes (the oracles --verify-weights / --verify-logits must fail):
  gate_up_swapped     layer 0's gate_proj and up_proj exchanged (a wrong row in the mapping table)
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

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGQUIT})  # as run_param_swap.py
import run_param_swap as rps  # noqa: E402

mutations, argv = sys.argv[1], sys.argv[2:]

def apply(mutation: str) -> None:
    if mutation == "no_rebind":
        def assign(self, path, new):
            old = self.params[path].get_value()
            self.params[path].set_value(new)
            return old

        rps.EngineState.assign = assign
        rps.EngineState.rebind_from_model = lambda self: None
    elif mutation == "skip_one_param":
        original = rps.place_and_assign

        def place_and_assign(state, plan, *args, **kwargs):
            return original(state, plan[:-1], *args, **kwargs)

        rps.place_and_assign = place_and_assign
    elif mutation == "copy_in_dict":
        original = rps.weights_swapped_from_mllm

        def weights_swapped_from_mllm(*args, **kwargs):
            import jax.numpy as jnp

            param_dict = original(*args, **kwargs)
            path = sorted(param_dict)[0]
            param_dict[path] = jnp.copy(param_dict[path])
            return param_dict

        rps.weights_swapped_from_mllm = weights_swapped_from_mllm
    elif mutation == "no_flush":
        async def flush_radix_cache(guard):
            return 0

        rps.flush_radix_cache = flush_radix_cache
    elif mutation == "no_pause":
        async def pause_generation(guard, pauses):
            return 0

        rps.pause_generation = pause_generation
        rps.agree_paused = lambda guard, pauses: None
    elif mutation == "flush_ignored":
        async def flush_radix_cache(guard):
            await guard.engine.tokenizer_manager.flush_cache()
            return 0

        rps.flush_radix_cache = flush_radix_cache
    elif mutation == "crash_while_serving":
        original_start = rps.ServeLoad.start

        def start(self, phases):
            original_start(self, phases)
            scheduler, calls = self.engine.scheduler_info["scheduler"], [0]
            process_batch_result = scheduler.process_batch_result

            def failing(*args, **kwargs):
                calls[0] += 1
                if calls[0] == 5:
                    raise RuntimeError("injected scheduler crash while serving")
                return process_batch_result(*args, **kwargs)

            scheduler.process_batch_result = failing

        rps.ServeLoad.start = start
    elif mutation.startswith("fail_swap_at_"):
        fail_at, calls = int(mutation.rsplit("_", 1)[1]), [0]
        original_place = rps.place

        def place(*args, **kwargs):
            calls[0] += 1
            if calls[0] == fail_at:
                raise RuntimeError("RESOURCE_EXHAUSTED: injected out of memory while placing a tensor")
            return original_place(*args, **kwargs)

        rps.place = place
    elif mutation == "device_copy_kept":  # a device-to-device swap keeps a second copy of every array it places
        kept, original_place_device = [], rps.place_device

        def place_device(*args, **kwargs):
            arr = original_place_device(*args, **kwargs)
            kept.append(arr + 0)
            return arr

        rps.place_device = place_device
    elif mutation == "slow_place":  # every tensor placement takes 0.3 s more: a window to stop a run mid-swap
        import time

        original_place = rps.place

        def place(*args, **kwargs):
            if os.environ.get("PARAM_SWAP_MARKER"):
                open(os.environ["PARAM_SWAP_MARKER"], "a").close()  # the swap has begun placing
            time.sleep(0.3)
            return original_place(*args, **kwargs)

        rps.place = place
    elif mutation == "pause_not_awaited":
        import time

        async def pause_generation(guard, pauses):
            guard.flushes_at_pause = guard.flushes
            return 0

        rps.pause_generation = pause_generation
        original_guard = rps.serve_guard

        def serve_guard(engine):
            extras = rps.engine_extras(engine)
            if "serve_guard" not in extras:  # before the guard wraps it: the scheduler's pause handler is slow
                mapping = rps.engine_scheduler(engine)._request_dispatcher._mapping
                index = next(i for i, (ty, _) in enumerate(mapping) if ty.__name__ == "PauseGenerationReqInput")
                handler = mapping[index][1]

                def slow(recv_req):
                    time.sleep(2)
                    return handler(recv_req)

                mapping[index] = (mapping[index][0], slow)
            return original_guard(engine)

        rps.serve_guard = serve_guard
    elif mutation == "flush_skipped":
        from sgl_jax.srt.managers.scheduler import Scheduler

        Scheduler.flush_cache = lambda self: (True, "", 0)
    elif mutation == "weights_id_kept":
        original_change = rps.ParamSwapper._change_engine

        def _change_engine(self, *args, **kwargs):
            kept = self.guard.weights_id
            out = original_change(self, *args, **kwargs)
            self.guard.weights_id = kept
            return out

        rps.ParamSwapper._change_engine = _change_engine
    elif mutation == "slow_forward":
        import time

        from sgl_jax.srt.model_executor.model_runner import ModelRunner

        original_forward = ModelRunner.forward

        def forward(self, *args, **kwargs):
            time.sleep(0.5)
            return original_forward(self, *args, **kwargs)

        ModelRunner.forward = forward
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
        import signal
        import threading

        original_generate, calls = rps.generate_greedy, [0]

        def generate_greedy(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 2:  # while the request loop runs, like a scheduler exception or the watchdog
                threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGQUIT)).start()
            return original_generate(*args, **kwargs)

        rps.generate_greedy = generate_greedy
    elif mutation == "scheduler_start_fails":  # the engine's own start fails (as a KV cache that does not fit would)
        from sgl_jax.srt.managers import scheduler

        def failing_init(self, *args, **kwargs):
            raise RuntimeError("injected scheduler start failure")

        scheduler.Scheduler.__init__ = failing_init
    elif mutation == "gate_up_swapped":
        rps.MLLM_TO_SGLANG.insert(0, (r"model\.layers_(0)\.mlp\.gate_proj\.kernel", "model.layers.{0}.mlp.up_proj.weight", "copy"))
        rps.MLLM_TO_SGLANG.insert(0, (r"model\.layers_(0)\.mlp\.up_proj\.kernel", "model.layers.{0}.mlp.gate_proj.weight", "copy"))
    elif mutation == "kv_heads_tiled":
        import dataclasses

        import numpy as np

        original_host_array = rps.host_array

        def host_array(item, src, num_kv_heads, *args):
            if item.op != "kv_heads" or item.replicas == 1:
                return original_host_array(item, src, num_kv_heads, *args)
            arr, transposed = original_host_array(dataclasses.replace(item, replicas=1), src, num_kv_heads, *args)
            axis = 0 if transposed else arr.ndim - 1
            return np.ascontiguousarray(np.concatenate([arr] * item.replicas, axis=axis)), transposed

        rps.host_array = host_array
    elif mutation == "layers_swapped":
        original_target_name = rps.target_name

        def target_name(mllm_key, *args):
            target, op = original_target_name(mllm_key, *args)
            for a, b in ((".layers.0.", ".layers.1."), (".layers.1.", ".layers.0.")):
                if a in target:
                    return target.replace(a, b), op
            return target, op

        rps.target_name = target_name
    elif mutation == "kernel_shifted":
        import numpy as np

        original_host_array = rps.host_array

        def host_array(item, src, num_kv_heads, *args):
            arr, transposed = original_host_array(item, src, num_kv_heads, *args)
            if item.target == "model.layers.0.mlp.down_proj.weight":  # the target's columns: its last axis
                arr = np.ascontiguousarray(np.roll(arr, 1, axis=0 if transposed else -1))
            return arr, transposed

        rps.host_array = host_array
    elif mutation == "norm_left_dummy":
        import numpy as np

        original_plan_swap, original_place, engine_params = rps.plan_swap, rps.place, {}

        def plan_swap(flat, params, *args):
            engine_params.update(params)
            return original_plan_swap(flat, params, *args)

        def place(item, src, num_kv_heads, *args, **kwargs):
            if item.target == "model.layers.0.post_attention_layernorm.scale":
                import jax

                return jax.device_put(np.asarray(engine_params[item.target].get_value()), item.sharding)
            return original_place(item, src, num_kv_heads, *args, **kwargs)

        rps.plan_swap, rps.place = plan_swap, place
    elif mutation == "no_torch":
        import importlib.util

        original_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "torch" else original_find_spec(name, *a)
    elif mutation == "loader_loads_twice":
        original_loader = rps.run_own_loader

        def run_own_loader(model_runner, model_path, on_assign):
            def twice(path, array):
                on_assign(path, array)
                if path == "model.norm.scale":
                    on_assign(path, array)

            original_loader(model_runner, model_path, twice)

        rps.run_own_loader = run_own_loader
    elif mutation == "compare_raises":
        original_compare, calls = rps.compare_arrays, [0]

        def compare_arrays(ours, theirs):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("injected failure of the oracle's compare")
            return original_compare(ours, theirs)

        rps.compare_arrays = compare_arrays
    elif mutation == "sglang_lacks_pause":
        from sgl_jax.srt.managers.scheduler import Scheduler

        del Scheduler.pause_generation
    elif mutation == "recorder_drops_last_token":
        original_take = rps.RequestRecorder.take

        def take(self, rid):
            record = original_take(self, rid)
            return {**record, "output_ids": record["output_ids"][:-1]}

        rps.RequestRecorder.take = take
    elif mutation in ("stale_tensor_in_round", "replaced_kept_in_rounds", "copy_kept_in_rounds"):
        original_swap, sources, kept = rps.place_and_assign, [], []

        def place_and_assign(state, plan, source, *args, **kwargs):
            sources.append(source)
            if mutation == "stale_tensor_in_round" and len(sources) == 3:
                key = next(i.source for i in plan if i.target == "model.layers.0.mlp.down_proj.weight")
                source = {**{k: source[k] for k in source}, key: sources[1][key]}
            return original_swap(state, plan, source, *args, **kwargs)

        rps.place_and_assign = place_and_assign
        if mutation == "replaced_kept_in_rounds":
            original_release = rps.SwapStats.release

            def release(self, old):
                if len(sources) >= 2:
                    kept.append(old)
                return original_release(self, old)

            rps.SwapStats.release = release
        elif mutation == "copy_kept_in_rounds":
            original_place = rps.place

            def place(*args, **kwargs):
                arr = original_place(*args, **kwargs)
                if len(sources) >= 2:
                    kept.append(arr + 0)
                return arr

            rps.place = place
    elif mutation == "flush_drops_waiting":
        from sgl_jax.srt.managers.io_struct import AbortReq

        original_init = rps.ServeGuard.__init__

        def __init__(self, engine):
            original_init(self, engine)
            scheduler = rps.engine_scheduler(engine)
            guarded = scheduler.flush_cache

            def flush_cache():
                if self.hold_waiting and scheduler.waiting_queue:
                    scheduler.abort_request(AbortReq(rid="", abort_all=True))
                return guarded()

            scheduler.flush_cache = flush_cache

        rps.ServeGuard.__init__ = __init__
    elif mutation == "rollback_from_b":
        original_arrays = rps.Rollback.arrays

        def arrays(self, items):
            if self.kind == "source":
                self.source = rps.PerturbedWeights(self.source)
            return original_arrays(self, items)

        rps.Rollback.arrays = arrays
    elif mutation == "skip_swap":
        rps.place_and_assign = lambda *args, **kwargs: {}
    elif mutation == "extra_step":
        original_budget = rps.validate_token_budget

        def validate_token_budget(*args):
            original_budget(*args)
            rps.HOSTS.agree("extra_step")

        rps.validate_token_budget = validate_token_budget
    elif mutation == "plan_one_short":
        original_plan = rps.ParamSwapper.plan
        rps.ParamSwapper.plan = lambda self, tree: original_plan(self, tree)[:-1]
    else:
        raise SystemExit(f"unknown mutation {mutation}")

for one in mutations.split("+"):
    apply(one)
rps.cli(argv)
