"""The MLLM-JAX params tree as a trainer holds it: nested or flat, host (numpy) or device (jax.Array) leaves."""

from collections.abc import Mapping
from typing import Any

import numpy as np


def on_devices(x) -> bool:
    """A trainer-resident source: a jax.Array (numpy arrays and torch tensors are host sources)."""
    return hasattr(x, "sharding") and hasattr(x, "is_deleted")


def nest(flat: Mapping[str, Any]) -> dict:
    """Flat dotted keys -> the nested dict flax uses ({'model': {'layers_0': {...}}})."""
    from flax import traverse_util

    return traverse_util.unflatten_dict(dict(flat), sep=".")


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree, sep=".")


def read_only(flat: Mapping[str, Any]) -> bool:
    """A source nobody changes in place: numpy leaves that are not writeable (the tool's own trees, views of a
    mapped checkpoint; a caller sets arr.flags.writeable = False), or a lazy view of such (PerturbedWeights).
    The swapper keeps such a tree by reference as the next swap's free rollback."""
    base = getattr(flat, "base", flat)
    return bool(base) and all(isinstance(a, np.ndarray) and not a.flags.writeable for a in base.values())


def as_flat(mllm_params: Mapping[str, Any]) -> Mapping[str, Any]:
    """The MLLM-JAX tree, nested ({'model': {'layers_0': ...}}) or flat ('model.layers_0....'), as a flat
    mapping. A flat mapping (also a lazy one, like PerturbedWeights: its base is looked at) is used as it is."""
    if any(isinstance(v, Mapping) for v in getattr(mllm_params, "base", mllm_params).values()):
        return flatten(mllm_params)
    return mllm_params


def source_arrays(flat: Mapping[str, Any]) -> list:
    """The arrays behind a flat source (a lazy view such as PerturbedWeights exposes its `base`)."""
    return list(getattr(flat, "base", flat).values())


def trainer_arrays(*trees: Mapping[str, Any] | None) -> list:
    """The device arrays (the trainer's) of these trees, nested or flat."""
    return [a for tree in trees if tree is not None for a in source_arrays(as_flat(tree)) if on_devices(a)]
