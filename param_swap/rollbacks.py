"""Rollback: how a failed swap puts back the weights it replaced, chosen before the swap starts (free where
the previous weights can be re-created)."""

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

import numpy as np

from param_swap import memory, placement
from param_swap import sglang_adapter as adapter
from param_swap.engine_state import EngineState
from param_swap.errors import log
from param_swap.planning import SwapItem
from param_swap.stats import SwapMode


class RollbackKind(enum.StrEnum):
    SOURCE = "source"  # placed again from the previous swap's read-only host tree, kept by reference: free
    DUMMY = "dummy"  # sglang-jax's own dummy initialiser run again (the engine still holds its start weights): free
    COPY = "copy"  # a host copy of each replaced array (this host's shards), made during the swap (backup_s)
    KEPT = "kept"  # bulk: the replaced arrays stay alive until every one is assigned
    RELEASED = "released"  # a resume: the Params' abstract values put back (the engine stays released): free
    OFF = "off"  # none: a failure mid-swap leaves the engine half-swapped (it is shut down, exit 3)


RECREATED = {RollbackKind.SOURCE, RollbackKind.DUMMY}  # the previous weights can be made again: freed first


@dataclasses.dataclass
class Rollback:
    """How a failed swap puts back the weights it had replaced (RollbackKind)."""

    kind: RollbackKind
    source: Mapping[str, Any] | None = None
    plan: list[SwapItem] | None = None
    num_kv_heads: int = 0
    model_runner: Any = None
    copies: dict = dataclasses.field(default_factory=dict)
    abstract: dict = dataclasses.field(default_factory=dict)  # RELEASED: {nnx path: abstract value}

    def backup(self, state: EngineState, items: list[SwapItem]) -> None:
        if self.kind == RollbackKind.COPY:
            self.copies.update({i.target: placement.host_shards(state.params[i.target].get_value()) for i in items})

    def arrays(self, items: list[SwapItem]) -> dict[str, Any]:
        """The previous weights of these items, placed again (raises if there is no way)."""
        if self.kind == RollbackKind.COPY:
            return {i.target: placement.from_host_shards(self.copies[i.target], i.shape, i.sharding) for i in items}
        if self.kind == RollbackKind.SOURCE:
            mine = {i.target: i for i in self.plan}
            return {i.target: placement.place(mine[i.target], self.source[mine[i.target].source], self.num_kv_heads)
                    for i in items}
        if self.kind == RollbackKind.RELEASED:
            return {i.target: self.abstract[i.target] for i in items}
        if self.kind == RollbackKind.DUMMY:
            return adapter.dummy_weights(self.model_runner, {i.target for i in items})
        raise RuntimeError(f"no rollback ({self.kind})")


def restore(state: EngineState, done: list[SwapItem], kept: Mapping[str, Any], rollback: Rollback) -> bool:
    """Put the previous weights of every item in `done` back (assigned, or freed first: the arrays still kept,
    else re-created by `rollback`), then rebind. `done` empty: the engine is as it was."""
    missing = [i for i in done if i.target not in kept]
    if missing and rollback.kind == RollbackKind.OFF:
        return False
    try:
        arrays = {**rollback.arrays(missing), **kept} if missing else dict(kept)
        for item in done:
            state.assign(item.target, arrays[item.target])
        state.rebind_from_model()
    except Exception as e:  # noqa: BLE001 - a restore that fails leaves the engine half-swapped: said, not hidden
        log(f"restoring the previous weights failed: {type(e).__name__}: {e}")
        return False
    return True


def holds_dummy_weights(state: EngineState) -> bool:
    """The engine's smallest Param equals sglang-jax's dummy initialiser run again (then a failed first
    swap can re-create the dummy weights instead of copying them: Rollback "dummy")."""
    path, param = min(state.params.items(), key=lambda kv: memory.param_bytes_sum([kv[1].get_value()]))
    try:
        again = adapter.dummy_weights(state.model_runner, {path})[path]
    except (RuntimeError, AttributeError, TypeError, KeyError, ValueError) as e:  # another sglang-jax version
        log(f"sglang-jax's dummy initialiser could not be run again ({type(e).__name__}: {e}): a rollback "
            "will copy the dummy weights")
        return False
    mine, theirs = placement.host_shards(param.get_value()), placement.host_shards(again)
    if mine.keys() != theirs.keys() or not all(np.array_equal(mine[k], theirs[k]) for k in mine):
        log(f"the engine's {path} is not sglang-jax's dummy initialisation: a rollback will copy it")
        return False
    return True


def choose_rollback(mode: SwapMode, rollback: bool | None, device: bool, free: Rollback | None,
                    model_runner) -> Rollback:
    """The swap's Rollback. bulk: "kept" (the replaced arrays stay alive until every one is assigned).
    rollback None: the free kind where there is one (`free`: the engine's weights can be re-created, "dummy"
    or "source"), else a host copy of each replaced array for host sources and none for device sources (a
    copy would go device->host; without one the swap runs under JAX's device-to-host transfer guard, which
    proves on TPU/GPU that nothing leaves the devices). True: a copy where nothing is free. False: none."""
    if mode == SwapMode.BULK:
        return Rollback(RollbackKind.KEPT)
    if rollback is False:
        return Rollback(RollbackKind.OFF)
    if free is not None:
        return dataclasses.replace(free)
    return Rollback(RollbackKind.COPY if rollback or not device else RollbackKind.OFF, model_runner=model_runner)


@dataclasses.dataclass
class UndoPoint:
    """Taken just before a swap changes the engine; agree_swapped undoes the swap with it if the hosts
    disagree, and drops it otherwise (a rollback's copies live no longer than the swap)."""
    swaps: int  # swaps completed before this one
    free_rollback: Rollback | None  # how the weights before this swap could be re-created for free
    rollback: Rollback  # this swap's
