"""The plan: MLLM-JAX tree -> {sglang-jax nnx path: target}, every tensor validated against the engine's own
Params before anything touches the engine (plan_swap)."""

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from param_swap import families, memory
from param_swap.errors import ToolError
from param_swap.families import FAMILIES, Op


@dataclasses.dataclass
class SwapItem:
    """One tensor of a swap: where it comes from, where it goes, and what the target is (the engine's own)."""
    target: str  # sglang-jax nnx path
    source: str  # MLLM-JAX key
    op: Op
    replicas: int  # KV-head repeat factor (1 unless op == kv_heads and tp > KV heads)
    shape: tuple
    dtype: Any
    sharding: Any
    nbytes_sum: int  # device bytes of the target over all devices


def target_name(mllm_key: str, arch: str | None = None, moe_backend: str | None = None) -> tuple[str, Op]:
    """The sglang-jax path of an MLLM-JAX key and how its array becomes the target; `arch` (the engine's HF
    architecture) and `moe_backend` (epmoe or fused) pick the Family's own names."""
    family = FAMILIES.get(arch)
    own = {**family.sglang, **family.moe_backends.get(moe_backend, {})} if family else {}
    for row in families.TENSORS:
        if m := families.name_pattern(row.mllm).fullmatch(mllm_key):
            template = own.get(row.mllm, row.sglang)
            if template is not None:
                return template.format(**m.groupdict()), row.op
    raise ToolError("plan", f"no sglang-jax target for MLLM key {mllm_key!r}",
                    "the tree has a tensor the mapping does not know (Qwen2, Qwen3, Llama, Qwen3-MoE)")


def source_shape_after(op: Op, shape: tuple, replicas: int) -> tuple:
    """The shape a source of `shape` has once `op` made it the target."""
    if op == Op.TRANSPOSE:
        return tuple(reversed(shape))
    if op == Op.KV_HEADS:
        return (*shape[:-1], shape[-1] * replicas)
    return tuple(shape)


def plan_swap(flat: Mapping[str, np.ndarray], params: Mapping[str, Any], num_kv_heads: int,
              arch: str | None = None, moe_backend: str | None = None) -> list[SwapItem]:
    """Check the WHOLE swap before anything touches the engine: every target covered once, every source
    used, every shape right. Target shape, dtype and sharding come from the engine's own Params; `arch`
    (the engine's HF architecture) and `moe_backend` (epmoe or fused) pick the Family's own rows."""
    plan, problems, seen = [], [], set()
    for key in sorted(flat):
        target, op = target_name(key, arch, moe_backend)
        seen.add(target)
        if target not in params:
            problems.append(f"{key} -> {target}: the engine has no such Param")
            continue
        value = params[target].get_value()
        src_shape = tuple(flat[key].shape)
        replicas = 1
        if op == Op.KV_HEADS and src_shape[-1]:
            replicas = max(1, value.shape[-1] // src_shape[-1])
            if src_shape[-1] % num_kv_heads:
                problems.append(f"{key}: last axis {src_shape[-1]} is not a multiple of {num_kv_heads} KV heads")
                continue
        expected = source_shape_after(op, src_shape, replicas)
        if expected != tuple(value.shape):
            problems.append(f"{key} {src_shape} -> {target}: gives {expected}, the engine has {tuple(value.shape)}")
            continue
        plan.append(SwapItem(target, key, op, replicas, tuple(value.shape), value.dtype, value.sharding,
                             memory.device_bytes(value)))
    problems += [f"{t}: no source tensor in the checkpoint" for t in sorted(set(params) - seen)]
    if problems:
        raise ToolError("plan", f"{len(problems)} tensor(s) do not fit the engine: " + "; ".join(problems[:5]),
                        "the checkpoint does not match the engine's model (sizes, layers, tied embeddings)")
    return plan


def plan_fingerprint(plan: list[SwapItem]) -> str:
    """What a plan does (sources, targets, ops, shapes, dtypes, shardings), hashed: equal on every host."""
    rows = [(i.target, i.source, i.op, i.replicas, list(i.shape), str(i.dtype), str(i.sharding.spec)) for i in plan]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
