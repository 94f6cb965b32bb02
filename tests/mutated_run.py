"""Runs the tool with one deliberate defect, to prove its checks can fail. A check that cannot fail is a
defect of its own. Usage: python tests/mutated_run.py MUTATION [tool args...]

  no_rebind       Params are assigned but model_state_leaves is never rebound (the forward keeps the dummies)
  skip_one_param  the swap leaves the last planned Param dummy
  copy_in_dict    after the swap, one dict entry is a copy of the engine's array, not the array itself
  no_flush        the radix cache is not flushed after the swap
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_param_swap as rps  # noqa: E402

mutation, argv = sys.argv[1], sys.argv[2:]

if mutation == "no_rebind":
    def assign(self, path, new):
        old = self.params[path].get_value()
        self.params[path].set_value(new)
        return old

    rps.EngineState.assign = assign
    rps.EngineState.rebind_from_model = lambda self: None
elif mutation == "skip_one_param":
    original_swap = rps.swap

    def swap(state, plan, source, num_kv_heads, stats, param_dict=None):
        if param_dict is not None:
            param_dict.pop(plan[-1].target)
        return original_swap(state, plan[:-1], source, num_kv_heads, stats, param_dict)

    rps.swap = swap
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
    from sgl_jax.srt.entrypoints.engine import Engine

    Engine.flush_cache = lambda self: None
else:
    raise SystemExit(f"unknown mutation {mutation}")

code = rps.main(argv)
sys.stdout.flush()
os._exit(code)
