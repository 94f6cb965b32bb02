"""The checks on a run's own records: every answer consistent, the swap effective, the previous weights back
after a failure, the engine's Params the very arrays of the dict, and never two sets of weights."""

from collections.abc import Mapping
from typing import Any

from param_swap import generation, memory
from param_swap.engine_state import EngineState
from param_swap.errors import ToolError
from param_swap.generation import Answer
from param_swap.hosts import HOSTS
from param_swap.phases import PhaseLog


def check_generate(phases: PhaseLog) -> bool:
    """Every answer so far was consistent (see generate_greedy()): a wrong count or a text that is not the ids'
    decoding means the engine's answer cannot be trusted, whatever the weights."""
    bad = {phase: out.consistency_problems for phase, out in phases.answers if not out.consistent}
    return phases.check("generate", bool(phases.answers) and not bad, answers_checked=len(phases.answers),
                      num_tokens=[out.num_tokens for _, out in phases.answers], inconsistent=bad)


def check_restored(error: ToolError, engine, cfg, previous_output: Answer) -> None:
    """After a failed swap was rolled back (or refused before anything was assigned), the engine must answer
    exactly as it did with those weights."""
    if error.details.get("restored") or error.details.get("assigned") == 0:
        if HOSTS.rank == 0:  # reaches every host's scheduler
            engine.flush_cache()
        out = generation.generate_greedy(engine, cfg.prompt, cfg.max_new_tokens)
        error.details["previous_weights_answer_matches"] = out.output_ids == previous_output.output_ids


def check_swap_effective(phases: PhaseLog, before: Answer, after: Answer) -> bool:
    """The same prompt and greedy sampling must answer differently once the real weights are in: a swap the
    forward never sees (no rebind, stale radix cache) keeps the dummy answer."""
    return phases.check("swap_effective", before.output_ids != after.output_ids,
                      before_swap_output_ids=before.output_ids, after_swap_output_ids=after.output_ids)


def buffer_pointers(arr) -> list[tuple[int, int]]:
    return [(device.id, ptr) for device, ptr, _ in memory.device_buffers(arr)]


def check_param_sharing(phases: PhaseLog, state: EngineState, param_dict: Mapping[str, Any]) -> bool:
    """For EVERY path: the engine's Param value and its model_state_leaves entry are the dict's very
    jax.Array (identity), and every addressable shard sits on the same device buffer."""
    leaves = state.leaves()
    not_identical, not_same_buffer, shards = [], [], 0
    for path, arr in param_dict.items():
        param_value, leaf = state.params[path].get_value(), leaves[state.leaf_index[path]]
        if param_value is not arr or leaf is not arr:
            not_identical.append(path)
        want = buffer_pointers(arr)
        shards += len(want)
        if buffer_pointers(param_value) != want or buffer_pointers(leaf) != want:
            not_same_buffer.append(path)
    ok = phases.check("param_sharing", bool(param_dict) and not not_identical and not not_same_buffer,
                    paths_checked=len(param_dict), shards_checked=shards, not_identical=not_identical[:10],
                    not_same_buffer=not_same_buffer[:10])
    phases.phase("param_sharing_check", ok=ok, paths_checked=len(param_dict), shards_checked=shards,
               not_identical=len(not_identical), not_same_buffer=len(not_same_buffer))
    return ok


def check_single_copy(phases: PhaseLog, tolerance: float, phase_names: list[str]) -> bool:
    """The engine never holds two sets: device bytes in use, less what only a trainer holds (its arrays the
    engine does not share: trainer_only_bytes_sum, 0 without a trainer) and less the buffers the batch of a
    paused scheduler still holds (serving_bytes_sum: its last forward's inputs, 0 on an engine that never
    served), stay within the dummy engine's x tolerance. Both are counted, never estimated: a second copy of
    any weight is neither."""
    base = phases.memory_of("engine_ready_dummy")
    records = {r["phase"]: r for r in phases.records if r["phase"] in phase_names and "memory" in r}
    seen = {p: memory.bytes_in_use_sum(records[p]["memory"]) - records[p].get("trainer_only_bytes_sum", 0)
            - records[p].get("serving_bytes_sum", 0) for p in phase_names if p in records}
    limit = int(base * tolerance) if base else None
    ok = bool(base) and bool(seen) and all(v <= limit for v in seen.values())
    return phases.check("single_copy_memory", ok, engine_ready_dummy=base, limit=limit, tolerance=tolerance, **seen,
                      counted_apart={p: {k: records[p].get(k, 0) for k in ("trainer_only_bytes_sum", "serving_bytes_sum")}
                                     for p in seen})
