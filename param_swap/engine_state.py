"""The engine's state: its Params, its flattened leaves, and the one way to change them (EngineState.assign)."""

import weakref
from collections.abc import Mapping
from typing import Any

from param_swap import sglang_adapter as adapter
from param_swap import trees
from param_swap.errors import ExitCode, ToolError

# the model runners whose KV pool release.free_kv() deleted, until release.rebuild_kv(): the released state is this
# record, never the buffers' own state (a forward in flight has donated them: deleted for a moment, every stack)
KV_FREED: weakref.WeakSet = weakref.WeakSet()


def kv_freed(model_runner) -> bool:
    return model_runner in KV_FREED


class EngineState:
    """The engine's Params ({nnx path: nnx.Param}) and its flattened leaves, with the one way to change them."""

    def __init__(self, model_runner):
        self.model_runner = model_runner
        self.params = adapter.engine_params(model_runner)
        self.leaf_paths, self.treedef = adapter.engine_leaf_paths(model_runner)
        self.leaf_index = {p: i for i, p in enumerate(self.leaf_paths)}

    def leaves(self) -> list:
        return adapter.leaves_of(self.model_runner)

    def arrays(self) -> list:
        """The Params' live arrays (none while the weights are released)."""
        return [v for p in self.params.values() if trees.on_devices(v := p.get_value()) and not v.is_deleted()]

    def assign(self, path: str, new) -> Any:
        """Point the Param at `new` and rebind model_state_leaves to a NEW list holding it (never mutate the
        engine's list in place), so the forward always sees live buffers. Returns the array it replaced."""
        old = self.params[path].get_value()
        self.params[path].set_value(new)
        leaves = list(self.leaves())
        leaves[self.leaf_index[path]] = new
        adapter.rebind_leaves(self.model_runner, leaves)
        return old

    def rebind_from_model(self) -> None:
        """model_state_leaves = a new flattening of the model; the structure must not change (it would recompile)."""
        leaves, treedef = adapter.flatten_model_state(self.model_runner)
        if treedef != self.treedef:
            raise ToolError("swap", "the model's state structure changed during the swap",
                            "a swapped Param changed the nnx tree; this would recompile or fail", ExitCode.ENGINE)
        adapter.rebind_leaves(self.model_runner, leaves)


def leaves_unchanged(state: EngineState, param_dict: Mapping[str, Any], replaced_alive: int) -> tuple[bool, dict]:
    """Same leaf count and treedef as the dummy engine; every swapped Param and leaf is the dict's array; no
    leaf is a deleted buffer; and no array the swap replaced is still alive (`replaced_alive`: nothing holds it)."""
    leaves = state.leaves()
    treedef = adapter.flatten_model_state(state.model_runner)[1]
    stale = [p for p in param_dict
             if state.params[p].get_value() is not param_dict[p] or leaves[state.leaf_index[p]] is not param_dict[p]]
    deleted = [state.leaf_paths[i] for i, leaf in enumerate(leaves) if not trees.on_devices(leaf) or leaf.is_deleted()]
    ok = (len(leaves) == len(state.leaf_paths) and treedef == state.treedef and not stale and not deleted
          and replaced_alive == 0 and len(param_dict) == len(state.params))
    return ok, {"num_leaves": len(leaves), "expected_leaves": len(state.leaf_paths),
                "treedef_equal": treedef == state.treedef, "params_swapped": len(param_dict),
                "params_in_model": len(state.params), "not_the_new_array": stale[:10], "deleted": deleted[:10],
                "replaced_still_alive": replaced_alive}
