"""Releasing the engine's device memory for a trainer's step, and taking it again: the KV pool's buffers freed
and rebuilt with exactly the shapes, dtypes and shardings they had (so the compiled forward is reused), the
engine's weights dropped (its own copies deleted, a trainer's arrays only let go of)."""

import dataclasses
import functools
import time

from param_swap import engine_state, memory, trees
from param_swap import sglang_adapter as adapter
from param_swap.engine_state import EngineState


@dataclasses.dataclass(frozen=True)
class KvLayout:
    """The KV pool's buffers as they were when freed: one (shape, dtype, sharding) per layer."""
    buffers: tuple[tuple, ...]
    bytes_sum: int  # device bytes, summed over devices

    def allocators(self) -> list:
        """One compiled allocator per buffer (cached across rebuilds)."""
        return [kv_zeros(shape, dtype, sharding) for shape, dtype, sharding in self.buffers]


@functools.cache
def kv_zeros(shape: tuple, dtype, sharding):
    """One jitted allocator per buffer layout, compiled once and cached (sglang-jax makes a new one per layer
    at start, which would compile again at every rebuild)."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def free_kv(model_runner) -> KvLayout:
    """Delete the KV pool's device buffers (the deleted arrays stay in its list: a forward would fail loudly)
    and return their layout."""
    arrays = list(adapter.kv_pool_buffers(model_runner))
    layout = KvLayout(tuple((tuple(a.shape), a.dtype, a.sharding) for a in arrays),
                      memory.param_bytes_sum(arrays))
    engine_state.KV_FREED.add(model_runner)
    for a in arrays:
        a.delete()
    return layout


def rebuild_kv(model_runner, layout: KvLayout) -> float:
    """New zeroed KV buffers with exactly the freed layout, into the pool's own list; returns the seconds."""
    import jax

    t = time.perf_counter()
    arrays = [make() for make in layout.allocators()]
    jax.block_until_ready(arrays)
    adapter.set_kv_pool_buffers(model_runner, arrays)
    engine_state.KV_FREED.discard(model_runner)
    return time.perf_counter() - t


def abstract(value):
    """A Param's value without its buffers: shape, dtype and sharding only."""
    import jax

    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding)


@dataclasses.dataclass(frozen=True)
class DroppedWeights:
    """What release(weights=True) let go of."""
    deleted_bytes_sum: int  # the engine's own arrays, deleted
    let_go_bytes_sum: int  # a trainer's arrays (alias=True): references dropped, the trainer keeps them
    abstract: dict  # {nnx path: the Param's abstract value}, what a failed resume puts back


def drop_weights(state: EngineState, shared_ids: set[int]) -> DroppedWeights:
    """Every Param and model_state_leaves entry becomes its abstract value: the engine's own arrays are deleted,
    the arrays it shares with a trainer (`shared_ids`) only let go of."""
    deleted = let_go = 0
    values = {path: param.get_value() for path, param in state.params.items()}
    empty = {path: abstract(v) for path, v in values.items()}
    for path in values:
        state.params[path].set_value(empty[path])
    state.rebind_from_model()
    for value in values.values():
        if not trees.on_devices(value) or value.is_deleted():
            continue
        nbytes = memory.param_bytes_sum([value])
        if id(value) in shared_ids:
            let_go += nbytes
        else:
            deleted += nbytes
            value.delete()
    return DroppedWeights(deleted, let_go, empty)


def engine_held_arrays(state: EngineState) -> list:
    """The live device arrays the engine still holds: its Params, its leaves and its KV pool's buffers."""
    found = {id(a): a for a in [*(p.get_value() for p in state.params.values()), *state.leaves(),
                                *adapter.kv_pool_buffers(state.model_runner)]
             if trees.on_devices(a) and not a.is_deleted()}
    return list(found.values())
